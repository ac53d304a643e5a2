"""Tests for our own keys: key files, the spec's test vectors, the /server object."""

import json
import os
import stat

from canonicaljson import encode_canonical_json
from signedjson.key import (
    decode_signing_key_base64,
    decode_verify_key_bytes,
    encode_verify_key_base64,
    generate_signing_key,
    get_verify_key,
)
from signedjson.sign import sign_json, verify_signed_json
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.config import HOUR_MS, OldSigningKey
from keyring_module.errors import ConfigError
from keyring_module.json_codec import FAST_PATH_MAX_VALUES
from keyring_module.signing import (
    OwnKeys,
    ServerKeyPublisher,
    key_id_of,
    load_or_create_signing_keys,
    write_new_signing_key,
)
from tests.test_json_codec import record_slow_decodes

SPEC_SEED = "YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1"


class SpecTestVectorTests(SynchronousTestCase):
    """The Matrix spec's "Signing JSON" appendix examples reproduce exactly."""

    def setUp(self) -> None:
        self.key = decode_signing_key_base64("ed25519", "1", SPEC_SEED)

    def test_empty_object(self) -> None:
        """Signing {} gives the spec's signature."""
        signed = sign_json({}, "domain", self.key)
        self.assertEqual(
            signed["signatures"]["domain"]["ed25519:1"],
            "K8280/U9SSy9IVtjBuVeLr+HpOB4BQFWbg+UZaADMtTdGYI7Geitb76LTrr5QV/7Xg4ahLwYGYZzuHGZKM5ZAQ",
        )

    def test_object_with_data(self) -> None:
        """Signing {"one":1,"two":"Two"} gives the spec's signature."""
        signed = sign_json({"one": 1, "two": "Two"}, "domain", self.key)
        self.assertEqual(
            signed["signatures"]["domain"]["ed25519:1"],
            "KqmLSbO39/Bzb0QIYE82zqLwsA+PDzYIpIRA2sRQ4sL53+sN6/fpNSoqE7BP7vBZhG6kYdD13EIMJpvhJI+6Bw",
        )

    def test_own_keys_sign_with_spec_key(self) -> None:
        """Co-signing with OwnKeys produces the spec's signature for the spec's key."""
        own = OwnKeys("domain", [self.key])
        self.assertEqual(
            json.loads(own.cosign_canonical(b"{}"))["signatures"]["domain"]["ed25519:1"],
            "K8280/U9SSy9IVtjBuVeLr+HpOB4BQFWbg+UZaADMtTdGYI7Geitb76LTrr5QV/7Xg4ahLwYGYZzuHGZKM5ZAQ",
        )


class CoSignTests(SynchronousTestCase):
    def test_big_response_is_decoded_the_gil_friendly_way(self) -> None:
        """Co-signing (which runs in a worker thread) decodes a response of many values
        with the decoder that lets the reactor thread run, and signs as signedjson does."""
        slow_decodes = record_slow_decodes(self)
        key = generate_signing_key("n1")
        obj = {"server_name": "a.example", "pad": [0] * (FAST_PATH_MAX_VALUES + 1)}
        cosigned = OwnKeys("notary.test", [key]).cosign_canonical(encode_canonical_json(obj))
        self.assertEqual(slow_decodes, ["slow"])
        self.assertEqual(cosigned, encode_canonical_json(sign_json(obj, "notary.test", key)))


class KeyFileTests(SynchronousTestCase):
    def test_generated_when_missing_with_mode_0600(self) -> None:
        """A missing key file is created with one key, readable by the owner only."""
        path = self.mktemp()
        keys = load_or_create_signing_keys(path)
        self.assertEqual(len(keys), 1)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        again = load_or_create_signing_keys(path)
        self.assertEqual(key_id_of(again[0]), key_id_of(keys[0]))
        self.assertEqual(again[0].encode(), keys[0].encode())

    def test_several_keys_loaded(self) -> None:
        """Every key in the file is loaded, in order."""
        path = self.mktemp()
        a, b = generate_signing_key("a1"), generate_signing_key("b2")
        from signedjson.key import write_signing_keys

        with open(path, "w") as f:
            write_signing_keys(f, [a, b])
        self.assertEqual(
            [key_id_of(k) for k in load_or_create_signing_keys(path)], ["ed25519:a1", "ed25519:b2"]
        )

    def test_garbage_file_is_config_error(self) -> None:
        """An unreadable key file is a ConfigError naming the file."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("this is not a key\n")
        with self.assertRaises(ConfigError) as cm:
            load_or_create_signing_keys(path)
        self.assertIn(path, str(cm.exception))
        self.assertEqual(cm.exception.path, ("signing_key_path",))

    def test_empty_file_is_config_error(self) -> None:
        """A key file with no key is refused."""
        path = self.mktemp()
        open(path, "w").close()
        self.assertRaisesRegex(ConfigError, "holds no key", load_or_create_signing_keys, path)

    def test_generate_never_overwrites(self) -> None:
        """write_new_signing_key refuses an existing file."""
        path = self.mktemp()
        write_new_signing_key(path)
        self.assertRaises(FileExistsError, write_new_signing_key, path)


class PublisherTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.key = generate_signing_key("cur")

    def test_response_shape_and_signature(self) -> None:
        """The /server object has every field, old_verify_keys {} and a valid signature."""
        publisher = ServerKeyPublisher(OwnKeys("example.org", [self.key]), self.clock, 24 * HOUR_MS)
        obj = json.loads(publisher.response_bytes())
        self.assertEqual(obj["server_name"], "example.org")
        self.assertEqual(obj["old_verify_keys"], {})
        self.assertEqual(
            obj["verify_keys"],
            {"ed25519:cur": {"key": encode_verify_key_base64(get_verify_key(self.key))}},
        )
        self.assertEqual(obj["valid_until_ts"], 1_700_000_000_000 + 24 * HOUR_MS)
        verify_signed_json(obj, "example.org", get_verify_key(self.key))
        self.assertEqual(publisher.response_bytes(), encode_canonical_json(obj))

    def test_every_current_key_signs(self) -> None:
        """With two current keys, both are published and both signatures verify."""
        other = generate_signing_key("two")
        publisher = ServerKeyPublisher(
            OwnKeys("example.org", [self.key, other]), self.clock, 24 * HOUR_MS
        )
        obj = json.loads(publisher.response_bytes())
        self.assertEqual(set(obj["verify_keys"]), {"ed25519:cur", "ed25519:two"})
        self.assertEqual(set(obj["signatures"]["example.org"]), {"ed25519:cur", "ed25519:two"})
        for key in (self.key, other):
            verify_signed_json(obj, "example.org", get_verify_key(key))

    def test_rotation_publishes_old_key(self) -> None:
        """After rotation the old key is in old_verify_keys with its fixed expired_ts; the new key signs."""
        old = generate_signing_key("old")
        old_entry = OldSigningKey("ed25519:old", old.verify_key.encode(), 1_690_000_000_000)
        publisher = ServerKeyPublisher(
            OwnKeys("example.org", [self.key], [old_entry]), self.clock, 24 * HOUR_MS
        )
        obj = json.loads(publisher.response_bytes())
        self.assertEqual(
            obj["old_verify_keys"],
            {
                "ed25519:old": {
                    "key": encode_verify_key_base64(get_verify_key(old)),
                    "expired_ts": 1_690_000_000_000,
                }
            },
        )
        self.assertEqual(list(obj["signatures"]["example.org"]), ["ed25519:cur"])
        verify_signed_json(obj, "example.org", get_verify_key(self.key))
        # expired_ts does not move with time (unlike some servers' "now").
        self.clock.advance(3 * 86400)
        self.assertEqual(
            json.loads(publisher.response_bytes())["old_verify_keys"]["ed25519:old"]["expired_ts"],
            1_690_000_000_000,
        )
        decode_verify_key_bytes("ed25519:old", old_entry.verify_key_bytes)

    def test_same_key_current_and_old_is_refused(self) -> None:
        """A key cannot be both current and retired."""
        entry = OldSigningKey("ed25519:cur", self.key.verify_key.encode(), 1)
        self.assertRaises(ConfigError, OwnKeys, "example.org", [self.key], [entry])

    def test_bytes_cached_until_half_life(self) -> None:
        """The signed bytes are reused until less than half the interval remains, then refreshed."""
        publisher = ServerKeyPublisher(OwnKeys("example.org", [self.key]), self.clock, 24 * HOUR_MS)
        first = publisher.response_bytes()
        self.clock.advance(12 * 3600 - 1)
        self.assertIs(publisher.response_bytes(), first)
        self.clock.advance(1)
        second = publisher.response_bytes()
        self.assertIsNot(second, first)
        obj = json.loads(publisher.response_bytes())
        self.assertEqual(obj["valid_until_ts"], self.clock.seconds() * 1000 + 24 * HOUR_MS)

    def test_valid_until_at_least_one_hour(self) -> None:
        """Every served response is valid for at least another hour, even with a 1h interval."""
        publisher = ServerKeyPublisher(OwnKeys("example.org", [self.key]), self.clock, HOUR_MS)
        for _ in range(20):
            obj = json.loads(publisher.response_bytes())
            self.assertGreaterEqual(obj["valid_until_ts"], self.clock.seconds() * 1000 + HOUR_MS)
            self.assertLessEqual(
                obj["valid_until_ts"], self.clock.seconds() * 1000 + 7 * 24 * HOUR_MS
            )
            self.clock.advance(301)
