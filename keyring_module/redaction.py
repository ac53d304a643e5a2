"""The Matrix redaction algorithm, per room version.

Event signatures cover the *redacted* form of an event, so checking a signature starts
by redacting: keep only the top-level keys and the per-type ``content`` keys that the
room version protects, and drop everything else (including ``unsigned``).

Example:
    >>> redact_event(
    ...     {"type": "m.room.member", "sender": "@a:x", "content": {
    ...         "membership": "join", "displayname": "A"}, "unsigned": {"age": 1}},
    ...     "10",
    ... )
    {'type': 'm.room.member', 'sender': '@a:x', 'content': {'membership': 'join'}}

Room v12 redacts exactly as v11 (the spec lists "Redactions" under "Unchanged from
v11"). Its ``m.room.create`` events have no ``room_id`` (MSC4291): a protected key the
event lacks stays absent, so the create event keeps its whole ``content`` (including
``additional_creators``, MSC4289) and gains nothing:

    >>> redact_event({"type": "m.room.create", "origin": "x", "content": {
    ...     "room_version": "12", "additional_creators": ["@b:y"]}}, "12")
    {'type': 'm.room.create', 'content': {'room_version': '12', 'additional_creators': ['@b:y']}}

The result is a new top-level dict with a new ``content`` dict; other nested values
(``signatures``, ``hashes``, a kept ``users`` map, ...) are shared with the input, so
treat both as read-only.
"""

from typing import Any, Mapping

import attr

from keyring_module.roomversions import (
    REDACTION_RULES_V1,
    REDACTION_RULES_V6,
    REDACTION_RULES_V8,
    REDACTION_RULES_V9,
    REDACTION_RULES_V11,
    RoomVersion,
    get_room_version,
)

_TOP_LEVEL_KEYS_V1 = frozenset(
    {
        "event_id",
        "type",
        "room_id",
        "sender",
        "state_key",
        "content",
        "hashes",
        "signatures",
        "depth",
        "prev_events",
        "prev_state",
        "auth_events",
        "origin",
        "origin_server_ts",
        "membership",
    }
)
# MSC2176 / MSC3989: room v11 stops protecting origin, membership and prev_state.
_TOP_LEVEL_KEYS_V11 = _TOP_LEVEL_KEYS_V1 - {"origin", "membership", "prev_state"}

_POWER_LEVELS_KEYS = frozenset(
    {
        "ban",
        "events",
        "events_default",
        "kick",
        "redact",
        "state_default",
        "users",
        "users_default",
    }
)

_CONTENT_KEYS_V1: Mapping[str, frozenset[str]] = {
    "m.room.member": frozenset({"membership"}),
    "m.room.create": frozenset({"creator"}),
    "m.room.join_rules": frozenset({"join_rule"}),
    "m.room.power_levels": _POWER_LEVELS_KEYS,
    "m.room.aliases": frozenset({"aliases"}),
    "m.room.history_visibility": frozenset({"history_visibility"}),
}
# MSC2432: m.room.aliases has no special meaning from room v6.
_CONTENT_KEYS_V6 = {k: v for k, v in _CONTENT_KEYS_V1.items() if k != "m.room.aliases"}
# MSC3083 (restricted rooms): join_rules keeps ``allow``.
_CONTENT_KEYS_V8 = {**_CONTENT_KEYS_V6, "m.room.join_rules": frozenset({"join_rule", "allow"})}
# MSC3375: the member event keeps the authorising user, missed in v8.
_CONTENT_KEYS_V9 = {
    **_CONTENT_KEYS_V8,
    "m.room.member": frozenset({"membership", "join_authorised_via_users_server"}),
}
# MSC2176: create keeps everything (handled by ``keep_all_content``), power levels keep
# ``invite``, redaction events keep ``redacts`` (now in content, MSC2174). Room v12 uses
# these rules unchanged.
_CONTENT_KEYS_V11 = {
    **{k: v for k, v in _CONTENT_KEYS_V9.items() if k != "m.room.create"},
    "m.room.power_levels": _POWER_LEVELS_KEYS | {"invite"},
    "m.room.redaction": frozenset({"redacts"}),
}


@attr.s(auto_attribs=True, frozen=True, slots=True)
class RedactionRules:
    """One redaction rule set.

    Attributes:
        name: the rule set's name (``REDACTION_RULES_*``).
        top_level_keys: the top-level event keys that survive redaction.
        content_keys: per event type, the ``content`` keys that survive.
        keep_all_content: event types whose whole ``content`` survives.
        member_third_party_invite_signed: whether ``m.room.member`` keeps
            ``third_party_invite``, reduced to its ``signed`` key (MSC3821).
    """

    name: str
    top_level_keys: frozenset[str]
    content_keys: Mapping[str, frozenset[str]]
    keep_all_content: frozenset[str] = frozenset()
    member_third_party_invite_signed: bool = False


#: Every redaction rule set by name.
REDACTION_RULES: dict[str, RedactionRules] = {
    r.name: r
    for r in (
        RedactionRules(REDACTION_RULES_V1, _TOP_LEVEL_KEYS_V1, _CONTENT_KEYS_V1),
        RedactionRules(REDACTION_RULES_V6, _TOP_LEVEL_KEYS_V1, _CONTENT_KEYS_V6),
        RedactionRules(REDACTION_RULES_V8, _TOP_LEVEL_KEYS_V1, _CONTENT_KEYS_V8),
        RedactionRules(REDACTION_RULES_V9, _TOP_LEVEL_KEYS_V1, _CONTENT_KEYS_V9),
        RedactionRules(
            REDACTION_RULES_V11,
            _TOP_LEVEL_KEYS_V11,
            _CONTENT_KEYS_V11,
            keep_all_content=frozenset({"m.room.create"}),
            member_third_party_invite_signed=True,
        ),
    )
}


def redact_event(event: Mapping[str, Any], room_version: "str | RoomVersion") -> dict[str, Any]:
    """Apply the redaction algorithm of ``room_version`` to an event.

    ``unsigned`` and every key the version does not protect are dropped. ``content`` is
    always present in the result (``{}`` if the event had none or it was not an object).

    Args:
        event: the event as received (federation format).
        room_version: the room version, ``"1"`` to ``"12"``, or its :class:`RoomVersion`.

    Returns:
        The redacted event, a new dict (nested values are shared with ``event``).

    Raises:
        ValueError: the room version is unknown.

    Example:
        >>> redact_event({"type": "m.room.create", "content": {"creator": "@a:x",
        ...     "room_version": "11"}, "origin": "x"}, "11")
        {'type': 'm.room.create', 'content': {'creator': '@a:x', 'room_version': '11'}}
    """
    rules = REDACTION_RULES[get_room_version(room_version).redaction_rules]
    return redact_with_rules(event, rules)


def redact_with_rules(event: Mapping[str, Any], rules: RedactionRules) -> dict[str, Any]:
    """Redact ``event`` with an explicit :class:`RedactionRules` (see :func:`redact_event`).

    Args:
        event: the event as received.
        rules: the rule set to apply.

    Returns:
        The redacted event.
    """
    top_level_keys = rules.top_level_keys
    redacted = {k: v for k, v in event.items() if k in top_level_keys}
    redacted["content"] = _redact_content(event.get("type"), event.get("content"), rules)
    return redacted


def _redact_content(event_type: object, content: object, rules: RedactionRules) -> dict[str, Any]:
    if type(content) is not dict and not isinstance(content, Mapping):
        return {}  # (decoded JSON is plain dicts: the ABC check above is the slow path)
    if not isinstance(event_type, str):
        return {}
    if event_type in rules.keep_all_content:
        return dict(content)
    keep = rules.content_keys.get(event_type)
    new_content: dict[str, Any] = (
        {k: v for k, v in content.items() if k in keep} if keep is not None else {}
    )
    if rules.member_third_party_invite_signed and event_type == "m.room.member":
        third_party_invite = content.get("third_party_invite")
        if isinstance(third_party_invite, Mapping):
            # MSC3821: the key survives, holding only ``signed`` (if it had one).
            kept: dict[str, Any] = {}
            if "signed" in third_party_invite:
                kept["signed"] = third_party_invite["signed"]
            new_content["third_party_invite"] = kept
    return new_content
