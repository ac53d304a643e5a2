"""Event checks give the same outcomes whichever encoder writes the canonical JSON.

Events whose values are plain JSON are encoded by orjson
(:mod:`keyring_module.canonical_json`); these sign generated events with signedjson and
the standard library's canonical JSON, as other servers do, and check them with the fast
encoder and without it: authentic events are accepted by both, altered ones get the same
redacted copy or the same rejection.
"""

from typing import Any, Optional

from hypothesis import given, settings
from hypothesis import strategies as st
from signedjson.key import generate_signing_key
from twisted.trial.unittest import SynchronousTestCase

from keyring_module import canonical_json
from keyring_module.errors import KeyVerificationError
from keyring_module.model import StoredKey
from keyring_module.redaction import redact_event
from keyring_module.roomversions import ROOM_VERSIONS
from keyring_module.verify import verify_event_signatures
from tests.test_canonical_json_fast import PLAIN, TEXT
from tests.test_event_checks import NOW, hash_and_sign

ORIGIN = "origin.example.org"
KEY = generate_signing_key("fast")
KEYS = {
    ORIGIN: {
        "ed25519:fast": StoredKey(
            ORIGIN, "ed25519:fast", KEY.verify_key.encode(), NOW + 10**9, None, NOW, "origin", "r"
        )
    }
}
# Content a type's redaction keeps in part (member, power levels, join rules), all of
# it (create in v11+) or none of it (message).
EVENT_TYPES = ["m.room.message", "m.room.member", "m.room.power_levels", "m.room.join_rules"]

Outcome = tuple[str, Any]


def check(event: dict[str, Any], version: str) -> Outcome:
    try:
        redacted: Optional[dict[str, Any]] = verify_event_signatures(
            event, ROOM_VERSIONS[version], KEYS, NOW
        )
    except KeyVerificationError as e:
        return ("rejected", e.reason)
    return ("accepted", redacted)


def make_event(version: str, event_type: str, content: dict[str, Any], n: int) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": event_type,
        "room_id": "!room:" + ORIGIN,
        "sender": "@user:" + ORIGIN,
        "origin": ORIGIN,
        "origin_server_ts": NOW - 1000,
        "depth": n,
        "prev_events": [],
        "auth_events": [],
        "content": content,
    }
    if event_type != "m.room.message":
        event["state_key"] = "@user:" + ORIGIN if event_type == "m.room.member" else ""
    if version in ("1", "2"):
        event["event_id"] = "$%d:%s" % (n, ORIGIN)
    return event


class SameOutcomesTests(SynchronousTestCase):
    def both(self, event: dict[str, Any], version: str) -> Outcome:
        """The outcome with the fast encoder and without; they must agree. Records
        whether the fast encoder ran in ``self.fast_calls``."""
        real = canonical_json._fast_dumps
        assert real is not None
        self.fast_calls = 0

        def counting(value: Any) -> bytes:
            self.fast_calls += 1
            return real(value)

        canonical_json._fast_dumps = counting
        try:
            fast = check(event, version)
        finally:
            canonical_json._fast_dumps = real
        with_canonicaljson = canonical_json._fast_dumps
        canonical_json._fast_dumps = None
        try:
            slow = check(event, version)
        finally:
            canonical_json._fast_dumps = with_canonicaljson
        self.assertEqual(fast, slow)
        return fast

    @settings(max_examples=150, deadline=None)
    @given(
        st.sampled_from([str(n) for n in range(1, 13)]),
        st.sampled_from(EVENT_TYPES),
        st.dictionaries(TEXT, PLAIN, max_size=6),
        st.integers(1, 10**6),
        TEXT,
    )
    def test_authentic_and_altered_events(
        self, version: str, event_type: str, content: dict[str, Any], n: int, extra: str
    ) -> None:
        content = dict(content, membership="join") if event_type == "m.room.member" else content
        try:
            event = hash_and_sign(make_event(version, event_type, content, n), version, ORIGIN, KEY)
        except (ValueError, UnicodeEncodeError):
            return  # canonical JSON cannot carry it (a lone surrogate): no sender signs that
        self.assertEqual(self.both(event, version), ("accepted", None))
        self.assertGreater(self.fast_calls, 0)  # a plain event: the fast encoder ran
        # Content the hash covers changed: the redacted copy (or a rejection, when the
        # change touched what redaction keeps), the same with either encoder.
        altered = dict(event, content=dict(event["content"], zz_added=extra))
        outcome = self.both(altered, version)
        if outcome[0] == "accepted":
            self.assertEqual(outcome[1], redact_event(altered, version))

    def test_an_event_with_floats_in_an_old_room_is_encoded_by_canonicaljson(self) -> None:
        # Room v1-v5 allow floats, which orjson writes otherwise (1e-07 as 1e-7): such an
        # event is not plain, so canonicaljson writes it, as its sender did.
        content = {"n": 1e-07, "body": "x"}
        event = hash_and_sign(make_event("5", "m.room.member", content, 1), "5", ORIGIN, KEY)
        event["content"]["membership"] = "join"
        event = hash_and_sign(event, "5", ORIGIN, KEY)
        self.assertEqual(self.both(event, "5"), ("accepted", None))
        self.assertEqual(self.fast_calls, 0)  # not plain: canonicaljson alone
