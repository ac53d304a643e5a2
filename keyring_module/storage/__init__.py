"""Persistent key storage: the ``KeyStore`` protocol and how to open one.

Backends: ``SqliteKeyStore`` (default, ``database.backend: sqlite``) and
``PostgresKeyStore`` (``database.backend: postgres``, for several instances sharing one
cache). ``CachedKeyStore`` puts a bounded in-memory read-through cache in front of either.

Rules every backend follows:

* keys are kept per (server_name, key_id); a key the origin stops listing is never
  deleted by a later fetch;
* each distinct response is stored once, as canonical JSON bytes, so the notary can
  re-serve it byte for byte;
* the same (server_name, key_id) with different key bytes is a conflict: the first-seen
  key stays, the new one is rejected and recorded (``get_conflicts``), unless the store
  call names the key id in ``replace``;
* each key row also keeps its first-seen copy: a server's stored responses are the
  newest and the first-seen copy of each of its key ids, and nothing else;
* per server, the keys, stored responses (in number and bytes) and conflict records
  are bounded (``database.max_keys_per_server``, ``max_responses_per_server``,
  ``max_response_bytes_per_server``, ``max_conflicts_per_server``), and what notaries
  told us may fill only half of the key and response bounds. Key rows are never given
  up: at the key bound new key ids are refused. At the response bounds, first-seen
  copies, then copies of expired keys, then older copies give way to the newest one
  (:mod:`keyring_module.storage.bounds`, :mod:`keyring_module.storage.copies`);
* the merge rule and the bounds are written once (:mod:`keyring_module.storage.merge`,
  :mod:`keyring_module.storage.limits`, :mod:`keyring_module.storage.copies`,
  :mod:`keyring_module.storage.bounds`) and applied by every backend through one store
  step (:mod:`keyring_module.storage.writes`); the SQL backends run it under a
  per-server write lock (atomic across processes), and a property test checks the
  backends agree;
* rows that cannot be read back (wrong-length key, undecodable JSON, ...) are logged
  and skipped, never crashing a query;
* keys leave the store only through :meth:`KeyStore.forget_server_keys` (an
  operator's ``keyring-module keys forget``), never through a fetch;
* failures raise :class:`StorageError`; :class:`StorageUnavailableError` when the
  database cannot be reached (the web layer answers 5xx JSON for both).

Modules: ``merge`` (the store-merge rule, pure), ``limits`` (the per-server limits),
``copies`` (which stored responses to keep, pure), ``bounds`` (the merge rule within the
limits, pure), ``writes`` (the store step every backend shares), ``rows`` (reading rows back),
``forget`` (what forgetting a server's keys removes, pure), ``schema`` (DDL and
migrations), ``sql`` (the shared SQL store), ``sqlite``,
``postgres``, ``memory`` (``InMemoryKeyStore`` for tests), ``cache`` (``CachedKeyStore``),
``coordination`` (what processes sharing one database coordinate through, with
``sqlite_coordination``, ``pg_coordination``, ``flight_rows`` and ``watchers``).
Open the configured store with :func:`open_key_store`; the stores take the reactor from
their caller (only the entry points pick the real one).
"""

from typing import TYPE_CHECKING, Collection, Mapping, Optional, Protocol, Sequence

from keyring_module.config import DatabaseConfig
from keyring_module.model import KeyConflict, ServerKeysResponse, StoredKey, StoredResponse
from keyring_module.storage.errors import (
    SchemaTooNewError,
    StorageError,
    StorageUnavailableError,
)

if TYPE_CHECKING:
    from keyring_module.clock import SecondsClock, ThreadedReactor
    from keyring_module.storage.cache import CachedKeyStore
    from keyring_module.storage.coordination import Coordination
    from keyring_module.storage.forget import ForgottenKeys
    from keyring_module.storage.limits import StoreLimits

__all__ = [
    "KeyStore",
    "KeysByServer",
    "SchemaTooNewError",
    "StorageError",
    "StorageUnavailableError",
    "open_key_store",
]


class KeyStore(Protocol):
    """What the fetchers, the notary and the keyring need from storage (all async)."""

    async def store_server_keys(
        self,
        response: ServerKeysResponse,
        source: str,
        fetched_ts: int,
        *,
        replace: Collection[str] = (),
    ) -> list[KeyConflict]:
        """Store one validated response and index its keys per (server, key_id).

        The rule is :func:`keyring_module.storage.merge.merge_server_keys`.

        The response row is stored once per distinct ``json_bytes``; storing the same
        bytes again only moves its ``fetched_ts``/``source`` forward. A key row is
        re-pointed at the new response when the new ``valid_until_ts`` is not older than
        the stored one. Returns the conflicts found (keys whose bytes differ from the
        first-seen ones); those keys are not changed and each conflict is recorded once
        per (server, key_id, rejected key bytes), while the server has fewer than
        ``max_conflicts_per_server`` records.

        Within the per-server bounds (:mod:`keyring_module.storage.bounds`), new key ids
        may be refused (logged), older stored responses of the server may be dropped
        (its key rows stay), or the whole response refused when it cannot fit even so;
        the conflicts found are returned all the same.

        ``replace`` names the key ids for which this response wins instead (MSC4499: a
        direct fetch overrides a provisional, notary-provided key): a differing stored
        key row is overwritten with this response's key, and the conflict is recorded and
        returned with this response as the kept side and the old key as the rejected one.
        """
        ...

    @property
    def limits(self) -> "StoreLimits":
        """The per-server bounds this store applies (the fetcher chain judges a round
        by what the store will keep, see :func:`keyring_module.fetchers.trust.project_keys`)."""
        ...

    @property
    def write_generation(self) -> int:
        """Counts :meth:`store_server_keys` calls made through this object (successful or
        not), so that answers built on earlier reads can tell they may be out of date."""
        ...

    async def record_conflicts(self, conflicts: Sequence[KeyConflict]) -> None:
        """Record conflicts found outside :meth:`store_server_keys`, in one transaction.

        For example answers rejected before they reached the store because other
        sources disagreed with them. Each is recorded once per (server, key_id, rejected
        key bytes), a repeat is ignored, and a server with ``max_conflicts_per_server``
        records gets no more (the oldest are kept).
        """
        ...

    async def get_server_keys(
        self, server_name: str, key_ids: Optional[Collection[str]] = None
    ) -> dict[str, StoredKey]:
        """All keys of a server (``key_ids=None``) or the given ones that are known."""
        ...

    async def get_many_server_keys(
        self, server_names: Collection[str]
    ) -> dict[str, dict[str, StoredKey]]:
        """All keys of many servers at once; servers with no keys are left out."""
        ...

    async def get_server_responses(self, server_name: str) -> list[StoredResponse]:
        """The distinct stored responses that hold at least one key of the server.

        That is, the responses the server's key rows point at as their newest copy,
        newest ``valid_until_ts`` first. A key's first-seen copy may be kept but is not
        returned (unless it is also some key's newest copy); responses no key points at
        any more are deleted, and a key whose newest copy was dropped at the server's
        bounds has none here.
        """
        ...

    async def get_many_server_responses(
        self, server_names: Collection[str]
    ) -> dict[str, list[StoredResponse]]:
        """What :meth:`get_server_responses` answers for each of many servers, read at
        once (one database round trip per chunk of names, not one per server).

        Servers with no stored response are left out.
        """
        ...

    async def get_conflicts(self, server_name: str) -> list[KeyConflict]:
        """Recorded key conflicts for a server, oldest first."""
        ...

    async def list_server_names(self, *, conflicts_only: bool = False) -> list[str]:
        """The servers the store holds key rows or conflict records of (only those with
        conflict records, if ``conflicts_only``), sorted (operators' reading:
        ``keyring-module keys``)."""
        ...

    async def forget_server_keys(
        self, server_name: str, key_ids: Optional[Collection[str]] = None
    ) -> "ForgottenKeys":
        """Remove a server's keys (all, or the given key ids) and the stored responses
        that list them, in one transaction under the server's write lock, so that the
        next lookup fetches them again; logs what was removed.

        The rule is :func:`keyring_module.storage.forget.plan_forget`; conflict records
        stay. Returns what was removed (empty when nothing matched).
        """
        ...

    async def check_health(self) -> None:
        """Raise if the database does not answer a trivial query."""
        ...

    async def close(self) -> None:
        """Release connections and threads."""
        ...


KeysByServer = Mapping[str, Mapping[str, StoredKey]]


async def open_key_store(
    config: DatabaseConfig,
    clock: "SecondsClock",
    reactor: "ThreadedReactor",
) -> "CachedKeyStore":
    """Open the configured backend, bring its schema up to date, and put a cache in front.

    Args:
        config: the ``database:`` section (backend, path or dsn, pool and cache sizes,
            per-server bounds).
        clock: the time source of the cache TTL (the reactor, or ``Clock`` in tests).
        reactor: the reactor the connection pool starts with, stops with and reports
            results on (the entry points pass the real one).

    Returns:
        A ready store; ``close()`` it on shutdown. Its ``coordination`` (shared flights,
        limits and news between processes on the database,
        :mod:`keyring_module.storage.coordination`) is built but not started: the
        wiring starts it (``await store.coordination.start()``), and ``close()`` stops it.

    Raises:
        StorageUnavailableError: the database cannot be reached.
        SchemaTooNewError: the database was written by a newer keyring_module.
        StorageError: anything else (unknown backend, psycopg2 missing, ...).
    """
    from keyring_module.storage.cache import CachedKeyStore
    from keyring_module.storage.limits import StoreLimits
    from keyring_module.storage.sql import SqlKeyStore

    backend: SqlKeyStore
    coordination: "Optional[Coordination]" = None
    limits = StoreLimits.from_config(config)
    if config.backend == "sqlite":
        from keyring_module.storage.sqlite import SqliteKeyStore
        from keyring_module.storage.sqlite_coordination import SqliteCoordination

        backend = SqliteKeyStore(config.path, reactor, limits=limits)
        if config.path != ":memory:":  # nothing else can open that one
            coordination = SqliteCoordination(
                backend,
                reactor,
                lease_ms=config.flight_lease_ms,
                poll_interval_ms=config.poll_interval_ms,
            )
    elif config.backend == "postgres":
        from keyring_module.storage.pg_coordination import PostgresCoordination
        from keyring_module.storage.postgres import PostgresKeyStore

        if not config.dsn:
            raise StorageError('database backend "postgres" needs a dsn')
        pg_backend = PostgresKeyStore(
            config.dsn, reactor, pool_size=config.pool_size, limits=limits
        )
        coordination = PostgresCoordination(
            pg_backend, config.dsn, reactor, lease_ms=config.flight_lease_ms
        )
        backend = pg_backend
    else:
        raise StorageError(
            'unknown database backend %r; expected "sqlite" or "postgres"' % (config.backend,)
        )
    try:
        await backend.migrate()
    except BaseException:
        await backend.close()
        raise
    return CachedKeyStore(
        backend,
        clock,
        config.cache_entries,
        config.cache_ttl_ms,
        max_bytes=config.cache_size,
        coordination=coordination,
    )
