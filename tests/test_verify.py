"""Tests for :mod:`keyring_module.verify`: key validity rules, signers and signatures."""

from types import MappingProxyType
from typing import Any, Optional, cast

import attr
from nacl.signing import SigningKey as NaclSigningKey
from signedjson.key import generate_signing_key
from signedjson.sign import sign_json
from signedjson.types import SigningKey
from twisted.trial.unittest import SynchronousTestCase
from unpaddedbase64 import decode_base64, encode_base64

from keyring_module.config import parse_config
from keyring_module.errors import KeyVerificationError, VerificationFailure
from keyring_module.eventhashes import create_event_room_id
from keyring_module.model import StoredKey
from keyring_module.redaction import redact_event
from keyring_module.roomversions import ROOM_VERSIONS
from keyring_module.verify import (
    MAX_KEY_VALIDITY_MS,
    decode_signature,
    required_signers,
    signing_key_ids,
    usable_key,
    verify_event_signatures,
    verify_signed_json_with_keys,
)

NOW = 1_700_000_000_000
DAY = 24 * 60 * 60 * 1000


def new_key(version: str) -> SigningKey:
    """A fresh signing key with key id ``ed25519:<version>``."""
    key: SigningKey = generate_signing_key(version)
    return key


def kid(signing_key: SigningKey) -> str:
    """The key id of ``signing_key``."""
    return "ed25519:" + signing_key.version


def stored(
    signing_key: SigningKey,
    server_name: str = "a.org",
    valid_until_ts: int = NOW + DAY,
    expired_ts: Optional[int] = None,
) -> StoredKey:
    """A :class:`StoredKey` for the public half of ``signing_key``."""
    return StoredKey(
        server_name=server_name,
        key_id=kid(signing_key),
        verify_key_bytes=signing_key.verify_key.encode(),
        valid_until_ts=valid_until_ts,
        expired_ts=expired_ts,
        fetched_ts=NOW,
        source="origin",
        response_id="r",
    )


def sign(obj: dict[str, Any], server_name: str, *keys: SigningKey) -> dict[str, Any]:
    """``obj`` signed by ``server_name`` with each of ``keys``."""
    for key in keys:
        obj = sign_json(obj, server_name, key)
    return obj


def sign_event(
    event: dict[str, Any], room_version: str, server_name: str, key: SigningKey
) -> dict[str, Any]:
    """``event`` with ``server_name``'s signature over its redacted form added; in room
    versions whose event ids are hashes, without ``event_id``, as a sender sends it."""
    if ROOM_VERSIONS[room_version].event_id_format is not None:
        event = {k: v for k, v in event.items() if k != "event_id"}
    signed_redacted = sign_json(redact_event(event, room_version), server_name, key)
    return dict(event, signatures=signed_redacted["signatures"])


def usable(
    key: StoredKey,
    valid_at_ts: int,
    purpose: Any = "event",
    enforce: bool = True,
    compromised: frozenset[bytes] = frozenset(),
) -> bool:
    """Shorthand for :func:`usable_key` at ``NOW``."""
    return usable_key(
        key, valid_at_ts, NOW, purpose=purpose, enforce_validity=enforce, compromised=compromised
    )


def compromised_keys(values: list[str]) -> tuple[bytes, ...]:
    """The denylist as the config parser decodes ``key_trust.compromised_keys``."""
    raw = {"signing_key_path": "k", "key_trust": {"compromised_keys": values}}
    return parse_config(raw, standalone=False).key_trust.compromised_keys


class UsableKeyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.signing_key = new_key("a")

    def test_valid_until_ts_boundary_is_inclusive(self) -> None:
        """A current key is usable for an event at exactly its ``valid_until_ts`` but not 1 ms later."""
        key = stored(self.signing_key, valid_until_ts=NOW + DAY)
        self.assertTrue(usable(key, NOW + DAY))
        self.assertFalse(usable(key, NOW + DAY + 1))

    def test_seven_day_cap(self) -> None:
        """A far-future ``valid_until_ts`` counts only up to now + 7 days, inclusive."""
        key = stored(self.signing_key, valid_until_ts=NOW + 365 * DAY)
        self.assertTrue(usable(key, NOW + MAX_KEY_VALIDITY_MS))
        self.assertFalse(usable(key, NOW + MAX_KEY_VALIDITY_MS + 1))
        self.assertEqual(MAX_KEY_VALIDITY_MS, 7 * DAY)

    def test_expired_ts_boundary_is_inclusive(self) -> None:
        """An old key signs events up to and including its ``expired_ts``."""
        key = stored(self.signing_key, valid_until_ts=0, expired_ts=NOW - DAY)
        self.assertTrue(usable(key, NOW - DAY))
        self.assertFalse(usable(key, NOW - DAY + 1))
        self.assertTrue(usable(key, NOW - DAY, enforce=False))
        self.assertFalse(usable(key, NOW - DAY + 1, enforce=False))

    def test_old_keys_never_authenticate_requests(self) -> None:
        """Request signatures need a current key: an old key fails even with a late ``expired_ts``."""
        key = stored(self.signing_key, valid_until_ts=NOW + DAY, expired_ts=NOW + DAY)
        self.assertFalse(usable(key, NOW, purpose="request"))
        self.assertTrue(usable(key, NOW, purpose="event"))

    def test_request_keys_must_be_valid_now(self) -> None:
        """A current key authenticates requests while ``valid_until_ts >= now`` (inclusive)."""
        self.assertTrue(usable(stored(self.signing_key, valid_until_ts=NOW), 0, "request"))
        self.assertFalse(usable(stored(self.signing_key, valid_until_ts=NOW - 1), NOW, "request"))
        far = stored(self.signing_key, valid_until_ts=NOW + 365 * DAY)
        self.assertTrue(usable(far, NOW, "request"))

    def test_rooms_v1_to_v4_ignore_valid_until_ts(self) -> None:
        """Without validity enforcement a current key long past ``valid_until_ts`` is usable."""
        key = stored(self.signing_key, valid_until_ts=1000)
        self.assertTrue(usable(key, NOW + 30 * DAY, enforce=False))
        self.assertFalse(usable(key, NOW, enforce=True))

    def test_compromised_keys_are_never_usable(self) -> None:
        """A key in the denylist is refused for events and requests alike."""
        key = stored(self.signing_key, valid_until_ts=NOW + DAY)
        denied = frozenset({key.verify_key_bytes})
        self.assertFalse(usable(key, NOW, compromised=denied))
        self.assertFalse(usable(key, NOW, purpose="request", compromised=denied))
        self.assertFalse(usable(key, NOW, enforce=False, compromised=denied))
        other = frozenset({new_key("b").verify_key.encode()})
        self.assertTrue(usable(key, NOW, compromised=other))

    def test_padded_denylist_entry_matches_unpadded_key(self) -> None:
        """A padded base64 config value still matches the key, because decoded bytes are compared."""
        raw = self.signing_key.verify_key.encode()
        padded = encode_base64(raw) + "="
        self.assertNotEqual(padded, encode_base64(raw))
        denied = frozenset(compromised_keys([padded]))
        self.assertEqual(denied, frozenset({raw}))
        self.assertFalse(usable(stored(self.signing_key), NOW, compromised=denied))

    def test_denylist_rejects_values_that_are_not_keys(self) -> None:
        """Denylist entries that are not base64 or not 32 bytes are a ValueError."""
        with self.assertRaises(ValueError):
            compromised_keys(["not base64!"])
        with self.assertRaises(ValueError):
            compromised_keys([encode_base64(b"short")])


class VerifySignedJsonTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.key_a = new_key("a")
        self.key_b = new_key("b")
        self.keys = {kid(self.key_a): stored(self.key_a), kid(self.key_b): stored(self.key_b)}

    def verify(
        self, obj: dict[str, Any], keys: Optional[dict[str, StoredKey]] = None, **kwargs: Any
    ) -> None:
        """Verify ``a.org``'s signatures on ``obj`` at ``NOW``."""
        verify_signed_json_with_keys(
            obj, "a.org", self.keys if keys is None else keys, NOW, NOW, **kwargs
        )

    def test_good_signatures_verify(self) -> None:
        """An object signed by both known keys verifies, and both signatures are checked."""
        obj = sign({"x": 1}, "a.org", self.key_a, self.key_b)
        self.verify(obj)
        # Each signature is checked: breaking either one fails the object.
        for broken in (self.key_a, self.key_b):
            other = self.key_b if broken is self.key_a else self.key_a
            tampered = sign({"x": 1}, "a.org", other)
            tampered["signatures"]["a.org"][kid(broken)] = sign({"x": 2}, "a.org", broken)[
                "signatures"
            ]["a.org"][kid(broken)]
            with self.assertRaises(KeyVerificationError) as cm:
                self.verify(tampered)
            self.assertEqual(cm.exception.key_ids, (kid(broken),))
            self.assertIs(cm.exception.reason, VerificationFailure.BAD_SIGNATURE)

    def test_spec_test_vector(self) -> None:
        """The spec's appendix vector (seed, entity ``domain``, ``{}``) verifies."""
        seed = decode_base64("YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1")
        raw = NaclSigningKey(seed).verify_key.encode()
        key = StoredKey("domain", "ed25519:1", raw, NOW + DAY, None, NOW, "origin", "r")
        signature = (
            "K8280/U9SSy9IVtjBuVeLr+HpOB4BQFWbg+UZaADMtTdGYI7Geitb76LTrr5QV/7Xg4ahLwYGYZzuHGZKM5ZAQ"
        )
        obj: dict[str, Any] = {"signatures": {"domain": {"ed25519:1": signature}}}
        verify_signed_json_with_keys(obj, "domain", {"ed25519:1": key}, NOW, NOW)
        obj["extra"] = 1
        with self.assertRaises(KeyVerificationError) as cm:
            verify_signed_json_with_keys(obj, "domain", {"ed25519:1": key}, NOW, NOW)
        self.assertIs(cm.exception.reason, VerificationFailure.BAD_SIGNATURE)

    def test_tampered_content_fails(self) -> None:
        """Changing a signed field after signing makes verification fail."""
        obj = sign({"x": 1}, "a.org", self.key_a)
        obj["x"] = 2
        with self.assertRaises(KeyVerificationError) as cm:
            self.verify(obj)
        self.assertEqual(cm.exception.key_ids, (kid(self.key_a),))
        self.assertIs(cm.exception.reason, VerificationFailure.BAD_SIGNATURE)

    def test_unsigned_and_other_signatures_are_not_covered(self) -> None:
        """``unsigned`` and other servers' signatures may change without breaking the signature."""
        obj = sign({"x": 1}, "a.org", self.key_a)
        obj["unsigned"] = {"age": 5}
        obj["signatures"]["notary.org"] = {"ed25519:n": "whatever"}
        self.verify(obj)
        obj["x"] = 2  # a covered field still is
        with self.assertRaisesRegex(KeyVerificationError, "invalid signature") as cm:
            self.verify(obj)
        self.assertIs(cm.exception.reason, VerificationFailure.BAD_SIGNATURE)

    def test_unknown_algorithms_and_key_ids_are_skipped(self) -> None:
        """Signatures with other algorithms or unknown key ids are ignored while a usable one verifies."""
        obj = sign({"x": 1}, "a.org", self.key_a)
        obj["signatures"]["a.org"]["rsa:1"] = "garbage"
        obj["signatures"]["a.org"]["ed25519:unknown"] = "also garbage"
        self.verify(obj)
        # The skipped ones count for nothing: without the usable one it fails.
        del obj["signatures"]["a.org"][kid(self.key_a)]
        with self.assertRaisesRegex(KeyVerificationError, "no usable key") as cm:
            self.verify(obj)
        self.assertIs(cm.exception.reason, VerificationFailure.NO_USABLE_KEY)

    def test_zero_usable_keys_fails(self) -> None:
        """If no signature is by a usable key, verification fails and names the key ids seen."""
        obj = sign({"x": 1}, "a.org", new_key("zzz"))
        obj["signatures"]["a.org"]["rsa:1"] = "x"
        with self.assertRaises(KeyVerificationError) as cm:
            self.verify(obj)
        self.assertIs(cm.exception.reason, VerificationFailure.NO_USABLE_KEY)
        self.assertIn("no usable key", cm.exception.detail)
        self.assertEqual(cm.exception.server_name, "a.org")
        self.assertEqual(set(cm.exception.key_ids), {"ed25519:zzz", "rsa:1"})

    def test_error_text_shows_hostile_key_ids_escaped_and_capped(self) -> None:
        """The error's text shows key ids from the signatures escaped (no newline, no
        lone surrogate, no megabyte) and at most five of them; key_ids keeps them all."""
        obj = sign({"x": 1}, "a.org", new_key("zzz"))
        hostile = ["ed25519:a\nforged log line", "ed25519:A\ud800", "ed25519:B" + "x" * 100_000]
        many = ["ed25519:k%04d" % i for i in range(1000)]
        for key_id in hostile + many:
            obj["signatures"]["a.org"][key_id] = "x"
        with self.assertRaises(KeyVerificationError) as cm:
            self.verify(obj)
        self.assertEqual(len(cm.exception.key_ids), 1004)
        text = str(cm.exception)
        self.assertTrue(text.isascii() and text.isprintable(), text)
        self.assertLess(len(text), 500)
        self.assertIn("'ed25519:a\\nforged log line'", text)
        self.assertIn("'ed25519:A\\ud800'", text)
        self.assertIn("'ed25519:Bxxx", text)
        self.assertIn(" and 999 more)", text)

    def test_only_unusable_known_keys_fails(self) -> None:
        """A signature by a known but expired key counts as unusable, leaving zero usable keys."""
        keys = {kid(self.key_a): stored(self.key_a, valid_until_ts=NOW - 1)}
        obj = sign({"x": 1}, "a.org", self.key_a)
        with self.assertRaisesRegex(KeyVerificationError, "no usable key") as cm:
            self.verify(obj, keys)
        self.assertIs(cm.exception.reason, VerificationFailure.NO_USABLE_KEY)
        self.verify(obj, keys, enforce_validity=False)

    def test_compromised_key_cannot_verify(self) -> None:
        """A correct signature by a denylisted key does not count."""
        obj = sign({"x": 1}, "a.org", self.key_a)
        denied = frozenset({self.key_a.verify_key.encode()})
        with self.assertRaisesRegex(KeyVerificationError, "no usable key") as cm:
            self.verify(obj, compromised=denied)
        self.assertIs(cm.exception.reason, VerificationFailure.NO_USABLE_KEY)

    def test_one_bad_signature_by_a_known_key_fails_the_object(self) -> None:
        """Every signature by a usable key must verify, even if another one is good."""
        obj = sign({"x": 1}, "a.org", self.key_a)
        wrong = sign({"y": 1}, "a.org", self.key_b)["signatures"]["a.org"][kid(self.key_b)]
        obj["signatures"]["a.org"][kid(self.key_b)] = wrong
        with self.assertRaises(KeyVerificationError) as cm:
            self.verify(obj)
        self.assertEqual(cm.exception.key_ids, (kid(self.key_b),))
        self.assertIs(cm.exception.reason, VerificationFailure.BAD_SIGNATURE)
        self.assertIn("invalid signature", cm.exception.detail)

    def test_malformed_signatures_fail(self) -> None:
        """A signature by a usable key that is not base64, not 64 bytes or not a string fails."""
        for bad in ("!!not base64!!", encode_base64(b"x" * 63), 12345, encode_base64(b"x" * 65)):
            obj = sign({"x": 1}, "a.org", self.key_b)
            obj["signatures"]["a.org"][kid(self.key_a)] = bad
            with self.assertRaisesRegex(KeyVerificationError, "malformed signature") as cm:
                self.verify(obj)
            self.assertIs(cm.exception.reason, VerificationFailure.MALFORMED_SIGNATURE)

    def test_characters_outside_base64_are_not_skipped(self) -> None:
        """A valid signature with other characters inserted is malformed, not read as the
        signature without them."""
        for junk in ("!\n* ", " ", "\u00e9"):
            obj = sign({"x": 1}, "a.org", self.key_a)
            signature = obj["signatures"]["a.org"][kid(self.key_a)]
            obj["signatures"]["a.org"][kid(self.key_a)] = signature[:10] + junk + signature[10:]
            with self.assertRaisesRegex(KeyVerificationError, "malformed signature") as cm:
                self.verify(obj)
            self.assertIs(cm.exception.reason, VerificationFailure.MALFORMED_SIGNATURE)

    def test_url_safe_signature_is_accepted(self) -> None:
        """A signature in URL-safe base64 verifies, as signedjson (and key answer
        validation) read it."""
        for x in range(100):  # a signature holding "+" or "/", which URL-safe base64 changes
            obj = sign({"x": x}, "a.org", self.key_a)
            signature = obj["signatures"]["a.org"][kid(self.key_a)]
            url_safe = signature.replace("+", "-").replace("/", "_")
            if url_safe != signature:
                break
        obj["signatures"]["a.org"][kid(self.key_a)] = url_safe
        self.verify(obj)
        self.assertEqual(decode_signature(url_safe), decode_signature(signature))

    def test_padded_signature_is_accepted(self) -> None:
        """Decoders accept correctly padded base64 too (spec: SHOULD), but not excess padding."""
        obj = sign({"x": 1}, "a.org", self.key_a)
        obj["signatures"]["a.org"][kid(self.key_a)] += "=="
        self.verify(obj)
        obj["signatures"]["a.org"][kid(self.key_a)] += "=="
        with self.assertRaisesRegex(KeyVerificationError, "malformed signature") as cm:
            self.verify(obj)
        self.assertIs(cm.exception.reason, VerificationFailure.MALFORMED_SIGNATURE)

    def test_missing_or_malformed_signatures_fail(self) -> None:
        """No ``signatures`` fails as NO_SIGNATURES; no entry for the server, or a non-object
        entry, as NOT_SIGNED."""
        for obj, reason in (
            ({"x": 1}, VerificationFailure.NO_SIGNATURES),
            ({"x": 1, "signatures": "nope"}, VerificationFailure.NO_SIGNATURES),
            ({"x": 1, "signatures": {"b.org": {}}}, VerificationFailure.NOT_SIGNED),
            ({"x": 1, "signatures": {"a.org": ["ed25519:a"]}}, VerificationFailure.NOT_SIGNED),
        ):
            with self.assertRaises(KeyVerificationError) as cm:
                self.verify(obj)
            self.assertIs(cm.exception.reason, reason, obj)

    def test_unusable_stored_verify_key_fails(self) -> None:
        """A held key whose bytes are no ed25519 key fails as INVALID_VERIFY_KEY, naming it."""
        obj = sign({"x": 1}, "a.org", self.key_a)
        broken = attr.evolve(stored(self.key_a), verify_key_bytes=b"short")
        with self.assertRaisesRegex(KeyVerificationError, "invalid verify key") as cm:
            self.verify(obj, {kid(self.key_a): broken})
        self.assertIs(cm.exception.reason, VerificationFailure.INVALID_VERIFY_KEY)
        self.assertEqual(cm.exception.key_ids, (kid(self.key_a),))

    def test_verify_key_of_any_other_length_is_refused(self) -> None:
        """libsodium reads 32 bytes of the key whatever it is given: a key one byte short,
        or the real key with a byte more (which libsodium alone would accept), fails as
        INVALID_VERIFY_KEY, as do key bytes that are not bytes."""
        obj = sign({"x": 1}, "a.org", self.key_a)
        real = self.key_a.verify_key.encode()
        self.verify(obj, {kid(self.key_a): stored(self.key_a)})  # the real key verifies
        for bad in (real[:31], real + b"x", bytearray(real), b""):
            broken = attr.evolve(stored(self.key_a), verify_key_bytes=cast(bytes, bad))
            with self.assertRaises(KeyVerificationError) as cm:
                self.verify(obj, {kid(self.key_a): broken})
            self.assertIs(cm.exception.reason, VerificationFailure.INVALID_VERIFY_KEY, bad)

    def test_object_that_is_not_canonical_json_fails(self) -> None:
        """A signed object holding a value canonical JSON cannot encode fails as
        NOT_CANONICAL_JSON rather than raising something else."""
        obj = sign({"x": 1}, "a.org", self.key_a)
        too_deep: Any = []
        for _ in range(100_000):
            too_deep = [too_deep]
        for bad in (float("nan"), object(), too_deep):
            with self.assertRaisesRegex(KeyVerificationError, "canonical JSON") as cm:
                self.verify(dict(obj, x=bad))
            self.assertIs(cm.exception.reason, VerificationFailure.NOT_CANONICAL_JSON)

    def test_request_purpose_refuses_old_keys(self) -> None:
        """For request authentication an old key's signature is skipped, leaving none usable."""
        keys = {kid(self.key_a): stored(self.key_a, expired_ts=NOW + DAY)}
        obj = sign({"method": "GET"}, "a.org", self.key_a)
        self.verify(obj, keys)
        with self.assertRaisesRegex(KeyVerificationError, "no usable key") as cm:
            self.verify(obj, keys, purpose="request")
        self.assertIs(cm.exception.reason, VerificationFailure.NO_USABLE_KEY)

    def test_signing_key_ids_lists_ed25519_ids(self) -> None:
        """``signing_key_ids`` reports the signer's ed25519 key ids, and nothing for other servers."""
        obj = sign({"x": 1}, "a.org", self.key_a, self.key_b)
        obj["signatures"]["a.org"]["rsa:1"] = "x"
        self.assertEqual(signing_key_ids(obj, "a.org"), {"ed25519:a", "ed25519:b"})
        self.assertEqual(signing_key_ids(obj, "b.org"), set())
        self.assertEqual(signing_key_ids({"signatures": 3}, "a.org"), set())


def _event(**overrides: Any) -> dict[str, Any]:
    """A message event from ``@alice:a.org`` with v1-style event id on ``e.org``."""
    event: dict[str, Any] = {
        "type": "m.room.message",
        "sender": "@alice:a.org",
        "event_id": "$abc:e.org",
        "room_id": "!r:a.org",
        "content": {"body": "hi"},
        "origin_server_ts": NOW,
        # The shape the spec asks for; these tests are about signatures, not the hash.
        "hashes": {"sha256": "not the content hash"},
    }
    event.update(overrides)
    return event


class RequiredSignersTests(SynchronousTestCase):
    def test_v1_and_v2_need_the_event_id_domain(self) -> None:
        """Rooms v1/v2 need the sender's and the event id's servers."""
        for version in ("1", "2"):
            self.assertEqual(required_signers(_event(), ROOM_VERSIONS[version]), {"a.org", "e.org"})

    def test_v3_and_later_need_only_the_sender(self) -> None:
        """From room v3 event ids carry no domain, so only the sender's server signs."""
        for version in [str(n) for n in range(3, 12)]:
            event = _event(event_id="$hashbasedid")
            self.assertEqual(required_signers(event, ROOM_VERSIONS[version]), {"a.org"})

    def test_server_name_with_port(self) -> None:
        """The server part of a user id keeps its port."""
        event = _event(sender="@bob:b.org:8448")
        self.assertEqual(required_signers(event, ROOM_VERSIONS["10"]), {"b.org:8448"})

    def test_restricted_join_needs_the_authorising_server_from_v8(self) -> None:
        """A v8+ join with ``join_authorised_via_users_server`` also needs that user's server."""
        content = {"membership": "join", "join_authorised_via_users_server": "@mod:c.org"}
        event = _event(type="m.room.member", state_key="@alice:a.org", content=content)
        for version in ("8", "9", "10", "11"):
            self.assertEqual(required_signers(event, ROOM_VERSIONS[version]), {"a.org", "c.org"})
        self.assertEqual(required_signers(event, ROOM_VERSIONS["7"]), {"a.org"})

    def test_authorising_user_matters_on_member_events(self) -> None:
        """The auth rules ask the authorising server's signature of any member event
        carrying ``join_authorised_via_users_server`` (v8+), a leave too; on a
        non-member event it adds no signer."""
        content = {"membership": "leave", "join_authorised_via_users_server": "@mod:c.org"}
        leave = _event(type="m.room.member", content=content)
        self.assertEqual(required_signers(leave, ROOM_VERSIONS["10"]), {"a.org", "c.org"})
        self.assertEqual(required_signers(leave, ROOM_VERSIONS["7"]), {"a.org"})
        message = _event(
            content={"membership": "join", "join_authorised_via_users_server": "@m:c.org"}
        )
        self.assertEqual(required_signers(message, ROOM_VERSIONS["10"]), {"a.org"})

    def test_third_party_invite_needs_no_sender_signature(self) -> None:
        """An invite made from a third-party invite is sent by the invitee's server, so the sender's server is not required."""
        content = {"membership": "invite", "third_party_invite": {"signed": {"token": "t"}}}
        invite = _event(type="m.room.member", state_key="@carol:c.org", content=content)
        self.assertEqual(required_signers(invite, ROOM_VERSIONS["10"]), set())
        self.assertEqual(required_signers(invite, ROOM_VERSIONS["1"]), {"e.org"})
        plain = _event(type="m.room.member", content={"membership": "invite"})
        self.assertEqual(required_signers(plain, ROOM_VERSIONS["10"]), {"a.org"})

    def test_malformed_identifiers_raise(self) -> None:
        """A sender, event id or authorising user without a valid server name is a ValueError."""
        with self.assertRaises(ValueError):
            required_signers(_event(sender="alice"), ROOM_VERSIONS["10"])
        with self.assertRaises(ValueError):
            required_signers(_event(sender="@alice:"), ROOM_VERSIONS["10"])
        with self.assertRaises(ValueError):
            required_signers(_event(event_id="$nodomain"), ROOM_VERSIONS["1"])
        for authoriser in (5, None, ""):
            content = {"membership": "join", "join_authorised_via_users_server": authoriser}
            with self.assertRaises(ValueError):
                required_signers(_event(type="m.room.member", content=content), ROOM_VERSIONS["9"])


class VerifyEventSignaturesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.key_a = new_key("a")
        self.key_e = new_key("e")
        self.keys = {
            "a.org": {kid(self.key_a): stored(self.key_a, "a.org", valid_until_ts=NOW)},
            "e.org": {kid(self.key_e): stored(self.key_e, "e.org", valid_until_ts=NOW)},
        }

    def test_signature_covers_the_redacted_event(self) -> None:
        """An event verifies after its unprotected content is redacted, and fails if a protected key changes."""
        event = sign_event(_event(event_id="$h"), "10", "a.org", self.key_a)
        verify_event_signatures(event, ROOM_VERSIONS["10"], self.keys, NOW)
        verify_event_signatures(
            dict(event, content={}, unsigned={"x": 1}), ROOM_VERSIONS["10"], self.keys, NOW
        )
        with self.assertRaises(KeyVerificationError) as cm:
            verify_event_signatures(dict(event, depth=3), ROOM_VERSIONS["10"], self.keys, NOW)
        self.assertIs(cm.exception.reason, VerificationFailure.BAD_SIGNATURE)

    def test_v1_event_needs_the_event_id_server_signature(self) -> None:
        """A v1 event signed only by the sender fails until the event id's server signs too."""
        event = sign_event(_event(), "1", "a.org", self.key_a)
        with self.assertRaises(KeyVerificationError) as cm:
            verify_event_signatures(event, ROOM_VERSIONS["1"], self.keys, NOW)
        self.assertEqual(cm.exception.server_name, "e.org")
        self.assertIs(cm.exception.reason, VerificationFailure.NOT_SIGNED)
        both = sign_event(event, "1", "e.org", self.key_e)
        verify_event_signatures(both, ROOM_VERSIONS["1"], self.keys, NOW)

    def test_validity_is_judged_at_origin_server_ts(self) -> None:
        """A v5+ event after the key's ``valid_until_ts`` fails, while v4 ignores the validity."""
        late = NOW + 1
        for version, ok in (("4", True), ("5", False), ("11", False)):
            event = sign_event(
                _event(event_id="$h", origin_server_ts=late), version, "a.org", self.key_a
            )
            if ok:
                verify_event_signatures(event, ROOM_VERSIONS[version], self.keys, NOW)
            else:
                with self.assertRaisesRegex(KeyVerificationError, "no usable key") as cm:
                    verify_event_signatures(event, ROOM_VERSIONS[version], self.keys, NOW)
                self.assertIs(cm.exception.reason, VerificationFailure.NO_USABLE_KEY)

    def test_bad_origin_server_ts_or_sender_fail(self) -> None:
        """An event without an integer ``origin_server_ts`` or a valid sender fails verification."""
        event = sign_event(_event(event_id="$h"), "10", "a.org", self.key_a)
        for bad in (
            dict(event, origin_server_ts="1"),
            dict(event, origin_server_ts=True),
            dict(event, sender="x"),
        ):
            with self.assertRaises(KeyVerificationError) as cm:
                verify_event_signatures(bad, ROOM_VERSIONS["10"], self.keys, NOW)
            self.assertIs(cm.exception.reason, VerificationFailure.MALFORMED_EVENT)


class TwoServersTestCase(SynchronousTestCase):
    """Keys held for two servers, ``a.org`` (``key_a``) and ``c.org`` (``key_c``)."""

    def setUp(self) -> None:
        self.key_a = new_key("a")
        self.key_c = new_key("c")
        self.keys = {
            "a.org": {kid(self.key_a): stored(self.key_a, "a.org")},
            "c.org": {kid(self.key_c): stored(self.key_c, "c.org")},
        }


class TrickyEventTests(TwoServersTestCase):
    """The events whose signers or signatures are easy to get wrong (formerly checked
    against the keyring's own fast path, which is gone: the keyring now calls
    :func:`verify_event_signatures` only)."""

    def verify(self, event: Any, version: str = "11") -> None:
        verify_event_signatures(event, ROOM_VERSIONS[version], self.keys, NOW)

    def test_third_party_invite_without_signatures_verifies(self) -> None:
        """A third-party-invite invite in room v3+ needs no server signature, so an unsigned one passes."""
        content = {"membership": "invite", "third_party_invite": {"signed": {}}}
        invite = _event(type="m.room.member", state_key="@carol:x.org", content=content)
        del invite["event_id"]  # a v11 PDU has none
        self.verify(invite)
        with self.assertRaisesRegex(KeyVerificationError, "no signatures") as cm:
            self.verify(dict(invite, event_id="$h:a.org"), "1")  # v1: the event id's server signs
        self.assertIs(cm.exception.reason, VerificationFailure.NO_SIGNATURES)

    def test_restricted_join_needs_both_signatures(self) -> None:
        """A v8+ join via another user's server fails with only the sender's signature and passes with both."""
        content = {"membership": "join", "join_authorised_via_users_server": "@mod:c.org"}
        join = _event(
            event_id="$h", type="m.room.member", state_key="@alice:a.org", content=content
        )
        join = sign_event(join, "11", "a.org", self.key_a)
        with self.assertRaises(KeyVerificationError) as cm:
            self.verify(join)
        self.assertEqual(cm.exception.server_name, "c.org")
        self.assertIs(cm.exception.reason, VerificationFailure.NOT_SIGNED)
        both = dict(join, signatures=dict(join["signatures"]))
        both["signatures"].update(sign_event(join, "11", "c.org", self.key_c)["signatures"])
        self.verify(both)

    def test_signature_by_an_unknown_key_is_skipped(self) -> None:
        """A second signature by a key we do not hold is ignored when a known key's signature verifies."""
        event = sign_event(_event(event_id="$h"), "11", "a.org", self.key_a)
        other = sign_event(event, "11", "a.org", new_key("unknown"))
        event["signatures"] = {
            "a.org": {**event["signatures"]["a.org"], **other["signatures"]["a.org"]}
        }
        self.assertEqual(len(event["signatures"]["a.org"]), 2)
        self.verify(event)

    def test_one_bad_signature_by_a_known_key_fails(self) -> None:
        """A bad signature by a usable key fails the event even when another usable key's signature is good."""
        key_b = new_key("b")
        self.keys["a.org"][kid(key_b)] = stored(key_b, "a.org")
        event = sign_event(_event(event_id="$h"), "11", "a.org", self.key_a)
        event["signatures"]["a.org"][kid(key_b)] = encode_base64(b"\0" * 64)
        with self.assertRaisesRegex(KeyVerificationError, "invalid signature") as cm:
            self.verify(event)
        self.assertIs(cm.exception.reason, VerificationFailure.BAD_SIGNATURE)

    def test_read_only_mappings_verify_like_dicts(self) -> None:
        """Events and contents that are other mappings than dicts (e.g. frozen events) are read the same way."""
        content = {"membership": "join", "join_authorised_via_users_server": "@mod:c.org"}
        join = _event(
            event_id="$h", type="m.room.member", state_key="@alice:a.org", content=content
        )
        join = sign_event(join, "11", "a.org", self.key_a)
        frozen = MappingProxyType(dict(join, content=MappingProxyType(content)))
        self.assertEqual(required_signers(frozen, ROOM_VERSIONS["11"]), {"a.org", "c.org"})
        with self.assertRaises(KeyVerificationError) as cm:
            self.verify(frozen)
        self.assertEqual(cm.exception.server_name, "c.org")
        message = MappingProxyType(sign_event(_event(event_id="$h"), "11", "a.org", self.key_a))
        self.verify(message)

    def test_bad_timestamps_and_senders_fail(self) -> None:
        """A boolean or text ``origin_server_ts``, or a sender with no valid server name, fails."""
        event = sign_event(_event(event_id="$h"), "11", "a.org", self.key_a)
        for bad, detail in (
            (dict(event, origin_server_ts=True), "no integer origin_server_ts"),
            (dict(event, origin_server_ts="1"), "no integer origin_server_ts"),
            (dict(event, sender="@bad"), "cannot tell who must sign"),
            (dict(event, sender="@a:" + "a" * 300), "cannot tell who must sign"),
        ):
            with self.assertRaisesRegex(KeyVerificationError, detail) as cm:
                self.verify(bad)
            self.assertIs(cm.exception.reason, VerificationFailure.MALFORMED_EVENT)

    def test_server_name_checks_are_stable_when_repeated(self) -> None:
        """Asking about the same (memoised) server names again gives the same answers."""
        for _ in range(2):
            self.assertEqual(
                required_signers(_event(sender="@b:b.org:8448"), ROOM_VERSIONS["10"]),
                {"b.org:8448"},
            )
            for sender in ("@b:b..org", "@b:b.org:0", "@b:" + "b" * 256):
                with self.assertRaises(ValueError):
                    required_signers(_event(sender=sender), ROOM_VERSIONS["10"])


#: A room v12 room id (``!`` + the create event's reference hash; MSC4291).
V12_ROOM_ID = "!Nhcu5BS-UMnFX7hBVfVSoXiD7OgH6iRT-xyIuqDnpYQ"


def _v12_event(**overrides: Any) -> dict[str, Any]:
    """A room v12 message PDU from ``@alice:a.org``: no ``event_id``, a hash room id."""
    event: dict[str, Any] = {
        "type": "m.room.message",
        "sender": "@alice:a.org",
        "room_id": V12_ROOM_ID,
        "auth_events": ["$Rqnc-F-dvnEYJTyHq_iKxU2bZ1CI92-kuZq3a5lr5Zg"],
        "prev_events": ["$acR1l0raoZnm60CBwAVgqbZqoO_mYU81xysh1u7XcJk"],
        "depth": 7,
        "hashes": {"sha256": "thishashcoversallfieldsincasethisisredacted"},
        "content": {"body": "hi", "msgtype": "m.text"},
        "origin_server_ts": NOW,
    }
    event.update(overrides)
    return event


def _v12_create(**content: Any) -> dict[str, Any]:
    """A room v12 ``m.room.create`` PDU from ``@alice:a.org``: no ``room_id`` at all."""
    event = _v12_event(
        type="m.room.create",
        state_key="",
        depth=1,
        auth_events=[],
        prev_events=[],
        content={"room_version": "12", **content},
    )
    del event["room_id"]
    return event


class RoomV12SignatureTests(TwoServersTestCase):
    """Room v12 (Matrix 1.16): signed over the v11 redaction, by the sender's server and a
    restricted join's authorising server, with ``valid_until_ts`` enforced."""

    def verify(self, event: Any) -> None:
        verify_event_signatures(event, ROOM_VERSIONS["12"], self.keys, NOW)

    def assert_fails(
        self,
        event: Any,
        reason: VerificationFailure = VerificationFailure.BAD_SIGNATURE,
        regex: str = "invalid signature",
    ) -> None:
        with self.assertRaisesRegex(KeyVerificationError, regex) as cm:
            self.verify(event)
        self.assertIs(cm.exception.reason, reason)

    def test_create_event_without_room_id_verifies(self) -> None:
        """A v12 create event (no ``room_id``) signed over its redacted form verifies, also
        with unprotected additions; changing its content or adding a ``room_id`` fails."""
        create = _v12_create(additional_creators=["@bob:b.org"])
        self.assertEqual(required_signers(create, ROOM_VERSIONS["12"]), {"a.org"})
        signed = sign_event(create, "12", "a.org", self.key_a)
        self.assertNotIn("room_id", signed)
        self.verify(signed)
        self.verify(dict(signed, unsigned={"age": 5}, origin="elsewhere.org"))
        tampered_content = dict(signed["content"], additional_creators=["@mallory:m.org"])
        self.assert_fails(dict(signed, content=tampered_content))
        self.assert_fails(dict(signed, content=dict(signed["content"], extra="x")))
        # The room id is derived from the create event, never part of it: a copy may
        # carry the derived ``room_id`` (it is left out of the checks), another is refused.
        self.verify(dict(signed, room_id=create_event_room_id(signed, ROOM_VERSIONS["12"])))
        self.assert_fails(
            dict(signed, room_id=V12_ROOM_ID),
            VerificationFailure.ROOM_ID_MISMATCH,
            "is not its reference hash",
        )

    def test_message_signed_over_its_redacted_form(self) -> None:
        """A v12 message's signature covers the redacted event: its content may change
        (only the content hash covers it), its room id, timestamp or sender may not."""
        signed = sign_event(_v12_event(), "12", "a.org", self.key_a)
        self.verify(signed)
        self.verify(dict(signed, content={"body": "edited"}))
        self.assert_fails(dict(signed, room_id="!other:a.org"))
        self.assert_fails(dict(signed, depth=8))
        self.assert_fails(dict(signed, sender="@mallory:a.org"))
        self.assert_fails(dict(signed, hashes={"sha256": "c29tZXRoaW5nIGVsc2U"}))

    def test_signature_over_the_unredacted_event_fails(self) -> None:
        """Signing the full event instead of its redacted form does not verify."""
        event = _v12_event()
        wrong = dict(event, signatures=sign_json(dict(event), "a.org", self.key_a)["signatures"])
        self.assert_fails(wrong)

    def test_power_levels_protected_keys_are_covered(self) -> None:
        """Changing a v12 power level's ``users`` or ``invite`` fails; ``notifications`` is not covered."""
        content = {
            "users": {"@carol:c.org": 100},
            "invite": 50,
            "notifications": {"room": 50},
            "events_default": 0,
        }
        levels = _v12_event(type="m.room.power_levels", state_key="", content=content)
        signed = sign_event(levels, "12", "a.org", self.key_a)
        self.verify(signed)
        self.verify(dict(signed, content=dict(content, notifications={"room": 0})))
        self.assert_fails(dict(signed, content=dict(content, users={"@alice:a.org": 100})))
        self.assert_fails(dict(signed, content=dict(content, invite=0)))

    def test_restricted_join_needs_the_authorising_server(self) -> None:
        """A v12 join via ``join_authorised_via_users_server`` needs the sender's and the
        authorising server's signatures; the protected field cannot be changed after signing."""
        content = {
            "membership": "join",
            "join_authorised_via_users_server": "@mod:c.org",
            "displayname": "Alice",
        }
        join = _v12_event(type="m.room.member", state_key="@alice:a.org", content=content)
        self.assertEqual(required_signers(join, ROOM_VERSIONS["12"]), {"a.org", "c.org"})
        by_a = sign_event(join, "12", "a.org", self.key_a)
        with self.assertRaises(KeyVerificationError) as cm:
            self.verify(by_a)
        self.assertEqual(cm.exception.server_name, "c.org")
        both = sign_event(by_a, "12", "c.org", self.key_c)
        self.verify(both)
        self.verify(dict(both, content=dict(content, displayname="Mallory")))
        swapped = dict(content, join_authorised_via_users_server="@other:c.org")
        self.assert_fails(dict(both, content=swapped))

    def test_key_validity_is_enforced(self) -> None:
        """v12 enforces ``valid_until_ts`` at ``origin_server_ts``, like v5 and later."""
        self.keys["a.org"] = {kid(self.key_a): stored(self.key_a, "a.org", valid_until_ts=NOW)}
        self.verify(sign_event(_v12_event(), "12", "a.org", self.key_a))
        late = sign_event(_v12_event(origin_server_ts=NOW + 1), "12", "a.org", self.key_a)
        self.assert_fails(late, VerificationFailure.NO_USABLE_KEY, "no usable key")

    def test_no_event_id_signer(self) -> None:
        """v12 event ids are hashes: an ``event_id`` carrying a domain adds no signer."""
        event = _v12_event(event_id="$looks:like-a.domain")
        self.assertEqual(required_signers(event, ROOM_VERSIONS["12"]), {"a.org"})
