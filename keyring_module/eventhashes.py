"""An event's hashes and its JSON value rules: content hash, reference hash, event ids
derived from hashes, and the canonical-JSON value rules of room v6 and later. Pure
functions, no keys and no I/O; :mod:`keyring_module.verify` applies them next to the
signature checks.

The rules (Server-Server API, "Calculating the content hash for an event" and
"Calculating the reference hash for an event"; room versions 3, 4, 6 and 12):

* **Content hash**: the event without ``unsigned``, ``signatures`` and ``hashes``, as
  canonical JSON, hashed with SHA-256; the sender puts it in ``hashes.sha256`` (unpadded
  base64). A hash that differs or is not base64 means we were given a redacted copy:
  the receiver uses the redacted event instead. No ``hashes`` object with a string
  ``sha256`` is a malformed event (redaction keeps ``hashes``): :func:`hashes_problem`.
* **Reference hash**: the event redacted by its room version's rules, without
  ``signatures`` and ``unsigned``, as canonical JSON, hashed with SHA-256. From room v3
  the event id is ``$`` and the reference hash in unpadded base64 (standard in v3,
  URL-safe from v4); in v12 a room's id is its create event's id with ``!`` for ``$``.
* In those versions the event id (and a v12 create event's room id) is derived from
  the event, so it is no part of what was hashed or signed: :func:`signed_form` leaves
  it out before anything is computed, and the caller compares it afterwards. (A v12
  create event sent over federation has no ``room_id``, and the auth rules reject one
  that has; a copy that carries the room id it makes is accepted here, any other is
  not.) A legacy top-level ``age_ts``, which Synapse also strips for the reference
  hash, is no protected key: redaction removes it anyway.
* **Canonical-JSON values** (room v6+): no floats anywhere in the event but its
  ``unsigned`` (covered by no hash or signature), and every integer within ±(2^53-1). Earlier versions accept whatever canonical JSON encodes.

Example (the spec's event signing test vector, "Cryptographic Test Vectors"):

    >>> event = {"room_id": "!x:domain", "sender": "@a:domain", "origin": "domain",
    ...     "origin_server_ts": 1000000, "signatures": {}, "hashes": {}, "type": "X",
    ...     "content": {}, "prev_events": [], "auth_events": [], "depth": 3,
    ...     "unsigned": {"age_ts": 1000000}}
    >>> encode_hash(content_hash(event), "standard")
    '5jM4wQpv6lnBo7CLIghJuHdW+s2CMBJPUOGOC89ncos'
    >>> has_non_canonical_values({"depth": 2**53}), has_non_canonical_values({"a": [1.5]})
    (True, True)
"""

import base64
import enum
import hashlib
from collections.abc import Mapping
from typing import Any, Optional

from canonicaljson import encode_canonical_json

from keyring_module.canonical_json import encode_plain
from keyring_module.encoding import decode_base64_either_alphabet
from keyring_module.redaction import REDACTION_RULES, redact_with_rules
from keyring_module.roomversions import EventIdFormat, RoomVersion

#: The largest integer canonical JSON allows in room v6 and later (2^53 - 1).
MAX_SAFE_INTEGER = 2**53 - 1

_CONTENT_HASH_EXCLUDED = frozenset({"unsigned", "signatures", "hashes"})


class ValueScan(enum.IntEnum):
    """What a walk over a decoded JSON value found (:func:`scan_values`)."""

    #: Only dicts, lists, strings, integers within ±(2^53-1), booleans and None: valid in
    #: every room version, and :func:`keyring_module.canonical_json.encode_plain` may
    #: encode it.
    PLAIN = 0
    #: Valid by the room v6+ rules, but holding other types too (a tuple, a mapping that
    #: is not a dict, a subclass of str or int): canonicaljson encodes it.
    OTHER_TYPES = 1
    #: A float or an integer outside ±(2^53-1): invalid in room v6+.
    NON_CANONICAL = 2


def scan_values(value: object) -> ValueScan:
    """Walk a decoded JSON value for the room v6+ value rules and its types.

    One walk over decoded JSON (dicts, lists, strings, numbers, booleans, None); dict
    keys are strings in decoded JSON and are not looked at. Deep nesting costs no
    recursion (an explicit stack). Stops at the first float or unsafe integer.

    Args:
        value: a decoded JSON value, e.g. a whole event.

    Returns:
        ``NON_CANONICAL`` if room v6+ rules make it invalid, else ``PLAIN`` or
        ``OTHER_TYPES``.

    Example:
        >>> scan_values({"a": {"b": [1, -(2**53 - 1), True, None, "x"]}}).name
        'PLAIN'
        >>> scan_values({"a": (1, 2)}).name, scan_values({"a": [-(2**53)]}).name
        ('OTHER_TYPES', 'NON_CANONICAL')
    """
    plain = True
    stack = [value]
    pop = stack.pop
    extend = stack.extend
    while stack:
        item = pop()
        kind = type(item)
        if kind is str:
            continue
        if kind is dict:
            extend(item.values())  # type: ignore[attr-defined]
        elif kind is list:
            extend(item)  # type: ignore[arg-type]
        elif kind is int:
            if not -MAX_SAFE_INTEGER <= item <= MAX_SAFE_INTEGER:  # type: ignore[operator]
                return ValueScan.NON_CANONICAL
        elif kind is bool or item is None:
            continue
        elif kind is float:
            return ValueScan.NON_CANONICAL
        else:  # other types (slow path; decoded JSON has none)
            plain = False
            if isinstance(item, Mapping):
                extend(item.values())
            elif isinstance(item, (list, tuple)):
                extend(item)
            elif isinstance(item, float):
                return ValueScan.NON_CANONICAL
            elif isinstance(item, int) and not isinstance(item, bool):
                if not -MAX_SAFE_INTEGER <= item <= MAX_SAFE_INTEGER:
                    return ValueScan.NON_CANONICAL
    return ValueScan.PLAIN if plain else ValueScan.OTHER_TYPES


def has_non_canonical_values(value: object) -> bool:
    """Whether ``value`` holds a float or an integer outside ±(2^53-1) anywhere
    (:func:`scan_values`).

    Example:
        >>> has_non_canonical_values({"a": {"b": [1, -(2**53 - 1), True, None, "x"]}})
        False
        >>> has_non_canonical_values({"a": {"b": [-(2**53)]}})
        True
    """
    return scan_values(value) is ValueScan.NON_CANONICAL


def signed_form(event: Mapping[str, Any], room_version: RoomVersion) -> Mapping[str, Any]:
    """The event as its sender hashed and signed it: without the ids derived from it.

    From room v3 the ``event_id`` is the reference hash, and in v12 a create event's
    ``room_id`` is too; a copy of the event may carry them (e.g. the client format), but
    they were never part of it. Otherwise the event is returned as it is.

    Example:
        >>> from keyring_module.roomversions import ROOM_VERSIONS
        >>> signed_form({"event_id": "$a", "type": "t"}, ROOM_VERSIONS["4"])
        {'type': 't'}
        >>> signed_form({"event_id": "$a:b", "type": "t"}, ROOM_VERSIONS["2"])
        {'event_id': '$a:b', 'type': 't'}
    """
    if room_version.event_id_format is None:
        return event
    drop_room_id = room_version.room_id_is_create_event_hash and is_create_event(event)
    if "event_id" not in event and not (drop_room_id and "room_id" in event):
        return event
    return {
        k: v for k, v in event.items() if k != "event_id" and not (drop_room_id and k == "room_id")
    }


def is_create_event(event: Mapping[str, Any]) -> bool:
    """Whether ``event`` is a room's create event (``m.room.create`` with ``state_key`` "")."""
    return event.get("type") == "m.room.create" and event.get("state_key") == ""


def content_hash(event: Mapping[str, Any], plain: bool = False) -> bytes:
    """The SHA-256 content hash of an event (pass its :func:`signed_form`).

    Args:
        event: the event.
        plain: whether :func:`scan_event_values` found it ``PLAIN`` (it is then
            encoded by :func:`~keyring_module.canonical_json.encode_plain`).

    Raises:
        ValueError: the event cannot be encoded as canonical JSON (e.g. ``NaN``).
    """
    stripped = {k: v for k, v in event.items() if k not in _CONTENT_HASH_EXCLUDED}
    return hashlib.sha256(_encode(stripped, plain)).digest()


def scan_event_values(event: Mapping[str, Any]) -> ValueScan:
    """:func:`scan_values` over an event but its ``unsigned``, which no signature or
    hash covers and any server relaying the event may add to (a receiver keeps little
    of it, if anything). ``NON_CANONICAL`` means the room v6+ value rules reject it.

    Example:
        >>> scan_event_values({"depth": 1, "unsigned": {"age": 1.5}}).name
        'PLAIN'
        >>> scan_event_values({"depth": 1.0}).name
        'NON_CANONICAL'
    """
    return scan_values([v for k, v in event.items() if k != "unsigned"])


def event_breaks_value_rules(event: Mapping[str, Any]) -> bool:
    """The room v6+ value rules on an event (:func:`scan_event_values`).

    Example:
        >>> event_breaks_value_rules({"depth": 1, "unsigned": {"age": 1.5}})
        False
        >>> event_breaks_value_rules({"depth": 1.0})
        True
    """
    return scan_event_values(event) is ValueScan.NON_CANONICAL


def hashes_problem(event: Mapping[str, Any]) -> Optional[str]:
    """Why an event's ``hashes`` is malformed (the spec's event format needs an object
    with a string ``sha256``), or None if it has that shape. Redaction keeps ``hashes``,
    so an event without it is no redacted copy of a valid one: it is invalid.

    Example:
        >>> hashes_problem({"hashes": {"sha256": "not even base64!"}}) is None
        True
        >>> hashes_problem({}), hashes_problem({"hashes": {"sha256": 5}})
        ('the event has no hashes object', 'hashes.sha256 is not a string')
    """
    hashes = event.get("hashes")
    if type(hashes) is not dict and not isinstance(hashes, Mapping):
        return "the event has no hashes object"
    if not isinstance(hashes.get("sha256"), str):
        return "hashes.sha256 is not a string"
    return None


def claimed_content_hash(event: Mapping[str, Any]) -> Optional[bytes]:
    """The decoded ``hashes.sha256`` of an event, or None if it is missing or not base64.

    Example:
        >>> claimed_content_hash({"hashes": {"sha256": "AAE"}})
        b'\\x00\\x01'
        >>> claimed_content_hash({"hashes": {"sha256": 5}}), claimed_content_hash({})
        (None, None)
    """
    hashes = event.get("hashes")
    if type(hashes) is not dict and not isinstance(hashes, Mapping):
        return None
    return decode_base64_either_alphabet(hashes.get("sha256"))


def content_hash_matches(event: Mapping[str, Any], plain: bool = False) -> bool:
    """Whether an event's ``hashes.sha256`` is its content hash (pass its
    :func:`signed_form`, and whether it is ``PLAIN`` as :func:`content_hash` takes
    it). A value that is not base64 counts as a mismatch: the spec's check fails, and
    the receiver keeps the redacted copy (:func:`hashes_problem` rejects an event whose
    ``hashes`` has no string ``sha256`` before this).

    Raises:
        ValueError: the event cannot be encoded as canonical JSON.
    """
    claimed = claimed_content_hash(event)
    return claimed is not None and claimed == content_hash(event, plain)


def reference_hash(event: Mapping[str, Any], room_version: RoomVersion) -> bytes:
    """The SHA-256 reference hash of an event (ids derived from it are left out first).

    Raises:
        ValueError: the event cannot be encoded as canonical JSON.
    """
    rules = REDACTION_RULES[room_version.redaction_rules]
    redacted = redact_with_rules(signed_form(event, room_version), rules)
    redacted.pop("signatures", None)
    return reference_hash_of(_encode(redacted))


def reference_hash_of(redacted_bytes: bytes) -> bytes:
    """The reference hash of an event already redacted, stripped of ``signatures`` and
    ``unsigned`` and encoded as canonical JSON (the bytes its signatures cover)."""
    return hashlib.sha256(redacted_bytes).digest()


def encode_hash(digest: bytes, event_id_format: EventIdFormat) -> str:
    """A hash in unpadded base64, standard or URL-safe.

    Example:
        >>> encode_hash(bytes([251, 255]), "standard"), encode_hash(bytes([251, 255]), "url_safe")
        ('+/8', '-_8')
    """
    encode = base64.urlsafe_b64encode if event_id_format == "url_safe" else base64.b64encode
    return encode(digest).rstrip(b"=").decode("ascii")


def event_id_of(event: Mapping[str, Any], room_version: RoomVersion) -> str:
    """The event id of an event in a room version whose event ids are hashes.

    Raises:
        ValueError: the room version's event ids are not hashes (v1, v2), or the event
            cannot be encoded as canonical JSON.
    """
    event_id_format = room_version.event_id_format
    if event_id_format is None:
        raise ValueError("room version %s has no hash event ids" % (room_version.identifier,))
    return "$" + encode_hash(reference_hash(event, room_version), event_id_format)


def create_event_room_id(event: Mapping[str, Any], room_version: RoomVersion) -> str:
    """The room id a v12 create event makes: its event id with ``!`` for ``$``.

    Raises:
        ValueError: the room version's room ids are not hashes, or the event cannot be
            encoded as canonical JSON.
    """
    if not room_version.room_id_is_create_event_hash:
        raise ValueError("room version %s has no hash room ids" % (room_version.identifier,))
    return "!" + event_id_of(event, room_version)[1:]


def _encode(obj: Mapping[str, Any], plain: bool = False) -> bytes:
    try:
        encoded: bytes = encode_plain(obj) if plain else encode_canonical_json(obj)
    except (TypeError, RecursionError) as e:
        raise ValueError("cannot encode as canonical JSON: %s" % (e,)) from None
    return encoded
