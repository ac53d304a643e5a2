"""The fetcher chain: the store first, then origins and notaries, under the trust policy.

One chain (and one limiter) is shared by the notary service and the keyring, so an origin
sees one fetch no matter which side asked, and the notary serves only what the chain
trusted::

    chain = KeyFetcherChain(store, origin_fetcher, notary_fetchers, clock,
                            trust=config.key_trust, timeout_ms=10_000)
    keys = await chain.get_keys([KeyRequest("example.org", None, now)])
    keys["example.org"]  # {key_id: StoredKey}, possibly stale: the caller judges validity

For each requested server:

0. a name the chain refuses (:mod:`~keyring_module.fetchers.refusal`: not a valid server
   name, or refused by the local policy ``refuse_reason``, e.g. an IP literal in a denied
   range) gets no keys at once: no source (origin or notary) is asked about it, and a
   traced call records it as ``REFUSED`` by each source, with the reason;
1. if the stored keys answer the request (see
   :meth:`~keyring_module.model.KeyRequest.is_satisfied_by`), no fetch is made;
2. otherwise one *round* of fetches is made (:mod:`~keyring_module.fetchers.settling`):
   the origin is asked about each server on its own, each notary about all the round's
   servers at once, each call bounded by ``timeout_ms``, in ``order`` with
   ``min_agreeing_sources`` 1 (the next stage is asked about the servers still
   unanswered once the stage before has answered them all, or after half of
   ``timeout_ms``, whichever comes first) and all at once with N > 1. A server is
   settled as soon as the answers in so far are enough (the first sufficient trusted
   answer with N = 1, N agreeing sources with N > 1), otherwise once all its sources
   are in or timed out; the call never waits for a source it no longer needs, and
   stops waiting for each at ``timeout_ms`` (a fetch still queued for a slot then
   leaves the queue unsent, see :func:`~keyring_module.fetchers.asking.ask_source`).
   Answers that come after their server was settled are still judged and stored in
   the background (:meth:`KeyFetcherChain.wait_for_background` waits for them). An
   "all keys" request names the server's stored current key ids to notaries;
3. a server is *settled* by passing its answers, ordered origin first and then notaries
   in configuration order, through :func:`keyring_module.fetchers.trust.decide`: only
   trusted answers are stored, conflicts are recorded and reported
   (:mod:`~keyring_module.fetchers.storing`); then its stored keys are read again;
4. with ``confirm_notary_keys_directly``, a server whose keys include provisional ones
   (stored from a notary) gets a background direct fetch from the origin, through the
   per-origin limiter, retried on the limiter's schedule until the origin answers
   (:mod:`~keyring_module.fetchers.confirm`).

The result holds every stored key of each requested server after the round, including
stale ones when nothing better came. The optional ``on_server`` hook of
:meth:`KeyFetcherChain.get_keys` gets each server's keys as soon as they are final for
the call (right after the store lookup, or when the server is settled), so a caller can
go on with live origins while a dead one in the same batch is still timing out.
"""

import logging
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

from keyring_module.clock import ReactorClock, now_ms
from keyring_module.config import KeyTrustConfig
from keyring_module.fetchers import trust
from keyring_module.fetchers.asking import ask_source
from keyring_module.fetchers.background import BackgroundWork
from keyring_module.fetchers.base import (
    FailureKind,
    KeyFetcher,
    ServerKeysReport,
    SourceFailure,
    merge_key_requests,
)
from keyring_module.fetchers.confirm import CONFIRM_RETRY_MS, DirectConfirmations
from keyring_module.fetchers.conflict_log import ConflictLog
from keyring_module.fetchers.refusal import RefuseReason, refusal_reason
from keyring_module.fetchers.settling import NOTARIES, ORIGIN, FetchRound, RoundRunner
from keyring_module.fetchers.store import StoreKeyFetcher
from keyring_module.fetchers.storing import Settled, TrustedAnswerWriter
from keyring_module.fetchers.trace import FetchTrace
from keyring_module.fetchers.unusable import key_problem, unusable_reason
from keyring_module.model import KeyConflict, KeyRequest, StoredKey
from keyring_module.quoting import quote_untrusted
from keyring_module.storage import KeyStore

__all__ = ["NOTARIES", "ORIGIN", "KeyFetcherChain"]

logger = logging.getLogger(__name__)

#: Today's behaviour: any one valid source is enough, nothing is confirmed.
DEFAULT_TRUST = KeyTrustConfig()


class KeyFetcherChain:
    """Store, then direct and notary fetchers, with corroboration and conflict detection.

    Args:
        store: where keys are cached; every trusted answer is stored here.
        origin_fetcher: fetches ``/key/v2/server`` from the servers themselves.
        notary_fetcher: asks trusted notaries: None, one fetcher for all of them, or one
            fetcher per notary in configuration order (so that each is its own source
            for the timeout, and a server is settled by the first that answers well).
        clock: used for ``fetched_ts``, the timeouts and the confirmation timers.
        order: ``("origin", "notaries")`` (default) or ``("notaries", "origin")``, as
            configured by ``key_fetch_order``.
        trust: the ``key_trust:`` policy.
        timeout_ms: how long each source is waited for (None: as long as it takes).
        on_conflict: called with every key conflict seen (a metrics hook).
        on_stored: called with the source of every response stored (a metrics hook).
        conflict_log: where conflict lines are written, rate-limited per server; chains
            sharing a store should share one (a new one by default).
        refuse_reason: the local policy's reason to refuse a valid server name (None:
            fetch for it), e.g. :func:`~keyring_module.fetchers.refusal.denied_ip_literals`.
        retry_after_ms: how long until the per-origin limiter lets a fetch for a server
            through (``OriginRateLimiter.retry_after_ms``): when a failed direct
            confirmation is retried.
        confirm_retry_ms: the delay before retrying a failed direct confirmation when
            ``retry_after_ms`` says 0 (``ratelimit.failure_backoff_initial``).

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
        refuse_reason: Optional[RefuseReason] = None,
        retry_after_ms: Optional[Callable[[str], int]] = None,
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
        self._refuse_reason = refuse_reason
        self._writer = TrustedAnswerWriter(
            store,
            conflict_log if conflict_log is not None else ConflictLog(clock, log=logger),
            self._min_agreeing,
            self._confirm,
        )
        self._writer.on_conflict = on_conflict
        self._writer.on_stored = on_stored
        self._background = BackgroundWork()
        self._rounds = RoundRunner(
            clock,
            self._timeout_s,
            origin_fetcher,
            self._notaries,
            self._stages,
            self._min_agreeing,
            store,
            self._writer,
            self._background,
        )
        self._confirmations = DirectConfirmations(
            clock,
            self._confirm_once,
            self._has_provisional_keys,
            retry_after_ms=retry_after_ms,
            retry_ms=confirm_retry_ms,
        )
        sources = (ORIGIN in self._stages) + len(self._notaries)
        if notary_fetcher is None or isinstance(notary_fetcher, Sequence):
            if sources < self._min_agreeing:  # (one fetcher may stand for several notaries)
                logger.warning(
                    "min_agreeing_sources is %d > %d sources", self._min_agreeing, sources
                )

    @property
    def conflicts_seen(self) -> int:
        """How many key conflicts were seen (each sighting counts)."""
        return self._writer.conflicts_seen

    @property
    def on_conflict(self) -> Optional[Callable[[KeyConflict], None]]:
        """Called with every key conflict seen (a metrics hook)."""
        return self._writer.on_conflict

    @on_conflict.setter
    def on_conflict(self, hook: Optional[Callable[[KeyConflict], None]]) -> None:
        self._writer.on_conflict = hook

    @property
    def on_stored(self) -> Optional[Callable[[str], None]]:
        """Called with the source of every response stored (a metrics hook)."""
        return self._writer.on_stored

    @on_stored.setter
    def on_stored(self, hook: Optional[Callable[[str], None]]) -> None:
        self._writer.on_stored = hook

    @property
    def on_settled(self) -> Optional[Settled]:
        """Awaited once each server's answers were stored or not (see
        :class:`~keyring_module.fetchers.storing.TrustedAnswerWriter`)."""
        return self._writer.on_settled

    @on_settled.setter
    def on_settled(self, hook: Optional[Settled]) -> None:
        self._writer.on_settled = hook

    @property
    def conflict_log(self) -> ConflictLog:
        """Where conflict lines are written, rate-limited per server."""
        return self._writer.conflict_log

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
                :mod:`~keyring_module.fetchers.trace`). Answers that come after their
                server was settled, and a direct confirmation this call starts, go on
                after the call returns; they are recorded there when they come
                (:meth:`wait_for_background` waits for them).

        Returns:
            For every requested server, all its stored keys after the fetches (an empty
            dict if none are known). Keys may be stale; the caller decides validity.
        """
        wanted = merge_key_requests(
            requests.values() if isinstance(requests, Mapping) else requests
        )
        if not wanted:
            return {}
        refused = {}
        for name in sorted(wanted):
            reason = refusal_reason(name, self._refuse_reason)
            if reason is not None:
                refused[name] = reason
        valid = {name: request for name, request in wanted.items() if name not in refused}
        lookup = await self._store_fetcher.lookup(valid)
        pending = set(lookup.unsatisfied) if use_cache else set(valid)
        fetch = FetchRound(valid, lookup.keys, now_ms(self._clock), on_server, trace)
        if refused:
            self._refuse(fetch, refused)
        for name in valid:
            if name not in pending:
                fetch.report(name, lookup.keys.get(name, {}))
        if pending:
            logger.debug("Key fetch needed for %d of %d servers", len(pending), len(wanted))
            await self._rounds.run(fetch, sorted(pending))
            unanswered = sorted(n for n in pending if not valid[n].is_satisfied_by(fetch.keys[n]))
            if unanswered:
                self._log_unanswered(fetch, unanswered)
        result = {name: fetch.keys[name] for name in wanted}
        if self._confirm:
            self._confirm_provisional(fetch, result)
        return result

    def _log_unanswered(self, fetch: FetchRound, names: Sequence[str]) -> None:
        """One line for the servers whose keys still do not answer their request after
        the round, saying why (see :mod:`~keyring_module.fetchers.unusable`)."""
        now = now_ms(self._clock)
        kinds: dict[str, int] = {}
        for name in names:
            kind, _ = key_problem(fetch.wanted[name], fetch.keys[name], now)
            kinds[kind] = kinds.get(kind, 0) + 1
        first = names[0]
        answers = fetch.answers(first)
        rejected = (
            self._writer.decide(fetch.stored.get(first, {}), answers, fetch.fetched_ts).rejected
            if answers
            else ()
        )
        logger.info(
            "No usable keys for %d servers after the fetch (%s); using what is stored. E.g. %s: %s",
            len(names),
            ", ".join("%d %s" % (n, kind) for kind, n in sorted(kinds.items())),
            first,
            unusable_reason(
                fetch.wanted[first],
                fetch.keys[first],
                answers,
                rejected,
                fetch.failures.get(first, ()),
                now,
            ),
        )

    async def wait_for_confirmations(self) -> None:
        """Wait until the direct confirmations running now have finished (a retry
        scheduled for later is not waited for)."""
        await self._confirmations.wait()

    async def wait_for_background(self) -> None:
        """Wait until the late answers being judged and stored now, and the direct
        confirmations running now, have finished."""
        await self._background.wait()
        await self._confirmations.wait()

    def close(self) -> None:
        """Cancel the scheduled direct confirmations (at shutdown); start no more."""
        self._confirmations.close()

    def _refuse(self, fetch: FetchRound, refused: Mapping[str, str]) -> None:
        """Leave refused server names out of every stage: no keys, refused by every source."""
        first = next(iter(refused))
        logger.info(
            "Not fetching keys for %d refused server names (e.g. %s: %s)",
            len(refused),
            quote_untrusted(first),
            refused[first],
        )
        sources: list[str] = []
        for stage in self._stages:
            fetchers = [self._origin] if stage == ORIGIN else self._notaries
            sources.extend(source for fetcher in fetchers for source in fetcher.sources)
        for name, reason in refused.items():
            server_trace = fetch.server_trace(name)
            if server_trace is not None:
                server_trace.failures.extend(
                    SourceFailure(source, FailureKind.REFUSED, reason) for source in sources
                )
            fetch.report(name, {})

    def _confirm_provisional(
        self, fetch: FetchRound, result: Mapping[str, Mapping[str, StoredKey]]
    ) -> None:
        """Ask for direct confirmations of the servers with provisional keys."""
        for name, keys in result.items():
            if any(trust.is_provisional(key) for key in keys.values()):
                self._confirmations.request(name, fetch.trace, fetch.origin_failed(name))

    async def _confirm_once(self, server_name: str, trace: Optional[FetchTrace]) -> bool:
        """One direct fetch of a server's keys; its answer is judged and stored."""
        answers = await ask_source(
            self._clock,
            self._timeout_s,
            trace,
            "origin of " + server_name,
            self._origin,
            {server_name: KeyRequest(server_name)},
        )
        results = answers.results.get(server_name)
        if not results:
            return False
        stored = await self._store.get_server_keys(server_name)
        server_trace = None if trace is None else trace.server(server_name)
        await self._writer.apply(server_name, results, stored, now_ms(self._clock), server_trace)
        return True

    async def _has_provisional_keys(self, server_name: str) -> bool:
        stored = await self._store.get_server_keys(server_name)
        return any(trust.is_provisional(key) for key in stored.values())
