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
  key stays, the new one is rejected and recorded (``get_conflicts``).
"""

from typing import Collection, Mapping, Optional, Protocol

from keyring_module.model import KeyConflict, ServerKeysResponse, StoredKey, StoredResponse


class KeyStore(Protocol):
    """What the fetchers, the notary and the keyring need from storage (all async)."""

    async def store_server_keys(
        self, response: ServerKeysResponse, source: str, fetched_ts: int
    ) -> list[KeyConflict]:
        """Store one validated response and index its keys per (server, key_id).

        The response row is stored once per distinct ``json_bytes``; storing the same
        bytes again only moves its ``fetched_ts``/``source`` forward. A key row is
        re-pointed at the new response when the new ``valid_until_ts`` is not older than
        the stored one. Returns the conflicts found (keys whose bytes differ from the
        first-seen ones); those keys are not changed.
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
        """The distinct stored responses that hold at least one key of the server."""
        ...

    async def get_conflicts(self, server_name: str) -> list[KeyConflict]:
        """Recorded key conflicts for a server, oldest first."""
        ...

    async def check_health(self) -> None:
        """Raise if the database does not answer a trivial query."""
        ...

    async def close(self) -> None:
        """Release connections and threads."""
        ...


KeysByServer = Mapping[str, Mapping[str, StoredKey]]
