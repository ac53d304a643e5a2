"""Serve keys from the store: the first link of the fetcher chain."""

from typing import Collection, Mapping

import attr

from keyring_module.model import KeyRequest, StoredKey
from keyring_module.storage import KeyStore


@attr.s(auto_attribs=True, frozen=True, slots=True)
class StoreLookup:
    """What the store holds for a set of requests.

    Attributes:
        keys: every stored key of each requested server (servers with none left out).
        unsatisfied: the requested servers whose stored keys do not answer the request.
    """

    keys: dict[str, dict[str, StoredKey]]
    unsatisfied: frozenset[str]


class StoreKeyFetcher:
    """Reads cached keys and says which requests they already answer.

    Args:
        store: the key store.
    """

    def __init__(self, store: KeyStore) -> None:
        self._store = store

    async def get_stored_keys(
        self, server_names: Collection[str]
    ) -> dict[str, dict[str, StoredKey]]:
        """Every stored key of the given servers (servers with none are left out)."""
        if not server_names:
            return {}
        return await self._store.get_many_server_keys(server_names)

    async def lookup(self, requests: Mapping[str, KeyRequest]) -> StoreLookup:
        """Read the requested servers' keys and check them against the requests.

        See :meth:`~keyring_module.model.KeyRequest.is_satisfied_by` for when stored keys
        answer a request.
        """
        keys = await self.get_stored_keys(list(requests))
        unsatisfied = frozenset(
            name
            for name, request in requests.items()
            if not request.is_satisfied_by(keys.get(name, {}))
        )
        return StoreLookup(keys=keys, unsatisfied=unsatisfied)
