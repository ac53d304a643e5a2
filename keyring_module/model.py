"""Value objects shared by the fetchers, the store, the notary and the keyring.

Raw JSON dicts live only at the HTTP and storage edges; inside, keys travel as these
frozen attrs classes, and every "keys wanted from a server" is a :class:`KeyRequest`.
"""

import enum
import hashlib
from typing import Mapping, Optional

import attr

#: ``source`` of keys fetched directly from the server they belong to.
SOURCE_ORIGIN = "origin"


_NOTARY_SOURCE_PREFIX = "notary:"


def notary_source(notary_server_name: str) -> str:
    """The ``source`` label of keys learned through a notary, e.g. ``notary:matrix.org``."""
    return _NOTARY_SOURCE_PREFIX + notary_server_name


def notary_of(source: str) -> Optional[str]:
    """The notary's server name in a ``notary:<name>`` source label, else None.

    Example:
        >>> notary_of("notary:matrix.org"), notary_of("origin")
        ('matrix.org', None)
    """
    if source.startswith(_NOTARY_SOURCE_PREFIX):
        return source[len(_NOTARY_SOURCE_PREFIX) :]
    return None


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


def _some_key_ids(
    instance: object,
    attribute: "attr.Attribute[Optional[frozenset[str]]]",
    key_ids: Optional[frozenset[str]],
) -> None:
    """Refuse an empty set of key ids (a request for no keys, or a mistaken "all keys")."""
    if key_ids is not None and not key_ids:
        raise ValueError("KeyRequest.key_ids is empty: use None for all keys")


class FetchPurpose(enum.Enum):
    """On whose behalf keys are fetched: what the per-origin limiter's reserve is for.

    The notary (any server may ask it) and our own keyring share one token bucket per
    origin. The last tokens of each bucket (:func:`~keyring_module.ratelimit.reserved_tokens`)
    are kept for :attr:`OWN` fetches, so that no load on the notary can use up what our
    own verification needs; both together still never exceed the one bucket.
    """

    #: For other servers: the notary's fetches and refreshes, direct confirmations, and
    #: anything not marked as ours (the default). May not spend the reserve.
    NOTARY = "notary"
    #: For our own keyring: verifying events and requests for the homeserver or other
    #: modules (``module.keyring``, the homeserver's lookups), and the operator's CLI.
    #: May spend the whole bucket.
    OWN = "own"


@attr.s(auto_attribs=True, frozen=True, slots=True)
class KeyRequest:
    """The keys wanted from one server: what the notary, the keyring and the CLI ask the
    fetch layer for, and what the fetchers ask origins and notaries.

    Attributes:
        server_name: the server whose keys are wanted.
        key_ids: the wanted key ids, or None for all of the server's keys; never empty
            (an empty set raises ValueError, so that "no key ids" cannot be mistaken for
            "all keys").
        minimum_valid_until_ts: current keys must have ``valid_until_ts`` at least this
            (inclusive), in ms since the epoch; 0 accepts any copy.
        purpose: on whose behalf (:class:`FetchPurpose`): only :attr:`FetchPurpose.OWN`
            requests may spend the per-origin limiter's reserve. Not shown in ``repr``.

    Example:
        >>> all_keys = KeyRequest("a.org", None, 5)
        >>> all_keys.merge(KeyRequest("a.org", frozenset({"ed25519:1"}), 9))
        KeyRequest(server_name='a.org', key_ids=None, minimum_valid_until_ts=9)
        >>> all_keys.merge(KeyRequest("a.org", None, 0, FetchPurpose.OWN)).purpose
        <FetchPurpose.OWN: 'own'>
        >>> KeyRequest("a.org", frozenset(), 5)
        Traceback (most recent call last):
        ...
        ValueError: KeyRequest.key_ids is empty: use None for all keys
    """

    server_name: str
    key_ids: Optional[frozenset[str]] = attr.ib(default=None, validator=_some_key_ids)
    minimum_valid_until_ts: int = 0
    purpose: FetchPurpose = attr.ib(default=FetchPurpose.NOTARY, repr=False)

    @property
    def may_use_reserve(self) -> bool:
        """Whether fetches for this request may spend the limiter's reserve (ours)."""
        return self.purpose is FetchPurpose.OWN

    def covers(self, other: "KeyRequest") -> bool:
        """Whether an answer to this request also answers ``other`` (same keys or more,
        same minimum or higher).

        Example:
            >>> KeyRequest("a", frozenset({"ed25519:1"}), 10).covers(KeyRequest("a", None, 5))
            False
        """
        if self.minimum_valid_until_ts < other.minimum_valid_until_ts:
            return False
        if self.key_ids is None:
            return True
        return other.key_ids is not None and other.key_ids <= self.key_ids

    def merge(self, other: "KeyRequest") -> "KeyRequest":
        """One request answering both: the union of key ids (all keys absorbs specific
        ones), the higher minimum, and :attr:`FetchPurpose.OWN` if either is ours."""
        key_ids = (
            None if self.key_ids is None or other.key_ids is None else self.key_ids | other.key_ids
        )
        return KeyRequest(
            self.server_name,
            key_ids,
            max(self.minimum_valid_until_ts, other.minimum_valid_until_ts),
            FetchPurpose.OWN if self.may_use_reserve or other.may_use_reserve else self.purpose,
        )

    def is_satisfied_by(self, keys: Mapping[str, StoredKey]) -> bool:
        """Whether stored keys answer the request, so that no fetch is needed.

        For specific key ids, each must be known: a current key with ``valid_until_ts >=
        minimum``, or an old key (``expired_ts`` set), which no fetch can improve. For all
        keys, at least one current key must be valid until the minimum.
        """
        minimum = self.minimum_valid_until_ts
        if self.key_ids is None:
            return any(k.expired_ts is None and k.valid_until_ts >= minimum for k in keys.values())
        for key_id in self.key_ids:
            key = keys.get(key_id)
            if key is None:
                return False
            if key.expired_ts is None and key.valid_until_ts < minimum:
                return False
        return True
