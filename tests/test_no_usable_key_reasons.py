"""A signature check that finds no usable key says why for each key the signer used:
not known, valid until before the event, an old key expired before it, compromised, or
an old key for a request."""

from typing import Any, Optional

from signedjson.key import generate_signing_key
from signedjson.sign import sign_json
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.errors import KeyVerificationError, VerificationFailure
from keyring_module.model import StoredKey
from keyring_module.verify import KeyPurpose, verify_signed_json_with_keys

NOW = 1_700_000_000_000  # 2023-11-14T22:13:20Z
HOUR = 3600 * 1000
DAY = 24 * HOUR
SERVER = "a.example"


class NoUsableKeyReasonTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.key = generate_signing_key("a")
        self.signed = sign_json({"x": 1}, SERVER, self.key)
        self.key_bytes = self.key.verify_key.encode()

    def stored(self, valid_until_ts: int, expired_ts: Optional[int] = None) -> StoredKey:
        return StoredKey(
            SERVER, "ed25519:a", self.key_bytes, valid_until_ts, expired_ts, NOW, "origin", "r"
        )

    def detail(
        self,
        keys: dict[str, StoredKey],
        valid_at_ts: int = NOW,
        purpose: KeyPurpose = "event",
        signed: Optional[dict[str, Any]] = None,
        compromised: frozenset[bytes] = frozenset(),
    ) -> str:
        with self.assertRaises(KeyVerificationError) as raised:
            verify_signed_json_with_keys(
                signed or self.signed,
                SERVER,
                keys,
                valid_at_ts,
                NOW,
                purpose=purpose,
                compromised=compromised,
            )
        self.assertIs(raised.exception.reason, VerificationFailure.NO_USABLE_KEY)
        detail: str = raised.exception.detail
        return detail

    def test_key_not_known(self) -> None:
        """A key id nothing is known about is named as such."""
        self.assertEqual(self.detail({}), "no usable key for any signature (ed25519:a not known)")

    def test_valid_until_before_the_event(self) -> None:
        """A current key valid until before the event's time names both times."""
        self.assertEqual(
            self.detail({"ed25519:a": self.stored(NOW + HOUR)}, valid_at_ts=NOW + 2 * HOUR),
            "no usable key for any signature (ed25519:a valid until 2023-11-14T23:13:20Z,"
            " before the event (2023-11-15T00:13:20Z))",
        )

    def test_seven_day_cap_is_named(self) -> None:
        """A key whose valid_until_ts is cut by the 7-day cap says so."""
        detail = self.detail({"ed25519:a": self.stored(NOW + 30 * DAY)}, valid_at_ts=NOW + 8 * DAY)
        self.assertIn("(capped at now + 7 days), before the event", detail)

    def test_old_key_expired_before_the_event(self) -> None:
        """An old key that expired before the event names its expired_ts."""
        detail = self.detail({"ed25519:a": self.stored(NOW, expired_ts=NOW - HOUR)})
        self.assertEqual(
            detail,
            "no usable key for any signature (ed25519:a expired at 2023-11-14T21:13:20Z,"
            " before the event (2023-11-14T22:13:20Z))",
        )

    def test_requests_need_a_current_key(self) -> None:
        """For a request, an old key and an expired current key are named differently."""
        old = self.detail(
            {"ed25519:a": self.stored(NOW + DAY, expired_ts=NOW + HOUR)}, purpose="request"
        )
        self.assertIn("ed25519:a is an old key (expired at 2023-11-14T23:13:20Z)", old)
        expired = self.detail({"ed25519:a": self.stored(NOW - HOUR)}, purpose="request")
        self.assertIn("ed25519:a expired at 2023-11-14T21:13:20Z)", expired)

    def test_compromised_key(self) -> None:
        """A key listed as compromised is named as such."""
        detail = self.detail(
            {"ed25519:a": self.stored(NOW + DAY)}, compromised=frozenset({self.key_bytes})
        )
        self.assertIn("ed25519:a is a compromised key", detail)

    def test_several_signatures_and_no_ed25519(self) -> None:
        """Each ed25519 signature gets its reason; only other algorithms: said so."""
        other = generate_signing_key("b")
        both = sign_json(dict(self.signed), SERVER, other)
        detail = self.detail({"ed25519:a": self.stored(NOW - HOUR)}, signed=both)
        self.assertIn("ed25519:a valid until 2023-11-14T21:13:20Z", detail)
        self.assertIn("; ed25519:b not known", detail)
        unknown_alg = {"x": 1, "signatures": {SERVER: {"curve25519:a": "AAAA"}}}
        self.assertEqual(
            self.detail({}, signed=unknown_alg),
            "no usable key for any signature (no ed25519 signature)",
        )
