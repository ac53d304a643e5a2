"""Tests for checking events' hashes as the spec defines it: the content hash (redacted
outcome), the reference hash (event ids, v12 create room ids), the canonical-JSON value
rules of room v6+, and :meth:`Keyring.check_events`' three outcomes."""

import base64
from typing import Any, Optional, cast

from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey as NaclSigningKey
from signedjson.key import generate_signing_key
from signedjson.sign import sign_json
from signedjson.types import SigningKey
from twisted.trial.unittest import SynchronousTestCase
from unpaddedbase64 import decode_base64

from keyring_module.errors import KeyVerificationError, VerificationFailure
from keyring_module.eventhashes import (
    MAX_SAFE_INTEGER,
    content_hash,
    create_event_room_id,
    encode_hash,
    event_id_of,
    has_non_canonical_values,
    reference_hash,
    signed_form,
)
from keyring_module.keyring import EventCheck, EventOutcome
from keyring_module.model import StoredKey
from keyring_module.redaction import redact_event
from keyring_module.roomversions import ROOM_VERSIONS
from keyring_module.verify import verify_event_signatures
from tests.test_keyring import ORIGIN, OTHER, InlineReactor, InlineThreadPool, KeyringTestCase

NOW = 1_700_000_000_000
DAY = 24 * 60 * 60 * 1000
ALL_VERSIONS = [str(n) for n in range(1, 13)]

#: The spec's signing key seed ("Cryptographic Test Vectors"), server ``domain``.
SPEC_SEED = "YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1"

#: The spec's first event signing vector, as the signing algorithm emits it.
SPEC_MINIMAL_EVENT: dict[str, Any] = {
    "auth_events": [],
    "content": {},
    "depth": 3,
    "hashes": {"sha256": "5jM4wQpv6lnBo7CLIghJuHdW+s2CMBJPUOGOC89ncos"},
    "origin": "domain",
    "origin_server_ts": 1000000,
    "prev_events": [],
    "room_id": "!x:domain",
    "sender": "@a:domain",
    "signatures": {
        "domain": {
            "ed25519:1": "KxwGjPSDEtvnFgU00fwFz+l6d2pJM6XBIaMEn81SXPTRl16AqLAYqfIReFGZlHi5KLjAWbOoMszkwsQma+lYAg"
        }
    },
    "type": "X",
    "unsigned": {"age_ts": 1000000},
}

#: The spec's second event signing vector (redactable content, v1-style event id).
SPEC_MESSAGE_EVENT: dict[str, Any] = {
    "content": {"body": "Here is the message content"},
    "event_id": "$0:domain",
    "hashes": {"sha256": "onLKD1bGljeBWQhWZ1kaP9SorVmRQNdN5aM2JYU2n/g"},
    "origin": "domain",
    "origin_server_ts": 1000000,
    "type": "m.room.message",
    "room_id": "!r:domain",
    "sender": "@u:domain",
    "signatures": {
        "domain": {
            "ed25519:1": "Wm+VzmOUOz08Ds+0NTWb1d4CZrVsJSikkeRxh6aCcUwu6pNC78FunoD7KNWzqFn241eYHYMGCA5McEiVPdhzBA"
        }
    },
    "unsigned": {"age_ts": 1000000},
}


def hash_and_sign(
    event: dict[str, Any], version: str, server_name: str, key: SigningKey
) -> dict[str, Any]:
    """``event`` as a sender emits it (spec "Signing events"): content hash in
    ``hashes.sha256``, then a signature over the redacted event; the ids derived from
    the event (v3+ ``event_id``, v12 create ``room_id``) are kept as given but
    covered by neither."""
    room_version = ROOM_VERSIONS[version]
    event = {k: v for k, v in event.items() if k not in ("signatures", "hashes")}
    event["hashes"] = {
        "sha256": encode_hash(content_hash(signed_form(event, room_version)), "standard")
    }
    redacted = redact_event(signed_form(event, room_version), version)
    signatures = sign_json(redacted, server_name, key)["signatures"]
    return dict(event, signatures=signatures)


def sign_as_given(
    event: dict[str, Any], version: str, key: SigningKey, hashes: object
) -> dict[str, Any]:
    """``event`` with ``hashes`` as given (left out if None), signed by a.org over its
    redacted form: a sender that got its hash wrong."""
    event = {k: v for k, v in event.items() if k not in ("signatures", "hashes")}
    if hashes is not None:
        event["hashes"] = hashes
    redacted = redact_event(signed_form(event, ROOM_VERSIONS[version]), version)
    return dict(event, signatures=sign_json(redacted, "a.org", key)["signatures"])


def message(version: str, **fields: Any) -> dict[str, Any]:
    """An ``m.room.message`` from ``@alice:a.org`` (v1/v2: with an event id on a.org)."""
    event: dict[str, Any] = {
        "type": "m.room.message",
        "room_id": "!r:a.org",
        "sender": "@alice:a.org",
        "origin": "a.org",
        "origin_server_ts": NOW,
        "depth": 5,
        "prev_events": [],
        "auth_events": [],
        "content": {"msgtype": "m.text", "body": "hello"},
        "unsigned": {"age": 3},
    }
    if ROOM_VERSIONS[version].event_id_format is None:
        event["event_id"] = "$m:a.org"
    event.update(fields)
    return event


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.text(max_size=3)
    | st.floats(allow_nan=False)
    | st.integers(min_value=-(2**60), max_value=2**60)
    | st.sampled_from([MAX_SAFE_INTEGER, MAX_SAFE_INTEGER + 1, -MAX_SAFE_INTEGER - 1]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=3), children, max_size=4)
    ),
    max_leaves=12,
)


def _breaks_v6_rules(value: Any) -> bool:
    """The room v6+ value rule written plainly (recursive)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return False
    if isinstance(value, float):
        return True
    if isinstance(value, int):
        return abs(value) > MAX_SAFE_INTEGER
    if isinstance(value, dict):
        return any(_breaks_v6_rules(v) for v in value.values())
    return any(_breaks_v6_rules(v) for v in value)


class EventHashCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.key = generate_signing_key("a")
        stored = StoredKey(
            "a.org", "ed25519:a", self.key.verify_key.encode(), NOW + DAY, None, NOW, "origin", "r"
        )
        self.keys = {"a.org": {"ed25519:a": stored}}

    def check(self, event: Any, version: str) -> Optional[dict[str, Any]]:
        """verify_event_signatures' answer: None (accepted) or the redacted copy."""
        return verify_event_signatures(event, ROOM_VERSIONS[version], self.keys, NOW)

    def rejected(self, event: Any, version: str, reason: VerificationFailure) -> None:
        with self.assertRaises(KeyVerificationError) as cm:
            self.check(event, version)
        self.assertIs(cm.exception.reason, reason, str(cm.exception))

    def signed(self, version: str, **fields: Any) -> dict[str, Any]:
        return hash_and_sign(message(version, **fields), version, "a.org", self.key)


class SpecVectorTests(SynchronousTestCase):
    def setUp(self) -> None:
        raw = NaclSigningKey(decode_base64(SPEC_SEED)).verify_key.encode()
        stored = StoredKey("domain", "ed25519:1", raw, 2000000, None, 0, "origin", "r")
        self.keys = {"domain": {"ed25519:1": stored}}

    def check(self, event: dict[str, Any], version: str) -> Optional[dict[str, Any]]:
        return verify_event_signatures(event, ROOM_VERSIONS[version], self.keys, 1000000)

    def test_minimal_event_vector_is_accepted(self) -> None:
        """The spec's minimal signed event verifies with its hash in every version using the
        v1-v10 redaction of its keys (it has no event id, so not v1/v2)."""
        self.assertEqual(
            encode_hash(content_hash(SPEC_MINIMAL_EVENT), "standard"),
            SPEC_MINIMAL_EVENT["hashes"]["sha256"],
        )
        for version in [str(n) for n in range(3, 11)]:
            self.assertIsNone(self.check(SPEC_MINIMAL_EVENT, version), version)

    def test_message_vector_is_accepted_and_redacted_once_its_content_changes(self) -> None:
        """The spec's message vector is accepted in room v1; with its body changed it is
        still signed, but its content hash differs: the redacted copy comes back."""
        self.assertIsNone(self.check(SPEC_MESSAGE_EVENT, "1"))
        changed = dict(SPEC_MESSAGE_EVENT, content={"body": "Something else"})
        redacted = self.check(changed, "1")
        self.assertEqual(redacted, redact_event(changed, "1"))
        assert redacted is not None
        self.assertEqual(redacted["content"], {})

    def test_vector_with_a_wrong_event_id_is_rejected_where_ids_are_hashes(self) -> None:
        """The minimal vector given its reference hash as event id is accepted in v3 and
        v4+ (each with its own base64), and a made-up event id is rejected."""
        for version in ("3", "4", "10"):
            event_id = event_id_of(SPEC_MINIMAL_EVENT, ROOM_VERSIONS[version])
            self.assertIsNone(self.check(dict(SPEC_MINIMAL_EVENT, event_id=event_id), version))
            with self.assertRaises(KeyVerificationError) as cm:
                self.check(dict(SPEC_MINIMAL_EVENT, event_id="$0:domain"), version)
            self.assertIs(cm.exception.reason, VerificationFailure.EVENT_ID_MISMATCH)


class ContentHashTests(EventHashCase):
    def test_intact_event_is_accepted_in_every_version(self) -> None:
        """A hashed and signed event is accepted as it is in rooms v1 to v12."""
        for version in ALL_VERSIONS:
            self.assertIsNone(self.check(self.signed(version), version), version)

    def test_changed_content_is_redacted_in_every_version(self) -> None:
        """An event whose content changed after signing comes back redacted, in every
        version: the redacted copy, not the event, and not a rejection."""
        for version in ALL_VERSIONS:
            event = self.signed(version)
            changed = dict(event, content={"msgtype": "m.text", "body": "changed"})
            redacted = self.check(changed, version)
            self.assertEqual(redacted, redact_event(changed, version), version)
            assert redacted is not None
            self.assertEqual(redacted["content"], {}, version)
            self.assertNotIn("unsigned", redacted)

    def test_changed_hash_is_rejected(self) -> None:
        """``hashes`` is covered by the signatures: changing it after signing is a bad
        signature, a rejection."""
        for version in ("1", "5", "10", "12"):
            event = self.signed(version)
            other = base64.b64encode(b"\0" * 32).decode().rstrip("=")
            self.rejected(
                dict(event, hashes={"sha256": other}), version, VerificationFailure.BAD_SIGNATURE
            )

    def test_signed_wrong_or_non_base64_hash_is_redacted(self) -> None:
        """An event signed with another hash, or a hash that is not base64, fails the
        hash check: it comes back redacted."""
        other = base64.b64encode(b"\0" * 32).decode().rstrip("=")
        for version in ("1", "5", "10", "12"):
            for hashes in ({"sha256": other}, {"sha256": "not base64!"}):
                event = sign_as_given(message(version), version, self.key, hashes)
                self.assertEqual(
                    self.check(event, version), redact_event(event, version), (version, hashes)
                )

    def test_missing_or_malformed_hashes_are_rejected(self) -> None:
        """The spec's event format needs ``hashes.sha256``, a string, and redaction keeps
        ``hashes``: an event without it is no redacted copy of a valid event, so it is
        rejected as malformed (as Synapse does), signed or not."""
        for version in ("1", "5", "10", "12"):
            for hashes in (None, {}, {"sha256": 5}, {"sha256": None}, "x", ["x"]):
                event = sign_as_given(message(version), version, self.key, hashes)
                self.rejected(event, version, VerificationFailure.MALFORMED_EVENT)

    def test_padded_or_url_safe_hash_is_accepted(self) -> None:
        """The hash is compared by its decoded bytes: padding or URL-safe letters do not
        matter."""
        event = self.signed("10")
        raw = decode_base64(event["hashes"]["sha256"])
        for text in (base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()):
            signed = sign_as_given(event, "10", self.key, {"sha256": text})
            self.assertIsNone(self.check(signed, "10"))

    def test_unsigned_and_other_signatures_do_not_change_the_hash(self) -> None:
        """``unsigned`` and extra signatures are outside the content hash."""
        event = self.signed("10")
        extra = dict(event, unsigned={"age": 99, "x": "y"})
        extra["signatures"] = dict(event["signatures"], **{"b.org": {"ed25519:b": "s"}})
        self.assertIsNone(self.check(extra, "10"))

    def test_bad_signature_is_rejected_not_redacted(self) -> None:
        """A protected key changed after signing is a rejection (the signature fails
        before the hash is looked at)."""
        self.rejected(dict(self.signed("10"), depth=6), "10", VerificationFailure.BAD_SIGNATURE)

    def test_redacted_copy_needs_the_signatures_it_needs_itself(self) -> None:
        """An invite naming a ``third_party_invite`` (which spares the sender's server a
        signature) but signed by nobody, with a wrong content hash, is rejected where
        redaction drops ``third_party_invite``: its redacted copy, a plain invite, would
        need the sender's signature; where redaction keeps it (v11+) the copy is still a
        third-party invite, for the auth rules' ``signed`` check."""
        for version in ("1", "4", "10", "11", "12"):
            third_party_invites: tuple[object, ...] = ({}, 5)
            for third_party_invite in third_party_invites:
                invite = {
                    "type": "m.room.member",
                    "room_id": "!r:a.org",
                    "sender": "@alice:a.org",
                    "state_key": "@bob:b.org",
                    "origin_server_ts": NOW,
                    "depth": 1,
                    "prev_events": [],
                    "auth_events": [],
                    "content": {"membership": "invite", "third_party_invite": third_party_invite},
                    "hashes": {"sha256": "AAAA"},
                    "signatures": {},
                }
                if version == "1":
                    invite["event_id"] = "$x:a.org"
                kept = int(version) >= 11 and isinstance(third_party_invite, dict)
                if kept:
                    redacted = self.check(invite, version)
                    assert redacted is not None
                    self.assertIn("third_party_invite", redacted["content"], version)
                else:
                    self.rejected(invite, version, VerificationFailure.NOT_SIGNED)

    def test_redacted_copy_with_a_malformed_sender_is_rejected_not_raised(self) -> None:
        """An invite whose redacted copy cannot say who must sign it (a non-string
        sender) is rejected as malformed: no other error escapes."""
        invite = {
            "type": "m.room.member",
            "sender": 5,
            "state_key": "@b:b.org",
            "origin_server_ts": NOW,
            "room_id": "!r:x",
            "content": {"membership": "invite", "third_party_invite": {"signed": {}}},
            "hashes": {"sha256": "AAAA"},
            "signatures": {},
        }
        self.rejected(invite, "10", VerificationFailure.MALFORMED_EVENT)


class CanonicalValueTests(EventHashCase):
    def test_float_rejected_in_v10_judged_by_old_rules_in_v5(self) -> None:
        """A float makes a v10 event invalid, while the same event in v5 is accepted."""
        for version in ("5", "10"):
            event = self.signed(version, content={"msgtype": "m.text", "body": "x", "n": 50.5})
            if version == "5":
                self.assertIsNone(self.check(event, version))
            else:
                self.rejected(event, version, VerificationFailure.NOT_CANONICAL_JSON)

    def test_rules_start_at_v6(self) -> None:
        """Room v1-v5 accept floats and big integers, v6-v12 reject them."""
        for version in ALL_VERSIONS:
            event = self.signed(version, depth=2**60)
            if int(version) >= 6:
                self.rejected(event, version, VerificationFailure.NOT_CANONICAL_JSON)
            else:
                self.assertIsNone(self.check(event, version), version)

    def test_integer_bounds_are_inclusive(self) -> None:
        """±(2^53-1) is allowed in v6+; one beyond either end is not."""
        for value, ok in (
            (MAX_SAFE_INTEGER, True),
            (-MAX_SAFE_INTEGER, True),
            (MAX_SAFE_INTEGER + 1, False),
            (-MAX_SAFE_INTEGER - 1, False),
        ):
            event = self.signed("10", content={"body": "x", "n": [{"deep": value}]})
            if ok:
                self.assertIsNone(self.check(event, "10"))
            else:
                self.rejected(event, "10", VerificationFailure.NOT_CANONICAL_JSON)

    def test_anywhere_but_unsigned_counts(self) -> None:
        """A float anywhere in the signed part makes a v6+ event invalid; in ``unsigned``
        (outside every hash and signature, and open to any server relaying the event)
        it does not."""
        for field, value in (("content", {"n": {"deep": [1.5]}}), ("depth", 2**53)):
            self.rejected(
                self.signed("10", **{field: value}), "10", VerificationFailure.NOT_CANONICAL_JSON
            )
        for unsigned in ({"age": 1.5}, {"foo": 2**60}):
            self.assertIsNone(self.check(dict(self.signed("10"), unsigned=unsigned), "10"))

    @settings(max_examples=200, derandomize=True, deadline=None)
    @given(json_values)
    def test_walk_agrees_with_a_plain_definition(self, value: Any) -> None:
        """The walk says what a plain recursive definition of the rule says, for any JSON."""
        self.assertEqual(has_non_canonical_values(value), _breaks_v6_rules(value))

    def test_walk_covers_json_shapes(self) -> None:
        """The value walk finds floats and big integers in nested objects and lists, and
        leaves booleans, None and strings alone."""
        self.assertFalse(has_non_canonical_values({"a": [True, None, "1.5", {"b": -3}]}))
        self.assertTrue(has_non_canonical_values([[[{"x": [0.0]}]]]))
        self.assertTrue(has_non_canonical_values({"x": (1, 2**53)}))
        deep: Any = 1.5
        for _ in range(10_000):
            deep = [deep]
        self.assertTrue(has_non_canonical_values(deep))  # no recursion limit

    def test_nan_is_rejected_in_old_versions(self) -> None:
        """Under the old rules a value canonical JSON cannot encode (NaN) is rejected,
        not crashed on."""
        event = dict(self.signed("5"), content={"body": "x", "n": float("nan")})
        self.rejected(event, "5", VerificationFailure.NOT_CANONICAL_JSON)


class ReferenceHashTests(EventHashCase):
    def test_event_id_must_be_the_reference_hash(self) -> None:
        """In v3 (standard base64) and v4+ (URL-safe) an event id the event carries must be
        its reference hash; a wrong one is rejected, none is fine."""
        for version in ("3", "4", "10", "12"):
            event = self.signed(version)
            self.assertIsNone(self.check(event, version))
            event_id = event_id_of(event, ROOM_VERSIONS[version])
            self.assertIsNone(self.check(dict(event, event_id=event_id), version))
            self.rejected(
                dict(event, event_id="$abc:a.org"), version, VerificationFailure.EVENT_ID_MISMATCH
            )

    def test_any_event_id_value_is_compared(self) -> None:
        """An ``event_id`` of null, a number or an object is a mismatch, never a crash."""
        event = self.signed("10")
        for value in (None, 5, {"a": 1}, ["$x"], "$" + "\udc00"):
            self.rejected(dict(event, event_id=value), "10", VerificationFailure.EVENT_ID_MISMATCH)

    def test_v3_and_v4_encodings_differ(self) -> None:
        """v3 takes the standard alphabet and v4 the URL-safe one: each refuses the other's
        id for an event whose hash has ``+`` or ``/`` in it."""
        for n in range(200):
            event = self.signed("3", depth=n)
            standard = event_id_of(event, ROOM_VERSIONS["3"])
            url_safe = event_id_of(event, ROOM_VERSIONS["4"])
            if standard != url_safe:
                break
        else:
            self.fail("no hash with + or / in 200 tries")
        self.assertEqual(standard[1:].translate(str.maketrans("+/", "-_")), url_safe[1:])
        self.rejected(dict(event, event_id=url_safe), "3", VerificationFailure.EVENT_ID_MISMATCH)
        self.assertIsNone(self.check(dict(event, event_id=url_safe), "4"))
        self.rejected(dict(event, event_id=standard), "4", VerificationFailure.EVENT_ID_MISMATCH)

    def test_reference_hash_covers_the_redacted_event_only(self) -> None:
        """The reference hash ignores content redaction removes, ``unsigned`` and
        signatures, and changes with a protected key."""
        version = ROOM_VERSIONS["10"]
        event = self.signed("10")
        same = dict(event, content={}, unsigned={"x": 1}, signatures={})
        self.assertEqual(reference_hash(same, version), reference_hash(event, version))
        self.assertNotEqual(
            reference_hash(dict(event, depth=6), version), reference_hash(event, version)
        )

    def test_v1_event_ids_are_not_hashes(self) -> None:
        """Room v1/v2 event ids are the sender's choice: any id its server signed is fine."""
        self.assertIsNone(self.check(self.signed("1", event_id="$anything:a.org"), "1"))
        with self.assertRaises(ValueError):
            event_id_of(message("1"), ROOM_VERSIONS["1"])


class V12CreateRoomIdTests(EventHashCase):
    def create(self, **fields: Any) -> dict[str, Any]:
        event = message("12", type="m.room.create", state_key="", content={"room_version": "12"})
        del event["room_id"]
        event.update(fields)
        return hash_and_sign(event, "12", "a.org", self.key)

    def test_create_room_id_is_its_reference_hash(self) -> None:
        """A v12 create event may carry the room id it makes (``!`` + its reference hash);
        any other room id is rejected."""
        create = self.create()
        room_id = create_event_room_id(create, ROOM_VERSIONS["12"])
        self.assertEqual(room_id, "!" + event_id_of(create, ROOM_VERSIONS["12"])[1:])
        self.assertIsNone(self.check(create, "12"))
        self.assertIsNone(self.check(dict(create, room_id=room_id), "12"))
        self.rejected(
            dict(create, room_id="!other:a.org"), "12", VerificationFailure.ROOM_ID_MISMATCH
        )

    def test_only_v12_create_events_have_hash_room_ids(self) -> None:
        """Other v12 events' room ids and v11 create events' room ids are not compared."""
        self.assertIsNone(self.check(self.signed("12", room_id="!whatever"), "12"))
        v11_create = hash_and_sign(
            message("11", type="m.room.create", state_key="", room_id="!r:a.org"),
            "11",
            "a.org",
            self.key,
        )
        self.assertIsNone(self.check(v11_create, "11"))
        with self.assertRaises(ValueError):
            create_event_room_id(v11_create, ROOM_VERSIONS["11"])


class KeyringCheckEventsTests(KeyringTestCase):
    def hashed_event(
        self, version: str, server: str = ORIGIN, key: Optional[SigningKey] = None, **fields: Any
    ) -> dict[str, Any]:
        event = self.event(version, sender_server=server, **fields)
        return hash_and_sign(event, version, server, key or self.origin_key)

    def checks(self, events: list[Any], version: str) -> list[EventCheck]:
        results = self.keyring.check_events(events, version)
        self.settle()
        return [self.successResultOf(d) for d in results]

    def test_three_outcomes(self) -> None:
        """check_events gives accepted, redacted (with the redacted copy) and rejected
        (with its reason), never a failed Deferred."""
        good = self.hashed_event("10")
        changed = dict(good, content={"body": "changed"})
        forged = dict(good, depth=99)
        accepted, redacted, rejected, malformed = self.checks(
            [good, changed, forged, "not an event"], "10"
        )
        self.assertEqual(accepted, EventCheck(EventOutcome.ACCEPTED))
        self.assertIs(accepted.event_to_use(good), good)
        self.assertIs(redacted.outcome, EventOutcome.REDACTED)
        self.assertEqual(redacted.redacted_event, redact_event(changed, "10"))
        self.assertEqual(redacted.event_to_use(changed), redact_event(changed, "10"))
        self.assertIs(rejected.outcome, EventOutcome.REJECTED)
        self.assertIs(rejected.reason, VerificationFailure.BAD_SIGNATURE)
        assert rejected.error is not None
        self.assertEqual(rejected.error.server_name, ORIGIN)
        self.assertIsNone(rejected.event_to_use(forged))
        self.assertIs(malformed.reason, VerificationFailure.MALFORMED_EVENT)

    def test_verify_events_fails_rejected_and_passes_redacted(self) -> None:
        """verify_events keeps its contract: a rejected event fails its Deferred, a
        redacted one (signatures fine) fires it with None."""
        good = self.hashed_event("10")
        changed = dict(good, content={"body": "changed"})
        floats = self.hashed_event("10", content={"n": 1.5})
        d_good, d_changed, d_float = self.keyring.verify_events([good, changed, floats], "10")
        self.assertIsNone(self.ok(d_good))
        self.assertIsNone(self.ok(d_changed))
        self.fails(d_float, VerificationFailure.NOT_CANONICAL_JSON)

    def test_invalid_event_is_rejected_without_a_key_fetch(self) -> None:
        """An event rejected for its own values or ids is not worth a key fetch: nothing
        is asked of its origin."""
        floats = self.hashed_event("10", content={"n": 1.5})
        wrong_id = dict(self.hashed_event("10"), event_id="$nope")
        float_check, id_check = self.checks([floats, wrong_id], "10")
        self.assertIs(float_check.reason, VerificationFailure.NOT_CANONICAL_JSON)
        # The event id is compared once its signatures verify, so its keys are fetched.
        self.assertIs(id_check.reason, VerificationFailure.EVENT_ID_MISMATCH)
        # Signed by a server whose keys we do not hold yet: still nothing is fetched.
        other_floats = self.hashed_event("11", OTHER, self.other_key, content={"n": 2.5})
        before = len(self.outbound.requests)
        (check,) = self.checks([other_floats], "11")
        self.assertIs(check.reason, VerificationFailure.NOT_CANONICAL_JSON)
        self.assertEqual(len(self.outbound.requests), before)
        no_hashes = self.hashed_event("11", OTHER, self.other_key)
        del no_hashes["hashes"]
        (check,) = self.checks([no_hashes], "11")
        self.assertIs(check.reason, VerificationFailure.MALFORMED_EVENT)
        self.assertEqual(len(self.outbound.requests), before)
        (fetched,) = self.checks([self.hashed_event("11", OTHER, self.other_key)], "11")
        self.assertIs(fetched.outcome, EventOutcome.ACCEPTED)
        self.assertGreater(len(self.outbound.requests), before)

    def test_keys_only_the_redacted_copy_needs_are_fetched(self) -> None:
        """A third-party invite (v10) needs no server signature, but its redacted copy,
        a plain invite, needs the sender's: when the content hash differs, the keyring
        fetches the sender's keys and gives the redacted copy, which that signature
        vouches for. Without the signature the invite is rejected."""
        invite = hash_and_sign(
            {
                "type": "m.room.member",
                "room_id": "!r:hub.test",
                "sender": "@alice:%s" % (OTHER,),
                "state_key": "@bob:%s" % (ORIGIN,),
                "origin_server_ts": self.now_ms(),
                "depth": 4,
                "prev_events": [],
                "auth_events": [],
                "content": {"membership": "invite", "third_party_invite": {"signed": {}}},
            },
            "10",
            OTHER,
            self.other_key,
        )
        changed = dict(invite, content=dict(invite["content"], displayname="changed"))
        unsigned = dict(changed, signatures={})
        before = len(self.outbound.requests)
        (intact,) = self.checks([invite], "10")
        self.assertIs(intact.outcome, EventOutcome.ACCEPTED)
        self.assertEqual(len(self.outbound.requests), before)  # no signer, nothing fetched
        redacted, rejected = self.checks([changed, unsigned], "10")
        self.assertIs(redacted.outcome, EventOutcome.REDACTED, redacted.error)
        self.assertEqual(redacted.redacted_event, redact_event(changed, "10"))
        self.assertGreater(len(self.outbound.requests), before)
        self.assertIs(rejected.reason, VerificationFailure.NOT_SIGNED)

    def test_check_events_in_threads_gives_the_same_outcomes(self) -> None:
        """check_events_in_threads gives the outcomes check_events gives."""
        good = self.hashed_event("10")
        events = [good, dict(good, content={}), dict(good, depth=1)]
        expected = self.checks(events, "10")
        results = self.keyring.check_events_in_threads(
            events, "10", cast(Any, InlineThreadPool()), InlineReactor(), chunk_size=2
        )
        self.settle()
        got = [self.successResultOf(d) for d in results]

        def summary(checks: list[EventCheck]) -> list[tuple[Any, ...]]:
            return [(c.outcome, c.reason, c.redacted_event) for c in checks]

        self.assertEqual(summary(got), summary(expected))
        self.assertEqual(
            [c.outcome for c in got],
            [EventOutcome.ACCEPTED, EventOutcome.REDACTED, EventOutcome.REJECTED],
        )
