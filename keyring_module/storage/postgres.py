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
"""

from typing import Any

from keyring_module.clock import ThreadedReactor
from keyring_module.storage.errors import StorageError
from keyring_module.storage.limits import DEFAULT_STORE_LIMITS, StoreLimits
from keyring_module.storage.sql import Dialect, KeyStorePool, SqlKeyStore

# Serialises schema migrations of instances starting at the same time
# (an arbitrary constant: "keyring" in ASCII).
MIGRATION_LOCK_ID = 0x6B657972696E67
# The first half of each server's write lock, pg_advisory_xact_lock(class, hashtext(name))
# (an arbitrary 32-bit constant: "keys" in ASCII). Two-key advisory locks never collide
# with the one-key migration lock.
SERVER_LOCK_CLASS = 0x6B657973
# The first half of each server name's flight lock, pg_try_advisory_lock(class,
# hashtext(name)), held by the process fetching from that origin for all instances
# ("flig" in ASCII), and of each origin's shared-limits lock ("lims").
FLIGHT_LOCK_CLASS = 0x666C6967
LIMITS_LOCK_CLASS = 0x6C696D73
#: The channel a shared flight's outcome is announced on (payload: the server name).
FLIGHTS_CHANNEL = "keyring_module_flights"
#: The channel every store of a server's keys is announced on (payload: the server name).
KEYS_CHANNEL = "keyring_module_keys"


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
        server_lock="SELECT pg_advisory_xact_lock(%d, hashtext(?))" % SERVER_LOCK_CLASS,
        change_notices=("SELECT pg_notify('%s', ?)" % KEYS_CHANNEL,),
    )


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
