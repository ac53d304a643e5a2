"""Third-party invites: checking the identity server's signature on an invite's
``signed`` block. Pure, no I/O.

An ``m.room.member`` invite made from a third-party invite carries
``content.third_party_invite.signed = {"mxid", "token", "signatures"}``, signed by the
identity server that stored the invite. The room holds an ``m.room.third_party_invite``
state event whose state key is that ``token`` and whose content lists the identity
server's public keys (``public_key`` and ``public_keys[].public_key``, unpadded base64
in the standard or URL-safe alphabet). The auth rules of every room version (the
``third_party_invite`` branch of ``m.room.member`` invites) say: ``mxid`` must be the
member event's state key, the invite event's state key the ``token``, both events must
have the same sender, and some signature in ``signed`` must verify with some key the
invite event lists. :func:`check_third_party_invite` makes exactly those checks (the
rest of the auth rules, e.g. whether the target is banned, are the room's business),
with the package's one signature check
(:func:`~keyring_module.verify.check_signature`).

Example:
    >>> from signedjson.key import generate_signing_key
    >>> from signedjson.sign import sign_json
    >>> from unpaddedbase64 import encode_base64
    >>> identity_key = generate_signing_key("0")
    >>> signed = sign_json({"mxid": "@bob:b.org", "token": "tok"}, "id.org", identity_key)
    >>> member = {"type": "m.room.member", "state_key": "@bob:b.org",
    ...     "sender": "@alice:a.org", "content": {"membership": "invite",
    ...     "third_party_invite": {"display_name": "bob", "signed": signed}}}
    >>> invite = {"type": "m.room.third_party_invite", "state_key": "tok",
    ...     "sender": "@alice:a.org",
    ...     "content": {"public_key": encode_base64(identity_key.verify_key.encode())}}
    >>> third_party_invite_token(member)
    'tok'
    >>> check_third_party_invite(member, invite) is None
    True
    >>> check_third_party_invite(member, dict(invite, state_key="other")).reason.value
    'token_mismatch'
"""

import enum
from collections.abc import Mapping
from typing import Any, Optional, TypeGuard

import attr

from keyring_module.encoding import decode_base64_either_alphabet
from keyring_module.errors import KeyVerificationError
from keyring_module.quoting import quote_untrusted
from keyring_module.verify import ED25519_PREFIX, check_signature, signable_bytes

#: Most signature checks one invite may ask for (public keys times ``ed25519:``
#: signatures). An identity server lists a key or two and signs once; an event asking
#: for more is refused rather than hold the event loop (256 checks take about 20 ms).
MAX_SIGNATURE_CHECKS = 256

_ED25519_KEY_LENGTH = 32
_MEMBER_EVENT_TYPE = "m.room.member"
_INVITE_EVENT_TYPE = "m.room.third_party_invite"


class ThirdPartyInviteFailure(enum.Enum):
    """Why a third-party invite's ``signed`` block is refused; each ``.value`` is a
    stable label for logs and metrics.

    Example:
        >>> ThirdPartyInviteFailure.MXID_MISMATCH.value
        'mxid_mismatch'
    """

    #: The member event is no ``m.room.member`` invite with a ``third_party_invite``
    #: object.
    NOT_THIRD_PARTY_INVITE = "not_third_party_invite"
    #: ``third_party_invite.signed`` is missing, or its ``mxid`` or ``token`` is no string.
    MALFORMED_SIGNED = "malformed_signed"
    #: ``signed.mxid`` is not the member event's state key (the invited user).
    MXID_MISMATCH = "mxid_mismatch"
    #: No ``m.room.third_party_invite`` state event was given.
    NO_INVITE_EVENT = "no_invite_event"
    #: The ``m.room.third_party_invite`` event's state key is not ``signed.token``.
    TOKEN_MISMATCH = "token_mismatch"
    #: The two events have different senders.
    SENDER_MISMATCH = "sender_mismatch"
    #: The invite event lists no public key that is base64 of 32 bytes.
    NO_PUBLIC_KEYS = "no_public_keys"
    #: ``signed`` carries no ``ed25519:`` signature.
    NO_SIGNATURES = "no_signatures"
    #: ``signed`` cannot be encoded as canonical JSON, so no signature can cover it.
    NOT_CANONICAL_JSON = "not_canonical_json"
    #: Public keys times signatures exceed :data:`MAX_SIGNATURE_CHECKS`.
    TOO_MANY_CHECKS = "too_many_checks"
    #: No signature verifies with any listed key (signed by another key, ``signed``
    #: changed after signing, or signatures that are not base64 of 64 bytes).
    NO_VALID_SIGNATURE = "no_valid_signature"


@attr.s(auto_attribs=True, frozen=True, slots=True)
class ThirdPartyInviteRejection:
    """A refused third-party invite.

    Attributes:
        reason: why, for code to decide on.
        detail: a human readable explanation (untrusted values escaped and shortened).
    """

    reason: ThirdPartyInviteFailure
    detail: str


def third_party_invite_token(member_event: object) -> Optional[str]:
    """The state key of the ``m.room.third_party_invite`` event an invite refers to.

    Args:
        member_event: an event, possibly a third-party ``m.room.member`` invite.

    Returns:
        ``content.third_party_invite.signed.token``, or None if the event has none (it
        is then no well-formed third-party invite).

    Example:
        >>> third_party_invite_token({"content": {"third_party_invite":
        ...     {"signed": {"token": "abc123"}}}})
        'abc123'
        >>> third_party_invite_token({"content": {}}) is None
        True
    """
    content = member_event.get("content") if _is_object(member_event) else None
    third_party_invite = content.get("third_party_invite") if _is_object(content) else None
    signed = third_party_invite.get("signed") if _is_object(third_party_invite) else None
    token = signed.get("token") if _is_object(signed) else None
    return token if isinstance(token, str) else None


def check_third_party_invite(
    member_event: Mapping[str, Any],
    third_party_invite_event: Optional[Mapping[str, Any]],
) -> Optional[ThirdPartyInviteRejection]:
    """Check an invite's ``third_party_invite.signed`` block against the invite event.

    The checks, in the auth rules' order: ``signed`` has string ``mxid`` and
    ``token``; ``mxid`` is the member event's state key; the invite event exists and its
    state key is ``token``; the senders match; some ``ed25519:`` signature in ``signed``
    (by any server, any key id) verifies with some public key of the invite event
    (``content.public_key`` or ``content.public_keys[].public_key``). Keys that are not
    base64 of 32 bytes and signatures that are not base64 of 64 bytes are skipped. The
    key's ``key_validity_url`` is not fetched: the spec leaves that to the server the
    joining server asks, and forbids rejecting on it anywhere else.

    Never raises for bad input: anything malformed is a rejection.

    Args:
        member_event: the ``m.room.member`` invite event.
        third_party_invite_event: the room's ``m.room.third_party_invite`` state event
            whose state key is the invite's token (see :func:`third_party_invite_token`),
            or None if the room has none.

    Returns:
        None if the invite is vouched for; otherwise the rejection and its reason.

    Example:
        >>> check_third_party_invite({"type": "m.room.member",
        ...     "content": {"membership": "join"}}, None).reason.value
        'not_third_party_invite'
    """
    signed_or_rejection = _signed_block(member_event)
    if isinstance(signed_or_rejection, ThirdPartyInviteRejection):
        return signed_or_rejection
    signed = signed_or_rejection
    mxid, token = signed.get("mxid"), signed.get("token")
    if not isinstance(mxid, str) or not isinstance(token, str):
        return ThirdPartyInviteRejection(
            ThirdPartyInviteFailure.MALFORMED_SIGNED, "signed needs string mxid and token"
        )
    if mxid != member_event.get("state_key"):
        return ThirdPartyInviteRejection(
            ThirdPartyInviteFailure.MXID_MISMATCH,
            "signed mxid %s is not the invited user %s"
            % (quote_untrusted(mxid), quote_untrusted(member_event.get("state_key"))),
        )
    if not _is_object(third_party_invite_event) or (
        third_party_invite_event.get("type") != _INVITE_EVENT_TYPE
    ):
        return ThirdPartyInviteRejection(
            ThirdPartyInviteFailure.NO_INVITE_EVENT,
            "no %s event to check against" % _INVITE_EVENT_TYPE,
        )
    if third_party_invite_event.get("state_key") != token:
        return ThirdPartyInviteRejection(
            ThirdPartyInviteFailure.TOKEN_MISMATCH,
            "signed token %s is not the invite event's state key %s"
            % (quote_untrusted(token), quote_untrusted(third_party_invite_event.get("state_key"))),
        )
    sender = member_event.get("sender")
    if not isinstance(sender, str) or sender != third_party_invite_event.get("sender"):
        return ThirdPartyInviteRejection(
            ThirdPartyInviteFailure.SENDER_MISMATCH,
            "sender %s did not send the invite event (%s did)"
            % (quote_untrusted(sender), quote_untrusted(third_party_invite_event.get("sender"))),
        )
    return _check_signatures(signed, _public_keys(third_party_invite_event.get("content")))


def _signed_block(member_event: object) -> "Mapping[str, Any] | ThirdPartyInviteRejection":
    """``content.third_party_invite.signed`` of an ``m.room.member`` invite, or why not."""
    content = member_event.get("content") if _is_object(member_event) else None
    if not (
        _is_object(member_event)
        and member_event.get("type") == _MEMBER_EVENT_TYPE
        and _is_object(content)
        and content.get("membership") == "invite"
    ):
        return ThirdPartyInviteRejection(
            ThirdPartyInviteFailure.NOT_THIRD_PARTY_INVITE, "not an m.room.member invite"
        )
    third_party_invite = content.get("third_party_invite")
    if not _is_object(third_party_invite):
        return ThirdPartyInviteRejection(
            ThirdPartyInviteFailure.NOT_THIRD_PARTY_INVITE,
            "the invite has no third_party_invite object",
        )
    signed = third_party_invite.get("signed")
    if not _is_object(signed):
        return ThirdPartyInviteRejection(
            ThirdPartyInviteFailure.MALFORMED_SIGNED, "third_party_invite has no signed object"
        )
    return signed


def _public_keys(content: object) -> list[bytes]:
    """The distinct 32-byte keys an invite event's content lists, in order:
    ``public_key`` first, then ``public_keys[].public_key``."""
    if not _is_object(content):
        return []
    listed = [content.get("public_key")]
    public_keys = content.get("public_keys")
    if isinstance(public_keys, list):
        listed.extend(entry.get("public_key") for entry in public_keys if _is_object(entry))
    keys: dict[bytes, None] = {}  # distinct, in order
    for text in listed:
        raw = decode_base64_either_alphabet(text)
        if raw is not None and len(raw) == _ED25519_KEY_LENGTH:
            keys[raw] = None
    return list(keys)


def _check_signatures(
    signed: Mapping[str, Any], keys: list[bytes]
) -> Optional[ThirdPartyInviteRejection]:
    """None if some ``ed25519:`` signature in ``signed`` verifies with one of ``keys``."""
    if not keys:
        return ThirdPartyInviteRejection(
            ThirdPartyInviteFailure.NO_PUBLIC_KEYS,
            "the invite event lists no public key that is base64 of 32 bytes",
        )
    by_server = signed.get("signatures")
    signatures = [
        signature
        for server_signatures in (by_server.values() if _is_object(by_server) else ())
        if _is_object(server_signatures)
        for key_id, signature in server_signatures.items()
        if isinstance(key_id, str) and key_id.startswith(ED25519_PREFIX)
    ]
    if not signatures:
        return ThirdPartyInviteRejection(
            ThirdPartyInviteFailure.NO_SIGNATURES, "signed has no ed25519 signature"
        )
    if len(keys) * len(signatures) > MAX_SIGNATURE_CHECKS:
        return ThirdPartyInviteRejection(
            ThirdPartyInviteFailure.TOO_MANY_CHECKS,
            "%d public keys and %d signatures are more than %d checks"
            % (len(keys), len(signatures), MAX_SIGNATURE_CHECKS),
        )
    try:
        message = signable_bytes(signed)
    except KeyVerificationError as e:
        return ThirdPartyInviteRejection(ThirdPartyInviteFailure.NOT_CANONICAL_JSON, e.detail)
    for key in keys:
        for signature in signatures:
            if check_signature(message, key, signature) is None:
                return None
    return ThirdPartyInviteRejection(
        ThirdPartyInviteFailure.NO_VALID_SIGNATURE,
        "none of %d signatures verifies with any of the %d public keys listed"
        % (len(signatures), len(keys)),
    )


def _is_object(value: object) -> TypeGuard[Mapping[str, Any]]:
    return isinstance(value, Mapping)
