"""Value objects shared by the fetchers, the store, the notary and the keyring.

Raw JSON dicts live only at the HTTP and storage edges; inside, keys travel as these
frozen attrs classes.
"""

import hashlib
from typing import Mapping, Optional

import attr

#: ``source`` of keys fetched directly from the server they belong to.
SOURCE_ORIGIN = "origin"


def notary_source(notary_server_name: str) -> str:
    """The ``source`` label of keys learned through a notary, e.g. ``notary:matrix.org``."""
    return "notary:" + notary_server_name


@attr.s(auto_attribs=True, frozen=True, slots=True)
class OldVerifyKey:
    """An entry of ``old_verify_keys``: usable for events while ``expired_ts >= ts``."""

    verify_key_bytes: bytes
    expired_ts: int


@attr.s(auto_attribs=True, frozen=True, slots=True)
class ServerKeysResponse:
    """A validated ``/_matrix/key/v2/server`` object.

    ``json_bytes`` is the canonical JSON of the object exactly as the origin signed it
    (unknown fields kept), with ``signatures`` reduced to the origin's own, so a notary
    can re-serve it and add one signature of its own.
    """

    server_name: str
    valid_until_ts: int
    verify_keys: Mapping[str, bytes]
    old_verify_keys: Mapping[str, OldVerifyKey]
    json_bytes: bytes

    @property
    def response_id(self) -> str:
        """A content address for the stored response (hex SHA-256 of ``json_bytes``)."""
        return response_id_for(self.json_bytes)


def response_id_for(json_bytes: bytes) -> str:
    """The id under which a response's canonical bytes are stored."""
    return hashlib.sha256(json_bytes).hexdigest()


@attr.s(auto_attribs=True, frozen=True, slots=True)
class StoredKey:
    """One verify key of one server as the store remembers it, per (server, key_id).

    For a current key ``expired_ts`` is None and ``valid_until_ts`` is the response's;
    for a key from ``old_verify_keys`` ``expired_ts`` is set.
    """

    server_name: str
    key_id: str
    verify_key_bytes: bytes
    valid_until_ts: int
    expired_ts: Optional[int]
    fetched_ts: int
    source: str
    response_id: str


@attr.s(auto_attribs=True, frozen=True, slots=True)
class StoredResponse:
    """A stored origin response, with when and from where it was last fetched."""

    response_id: str
    server_name: str
    valid_until_ts: int
    fetched_ts: int
    source: str
    json_bytes: bytes


@attr.s(auto_attribs=True, frozen=True, slots=True)
class KeyConflict:
    """The same (server, key_id) seen with different key bytes from two sources.

    The first-seen key is kept; the conflicting one is recorded here for operators.
    """

    server_name: str
    key_id: str
    kept_key_bytes: bytes
    kept_source: str
    rejected_key_bytes: bytes
    rejected_source: str
    seen_ts: int
