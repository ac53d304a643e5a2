"""Storing one server's answers under the trust policy, and reporting its conflicts.

The fetcher chain hands every batch of validated answers about a server to
:meth:`TrustedAnswerWriter.apply`: :func:`keyring_module.fetchers.trust.decide` says which
answers are trusted; only those are stored. Each conflict is recorded in the store (once,
within the server's bound), passed to ``on_conflict`` (``conflicts_seen`` counts every
sighting) and logged as a WARNING, at most a few lines per server in a while plus one
summary line of those left out (:mod:`~keyring_module.fetchers.conflict_log`)::

    writer = TrustedAnswerWriter(store, ConflictLog(clock), min_agreeing_sources=1)
    await writer.apply("example.org", answers, stored_keys, fetched_ts, server_trace)
"""

import logging
from typing import Awaitable, Callable, Iterable, Mapping, Optional, Sequence

from keyring_module.fetchers import trust
from keyring_module.fetchers.base import FetchResult
from keyring_module.fetchers.conflict_log import ConflictLog
from keyring_module.fetchers.trace import ServerTrace, UnusedAnswer
from keyring_module.model import KeyConflict, StoredKey
from keyring_module.storage import KeyStore

# The chain's lines share the chain's logger, which operators filter on.
logger = logging.getLogger("keyring_module.fetchers.chain")

#: Told, after each :meth:`TrustedAnswerWriter.apply`, of the server and the bytes of
#: the answers it judged (stored or not): e.g.
#: :meth:`~keyring_module.shared_flights.SharedFlights.settled`.
Settled = Callable[[str, Iterable[bytes]], Awaitable[None]]


class TrustedAnswerWriter:
    """Stores what the trust policy accepts; records and reports the conflicts it finds.

    Args:
        store: where trusted answers and conflicts are written.
        conflict_log: where conflict lines are written, rate-limited per server.
        min_agreeing_sources: N, the distinct sources needed for a new key.
        origin_overrides_provisional: whether the origin's answer replaces differing
            provisional keys (``confirm_notary_keys_directly``).

    Attributes:
        conflicts_seen: how many key conflicts were seen (each sighting counts).
        on_conflict: called with every key conflict seen (a metrics hook), or None.
        on_stored: called with the source of every response stored (a metrics hook),
            or None.
        on_settled: awaited after each :meth:`apply`, once its answers were stored or
            not (:data:`Settled`), or None.
        conflict_log: where conflict lines are written.
    """

    def __init__(
        self,
        store: KeyStore,
        conflict_log: ConflictLog,
        min_agreeing_sources: int,
        origin_overrides_provisional: bool = False,
    ) -> None:
        self._store = store
        self._min_agreeing = min_agreeing_sources
        self._overrides = origin_overrides_provisional
        self.conflict_log = conflict_log
        self.conflicts_seen = 0
        self.on_conflict: Optional[Callable[[KeyConflict], None]] = None
        self.on_stored: Optional[Callable[[str], None]] = None
        self.on_settled: Optional[Settled] = None

    def decide(
        self, stored: Mapping[str, StoredKey], results: Sequence[FetchResult], fetched_ts: int
    ) -> trust.TrustDecision:
        """What the policy makes of these answers, given the stored keys (no I/O)."""
        return trust.decide(stored, results, self._min_agreeing, self._overrides, fetched_ts)

    async def apply(
        self,
        server_name: str,
        results: Sequence[FetchResult],
        stored: Mapping[str, StoredKey],
        fetched_ts: int,
        trace: Optional[ServerTrace] = None,
    ) -> None:
        """Store the trusted answers about one server and report its conflicts.

        Args:
            server_name: the server the answers are about.
            results: its answers, in deterministic order (origin first, then notaries
                in configuration order).
            stored: its stored keys the answers are judged against.
            fetched_ts: the ``fetched_ts`` of what is stored.
            trace: where to record which answers were used, and why others were not.
        """
        try:
            await self._store_decision(server_name, results, stored, fetched_ts, trace)
        finally:
            self.conflict_log.flush(server_name)
            settled = self.on_settled
            if settled is not None:
                try:
                    await settled(server_name, [r.response.json_bytes for r in results])
                except Exception:
                    logger.exception("The on_settled hook failed for %s", server_name)

    async def _store_decision(
        self,
        server_name: str,
        results: Sequence[FetchResult],
        stored: Mapping[str, StoredKey],
        fetched_ts: int,
        trace: Optional[ServerTrace],
    ) -> None:
        decision = self.decide(stored, results, fetched_ts)
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
