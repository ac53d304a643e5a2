"""``InMemoryKeyStore``: the key store semantics without a database.

Used by the unit tests of other components (and handy for experiments). Everything is
synchronous inside; the methods are ``async`` to match the protocol. Rows are kept as
tuples in the SQL column order and read through the same checks as the SQL backends
(:mod:`keyring_module.storage.rows`), so the shared storage tests run on it unchanged.
Key rows change only through the store-merge rule
(:func:`keyring_module.storage.merge.merge_server_keys`); a stored row that cannot be
read back counts as absent, so a response listing its key id replaces it.
"""

import logging
from typing import Any, Collection, Optional

from keyring_module.model import KeyConflict, ServerKeysResponse, StoredKey, StoredResponse
from keyring_module.storage.merge import merge_server_keys
from keyring_module.storage.rows import (
    conflict_from_row,
    key_row,
    keys_from_rows,
    parse_key_row,
    response_from_row,
    select_keys,
)

logger = logging.getLogger(__name__)

Row = tuple[Any, ...]


class InMemoryKeyStore:
    """A :class:`~keyring_module.storage.KeyStore` held in dictionaries.

    Attributes:
        responses: ``server_key_responses`` rows by response id.
        keys: ``server_keys`` rows by server name, then key id.
        conflicts: ``key_conflicts`` rows by (server name, key id, rejected key bytes),
            in the order recorded.
    """

    def __init__(self) -> None:
        self.responses: dict[str, Row] = {}
        self.keys: dict[str, dict[str, Row]] = {}
        self.conflicts: dict[tuple[str, str, bytes], Row] = {}
        self._writes = 0

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
        response_id = response.response_id
        stored = self.responses.get(response_id)
        if stored is None or stored[3] <= fetched_ts:
            self.responses[response_id] = (
                response_id,
                server_name,
                response.valid_until_ts,
                fetched_ts,
                source,
                response.json_bytes,
            )
        rows = self.keys.setdefault(server_name, {})
        readable: dict[str, StoredKey] = {}
        unreadable: dict[str, Exception] = {}
        for key_id, row in rows.items():
            try:
                readable[key_id] = parse_key_row(row)
            except (TypeError, ValueError) as e:
                unreadable[key_id] = e
        merged = merge_server_keys(readable, response, source, fetched_ts, replace)
        for key_id in merged.written:
            if key_id in unreadable:
                logger.warning(
                    "Replacing corrupt stored key %s %s: %s",
                    server_name,
                    key_id,
                    unreadable[key_id],
                )
            rows[key_id] = key_row(merged.keys[key_id])
        for conflict in merged.conflicts:
            self._record(conflict)
        if not rows:
            del self.keys[server_name]
        self._prune(server_name)
        return list(merged.conflicts)

    async def record_conflict(self, conflict: KeyConflict) -> None:
        """See :meth:`keyring_module.storage.KeyStore.record_conflict`."""
        self._record(conflict)

    def _record(self, c: KeyConflict) -> None:
        self.conflicts.setdefault(
            (c.server_name, c.key_id, c.rejected_key_bytes),
            (
                c.server_name,
                c.key_id,
                c.kept_key_bytes,
                c.kept_source,
                c.rejected_key_bytes,
                c.rejected_source,
                c.seen_ts,
            ),
        )

    def _prune(self, server_name: str) -> None:
        referenced = {row[7] for row in self.keys.get(server_name, {}).values()}
        for response_id, row in list(self.responses.items()):
            if row[1] == server_name and response_id not in referenced:
                del self.responses[response_id]

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
        referenced = {row[7] for row in self.keys.get(server_name, {}).values()}
        rows = [
            row
            for response_id, row in self.responses.items()
            if response_id in referenced and row[1] == server_name
        ]
        rows.sort(key=lambda row: (-row[2], row[0]))
        responses = (response_from_row(row) for row in rows)
        return [r for r in responses if r is not None]

    async def get_conflicts(self, server_name: str) -> list[KeyConflict]:
        """See :meth:`keyring_module.storage.KeyStore.get_conflicts`."""
        rows = [row for key, row in self.conflicts.items() if key[0] == server_name]
        rows.sort(key=lambda row: (row[6], row[1], row[5]))
        conflicts = (conflict_from_row(row) for row in rows)
        return [c for c in conflicts if c is not None]

    async def check_health(self) -> None:
        """Always healthy."""

    async def close(self) -> None:
        """Nothing to release."""
