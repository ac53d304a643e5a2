"""``PostgresKeyStore``: for several instances sharing one cache (``backend: postgres``).

psycopg2 is imported only when this store is created, so the package works without it
(the ``postgres`` extra adds it, as ``psycopg2-binary``). The pool reconnects
(``cp_reconnect``): after a PostgreSQL restart each dead pooled connection is noticed
on its next use, replaced, and the transaction is retried (see ``SqlKeyStore._run``).

Every pooled connection runs its transactions at ``READ COMMITTED``, whatever the
server's or the role's ``default_transaction_isolation``: a store takes the server's
advisory lock and *then* reads its rows, which is only correct when each statement sees
what was committed before it started (at ``REPEATABLE READ`` or ``SERIALIZABLE`` the
snapshot would be taken before the lock was granted, and the read-modify-write would
lose a concurrent writer's rows or fail with serialization errors).

The write lock and the key-write ``NOTIFY`` are those of the store's schema
(:mod:`~keyring_module.storage.pg_scope`): the store reads ``current_schema()`` before
its first transaction, so instances on two schemas of one database never wait for each
other's locks nor hear each other's news.
"""

from typing import Any, Callable, Optional, TypeVar

import attr

from keyring_module.clock import ThreadedReactor
from keyring_module.storage.errors import StorageError
from keyring_module.storage.limits import DEFAULT_STORE_LIMITS, StoreLimits
from keyring_module.storage.pg_scope import SchemaScope
from keyring_module.storage.sql import Dialect, KeyStorePool, SqlKeyStore

T = TypeVar("T")

# Serialises schema migrations of instances starting at the same time, on every schema
# of the database (an arbitrary constant: "keyring" in ASCII). The other advisory locks
# and the channels are the schema's own (:mod:`~keyring_module.storage.pg_scope`);
# their two-key locks never collide with this one-key lock.
MIGRATION_LOCK_ID = 0x6B657972696E67
SELECT_CURRENT_SCHEMA = "SELECT current_schema()"


#: The isolation level of every transaction of the store (see the module docstring).
ISOLATION_LEVEL = "READ COMMITTED"


def _prepare_connection(conn: Any) -> None:
    """Per-connection settings (run by the pool after connecting, before any transaction)."""
    conn.set_session(isolation_level=ISOLATION_LEVEL)


def postgres_dialect() -> Dialect:
    """The PostgreSQL dialect (imports psycopg2).

    Raises:
        StorageError: psycopg2 is not installed.
    """
    try:
        import psycopg2
    except ImportError:
        raise StorageError(
            'database backend "postgres" needs psycopg2: install keyring_module with '
            "its postgres extra (pip install '/path/to/keyring_module[postgres]'), "
            "or psycopg2-binary"
        ) from None
    return Dialect(
        name="PostgreSQL",
        placeholder="%s",
        bytes_type="BYTEA",
        begin_write=None,  # psycopg2 opens a transaction before the first statement
        migration_lock="SELECT pg_advisory_xact_lock(%d)" % MIGRATION_LOCK_ID,
        driver_error=psycopg2.Error,
        unavailable_errors=(psycopg2.OperationalError, psycopg2.InterfaceError),
    )


def scoped_dialect(dialect: Dialect, scope: SchemaScope) -> Dialect:
    """``dialect`` with the schema's write lock and key-write ``NOTIFY``."""
    return attr.evolve(dialect, server_lock=scope.server_lock, change_notices=(scope.notify_keys,))


def _current_schema_txn(txn: Any) -> Optional[str]:
    txn.execute(SELECT_CURRENT_SCHEMA)
    row = txn.fetchone()
    return None if row is None or row[0] is None else str(row[0])


class PostgresKeyStore(SqlKeyStore):
    """A key store in a PostgreSQL database.

    Args:
        dsn: a libpq connection string, e.g. ``"host=127.0.0.1 dbname=keyring user=k"``.
        reactor: the reactor the pool starts with, stops with and reports results on.
        pool_size: the most connections (and threads) used at once.
        connect_timeout_seconds: libpq's ``connect_timeout`` unless the DSN sets one.
        limits: how much one server may hold (``database.max_*_per_server``).

    Raises:
        StorageError: psycopg2 is not installed.
    """

    def __init__(
        self,
        dsn: str,
        reactor: ThreadedReactor,
        pool_size: int = 5,
        connect_timeout_seconds: int = 10,
        limits: StoreLimits = DEFAULT_STORE_LIMITS,
    ) -> None:
        dialect = postgres_dialect()
        connect_kwargs: dict[str, Any] = {}
        if "connect_timeout" not in dsn:
            connect_kwargs["connect_timeout"] = connect_timeout_seconds
        pool = KeyStorePool(
            "psycopg2",
            dsn,
            cp_min=1,
            cp_max=max(1, pool_size),
            cp_reconnect=True,
            cp_openfun=_prepare_connection,
            cp_reactor=reactor,
            **connect_kwargs,
        )
        super().__init__(pool, dialect, limits)
        self._scope: Optional[SchemaScope] = None

    async def schema_scope(self) -> SchemaScope:
        """The lock classes and channels of the store's schema (read once, at first use).

        Raises:
            StorageUnavailableError: the database cannot be reached.
            StorageError: the ``search_path`` names no schema that exists.
        """
        scope = self._scope
        if scope is None:
            schema = await super()._run("read the current schema", _current_schema_txn)
            if schema is None:
                raise StorageError(
                    "PostgreSQL: no schema to use: the search_path of the database "
                    "connection names no schema that exists (create one, or set "
                    "search_path in the dsn's options)"
                )
            scope = SchemaScope.of(schema)
            self._dialect = scoped_dialect(self._dialect, scope)
            self._scope = scope
        return scope

    async def _run(self, what: str, func: Callable[..., T], *args: Any) -> T:
        """See :meth:`SqlKeyStore._run`; the schema's scope is read first."""
        if self._scope is None:
            await self.schema_scope()
        return await super()._run(what, func, *args)
