"""The notary service: answer key queries about other servers, co-signing every answer.

Given a query per server (which key ids, and an optional ``minimum_valid_until_ts``),
the notary decides per stored key whether the cache may answer, answer and refresh in
the background, or fetch first, bounded by the request timeout (the rules and their
:class:`~keyring_module.notary.freshness.Verdict` are in
:mod:`~keyring_module.notary.freshness`).

The store is read once per query, for all its servers; then the query is planned
(:mod:`~keyring_module.notary.plan`): at most ``notary.max_fetches_per_request`` of its
servers are fetched or refreshed, those with nothing stored first. Whatever happens to a
needed fetch (failure, timeout, refused by the per-origin limiter, skipped by that cap),
the last stored response is served anyway, even an expired one; a server with nothing
stored is left out. Queries about our own server are answered from our own keys with no
network call.

Each returned object is the origin's JSON unchanged plus exactly one signature of ours.
The co-signed canonical bytes are cached per stored response (content-addressed, so a
changed response is a new entry), so a cached answer costs no signing and no encoding.
Answers served wholly from fresh stored copies are also kept whole, under the
normalised query (:mod:`~keyring_module.notary.query`), so a repeated question costs no
store read either. Both caches are bounded in bytes (``notary.cosigned_cache_size``,
``notary.answer_cache_size``)::

    notary = NotaryService(own_keys, publisher, store, chain, reactor, 10_000)
    queries = [ServerQuery("example.org", {"ed25519:abc": None})]
    body = notary.cached_answer(queries) or await notary.query(queries)
    # or, normalising once: asked = notary.normalise(queries), then
    # notary.cached_answer_for(asked) or await notary.query_for(asked)
    # or, to see first whether it waits for a fetch: plan = await notary.plan_for(asked),
    # then await notary.answer_plan(asked, plan), or plan.without_fetches() in its place
    # b'{"server_keys":[{"server_name":"example.org",...,"signatures":{...}}]}'
"""

import collections
import functools
import logging
from typing import Mapping, Optional, Sequence

import attr
from twisted.internet import defer

from keyring_module.blocking import BlockingRunner, run_inline
from keyring_module.clock import DeadlineExceeded, ReactorClock, now_ms, with_deadline
from keyring_module.config import NotaryConfig
from keyring_module.fetchers.base import KeySource
from keyring_module.metrics import AnswerResult, Metrics
from keyring_module.model import KeyRequest, StoredKey
from keyring_module.notary.caches import AnswerCache, CachedAnswer, CoSigner
from keyring_module.notary.freshness import Verdict, fresh_until_ms, judge_query, met_minimum
from keyring_module.notary.plan import QueryPlan, ServerPlan, Step, judge_servers, plan_query
from keyring_module.notary.query import NormalisedQuery, ServerQuery, normalise_queries
from keyring_module.pacing import COSTLY_ITEMS_PER_SLICE, pause, slices
from keyring_module.signing import OwnKeys, ServerKeyPublisher
from keyring_module.storage import KeyStore

logger = logging.getLogger(__name__)

__all__ = ["NotaryService", "ServerQuery"]

#: The answer to a question about no server.
EMPTY_ANSWER = b'{"server_keys":[]}'
#: How long a whole cached answer may be reused without looking at the store again.
ANSWER_CACHE_TTL_MS = 5000
#: The highest minimum an answer about ourselves meets (we always answer it).
_ANY_MINIMUM = 2**63 - 1


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

    @property
    def cosigned_cache(self) -> CoSigner:
        """The co-signed response cache."""
        return self._cosigner

    @property
    def answer_cache(self) -> AnswerCache:
        """The whole-answer cache."""
        return self._answers

    async def query(self, queries: Sequence[ServerQuery]) -> bytes:
        """The whole response body, ``{"server_keys":[...]}``, as canonical JSON bytes.

        The store is read once for every server asked about, then each server is
        planned (:mod:`~keyring_module.notary.plan`): answered from the store, refreshed
        in the background, or fetched first, at most ``notary.max_fetches_per_request``
        servers being fetched or refreshed. Fetches run concurrently; a slow origin
        delays only its own entry, for at most the request timeout. Servers the store
        answers take a synchronous path with no Deferred per server when their
        co-signed responses are cached (otherwise their misses are signed together).
        A big batch is read, planned and answered a slice at a time, giving the reactor
        a turn in between (:mod:`~keyring_module.pacing`). The answer lists servers in
        the order of their names.

        When every server was answered from fresh stored copies, the whole body is kept
        under the normalised query (see :meth:`cached_answer`) until a store write, the
        earliest half-life involved, or a few seconds pass, whichever comes first.

        Args:
            queries: one per server.
        """
        return await self.query_for(self.normalise(queries))

    async def query_for(self, asked: NormalisedQuery) -> bytes:
        """:meth:`query` for a question already normalised (by :meth:`normalise`), so
        that a request that looked for a cached answer first normalises only once."""
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
            asked.queries, stored, now, self._own_server_name, self._max_fetches, verdicts
        )
        return attr.evolve(plan, store_generation=generation)

    async def answer_plan(self, asked: NormalisedQuery, plan: QueryPlan) -> bytes:
        """The answer to ``asked``, following ``plan`` (from :meth:`plan_for`)."""
        if not asked.queries:
            return EMPTY_ANSWER
        self._count_skipped(plan)
        now = plan.now_ms
        answers = await self._answer_all(plan)
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

    async def _answer_all(self, plan: QueryPlan) -> list["_Answer"]:
        """Every server's answer: fetches start first (concurrently), then the servers
        the store answers, a slice at a time (letting the reactor run in between), each
        slice's co-signing misses signed together (in worker jobs when many)."""
        if len(plan.servers) == 1:
            (server,) = plan.servers
            if server.step is Step.FETCH:
                return [await self._fetch_then_answer(server.query, plan.now_ms)]
            return [await self._answer_from_store(server, plan.now_ms)]
        answers: list[Optional[_Answer]] = [None] * len(plan.servers)
        fetching: dict[int, "defer.Deferred[_Answer]"] = {}
        for index, server in enumerate(plan.servers):
            if server.step is Step.FETCH:
                fetching[index] = defer.ensureDeferred(
                    self._fetch_then_answer(server.query, plan.now_ms)
                )
        from_store = [i for i, server in enumerate(plan.servers) if server.step is not Step.FETCH]
        for first, last in slices(len(from_store), COSTLY_ITEMS_PER_SLICE):
            if first:
                await pause(self._clock)
            part = from_store[first:last]
            if all(self._signs_nothing(plan.servers[i]) for i in part):
                for index in part:  # in turn, with no Deferred each
                    answers[index] = await self._answer_from_store(plan.servers[index], plan.now_ms)
                continue
            started = self._cosigner.cosign_together(
                functools.partial(self._start_answers, plan, part)
            )
            try:
                done = await defer.gatherResults(started, consumeErrors=True)
            except defer.FirstError as e:
                e.subFailure.raiseException()
            for index, answer in zip(part, done, strict=True):
                answers[index] = answer
        if fetching:
            done = await defer.gatherResults(list(fetching.values()), consumeErrors=True)
            for index, answer in zip(fetching, done, strict=True):
                answers[index] = answer
        return [a for a in answers if a is not None]

    def _start_answers(
        self, plan: QueryPlan, indices: Sequence[int]
    ) -> list["defer.Deferred[_Answer]"]:
        """Start answering the servers of ``plan`` at ``indices`` from the store."""
        return [
            defer.ensureDeferred(self._answer_from_store(plan.servers[i], plan.now_ms))
            for i in indices
        ]

    async def _answer_from_store(self, server: ServerPlan, now: int) -> "_Answer":
        """A server's answer with no fetch to wait for (its step is not FETCH)."""
        if server.step is Step.SELF:
            return self._answer_self()
        if server.step is Step.STORE:
            return await self._answer_fresh(server.query, server.keys, now)
        result = AnswerResult.STALE
        if server.step is Step.REFRESH:
            self._refresh_in_background(self._refresh_request(server.query, now))
            result = AnswerResult.REFRESH
        blobs = await self._blobs(server.query, server.keys, now)
        result = result if blobs else AnswerResult.MISS
        self._count(result)
        return _Answer(blobs, result)

    def _answer_self(self) -> "_Answer":
        self._count(AnswerResult.SELF)
        return _Answer(
            [self._publisher.response_bytes()],
            AnswerResult.SELF,
            self._publisher.refresh_at_ms,
            _ANY_MINIMUM,
        )

    async def _answer_fresh(
        self, query: ServerQuery, keys: Mapping[str, StoredKey], now: int
    ) -> "_Answer":
        blobs = await self._blobs(query, keys, now)
        if not blobs:
            self._count(AnswerResult.MISS)
            return _Answer(blobs, AnswerResult.MISS)
        self._count(AnswerResult.FRESH)
        if query.preferred_key_id is not None and query.preferred_key_id not in keys:
            # Same answer as without a preference; not kept under an unknown key id.
            return _Answer(blobs, AnswerResult.FRESH)
        return _Answer(
            blobs,
            AnswerResult.FRESH,
            fresh_until_ms(query, keys),
            met_minimum(query, keys) or 0,
        )

    async def _fetch_then_answer(self, query: ServerQuery, now: int) -> "_Answer":
        """Fetch (bounded by the request timeout), then answer from the store, stale
        if the fetch failed or did not satisfy the query."""
        await self._fetch_with_deadline(self._refresh_request(query, now))
        now = now_ms(self._clock)
        keys = await self._store.get_server_keys(query.server_name)
        fetched = judge_query(query, keys, now) is not Verdict.FETCH
        result = AnswerResult.FETCHED if fetched else AnswerResult.STALE
        blobs = await self._blobs(query, keys, now)
        result = result if blobs else AnswerResult.MISS
        self._count(result)
        return _Answer(blobs, result)

    def _count(self, result: AnswerResult, count: int = 1) -> None:
        if self._metrics is not None:
            self._metrics.notary_answer(result).inc(count)

    def _count_skipped(self, plan: QueryPlan) -> None:
        for reason, count in plan.skipped:
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

    async def _fetch_with_deadline(self, request: KeyRequest) -> None:
        """Fetch, but stop waiting after the request timeout; the fetch goes on anyway."""
        fetch = defer.ensureDeferred(self._refresher.get_keys([request], use_cache=False))
        fetch.addErrback(
            lambda f: logger.warning(
                "Key fetch for %s failed: %s", request.server_name, f.getErrorMessage()
            )
        )
        try:
            await with_deadline(self._clock, fetch, self._timeout_s, cancel_work=False)
        except DeadlineExceeded:
            logger.info(
                "Key fetch for %s still running after %.1fs; answering from the store",
                request.server_name,
                self._timeout_s,
            )

    def _refresh_in_background(self, request: KeyRequest) -> None:
        d = defer.ensureDeferred(self._refresher.get_keys([request], use_cache=False))
        d.addErrback(
            lambda f: logger.warning(
                "Background key refresh for %s failed: %s",
                request.server_name,
                f.getErrorMessage(),
            )
        )

    async def _blobs(
        self, query: ServerQuery, keys: Mapping[str, StoredKey], now: int
    ) -> list[bytes]:
        if not keys:
            return []
        cosigned = self._cosigned_without_store_read(query, keys, now)
        if cosigned is not None:
            return [cosigned]
        responses = await self._store.get_server_responses(query.server_name)
        if query.key_criteria:
            wanted = {keys[k].response_id for k in query.key_criteria if k in keys}
            responses = [r for r in responses if r.response_id in wanted]
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
        """
        key = _sole_response_key(query, keys)
        if key is None:
            return None
        blob = self._cosigner.cached(key.response_id)
        if blob is not None and self._metrics is not None:
            self._metrics.served_response((now - key.fetched_ts) / 1000)
        return blob

    def _signs_nothing(self, server: ServerPlan) -> bool:
        """Whether answering ``server`` from the store surely needs no co-signing
        (ourselves, nothing stored, or its one response co-signed before)."""
        if server.step is Step.SELF or not server.keys:
            return True
        key = _sole_response_key(server.query, server.keys)
        return key is not None and self._cosigner.is_cached(key.response_id)


def _sole_response_key(query: ServerQuery, keys: Mapping[str, StoredKey]) -> Optional[StoredKey]:
    """A stored key of the one response all the key ids ``query`` asks for come from;
    None when it asks for all keys, for none stored, or for keys of several responses."""
    if not query.key_criteria:
        return None  # all keys: every stored response is served
    stored = [keys[k] for k in query.key_criteria if k in keys]
    if not stored or any(k.response_id != stored[0].response_id for k in stored):
        return None
    return stored[0]
