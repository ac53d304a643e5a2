"""The notary service: answer key queries about other servers, co-signing every answer.

Given a query per server (which key ids, and an optional ``minimum_valid_until_ts``),
the notary decides per stored key whether the cache may answer, answer and refresh in
the background, or fetch first, bounded by the request timeout (the rules and their
:class:`~keyring_module.notary.freshness.Verdict` are in
:mod:`~keyring_module.notary.freshness`).

The store is read once per query, for all its servers; then the query is planned
(:mod:`~keyring_module.notary.plan`): at most ``notary.max_fetches_per_request`` of its
servers are fetched or refreshed, those with nothing stored first, then those the
notary tried least recently (it remembers the last 100,000 network targets it tried,
see :mod:`~keyring_module.notary.attempts`), so dead origins sorting first cannot keep
a repeated batch from reaching the live ones; names our own policy refuses (e.g. denied
IP literals) spend none of it, nor, without trusted notaries, servers whose origin the
limiter would refuse now. The servers it fetches are
fetched with one call of the chain, so each trusted notary is asked once about them
all, and each is answered as soon as the chain reports its keys. A caller may hold
the fetches to a client's share (:mod:`~keyring_module.notary.client_budget`): the
:class:`~keyring_module.notary.client_budget.FetchLease` given to :meth:`answer_plan`
gets a unit back as each fetched server is settled, and the rest when the fetch ends;
the plan's background refreshes hold units of it too, until they are settled.
Background refreshes are made once per server at a time, at most a quarter of
``federation.max_concurrent_fetches`` servers at once (both kinds of fetch are made by
:mod:`~keyring_module.notary.server_fetches`). Whatever happens to a needed fetch (failure,
timeout, refused by the per-origin limiter, skipped by a cap), the last stored response
is served anyway, even an expired one; a server with nothing stored is left out.
Queries about our own server are answered from our own keys with no network call.

Each returned object is the origin's JSON unchanged plus exactly one signature of ours
(each server is answered from its stored responses by
:mod:`~keyring_module.notary.stored_answers`). The co-signed canonical bytes are cached
per stored response (content-addressed, so a changed response is a new entry), so a
cached answer costs no signing and no encoding, and no read of the stored responses
when it is the server's newest copy; the others' stored responses are read with one
store call per slice of a big batch. Answers served wholly from fresh stored copies
are also kept whole, under the normalised query (:mod:`~keyring_module.notary.query`),
so a repeated question costs no store read either, until a key write of one of the
servers it names (the store tells which). Both caches are bounded in bytes
(``notary.cosigned_cache_size``, ``notary.answer_cache_size``)::

    notary = NotaryService(own_keys, publisher, store, chain, reactor, 10_000)
    queries = [ServerQuery("example.org", {"ed25519:abc": None})]
    body = notary.cached_answer(queries) or await notary.query(queries)
    # or, normalising once and seeing first whether it waits for a fetch:
    # asked = notary.normalise(queries); notary.cached_answer_for(asked), else
    # plan = await notary.plan_for(asked), then await notary.answer_plan(asked, plan),
    # or plan.without_fetches() in its place, or plan.with_fetch_budget(lease.granted,
    # ...) and answer_plan(asked, plan, lease) for a client's share of fetches
    # b'{"server_keys":[{"server_name":"example.org",...,"signatures":{...}}]}'
"""

import collections
import logging
from typing import Callable, Mapping, Optional, Sequence

import attr
from twisted.internet import defer

from keyring_module.blocking import BlockingRunner, run_inline
from keyring_module.clock import ReactorClock, now_ms
from keyring_module.config import NotaryConfig
from keyring_module.fetchers.base import KeySource
from keyring_module.fetchers.refusal import RefuseReason, refusal_reason
from keyring_module.metrics import Metrics
from keyring_module.model import StoredKey
from keyring_module.notary.attempts import FetchAttempts
from keyring_module.notary.caches import AnswerCache, CachedAnswer, CoSigner
from keyring_module.notary.client_budget import FetchLease
from keyring_module.notary.freshness import Verdict
from keyring_module.notary.plan import (
    FetchAssessment,
    QueryPlan,
    Step,
    assess_servers,
    judge_servers,
    plan_query,
)
from keyring_module.notary.query import NormalisedQuery, ServerQuery, normalise_queries
from keyring_module.notary.server_fetches import DEFAULT_MAX_BACKGROUND_REFRESHES, ServerFetches
from keyring_module.notary.stored_answers import (
    LEFT_OUT,
    AnswerSizeCap,
    ServerAnswer,
    StoredAnswerer,
)
from keyring_module.pacing import COSTLY_ITEMS_PER_SLICE, pause, slices
from keyring_module.signing import OwnKeys, ServerKeyPublisher
from keyring_module.storage import KeyStore
from keyring_module.storage.write_news import TellsWrites

__all__ = ["NotaryService", "ServerQuery"]

logger = logging.getLogger(__name__)

#: The answer to a question about no server.
EMPTY_ANSWER = b'{"server_keys":[]}'
#: How long a whole cached answer may be reused without looking at the store again.
ANSWER_CACHE_TTL_MS = 5000
#: The most bytes of entries one answer holds (a 10,000-server answer of real servers is
#: about 4.6 MB); the servers beyond are left out (see :class:`AnswerSizeCap`).
MAX_ANSWER_BYTES = 32 * 1024 * 1024


class NotaryService:
    """Answers ``/_matrix/key/v2/query`` from the store, fetching when needed.

    Args:
        own_keys: our keys (co-signing, and queries about ourselves).
        publisher: our ready ``/server`` response, served for queries about ourselves.
        store: the key store (with its in-memory cache in front).
        refresher: the shared fetcher chain; fetches go through the per-origin limiter.
        clock: the reactor (time, and the request timeout).
        request_timeout_ms: how long a query waits for a needed fetch before answering
            from the store anyway.
        metrics: where to count how queries were answered (optional).
        config: the ``notary:`` section, for the sizes of the co-signed and answer
            caches and ``max_fetches_per_request`` (the defaults when not given).
        runner: where big co-signing work runs.
        origin_retry_after_ms: the per-origin limiter's ``retry_after_ms``: servers
            whose origin it would refuse now are not fetched nor refreshed. Give it only
            when the chain asks origins alone (no trusted notaries): a notary can still
            answer for a backed-off origin.
        max_background_refreshes: how many servers may be refreshed in the background
            at once (see :func:`~keyring_module.notary.server_fetches.background_refresh_cap`);
            beyond it a refresh is skipped (``refresh_cap``).
        refuse_reason: the chain's local policy refusing server names (see
            :mod:`~keyring_module.fetchers.refusal`): names it refuses spend none of a
            query's fetch budget (the chain would refuse them at once).
    """

    def __init__(
        self,
        own_keys: OwnKeys,
        publisher: ServerKeyPublisher,
        store: KeyStore,
        refresher: KeySource,
        clock: ReactorClock,
        request_timeout_ms: int,
        metrics: Optional[Metrics] = None,
        config: Optional[NotaryConfig] = None,
        runner: BlockingRunner = run_inline,
        *,
        origin_retry_after_ms: Optional[Callable[[str], int]] = None,
        max_background_refreshes: int = DEFAULT_MAX_BACKGROUND_REFRESHES,
        refuse_reason: Optional[RefuseReason] = None,
    ) -> None:
        if config is None:
            config = NotaryConfig()
        self._own_server_name = own_keys.server_name
        self._store = store
        self._clock = clock
        self._max_fetches = config.max_fetches_per_request
        self._cosigner = CoSigner(own_keys, config.cosigned_cache_size, runner, clock)
        self._metrics = metrics
        self._answers = AnswerCache(config.answer_cache_size)
        if isinstance(store, TellsWrites):  # else any write drops every answer
            store.add_write_listener(self._answers.changed)
        self._origin_retry_after_ms = origin_retry_after_ms
        self._refuse_reason = refuse_reason
        self._stored = StoredAnswerer(store, self._cosigner, publisher, metrics)
        self._fetches = ServerFetches(
            store,
            refresher,
            clock,
            request_timeout_ms,
            self._stored,
            metrics,
            max_background_refreshes,
        )

    @property
    def cosigned_cache(self) -> CoSigner:
        """The co-signed response cache."""
        return self._cosigner

    @property
    def answer_cache(self) -> AnswerCache:
        """The whole-answer cache."""
        return self._answers

    @property
    def fetch_attempts(self) -> FetchAttempts:
        """When the servers fetched or refreshed lately were last tried."""
        return self._fetches.attempts

    @property
    def refreshing(self) -> frozenset[str]:
        """The servers being refreshed in the background now."""
        return self._fetches.refreshing

    async def query(self, queries: Sequence[ServerQuery]) -> bytes:
        """The whole response body, ``{"server_keys":[...]}``, as canonical JSON bytes.

        The store is read once for every server asked about, then each server is
        planned (:mod:`~keyring_module.notary.plan`): answered from the store, refreshed
        in the background, or fetched first, at most ``notary.max_fetches_per_request``
        servers being fetched or refreshed. The servers fetched are fetched with one call
        of the chain; each is answered as soon as its keys are reported, so a slow
        origin delays only its own entry, for at most the request timeout. Servers the
        store answers take a synchronous path with no Deferred per server when their
        co-signed responses are cached (otherwise the stored responses of those not
        co-signed yet are read with one store call, and their misses signed together).
        A big batch is read, planned and answered a slice at a time, giving the reactor
        a turn in between (:mod:`~keyring_module.pacing`). The answer lists servers in
        the order of their names.

        When every server was answered from fresh stored copies, the whole body is kept
        under the normalised query (see :meth:`cached_answer`) until a key write of one
        of its servers, the earliest half-life involved, or a few seconds pass,
        whichever comes first.

        Args:
            queries: one per server.
        """
        asked = self.normalise(queries)
        return await self.answer_plan(asked, await self.plan_for(asked))

    async def plan_for(self, asked: NormalisedQuery) -> QueryPlan:
        """Read the store once for every server of ``asked`` and plan its answer
        (:func:`~keyring_module.notary.plan.plan_query`); nothing is fetched yet.

        A caller that must not wait for fetches answers
        :meth:`QueryPlan.without_fetches() <keyring_module.notary.plan.QueryPlan.without_fetches>`
        instead (see :meth:`answer_plan`).
        """
        generation = self._generation()
        now = now_ms(self._clock)
        stored: dict[str, Mapping[str, StoredKey]] = {}
        verdicts: list[Optional[Verdict]] = []
        assessed: list[FetchAssessment] = []
        backed_off = self._origin_refuses_now if self._origin_retry_after_ms is not None else None
        # A slice at a time, letting the reactor run in between (a big batch): the store
        # read, the verdicts, and the limiter and attempts looked up for the servers
        # needing a fetch; plan_query is left with sorting and counting.
        for first, last in slices(len(asked.queries)):
            if first:
                await pause(self._clock)
            queries = asked.queries[first:last]
            names = [q.server_name for q in queries if q.server_name != self._own_server_name]
            if len(asked.queries) == 1 and names:
                stored[names[0]] = await self._store.get_server_keys(names[0])
            elif names:
                stored.update(await self._store.get_many_server_keys(names))
            part = judge_servers(queries, stored, now, self._own_server_name)
            verdicts += part
            assessed.append(
                assess_servers(
                    queries,
                    part,
                    refused=self._refused,
                    backed_off=backed_off,
                    last_tried=self._fetches.attempts.last_tried_ms,
                    refreshing=self._fetches.is_refreshing,
                )
            )
        plan = plan_query(
            asked.queries,
            stored,
            now,
            self._own_server_name,
            self._max_fetches,
            verdicts=verdicts,
            assessment=FetchAssessment.joined(assessed),
        )
        return attr.evolve(plan, store_generation=generation)

    def _origin_refuses_now(self, server_name: str) -> bool:
        """Whether the per-origin limiter would refuse to fetch ``server_name`` now."""
        assert self._origin_retry_after_ms is not None
        return self._origin_retry_after_ms(server_name) > 0

    def _refused(self, server_name: str) -> bool:
        """Whether the chain refuses ``server_name`` at once (an invalid name, or one
        our local policy refuses)."""
        return refusal_reason(server_name, self._refuse_reason) is not None

    async def answer_plan(
        self, asked: NormalisedQuery, plan: QueryPlan, lease: Optional[FetchLease] = None
    ) -> bytes:
        """The answer to ``asked``, following ``plan`` (from :meth:`plan_for`).

        Args:
            asked: the question.
            plan: how it is answered.
            lease: the client's share of fetches the plan's fetches and background
                refreshes hold (see :mod:`~keyring_module.notary.client_budget`): a unit
                is given back as each fetched or refreshed server is settled, the rest
                when the fetch (or refresh) call ends (it may go on after the answer),
                or at once for what is neither fetched nor refreshed.
        """
        refresh_lease: Optional[FetchLease] = None
        if lease is not None:
            refresh_lease = lease.split(plan.refresh_count)
            if not plan.waits_for_fetch:
                lease.release_all()
                lease = None
        if not asked.queries:
            return EMPTY_ANSWER
        for reason, count in plan.skipped:
            self._fetches.count_skipped(reason, count)
        now = plan.now_ms
        answers = await self._answer_all(plan, lease, refresh_lease)
        body = b'{"server_keys":[' + b",".join(b for a in answers for b in a.blobs) + b"]}"
        fresh_until = [a.fresh_until_ms for a in answers]
        if all(t is not None for t in fresh_until):
            expires_ms = min([now + ANSWER_CACHE_TTL_MS] + [t or 0 for t in fresh_until])
            results = tuple(collections.Counter(a.result for a in answers).items())
            met = tuple(a.met_minimum for a in answers)
            entry = CachedAnswer(body, expires_ms, plan.store_generation, results, met)
            self._answers.put(asked.key, entry, now_ms(self._clock), self._generation())
        return body

    def cached_answer(self, queries: Sequence[ServerQuery]) -> Optional[bytes]:
        """The body :meth:`query` kept for the same question, if it is still good.

        The same question is the same servers, key ids and preferred key id, in any
        order; the kept answer is used when it meets every ``minimum_valid_until_ts``
        of ``queries``. An empty question always has its (empty) answer at hand.
        """
        return self.cached_answer_for(self.normalise(queries))

    def normalise(self, queries: Sequence[ServerQuery]) -> NormalisedQuery:
        """``queries`` in the normal form answers are cached under.

        What a query asks about our own server makes no difference to its answer (our
        own keys), so its key ids are left out of the normal form.
        """
        return normalise_queries(queries, self._own_server_name)

    def cached_answer_for(self, asked: NormalisedQuery) -> Optional[bytes]:
        """:meth:`cached_answer` for a question already normalised (by :meth:`normalise`;
        the POST hot path keeps the normal form of bodies it has seen)."""
        if not asked.queries:
            return EMPTY_ANSWER
        hit = self._answers.get(asked, now_ms(self._clock), self._generation())
        if hit is None:
            return None
        for result, count in hit.results:
            self._stored.count(result, count)
        return hit.body

    def _generation(self) -> int:
        """Changes whenever this process writes keys or is told of another's write."""
        return self._store.write_generation

    async def _answer_all(
        self,
        plan: QueryPlan,
        lease: Optional[FetchLease],
        refresh_lease: Optional[FetchLease] = None,
    ) -> list[ServerAnswer]:
        """Every server's answer: the fetch starts first, then background refreshes,
        then the servers the store answers, a slice at a time (letting the reactor run
        in between; see :meth:`StoredAnswerer.answer_together()
        <keyring_module.notary.stored_answers.StoredAnswerer.answer_together>`)."""
        if len(plan.servers) == 1 and plan.servers[0].step is not Step.FETCH:
            (server,) = plan.servers
            refresh_skipped = self._fetches.refresh_in_background(
                [server], plan.now_ms, refresh_lease
            )
            return [await self._stored.answer(server, plan.now_ms, refresh_skipped)]
        fetch_servers = [s for s in plan.servers if s.step is Step.FETCH]
        fetching: Optional["defer.Deferred[list[ServerAnswer]]"] = None
        if fetch_servers:
            fetching = defer.ensureDeferred(
                self._fetches.fetch_then_answer(fetch_servers, plan.now_ms, lease)
            )
        refresh_skipped = self._fetches.refresh_in_background(
            [s for s in plan.servers if s.step is Step.REFRESH], plan.now_ms, refresh_lease
        )
        from_store = [s for s in plan.servers if s.step is not Step.FETCH]
        answers: list[ServerAnswer] = []
        cap = AnswerSizeCap(MAX_ANSWER_BYTES)
        try:
            for first, last in slices(len(from_store), COSTLY_ITEMS_PER_SLICE):
                if first:
                    await pause(self._clock)
                if cap.reached:
                    break  # the rest are left out: no more reads nor signing for them
                part = from_store[first:last]
                part_answers = await self._stored.answer_together(
                    part, plan.now_ms, refresh_skipped
                )
                cap.note(part_answers)
                answers += part_answers
        except Exception:
            if fetching is not None:
                fetching.cancel()
                fetching.addErrback(lambda _: None)
            raise
        if fetching is None:
            in_order = answers + [LEFT_OUT] * (len(from_store) - len(answers))
        else:
            fetched = iter(await fetching)
            stored_answers = iter(answers)
            in_order = [
                next(fetched) if s.step is Step.FETCH else next(stored_answers, LEFT_OUT)
                for s in plan.servers
            ]
        capped, left_out = cap.apply(in_order)
        if left_out:
            self._count_truncated(plan, len(capped) - left_out)
        return capped

    def _count_truncated(self, plan: QueryPlan, first_left_out: int) -> None:
        """Log and count an answer cut at :data:`MAX_ANSWER_BYTES`: the servers from
        index ``first_left_out`` of ``plan`` on were left out."""
        left_out = len(plan.servers) - first_left_out
        logger.warning(
            "Answer to a key query about %d servers reached %d bytes: left out the last %d"
            " (from %s)",
            len(plan.servers),
            MAX_ANSWER_BYTES,
            left_out,
            plan.servers[first_left_out].query.server_name,
        )
        if self._metrics is not None:
            self._metrics.notary_truncated_answers.inc()
