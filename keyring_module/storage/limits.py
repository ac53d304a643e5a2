"""How much one server may make the key store hold, and the share notaries may fill.

:class:`StoreLimits` holds the per-server bounds of the ``database:`` section:
``max_keys_per_server`` key rows, ``max_responses_per_server`` stored responses of at
most ``max_response_bytes_per_server`` bytes in all, and ``max_conflicts_per_server``
conflict records.

**Notaries fill at most half.** Keys and responses learned from a notary (whose source
is not ``origin``) may use only half of the key and response bounds (rounded down), so a
lying trusted notary that invents self-signed key ids for a server can never fill that
server's bounds: the origin's own new keys and answers always find room.

The rules written here (:meth:`StoreLimits.new_key_room`, :meth:`StoreLimits.holds`) are
used both by the store (:func:`keyring_module.storage.bounds.store_response`) and by the
trust projection (:func:`keyring_module.fetchers.trust.project_keys`), so the fetcher
chain judges a round by what the store will really keep.
"""

from typing import Mapping

import attr

from keyring_module.config import DatabaseConfig
from keyring_module.model import SOURCE_ORIGIN, StoredKey


def from_notary(source: str) -> bool:
    """Whether something stored from ``source`` was learned from a notary (provisional).

    Example:
        >>> from_notary("origin"), from_notary("notary:n.example")
        (False, True)
    """
    return source != SOURCE_ORIGIN


@attr.s(auto_attribs=True, frozen=True, slots=True)
class StoreLimits:
    """How much one server may hold in the store.

    Attributes:
        max_keys: key rows (key ids) per server.
        max_responses: stored responses per server (at least 2).
        max_conflicts: conflict records per server.
        max_response_bytes: the bytes of a server's stored responses, in all.
    """

    max_keys: int
    max_responses: int
    max_conflicts: int
    max_response_bytes: int = DatabaseConfig().max_response_bytes_per_server

    @staticmethod
    def from_config(config: DatabaseConfig) -> "StoreLimits":
        """The limits of the ``database:`` section.

        Example:
            >>> StoreLimits.from_config(DatabaseConfig(max_keys_per_server=5)).max_keys
            5
        """
        return StoreLimits(
            max_keys=config.max_keys_per_server,
            max_responses=config.max_responses_per_server,
            max_conflicts=config.max_conflicts_per_server,
            max_response_bytes=config.max_response_bytes_per_server,
        )

    @property
    def notary_keys(self) -> int:
        """The key rows learned from notaries that a server may hold."""
        return self.max_keys // 2

    @property
    def notary_responses(self) -> int:
        """The stored responses from notaries that a server may hold."""
        return self.max_responses // 2

    @property
    def notary_response_bytes(self) -> int:
        """The bytes of the stored responses from notaries that a server may hold."""
        return self.max_response_bytes // 2

    def new_key_room(self, keys: Mapping[str, StoredKey], unreadable: int, source: str) -> int:
        """How many key ids not stored yet a response from ``source`` may add.

        Args:
            keys: the server's readable key rows.
            unreadable: how many of its rows cannot be read back (they take room too).
            source: where the response comes from.

        Example:
            >>> limits = StoreLimits(max_keys=4, max_responses=2, max_conflicts=0)
            >>> key = StoredKey("a.example", "ed25519:n", bytes(32), 1, None, 1, "notary:n", "r")
            >>> keys = {"ed25519:n": key, "ed25519:m": attr.evolve(key, key_id="ed25519:m")}
            >>> limits.new_key_room(keys, 0, "origin"), limits.new_key_room(keys, 0, "notary:n")
            (2, 0)
        """
        room = self.max_keys - len(keys) - unreadable
        if from_notary(source):
            provisional = sum(1 for key in keys.values() if from_notary(key.source))
            room = min(room, self.notary_keys - provisional)
        return max(0, room)

    def holds(self, count: int, size: int, notary_count: int, notary_size: int) -> bool:
        """Whether a server may hold ``count`` responses of ``size`` bytes in all, of which
        ``notary_count`` of ``notary_size`` bytes are from notaries.

        Example:
            >>> limits = StoreLimits(max_keys=4, max_responses=4, max_conflicts=0,
            ...                      max_response_bytes=1000)
            >>> limits.holds(4, 1000, 2, 500), limits.holds(3, 900, 3, 300)
            (True, False)
        """
        return (
            count <= self.max_responses
            and size <= self.max_response_bytes
            and notary_count <= self.notary_responses
            and notary_size <= self.notary_response_bytes
        )

    def can_hold_alone(self, size: int, source: str) -> bool:
        """Whether one response of ``size`` bytes from ``source`` fits the bounds at all.

        Example:
            >>> limits = StoreLimits(max_keys=4, max_responses=4, max_conflicts=0,
            ...                      max_response_bytes=1000)
            >>> limits.can_hold_alone(800, "origin"), limits.can_hold_alone(800, "notary:n")
            (True, False)
        """
        if from_notary(source):
            return self.holds(1, size, 1, size)
        return self.holds(1, size, 0, 0)


#: The limits of a default ``database:`` section.
DEFAULT_STORE_LIMITS = StoreLimits.from_config(DatabaseConfig())
