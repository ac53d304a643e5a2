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
a repeated batch from reaching the live ones (without trusted notaries, servers whose
origin the limiter would refuse now spend none of it). The servers it fetches are
fetched with one call of the chain, so each trusted notary is asked once about them
all, and each is answered as soon as the chain reports its keys. A caller may hold
the fetches to a client's share (:mod:`~keyring_module.notary.client_budget`): the
:class:`~keyring_module.notary.client_budget.FetchLease` given to :meth:`answer_plan`
gets a unit back as each fetched server is settled, and the rest when the fetch ends.
Background refreshes are made once per server at a time, at most
``federation.max_concurrent_fetches`` servers at once. Whatever happens to a needed
fetch (failure, timeout, refused by the per-origin limiter, skipped by a cap), the last
stored response is served anyway, even an expired one; a server with nothing stored is
left out. Queries about our own server are answered from our own keys with no network
call.

Each returned object is the origin's JSON unchanged plus exactly one signature of ours.
The co-signed canonical bytes are cached per stored response (content-addressed, so a
changed response is a new entry), so a cached answer costs no signing and no encoding,
and no read of the stored responses when it is the server's newest copy; the others'
stored responses are read with one store call per slice of a big batch.
Answers served wholly from fresh stored copies are also kept whole, under the
normalised query (:mod:`~keyring_module.notary.query`), so a repeated question costs no
store read either. Both caches are bounded in bytes (``notary.cosigned_cache_size``,
``notary.answer_cache_size``)::

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
import functools
import logging
from typing import Callable, Mapping, Optional, Sequence, TypeVar

import attr
from twisted.internet import defer
from twisted.python.failure import Failure

from keyring_module.blocking import BlockingRunner, run_inline
from keyring_module.clock import ReactorClock, now_ms
from keyring_module.config import FederationConfig, NotaryConfig
from keyring_module.fetchers.base import KeySource
from keyring_module.metrics import AnswerResult, Metrics, SkippedFetch
from keyring_module.model import KeyRequest, StoredKey, StoredResponse
from keyring_module.notary.attempts import FetchAttempts
from keyring_module.notary.caches import AnswerCache, CachedAnswer, CoSigner
from keyring_module.notary.client_budget import FetchLease
from keyring_module.notary.freshness import Verdict, fresh_until_ms, judge_query, met_minimum
from keyring_module.notary.plan import QueryPlan, ServerPlan, Step, judge_servers, plan_query
from keyring_module.notary.query import NormalisedQuery, ServerQuery, normalise_queries
from keyring_module.pacing import COSTLY_ITEMS_PER_SLICE, pause, slices
from keyring_module.signing import OwnKeys, ServerKeyPublisher
from keyring_module.storage import KeyStore

logger = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = ["NotaryService", "ServerQuery"]

#: The answer to a question about no server.
EMPTY_ANSWER = b'{"server_keys":[]}'
#: How long a whole cached answer may be reused without looking at the store again.
ANSWER_CACHE_TTL_MS = 5000
#: The highest minimum an answer about ourselves meets (we always answer it).
_ANY_MINIMUM = 2**63 - 1
#: Servers refreshed in the background at once, by default (``max_concurrent_fetches``).
DEFAULT_MAX_BACKGROUND_REFRESHES = FederationConfig().max_concurrent_fetches

#: Stored responses read ahead for some servers of a slice, by server name (a server
#: read with none has an empty list; a server not in it reads its own when needed).
ReadResponses = Mapping[str, Sequence[StoredResponse]]
#: Nothing read ahead.
NOTHING_READ: ReadResponses = {}


@attr.s(auto_attribs=True, frozen=True, slots=True)
class _Answer:
    """One server's part of an answer: its blobs, how it was answered, and, when it
    came from fresh stored copies, until when and up to which minimum it holds."""

    blobs: list[bytes]
    result: AnswerResult
    fresh_until_ms: Optional[int] = None  # None: not reusable
    met_minimum: int = 0


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
            at once (``federation.max_concurrent_fetches``); beyond it a refresh is
            skipped (``refresh_cap``).
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
    ) -> None:
        if config is None:
            config = NotaryConfig()
        self._metrics = metrics
        self._own_server_name = own_keys.server_name
        self._publisher = publisher
        self._store = store
        self._refresher = refresher
        self._clock = clock
        self._timeout_s = request_timeout_ms / 1000
        self._max_fetches = config.max_fetches_per_request
        self._cosigner = CoSigner(own_keys, config.cosigned_cache_size, runner)
        self._answers = AnswerCache(config.answer_cache_size)
        self._origin_retry_after_ms = origin_retry_after_ms
        self._max_refreshes = max_background_refreshes
        self._refreshing: set[str] = set()  # servers refreshed in the background now
        self._attempts = FetchAttempts()

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
        return self._attempts

    @property
    def refreshing(self) -> frozenset[str]:
        """The servers being refreshed in the background now."""
        return frozenset(self._refreshing)

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
        under the normalised query (see :meth:`cached_answer`) until a store write, the
        earliest half-life involved, or a few seconds pass, whichever comes first.

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
        # A slice at a time, letting the reactor run in between (a big batch).
        for first, last in slices(len(asked.queries)):
            if first:
                await pause(self._clock)
            queries = asked.queries[first:last]
            names = [q.server_name for q in queries if q.server_name != self._own_server_name]
            if len(asked.queries) == 1 and names:
                stored[names[0]] = await self._store.get_server_keys(names[0])
            elif names:
                stored.update(await self._store.get_many_server_keys(names))
            verdicts += judge_servers(queries, stored, now, self._own_server_name)
        plan = plan_query(
            asked.queries,
            stored,
            now,
            self._own_server_name,
            self._max_fetches,
            self._origin_refuses_now if self._origin_retry_after_ms is not None else None,
            verdicts,
            self._attempts.last_tried_ms,
        )
        return attr.evolve(plan, store_generation=generation)

    def _origin_refuses_now(self, server_name: str) -> bool:
        """Whether the per-origin limiter would refuse to fetch ``server_name`` now."""
        assert self._origin_retry_after_ms is not None
        return self._origin_retry_after_ms(server_name) > 0

    async def answer_plan(
        self, asked: NormalisedQuery, plan: QueryPlan, lease: Optional[FetchLease] = None
    ) -> bytes:
        """The answer to ``asked``, following ``plan`` (from :meth:`plan_for`).

        Args:
            asked: the question.
            plan: how it is answered.
            lease: the client's share of fetches the plan's fetches hold (see
                :mod:`~keyring_module.notary.client_budget`): a unit is given back as
                each fetched server is settled, the rest when the fetch call ends (it may
                go on after the answer), or at once when nothing is fetched.
        """
        if lease is not None and not plan.waits_for_fetch:
            lease.release_all()
            lease = None
        if not asked.queries:
            return EMPTY_ANSWER
        self._count_skipped(plan)
        now = plan.now_ms
        answers = await self._answer_all(plan, lease)
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
            self._count(result, count)
        return hit.body

    def _generation(self) -> int:
        """Changes whenever this process writes keys."""
        return self._store.write_generation

    async def _answer_all(self, plan: QueryPlan, lease: Optional[FetchLease]) -> list["_Answer"]:
        """Every server's answer: the fetch starts first, then background refreshes,
        then the servers the store answers, a slice at a time (letting the reactor run
        in between): in turn with no Deferred each when nothing needs co-signing, else
        the stored responses of the slice's servers not answered by the co-signed
        shortcut are read with one store call, and the slice is answered together so
        that its co-signing misses are signed at once (in worker jobs when many)."""
        if len(plan.servers) == 1 and plan.servers[0].step is not Step.FETCH:
            (server,) = plan.servers
            refresh_skipped = self._refresh_in_background([server], plan.now_ms)
            return [await self._answer_from_store(server, plan.now_ms, refresh_skipped)]
        fetch_servers = [s for s in plan.servers if s.step is Step.FETCH]
        fetching: Optional["defer.Deferred[list[_Answer]]"] = None
        if fetch_servers:
            fetching = defer.ensureDeferred(
                self._fetch_then_answer(fetch_servers, plan.now_ms, lease)
            )
        refresh_skipped = self._refresh_in_background(
            [s for s in plan.servers if s.step is Step.REFRESH], plan.now_ms
        )
        from_store = [s for s in plan.servers if s.step is not Step.FETCH]
        answers: list[_Answer] = []
        try:
            for first, last in slices(len(from_store), COSTLY_ITEMS_PER_SLICE):
                if first:
                    await pause(self._clock)
                part = from_store[first:last]
                to_read = [server for server in part if not self._signs_nothing(server)]
                if not to_read:
                    for server in part:  # in turn, with no Deferred each
                        answers.append(
                            await self._answer_from_store(server, plan.now_ms, refresh_skipped)
                        )
                    continue
                read = await self._read_responses(to_read)
                started = self._cosigner.cosign_together(
                    functools.partial(self._start_answers, part, plan.now_ms, refresh_skipped, read)
                )
                answers.extend(await _gather(started))
        except Exception:
            if fetching is not None:
                fetching.cancel()
                fetching.addErrback(lambda _: None)
            raise
        if fetching is None:
            return answers
        fetched = iter(await fetching)
        stored_answers = iter(answers)
        return [
            next(fetched) if s.step is Step.FETCH else next(stored_answers) for s in plan.servers
        ]

    async def _read_responses(self, servers: Sequence[ServerPlan]) -> ReadResponses:
        """The stored responses of ``servers``, by server name, read with one call of the
        store (a server with none has an empty list)."""
        names = [server.query.server_name for server in servers]
        found = await self._store.get_many_server_responses(names)
        return {name: found.get(name, []) for name in names}

    def _start_answers(
        self,
        servers: Sequence[ServerPlan],
        now: int,
        refresh_skipped: frozenset[str],
        read: ReadResponses,
    ) -> list["defer.Deferred[_Answer]"]:
        """Start answering ``servers`` from the store (with the responses in ``read``)."""
        return [
            defer.ensureDeferred(self._answer_from_store(server, now, refresh_skipped, read))
            for server in servers
        ]

    async def _answer_from_store(
        self,
        server: ServerPlan,
        now: int,
        refresh_skipped: frozenset[str] = frozenset(),
        read: ReadResponses = NOTHING_READ,
    ) -> "_Answer":
        """A server's answer with no fetch to wait for (its step is not FETCH); a
        refresh in ``refresh_skipped`` was not started (served as stale). Its stored
        responses are taken from ``read`` when they were read there, else read when
        needed."""
        if server.step is Step.SELF:
            return self._answer_self()
        responses = read.get(server.query.server_name)
        if server.step is Step.STORE:
            return await self._answer_fresh(server.query, server.keys, now, responses)
        refreshed = server.step is Step.REFRESH and server.query.server_name not in refresh_skipped
        result = AnswerResult.REFRESH if refreshed else AnswerResult.STALE
        return await self._answer_with(server.query, server.keys, now, result, responses)

    def _answer_self(self) -> "_Answer":
        self._count(AnswerResult.SELF)
        return _Answer(
            [self._publisher.response_bytes()],
            AnswerResult.SELF,
            self._publisher.refresh_at_ms,
            _ANY_MINIMUM,
        )

    async def _answer_fresh(
        self,
        query: ServerQuery,
        keys: Mapping[str, StoredKey],
        now: int,
        responses: Optional[Sequence[StoredResponse]] = None,
    ) -> "_Answer":
        answer = await self._answer_with(query, keys, now, AnswerResult.FRESH, responses)
        if answer.result is AnswerResult.MISS:
            return answer
        if query.preferred_key_id is not None and query.preferred_key_id not in keys:
            # Same answer as without a preference; not kept under an unknown key id.
            return answer
        return attr.evolve(
            answer,
            fresh_until_ms=fresh_until_ms(query, keys),
            met_minimum=met_minimum(query, keys) or 0,
        )

    async def _answer_with(
        self,
        query: ServerQuery,
        keys: Mapping[str, StoredKey],
        now: int,
        result: AnswerResult,
        responses: Optional[Sequence[StoredResponse]] = None,
    ) -> "_Answer":
        """The answer from ``keys``, counted as ``result`` (or ``miss`` when nothing is
        served); ``responses``: the server's stored responses, if read already."""
        blobs = await self._blobs(query, keys, now, responses)
        if not blobs:
            result = AnswerResult.MISS
        self._count(result)
        return _Answer(blobs, result)

    async def _fetch_then_answer(
        self, servers: Sequence[ServerPlan], now: int, lease: Optional[FetchLease] = None
    ) -> list["_Answer"]:
        """Fetch ``servers`` with one call of the chain (each trusted notary is asked
        once about them all), and answer each from its keys as soon as the chain reports
        them: stale if the fetch did not satisfy the query. Those not reported within the
        request timeout (or when the fetch fails) are answered from the store; the fetch
        goes on and stores what it finds. ``lease`` gets a unit back for each server the
        chain reports, and the rest when the fetch call ends."""
        reported: dict[str, "defer.Deferred[Optional[Mapping[str, StoredKey]]]"] = {
            s.query.server_name: defer.Deferred() for s in servers
        }
        unsettled = set(reported)
        self._attempts.tried(reported, now)

        def report(server_name: str, keys: Optional[Mapping[str, StoredKey]]) -> None:
            waiting = reported.get(server_name)
            if waiting is not None and not waiting.called:
                waiting.callback(keys)

        def settled(server_name: str, keys: Optional[Mapping[str, StoredKey]]) -> None:
            if lease is not None and server_name in unsettled:
                unsettled.discard(server_name)
                lease.release()
            report(server_name, keys)

        def give_up() -> None:
            for server_name in reported:
                report(server_name, None)

        def fetch_ended() -> None:
            if lease is not None:
                lease.release_all()
            give_up()

        def expire() -> None:
            waiting = [name for name, d in reported.items() if not d.called]
            if waiting:
                logger.info(
                    "Key fetch for %d servers (e.g. %s) still running after %.1fs;"
                    " answering from the store",
                    len(waiting),
                    waiting[0],
                    self._timeout_s,
                )
            give_up()

        def failed(f: Failure) -> None:
            logger.warning(
                "Key fetch for %d servers (e.g. %s) failed: %s",
                len(servers),
                servers[0].query.server_name,
                f.getErrorMessage(),
            )

        requests = [self._refresh_request(s.query, now) for s in servers]
        fetch = defer.ensureDeferred(
            self._refresher.get_keys(requests, use_cache=False, on_server=settled)
        )
        fetch.addCallbacks(lambda _: None, failed)
        fetch.addCallback(lambda _: fetch_ended())
        timer = self._clock.callLater(self._timeout_s, expire)
        try:
            return await _gather(
                [
                    defer.ensureDeferred(
                        self._answer_reported(s.query, reported[s.query.server_name])
                    )
                    for s in servers
                ]
            )
        finally:
            if timer.active():
                timer.cancel()

    async def _answer_reported(
        self,
        query: ServerQuery,
        reported: "defer.Deferred[Optional[Mapping[str, StoredKey]]]",
    ) -> "_Answer":
        """One fetched server's answer, from the keys the chain reports (None: not in
        time; empty: a name the chain refused or knows nothing of), else from the store."""
        keys = await reported
        if not keys:
            keys = await self._store.get_server_keys(query.server_name)
        now = now_ms(self._clock)
        fetched = judge_query(query, keys, now) is not Verdict.FETCH
        result = AnswerResult.FETCHED if fetched else AnswerResult.STALE
        return await self._answer_with(query, keys, now, result)

    def _count(self, result: AnswerResult, count: int = 1) -> None:
        if self._metrics is not None:
            self._metrics.notary_answer(result).inc(count)

    def _count_skipped(self, plan: QueryPlan) -> None:
        for reason, count in plan.skipped:
            self._count_skip(reason, count)

    def _count_skip(self, reason: SkippedFetch, count: int) -> None:
        logger.debug("Skipped %d fetches of one key query (%s)", count, reason.value)
        if self._metrics is not None:
            self._metrics.notary_fetches_skipped.labels(reason.value).inc(count)

    def _refresh_request(self, query: ServerQuery, now: int) -> KeyRequest:
        minimum = query.highest_minimum()
        return KeyRequest(
            server_name=query.server_name,
            key_ids=frozenset(query.key_criteria) if query.key_criteria else None,
            minimum_valid_until_ts=now if minimum is None else minimum,
        )

    def _refresh_in_background(self, servers: Sequence[ServerPlan], now: int) -> frozenset[str]:
        """Refresh ``servers`` (those whose step is REFRESH) in the background, with one
        call of the chain; returns the names not refreshed for lack of room.

        A server already being refreshed is not refreshed again (it counts as
        refreshed). At most ``max_background_refreshes`` servers are refreshed at once;
        the others are skipped and counted as ``refresh_cap``. A server leaves the
        refreshing set as soon as the chain reports its keys.
        """
        wanted = [
            s.query
            for s in servers
            if s.step is Step.REFRESH and s.query.server_name not in self._refreshing
        ]
        if not wanted:
            return frozenset()
        room = max(0, self._max_refreshes - len(self._refreshing))
        started, skipped = wanted[:room], wanted[room:]
        if skipped:
            self._count_skip(SkippedFetch.REFRESH_CAP, len(skipped))
        if started:
            self._start_refresh(started, now)
        return frozenset(q.server_name for q in skipped)

    def _start_refresh(self, queries: Sequence[ServerQuery], now: int) -> None:
        running = {q.server_name for q in queries}
        self._refreshing.update(running)
        self._attempts.tried(running, now)

        def settled(server_name: str, keys: Mapping[str, StoredKey]) -> None:
            if server_name in running:
                running.discard(server_name)
                self._refreshing.discard(server_name)

        def failed(f: Failure) -> None:
            logger.warning(
                "Background key refresh of %d servers (e.g. %s) failed: %s",
                len(queries),
                queries[0].server_name,
                f.getErrorMessage(),
            )

        def finished() -> None:
            self._refreshing.difference_update(running)
            running.clear()

        requests = [self._refresh_request(q, now) for q in queries]
        d = defer.ensureDeferred(
            self._refresher.get_keys(requests, use_cache=False, on_server=settled)
        )
        d.addCallbacks(lambda _: None, failed)
        d.addCallback(lambda _: finished())

    async def _blobs(
        self,
        query: ServerQuery,
        keys: Mapping[str, StoredKey],
        now: int,
        stored: Optional[Sequence[StoredResponse]] = None,
    ) -> list[bytes]:
        """The co-signed responses answering ``query``: the newest copy already
        co-signed when it answers alone, else the server's ``stored`` responses (read
        from the store when not given) that hold the keys asked for, those holding the
        preferred key id first."""
        if not keys:
            return []
        cosigned = self._cosigned_without_store_read(query, keys, now)
        if cosigned is not None:
            return [cosigned]
        if stored is None:
            stored = await self._store.get_server_responses(query.server_name)
        responses = list(stored)
        if query.key_criteria:
            selected = _responses_of(query, keys, responses)
            if selected is None:
                # Keys rewritten since ``keys`` were read (a fetch stored a newer copy
                # and the old one is gone): read them again, once.
                keys = await self._store.get_server_keys(query.server_name)
                selected = _responses_of(query, keys, responses)
            responses = selected or []
        if query.preferred_key_id is not None:
            preferred = keys.get(query.preferred_key_id)
            if preferred is not None:
                responses.sort(key=lambda r: r.response_id != preferred.response_id)
        if self._metrics is not None:
            for r in responses:
                self._metrics.served_response((now - r.fetched_ts) / 1000)
        blobs = [await self._cosigner.cosign(r) for r in responses]
        return [b for b in blobs if b is not None]

    def _cosigned_without_store_read(
        self, query: ServerQuery, keys: Mapping[str, StoredKey], now: int
    ) -> Optional[bytes]:
        """The answer for a query whose asked-for keys all come from one stored
        response already co-signed, with no read of the stored responses; None when
        the store must be read.

        Synapse's batches ask one key id per server, so a batch of stored servers is
        answered from the keys read for the whole batch and the co-signed cache alone.
        The shortcut is taken only when that response is the server's newest copy (see
        :func:`_is_newest_copy`): the store may drop an older copy at its bounds while
        key rows still point at it, and a dropped copy is not served.
        """
        key = _sole_response_key(query, keys)
        if key is None:
            return None
        if not _is_newest_copy(key, keys):
            return None
        blob = self._cosigner.cached(key.response_id)
        if blob is not None and self._metrics is not None:
            self._metrics.served_response((now - key.fetched_ts) / 1000)
        return blob

    def _signs_nothing(self, server: ServerPlan) -> bool:
        """Whether answering ``server`` from the store surely needs no co-signing
        (ourselves, nothing stored, or its one response, the newest copy, co-signed before)."""
        if server.step is Step.SELF or not server.keys:
            return True
        key = _sole_response_key(server.query, server.keys)
        return (
            key is not None
            and _is_newest_copy(key, server.keys)
            and self._cosigner.is_cached(key.response_id)
        )


def _responses_of(
    query: ServerQuery, keys: Mapping[str, StoredKey], responses: Sequence[StoredResponse]
) -> Optional[list[StoredResponse]]:
    """The stored responses holding the keys ``query`` asks for, or None when fewer of
    them are among ``responses`` than ``keys`` point at (``keys`` may be out of date)."""
    wanted = {keys[k].response_id for k in query.key_criteria if k in keys}
    selected = [r for r in responses if r.response_id in wanted]
    if len({r.response_id for r in selected}) < len(wanted):
        return None
    return selected


def _is_newest_copy(key: StoredKey, keys: Mapping[str, StoredKey]) -> bool:
    """Whether ``key``'s copy is, without doubt, the one most recently stored for its
    server: its ``fetched_ts`` is the newest of the server's keys, and every key with
    that ``fetched_ts`` points at the same copy.

    A store never drops the response it is storing, and a later store that drops copies
    points some key at a newer one; so the newest copy is still stored.

    Example:
        >>> def key(key_id, fetched_ts, response_id):
        ...     return StoredKey("a", key_id, b"k" * 32, 9, None, fetched_ts, "origin", response_id)
        >>> keys = {"k1": key("k1", 5, "r1"), "k2": key("k2", 7, "r2")}
        >>> _is_newest_copy(keys["k2"], keys), _is_newest_copy(keys["k1"], keys)
        (True, False)
        >>> keys["k3"] = key("k3", 7, "r3")  # stored at the same time: which came last?
        >>> _is_newest_copy(keys["k2"], keys)
        False
    """
    newest = max(k.fetched_ts for k in keys.values())
    return key.fetched_ts == newest and all(
        k.response_id == key.response_id for k in keys.values() if k.fetched_ts == newest
    )


async def _gather(deferreds: Sequence["defer.Deferred[T]"]) -> list[T]:
    """Every result, in order. The first failure is raised as itself (not wrapped in
    ``FirstError``), so a cancellation (the client went away) stays a cancellation;
    cancelling the wait cancels them all."""
    try:
        return await defer.gatherResults(list(deferreds), consumeErrors=True)
    except defer.FirstError as e:
        e.subFailure.raiseException()
        raise  # not reached: raiseException raises


def _sole_response_key(query: ServerQuery, keys: Mapping[str, StoredKey]) -> Optional[StoredKey]:
    """A stored key of the one response all the key ids ``query`` asks for come from;
    None when it asks for all keys, for none stored, or for keys of several responses."""
    if not query.key_criteria:
        return None  # all keys: every stored response is served
    stored = [keys[k] for k in query.key_criteria if k in keys]
    if not stored or any(k.response_id != stored[0].response_id for k in stored):
        return None
    return stored[0]
