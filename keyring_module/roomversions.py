"""The room versions this package knows, and the few rules that vary between them.

Only the rules that matter for checking event signatures are modelled: which redaction
algorithm to apply before verifying, whether ``valid_until_ts`` is enforced, and which
servers besides the sender's must have signed.

Room version 12 (Matrix 1.16: MSC4289 privileged room creators, MSC4291 room ids as
hashes of the create event, MSC4297 state resolution v2.1) changes none of these: the spec
lists its redaction algorithm under "Unchanged from v11", keys are checked against
``valid_until_ts`` as from v5, and "Events must be signed by the server denoted by the
``sender`` property" (plus a restricted join's authorising server, as from v8). Its
``m.room.create`` events carry no ``room_id`` (the room id is the create event's id with
``!`` for ``$``), which needs no special case: redaction keeps ``room_id`` only where the
event has one, and nothing here reads a server name from a room id.

Example:
    >>> ROOM_VERSIONS["10"].enforce_key_validity
    True
    >>> ROOM_VERSIONS["1"].event_id_domain_signature_required
    True
    >>> ROOM_VERSIONS["12"].redaction_rules == ROOM_VERSIONS["11"].redaction_rules
    True
    >>> get_room_version("99")
    Traceback (most recent call last):
        ...
    ValueError: unknown room version '99' (known: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12)
"""

import attr

#: Redaction rule sets, named after the first room version that used each one.
REDACTION_RULES_V1 = "v1"  # rooms 1-5
REDACTION_RULES_V6 = "v6"  # rooms 6-7: m.room.aliases loses its special case (MSC2432)
REDACTION_RULES_V8 = "v8"  # room 8: join_rules keeps ``allow`` (MSC3083)
REDACTION_RULES_V9 = "v9"  # rooms 9-10: member keeps ``join_authorised_via_users_server``
REDACTION_RULES_V11 = "v11"  # rooms 11-12: MSC2176, MSC3821, MSC3989 (v12 unchanged)


@attr.s(auto_attribs=True, frozen=True, slots=True)
class RoomVersion:
    """The signature-relevant rules of one room version.

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
    """

    identifier: str
    enforce_key_validity: bool
    event_id_domain_signature_required: bool
    restricted_join_authorisation: bool
    redaction_rules: str


def _version(identifier: str, redaction_rules: str) -> RoomVersion:
    number = int(identifier)
    return RoomVersion(
        identifier=identifier,
        enforce_key_validity=number >= 5,
        event_id_domain_signature_required=number <= 2,
        restricted_join_authorisation=number >= 8,
        redaction_rules=redaction_rules,
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
