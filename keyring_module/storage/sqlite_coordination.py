"""Coordination between processes sharing one SQLite file: lease rows and polling.

* **Leases.** A flight is held through its ``origin_flights`` row: the holder's id and
  ``lease_until_ts``. Taking it (``BEGIN IMMEDIATE``, SQLite's write lock) succeeds when
  nobody holds it or the holder's lease has run out, so a process killed mid-fetch holds
  others back for at most ``database.flight_lease``; a live holder renews its lease
  while its fetch runs (:mod:`keyring_module.shared_flights`). Since taking a lease
  adds a row, taking and giving one back also drop a few rows beyond the table's bound
  (:func:`~keyring_module.storage.flight_rows.trim_outcomes_txn`), as writing an
  outcome does: flights that end with nothing to share leave no more rows than that.
* **Polling.** Every ``database.poll_interval`` one ``PRAGMA data_version`` tells
  whether another connection committed since the last look (this process's own writes
  do not change it): nothing to do, nothing more is read. Otherwise the ``key_changes``
  rows added since are read, each named server's cached keys are dropped
  (``on_keys_changed``), and every waiting flight is woken to look at its outcome.

Example::

    coordination = SqliteCoordination(store, reactor, lease_ms=10_000, poll_interval_ms=100)
    await coordination.start()
    ...
    await coordination.close()
"""

import logging
from typing import Any, Optional, cast

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from keyring_module.clock import ReactorClock, now_ms
from keyring_module.storage.coordination import (
    FlightOutcome,
    KeysChanged,
    LeaseAttempt,
    new_holder_id,
)
from keyring_module.storage.flight_rows import (
    StoredFlightRows,
    trim_outcomes_txn,
    write_outcome_txn,
)
from keyring_module.storage.sql import SqlKeyStore
from keyring_module.storage.watchers import Watchers

logger = logging.getLogger(__name__)

Txn = Any

SELECT_LEASE = "SELECT holder, lease_until_ts FROM origin_flights WHERE server_name = ?"
TAKE_LEASE = """
INSERT INTO origin_flights (server_name, holder, lease_until_ts, finished_ts)
VALUES (?, ?, ?, 0)
ON CONFLICT (server_name) DO UPDATE SET
    holder = excluded.holder,
    lease_until_ts = excluded.lease_until_ts
"""
RENEW_LEASE = "UPDATE origin_flights SET lease_until_ts = ? WHERE server_name = ? AND holder = ?"
RELEASE_LEASE = (
    "UPDATE origin_flights SET holder = NULL, lease_until_ts = 0"
    " WHERE server_name = ? AND holder = ?"
)
RELEASE_ALL = "UPDATE origin_flights SET holder = NULL, lease_until_ts = 0 WHERE holder = ?"
SELECT_CHANGES = "SELECT seq, server_name FROM key_changes WHERE seq > ? ORDER BY seq LIMIT ?"
SELECT_LAST_CHANGE = "SELECT MAX(seq) FROM key_changes"

#: The longest a waiter waits without news before looking at the lease again (ms).
MAX_LEASE_RETRY_MS = 1000
#: The most ``key_changes`` rows one poll reads; more at once means every cached server
#: is dropped instead.
MAX_CHANGES_PER_POLL = 1000


class SqliteCoordination(StoredFlightRows):
    """A :class:`~keyring_module.storage.coordination.Coordination` on one SQLite file.

    Args:
        store: the SQLite store (its one connection runs every query here too).
        clock: for the lease times and the poll timer.
        lease_ms: how long a lease lasts unless renewed.
        poll_interval_ms: how often the database is looked at for other processes' writes.
    """

    shared = True

    def __init__(
        self, store: SqlKeyStore, clock: ReactorClock, *, lease_ms: int, poll_interval_ms: int
    ) -> None:
        self._store = store
        self._clock = clock
        self.lease_ms = lease_ms
        self.poll_interval_ms = max(1, poll_interval_ms)
        self.holder_id = new_holder_id()
        self.on_keys_changed: Optional[KeysChanged] = None
        self._watchers = Watchers()
        self._poller: Optional[task.LoopingCall] = None
        self._polling: "Optional[defer.Deferred[None]]" = None
        self._data_version: Optional[int] = None
        self._last_seq: Optional[int] = None
        self._closed = False

    # -- news --------------------------------------------------------------------------

    async def start(self) -> None:
        """Read where the change feed is, then poll every ``poll_interval``."""
        if self._poller is not None or self._closed:
            return
        try:
            await self.poll()
        except Exception as e:  # the next poll looks again
            logger.warning("Polling the database for changes failed: %s", e)
        self._poller = task.LoopingCall(self._poll_now)
        self._poller.clock = cast(IReactorTime, self._clock)
        self._poller.start(self.poll_interval_ms / 1000, now=False)

    def _poll_now(self) -> None:
        if self._polling is not None:
            return  # the last poll is still waiting for the database
        polling = defer.ensureDeferred(self.poll())
        self._polling = polling

        def done(result: object) -> None:
            self._polling = None
            if isinstance(result, Failure):
                logger.warning("Polling the database for changes failed: %s", result.value)

        polling.addBoth(done)

    async def poll(self) -> None:
        """Look once: if another process wrote since, drop the changed servers' cached
        keys and wake every waiting flight."""
        version, last_seq, changed, names = await self._store.run(
            "poll for changes", _poll_txn, self._data_version, self._last_seq
        )
        self._data_version, self._last_seq = version, last_seq
        if not changed:
            return
        hook = self.on_keys_changed
        if hook is not None:
            try:
                if names is None:
                    hook(None)
                else:
                    for name in sorted(set(names)):
                        hook(name)
            except Exception:
                logger.exception("Dropping changed keys from the cache failed")
        self._watchers.wake_all()

    def watch(self, server_name: str) -> "defer.Deferred[None]":
        """See :meth:`Coordination.watch`: woken by the next poll that sees a write."""
        return self._watchers.watch(server_name)

    # -- leases ------------------------------------------------------------------------

    async def try_acquire(self, server_name: str) -> LeaseAttempt:
        """Take the lease unless another holder's lease is still running."""
        now = now_ms(self._clock)
        return await self._store.run("take flight lease", self._acquire_txn, server_name, now)

    def _acquire_txn(self, txn: Txn, server_name: str, now: int) -> LeaseAttempt:
        txn.execute("BEGIN IMMEDIATE")
        txn.execute(SELECT_LEASE, (server_name,))
        row = txn.fetchone()
        if row is not None and row[0] is not None and row[0] != self.holder_id:
            lease_until_ts = int(row[1])
            if lease_until_ts > now:
                # Look again when the lease runs out, or sooner: a poll may have
                # missed the flight's end (or no poller runs).
                return LeaseAttempt(False, min(lease_until_ts - now, MAX_LEASE_RETRY_MS))
        txn.execute(TAKE_LEASE, (server_name, self.holder_id, now + self.lease_ms))
        trim_outcomes_txn(txn, self._dialect, now, server_name, self._outcome_keep_ms)
        return LeaseAttempt(True)

    async def renew(self, server_name: str) -> None:
        """Extend this holder's lease to ``lease_ms`` from now."""
        until = now_ms(self._clock) + self.lease_ms
        await self._store.run(
            "renew flight lease", self._write_txn, RENEW_LEASE, (until, server_name, self.holder_id)
        )

    def _write_txn(self, txn: Txn, statement: str, args: tuple[Any, ...]) -> None:
        txn.execute("BEGIN IMMEDIATE")
        txn.execute(statement, args)

    def _release_txn(self, txn: Txn, server_name: str, now: int) -> None:
        txn.execute("BEGIN IMMEDIATE")
        txn.execute(RELEASE_LEASE, (server_name, self.holder_id))
        trim_outcomes_txn(txn, self._dialect, now, "", self._outcome_keep_ms)

    async def finish(self, server_name: str, outcome: Optional[FlightOutcome]) -> None:
        """Write the outcome and give the lease up (the waiters see it at their next poll)."""
        if outcome is None:
            await self._store.run(
                "release flight lease", self._release_txn, server_name, now_ms(self._clock)
            )
            return
        await self._store.run(
            "write flight outcome",
            write_outcome_txn,
            self._dialect,
            server_name,
            outcome,
            self.holder_id,
            (),
            self._outcome_keep_ms,
        )

    async def close(self) -> None:
        """Stop polling, wake the waiters, and give up every lease held."""
        if self._closed:
            return
        self._closed = True
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        self._watchers.wake_all()
        try:
            await self._store.run(
                "release flight leases", self._write_txn, RELEASE_ALL, (self.holder_id,)
            )
        except Exception as e:
            logger.warning("Could not give up the flight leases held: %s", e)


def _poll_txn(
    txn: Txn, data_version: Optional[int], last_seq: Optional[int]
) -> "tuple[int, Optional[int], bool, Optional[list[str]]]":
    """One look at the database (in the pool thread).

    Returns:
        The data version and the last change read now, whether another process wrote
        since the last look, and the servers whose keys changed (None: maybe any, when
        the feed moved on further than one look reads, or rows were gone).
    """
    txn.execute("PRAGMA data_version")
    version = int(txn.fetchone()[0])
    if last_seq is None:  # the first look: where the feed is now
        txn.execute(SELECT_LAST_CHANGE)
        return version, int(txn.fetchone()[0] or 0), False, []
    if version == data_version:
        return version, last_seq, False, []
    txn.execute(SELECT_CHANGES, (last_seq, MAX_CHANGES_PER_POLL + 1))
    rows = txn.fetchall()
    if not rows:
        return version, last_seq, True, []
    gap = int(rows[0][0]) != last_seq + 1  # rows deleted before this process read them
    if gap or len(rows) > MAX_CHANGES_PER_POLL:
        txn.execute(SELECT_LAST_CHANGE)
        return version, int(txn.fetchone()[0] or 0), True, None
    return version, int(rows[-1][0]), True, [str(row[1]) for row in rows]
