"""Which servers of one notary query are fetched, and which are answered from the store.

The notary reads the store once for the whole query, then plans: each server gets a
:class:`Step` from its :class:`~keyring_module.notary.freshness.Verdict`, within the
query's fetch budget (``notary.max_fetches_per_request``):

* our own server: :attr:`Step.SELF` (our own keys, no network call);
* :attr:`Verdict.FRESH <keyring_module.notary.freshness.Verdict.FRESH>`:
  :attr:`Step.STORE`;
* :attr:`Verdict.FETCH <keyring_module.notary.freshness.Verdict.FETCH>`: the first
  ``max_fetches`` of them are :attr:`Step.FETCH` (fetch first, bounded by the request
  timeout); servers with nothing stored to answer with get the fetches first, then the
  others; within each group, servers the notary never tried lately come first, then
  the least recently tried (``last_tried``, see :mod:`~keyring_module.notary.attempts`),
  then the order of the query (sorted by name). So a batch repeated after its first
  ``max_fetches`` servers turned out dead fetches the next ones instead. The rest are
  :attr:`Step.STALE`: answered from whatever is stored, even expired, or left out, so
  that the caller asks their origins itself;
* :attr:`Verdict.REFRESH <keyring_module.notary.freshness.Verdict.REFRESH>`: what is
  left of the budget after the fetches goes to background refreshes
  (:attr:`Step.REFRESH`), least recently tried first; beyond it they are
  :attr:`Step.STALE` too (served from the store as they are, with no refresh).

A server whose origin the per-origin limiter would refuse now (``backed_off(name)``,
given only when the chain asks origins alone: with trusted notaries, such a server can
still be answered through them) spends none of the budget: it is :attr:`Step.STALE`,
counted as :attr:`SkippedFetch.BACKED_OFF <keyring_module.metrics.SkippedFetch.BACKED_OFF>`,
so that dead origins cannot keep live ones from being fetched.

A query that must wait for a fetch (:attr:`QueryPlan.waits_for_fetch`) needs one of the
``notary.max_concurrent_requests`` slots; when none is free, :meth:`QueryPlan.without_fetches`
turns its fetches into :attr:`Step.STALE` (a fetch budget of 0). When its client may
fetch fewer servers than planned (:mod:`~keyring_module.notary.client_budget`),
:meth:`QueryPlan.with_fetch_budget` keeps the first of them, in the order above::

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

__all__ = ["QueryPlan", "ServerPlan", "Step", "has_stored_answer", "judge_servers", "plan_query"]

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
            built on it is kept only while no key was written since).
        fetch_order: the index in ``servers`` of each server fetched (:attr:`Step.FETCH`),
            first to fetch first (see the module docstring).
    """

    servers: tuple[ServerPlan, ...]
    now_ms: int
    skipped: tuple[tuple[SkippedFetch, int], ...] = ()
    store_generation: int = 0
    fetch_order: tuple[int, ...] = ()

    @property
    def waits_for_fetch(self) -> bool:
        """Whether answering waits for at least one fetch."""
        return bool(self.fetch_order)

    @property
    def fetch_count(self) -> int:
        """How many servers are fetched."""
        return len(self.fetch_order)

    @property
    def answers_anything(self) -> bool:
        """Whether at least one server is answered (ourselves, or something stored)."""
        return any(s.step is Step.SELF or has_stored_answer(s.query, s.keys) for s in self.servers)

    def without_fetches(self) -> "QueryPlan":
        """This plan with every fetch skipped (answered from the store, or left out),
        the skipped fetches counted as :attr:`SkippedFetch.BUSY`.

        Example:
            >>> plan = plan_query([ServerQuery("a.example")], {}, 0, "me.example", 1)
            >>> [s.step for s in plan.without_fetches().servers]
            [<Step.STALE: 'stale'>]
            >>> plan.without_fetches().skipped
            ((<SkippedFetch.BUSY: 'busy'>, 1),)
        """
        return self.with_fetch_budget(0, SkippedFetch.BUSY)

    def with_fetch_budget(self, max_fetches: int, reason: SkippedFetch) -> "QueryPlan":
        """This plan fetching only its first ``max_fetches`` servers (in
        :attr:`fetch_order`); the others are answered from the store, or left out, and
        counted as skipped for ``reason``.

        Example:
            >>> queries = [ServerQuery("a.example"), ServerQuery("b.example")]
            >>> plan = plan_query(queries, {}, 0, "me.example", 2, last_tried={"a.example": 5}.get)
            >>> smaller = plan.with_fetch_budget(1, SkippedFetch.CLIENT_CAP)
            >>> [s.step.value for s in smaller.servers], smaller.skipped
            (['stale', 'fetch'], ((<SkippedFetch.CLIENT_CAP: 'client_cap'>, 1),))
        """
        kept = max(0, max_fetches)
        dropped = self.fetch_order[kept:]
        if not dropped:
            return self
        servers = list(self.servers)
        for index in dropped:
            servers[index] = attr.evolve(servers[index], step=Step.STALE)
        return attr.evolve(
            self,
            servers=tuple(servers),
            skipped=self.skipped + ((reason, len(dropped)),),
            fetch_order=self.fetch_order[:kept],
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


def plan_query(
    queries: Sequence[ServerQuery],
    stored: Mapping[str, Mapping[str, StoredKey]],
    now_ms: int,
    own_server_name: str,
    max_fetches: int,
    backed_off: Optional[Callable[[str], bool]] = None,
    verdicts: Optional[Sequence[Optional[Verdict]]] = None,
    last_tried: Optional[Callable[[str], Optional[int]]] = None,
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
            servers tried longer ago are fetched and refreshed first (None: in the
            query's order).

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
    steps: list[Step] = []
    fetches: list[int] = []
    refreshes: list[int] = []
    backed_off_count = 0
    for index, (query, verdict) in enumerate(zip(queries, verdicts, strict=True)):
        if verdict is None:
            steps.append(Step.SELF)
            continue
        if verdict is Verdict.FRESH:
            steps.append(Step.STORE)
            continue
        steps.append(Step.STALE)
        if backed_off is not None and backed_off(query.server_name):
            backed_off_count += 1
        elif verdict is Verdict.FETCH:
            fetches.append(index)
        else:
            refreshes.append(index)
    # Nothing stored first (they would be left out), then never tried lately, then the
    # least recently tried; ties in the query's order (the sorts are stable).
    if last_tried is not None:
        tried = last_tried

        def tried_at(index: int) -> int:
            when = tried(queries[index].server_name)
            return _NEVER if when is None else when

        fetches.sort(key=tried_at)
        refreshes.sort(key=tried_at)
    fetches.sort(key=lambda i: has_stored_answer(queries[i], keys_of[i]))
    budget = max(0, max_fetches)
    for index in fetches[:budget]:
        steps[index] = Step.FETCH
    refresh_budget = max(0, budget - len(fetches))
    for index in refreshes[:refresh_budget]:
        steps[index] = Step.REFRESH
    skipped = (
        (SkippedFetch.BACKED_OFF, backed_off_count),
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
    )
