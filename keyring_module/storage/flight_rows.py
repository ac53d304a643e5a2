"""The rows both SQL backends coordinate through: flight outcomes and shared limits.

Every statement is written once with ``?`` placeholders (the store's dialect turns them
into the driver's); each function runs inside one store transaction, in a pool thread::

    outcome = await store.run("read flight outcome", read_outcome_txn, dialect, name)

``origin_flights`` holds, per server name, the last shared flight's outcome (and, on
SQLite, the lease: who holds the flight and until when). ``origin_limits`` holds each
origin's shared token bucket and failure streak.

The outcomes are bounded in bytes: an answer bigger than :data:`MAX_OUTCOME_BODY_BYTES`
is written without its body, as an :data:`~keyring_module.storage.coordination.OUTCOME_STORED`
outcome naming its response id; the waiters read it from ``server_key_responses`` once
the fetching process has stored it (it stores what it fetched right after the flight,
when its trust policy accepts it, and otherwise turns the outcome into an
:data:`~keyring_module.storage.coordination.OUTCOME_NOT_STORED` one:
:func:`mark_not_stored_txn`; :mod:`~keyring_module.shared_flights` says how long the
waiters wait for that).
At most :data:`MAX_OUTCOME_ROWS` rows are kept, and none longer than
:func:`outcome_keep_ms` (a minute with the default lease), so the table holds at most
about ``MAX_OUTCOME_ROWS`` x 64 KiB (64 MiB) of answers, and only for moments' use,
however many names are fetched: a few rows beyond go with every outcome
written, and with every lease taken or given back where leases are rows (SQLite,
:func:`trim_outcomes_txn`).
"""

from typing import Any, Optional, Sequence

import attr

from keyring_module.config import RateLimitConfig
from keyring_module.model import response_id_for
from keyring_module.storage.coordination import (
    OUTCOME_NOT_STORED,
    OUTCOME_OK,
    OUTCOME_STORED,
    FlightOutcome,
    LimitState,
    LimitUpdate,
)
from keyring_module.storage.sql import Dialect, SqlKeyStore

Txn = Any

#: The biggest answer kept in a flight's outcome (bytes); a bigger one is read from the
#: store. Key answers are ~1 KiB; this holds one listing over 500 keys.
MAX_OUTCOME_BODY_BYTES = 64 * 1024
#: The most outcome rows kept: the rows past the newest ones go (a few per write).
#: Only an outcome at most seconds old is ever used (``REUSE_ELSEWHERE_MS``, a
#: waiter's twice ``database.flight_lease``).
MAX_OUTCOME_ROWS = 1024
#: The most rows one write (or lease taken or given back) drops beyond
#: :data:`MAX_OUTCOME_ROWS`.
TRIM_OUTCOMES_PER_WRITE = 16

# An answer too big for its outcome comes from the stored responses (by response id,
# which is the SHA-256 of its bytes), if it was stored.
SELECT_OUTCOME = """
SELECT f.finished_ts, f.finished_by, f.outcome, f.error_class, f.detail,
    COALESCE(f.body, r.json)
FROM origin_flights f
LEFT JOIN server_key_responses r
    ON f.outcome = '%s' AND r.response_id = f.detail AND r.server_name = f.server_name
WHERE f.server_name = ?
""" % (OUTCOME_STORED,)
# Writes the outcome and gives the lease up (only if this holder still holds it: a
# holder whose lease ran out must not free the next holder's).
UPSERT_OUTCOME = """
INSERT INTO origin_flights
    (server_name, holder, lease_until_ts, finished_ts, finished_by, outcome, error_class,
     detail, body)
VALUES (?, NULL, 0, ?, ?, ?, ?, ?, ?)
ON CONFLICT (server_name) DO UPDATE SET
    finished_ts = excluded.finished_ts,
    finished_by = excluded.finished_by,
    outcome = excluded.outcome,
    error_class = excluded.error_class,
    detail = excluded.detail,
    body = excluded.body,
    holder = CASE WHEN origin_flights.holder = ? THEN NULL ELSE origin_flights.holder END,
    lease_until_ts = CASE WHEN origin_flights.holder = ? THEN 0
        ELSE origin_flights.lease_until_ts END
"""
# A "stored" outcome whose answer did not reach the store after all.
MARK_NOT_STORED = """
UPDATE origin_flights SET outcome = '%s'
WHERE server_name = ? AND outcome = '%s' AND detail = ? AND finished_by = ?
    AND NOT EXISTS (
        SELECT 1 FROM server_key_responses r WHERE r.response_id = ? AND r.server_name = ?
    )
""" % (OUTCOME_NOT_STORED, OUTCOME_STORED)
#: The longest detail kept with an outcome.
MAX_DETAIL_CHARS = 500
# Outcome rows of flights long over go, a few at a time, as new ones are written.
DELETE_OLD_OUTCOMES = """
DELETE FROM origin_flights WHERE server_name IN (
    SELECT server_name FROM origin_flights
    WHERE finished_ts < ? AND lease_until_ts < ? LIMIT 16
)
"""
#: How long an outcome row (and the origin's answer in it) is kept after its flight
#: (ms) at least: a minute (longer with a long lease: :func:`outcome_keep_ms`). Nobody
#: reads it later: an outcome is used only when it ended at most
#: ``REUSE_ELSEWHERE_MS`` (2 s) before a flight began, and a waiter gives up after
#: twice ``database.flight_lease`` (10 s by default); the stored keys are the lasting
#: copy.
OUTCOME_KEEP_MS = 60 * 1000
#: What an outcome's last reader may see beyond twice the lease (ms): the flight used
#: it began up to ``REUSE_ELSEWHERE_MS`` (2 s) after it ended, plus the database's and
#: the processes' clocks' delays.
OUTCOME_READ_SLACK_MS = 5000
# The rows past the newest MAX_OUTCOME_ROWS (at most TRIM_OUTCOMES_PER_WRITE of them),
# in one statement, no count: rows whose lease still runs and the row kept count first
# (as the newest), so that what lies past the bound are rows of flights that ended
# longer ago; none held or kept is dropped, even when they alone fill the bound. Each
# write adds at most one row, so at most one is past the bound but for a while after
# it was lowered (which of those go first does not matter: all go within a few writes).
# Arguments: now, keep (twice), the most to drop, the bound.
DELETE_OUTCOMES_BEYOND = """
DELETE FROM origin_flights
WHERE lease_until_ts < ? AND server_name <> ? AND server_name IN (
    SELECT server_name FROM origin_flights
    ORDER BY CASE WHEN lease_until_ts < ? AND server_name <> ? THEN 1 ELSE 0 END,
        finished_ts DESC, server_name
    LIMIT ? OFFSET ?
)
"""

SELECT_LIMITS = (
    "SELECT tokens, tokens_ts, failures, backoff_until_ts FROM origin_limits WHERE target = ?"
)
UPSERT_LIMITS = """
INSERT INTO origin_limits (target, tokens, tokens_ts, failures, backoff_until_ts)
VALUES (?, ?, ?, ?, ?)
ON CONFLICT (target) DO UPDATE SET
    tokens = excluded.tokens,
    tokens_ts = excluded.tokens_ts,
    failures = excluded.failures,
    backoff_until_ts = excluded.backoff_until_ts
"""
DELETE_LIMITS = "DELETE FROM origin_limits WHERE target = ?"
# Limit rows nobody touched for long go, a few at a time, as others are written: a
# token taken from an origin never fetched again would otherwise stay for ever, and
# every name a client makes us fetch leaves one.
DELETE_STALE_LIMITS = """
DELETE FROM origin_limits WHERE target IN (
    SELECT target FROM origin_limits
    WHERE tokens_ts < ? AND backoff_until_ts < ? LIMIT 16
)
"""


def limits_keep_ms(config: RateLimitConfig) -> int:
    """How long a limit row is kept after its last token was taken and its backoff
    ended (ms): the time its bucket takes to refill (``origin_burst`` x
    ``origin_interval``) plus the longest backoff (after which the failure streak is
    over too). By then the row carries nothing: a fresh state is the same. (A row
    dropped earlier would only give that origin a full bucket again; each process's
    own limiter still holds.)

    Example:
        >>> limits_keep_ms(RateLimitConfig(origin_burst=10, origin_interval_ms=60_000,
        ...     failure_backoff_max_ms=3_600_000)) // 60_000  # minutes
        70
    """
    return config.origin_burst * config.origin_interval_ms + config.failure_backoff_max_ms


#: :func:`limits_keep_ms` of the default ``ratelimit:`` settings (70 minutes): what a
#: coordination keeps until :func:`keep_limits_for` gives it the configured one.
LIMITS_KEEP_MS = limits_keep_ms(RateLimitConfig())


def outcome_keep_ms(lease_ms: int) -> int:
    """How long an outcome row is kept after its flight (ms), for processes whose
    ``database.flight_lease`` is ``lease_ms``: :data:`OUTCOME_KEEP_MS`, or longer than
    a waiter (twice the lease) may read it.

    Example:
        >>> outcome_keep_ms(10_000)
        60000
        >>> outcome_keep_ms(60_000)
        125000
    """
    return max(OUTCOME_KEEP_MS, 2 * lease_ms + OUTCOME_READ_SLACK_MS)


def _execute(txn: Txn, dialect: Dialect, statement: str, args: Sequence[Any] = ()) -> None:
    txn.execute(dialect.sql(statement), tuple(args))


def outcome_from_row(row: Sequence[Any]) -> Optional[FlightOutcome]:
    """An outcome read back (None for a row whose flight never finished).

    Example:
        >>> outcome_from_row((7, "a1", "ok", "ok", "", memoryview(b"{}"))).body
        b'{}'
        >>> outcome_from_row((0, None, None, None, None, None)) is None
        True
    """
    finished_ts, finished_by, outcome, label, detail, body = row
    if outcome is None or finished_by is None:
        return None
    return FlightOutcome(
        int(finished_ts),
        str(finished_by),
        str(outcome),
        str(label or ""),
        str(detail or ""),
        None if body is None else bytes(body),
    )


def bounded_outcome(outcome: FlightOutcome) -> FlightOutcome:
    """The outcome as it is written: an answer over :data:`MAX_OUTCOME_BODY_BYTES`
    becomes a reference to the stored response. An outcome already bounded comes
    back as it is (nothing hashed again).

    Example:
        >>> big = FlightOutcome(7, "a1", OUTCOME_OK, "ok", "", b"x" * (MAX_OUTCOME_BODY_BYTES + 1))
        >>> written = bounded_outcome(big)
        >>> written.outcome, written.body, written.detail == response_id_for(big.body)
        ('stored', None, True)
        >>> small = FlightOutcome(7, "a1", OUTCOME_OK, "ok", "", b"{}")
        >>> bounded_outcome(small) is small
        True
        >>> bounded_outcome(written) is written
        True
    """
    body = outcome.body
    if outcome.outcome != OUTCOME_OK or body is None or len(body) <= MAX_OUTCOME_BODY_BYTES:
        return outcome
    return attr.evolve(outcome, outcome=OUTCOME_STORED, detail=response_id_for(body), body=None)


def read_outcome_txn(txn: Txn, dialect: Dialect, server_name: str) -> Optional[FlightOutcome]:
    """The server's last outcome, if any (an answer too big for it, from the store)."""
    _execute(txn, dialect, SELECT_OUTCOME, (server_name,))
    row = txn.fetchone()
    return None if row is None else outcome_from_row(row)


def write_outcome_txn(
    txn: Txn,
    dialect: Dialect,
    server_name: str,
    outcome: FlightOutcome,
    holder_id: str,
    notices: Sequence[str] = (),
    keep_ms: int = OUTCOME_KEEP_MS,
) -> None:
    """Write the outcome (bounded: :func:`bounded_outcome`), give up ``holder_id``'s
    lease, drop a few rows finished over ``keep_ms`` ago (and the oldest beyond
    :data:`MAX_OUTCOME_ROWS`), then run ``notices`` (``?``: the server name), e.g. a
    ``NOTIFY``."""
    outcome = bounded_outcome(outcome)
    dialect_begin = dialect.begin_write
    if dialect_begin is not None:
        txn.execute(dialect_begin)
    _execute(
        txn,
        dialect,
        UPSERT_OUTCOME,
        (server_name, outcome.finished_ts, outcome.finished_by, outcome.outcome, outcome.label)
        + (outcome.detail[:MAX_DETAIL_CHARS], outcome.body, holder_id, holder_id),
    )
    trim_outcomes_txn(txn, dialect, outcome.finished_ts, server_name, keep_ms)
    _notify(txn, dialect, server_name, notices)


def _notify(txn: Txn, dialect: Dialect, server_name: str, notices: Sequence[str]) -> None:
    for statement in notices:
        _execute(txn, dialect, statement, (server_name,) if "?" in statement else ())


def trim_outcomes_txn(
    txn: Txn, dialect: Dialect, now: int, keep: str, keep_ms: int = OUTCOME_KEEP_MS
) -> None:
    """Drop a few rows of flights over for ``keep_ms`` (:func:`outcome_keep_ms`), and
    (at most :data:`TRIM_OUTCOMES_PER_WRITE`) those past the newest
    :data:`MAX_OUTCOME_ROWS`; never a lease still held, nor ``keep``'s row. Two
    statements inside a write transaction (bounded work: it runs with every outcome
    written, and on SQLite with every lease taken or given back)."""
    old = now - keep_ms
    _execute(txn, dialect, DELETE_OLD_OUTCOMES, (old, old))
    _execute(
        txn,
        dialect,
        DELETE_OUTCOMES_BEYOND,
        (now, keep, now, keep, TRIM_OUTCOMES_PER_WRITE, MAX_OUTCOME_ROWS),
    )


def mark_not_stored_txn(
    txn: Txn,
    dialect: Dialect,
    server_name: str,
    response_id: str,
    holder_id: str,
    notices: Sequence[str] = (),
) -> bool:
    """Turn ``holder_id``'s :data:`OUTCOME_STORED` outcome of ``response_id`` into an
    :data:`OUTCOME_NOT_STORED` one if the response is not in the store (and run
    ``notices`` then); False when there is nothing to change (stored after all, or a
    later flight's outcome)."""
    if dialect.begin_write is not None:
        txn.execute(dialect.begin_write)
    _execute(
        txn,
        dialect,
        MARK_NOT_STORED,
        (server_name, response_id, holder_id, response_id, server_name),
    )
    if txn.rowcount != 1:
        return False
    _notify(txn, dialect, server_name, notices)
    return True


def update_limits_txn(
    txn: Txn,
    dialect: Dialect,
    target: str,
    update: LimitUpdate,
    lock: Optional[str],
    keep_ms: int = LIMITS_KEEP_MS,
) -> int:
    """Apply ``update`` to the target's limit row under a lock (``lock``, a ``?``
    statement on the target, where the write transaction does not lock the whole
    database); a None state deletes the row (nothing worth remembering). A few rows
    untouched for ``keep_ms`` (:func:`limits_keep_ms`) go with every row written."""
    if dialect.begin_write is not None:
        txn.execute(dialect.begin_write)
    if lock is not None:
        _execute(txn, dialect, lock, (target,))
    _execute(txn, dialect, SELECT_LIMITS, (target,))
    row = txn.fetchone()
    state = None
    if row is not None:
        state = LimitState(float(row[0]), int(row[1]), int(row[2]), int(row[3]))
    new_state, answer = update(state)
    if new_state is None:
        if row is not None:
            _execute(txn, dialect, DELETE_LIMITS, (target,))
    elif new_state != state:
        _execute(
            txn,
            dialect,
            UPSERT_LIMITS,
            (target, new_state.tokens, new_state.tokens_ts, new_state.failures)
            + (new_state.backoff_until_ts,),
        )
        # The row's own token time is the caller's clock (at most as late as now).
        stale = new_state.tokens_ts - keep_ms
        _execute(txn, dialect, DELETE_STALE_LIMITS, (stale, stale))
    return answer


class StoredFlightRows:
    """What the SQL coordinations share: reading a flight's outcome and updating a
    target's shared limits, in the store's own transactions.

    Each query uses the store's dialect as it is when the query runs (a PostgreSQL
    store's changes once its schema is known). A backend says what else its writes
    need through two hooks: :meth:`_flight_notices` and :meth:`_limits_lock`.
    """

    _store: SqlKeyStore
    holder_id: str
    lease_ms: int
    #: How long a limit row nobody touches is kept (:func:`keep_limits_for`).
    limits_keep_ms: int = LIMITS_KEEP_MS

    @property
    def _outcome_keep_ms(self) -> int:
        return outcome_keep_ms(self.lease_ms)

    @property
    def _dialect(self) -> Dialect:
        return self._store.dialect

    async def _flight_notices(self) -> Sequence[str]:
        """Statements run in the transaction that changes an outcome, to tell the
        waiters (``?``: the server name), e.g. a ``NOTIFY``; none where the waiters
        poll."""
        return ()

    async def _limits_lock(self) -> Optional[str]:
        """A ``?``-placeholder statement locking one target's limits until the
        transaction ends, or None where the store's write lock already does."""
        return None

    async def read_outcome(self, server_name: str) -> Optional[FlightOutcome]:
        """See :meth:`~keyring_module.storage.coordination.Coordination.read_outcome`."""
        return await self._store.run(
            "read flight outcome", read_outcome_txn, self._dialect, server_name
        )

    async def mark_not_stored(self, server_name: str, response_id: str) -> bool:
        """See :meth:`~keyring_module.storage.coordination.Coordination.mark_not_stored`
        (with :meth:`_flight_notices`, in one transaction)."""
        notices = await self._flight_notices()
        return await self._store.run(
            "mark flight outcome not stored",
            mark_not_stored_txn,
            self._dialect,
            server_name,
            response_id,
            self.holder_id,
            notices,
        )

    async def update_limits(self, target: str, update: LimitUpdate) -> int:
        """See :meth:`~keyring_module.storage.coordination.Coordination.update_limits`
        (under :meth:`_limits_lock`)."""
        lock = await self._limits_lock()
        return await self._store.run(
            "update shared limits",
            update_limits_txn,
            self._dialect,
            target,
            update,
            lock,
            self.limits_keep_ms,
        )


def keep_limits_for(coordination: object, config: RateLimitConfig) -> None:
    """Have a SQL coordination keep its limit rows for as long as ``config``'s limits
    need them (:func:`limits_keep_ms`); other coordinations keep no rows.

    Example::

        keep_limits_for(coordination_of(store), config.ratelimit)
    """
    if isinstance(coordination, StoredFlightRows):
        coordination.limits_keep_ms = limits_keep_ms(config)
