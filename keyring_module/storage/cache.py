"""``CachedKeyStore``: a bounded in-memory read-through cache in front of a key store.

* Per server, it remembers the answer of ``get_server_keys`` (all keys) and of
  ``get_server_responses``; ``get_many_server_keys`` and ``get_many_server_responses``
  use and fill the same entries, asking the backend once for the servers not cached.
* At most ``max_entries`` servers, holding at most ``max_bytes`` (their stored
  responses' bytes, plus a small fixed cost per key and per response), are remembered;
  the least recently used are dropped first.
* Servers the store has no keys for are remembered apart, in a small LRU of their own
  (at most :data:`MAX_EMPTY_ENTRIES` names, or ``max_entries`` if that is smaller), so
  that a batch naming 10,000 unknown servers cannot push the real entries out.
* An entry is fresh for ``ttl_ms``; several processes sharing one database therefore
  see each other's writes within the TTL, or much sooner when the store's
  ``coordination`` tells them of each write (:meth:`CachedKeyStore.forget`).
* A write through this object expires that server's entry, and a read that was in flight
  during the write is not cached, so this process always reads its own writes.
* Every write (through this object, or told by the ``coordination``) is counted in
  :attr:`~CachedKeyStore.write_generation` and told to the listeners added with
  :meth:`~CachedKeyStore.add_write_listener` with the server it was about (None when
  any server's keys may have changed), so that what was built on earlier reads (the
  notary's whole answers) drops only what involves that server.
* When the backend fails and an entry (even an expired one) exists, that entry is
  served with a warning ("stale in-memory answer"); otherwise the error is re-raised.
  That is why entries past their TTL are kept (within the bounds above) rather than
  dropped: they are the answer of last resort while the database is down.
"""

import logging
from collections import Counter
from typing import TYPE_CHECKING, Collection, Optional, Sequence

import attr

from keyring_module.clock import SecondsClock
from keyring_module.config import DatabaseConfig
from keyring_module.model import KeyConflict, ServerKeysResponse, StoredKey, StoredResponse
from keyring_module.servername import MAX_SERVER_NAME_LENGTH
from keyring_module.sized_lru import ENTRY_OVERHEAD_BYTES, SizedLru
from keyring_module.storage import KeyStore
from keyring_module.storage.forget import ForgottenKeys
from keyring_module.storage.limits import StoreLimits
from keyring_module.storage.rows import select_keys
from keyring_module.storage.write_news import WriteListener, WriteNews

if TYPE_CHECKING:
    from keyring_module.storage.coordination import Coordination

logger = logging.getLogger(__name__)

_NEVER = float("-inf")
# The fixed costs below are measured with tracemalloc on CPython 3.11 (a little above
# what an entry really holds), so that database.cache_size bounds the memory used.
#: What a cached server costs besides its name and SizedLru's own per-entry figure (the
#: entry object and the dict of its keys).
SERVER_OVERHEAD_BYTES = 250
#: What a cached key costs besides its key id (the StoredKey, its key bytes, its ids).
KEY_OVERHEAD_BYTES = 450
#: What a cached response costs besides its JSON bytes (the StoredResponse, its ids).
RESPONSE_OVERHEAD_BYTES = 300
#: The most servers remembered as having no stored keys (apart from the real entries).
MAX_EMPTY_ENTRIES = 1000
#: What remembering one server without keys costs besides its name.
EMPTY_ENTRY_BYTES = 200


@attr.s(slots=True, auto_attribs=True)
class _Entry:
    keys: Optional[dict[str, StoredKey]] = None
    keys_at: float = _NEVER
    responses: Optional[list[StoredResponse]] = None
    responses_at: float = _NEVER


def _entry_size(server_name: str, entry: _Entry) -> int:
    """The bytes one server's entry holds (its name, keys and responses)."""
    size = SERVER_OVERHEAD_BYTES + len(server_name)
    for key_id in entry.keys or ():
        size += KEY_OVERHEAD_BYTES + len(key_id)
    for response in entry.responses or ():
        size += RESPONSE_OVERHEAD_BYTES + len(response.json_bytes)
    return size


class CachedKeyStore:
    """A :class:`~keyring_module.storage.KeyStore` that caches another one's reads.

    Args:
        store: the backend (SQLite, PostgreSQL or in-memory store).
        clock: where the time comes from (``clock.seconds()``).
        max_entries: how many servers to remember; 0 disables caching.
        ttl_ms: how long an entry is served without asking the backend.
        max_bytes: how many bytes the remembered servers may hold (``database.cache_size``;
            its default when not given); a server holding more is not remembered.
        coordination: the backend's coordination with other processes, if any; started
            by the wiring, stopped by :meth:`close`.
    """

    def __init__(
        self,
        store: KeyStore,
        clock: SecondsClock,
        max_entries: int,
        ttl_ms: int,
        *,
        max_bytes: Optional[int] = None,
        coordination: "Optional[Coordination]" = None,
    ) -> None:
        self.store = store
        #: What the processes sharing the database coordinate through (None: nothing);
        #: it tells this cache of other processes' writes.
        self.coordination = coordination
        if coordination is not None:
            coordination.on_keys_changed = self.changed_elsewhere
        self._clock = clock
        self._ttl_seconds = ttl_ms / 1000
        self._entries: SizedLru[str, _Entry] = SizedLru(
            DatabaseConfig().cache_size if max_bytes is None else max_bytes,
            _entry_size,
            max_entries=max(0, max_entries),
        )
        # Servers with no stored keys, and when that was read: apart from _entries, so
        # that unknown names never push real entries out.
        empty_entries = max(0, min(max_entries, MAX_EMPTY_ENTRIES))
        self._empty: SizedLru[str, float] = SizedLru(
            empty_entries * (EMPTY_ENTRY_BYTES + ENTRY_OVERHEAD_BYTES + MAX_SERVER_NAME_LENGTH),
            lambda name, _: len(name) + EMPTY_ENTRY_BYTES,
            max_entries=empty_entries,
        )
        # Write sequence numbers, so a read overlapping a write of its server is not
        # cached: _reading counts reads in flight per server, and _written_seq holds the
        # last write's number for servers with reads in flight.
        self._seq = 0
        self._reading: Counter[str] = Counter()
        self._written_seq: dict[str, int] = {}
        self._news = WriteNews()

    def __len__(self) -> int:
        """How many servers are cached (those known to have no keys included)."""
        return len(self._entries) + len(self._empty)

    @property
    def total_bytes(self) -> int:
        """The bytes the cached servers with keys hold now (as :func:`_entry_size` counts
        them); the servers known to have no keys are bounded apart."""
        return self._entries.total_bytes

    @property
    def limits(self) -> StoreLimits:
        """The backend's per-server bounds."""
        return self.store.limits

    @property
    def write_generation(self) -> int:
        """Counts writes through this store and those other processes told of; caches
        built on its reads compare it."""
        return self._seq

    def add_write_listener(self, listener: WriteListener) -> None:
        """Tell ``listener`` of each write counted in :attr:`write_generation` from now
        on, with the server it was about (None: any server's), once it is counted.

        Example:
            >>> from twisted.internet.task import Clock
            >>> from keyring_module.storage.memory import InMemoryKeyStore
            >>> cache = CachedKeyStore(InMemoryKeyStore(), Clock(), 10, 10_000)
            >>> cache.add_write_listener(lambda name, generation: print(name, generation))
            >>> cache.forget("example.org"); cache.forget(None)
            example.org 1
            None 2
        """
        self._news.add(listener)

    # -- cache bookkeeping -------------------------------------------------------------

    def _fresh(self, stamp: float) -> bool:
        return self._clock.seconds() - stamp < self._ttl_seconds

    def _remember_keys(self, server_name: str, keys: dict[str, StoredKey], now: float) -> None:
        entry = self._entries.peek(server_name)
        if entry is None and not keys:
            self._empty.put(server_name, now)
            return
        self._empty.pop(server_name)
        entry = entry or _Entry()
        entry.keys, entry.keys_at = keys, now
        self._entries.put(server_name, entry)  # measured again, most recently used

    def _remember_responses(
        self, server_name: str, responses: list[StoredResponse], now: float
    ) -> None:
        entry = self._entries.peek(server_name)
        if entry is None and not responses:
            return  # nothing to serve: not worth an entry (keys come first anyway)
        entry = entry or _Entry()
        entry.responses, entry.responses_at = responses, now
        self._entries.put(server_name, entry)

    def _start_read(self, server_names: Collection[str]) -> int:
        self._reading.update(server_names)
        return self._seq

    def _finish_read(self, server_names: Collection[str], start_seq: int) -> set[str]:
        """End a read; returns the servers whose result may be cached."""
        cacheable = set()
        for name in server_names:
            if self._written_seq.get(name, _NEVER) <= start_seq:
                cacheable.add(name)
            self._reading[name] -= 1
            if self._reading[name] <= 0:
                del self._reading[name]
                self._written_seq.pop(name, None)
        return cacheable

    def _stale(self, server_name: str, what: str, error: Exception) -> None:
        logger.warning(
            "Key store failed (%s); serving a stale in-memory answer for %s of %s",
            error,
            what,
            server_name,
        )

    # -- KeyStore ----------------------------------------------------------------------

    async def store_server_keys(
        self,
        response: ServerKeysResponse,
        source: str,
        fetched_ts: int,
        *,
        replace: Collection[str] = (),
    ) -> list[KeyConflict]:
        """Store through to the backend, then expire the server's cached entry."""
        server_name = response.server_name
        try:
            return await self.store.store_server_keys(response, source, fetched_ts, replace=replace)
        finally:
            self.forget(server_name)

    def changed_elsewhere(self, server_name: Optional[str]) -> None:
        """Another process changed the server's keys (None: any server's), by a store
        or by ``keys forget``, which the news does not tell apart: drop the cached
        entry entirely (not even kept as a last resort, so that a forgotten key never
        comes back from it) and count the write as :meth:`forget` does."""
        if server_name is None:
            self._entries.clear()
        else:
            self._entries.pop(server_name)
        self.forget(server_name)

    def forget(self, server_name: Optional[str]) -> None:
        """Another writer changed the server's keys (None: any server's): read them
        from the backend next time, and count a write and tell it to the write
        listeners, so that answers built on what was read before are not reused (the
        notary's answer cache drops those involving the server).

        Example:
            >>> from twisted.internet.task import Clock
            >>> from keyring_module.storage.memory import InMemoryKeyStore
            >>> cache = CachedKeyStore(InMemoryKeyStore(), Clock(), 10, 10_000)
            >>> cache.forget("example.org"); cache.write_generation
            1
        """
        self._seq += 1
        if server_name is None:
            for name in self._reading:
                self._written_seq[name] = self._seq
            for name in self._entries:
                stale = self._entries.peek(name)
                if stale is not None:
                    stale.keys_at = stale.responses_at = _NEVER
            self._empty.clear()
            self._news.tell(None, self._seq)
            return
        if server_name in self._reading:
            self._written_seq[server_name] = self._seq
        entry = self._entries.peek(server_name)
        if entry is not None:
            # Keep the data only as a last resort if the backend fails later.
            entry.keys_at = entry.responses_at = _NEVER
        self._empty.pop(server_name)
        self._news.tell(server_name, self._seq)

    async def get_server_keys(
        self, server_name: str, key_ids: Optional[Collection[str]] = None
    ) -> dict[str, StoredKey]:
        """See :meth:`keyring_module.storage.KeyStore.get_server_keys`."""
        return select_keys((await self._keys_of([server_name])).get(server_name, {}), key_ids)

    async def get_many_server_keys(
        self, server_names: Collection[str]
    ) -> dict[str, dict[str, StoredKey]]:
        """See :meth:`keyring_module.storage.KeyStore.get_many_server_keys`."""
        found = await self._keys_of(sorted(set(server_names)))
        return {name: dict(keys) for name, keys in found.items() if keys}

    async def _keys_of(self, server_names: list[str]) -> dict[str, dict[str, StoredKey]]:
        """All keys of each (distinct) server, from the cache or the backend."""
        result: dict[str, dict[str, StoredKey]] = {}
        missing: list[str] = []
        for name in server_names:
            entry = self._entries.get(name)
            if entry is not None and entry.keys is not None and self._fresh(entry.keys_at):
                result[name] = entry.keys
                continue
            empty_at = self._empty.get(name) if entry is None else None
            if empty_at is not None and self._fresh(empty_at):
                result[name] = {}
            else:
                missing.append(name)
        if not missing:
            return result
        start = self._start_read(missing)
        try:
            if len(missing) == 1:
                fetched = {missing[0]: await self.store.get_server_keys(missing[0])}
            else:
                fetched = await self.store.get_many_server_keys(missing)
        except Exception as e:
            self._finish_read(missing, start)
            for name in missing:
                stale = self._entries.peek(name)
                if stale is not None and stale.keys is not None:
                    result[name] = stale.keys
                elif name in self._empty:
                    result[name] = {}
                else:
                    raise
                self._stale(name, "keys", e)
            return result
        cacheable = self._finish_read(missing, start)
        now = self._clock.seconds()
        for name in missing:
            keys = result[name] = fetched.get(name, {})
            if name in cacheable:
                self._remember_keys(name, keys, now)
        return result

    async def get_server_responses(self, server_name: str) -> list[StoredResponse]:
        """See :meth:`keyring_module.storage.KeyStore.get_server_responses`."""
        return list((await self._responses_of([server_name]))[server_name])

    async def get_many_server_responses(
        self, server_names: Collection[str]
    ) -> dict[str, list[StoredResponse]]:
        """See :meth:`keyring_module.storage.KeyStore.get_many_server_responses`."""
        found = await self._responses_of(sorted(set(server_names)))
        return {name: list(responses) for name, responses in found.items() if responses}

    async def _responses_of(self, server_names: list[str]) -> dict[str, list[StoredResponse]]:
        """The served responses of each (distinct) server, from the cache or the backend
        (the servers not freshly cached are read with one call)."""
        result: dict[str, list[StoredResponse]] = {}
        missing: list[str] = []
        for name in server_names:
            entry = self._entries.get(name)
            if (
                entry is not None
                and entry.responses is not None
                and self._fresh(entry.responses_at)
            ):
                result[name] = entry.responses
            else:
                missing.append(name)
        if not missing:
            return result
        start = self._start_read(missing)
        try:
            if len(missing) == 1:
                fetched = {missing[0]: await self.store.get_server_responses(missing[0])}
            else:
                fetched = await self.store.get_many_server_responses(missing)
        except Exception as e:
            self._finish_read(missing, start)
            for name in missing:
                stale = self._entries.peek(name)
                if stale is None or stale.responses is None:
                    raise
                result[name] = stale.responses
                self._stale(name, "responses", e)
            return result
        cacheable = self._finish_read(missing, start)
        now = self._clock.seconds()
        for name in missing:
            responses = result[name] = fetched.get(name, [])
            if name in cacheable:
                self._remember_responses(name, responses, now)
        return result

    async def record_conflicts(self, conflicts: Sequence[KeyConflict]) -> None:
        """Record through to the backend (conflicts are not cached; keys do not change)."""
        await self.store.record_conflicts(conflicts)

    async def get_conflicts(self, server_name: str) -> list[KeyConflict]:
        """Not cached: operators' reading."""
        return await self.store.get_conflicts(server_name)

    async def list_server_names(self, *, conflicts_only: bool = False) -> list[str]:
        """Not cached: operators' reading."""
        return await self.store.list_server_names(conflicts_only=conflicts_only)

    async def forget_server_keys(
        self, server_name: str, key_ids: Optional[Collection[str]] = None
    ) -> ForgottenKeys:
        """Forget through to the backend, then drop the server's cached entry entirely
        (not even kept as a last resort: the forgotten keys must not come back from it).

        Other processes sharing the database are told by the backend's news and drop
        theirs too (:meth:`changed_elsewhere`).
        """
        try:
            return await self.store.forget_server_keys(server_name, key_ids)
        finally:
            self.changed_elsewhere(server_name)

    async def check_health(self) -> None:
        """Ask the backend (never answered from the cache)."""
        await self.store.check_health()

    async def close(self) -> None:
        """Stop the coordination, forget everything and close the backend."""
        if self.coordination is not None:
            await self.coordination.close()
        self._entries.clear()
        self._empty.clear()
        await self.store.close()
