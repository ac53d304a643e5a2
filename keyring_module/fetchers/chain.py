"""The fetcher chain: the store first, then origins and notaries, under the trust policy.

One chain (and one limiter) is shared by the notary service and the keyring, so an origin
sees one fetch no matter which side asked, and the notary serves only what the chain
trusted::

    chain = KeyFetcherChain(store, origin_fetcher, notary_fetchers, clock,
                            trust=config.key_trust, timeout_ms=10_000)
    keys = await chain.get_keys([KeyRequest("example.org", None, now)])
    keys["example.org"]  # {key_id: StoredKey}, possibly stale: the caller judges validity

For each requested server:

0. a name that is not a valid server name (:mod:`~keyring_module.servername`) is
   refused at once: it gets no keys, no source (origin or notary) is asked about it,
   and a traced call records it as ``REFUSED`` ("invalid server name") by each source;
1. if the stored keys answer the request (see
   :meth:`~keyring_module.model.KeyRequest.is_satisfied_by`), no fetch is made;
2. otherwise one *round* of fetches is made. The origin fetcher is asked about each
   server on its own (one ``fetch_keys`` call per server: it fetches per server anyway),
   the notaries about all the round's servers at once (one call per notary fetcher, so
   one POST per notary per round). Each call is waited for at most ``timeout_ms``.
   With ``min_agreeing_sources`` 1 (default) the sources are asked in ``order`` and only
   servers still unanswered go on to the next: with ``("origin", "notaries")`` a server
   whose origin answered well is settled as soon as that answer is in, and the others
   go to the notaries together once every origin of the round has answered or timed
   out, so **only servers that need notaries wait for the slowest origin**; with
   ``("notaries", "origin")`` the servers the notaries answered are settled together and
   each of the others as soon as its origin answers. With N > 1 the origins and the
   notaries are asked **in parallel**, and a server is settled as soon as its own origin
   and the notaries have answered. An "all keys" request names the server's stored
   current key ids to notaries (Synapse's notary never fetches from the origin for
   empty criteria);
3. a server is *settled* by passing its answers, ordered origin first and then notaries
   in configuration order, through :func:`keyring_module.fetchers.trust.decide`: only
   trusted answers are stored; each conflict is recorded in the store (once, within
   the server's bound), passed to ``on_conflict`` (``conflicts_seen`` counts every
   sighting) and logged as a WARNING, at most a few lines per server in a while plus
   one summary line of those left out (:mod:`~keyring_module.fetchers.conflict_log`);
   then its stored keys are read again;
4. with ``confirm_notary_keys_directly``, a server whose keys include provisional ones
   (stored from a notary) gets a background direct fetch from the origin, through the
   per-origin limiter, at most once per ``confirm_retry_ms``.

The result holds every stored key of each requested server after the round, including
stale ones when nothing better came. The optional ``on_server`` hook of
:meth:`KeyFetcherChain.get_keys` gets each server's keys as soon as they are final for
the call (right after the store lookup, or when the server is settled), so a caller can
go on with live origins while a dead one in the same batch is still timing out.
"""

import logging
from collections import OrderedDict
from typing import Any, Callable, Coroutine, Iterable, Mapping, Optional, Sequence, Union

import attr
from twisted.internet import defer
from twisted.python.failure import Failure

from keyring_module.clock import DeadlineExceeded, ReactorClock, now_ms, with_deadline
from keyring_module.config import KeyTrustConfig
from keyring_module.fetchers import trust
from keyring_module.fetchers.base import (
    FailureKind,
    FetchResult,
    KeyFetcher,
    ServerKeysReport,
    SourceAnswers,
    SourceFailure,
    merge_answers,
    merge_key_requests,
)
from keyring_module.fetchers.conflict_log import ConflictLog
from keyring_module.fetchers.store import StoreKeyFetcher
from keyring_module.fetchers.trace import FetchTrace, ServerTrace, UnusedAnswer
from keyring_module.model import KeyConflict, KeyRequest, StoredKey
from keyring_module.quoting import quote_untrusted
from keyring_module.servername import is_valid_server_name
from keyring_module.storage import KeyStore

logger = logging.getLogger(__name__)

ORIGIN = "origin"
NOTARIES = "notaries"

#: The least time between two direct confirmations of one server's provisional keys.
CONFIRM_RETRY_MS = 60_000
#: How many servers' confirmation times are remembered.
MAX_CONFIRM_ENTRIES = 10_000

#: Today's behaviour: any one valid source is enough, nothing is confirmed.
DEFAULT_TRUST = KeyTrustConfig()


@attr.s(auto_attribs=True, slots=True)
class _Round:
    """One ``get_keys`` call: what is wanted, the answers so far, the servers reported.

    Attributes:
        wanted: the merged requests, by server name.
        stored: the servers' stored keys before the round (what ``trust.decide`` judges
            against).
        fetched_ts: the ``fetched_ts`` of everything stored by this round.
        on_server: the caller's hook, if any.
        trace: where to record what happened, if anyone asked.
        from_origin: the origin's answers, by server name.
        from_notaries: the notaries' answers, by server name, in configuration order.
        keys: the final keys of each server reported so far (the call's result).
    """

    wanted: Mapping[str, KeyRequest]
    stored: Mapping[str, dict[str, StoredKey]]
    fetched_ts: int
    on_server: Optional[ServerKeysReport]
    trace: Optional[FetchTrace] = None
    from_origin: dict[str, list[FetchResult]] = attr.Factory(dict)
    from_notaries: dict[str, list[FetchResult]] = attr.Factory(dict)
    keys: dict[str, dict[str, StoredKey]] = attr.Factory(dict)

    def answers(self, server_name: str) -> list[FetchResult]:
        """The server's answers in deterministic order: origin first, then notaries."""
        return self.from_origin.get(server_name, []) + self.from_notaries.get(server_name, [])

    def server_trace(self, server_name: str) -> Optional[ServerTrace]:
        """The server's trace, if the call is traced."""
        return None if self.trace is None else self.trace.server(server_name)

    def report(self, server_name: str, keys: dict[str, StoredKey]) -> None:
        """Record a server's final keys and pass them to ``on_server`` (errors logged)."""
        self.keys[server_name] = keys
        if self.on_server is None:
            return
        try:
            self.on_server(server_name, keys)
        except Exception:
            logger.exception("The on_server hook failed for %s", server_name)


class KeyFetcherChain:
    """Store, then direct and notary fetchers, with corroboration and conflict detection.

    Args:
        store: where keys are cached; every trusted answer is stored here.
        origin_fetcher: fetches ``/key/v2/server`` from the servers themselves.
        notary_fetcher: asks trusted notaries: None, one fetcher for all of them, or one
            fetcher per notary in configuration order (so that each is its own source
            for the timeout).
        clock: used for ``fetched_ts`` and for the timeouts.
        order: ``("origin", "notaries")`` (default) or ``("notaries", "origin")``, as
            configured by ``key_fetch_order``.
        trust: the ``key_trust:`` policy.
        timeout_ms: how long each source is waited for (None: as long as it takes).
        on_conflict: called with every key conflict seen (a metrics hook).
        on_stored: called with the source of every response stored (a metrics hook).
        conflict_log: where conflict lines are written, rate-limited per server; chains
            sharing a store should share one (a new one by default).
        confirm_retry_ms: the least time between direct confirmations of one server.

    Attributes:
        conflicts_seen: how many key conflicts were seen (each sighting counts).
        on_conflict: the conflict hook; may be set after construction.
        on_stored: the store hook; may be set after construction.
        conflict_log: where conflict lines are written.
    """

    def __init__(
        self,
        store: KeyStore,
        origin_fetcher: KeyFetcher,
        notary_fetcher: Union[KeyFetcher, Sequence[KeyFetcher], None],
        clock: ReactorClock,
        order: Sequence[str] = (ORIGIN, NOTARIES),
        *,
        trust: KeyTrustConfig = DEFAULT_TRUST,
        timeout_ms: Optional[int] = None,
        on_conflict: Optional[Callable[[KeyConflict], None]] = None,
        on_stored: Optional[Callable[[str], None]] = None,
        conflict_log: Optional[ConflictLog] = None,
        confirm_retry_ms: int = CONFIRM_RETRY_MS,
    ) -> None:
        unknown = set(order) - {ORIGIN, NOTARIES}
        if unknown or len(set(order)) != len(order):
            raise ValueError("order must list origin and/or notaries once each, got %r" % (order,))
        self._store = store
        self._store_fetcher = StoreKeyFetcher(store)
        self._clock = clock
        self._origin = origin_fetcher
        if notary_fetcher is None:
            self._notaries: list[KeyFetcher] = []
        elif isinstance(notary_fetcher, Sequence):
            self._notaries = list(notary_fetcher)
        else:
            self._notaries = [notary_fetcher]
        self._stages = [s for s in order if s == ORIGIN or (s == NOTARIES and self._notaries)]
        self._min_agreeing = max(1, trust.min_agreeing_sources)
        self._confirm = trust.confirm_notary_keys_directly
        self._timeout_s = None if timeout_ms is None else timeout_ms / 1000
        self._confirm_retry_ms = confirm_retry_ms
        self._confirming: dict[str, "defer.Deferred[None]"] = {}
        self._confirm_after: OrderedDict[str, int] = OrderedDict()
        self.conflicts_seen = 0
        self.on_conflict = on_conflict
        self.on_stored = on_stored
        self.conflict_log = (
            conflict_log if conflict_log is not None else ConflictLog(clock, log=logger)
        )
        sources = (ORIGIN in self._stages) + len(self._notaries)
        if notary_fetcher is None or isinstance(notary_fetcher, Sequence):
            if sources < self._min_agreeing:  # (one fetcher may stand for several notaries)
                logger.warning(
                    "min_agreeing_sources is %d > %d sources", self._min_agreeing, sources
                )

    async def get_keys(
        self,
        requests: Union[Iterable[KeyRequest], Mapping[str, KeyRequest]],
        *,
        use_cache: bool = True,
        on_server: Optional[ServerKeysReport] = None,
        trace: Optional[FetchTrace] = None,
    ) -> dict[str, dict[str, StoredKey]]:
        """Get keys for many servers, fetching only what the store cannot answer.

        Args:
            requests: what is wanted; several requests for one server are merged (union
                of key ids, highest minimum).
            use_cache: False fetches for every requested server even if the stored keys
                answer the request (e.g. a refresh past half-life); with N = 1 a server
                then goes on to the next source unless a trusted answer came and the keys
                answer the request afterwards.
            on_server: called as ``on_server(server_name, keys)`` exactly once for each
                requested server, as soon as its keys are final for this call (``keys``
                is the very dict the result holds for it), and always before
                ``get_keys`` returns (if it raises, e.g. because the store failed, servers
                not settled yet are not reported). An exception raised by ``on_server``
                is logged and ignored. For
                example, to go on with each origin's keys without waiting for the
                slowest origin of the batch::

                    def ready(server_name, keys):
                        waiting.pop(server_name).callback(keys)

                    await chain.get_keys(requests, on_server=ready)

            trace: collects which sources were asked about each fetched server, what
                they answered, and which answers the trust policy used (see
                :mod:`~keyring_module.fetchers.trace`). A direct confirmation this call
                starts is recorded there too, as it goes on after the call returns:
                :meth:`wait_for_confirmations` waits for it.

        Returns:
            For every requested server, all its stored keys after the fetches (an empty
            dict if none are known). Keys may be stale; the caller decides validity.
        """
        wanted = merge_key_requests(
            requests.values() if isinstance(requests, Mapping) else requests
        )
        if not wanted:
            return {}
        invalid = sorted(name for name in wanted if not is_valid_server_name(name))
        valid = {name: request for name, request in wanted.items() if name not in invalid}
        lookup = await self._store_fetcher.lookup(valid)
        pending = set(lookup.unsatisfied) if use_cache else set(valid)
        fetch = _Round(valid, lookup.keys, now_ms(self._clock), on_server, trace)
        if invalid:
            self._refuse_invalid(fetch, invalid)
        for name in valid:
            if name not in pending:
                fetch.report(name, lookup.keys.get(name, {}))
        if pending:
            logger.debug("Key fetch needed for %d of %d servers", len(pending), len(wanted))
            if self._min_agreeing > 1:
                await self._parallel_round(fetch, sorted(pending))
            else:
                await self._sequential_round(fetch, sorted(pending))
            unanswered = sorted(n for n in pending if not valid[n].is_satisfied_by(fetch.keys[n]))
            if unanswered:
                logger.info(
                    "No key source gave usable keys for %d servers (e.g. %s); using what is stored",
                    len(unanswered),
                    unanswered[0],
                )
        result = {name: fetch.keys[name] for name in wanted}
        if self._confirm:
            self._confirm_provisional(result, trace)
        return result

    def _refuse_invalid(self, fetch: _Round, names: Sequence[str]) -> None:
        """Leave invalid server names out of every stage: no keys, refused by every source."""
        logger.info(
            "Not fetching keys for %d invalid server names (e.g. %s)",
            len(names),
            quote_untrusted(names[0]),
        )
        sources: list[str] = []
        for stage in self._stages:
            fetchers = [self._origin] if stage == ORIGIN else self._notaries
            sources.extend(source for fetcher in fetchers for source in fetcher.sources)
        for name in names:
            server_trace = fetch.server_trace(name)
            if server_trace is not None:
                server_trace.failures.extend(
                    SourceFailure(source, FailureKind.REFUSED, "invalid server name")
                    for source in sources
                )
            fetch.report(name, {})

    async def wait_for_confirmations(self) -> None:
        """Wait until the background direct confirmations running now have finished."""
        while self._confirming:
            await defer.DeferredList(list(self._confirming.values()))

    async def _sequential_round(self, fetch: _Round, names: list[str]) -> None:
        """N = 1: the stages in order, each asked only about the servers still unanswered.

        A server is settled as soon as a stage answered it, or after the last stage.
        """
        for i, stage in enumerate(self._stages):
            final = i == len(self._stages) - 1
            if stage == ORIGIN:
                await self._origin_stage(fetch, names, final)
            else:
                await self._notary_stage(fetch, names, final)
            names = [name for name in names if name not in fetch.keys]
            logger.debug("After %s: %d servers still unanswered", stage, len(names))
            if not names:
                return
        await self._settle(fetch, names)  # no source to ask (no notaries configured)

    async def _origin_stage(self, fetch: _Round, names: Sequence[str], final: bool) -> None:
        """Ask each server's origin on its own; settle each server when its answer is enough.

        Returns once every origin has answered or timed out; with ``final`` every server
        is settled when its origin is done, whatever the answer.
        """

        async def one(name: str) -> None:
            await self._ask_origin(fetch, name)
            if final or self._answered(fetch, name):
                await self._settle(fetch, [name])

        await _run_all(one(name) for name in names)

    async def _notary_stage(self, fetch: _Round, names: Sequence[str], final: bool) -> None:
        """Ask the notaries about all the servers at once; settle those answered (all if final)."""
        await self._ask_notaries(fetch, names)
        await self._settle(fetch, [n for n in names if final or self._answered(fetch, n)])

    async def _parallel_round(self, fetch: _Round, names: Sequence[str]) -> None:
        """N > 1: ask every source at once; settle each server when its own sources are in.

        A server waits for its own origin and the notary batch, not for other origins.
        """
        origins = {
            name: defer.ensureDeferred(self._ask_origin(fetch, name))
            for name in (names if ORIGIN in self._stages else ())
        }
        if NOTARIES in self._stages:
            await self._ask_notaries(fetch, names)

        async def one(name: str) -> None:
            if name in origins:
                await origins[name]
            await self._settle(fetch, [name])

        await _run_all(one(name) for name in names)

    async def _ask_origin(self, fetch: _Round, name: str) -> None:
        """Ask one server's origin (bounded by the timeout) and keep its answers."""
        found = await self._ask(
            fetch.trace, "origin of " + name, self._origin, {name: fetch.wanted[name]}
        )
        if found.results.get(name):
            fetch.from_origin[name] = found.results[name]

    async def _ask_notaries(self, fetch: _Round, names: Sequence[str]) -> None:
        """Ask every notary fetcher about the servers in one call each; keep their answers."""
        asked = {
            name: _notary_request(fetch.wanted[name], fetch.stored.get(name, {})) for name in names
        }
        answers = await defer.gatherResults(
            [
                defer.ensureDeferred(self._ask(fetch.trace, "notary source %d" % i, fetcher, asked))
                for i, fetcher in enumerate(self._notaries)
            ],
            consumeErrors=True,
        )
        found = merge_answers(answers)
        for name in names:
            if found.results.get(name):
                fetch.from_notaries[name] = found.results[name]

    def _answered(self, fetch: _Round, name: str) -> bool:
        """Whether the server's answers so far are trusted and answer its request."""
        stored = fetch.stored.get(name, {})
        decision = trust.decide(
            stored, fetch.answers(name), self._min_agreeing, self._confirm, fetch.fetched_ts
        )
        projected = trust.project_keys(
            stored, decision.accepted, fetch.fetched_ts, self._store.limits
        )
        return bool(decision.accepted) and fetch.wanted[name].is_satisfied_by(projected)

    async def _settle(self, fetch: _Round, names: Sequence[str]) -> None:
        """Store the servers' trusted answers, read their keys again and report them."""
        answered = sorted(name for name in names if fetch.answers(name))
        for name in answered:
            await self._apply(
                name,
                fetch.answers(name),
                fetch.stored.get(name, {}),
                fetch.fetched_ts,
                fetch.server_trace(name),
            )
        fresh = await self._store_fetcher.get_stored_keys(answered)
        for name in names:
            fetch.report(name, fresh.get(name, fetch.stored.get(name, {})))

    async def _ask(
        self,
        trace: Optional[FetchTrace],
        label: str,
        fetcher: KeyFetcher,
        asked: Mapping[str, KeyRequest],
    ) -> SourceAnswers:
        """One source's answers, bounded by the timeout (recorded in ``trace``, if any).

        A source that is too slow is not cancelled: what it finds later is still
        validated by it, but no longer used by this round.
        """
        if trace is not None:
            trace.asked(sorted(asked), fetcher.sources)
        fetching = defer.ensureDeferred(fetcher.fetch_keys(asked))
        fetching.addErrback(self._source_failed, label, fetcher, asked)
        try:
            found = await with_deadline(self._clock, fetching, self._timeout_s, cancel_work=False)
        except DeadlineExceeded as e:
            logger.info(
                "Key source %s did not answer within %.1fs (asked about %d servers); going on",
                label,
                e.seconds,
                len(asked),
            )
            detail = "timeout (no answer within %.3gs)" % (e.seconds,)
            found = merge_answers(
                SourceAnswers.failed(asked, SourceFailure(source, FailureKind.TIMED_OUT, detail))
                for source in fetcher.sources
            )
        if trace is not None:
            trace.answered(found)
        return found

    @staticmethod
    def _source_failed(
        failure: Failure, label: str, fetcher: KeyFetcher, asked: Mapping[str, KeyRequest]
    ) -> SourceAnswers:
        logger.error("Key source %s failed: %s", label, failure.getTraceback())
        detail = "unexpected error: %s" % (failure.getErrorMessage(),)
        return merge_answers(
            SourceAnswers.failed(asked, SourceFailure(source, FailureKind.ERROR, detail))
            for source in fetcher.sources
        )

    async def _apply(
        self,
        server_name: str,
        results: Sequence[FetchResult],
        stored: Mapping[str, StoredKey],
        fetched_ts: int,
        trace: Optional[ServerTrace] = None,
    ) -> None:
        """Store the trusted answers about one server and report its conflicts."""
        try:
            await self._store_decision(server_name, results, stored, fetched_ts, trace)
        finally:
            self.conflict_log.flush(server_name)

    async def _store_decision(
        self,
        server_name: str,
        results: Sequence[FetchResult],
        stored: Mapping[str, StoredKey],
        fetched_ts: int,
        trace: Optional[ServerTrace],
    ) -> None:
        decision = trust.decide(stored, results, self._min_agreeing, self._confirm, fetched_ts)
        if trace is not None:
            trace.unused.extend(
                UnusedAnswer(r.result, "not trusted: " + r.reason) for r in decision.rejected
            )
            trace.unused.extend(
                UnusedAnswer(copy, "the same answer as the origin's, stored from the origin")
                for copy in decision.copies
            )
        if decision.conflicts:
            try:
                await self._store.record_conflicts(decision.conflicts)
            except Exception:
                logger.exception("Could not record the key conflicts of %s", server_name)
        for conflict in decision.conflicts:
            self._report(conflict)
        for rejected in decision.rejected:
            logger.info(
                "Not trusting keys of %s from %s: %s",
                server_name,
                rejected.result.source,
                rejected.reason,
            )
        for item in decision.accepted:
            try:
                conflicts = await self._store.store_server_keys(
                    item.result.response, item.result.source, fetched_ts, replace=item.replace
                )
            except Exception as e:
                logger.exception(
                    "Could not store keys of %s from %s", server_name, item.result.source
                )
                if trace is not None:
                    reason = "could not be stored: %s: %s" % (type(e).__name__, e)
                    trace.unused.append(UnusedAnswer(item.result, reason))
                continue
            if self.on_stored is not None:
                self.on_stored(item.result.source)
            if trace is not None:
                trace.used.append(item.result)
            for conflict in conflicts:
                self._report(conflict)

    def _report(self, conflict: KeyConflict) -> None:
        self.conflicts_seen += 1
        self.conflict_log.report(conflict)
        if self.on_conflict is not None:
            try:
                self.on_conflict(conflict)
            except Exception:
                logger.exception("The on_conflict hook failed")

    def _confirm_provisional(
        self, result: Mapping[str, Mapping[str, StoredKey]], trace: Optional[FetchTrace]
    ) -> None:
        """Start direct confirmations for servers with provisional keys (paced); each
        is recorded in ``trace``, if any."""
        now = now_ms(self._clock)
        for name, keys in result.items():
            if not any(trust.is_provisional(key) for key in keys.values()):
                self._confirm_after.pop(name, None)
                continue
            if name in self._confirming or now < self._confirm_after.get(name, 0):
                continue
            self._confirm_after[name] = now + self._confirm_retry_ms
            self._confirm_after.move_to_end(name)
            while len(self._confirm_after) > MAX_CONFIRM_ENTRIES:
                self._confirm_after.popitem(last=False)
            d = defer.ensureDeferred(self._confirm_directly(name, trace))
            self._confirming[name] = d
            d.addBoth(self._confirmation_done, name)

    def _confirmation_done(self, result: object, server_name: str) -> None:
        self._confirming.pop(server_name, None)
        if isinstance(result, Failure):
            logger.error("Confirming %s failed: %s", server_name, result.getTraceback())

    async def _confirm_directly(self, server_name: str, trace: Optional[FetchTrace]) -> None:
        answers = await self._ask(
            trace, "origin of " + server_name, self._origin, {server_name: KeyRequest(server_name)}
        )
        results = answers.results.get(server_name)
        if not results:
            logger.info(
                "Could not confirm the notary-provided keys of %s directly; will retry",
                server_name,
            )
            return
        stored = await self._store.get_server_keys(server_name)
        server_trace = None if trace is None else trace.server(server_name)
        await self._apply(server_name, results, stored, now_ms(self._clock), server_trace)


def _notary_request(request: KeyRequest, stored: Mapping[str, StoredKey]) -> KeyRequest:
    """Name the stored current key ids in an "all keys" request, so notaries refresh."""
    if request.key_ids is not None:
        return request
    current = frozenset(key_id for key_id, key in stored.items() if key.expired_ts is None)
    return attr.evolve(request, key_ids=current) if current else request


async def _run_all(coroutines: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Run coroutines concurrently and wait for all of them; then raise the first error."""
    outcomes = await defer.DeferredList(
        [defer.ensureDeferred(c) for c in coroutines], consumeErrors=True
    )
    for ok, outcome in outcomes:
        if not ok:
            assert isinstance(outcome, Failure)
            outcome.raiseException()
