"""Pure signature checks for the requester side: which servers must sign, which of their
keys count, and verifying signed JSON with keys we already hold. No I/O here.

The rules (spec "Checking for a signature" and our DESIGN decisions):

* Only ``ed25519:`` key ids are considered; other algorithms are skipped.
* A signature whose key we do not hold, or hold but may not use (expired, beyond its
  validity, compromised), is skipped.
* At least one signature must be made by a usable key, and **every** such signature
  must verify: one bad signature fails the object even if another one is good.

Events also get the spec's hash checks (rules in :mod:`keyring_module.eventhashes`):
canonical-JSON values in room v6+ (before the signatures), the ids derived from the
reference hash (after them: the reference hash is the hash of the bytes the signatures
cover), then the content hash, whose mismatch gives the redacted copy to use.

Example:
    >>> from signedjson.key import generate_signing_key
    >>> from signedjson.sign import sign_json
    >>> from keyring_module.model import StoredKey
    >>> sk = generate_signing_key("a")
    >>> key = StoredKey("x.org", "ed25519:a", sk.verify_key.encode(), 10**13, None, 0, "origin", "r")
    >>> obj = sign_json({"hello": "world"}, "x.org", sk)
    >>> verify_signed_json_with_keys(obj, "x.org", {"ed25519:a": key}, 0, 0)
"""

from collections.abc import Collection, Mapping
from typing import Any, Literal, Optional, TypeGuard

from canonicaljson import encode_canonical_json
from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError

from keyring_module.canonical_json import encode_plain
from keyring_module.encoding import decode_base64_either_alphabet
from keyring_module.errors import KeyVerificationError, VerificationFailure
from keyring_module.eventhashes import (
    ValueScan,
    content_hash_matches,
    encode_hash,
    hashes_problem,
    is_create_event,
    reference_hash_of,
    scan_event_values,
    signed_form,
)
from keyring_module.keyids import is_ed25519_key_id
from keyring_module.model import StoredKey
from keyring_module.quoting import quote_untrusted
from keyring_module.redaction import REDACTION_RULES, redact_with_rules
from keyring_module.roomversions import RoomVersion
from keyring_module.servername import is_valid_server_name
from keyring_module.timestamps import format_ts

#: Keys are never considered valid further ahead than this (spec: "the lesser of
#: valid_until_ts and 7 days into the future").
MAX_KEY_VALIDITY_MS = 7 * 24 * 60 * 60 * 1000

#: The only signing algorithm Matrix defines.
ED25519_PREFIX = "ed25519:"

#: Why a key is being used: signing an event, or authenticating a request (X-Matrix).
KeyPurpose = Literal["event", "request"]

#: Bytes of an ed25519 signature.
SIGNATURE_LENGTH = 64

_VERIFY_KEY_LENGTH = 32
_UNSIGNED_KEYS = ("signatures", "unsigned")

#: What :func:`check_signature`'s failures say in :class:`KeyVerificationError`.
_SIGNATURE_FAILURE_DETAILS = {
    VerificationFailure.MALFORMED_SIGNATURE: "malformed signature",
    VerificationFailure.BAD_SIGNATURE: "invalid signature",
    VerificationFailure.INVALID_VERIFY_KEY: "invalid verify key",
}

# Speed notes: this module is the keyring's hot path (one call per event), so
#
# * objects are tested with ``type(x) is dict`` first: decoded JSON is made of plain
#   dicts, and ``isinstance(x, Mapping)`` (kept as the fallback for other mappings,
#   e.g. frozen events) costs several times more;
# * server names are validated once per distinct name (memoised in servername.py);
# * an event is redacted and encoded once however many servers must sign it, and only
#   after one of them has a usable key;
# * a signature goes straight to libsodium's ``crypto_sign_open`` (PyNaCl's binding,
#   what ``VerifyKey.verify`` calls after its own checks), with the key's length
#   checked here: no key object per key, a few us less per signature;
# * the canonical-JSON value rules are one walk with an explicit stack, which also
#   tells whether the event is plain JSON: its canonical form is then written by orjson
#   (keyring_module.canonical_json, ~3 us for 1 KB instead of 7-9 us); the reference
#   hash reuses the bytes the signatures cover; only the content hash encodes the
#   event once more (together about a tenth of a signature check: ``bench.verify``).


def required_signers(event: Mapping[str, Any], room_version: RoomVersion) -> set[str]:
    """The servers whose signatures an event needs (spec: "Validating hashes and
    signatures on received events").

    * The sender's server, except for an invite created from a third-party invite: the
      server that sends such an invite is the invitee's, not the inviter's, so the
      sender's server never signed it. What vouches for it instead is the identity
      server's signature in ``content.third_party_invite.signed``, which the auth rules
      check against the ``m.room.third_party_invite`` event; no extra *server* signer
      is needed here.
    * Room v1/v2: also the server named in the event id (``$opaque:domain``).
    * Restricted joins (v8+): a member event carrying
      ``join_authorised_via_users_server`` (a join, as a rule; the auth rules name no
      membership) must also be signed by that user's server.

    Args:
        event: the event (redacted or not; only protected keys are read).
        room_version: the room's version.

    Returns:
        The set of server names that must have signed.

    Raises:
        ValueError: a needed identifier is missing or has no valid server name.

    Example:
        >>> from keyring_module.roomversions import ROOM_VERSIONS
        >>> sorted(required_signers({"sender": "@a:a.org", "event_id": "$e:b.org",
        ...     "type": "m.room.message", "content": {}}, ROOM_VERSIONS["1"]))
        ['a.org', 'b.org']
    """
    content = event.get("content")
    if not _is_object(content):
        content = {}
    membership = content.get("membership") if event.get("type") == "m.room.member" else None

    signers: set[str] = set()
    if not (membership == "invite" and "third_party_invite" in content):
        signers.add(_server_of("sender", event.get("sender"), "@"))
    if room_version.event_id_domain_signature_required:
        signers.add(_server_of("event_id", event.get("event_id"), "$"))
    if (
        room_version.restricted_join_authorisation
        and event.get("type") == "m.room.member"
        and "join_authorised_via_users_server" in content
    ):
        # The auth rules (v8+: "If content has a join_authorised_via_users_server
        # key") name no membership, so any member event carrying it needs that
        # signature (Synapse asks it of joins only). Present means it names a user,
        # whatever its value: null is no way out.
        authoriser = content["join_authorised_via_users_server"]
        signers.add(_server_of("join_authorised_via_users_server", authoriser, "@"))
    return signers


def _server_of(field: str, identifier: object, sigil: str) -> str:
    if not isinstance(identifier, str) or not identifier.startswith(sigil):
        raise ValueError("%s: expected an identifier starting with %r" % (field, sigil))
    server_name = identifier.partition(":")[2]
    if not is_valid_server_name(server_name):
        raise ValueError("%s: %s has no valid server name" % (field, quote_untrusted(identifier)))
    return server_name


def capped_valid_until_ts(valid_until_ts: int, now_ms: int) -> int:
    """A key's effective ``valid_until_ts``: the lesser of it and now + 7 days."""
    return min(valid_until_ts, now_ms + MAX_KEY_VALIDITY_MS)


def usable_key(
    key: StoredKey,
    valid_at_ts: int,
    now_ms: int,
    *,
    purpose: KeyPurpose,
    enforce_validity: bool,
    compromised: frozenset[bytes] = frozenset(),
) -> bool:
    """Whether ``key`` may be used to check a signature made at ``valid_at_ts``.

    Rules (all boundaries inclusive):

    * A key whose decoded bytes are in ``compromised`` is never usable.
    * ``"request"``: only current keys (``expired_ts`` is None) valid now,
      ``min(valid_until_ts, now + 7d) >= now``; ``valid_at_ts`` is not used.
    * ``"event"``, old key (``expired_ts`` set): usable iff ``expired_ts >= valid_at_ts``.
    * ``"event"``, current key: with ``enforce_validity`` (room v5+) iff
      ``min(valid_until_ts, now + 7d) >= valid_at_ts``; otherwise (v1-v4) always.

    Args:
        key: the stored key.
        valid_at_ts: when the signature claims to be made (an event's
            ``origin_server_ts``).
        now_ms: the current time.
        purpose: ``"event"`` or ``"request"``.
        enforce_validity: whether the room version enforces ``valid_until_ts``.
        compromised: decoded bytes of keys never to trust (the config's
            ``key_trust.compromised_keys``).

    Returns:
        True if the key may be used.

    Example:
        >>> k = StoredKey("x", "ed25519:a", b"k" * 32, 1000, None, 0, "origin", "r")
        >>> usable_key(k, 1000, 0, purpose="event", enforce_validity=True)
        True
        >>> usable_key(k, 1001, 0, purpose="event", enforce_validity=True)
        False
    """
    if compromised and key.verify_key_bytes in compromised:
        return False
    if purpose == "request":
        if key.expired_ts is not None:
            return False
        return capped_valid_until_ts(key.valid_until_ts, now_ms) >= now_ms
    if key.expired_ts is not None:
        return key.expired_ts >= valid_at_ts
    if not enforce_validity:
        return True
    return capped_valid_until_ts(key.valid_until_ts, now_ms) >= valid_at_ts


def unusable_key_reason(
    key_id: str,
    key: Optional[StoredKey],
    valid_at_ts: int,
    now_ms: int,
    *,
    purpose: KeyPurpose,
    enforce_validity: bool,
    compromised: frozenset[bytes] = frozenset(),
) -> Optional[str]:
    """Why :func:`usable_key` refuses a key (None when it is usable), for error details.

    Example:
        >>> k = StoredKey("x", "ed25519:a", b"k" * 32, 1000, None, 0, "origin", "r")
        >>> unusable_key_reason("ed25519:a", k, 1001, 0, purpose="event", enforce_validity=True)
        'ed25519:a valid until 1970-01-01T00:00:01Z, before the event (1970-01-01T00:00:01Z)'
        >>> unusable_key_reason("ed25519:b", None, 0, 0, purpose="event", enforce_validity=True)
        'ed25519:b not known'
    """
    if key is None:
        return "%s not known" % (key_id,)
    if usable_key(
        key,
        valid_at_ts,
        now_ms,
        purpose=purpose,
        enforce_validity=enforce_validity,
        compromised=compromised,
    ):
        return None
    if compromised and key.verify_key_bytes in compromised:
        return "%s is a compromised key" % (key_id,)
    if key.expired_ts is not None:
        if purpose == "request":
            return "%s is an old key (expired at %s)" % (key_id, format_ts(key.expired_ts))
        return "%s expired at %s, before the event (%s)" % (
            key_id,
            format_ts(key.expired_ts),
            format_ts(valid_at_ts),
        )
    valid_until_ts = capped_valid_until_ts(key.valid_until_ts, now_ms)
    capped = " (capped at now + 7 days)" if valid_until_ts < key.valid_until_ts else ""
    if purpose == "request":
        return "%s expired at %s" % (key_id, format_ts(valid_until_ts))
    return "%s valid until %s%s, before the event (%s)" % (
        key_id,
        format_ts(valid_until_ts),
        capped,
        format_ts(valid_at_ts),
    )


def signing_key_ids(json_object: Mapping[str, Any], server_name: str) -> set[str]:
    """The ``ed25519:`` key ids ``server_name`` signed ``json_object`` with.

    The keyring asks its store (and then fetchers) for these keys when a check failed.

    Args:
        json_object: the signed object.
        server_name: the signer.

    Returns:
        The key ids (empty if there are no signatures or they are malformed). Ids that
        break the key id grammar (:mod:`keyring_module.keyids`) are left out: no key
        can have them, so they are never asked for.

    Example:
        >>> sorted(signing_key_ids({"signatures": {"x": {"ed25519:a": "s",
        ...     "rsa:b": "s", "ed25519:c\\n": "s"}}}, "x"))
        ['ed25519:a']
    """
    signatures = json_object.get("signatures")
    if not _is_object(signatures):
        return set()
    server_signatures = signatures.get(server_name)
    if not _is_object(server_signatures):
        return set()
    return {k for k in server_signatures if is_ed25519_key_id(k)}


def verify_signed_json_with_keys(
    json_object: Mapping[str, Any],
    server_name: str,
    keys: Mapping[str, StoredKey],
    valid_at_ts: int,
    now_ms: int,
    *,
    purpose: KeyPurpose = "event",
    enforce_validity: bool = True,
    compromised: frozenset[bytes] = frozenset(),
) -> None:
    """Check ``server_name``'s signatures on ``json_object`` with keys we hold.

    Args:
        json_object: the signed object (for events: already redacted).
        server_name: the signer whose signatures are checked.
        keys: ``server_name``'s keys by key id.
        valid_at_ts: when the signature was made (see :func:`usable_key`).
        now_ms: the current time.
        purpose: ``"event"`` or ``"request"``.
        enforce_validity: whether ``valid_until_ts`` is enforced (room v5+).
        compromised: decoded bytes of keys never to trust.

    Raises:
        KeyVerificationError: with its :class:`~keyring_module.errors.VerificationFailure`:
            ``NO_SIGNATURES`` or ``NOT_SIGNED`` (no signatures from ``server_name``),
            ``NO_USABLE_KEY`` (none by a key we may use), ``MALFORMED_SIGNATURE``,
            ``BAD_SIGNATURE`` or ``INVALID_VERIFY_KEY`` (a signature by a usable key
            does not verify), ``NOT_CANONICAL_JSON``.
    """
    to_check = _usable_signatures(
        _server_signatures(json_object, server_name),
        server_name,
        keys,
        valid_at_ts,
        now_ms,
        purpose,
        enforce_validity,
        compromised,
    )
    _verify_signatures(signable_bytes(json_object, server_name), to_check, server_name)


def verify_event_signatures(
    event: Mapping[str, Any],
    room_version: RoomVersion,
    keys_by_server: Mapping[str, Mapping[str, StoredKey]],
    now_ms: int,
    *,
    compromised: frozenset[bytes] = frozenset(),
) -> Optional[dict[str, Any]]:
    """Check an event as the spec's "Validating hashes and signatures on received
    events" says: the canonical-JSON value rules of room v6+ and the shape of its
    ``hashes``, every signature it needs (see :func:`required_signers`) at the
    event's ``origin_server_ts``, its reference hash where ids are hashes, then its
    content hash.

    Signers are worked out from the event as given: pass the full event where you
    have it (a v8 join redacted before it reached us has lost its authorising user).
    A third-party-invite invite in room v3+ has no required server signer; the auth
    rules check it.

    Args:
        event: the event as received.
        room_version: its room's version.
        keys_by_server: keys we hold, by server then key id.
        now_ms: the current time.
        compromised: decoded bytes of keys never to trust.

    Returns:
        None if the event is accepted as it is; the redacted copy to use instead if
        its content hash differs (or is not base64).

    Raises:
        KeyVerificationError: ``MALFORMED_EVENT`` (bad ``origin_server_ts`` or signer
            identifiers), or as :func:`verify_event_signers`.
    """
    origin_server_ts = event.get("origin_server_ts")
    if not isinstance(origin_server_ts, int) or isinstance(origin_server_ts, bool):
        raise KeyVerificationError(
            "", (), VerificationFailure.MALFORMED_EVENT, "event has no integer origin_server_ts"
        )
    try:
        signers = required_signers(event, room_version)
    except ValueError as e:
        raise KeyVerificationError(
            "", (), VerificationFailure.MALFORMED_EVENT, "cannot tell who must sign: %s" % (e,)
        )
    return verify_event_signers(
        event, room_version, signers, keys_by_server, now_ms, compromised=compromised
    )


def verify_event_signers(
    event: Mapping[str, Any],
    room_version: RoomVersion,
    signers: Collection[str],
    keys_by_server: Mapping[str, Mapping[str, StoredKey]],
    now_ms: int,
    *,
    compromised: frozenset[bytes] = frozenset(),
) -> Optional[dict[str, Any]]:
    """:func:`verify_event_signatures` for a caller that has already checked the event's
    ``origin_server_ts`` and worked out its signers with :func:`required_signers`
    (the keyring does, to look their keys up first).

    The order: the canonical-JSON value rules (room v6+, one walk over the event
    but its ``unsigned``), the shape of ``hashes`` (an object with a string
    ``sha256``), the signatures, the event id (and a v12 create event's room id) against the
    reference hash, which is the hash of the bytes the signatures cover, and last the
    content hash (see :mod:`keyring_module.eventhashes`).

    Args:
        event: the event as received, with an integer ``origin_server_ts``.
        room_version: its room's version.
        signers: ``required_signers(event, room_version)``.
        keys_by_server: keys we hold, by server then key id.
        now_ms: the current time.
        compromised: decoded bytes of keys never to trust.

    Returns:
        None if accepted; the redacted copy if the content hash differs.

    Raises:
        KeyVerificationError: a required signature is missing or does not verify (the
            reasons of :func:`verify_signed_json_with_keys`); ``NOT_CANONICAL_JSON``
            (a float or an unsafe integer in room v6+, or a value canonical JSON cannot
            encode); ``EVENT_ID_MISMATCH`` or ``ROOM_ID_MISMATCH``.
    """
    # One walk: the value rules, and whether the event is plain JSON (its canonical
    # form is then written by the fast encoder, see keyring_module.canonical_json).
    scan = scan_event_values(event)
    if room_version.strict_canonical_json and scan is ValueScan.NON_CANONICAL:
        raise KeyVerificationError(
            "",
            (),
            VerificationFailure.NOT_CANONICAL_JSON,
            "a float or an integer outside +-(2^53-1) in the event",
        )
    problem = hashes_problem(event)
    if problem is not None:
        raise KeyVerificationError("", (), VerificationFailure.MALFORMED_EVENT, problem)
    signed = signed_form(event, room_version)
    plain = scan is ValueScan.PLAIN
    origin_server_ts: int = event["origin_server_ts"]
    message: Optional[bytes] = None

    def check_signers(names: Collection[str]) -> bytes:
        nonlocal message
        for server_name in sorted(names):
            to_check = _usable_signatures(
                _server_signatures(signed, server_name),
                server_name,
                keys_by_server.get(server_name, _NO_KEYS),
                origin_server_ts,
                now_ms,
                "event",
                room_version.enforce_key_validity,
                compromised,
            )
            if message is None:  # redact and encode once, for every signer
                message = _redacted_bytes(signed, room_version, plain)
            _verify_signatures(message, to_check, server_name)
        return message if message is not None else _redacted_bytes(signed, room_version, plain)

    covered = check_signers(signers)
    if room_version.event_id_format is not None:
        _check_derived_ids(event, room_version, covered)
    try:
        if content_hash_matches(signed, plain):
            return None
    except ValueError as e:
        raise KeyVerificationError("", (), VerificationFailure.NOT_CANONICAL_JSON, str(e))
    redacted = redact_with_rules(event, REDACTION_RULES[room_version.redaction_rules])
    # The redacted copy is what the caller will use, so it must carry every signature
    # it needs itself: redaction can remove what spared a signer (an invite's
    # ``third_party_invite`` spares the sender's server, and redaction drops it).
    try:
        needed = required_signers(redacted, room_version)
    except ValueError as e:
        raise KeyVerificationError(
            "",
            (),
            VerificationFailure.MALFORMED_EVENT,
            "cannot tell who must sign the redacted copy: %s" % (e,),
        )
    check_signers(needed - set(signers))
    return redacted


def _redacted_bytes(
    signed: Mapping[str, Any], room_version: RoomVersion, plain: bool = False
) -> bytes:
    """The bytes an event's signatures cover (and its reference hash hashes); ``plain``:
    the event is plain JSON (:data:`~keyring_module.eventhashes.ValueScan.PLAIN`)."""
    redacted = redact_with_rules(signed, REDACTION_RULES[room_version.redaction_rules])
    redacted.pop("signatures", None)
    return _encode(redacted, "", plain)


def _check_derived_ids(event: Mapping[str, Any], room_version: RoomVersion, message: bytes) -> None:
    """Compare the ids an event carries that derive from its reference hash."""
    check_event_id = "event_id" in event
    check_room_id = (
        room_version.room_id_is_create_event_hash and "room_id" in event and is_create_event(event)
    )
    if not (check_event_id or check_room_id):
        return
    assert room_version.event_id_format is not None
    expected = encode_hash(reference_hash_of(message), room_version.event_id_format)
    event_id = event.get("event_id")
    room_id = event.get("room_id")
    if check_event_id and event_id != "$" + expected:
        raise KeyVerificationError(
            "",
            (),
            VerificationFailure.EVENT_ID_MISMATCH,
            "event_id %s is not the event's reference hash $%s"
            % (quote_untrusted(event_id), expected),
        )
    if check_room_id and room_id != "!" + expected:
        raise KeyVerificationError(
            "",
            (),
            VerificationFailure.ROOM_ID_MISMATCH,
            "create event's room_id %s is not its reference hash !%s"
            % (quote_untrusted(room_id), expected),
        )


def signable_bytes(json_object: Mapping[str, Any], server_name: str = "") -> bytes:
    """The canonical JSON a signature covers: the object without ``signatures`` and
    ``unsigned``.

    Raises:
        KeyVerificationError: ``NOT_CANONICAL_JSON``: the object cannot be encoded as
            canonical JSON.
    """
    stripped = {k: v for k, v in json_object.items() if k not in _UNSIGNED_KEYS}
    return _encode(stripped, server_name)


def decode_signature(signature: object) -> Optional[bytes]:
    """The bytes of an ed25519 signature written in base64, or None if it is not one.

    Strict: every character must be of the standard or the URL-safe base64 alphabet
    (signedjson reads both), padding is optional but must then be right, and the result
    must be :data:`SIGNATURE_LENGTH` bytes. Nothing is skipped, as lenient decoders
    skip characters outside the alphabet: a signature we accept is one every strict
    reader accepts too.

    Example:
        >>> len(decode_signature("A" * 86)), len(decode_signature("-_" * 43))
        (64, 64)
        >>> decode_signature("A" * 10 + "!\\n* " + "A" * 76), decode_signature("A" * 84)
        (None, None)
    """
    raw = decode_base64_either_alphabet(signature)
    return raw if raw is not None and len(raw) == SIGNATURE_LENGTH else None


def check_signature(
    message: bytes, verify_key_bytes: bytes, signature: object
) -> Optional[VerificationFailure]:
    """Whether ``signature`` by an ed25519 key verifies ``message``.

    The one signature check of the package: events, signed JSON and requests (here),
    and key answers (:mod:`keyring_module.validation`).

    Args:
        message: the signed bytes (canonical JSON without ``signatures`` and
            ``unsigned``).
        verify_key_bytes: the 32 bytes of the public key.
        signature: the value found in ``signatures``: base64 (see
            :func:`decode_signature`), or anything else a peer sent.

    Returns:
        None if it verifies; otherwise why not: ``MALFORMED_SIGNATURE`` (not base64 of
        64 bytes), ``BAD_SIGNATURE`` or ``INVALID_VERIFY_KEY`` (the key bytes are no
        ed25519 key).

    Example:
        >>> import base64
        >>> from nacl.signing import SigningKey
        >>> key = SigningKey(b"k" * 32)
        >>> signature = base64.b64encode(key.sign(b"hi").signature).decode()
        >>> check_signature(b"hi", key.verify_key.encode(), signature) is None
        True
        >>> check_signature(b"ho", key.verify_key.encode(), signature).value
        'bad_signature'
    """
    raw_signature = decode_signature(signature)
    if raw_signature is None:
        return VerificationFailure.MALFORMED_SIGNATURE
    if not isinstance(verify_key_bytes, bytes) or len(verify_key_bytes) != _VERIFY_KEY_LENGTH:
        return VerificationFailure.INVALID_VERIFY_KEY  # (libsodium reads 32 bytes from it)
    try:
        crypto_sign_open(raw_signature + message, verify_key_bytes)
    except BadSignatureError:
        return VerificationFailure.BAD_SIGNATURE
    except (ValueError, TypeError):  # PyNaCl's errors subclass these
        return VerificationFailure.INVALID_VERIFY_KEY
    return None


# -- internals: the per-signature path is kept tight (see "Speed notes" at the top).

_NO_KEYS: Mapping[str, StoredKey] = {}


def _is_object(value: object) -> TypeGuard[Mapping[str, Any]]:
    return type(value) is dict or isinstance(value, Mapping)


def _server_signatures(json_object: Mapping[str, Any], server_name: str) -> Mapping[str, Any]:
    signatures = json_object.get("signatures")
    if not _is_object(signatures):
        raise KeyVerificationError(
            server_name, (), VerificationFailure.NO_SIGNATURES, "object has no signatures"
        )
    server_signatures = signatures.get(server_name)
    if not _is_object(server_signatures):
        raise KeyVerificationError(
            server_name, (), VerificationFailure.NOT_SIGNED, "not signed by %s" % (server_name,)
        )
    return server_signatures


def _usable_signatures(
    server_signatures: Mapping[str, Any],
    server_name: str,
    keys: Mapping[str, StoredKey],
    valid_at_ts: int,
    now_ms: int,
    purpose: KeyPurpose,
    enforce_validity: bool,
    compromised: frozenset[bytes],
) -> list[tuple[str, bytes, object]]:
    """``(key_id, verify_key_bytes, signature)`` for each signature made by a usable key.

    Raises:
        KeyVerificationError: ``NO_USABLE_KEY``: there is none.
    """
    to_check = []
    for key_id, signature in server_signatures.items():
        if not (isinstance(key_id, str) and key_id.startswith(ED25519_PREFIX)):
            continue
        key = keys.get(key_id)
        if key is None or not usable_key(
            key,
            valid_at_ts,
            now_ms,
            purpose=purpose,
            enforce_validity=enforce_validity,
            compromised=compromised,
        ):
            continue
        to_check.append((key_id, key.verify_key_bytes, signature))
    if not to_check:
        raise KeyVerificationError(
            server_name,
            sorted(k for k in server_signatures if isinstance(k, str)),
            VerificationFailure.NO_USABLE_KEY,
            "no usable key for any signature (%s)"
            % _why_no_usable_key(
                server_signatures, keys, valid_at_ts, now_ms, purpose, enforce_validity, compromised
            ),
        )
    return to_check


#: How many refused keys a ``NO_USABLE_KEY`` detail names at most.
_MAX_REASONS = 3


def _why_no_usable_key(
    server_signatures: Mapping[str, Any],
    keys: Mapping[str, StoredKey],
    valid_at_ts: int,
    now_ms: int,
    purpose: KeyPurpose,
    enforce_validity: bool,
    compromised: frozenset[bytes],
) -> str:
    """Why each ``ed25519:`` signature's key is refused, e.g. ``"ed25519:a not known"``."""
    key_ids = sorted(
        k for k in server_signatures if isinstance(k, str) and k.startswith(ED25519_PREFIX)
    )
    if not key_ids:
        return "no ed25519 signature"
    reasons = [
        unusable_key_reason(
            quote_untrusted(key_id) if not is_ed25519_key_id(key_id) else key_id,
            keys.get(key_id),
            valid_at_ts,
            now_ms,
            purpose=purpose,
            enforce_validity=enforce_validity,
            compromised=compromised,
        )
        or key_id
        for key_id in key_ids[:_MAX_REASONS]
    ]
    more = len(key_ids) - _MAX_REASONS
    return "; ".join(reasons) + ("; and %d more" % more if more > 0 else "")


def _verify_signatures(
    message: bytes, to_check: list[tuple[str, bytes, object]], server_name: str
) -> None:
    """Raise :class:`KeyVerificationError` unless every signature in ``to_check``
    verifies ``message``."""
    for key_id, key_bytes, signature in to_check:
        failure = check_signature(message, key_bytes, signature)
        if failure is not None:
            raise KeyVerificationError(
                server_name, (key_id,), failure, _SIGNATURE_FAILURE_DETAILS[failure]
            )


def _encode(obj: Mapping[str, Any], server_name: str, plain: bool = False) -> bytes:
    try:
        encoded: bytes = encode_plain(obj) if plain else encode_canonical_json(obj)
    except (TypeError, ValueError, RecursionError) as e:  # RecursionError: nested too deep
        raise KeyVerificationError(
            server_name,
            (),
            VerificationFailure.NOT_CANONICAL_JSON,
            "cannot encode as canonical JSON: %s" % e,
        )
    return encoded
