"""The fetcher chain: the store first, then origins and notaries, under the trust policy.

One chain (and one limiter) is shared by the notary service and the keyring, so an origin
sees one fetch no matter which side asked, and the notary serves only what the chain
trusted::

    chain = KeyFetcherChain(store, origin_fetcher, notary_fetchers, clock,
                            trust=config.key_trust, timeout_ms=10_000)
    keys = await chain.get_keys([KeyRequest("example.org", frozenset(), now)])
    keys["example.org"]  # {key_id: StoredKey}, possibly stale: the caller judges validity

For each requested server:

1. if the stored keys answer the request (see
   :func:`~keyring_module.fetchers.base.is_satisfied`), no fetch is made;
2. otherwise one *round* of fetches is made. With ``min_agreeing_sources`` 1 (default)
   the sources are asked in ``order`` and only servers still unanswered go on to the
   next; with N > 1 the origin and every notary are asked **in parallel**. Each source
   (the origin fetcher, each notary fetcher) is waited for at most ``timeout_ms``. An
   "all keys" request names the server's stored current key ids to notaries (Synapse's
   notary never fetches from the origin for empty criteria);
3. the answers, ordered origin first and then notaries in configuration order, go
   through :func:`keyring_module.fetchers.trust.decide`: only trusted answers are
   stored; each conflict is recorded in the store (once), logged as a WARNING and passed
   to ``on_conflict`` (``conflicts_seen`` counts every sighting);
4. with ``confirm_notary_keys_directly``, a server whose keys include provisional ones
   (stored from a notary) gets a background direct fetch from the origin, through the
   per-origin limiter, at most once per ``confirm_retry_ms``.

The result holds every stored key of each requested server after the round, including
stale ones when nothing better came.
"""

import logging
from collections import OrderedDict
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import attr
from twisted.internet import defer
from twisted.python.failure import Failure
from unpaddedbase64 import encode_base64

from keyring_module.clock import ReactorClock, now_ms
from keyring_module.config import KeyTrustConfig
from keyring_module.fetchers import trust
from keyring_module.fetchers.base import (
    FetchResult,
    KeyFetcher,
    KeyRequest,
    ResultsByServer,
    is_satisfied,
    merge_key_requests,
    merge_results,
)
from keyring_module.fetchers.store import StoreKeyFetcher
from keyring_module.model import KeyConflict, StoredKey
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
        confirm_retry_ms: the least time between direct confirmations of one server.

    Attributes:
        conflicts_seen: how many key conflicts were seen (each sighting counts).
        on_conflict: the conflict hook; may be set after construction.
        on_stored: called with the source of every response stored (a metrics hook).
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
        self.on_stored: Optional[Callable[[str], None]] = None
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
    ) -> dict[str, dict[str, StoredKey]]:
        """Get keys for many servers, fetching only what the store cannot answer.

        Args:
            requests: what is wanted; several requests for one server are merged (union
                of key ids, highest minimum).
            use_cache: False fetches for every requested server even if the stored keys
                answer the request (e.g. a refresh past half-life); with N = 1 a server
                then goes on to the next source unless a trusted answer came and the keys
                answer the request afterwards.

        Returns:
            For every requested server, all its stored keys after the fetches (an empty
            dict if none are known). Keys may be stale; the caller decides validity.
        """
        wanted = merge_key_requests(
            requests.values() if isinstance(requests, Mapping) else requests
        )
        if not wanted:
            return {}
        lookup = await self._store_fetcher.lookup(wanted)
        keys = dict(lookup.keys)
        pending = set(lookup.unsatisfied) if use_cache else set(wanted)
        if pending:
            logger.debug("Key fetch needed for %d of %d servers", len(pending), len(wanted))
            fetched_ts = now_ms(self._clock)
            answers = await self._fetch_round(wanted, set(pending), keys, fetched_ts)
            for name in sorted(answers):
                await self._apply(name, answers[name], keys.get(name, {}), fetched_ts)
            keys.update(await self._store_fetcher.get_stored_keys(sorted(answers)))
            unanswered = sorted(n for n in pending if not is_satisfied(wanted[n], keys.get(n, {})))
            if unanswered:
                logger.info(
                    "No key source gave usable keys for %d servers (e.g. %s); using what is stored",
                    len(unanswered),
                    unanswered[0],
                )
        result = {name: keys.get(name, {}) for name in wanted}
        if self._confirm:
            self._confirm_provisional(result)
        return result

    async def wait_for_confirmations(self) -> None:
        """Wait until the background direct confirmations running now have finished."""
        while self._confirming:
            await defer.DeferredList(list(self._confirming.values()))

    async def _fetch_round(
        self,
        wanted: Mapping[str, KeyRequest],
        pending: set[str],
        keys: Mapping[str, Mapping[str, StoredKey]],
        fetched_ts: int,
    ) -> ResultsByServer:
        """Ask the sources; each server's answers come back in deterministic order."""
        found: dict[str, ResultsByServer] = {ORIGIN: {}, NOTARIES: {}}

        def ordered(name: str) -> list[FetchResult]:
            return found[ORIGIN].get(name, []) + found[NOTARIES].get(name, [])

        if self._min_agreeing > 1:
            asked = {name: wanted[name] for name in sorted(pending)}
            answers = await defer.gatherResults(
                [defer.ensureDeferred(self._ask_stage(s, asked, keys)) for s in self._stages],
                consumeErrors=True,
            )
            found.update(zip(self._stages, answers, strict=True))
        else:
            for stage in self._stages:
                if not pending:
                    break
                asked = {name: wanted[name] for name in sorted(pending)}
                found[stage] = await self._ask_stage(stage, asked, keys)
                for name in asked:
                    stored = keys.get(name, {})
                    decision = trust.decide(stored, ordered(name), 1, self._confirm, fetched_ts)
                    projected = trust.project_keys(stored, decision.accepted, fetched_ts)
                    if decision.accepted and is_satisfied(wanted[name], projected):
                        pending.discard(name)
                logger.debug("After %s: %d servers still unanswered", stage, len(pending))
        return {name: ordered(name) for name in set(found[ORIGIN]) | set(found[NOTARIES])}

    async def _ask_stage(
        self,
        stage: str,
        asked: Mapping[str, KeyRequest],
        keys: Mapping[str, Mapping[str, StoredKey]],
    ) -> ResultsByServer:
        if stage == ORIGIN:
            return await self._ask(ORIGIN, self._origin, asked)
        asked = {name: _notary_request(r, keys.get(name, {})) for name, r in asked.items()}
        answers = await defer.gatherResults(
            [
                defer.ensureDeferred(self._ask("notary source %d" % i, fetcher, asked))
                for i, fetcher in enumerate(self._notaries)
            ],
            consumeErrors=True,
        )
        return merge_results(answers)

    async def _ask(
        self, label: str, fetcher: KeyFetcher, asked: Mapping[str, KeyRequest]
    ) -> ResultsByServer:
        """One source's answers, or nothing if it fails or takes longer than the timeout."""
        done: "defer.Deferred[ResultsByServer]" = defer.Deferred()

        def finished(result: Union[ResultsByServer, Failure]) -> None:
            if isinstance(result, Failure):
                logger.error("Key source %s failed: %s", label, result.getTraceback())
                result = {}
            if not done.called:
                done.callback(result)

        def too_slow() -> None:
            if not done.called:
                logger.info(
                    "Key source %s did not answer about %d servers within %.1fs; going on",
                    label,
                    len(asked),
                    self._timeout_s,
                )
                done.callback({})

        timer = (
            None if self._timeout_s is None else self._clock.callLater(self._timeout_s, too_slow)
        )
        defer.ensureDeferred(fetcher.fetch_keys(asked)).addBoth(finished)
        try:
            return await done
        finally:
            if timer is not None and timer.active():
                timer.cancel()

    async def _apply(
        self,
        server_name: str,
        results: Sequence[FetchResult],
        stored: Mapping[str, StoredKey],
        fetched_ts: int,
    ) -> None:
        """Store the trusted answers about one server and report its conflicts."""
        decision = trust.decide(stored, results, self._min_agreeing, self._confirm, fetched_ts)
        for conflict in decision.conflicts:
            try:
                await self._store.record_conflict(conflict)
            except Exception:
                logger.exception("Could not record a key conflict of %s", server_name)
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
            except Exception:
                logger.exception(
                    "Could not store keys of %s from %s", server_name, item.result.source
                )
                continue
            if self.on_stored is not None:
                self.on_stored(item.result.source)
            for conflict in conflicts:
                self._report(conflict)

    def _report(self, conflict: KeyConflict) -> None:
        self.conflicts_seen += 1
        logger.warning(
            "Key conflict for %s %s: kept %s from %s, rejected %s from %s",
            conflict.server_name,
            conflict.key_id,
            encode_base64(conflict.kept_key_bytes),
            conflict.kept_source,
            encode_base64(conflict.rejected_key_bytes),
            conflict.rejected_source,
        )
        if self.on_conflict is not None:
            try:
                self.on_conflict(conflict)
            except Exception:
                logger.exception("The on_conflict hook failed")

    def _confirm_provisional(self, result: Mapping[str, Mapping[str, StoredKey]]) -> None:
        """Start direct confirmations for servers with provisional keys (paced)."""
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
            d = defer.ensureDeferred(self._confirm_directly(name))
            self._confirming[name] = d
            d.addBoth(self._confirmation_done, name)

    def _confirmation_done(self, result: object, server_name: str) -> None:
        self._confirming.pop(server_name, None)
        if isinstance(result, Failure):
            logger.error("Confirming %s failed: %s", server_name, result.getTraceback())

    async def _confirm_directly(self, server_name: str) -> None:
        answers = await self._ask(ORIGIN, self._origin, {server_name: KeyRequest(server_name)})
        results = answers.get(server_name)
        if not results:
            logger.info(
                "Could not confirm the notary-provided keys of %s directly; will retry",
                server_name,
            )
            return
        stored = await self._store.get_server_keys(server_name)
        await self._apply(server_name, results, stored, now_ms(self._clock))


def _notary_request(request: KeyRequest, stored: Mapping[str, StoredKey]) -> KeyRequest:
    """Name the stored current key ids in an "all keys" request, so notaries refresh."""
    if request.key_ids:
        return request
    current = frozenset(key_id for key_id, key in stored.items() if key.expired_ts is None)
    return attr.evolve(request, key_ids=current) if current else request
