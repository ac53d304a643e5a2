"""Which servers of one notary query are fetched, and which are answered from the store.

The notary reads the store once for the whole query, then plans: each server gets a
:class:`Step` from its :class:`~keyring_module.notary.freshness.Verdict`, within the
query's fetch budget (``notary.max_fetches_per_request``):

* our own server: :attr:`Step.SELF` (our own keys, no network call);
* :attr:`Verdict.FRESH <keyring_module.notary.freshness.Verdict.FRESH>`:
  :attr:`Step.STORE`;
* :attr:`Verdict.FETCH <keyring_module.notary.freshness.Verdict.FETCH>`: the first
  ``max_fetches`` of them are :attr:`Step.FETCH` (fetch first, bounded by the request
  timeout), taken in this order: servers the notary never tried lately first (those
  with nothing stored to answer with before those with a stale copy), then the least
  recently tried (``last_tried``, see :mod:`~keyring_module.notary.attempts`), then the
  order of the query (sorted by name). So a server tried a moment ago, whatever it has
  stored, waits behind every server never tried, and a batch repeated after its first
  ``max_fetches`` servers turned out dead fetches the next ones instead, those with a
  stale copy too. The rest are :attr:`Step.STALE`: answered from whatever is stored,
  even expired, or left out, so that the caller asks their origins itself;
* :attr:`Verdict.REFRESH <keyring_module.notary.freshness.Verdict.REFRESH>`: what is
  left of the budget after the fetches goes to background refreshes
  (:attr:`Step.REFRESH`), least recently tried first; beyond it they are
  :attr:`Step.STALE` too (served from the store as they are, with no refresh). A
  server being refreshed already (``refreshing(name)``) joins that refresh: it is
  :attr:`Step.REFRESH` and spends none of the budget.

Two kinds of server spend none of the budget, so that names that cannot be fetched do
not keep others from being fetched; each is :attr:`Step.STALE` (answered from the
store, or left out) and counted in :attr:`QueryPlan.skipped`:

* a name our own policy refuses (``refused(name)``, e.g. an IP literal the federation IP
  ranges deny, see :mod:`~keyring_module.fetchers.refusal`): the chain would refuse it
  at once. Counted as :attr:`SkippedFetch.REFUSED
  <keyring_module.metrics.SkippedFetch.REFUSED>`;
* a server whose origin the per-origin limiter would refuse now (``backed_off(name)``,
  given only when the chain asks origins alone: with trusted notaries, such a server can
  still be answered through them). Counted as :attr:`SkippedFetch.BACKED_OFF
  <keyring_module.metrics.SkippedFetch.BACKED_OFF>`.

What planning asks per server (its verdict, whether it is held back, when it was last
tried) may be asked a slice at a time by the caller (:func:`judge_servers` and
:func:`assess_servers`, see :mod:`~keyring_module.pacing`): :func:`plan_query` is then
left with sorting and counting.

A query that must wait for a fetch (:attr:`QueryPlan.waits_for_fetch`) needs one of the
``notary.max_concurrent_requests`` slots; when none is free, :meth:`QueryPlan.without_fetches`
turns its fetches into :attr:`Step.STALE` (its background refreshes stay: they wait for
nothing). Fetches and refreshes both count against the client's share
(:mod:`~keyring_module.notary.client_budget`): when its client may fetch fewer servers
than planned (:attr:`QueryPlan.budget_wanted`), :meth:`QueryPlan.with_fetch_budget`
keeps the first of them, fetches before refreshes, in the order above::

    plan = plan_query(queries, stored, now_ms, "notary.example", max_fetches=100)
    if plan.waits_for_fetch and no_slot_free:
        plan = plan.without_fetches()
        if not plan.answers_anything:
            ...  # 429 M_LIMIT_EXCEEDED
    plan = plan.with_fetch_budget(client_room, SkippedFetch.CLIENT_CAP)
"""

import enum
from typing import Callable, Mapping, Optional, Sequence

import attr

from keyring_module.metrics import SkippedFetch
from keyring_module.model import StoredKey
from keyring_module.notary.freshness import Verdict, judge_query
from keyring_module.notary.query import ServerQuery

__all__ = [
    "QueryPlan",
    "FetchAssessment",
    "ServerPlan",
    "Step",
    "assess_servers",
    "has_stored_answer",
    "judge_servers",
    "plan_query",
]

#: The ``last_tried`` of a server never tried lately: before any time.
_NEVER = -1


class Step(enum.Enum):
    """How one server of a query is answered.

    Example:
        >>> Step.STALE.value
        'stale'
    """

    #: Our own keys.
    SELF = "self"
    #: From the store, as it is.
    STORE = "store"
    #: From the store, and refreshed in the background.
    REFRESH = "refresh"
    #: Fetched first (bounded by the request timeout), then from the store.
    FETCH = "fetch"
    #: Needed a fetch that was skipped: whatever is stored, or left out.
    STALE = "stale"


@attr.s(auto_attribs=True, frozen=True, slots=True)
class ServerPlan:
    """One server of a plan.

    Attributes:
        query: what is asked of this server.
        keys: its stored keys, by key id, as read when planning.
        step: how it is answered.
    """

    query: ServerQuery
    keys: Mapping[str, StoredKey]
    step: Step


@attr.s(auto_attribs=True, frozen=True, slots=True)
class QueryPlan:
    """How every server of one query is answered.

    Attributes:
        servers: one per server, in the query's order (sorted by name).
        now_ms: when the plan was made (the store was read).
        skipped: how many fetches were not made, by reason (only reasons that occur).
        store_generation: the store's write generation before it was read (an answer
            built on it is kept only while none of its servers was written since).
        fetch_order: the index in ``servers`` of each server fetched (:attr:`Step.FETCH`),
            first to fetch first (see the module docstring).
        refresh_order: the index in ``servers`` of each server refreshed in the
            background (:attr:`Step.REFRESH`), first to refresh first.
    """

    servers: tuple[ServerPlan, ...]
    now_ms: int
    skipped: tuple[tuple[SkippedFetch, int], ...] = ()
    store_generation: int = 0
    fetch_order: tuple[int, ...] = ()
    refresh_order: tuple[int, ...] = ()

    @property
    def waits_for_fetch(self) -> bool:
        """Whether answering waits for at least one fetch."""
        return bool(self.fetch_order)

    @property
    def fetch_count(self) -> int:
        """How many servers are fetched."""
        return len(self.fetch_order)

    @property
    def refresh_count(self) -> int:
        """How many servers are refreshed in the background."""
        return len(self.refresh_order)

    @property
    def budget_wanted(self) -> int:
        """How much of its client's share the plan takes: its fetches and refreshes."""
        return len(self.fetch_order) + len(self.refresh_order)

    @property
    def answers_anything(self) -> bool:
        """Whether at least one server is answered (ourselves, or something stored)."""
        return any(s.step is Step.SELF or has_stored_answer(s.query, s.keys) for s in self.servers)

    def without_fetches(self) -> "QueryPlan":
        """This plan with every fetch skipped (answered from the store, or left out),
        the skipped fetches counted as :attr:`SkippedFetch.BUSY`. Background refreshes
        stay (answering does not wait for them).

        Example:
            >>> plan = plan_query([ServerQuery("a.example")], {}, 0, "me.example", 1)
            >>> [s.step for s in plan.without_fetches().servers]
            [<Step.STALE: 'stale'>]
            >>> plan.without_fetches().skipped
            ((<SkippedFetch.BUSY: 'busy'>, 1),)
        """
        return self._dropping(self.fetch_order, (), SkippedFetch.BUSY)

    def with_fetch_budget(self, max_fetches: int, reason: SkippedFetch) -> "QueryPlan":
        """This plan fetching and refreshing only its first ``max_fetches`` servers
        (those of :attr:`fetch_order`, then those of :attr:`refresh_order`); the others
        are answered from the store, or left out, and counted as skipped for ``reason``.

        Example:
            >>> queries = [ServerQuery("a.example"), ServerQuery("b.example")]
            >>> plan = plan_query(queries, {}, 0, "me.example", 2, last_tried={"a.example": 5}.get)
            >>> smaller = plan.with_fetch_budget(1, SkippedFetch.CLIENT_CAP)
            >>> [s.step.value for s in smaller.servers], smaller.skipped
            (['stale', 'fetch'], ((<SkippedFetch.CLIENT_CAP: 'client_cap'>, 1),))
        """
        kept = max(0, max_fetches)
        kept_refreshes = max(0, kept - len(self.fetch_order))
        return self._dropping(self.fetch_order[kept:], self.refresh_order[kept_refreshes:], reason)

    def _dropping(
        self, fetches: tuple[int, ...], refreshes: tuple[int, ...], reason: SkippedFetch
    ) -> "QueryPlan":
        """This plan with the servers at ``fetches`` and ``refreshes`` (tails of
        :attr:`fetch_order` and :attr:`refresh_order`) answered as stored instead."""
        dropped = len(fetches) + len(refreshes)
        if not dropped:
            return self
        servers = list(self.servers)
        for index in fetches + refreshes:
            servers[index] = attr.evolve(servers[index], step=Step.STALE)
        return attr.evolve(
            self,
            servers=tuple(servers),
            skipped=self.skipped + ((reason, dropped),),
            fetch_order=self.fetch_order[: len(self.fetch_order) - len(fetches)],
            refresh_order=self.refresh_order[: len(self.refresh_order) - len(refreshes)],
        )


@attr.s(auto_attribs=True, frozen=True, slots=True)
class FetchAssessment:
    """What planning knows of each server of a query besides its verdict, in the
    query's order (see :func:`assess_servers`).

    Attributes:
        held_back: why a server needing a fetch or a refresh may not have one
            (:attr:`SkippedFetch.REFUSED`, :attr:`SkippedFetch.BACKED_OFF`), or None.
        tried_at: when a server needing a fetch or a refresh was last tried, or -1
            (never tried lately, held back, or needing neither).
        joins_refresh: whether a server needing a refresh is being refreshed already.
    """

    held_back: tuple[Optional[SkippedFetch], ...]
    tried_at: tuple[int, ...]
    joins_refresh: tuple[bool, ...]

    @classmethod
    def joined(cls, parts: Sequence["FetchAssessment"]) -> "FetchAssessment":
        """The assessment of a query from those of its slices, in order.

        Example:
            >>> part = FetchAssessment((None,), (5,), (False,))
            >>> FetchAssessment.joined([part, part]).tried_at
            (5, 5)
        """
        if len(parts) == 1:
            return parts[0]
        return cls(
            tuple(r for p in parts for r in p.held_back),
            tuple(t for p in parts for t in p.tried_at),
            tuple(j for p in parts for j in p.joins_refresh),
        )


def has_stored_answer(query: ServerQuery, keys: Mapping[str, StoredKey]) -> bool:
    """Whether the store holds something to answer ``query`` with (even expired).

    Example:
        >>> key = StoredKey("x", "ed25519:a", b"k" * 32, 3000, None, 1000, "origin", "r")
        >>> has_stored_answer(ServerQuery("x"), {"ed25519:a": key})
        True
        >>> has_stored_answer(ServerQuery("x", {"ed25519:b": None}), {"ed25519:a": key})
        False
    """
    if query.key_criteria:
        return any(key_id in keys for key_id in query.key_criteria)
    return bool(keys)


def judge_servers(
    queries: Sequence[ServerQuery],
    stored: Mapping[str, Mapping[str, StoredKey]],
    now_ms: int,
    own_server_name: str,
) -> list[Optional[Verdict]]:
    """Each server's :class:`~keyring_module.notary.freshness.Verdict` (None for our own
    server): the per-server part of planning, which a caller may run slice by slice
    (see :mod:`~keyring_module.pacing`) and hand to :func:`plan_query`.

    Example:
        >>> judge_servers([ServerQuery("a.example"), ServerQuery("me.example")], {}, 0, "me.example")
        [<Verdict.FETCH: 'fetch'>, None]
    """
    empty: Mapping[str, StoredKey] = {}
    return [
        None
        if query.server_name == own_server_name
        else judge_query(query, stored.get(query.server_name, empty), now_ms)
        for query in queries
    ]


def assess_servers(
    queries: Sequence[ServerQuery],
    verdicts: Sequence[Optional[Verdict]],
    *,
    refused: Optional[Callable[[str], bool]] = None,
    backed_off: Optional[Callable[[str], bool]] = None,
    last_tried: Optional[Callable[[str], Optional[int]]] = None,
    refreshing: Optional[Callable[[str], bool]] = None,
) -> FetchAssessment:
    """The :class:`FetchAssessment` of ``queries`` (judged ``verdicts``): the rest of
    the per-server part of planning, which a caller may run slice by slice (see
    :mod:`~keyring_module.pacing`) and hand to :func:`plan_query`. Only servers needing
    a fetch or a refresh are looked up, each with the first of ``refreshing`` (for a
    refresh), ``refused``, ``backed_off`` and ``last_tried`` that settles it.

    Args:
        queries: one per server.
        verdicts: their :func:`judge_servers`.
        refused: whether our own policy refuses to fetch a server (None: never).
        backed_off: whether the per-origin limiter would refuse it now (None: never).
        last_tried: when the notary last tried to fetch it (None: not lately).
        refreshing: whether it is being refreshed in the background now (None: never).

    Example:
        >>> queries = [ServerQuery("a.example"), ServerQuery("10.0.0.1")]
        >>> verdicts = judge_servers(queries, {}, 0, "me.example")
        >>> assessed = assess_servers(
        ...     queries, verdicts, refused={"10.0.0.1"}.__contains__, last_tried={"a.example": 5}.get
        ... )
        >>> assessed.held_back, assessed.tried_at
        ((None, <SkippedFetch.REFUSED: 'refused'>), (5, -1))
    """
    held_back: list[Optional[SkippedFetch]] = []
    tried_at: list[int] = []
    joins_refresh: list[bool] = []
    for query, verdict in zip(queries, verdicts, strict=True):
        reason: Optional[SkippedFetch] = None
        when: Optional[int] = None
        joins = False
        if verdict is Verdict.FETCH or verdict is Verdict.REFRESH:
            name = query.server_name
            if verdict is Verdict.REFRESH and refreshing is not None and refreshing(name):
                joins = True
            elif refused is not None and refused(name):
                reason = SkippedFetch.REFUSED
            elif backed_off is not None and backed_off(name):
                reason = SkippedFetch.BACKED_OFF
            elif last_tried is not None:
                when = last_tried(name)
        held_back.append(reason)
        tried_at.append(_NEVER if when is None else when)
        joins_refresh.append(joins)
    return FetchAssessment(tuple(held_back), tuple(tried_at), tuple(joins_refresh))


def plan_query(
    queries: Sequence[ServerQuery],
    stored: Mapping[str, Mapping[str, StoredKey]],
    now_ms: int,
    own_server_name: str,
    max_fetches: int,
    backed_off: Optional[Callable[[str], bool]] = None,
    verdicts: Optional[Sequence[Optional[Verdict]]] = None,
    last_tried: Optional[Callable[[str], Optional[int]]] = None,
    *,
    refused: Optional[Callable[[str], bool]] = None,
    refreshing: Optional[Callable[[str], bool]] = None,
    assessment: Optional[FetchAssessment] = None,
) -> QueryPlan:
    """Plan a query (see the module docstring).

    Args:
        queries: one per server, in the answer's order.
        stored: the stored keys of the servers asked about (missing: nothing stored).
        now_ms: the current time.
        own_server_name: our own name (answered from our own keys).
        max_fetches: how many servers may be fetched or refreshed
            (``notary.max_fetches_per_request``).
        backed_off: whether the per-origin limiter would refuse to fetch a server now
            (None: never asked); such servers are not fetched nor refreshed.
        verdicts: :func:`judge_servers` of the same arguments, when the caller judged
            them already (slice by slice); judged here otherwise.
        last_tried: when the notary last tried to fetch a server (None: not lately);
            servers never tried go first, then those tried longest ago (None: in the
            query's order).
        refused: whether our own policy refuses to fetch a server (None: never); such
            servers are not fetched nor refreshed.
        refreshing: whether a server is being refreshed in the background now (None:
            never); such a server joins that refresh, spending none of the budget.
        assessment: :func:`assess_servers` of the same arguments, when the caller
            assessed them already (slice by slice; ``backed_off``, ``last_tried``,
            ``refused`` and ``refreshing`` are then not used); assessed here otherwise.

    Returns:
        The plan.

    Example:
        >>> queries = [ServerQuery(n) for n in ("a.example", "b.example", "me.example")]
        >>> plan = plan_query(queries, {}, 0, "me.example", max_fetches=1)
        >>> [s.step.value for s in plan.servers], plan.skipped
        (['fetch', 'stale', 'self'], ((<SkippedFetch.REQUEST_CAP: 'request_cap'>, 1),))
        >>> plan = plan_query(queries, {}, 0, "me.example", 1, {"a.example"}.__contains__)
        >>> [s.step.value for s in plan.servers], plan.skipped[0]
        (['stale', 'fetch', 'self'], (<SkippedFetch.BACKED_OFF: 'backed_off'>, 1))
        >>> plan = plan_query(queries, {}, 0, "me.example", 1, last_tried={"a.example": 5}.get)
        >>> [s.step.value for s in plan.servers]  # "a.example" was tried lately
        ['stale', 'fetch', 'self']
    """
    empty: Mapping[str, StoredKey] = {}
    keys_of = [stored.get(q.server_name, empty) for q in queries]
    if verdicts is None:
        verdicts = judge_servers(queries, stored, now_ms, own_server_name)
    if assessment is None:
        assessment = assess_servers(
            queries,
            verdicts,
            refused=refused,
            backed_off=backed_off,
            last_tried=last_tried,
            refreshing=refreshing,
        )
    steps: list[Step] = []
    fetches: list[int] = []
    refreshes: list[int] = []
    held_back: dict[SkippedFetch, int] = {}
    joins_refresh = assessment.joins_refresh
    for index, (verdict, reason) in enumerate(zip(verdicts, assessment.held_back, strict=True)):
        if verdict is None:
            steps.append(Step.SELF)
            continue
        if verdict is Verdict.FRESH:
            steps.append(Step.STORE)
            continue
        if joins_refresh[index]:
            steps.append(Step.REFRESH)
            continue
        steps.append(Step.STALE)
        if reason is not None:
            held_back[reason] = held_back.get(reason, 0) + 1
        elif verdict is Verdict.FETCH:
            fetches.append(index)
        else:
            refreshes.append(index)
    # Never tried lately first, then the least recently tried; among those tried at
    # the same time (never, above all), nothing stored first (it would be left out);
    # ties in the query's order (the sort is stable).
    tried_at = assessment.tried_at
    fetches.sort(key=lambda i: (tried_at[i], has_stored_answer(queries[i], keys_of[i])))
    refreshes.sort(key=tried_at.__getitem__)
    budget = max(0, max_fetches)
    for index in fetches[:budget]:
        steps[index] = Step.FETCH
    refresh_budget = max(0, budget - len(fetches))
    for index in refreshes[:refresh_budget]:
        steps[index] = Step.REFRESH
    skipped = (
        (SkippedFetch.REFUSED, held_back.get(SkippedFetch.REFUSED, 0)),
        (SkippedFetch.BACKED_OFF, held_back.get(SkippedFetch.BACKED_OFF, 0)),
        (SkippedFetch.REQUEST_CAP, len(fetches) - min(len(fetches), budget)),
        (SkippedFetch.REFRESH_CAP, len(refreshes) - min(len(refreshes), refresh_budget)),
    )
    servers = tuple(
        ServerPlan(query, keys, step)
        for query, keys, step in zip(queries, keys_of, steps, strict=True)
    )
    return QueryPlan(
        servers,
        now_ms,
        tuple((r, n) for r, n in skipped if n),
        fetch_order=tuple(fetches[:budget]),
        refresh_order=tuple(refreshes[:refresh_budget]),
    )
