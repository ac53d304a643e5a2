"""Coordination between processes sharing one PostgreSQL database: advisory locks and
``LISTEN``/``NOTIFY``.

* **Locks.** A flight is held through a session advisory lock,
  ``pg_try_advisory_lock(flight_lock_class, hashtext(server_name))``, taken and given
  back on a dedicated connection (one connection, one thread). A holder whose process
  dies loses its session, and with it the lock, at once: no lease to wait out.
* **News.** A second dedicated connection ``LISTEN``\\ s on the store's channels
  (``flights_channel``: a flight's outcome was written, payload the server name;
  ``keys_channel``: a server's keys were stored, which also wakes that name's waiting
  flights, since an answer too big to share in its outcome is read from the store).
  Its socket is watched by the reactor (an ``IReadDescriptor``); reading a notification
  never blocks. The writes send their ``NOTIFY`` in the same transaction, so the others
  hear of them as they commit. When that connection is lost it is opened again (every
  cached server is then dropped and every waiter woken, since news may have been
  missed); meanwhile the waiters look again on their own timer.

The lock classes and channels are those of the store's schema
(:class:`~keyring_module.storage.pg_scope.SchemaScope`): instances on other schemas of
the same database neither block these flights and limits nor hear this news.
"""

import logging
import os
from typing import Any, Callable, Optional, Sequence, cast

from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorFDSet, IReactorFromThreads, IReadDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

from keyring_module.clock import ThreadedReactor
from keyring_module.storage.coordination import (
    FlightOutcome,
    KeysChanged,
    LeaseAttempt,
    new_holder_id,
)
from keyring_module.storage.errors import StorageError, StorageUnavailableError
from keyring_module.storage.flight_rows import (
    StoredFlightRows,
    write_outcome_txn,
)
from keyring_module.storage.pg_scope import SchemaScope
from keyring_module.storage.postgres import PostgresKeyStore
from keyring_module.storage.sql import KeyStorePool
from keyring_module.storage.watchers import Watchers

logger = logging.getLogger(__name__)

UNLOCK_ALL = "SELECT pg_advisory_unlock_all()"

#: How often a waiter tries the lock again without news: a holder that died freed its
#: lock, but nobody tells the waiters.
LOCK_RETRY_MS = 500
#: How long after losing the news connection it is opened again (seconds).
RECONNECT_DELAY_S = 1.0


class PostgresCoordination(StoredFlightRows):
    """A :class:`~keyring_module.storage.coordination.Coordination` on PostgreSQL.

    Args:
        store: the PostgreSQL store (outcomes and limits are written through its pool).
        dsn: the libpq connection string of the two dedicated connections.
        reactor: watches the news connection's socket (when it can: a reactor without
            file descriptors, as in unit tests, gets no news and relies on retries).
        lease_ms: the longest a waiter waits for a live holder before fetching itself.
    """

    shared = True
    _store: PostgresKeyStore

    def __init__(
        self, store: PostgresKeyStore, dsn: str, reactor: ThreadedReactor, *, lease_ms: int
    ) -> None:
        self._store = store
        self._dsn = dsn
        self._reactor = reactor
        self.lease_ms = lease_ms
        self.holder_id = new_holder_id()
        self.on_keys_changed: Optional[KeysChanged] = None
        self._watchers = Watchers()
        self._locks = KeyStorePool(
            "psycopg2",
            dsn,
            cp_min=1,
            cp_max=1,
            cp_reconnect=True,
            cp_openfun=_autocommit,
            cp_reactor=reactor,
            connect_timeout=10,
        )
        self._listener: Optional[_Listener] = None
        self._reconnect: Any = None
        self._closed = False

    # -- news --------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the news connection and listen on the store's channels."""
        if self._closed or self._listener is not None:
            return
        if not IReactorFDSet.providedBy(self._reactor):
            logger.info("No file descriptors on this reactor: flights poll without news")
            return
        try:
            self._listener = await self._listen()
        except Exception as e:
            logger.warning("Cannot listen for database news (%s); retrying", e)
            self._listen_later()

    async def _listen(self) -> "_Listener":
        scope = await self._store.schema_scope()
        conn = await threads.deferToThreadPool(
            cast(IReactorFromThreads, self._reactor),
            self._locks.threadpool,
            _listening_connection,
            self._dsn,
            scope,
        )
        listener = _Listener(conn, scope, self._notified, self._lost)
        cast(IReactorFDSet, self._reactor).addReader(listener)
        return listener

    def _listen_later(self) -> None:
        if self._closed:
            return

        def again() -> None:
            self._reconnect = None
            defer.ensureDeferred(self._relisten()).addErrback(
                lambda f: logger.error("Listening again failed: %s", f.getTraceback())
            )

        self._reconnect = self._reactor.callLater(RECONNECT_DELAY_S, again)

    async def _relisten(self) -> None:
        if self._closed:
            return
        try:
            self._listener = await self._listen()
        except Exception as e:
            logger.warning("Cannot listen for database news (%s); retrying", e)
            self._listen_later()
            return
        logger.info("Listening for database news again")
        self._news_missed()

    def _lost(self, listener: "_Listener", reason: Failure) -> None:
        """The reactor stopped watching the news connection: it failed."""
        if listener.gone:
            return
        listener.gone = True
        listener.close()
        if self._listener is listener:
            self._listener = None
        if not self._closed:
            logger.warning("Lost the database news connection: %s", reason.getErrorMessage())
            self._news_missed()
            self._listen_later()

    def _news_missed(self) -> None:
        """News may have been missed: drop every cached server, wake every waiter."""
        self._tell_keys_changed(None)
        self._watchers.wake_all()

    def _notified(self, scope: SchemaScope, channel: str, payload: str) -> None:
        if channel == scope.flights_channel:
            self._watchers.wake(payload)
        elif channel == scope.keys_channel:
            # The payload names the server written; none (a bare NOTIFY): maybe any.
            self._tell_keys_changed(payload or None)
            # A flight whose answer was too big for its outcome waits for this write.
            if payload:
                self._watchers.wake(payload)
            else:
                self._watchers.wake_all()

    def _tell_keys_changed(self, server_name: Optional[str]) -> None:
        hook = self.on_keys_changed
        if hook is None:
            return
        try:
            hook(server_name)
        except Exception:
            logger.exception("Dropping changed keys from the cache failed")

    def watch(self, server_name: str) -> "defer.Deferred[None]":
        """See :meth:`Coordination.watch`: woken by the flight's ``NOTIFY``."""
        return self._watchers.watch(server_name)

    # -- locks -------------------------------------------------------------------------

    async def _on_lock_connection(self, what: str, statement: str, *args: Any) -> Any:
        sql = self._dialect.sql(statement)

        def run(txn: Any) -> Any:
            txn.execute(sql, args)
            return txn.fetchone()[0]

        try:
            return await self._locks.runInteraction(run)
        except self._dialect.unavailable_errors as e:
            raise StorageUnavailableError("PostgreSQL unavailable during %s: %s" % (what, e))
        except self._dialect.driver_error as e:
            raise StorageError("PostgreSQL error during %s: %s" % (what, e)) from e

    async def try_acquire(self, server_name: str) -> LeaseAttempt:
        """Try the server's advisory lock on the lock connection."""
        scope = await self._store.schema_scope()
        got = await self._on_lock_connection("take flight lock", scope.try_flight_lock, server_name)
        return LeaseAttempt(True) if got else LeaseAttempt(False, LOCK_RETRY_MS)

    async def renew(self, server_name: str) -> None:
        """Nothing to renew: the lock lasts as long as the session."""

    async def finish(self, server_name: str, outcome: Optional[FlightOutcome]) -> None:
        """Write the outcome and ``NOTIFY`` (one transaction), then unlock."""
        scope = await self._store.schema_scope()
        try:
            if outcome is not None:
                await self._store.run(
                    "write flight outcome",
                    write_outcome_txn,
                    self._dialect,
                    server_name,
                    outcome,
                    self.holder_id,
                    (scope.notify_flight,),
                    self._outcome_keep_ms,
                )
        finally:
            await self._on_lock_connection(
                "give back flight lock", scope.flight_unlock, server_name
            )

    async def _flight_notices(self) -> Sequence[str]:
        """The schema's flight ``NOTIFY``: the waiters are woken as the change commits."""
        scope = await self._store.schema_scope()
        return (scope.notify_flight,)

    async def _limits_lock(self) -> Optional[str]:
        """The schema's limits lock of the target (a transaction advisory lock)."""
        scope = await self._store.schema_scope()
        return scope.limits_lock

    async def close(self) -> None:
        """Stop listening, wake the waiters, give every lock back, close the connections."""
        if self._closed:
            return
        self._closed = True
        if self._reconnect is not None and self._reconnect.active():
            self._reconnect.cancel()
        listener, self._listener = self._listener, None
        if listener is not None and not listener.gone:
            listener.gone = True
            cast(IReactorFDSet, self._reactor).removeReader(listener)
            listener.close()
        self._watchers.wake_all()
        try:
            await self._on_lock_connection("give back flight locks", UNLOCK_ALL)
        except Exception as e:
            logger.info("Could not give the flight locks back (%s); closing frees them", e)
        self._locks.close()


def _autocommit(conn: Any) -> None:
    conn.autocommit = True


def _listening_connection(dsn: str, scope: SchemaScope) -> Any:
    """A new autocommit connection listening on the schema's channels (in a thread)."""
    import psycopg2

    conn = psycopg2.connect(dsn, connect_timeout=10)
    conn.autocommit = True
    with conn.cursor() as cursor:
        for statement in scope.listen_statements():
            cursor.execute(statement)
    return conn


@implementer(IReadDescriptor)
class _Listener:
    """The news connection's socket, watched by the reactor.

    The reactor watches a duplicate of the socket's descriptor, so that libpq closing
    its own (when the server ends the session) never leaves the reactor with a closed
    descriptor: the reactor stops watching first, then the duplicate is closed.
    ``conn.poll()`` reads what arrived without blocking; each notification is passed to
    ``notified(scope, channel, payload)`` (``scope``: the channels listened on). When the connection fails, ``doRead`` says so and
    the reactor calls :meth:`connectionLost`, which tells ``lost``.
    """

    def __init__(
        self,
        conn: Any,
        scope: SchemaScope,
        notified: Callable[[SchemaScope, str, str], None],
        lost: Callable[["_Listener", Failure], None],
    ) -> None:
        self._conn = conn
        self._scope = scope
        self._fileno = os.dup(conn.fileno())
        self._notified = notified
        self._lost = lost
        self.gone = False

    def fileno(self) -> int:
        return self._fileno

    def logPrefix(self) -> str:
        return "keyring-module database news"

    def doRead(self) -> Optional[Exception]:  # type: ignore[override]  # as the reactors use it
        try:
            self._conn.poll()
        except Exception as e:
            return ConnectionError("database news connection failed: %s" % (e,))
        while self._conn.notifies:
            notify = self._conn.notifies.pop(0)
            try:
                self._notified(self._scope, str(notify.channel), str(notify.payload))
            except Exception:
                logger.exception("Handling a database notification failed")
        if self._conn.closed:
            return ConnectionError("database news connection closed")
        return None

    def connectionLost(self, reason: Failure) -> None:
        """The reactor stopped watching (the connection failed or closed)."""
        self._lost(self, reason)

    def close(self) -> None:
        """Close the connection and the duplicate descriptor (once the reactor stopped
        watching it)."""
        try:
            self._conn.close()
        except Exception:
            pass
        if self._fileno != -1:
            try:
                os.close(self._fileno)
            except OSError:
                pass
            self._fileno = -1
