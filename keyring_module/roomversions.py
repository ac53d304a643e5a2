"""The room versions this package knows, and the few rules that vary between them.

Only the rules that matter for checking events' signatures and hashes are modelled:
which redaction algorithm to apply before verifying, whether ``valid_until_ts`` is
enforced, which servers besides the sender's must have signed, how event ids derive
from reference hashes (v3: standard unpadded base64, v4+: URL-safe), whether the
canonical-JSON value rules are enforced (v6+: no floats, integers within
±(2^53-1)), and whether a create event's room id is its reference hash (v12).

Room version 12 (Matrix 1.16: MSC4289 privileged room creators, MSC4291 room ids as
hashes of the create event, MSC4297 state resolution v2.1) changes none of these: the spec
lists its redaction algorithm under "Unchanged from v11", keys are checked against
``valid_until_ts`` as from v5, and "Events must be signed by the server denoted by the
``sender`` property" (plus a restricted join's authorising server, as from v8). Its
``m.room.create`` events carry no ``room_id``: the room id is the create event's id with
``!`` for ``$`` (``room_id_is_create_event_hash``); redaction keeps ``room_id`` only
where the event has one, and nothing here reads a server name from a room id.

Example:
    >>> ROOM_VERSIONS["10"].enforce_key_validity
    True
    >>> ROOM_VERSIONS["1"].event_id_domain_signature_required
    True
    >>> ROOM_VERSIONS["12"].redaction_rules == ROOM_VERSIONS["11"].redaction_rules
    True
    >>> [ROOM_VERSIONS[v].event_id_format for v in ("2", "3", "4", "12")]
    [None, 'standard', 'url_safe', 'url_safe']
    >>> ROOM_VERSIONS["5"].strict_canonical_json, ROOM_VERSIONS["6"].strict_canonical_json
    (False, True)
    >>> get_room_version("99")
    Traceback (most recent call last):
        ...
    ValueError: unknown room version '99' (known: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12)
"""

from typing import Literal, Optional

import attr

#: How an event id is written from the event's reference hash: ``$`` and the hash in
#: standard (v3) or URL-safe (v4 and later) unpadded base64.
EventIdFormat = Literal["standard", "url_safe"]

#: Redaction rule sets, named after the first room version that used each one.
REDACTION_RULES_V1 = "v1"  # rooms 1-5
REDACTION_RULES_V6 = "v6"  # rooms 6-7: m.room.aliases loses its special case (MSC2432)
REDACTION_RULES_V8 = "v8"  # room 8: join_rules keeps ``allow`` (MSC3083)
REDACTION_RULES_V9 = "v9"  # rooms 9-10: member keeps ``join_authorised_via_users_server``
REDACTION_RULES_V11 = "v11"  # rooms 11-12: MSC2176, MSC3821, MSC3989 (v12 unchanged)


@attr.s(auto_attribs=True, frozen=True, slots=True)
class RoomVersion:
    """The rules of one room version that checking an event's signatures and hashes needs.

    Attributes:
        identifier: the room version string, e.g. ``"10"``.
        enforce_key_validity: whether a key's ``valid_until_ts`` must cover the event's
            ``origin_server_ts`` (room v5 and later; v1-v4 ignore ``valid_until_ts``).
        event_id_domain_signature_required: whether the server named in the event id
            (``$opaque:domain``) must also have signed (room v1 and v2 only; later versions
            derive event ids from hashes).
        restricted_join_authorisation: whether a join carrying
            ``join_authorised_via_users_server`` must be signed by that user's server
            (restricted rooms, v8 and later).
        redaction_rules: the name of the redaction rule set, one of the
            ``REDACTION_RULES_*`` constants.
        event_id_format: None where event ids are chosen by the sending server (v1,
            v2); otherwise how the event id is written from the event's reference hash
            (``"standard"`` base64 in v3, ``"url_safe"`` from v4). In these versions an
            event's own ``event_id`` is no part of what was hashed and signed.
        strict_canonical_json: whether an event with a float, or an integer outside
            ±(2^53-1), anywhere in it is invalid (v6 and later).
        room_id_is_create_event_hash: whether a room's id is its create event's
            reference hash with ``!`` (v12): the create event itself has no room id.
    """

    identifier: str
    enforce_key_validity: bool
    event_id_domain_signature_required: bool
    restricted_join_authorisation: bool
    redaction_rules: str
    event_id_format: Optional[EventIdFormat] = None
    strict_canonical_json: bool = False
    room_id_is_create_event_hash: bool = False


def _version(identifier: str, redaction_rules: str) -> RoomVersion:
    number = int(identifier)
    event_id_format: Optional[EventIdFormat] = None
    if number == 3:
        event_id_format = "standard"
    elif number >= 4:
        event_id_format = "url_safe"
    return RoomVersion(
        identifier=identifier,
        enforce_key_validity=number >= 5,
        event_id_domain_signature_required=number <= 2,
        restricted_join_authorisation=number >= 8,
        redaction_rules=redaction_rules,
        event_id_format=event_id_format,
        strict_canonical_json=number >= 6,
        room_id_is_create_event_hash=number >= 12,
    )


#: Every known room version by identifier.
ROOM_VERSIONS: dict[str, RoomVersion] = {
    v.identifier: v
    for v in (
        _version("1", REDACTION_RULES_V1),
        _version("2", REDACTION_RULES_V1),
        _version("3", REDACTION_RULES_V1),
        _version("4", REDACTION_RULES_V1),
        _version("5", REDACTION_RULES_V1),
        _version("6", REDACTION_RULES_V6),
        _version("7", REDACTION_RULES_V6),
        _version("8", REDACTION_RULES_V8),
        _version("9", REDACTION_RULES_V9),
        _version("10", REDACTION_RULES_V9),
        _version("11", REDACTION_RULES_V11),
        # MSC4289/MSC4291/MSC4297 change auth rules, room ids and state resolution only.
        _version("12", REDACTION_RULES_V11),
    )
}


def get_room_version(identifier: "str | RoomVersion") -> RoomVersion:
    """Look up a room version by its identifier.

    Args:
        identifier: the room version string, e.g. ``"9"`` (only the stable versions
            ``"1"`` to ``"12"``; unstable ones such as ``"org.matrix.hydra.11"`` are
            unknown), or a :class:`RoomVersion`, returned as it is.

    Returns:
        The :class:`RoomVersion`.

    Raises:
        ValueError: the version is unknown; the message lists the known ones.
    """
    if isinstance(identifier, RoomVersion):
        return identifier
    try:
        return ROOM_VERSIONS[identifier]
    except (KeyError, TypeError):
        raise ValueError(
            "unknown room version %r (known: %s)" % (identifier, ", ".join(ROOM_VERSIONS))
        ) from None
