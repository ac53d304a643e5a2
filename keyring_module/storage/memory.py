"""``InMemoryKeyStore``: the key store semantics without a database.

Used by the unit tests of other components (and handy for experiments). Everything is
synchronous inside; the methods are ``async`` to match the protocol. Rows are kept as
tuples in the SQL column order and read through the same checks as the SQL backends
(:mod:`keyring_module.storage.rows`), so the shared storage tests run on it unchanged.
Key rows change only through the store step the SQL store uses too
(:func:`keyring_module.storage.writes.plan_store`: the merge rule within the per-server
bounds); a stored row that cannot be read back counts as absent, so a response listing
its key id replaces it.
"""

from typing import Any, Collection, Optional, Sequence

from keyring_module.model import KeyConflict, ServerKeysResponse, StoredKey, StoredResponse
from keyring_module.storage.bounds import conflicts_by_server, record_within_cap
from keyring_module.storage.forget import ForgottenKeys, log_forgotten, plan_forget
from keyring_module.storage.limits import DEFAULT_STORE_LIMITS, StoreLimits
from keyring_module.storage.rows import (
    conflict_from_row,
    key_row,
    keys_from_rows,
    response_from_row,
    select_keys,
)
from keyring_module.storage.writes import plan_store

Row = tuple[Any, ...]


class InMemoryKeyStore:
    """A :class:`~keyring_module.storage.KeyStore` held in dictionaries.

    Args:
        limits: how much one server may hold (``database.max_*_per_server``).

    Attributes:
        responses: ``server_key_responses`` rows by response id.
        keys: ``server_keys`` rows by server name, then key id.
        conflicts: ``key_conflicts`` rows by (server name, key id, rejected key bytes),
            in the order recorded.
    """

    def __init__(self, limits: StoreLimits = DEFAULT_STORE_LIMITS) -> None:
        self.responses: dict[str, Row] = {}
        self.keys: dict[str, dict[str, Row]] = {}
        self.conflicts: dict[tuple[str, str, bytes], Row] = {}
        self._limits = limits
        self._writes = 0

    @property
    def limits(self) -> StoreLimits:
        """See :attr:`keyring_module.storage.KeyStore.limits`."""
        return self._limits

    @property
    def write_generation(self) -> int:
        """See :attr:`keyring_module.storage.KeyStore.write_generation`."""
        return self._writes

    async def store_server_keys(
        self,
        response: ServerKeysResponse,
        source: str,
        fetched_ts: int,
        *,
        replace: Collection[str] = (),
    ) -> list[KeyConflict]:
        """See :meth:`keyring_module.storage.KeyStore.store_server_keys`."""
        self._writes += 1
        server_name = response.server_name
        rows = self.keys.setdefault(server_name, {})
        copy_rows = [
            (row[0], row[2], row[3], row[4], len(row[5]))
            for row in self.responses.values()
            if row[1] == server_name
        ]
        outcome = plan_store(
            list(rows.values()), copy_rows, response, source, fetched_ts, replace, self._limits
        )
        merged = outcome.merged
        if outcome.stores_response:
            self.responses[response.response_id] = (
                response.response_id,
                server_name,
                response.valid_until_ts,
                fetched_ts,
                source,
                response.json_bytes,
            )
        for key_id in merged.written:
            rows[key_id] = key_row(merged.keys[key_id], merged.first_seen[key_id])
        self._record(server_name, merged.conflicts)
        if not rows:
            del self.keys[server_name]
        for response_id in outcome.dropped:
            del self.responses[response_id]
        return list(merged.conflicts)

    async def record_conflicts(self, conflicts: Sequence[KeyConflict]) -> None:
        """See :meth:`keyring_module.storage.KeyStore.record_conflicts`."""
        for server_name, found in conflicts_by_server(conflicts):
            self._record(server_name, found)

    def _record(self, server_name: str, conflicts: Sequence[KeyConflict]) -> None:
        recorded = sum(1 for key in self.conflicts if key[0] == server_name)

        def insert(c: KeyConflict) -> bool:
            key = (c.server_name, c.key_id, c.rejected_key_bytes)
            if key in self.conflicts:
                return False
            self.conflicts[key] = (
                c.server_name,
                c.key_id,
                c.kept_key_bytes,
                c.kept_source,
                c.rejected_key_bytes,
                c.rejected_source,
                c.seen_ts,
            )
            return True

        record_within_cap(conflicts, recorded, self._limits.max_conflicts, insert)

    async def get_server_keys(
        self, server_name: str, key_ids: Optional[Collection[str]] = None
    ) -> dict[str, StoredKey]:
        """See :meth:`keyring_module.storage.KeyStore.get_server_keys`."""
        rows = list(self.keys.get(server_name, {}).values())
        return select_keys(keys_from_rows(rows).get(server_name, {}), key_ids)

    async def get_many_server_keys(
        self, server_names: Collection[str]
    ) -> dict[str, dict[str, StoredKey]]:
        """See :meth:`keyring_module.storage.KeyStore.get_many_server_keys`."""
        rows = [row for name in set(server_names) for row in self.keys.get(name, {}).values()]
        return keys_from_rows(rows)

    async def get_server_responses(self, server_name: str) -> list[StoredResponse]:
        """See :meth:`keyring_module.storage.KeyStore.get_server_responses`.

        Newest ``valid_until_ts`` first.
        """
        return self._served_responses(server_name)

    async def get_many_server_responses(
        self, server_names: Collection[str]
    ) -> dict[str, list[StoredResponse]]:
        """See :meth:`keyring_module.storage.KeyStore.get_many_server_responses`."""
        found = {name: self._served_responses(name) for name in set(server_names)}
        return {name: responses for name, responses in found.items() if responses}

    def _served_responses(self, server_name: str) -> list[StoredResponse]:
        """The server's readable responses its key rows point at, newest first."""
        referenced = {row[7] for row in self.keys.get(server_name, {}).values()}
        found = (self.responses.get(response_id) for response_id in referenced)
        rows = [row for row in found if row is not None and row[1] == server_name]
        rows.sort(key=lambda row: (-row[2], row[0]))
        responses = (response_from_row(row) for row in rows)
        return [r for r in responses if r is not None]

    async def get_conflicts(self, server_name: str) -> list[KeyConflict]:
        """See :meth:`keyring_module.storage.KeyStore.get_conflicts`."""
        rows = [row for key, row in self.conflicts.items() if key[0] == server_name]
        rows.sort(key=lambda row: (row[6], row[1], row[5]))
        conflicts = (conflict_from_row(row) for row in rows)
        return [c for c in conflicts if c is not None]

    async def list_server_names(self, *, conflicts_only: bool = False) -> list[str]:
        """See :meth:`keyring_module.storage.KeyStore.list_server_names`."""
        with_conflicts = {key[0] for key in self.conflicts}
        return sorted(with_conflicts if conflicts_only else set(self.keys) | with_conflicts)

    async def forget_server_keys(
        self, server_name: str, key_ids: Optional[Collection[str]] = None
    ) -> ForgottenKeys:
        """See :meth:`keyring_module.storage.KeyStore.forget_server_keys`."""
        self._writes += 1
        rows = self.keys.get(server_name, {})
        response_rows = [
            (row[0], row[5]) for row in self.responses.values() if row[1] == server_name
        ]
        forgotten = plan_forget(server_name, list(rows.values()), response_rows, key_ids)
        for key_id in forgotten.key_ids:
            del rows[key_id]
        if not rows:
            self.keys.pop(server_name, None)
        for response_id in forgotten.response_ids:
            del self.responses[response_id]
        log_forgotten(forgotten)
        return forgotten

    async def check_health(self) -> None:
        """Always healthy."""

    async def close(self) -> None:
        """Nothing to release."""
