"""``SqliteKeyStore``: the default key store, one SQLite file (``database.backend: sqlite``).

The pool has exactly one connection (``cp_min = cp_max = 1``): SQLite lets one writer
in at a time anyway, a single connection never waits on a lock held by a sibling
connection in the same process, and ``:memory:`` databases work (each connection would
otherwise get its own empty database). Reads are absorbed by the in-memory cache in
front (:class:`~keyring_module.storage.cache.CachedKeyStore`).

Durability: WAL journal with ``synchronous = FULL``, so a write that returned survives a
crash of the process (``kill -9``) and of the machine. Write transactions start with
``BEGIN IMMEDIATE`` (the database's write lock, which is also every server's write lock)
and wait up to the busy timeout when another process holds the lock.
"""

import sqlite3

from keyring_module.clock import ThreadedReactor
from keyring_module.storage.limits import DEFAULT_STORE_LIMITS, StoreLimits
from keyring_module.storage.sql import Dialect, KeyStorePool, SqlKeyStore

#: How many rows of the ``key_changes`` feed are kept.
KEPT_CHANGES = 10_000

SQLITE_DIALECT = Dialect(
    name="SQLite",
    placeholder="?",
    bytes_type="BLOB",
    begin_write="BEGIN IMMEDIATE",
    migration_lock=None,
    driver_error=sqlite3.Error,
    unavailable_errors=(sqlite3.OperationalError,),
    # The change feed other processes poll (see sqlite_coordination); it keeps the last
    # KEPT_CHANGES rows.
    change_notices=(
        "INSERT INTO key_changes (server_name) VALUES (?)",
        "DELETE FROM key_changes WHERE seq <= (SELECT MAX(seq) FROM key_changes) - %d"
        % KEPT_CHANGES,
    ),
)


def _prepare_connection(conn: sqlite3.Connection) -> None:
    """Per-connection settings (run by the pool after connecting)."""
    conn.execute("PRAGMA journal_mode = WAL")  # ":memory:" stays "memory"; that is fine
    conn.execute("PRAGMA synchronous = FULL")


class SqliteKeyStore(SqlKeyStore):
    """A key store in one SQLite database file.

    Args:
        path: the database file (created if missing), or ``":memory:"``.
        reactor: the reactor the pool starts with, stops with and reports results on.
        busy_timeout_ms: how long a write waits for another process's lock.
        limits: how much one server may hold (``database.max_*_per_server``).
    """

    def __init__(
        self,
        path: str,
        reactor: ThreadedReactor,
        busy_timeout_ms: int = 10_000,
        limits: StoreLimits = DEFAULT_STORE_LIMITS,
    ) -> None:
        pool = KeyStorePool(
            "sqlite3",
            path,
            timeout=busy_timeout_ms / 1000,
            isolation_level=None,  # we issue BEGIN IMMEDIATE ourselves
            check_same_thread=False,  # adbapi creates it in one thread, uses it in another
            cp_min=1,
            cp_max=1,
            cp_openfun=_prepare_connection,
            cp_reactor=reactor,
        )
        super().__init__(pool, SQLITE_DIALECT, limits)
        self.path = path
