"""The SQL key store shared by SQLite and PostgreSQL, on ``adbapi.ConnectionPool``.

Every query is written once with ``?`` placeholders; :class:`Dialect` is the one place
that knows what differs between the databases (paramstyle, the binary column type, how
to start a write transaction, which driver errors mean "database unavailable").

All database work runs in the pool's threads, never on the reactor thread, and so does
turning rows into model objects (checking each stored response's hash, decoding key
rows): a read of 10,000 servers returns ready objects to the reactor. Each store call is
one transaction. A write first takes the server's write lock (SQLite: ``BEGIN
IMMEDIATE``, the database's write lock; PostgreSQL: a transaction-scoped advisory lock
per server name), then reads all the server's key rows and what it has stored of its
responses (their ids, sizes and sources, not their bytes), applies the shared store step
(:func:`keyring_module.storage.writes.plan_store`: the merge rule within the per-server
bounds) and writes back what changed. So processes sharing one database never overwrite
each other's newer rows, and the bounds hold across them.
"""

import logging
from typing import Any, Callable, Collection, Optional, Sequence, TypeVar

import attr
from twisted.enterprise import adbapi

from keyring_module.model import KeyConflict, ServerKeysResponse, StoredKey, StoredResponse
from keyring_module.storage.bounds import conflicts_by_server, record_within_cap
from keyring_module.storage.errors import (
    SchemaTooNewError,
    StorageError,
    StorageUnavailableError,
)
from keyring_module.storage.forget import ForgottenKeys, log_forgotten, plan_forget
from keyring_module.storage.limits import DEFAULT_STORE_LIMITS, StoreLimits
from keyring_module.storage.rows import (
    conflict_from_row,
    key_row,
    keys_from_rows,
    response_from_row,
    select_keys,
)
from keyring_module.storage.schema import (
    CREATE_SCHEMA_VERSION,
    INSERT_SCHEMA_VERSION,
    MIGRATIONS,
    SCHEMA_VERSION,
    SELECT_SCHEMA_VERSION,
    UPDATE_SCHEMA_VERSION,
)
from keyring_module.storage.writes import plan_store

logger = logging.getLogger(__name__)

T = TypeVar("T")
Txn = Any  # an adbapi.Transaction: a DB-API cursor plus reconnect logic

#: How many server names go into one ``IN (...)`` list.
MANY_SERVERS_CHUNK = 500

_KEY_SELECT = (
    "SELECT server_name, key_id, verify_key, valid_until_ts, expired_ts, fetched_ts,"
    " source, response_id FROM server_keys"
)
SELECT_SERVER_KEYS = _KEY_SELECT + " WHERE server_name = ?"
SELECT_MANY_SERVER_KEYS = _KEY_SELECT + " WHERE server_name IN ({params})"
SELECT_KEYS_FOR_STORE = (
    "SELECT server_name, key_id, verify_key, valid_until_ts, expired_ts, fetched_ts, source,"
    " response_id, first_response_id FROM server_keys WHERE server_name = ?"
)
# What the bounds need of a server's stored responses (rows.COPY_COLUMNS), not their bytes.
SELECT_COPIES_FOR_STORE = (
    "SELECT response_id, valid_until_ts, fetched_ts, source, length(json)"
    " FROM server_key_responses WHERE server_name = ?"
)
UPSERT_RESPONSE = """
INSERT INTO server_key_responses
    (response_id, server_name, valid_until_ts, fetched_ts, source, json)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (response_id) DO UPDATE SET
    json = excluded.json,
    fetched_ts = excluded.fetched_ts,
    source = excluded.source
WHERE server_key_responses.fetched_ts <= excluded.fetched_ts
"""
UPSERT_KEY = """
INSERT INTO server_keys
    (server_name, key_id, verify_key, valid_until_ts, expired_ts, fetched_ts, source,
     response_id, first_response_id)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (server_name, key_id) DO UPDATE SET
    verify_key = excluded.verify_key,
    valid_until_ts = excluded.valid_until_ts,
    expired_ts = excluded.expired_ts,
    fetched_ts = excluded.fetched_ts,
    source = excluded.source,
    response_id = excluded.response_id,
    first_response_id = excluded.first_response_id
"""
COUNT_CONFLICTS = "SELECT COUNT(*) FROM key_conflicts WHERE server_name = ?"
INSERT_CONFLICT = """
INSERT INTO key_conflicts
    (server_name, key_id, kept_key, kept_source, rejected_key, rejected_source, seen_ts)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (server_name, key_id, rejected_key) DO NOTHING
"""
# Responses no key points at any more (as its newest or first-seen copy), and those
# dropped at the server's bounds (writes.plan_store says which).
DELETE_RESPONSE = "DELETE FROM server_key_responses WHERE server_name = ? AND response_id = ?"
# The served responses of the servers: those one of their own server's key rows points at.
SELECT_MANY_SERVER_RESPONSES = """
SELECT response_id, server_name, valid_until_ts, fetched_ts, source, json
FROM server_key_responses
WHERE server_name IN ({params})
    AND EXISTS (
        SELECT 1 FROM server_keys
        WHERE server_keys.server_name = server_key_responses.server_name
            AND server_keys.response_id = server_key_responses.response_id
    )
ORDER BY valid_until_ts DESC, response_id
"""
SELECT_CONFLICTS = """
SELECT server_name, key_id, kept_key, kept_source, rejected_key, rejected_source, seen_ts
FROM key_conflicts
WHERE server_name = ?
ORDER BY seen_ts, key_id, rejected_source
"""
SELECT_SERVER_NAMES = """
SELECT server_name FROM server_keys
UNION
SELECT server_name FROM key_conflicts
ORDER BY server_name
"""
SELECT_CONFLICT_SERVER_NAMES = "SELECT DISTINCT server_name FROM key_conflicts ORDER BY server_name"
# What a forget needs of a server's stored responses (all of them, served or not).
SELECT_RESPONSES_FOR_FORGET = (
    "SELECT response_id, json FROM server_key_responses WHERE server_name = ?"
)
DELETE_KEY = "DELETE FROM server_keys WHERE server_name = ? AND key_id = ?"


@attr.s(auto_attribs=True, frozen=True, slots=True)
class Dialect:
    """What differs between the SQL databases we support.

    Attributes:
        name: a human readable name for messages ("SQLite", "PostgreSQL").
        placeholder: the driver's paramstyle marker (``?`` or ``%s``).
        bytes_type: the column type for binary data (``BLOB`` or ``BYTEA``).
        begin_write: the statement opening a write transaction, if the driver does not
            open one by itself (SQLite: ``BEGIN IMMEDIATE``, taking the write lock first).
        migration_lock: a statement serialising migrations of concurrent processes.
        driver_error: the driver's base exception class.
        unavailable_errors: driver exceptions meaning the database cannot be reached.
        server_lock: a ``?``-placeholder statement taking one server's write lock until
            the transaction ends (its parameter is the server name), if ``begin_write``
            does not lock the whole database already.
        change_notices: statements run at the end of every store of a server's keys,
            telling the other processes on the database that its keys changed (a
            ``?`` in one stands for the server name): SQLite appends to the
            ``key_changes`` feed, PostgreSQL sends a ``NOTIFY``
            (:mod:`keyring_module.storage.coordination`).
    """

    name: str
    placeholder: str
    bytes_type: str
    begin_write: Optional[str]
    migration_lock: Optional[str]
    driver_error: type[Exception]
    unavailable_errors: tuple[type[Exception], ...]
    server_lock: Optional[str] = None
    change_notices: tuple[str, ...] = ()

    def sql(self, statement: str) -> str:
        """A ``?``-placeholder statement in this driver's paramstyle."""
        if self.placeholder == "?":
            return statement
        return statement.replace("?", self.placeholder)

    def ddl(self, statement: str) -> str:
        """A schema statement with the ``{bytes}`` column type filled in."""
        return statement.format(bytes=self.bytes_type)


class _Connection(adbapi.Connection):
    """``adbapi.Connection`` whose dead-connection check logs through ``logging``.

    Twisted's version reports the failed rollback with ``log.err`` (an error with a
    traceback for every dead pooled connection); a lost connection is expected after a
    database restart, so it is a warning here, and :class:`adbapi.ConnectionLost` tells
    :meth:`SqlKeyStore._run` to retry on a fresh connection.
    """

    def rollback(self) -> None:
        connection: Any = self._connection
        if not self._pool.reconnect:
            connection.rollback()
            return
        try:
            connection.rollback()
            cursor = connection.cursor()
            cursor.execute(self._pool.good_sql)
            cursor.close()
            connection.commit()
            return
        except Exception as e:
            logger.warning("Database connection lost (%s); it will be reopened", e)
        self._pool.disconnect(connection)
        raise adbapi.ConnectionLost()


class KeyStorePool(adbapi.ConnectionPool):
    """A connection pool that lets a failed rollback's ``ConnectionLost`` propagate."""

    connectionFactory = _Connection

    def _runInteraction(self, interaction: Callable[..., T], *args: Any, **kw: Any) -> T:
        conn = self.connectionFactory(self)
        trans = self.transactionFactory(self, conn)
        try:
            result = interaction(trans, *args, **kw)
            trans.close()
            conn.commit()
            return result
        except BaseException:
            conn.rollback()  # raises ConnectionLost if the connection is dead
            raise


class SqlKeyStore:
    """A :class:`~keyring_module.storage.KeyStore` on a DB-API database.

    Use :class:`~keyring_module.storage.sqlite.SqliteKeyStore` or
    :class:`~keyring_module.storage.postgres.PostgresKeyStore`, then :meth:`migrate`
    before anything else (``open_key_store`` does both).

    Args:
        pool: the started (or starting) connection pool.
        dialect: what differs for this database.
        limits: how much one server may hold (``database.max_*_per_server``).
    """

    def __init__(
        self,
        pool: adbapi.ConnectionPool,
        dialect: Dialect,
        limits: StoreLimits = DEFAULT_STORE_LIMITS,
    ) -> None:
        self._pool = pool
        self._dialect = dialect
        self._limits = limits
        self._closed = False
        self._writes = 0

    @property
    def write_generation(self) -> int:
        """See :attr:`keyring_module.storage.KeyStore.write_generation`."""
        return self._writes

    @property
    def limits(self) -> StoreLimits:
        """See :attr:`keyring_module.storage.KeyStore.limits`."""
        return self._limits

    @property
    def dialect(self) -> Dialect:
        """What differs for this store's database."""
        return self._dialect

    # -- plumbing ----------------------------------------------------------------------

    async def run(self, what: str, func: Callable[..., T], *args: Any) -> T:
        """Run ``func(txn, *args)`` as one transaction in a pool thread, with the
        store's retries and error mapping (for the coordination between processes,
        :mod:`keyring_module.storage.coordination`).

        Raises:
            StorageUnavailableError: the database cannot be reached.
            StorageError: any other database failure.
        """
        return await self._run(what, func, *args)

    async def _run(self, what: str, func: Callable[..., T], *args: Any) -> T:
        """Run ``func(txn, *args)`` as one transaction in a pool thread.

        A dead pooled connection (e.g. after a database restart) is replaced and the
        transaction retried; each pooled connection can be found dead at most once, so
        ``pool size + 1`` attempts suffice. Every transaction here is safe to re-run.

        Raises:
            StorageUnavailableError: the database cannot be reached.
            StorageError: any other database failure.
        """
        if self._closed:
            # A closed pool would queue the work forever; fail at once instead.
            raise StorageUnavailableError(
                "%s key store is closed (%s)" % (self._dialect.name, what)
            )
        attempts = self._pool.max + 1
        for attempt in range(1, attempts + 1):
            try:
                result: T = await self._pool.runInteraction(func, *args)
                return result
            except adbapi.ConnectionLost:
                logger.info("%s: retrying %s on a new connection", self._dialect.name, what)
                if attempt == attempts:
                    raise StorageUnavailableError(
                        "%s connection lost during %s" % (self._dialect.name, what)
                    ) from None
            except self._dialect.unavailable_errors as e:
                raise StorageUnavailableError(
                    "%s database unavailable during %s: %s"
                    % (self._dialect.name, what, str(e).strip())
                ) from e
            except self._dialect.driver_error as e:
                raise StorageError(
                    "%s error during %s: %s" % (self._dialect.name, what, str(e).strip())
                ) from e
        raise AssertionError("unreachable")

    def _execute(self, txn: Txn, statement: str, args: Sequence[Any] = ()) -> None:
        txn.execute(self._dialect.sql(statement), tuple(args))

    def _begin_write(self, txn: Txn) -> None:
        if self._dialect.begin_write is not None:
            txn.execute(self._dialect.begin_write)

    def _begin_server_write(self, txn: Txn, server_names: Collection[str]) -> None:
        """Start a write transaction holding the write lock of the given servers.

        Locks are taken in name order, so two transactions never wait for each other.
        """
        self._begin_write(txn)
        if self._dialect.server_lock is not None:
            for server_name in sorted(set(server_names)):
                self._execute(txn, self._dialect.server_lock, (server_name,))

    # -- schema ------------------------------------------------------------------------

    async def migrate(self) -> int:
        """Create or upgrade the schema; returns the schema version now in the database.

        Raises:
            SchemaTooNewError: the database was written by a newer keyring_module.
        """
        version = await self._run("schema migration", self._migrate_txn)
        logger.info("%s key store ready (schema version %d)", self._dialect.name, version)
        return version

    def _migrate_txn(self, txn: Txn) -> int:
        self._begin_write(txn)
        if self._dialect.migration_lock is not None:
            txn.execute(self._dialect.migration_lock)
        txn.execute(CREATE_SCHEMA_VERSION)
        txn.execute(SELECT_SCHEMA_VERSION)
        rows = txn.fetchall()
        current = max((int(row[0]) for row in rows), default=0)
        if current > SCHEMA_VERSION:
            raise SchemaTooNewError(current, SCHEMA_VERSION)
        for version, statements in MIGRATIONS:
            if version > current:
                logger.info("Upgrading key store schema to version %d", version)
                for statement in statements:
                    txn.execute(self._dialect.ddl(statement))
        if not rows:
            self._execute(txn, INSERT_SCHEMA_VERSION, (SCHEMA_VERSION,))
        elif current < SCHEMA_VERSION or len(rows) > 1:
            self._execute(txn, UPDATE_SCHEMA_VERSION, (SCHEMA_VERSION,))
        return SCHEMA_VERSION

    # -- KeyStore ----------------------------------------------------------------------

    async def store_server_keys(
        self,
        response: ServerKeysResponse,
        source: str,
        fetched_ts: int,
        *,
        replace: Collection[str] = (),
    ) -> list[KeyConflict]:
        """See :meth:`keyring_module.storage.KeyStore.store_server_keys`."""
        try:
            return await self._run(
                "store_server_keys",
                self._store_txn,
                response,
                source,
                fetched_ts,
                frozenset(replace),
            )
        finally:
            self._writes += 1  # after the write: readers that saw the old count re-read

    def _store_txn(
        self,
        txn: Txn,
        response: ServerKeysResponse,
        source: str,
        fetched_ts: int,
        replace: frozenset[str],
    ) -> list[KeyConflict]:
        server_name = response.server_name
        self._begin_server_write(txn, [server_name])
        key_rows = self._select(txn, SELECT_KEYS_FOR_STORE, (server_name,))
        copy_rows = self._select(txn, SELECT_COPIES_FOR_STORE, (server_name,))
        outcome = plan_store(
            key_rows, copy_rows, response, source, fetched_ts, replace, self._limits
        )
        merged = outcome.merged
        if outcome.stores_response:
            self._execute(
                txn,
                UPSERT_RESPONSE,
                (response.response_id, server_name, response.valid_until_ts, fetched_ts)
                + (source, response.json_bytes),
            )
        for key_id in merged.written:
            self._execute(txn, UPSERT_KEY, key_row(merged.keys[key_id], merged.first_seen[key_id]))
        self._record_conflicts(txn, server_name, merged.conflicts)
        for response_id in sorted(outcome.dropped):
            self._execute(txn, DELETE_RESPONSE, (server_name, response_id))
        self._announce_change(txn, server_name)
        return list(merged.conflicts)

    def _announce_change(self, txn: Txn, server_name: str) -> None:
        """Tell the other processes on the database that a server's keys changed."""
        for statement in self._dialect.change_notices:
            self._execute(txn, statement, (server_name,) if "?" in statement else ())

    def _record_conflicts(
        self, txn: Txn, server_name: str, conflicts: Sequence[KeyConflict]
    ) -> None:
        """Record one server's conflicts within its bound (holding its write lock)."""
        if not conflicts:
            return
        self._execute(txn, COUNT_CONFLICTS, (server_name,))
        (recorded,) = txn.fetchone()

        def insert(c: KeyConflict) -> bool:
            self._execute(
                txn,
                INSERT_CONFLICT,
                (c.server_name, c.key_id, c.kept_key_bytes, c.kept_source, c.rejected_key_bytes)
                + (c.rejected_source, c.seen_ts),
            )
            return bool(txn.rowcount == 1)

        record_within_cap(conflicts, int(recorded), self._limits.max_conflicts, insert)

    async def record_conflicts(self, conflicts: Sequence[KeyConflict]) -> None:
        """See :meth:`keyring_module.storage.KeyStore.record_conflicts`."""
        if conflicts:
            await self._run("record_conflicts", self._record_conflicts_txn, list(conflicts))

    def _record_conflicts_txn(self, txn: Txn, conflicts: list[KeyConflict]) -> None:
        by_server = conflicts_by_server(conflicts)
        self._begin_server_write(txn, [server_name for server_name, _ in by_server])
        for server_name, found in by_server:
            self._record_conflicts(txn, server_name, found)

    async def get_server_keys(
        self, server_name: str, key_ids: Optional[Collection[str]] = None
    ) -> dict[str, StoredKey]:
        """See :meth:`keyring_module.storage.KeyStore.get_server_keys`."""
        found = await self._run("get_server_keys", self._select_keys, [server_name])
        return select_keys(found.get(server_name, {}), key_ids)

    async def get_many_server_keys(
        self, server_names: Collection[str]
    ) -> dict[str, dict[str, StoredKey]]:
        """See :meth:`keyring_module.storage.KeyStore.get_many_server_keys`."""
        names = sorted(set(server_names))
        if not names:
            return {}
        return await self._run("get_many_server_keys", self._select_keys, names)

    def _select(self, txn: Txn, statement: str, args: Sequence[Any]) -> list[Any]:
        self._execute(txn, statement, args)
        return list(txn.fetchall())

    def _select_keys(self, txn: Txn, names: Sequence[str]) -> dict[str, dict[str, StoredKey]]:
        """The readable keys of the servers, by server and key id (in a pool thread)."""
        if len(names) == 1:
            return keys_from_rows(self._select(txn, SELECT_SERVER_KEYS, names))
        rows: list[Any] = []
        for start in range(0, len(names), MANY_SERVERS_CHUNK):
            chunk = names[start : start + MANY_SERVERS_CHUNK]
            statement = SELECT_MANY_SERVER_KEYS.format(params=", ".join("?" * len(chunk)))
            rows.extend(self._select(txn, statement, chunk))
        return keys_from_rows(rows)

    async def get_server_responses(self, server_name: str) -> list[StoredResponse]:
        """See :meth:`keyring_module.storage.KeyStore.get_server_responses`.

        Newest ``valid_until_ts`` first.
        """
        found = await self._run("get_server_responses", self._select_many_responses, [server_name])
        return found.get(server_name, [])

    async def get_many_server_responses(
        self, server_names: Collection[str]
    ) -> dict[str, list[StoredResponse]]:
        """See :meth:`keyring_module.storage.KeyStore.get_many_server_responses`.

        One query per :data:`MANY_SERVERS_CHUNK` names, all in one transaction.
        """
        names = sorted(set(server_names))
        if not names:
            return {}
        return await self._run("get_many_server_responses", self._select_many_responses, names)

    def _select_many_responses(
        self, txn: Txn, names: Sequence[str]
    ) -> dict[str, list[StoredResponse]]:
        """The servers' readable served responses, by server, newest first (in a pool
        thread: each is hashed)."""
        found: dict[str, list[StoredResponse]] = {}
        for start in range(0, len(names), MANY_SERVERS_CHUNK):
            chunk = names[start : start + MANY_SERVERS_CHUNK]
            statement = SELECT_MANY_SERVER_RESPONSES.format(params=", ".join("?" * len(chunk)))
            for row in self._select(txn, statement, chunk):
                response = response_from_row(row)
                if response is not None:
                    found.setdefault(response.server_name, []).append(response)
        return found

    async def get_conflicts(self, server_name: str) -> list[KeyConflict]:
        """See :meth:`keyring_module.storage.KeyStore.get_conflicts`."""
        return await self._run("get_conflicts", self._select_conflicts, server_name)

    def _select_conflicts(self, txn: Txn, server_name: str) -> list[KeyConflict]:
        """The server's readable conflict records, oldest first (in a pool thread)."""
        conflicts = (
            conflict_from_row(row) for row in self._select(txn, SELECT_CONFLICTS, (server_name,))
        )
        return [c for c in conflicts if c is not None]

    async def list_server_names(self, *, conflicts_only: bool = False) -> list[str]:
        """See :meth:`keyring_module.storage.KeyStore.list_server_names`."""
        statement = SELECT_CONFLICT_SERVER_NAMES if conflicts_only else SELECT_SERVER_NAMES
        rows = await self._run("list_server_names", self._select, statement, ())
        return [str(name) for (name,) in rows]

    async def forget_server_keys(
        self, server_name: str, key_ids: Optional[Collection[str]] = None
    ) -> ForgottenKeys:
        """See :meth:`keyring_module.storage.KeyStore.forget_server_keys`."""
        wanted = None if key_ids is None else frozenset(key_ids)
        try:
            forgotten = await self._run("forget_server_keys", self._forget_txn, server_name, wanted)
        finally:
            self._writes += 1
        log_forgotten(forgotten)
        return forgotten

    def _forget_txn(
        self, txn: Txn, server_name: str, key_ids: Optional[frozenset[str]]
    ) -> ForgottenKeys:
        self._begin_server_write(txn, [server_name])
        key_rows = self._select(txn, SELECT_KEYS_FOR_STORE, (server_name,))
        response_rows = self._select(txn, SELECT_RESPONSES_FOR_FORGET, (server_name,))
        forgotten = plan_forget(server_name, key_rows, response_rows, key_ids)
        for key_id in forgotten.key_ids:
            self._execute(txn, DELETE_KEY, (server_name, key_id))
        for response_id in forgotten.response_ids:
            self._execute(txn, DELETE_RESPONSE, (server_name, response_id))
        if forgotten.key_ids or forgotten.response_ids:
            self._announce_change(txn, server_name)
        return forgotten

    async def check_health(self) -> None:
        """See :meth:`keyring_module.storage.KeyStore.check_health`."""
        await self._run("health check", self._select, "SELECT 1", ())

    async def close(self) -> None:
        """Stop the pool's threads and close its connections (idempotent)."""
        if not self._closed:
            self._closed = True
            self._pool.close()
