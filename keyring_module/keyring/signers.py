"""An event's required signers as a sorted tuple, cheaply for the common event.

:func:`~keyring_module.verify.required_signers` states the rules and is what decides;
:func:`signer_tuple` gives the same answer, sorted, as the tuple a batch item keeps.
Most events need their sender's server alone (room v3+, not a member event with a
``third_party_invite`` or ``join_authorised_via_users_server``), and most senders come
again and again: for those the answer is one dictionary lookup on the sender, and every
event from the same sender shares one tuple (no set, no sort, no new object per event).
Anything else goes through the general rules.

Example:
    >>> from keyring_module.roomversions import ROOM_VERSIONS
    >>> event = {"sender": "@a:a.org", "type": "m.room.message", "content": {}}
    >>> signer_tuple(event, ROOM_VERSIONS["10"])
    ('a.org',)
    >>> signer_tuple(event, ROOM_VERSIONS["10"]) is signer_tuple(dict(event), ROOM_VERSIONS["10"])
    True
    >>> signer_tuple({**event, "event_id": "$e:b.org"}, ROOM_VERSIONS["1"])
    ('a.org', 'b.org')
"""

from collections.abc import Mapping
from typing import Any

from keyring_module.roomversions import RoomVersion
from keyring_module.verify import required_signers

#: How many senders :func:`signer_tuple` remembers; past this the memo starts afresh,
#: so a flood of one-off senders costs a general check each, never unbounded memory.
MAX_REMEMBERED_SENDERS = 16_384

#: Longer senders are answered but not remembered (the spec caps user ids at 255
#: bytes), so the memo holds a few MB at most whatever the events say.
MAX_REMEMBERED_SENDER_LENGTH = 255

#: Content keys that can change a member event's signers (see ``required_signers``).
_MEMBER_SIGNER_KEYS = ("third_party_invite", "join_authorised_via_users_server")

# sender -> (its server,), for senders whose identifier is valid.
_by_sender: dict[str, tuple[str]] = {}


def signer_tuple(event: Mapping[str, Any], room_version: RoomVersion) -> tuple[str, ...]:
    """``tuple(sorted(required_signers(event, room_version)))``, fast for the common case.

    Args:
        event: the event (a JSON object).
        room_version: its room's version.

    Returns:
        The servers that must have signed, sorted; events from the same sender that
        need it alone share one tuple.

    Raises:
        ValueError: a needed identifier is missing or has no valid server name (as
            :func:`~keyring_module.verify.required_signers`).
    """
    if not room_version.event_id_domain_signature_required and _sender_alone(event):
        sender = event.get("sender")
        if type(sender) is str:
            found = _by_sender.get(sender)
            if found is not None:
                return found
            signers = required_signers(event, room_version)  # validates the sender
            (server,) = signers
            found = (server,)
            if len(sender) <= MAX_REMEMBERED_SENDER_LENGTH:
                if len(_by_sender) >= MAX_REMEMBERED_SENDERS:
                    _by_sender.clear()
                _by_sender[sender] = found
            return found
    return tuple(sorted(required_signers(event, room_version)))


def _sender_alone(event: Mapping[str, Any]) -> bool:
    """Whether the event needs no signer but its sender's server, in a room version
    whose event ids name no server: anything but a member event whose content could
    name another signer (or waive the sender's)."""
    if event.get("type") != "m.room.member":
        return True
    content = event.get("content")
    if type(content) is not dict:
        return False  # the general rules decide
    return _MEMBER_SIGNER_KEYS[0] not in content and _MEMBER_SIGNER_KEYS[1] not in content
