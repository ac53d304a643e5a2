"""Tests for keyring_module.validation: one test per rejection rule, plus the good path."""

import json
import tracemalloc
from typing import Any

from canonicaljson import encode_canonical_json
from hypothesis import given, settings
from hypothesis import strategies as st
from signedjson.types import SigningKey
from twisted.trial.unittest import SynchronousTestCase
from unpaddedbase64 import decode_base64, encode_base64

from keyring_module import validation
from keyring_module.config import DEFAULT_MAX_KEYS_PER_RESPONSE
from keyring_module.config_values import as_verify_key_bytes
from keyring_module.errors import ConfigError, KeyLookupError
from keyring_module.json_codec import FAST_PATH_MAX_VALUES, encode_canonical
from keyring_module.quoting import quote_untrusted
from keyring_module.validation import (
    InvalidKeyResponseError,
    InvalidKeyResponseReason,
    check_json_types,
    decode_key_base64,
    parse_server_keys_response,
)
from tests.utils import (
    key_id,
    make_signed_server_keys,
    make_trusted_key_server,
    new_signing_key,
    sign_as,
    verify_key_bytes,
)

ORIGIN = "origin.example"
NOTARY = "notary.example"
VALID_UNTIL = 1_700_000_000_000


class ParseServerKeysResponseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.key = new_signing_key("a_1")
        self.notary_key = new_signing_key("n_1")

    def signed(self, obj: dict[str, Any], *keys: SigningKey) -> dict[str, Any]:
        """Sign ``obj`` (after removing old signatures) with ``keys`` as the origin."""
        obj = {k: v for k, v in obj.items() if k != "signatures"}
        for key in keys or (self.key,):
            obj = sign_as(obj, ORIGIN, key)
        return obj

    def valid(self, **extra: Any) -> dict[str, Any]:
        return make_signed_server_keys(ORIGIN, [self.key], VALID_UNTIL, extra=extra)

    def assertRejected(
        self, obj: object, reason: InvalidKeyResponseReason, **kwargs: Any
    ) -> InvalidKeyResponseError:
        error: InvalidKeyResponseError = self.assertRaises(
            InvalidKeyResponseError, parse_server_keys_response, obj, ORIGIN, **kwargs
        )
        self.assertIs(error.reason, reason, error.message)
        self.assertTrue(error.message)
        return error

    def test_valid_response(self) -> None:
        """A correctly self-signed response parses into its keys and validity."""
        old = new_signing_key("old")
        obj = make_signed_server_keys(
            ORIGIN, [self.key], VALID_UNTIL, old_keys={"ed25519:old": (verify_key_bytes(old), 5)}
        )
        response = parse_server_keys_response(obj, ORIGIN)
        self.assertEqual(response.server_name, ORIGIN)
        self.assertEqual(response.valid_until_ts, VALID_UNTIL)
        self.assertEqual(dict(response.verify_keys), {"ed25519:a_1": verify_key_bytes(self.key)})
        self.assertEqual(
            response.old_verify_keys["ed25519:old"].verify_key_bytes, verify_key_bytes(old)
        )
        self.assertEqual(response.old_verify_keys["ed25519:old"].expired_ts, 5)

    def test_error_is_key_lookup_error(self) -> None:
        """Rejections are KeyLookupErrors so callers can catch one type."""
        error = InvalidKeyResponseError(InvalidKeyResponseReason.BAD_TYPE, "y")
        self.assertIsInstance(error, KeyLookupError)

    def test_reason_values_are_the_metric_labels(self) -> None:
        """Each reason's value is its stable metric label, and the error's text starts with it."""
        self.assertEqual(
            {reason.value for reason in InvalidKeyResponseReason},
            {
                "bad_type",
                "int_out_of_range",
                "float_not_allowed",
                "missing_field",
                "wrong_server_name",
                "bad_key_id",
                "bad_key_length",
                "bad_self_signature",
                "no_verify_keys",
                "bad_notary_signature",
                "too_many_keys",
            },
        )
        error = InvalidKeyResponseError(InvalidKeyResponseReason.WRONG_SERVER_NAME, "for b.org")
        self.assertEqual(str(error), "wrong_server_name: for b.org")

    def test_not_an_object(self) -> None:
        """A JSON array instead of an object is rejected as bad_type."""
        self.assertRejected([self.valid()], InvalidKeyResponseReason.BAD_TYPE)

    def test_wrong_server_name(self) -> None:
        """A response about another server is rejected and the message names both."""
        obj = make_signed_server_keys("evil.example", [self.key], VALID_UNTIL)
        error = self.assertRejected(obj, InvalidKeyResponseReason.WRONG_SERVER_NAME)
        self.assertIn("evil.example", error.message)
        self.assertIn(ORIGIN, error.message)

    def test_missing_server_name(self) -> None:
        """A response without server_name is rejected as missing_field."""
        obj = self.valid()
        del obj["server_name"]
        self.assertRejected(self.signed(obj), InvalidKeyResponseReason.MISSING_FIELD)

    def test_missing_valid_until_ts(self) -> None:
        """A response without valid_until_ts is rejected as missing_field."""
        obj = self.valid()
        del obj["valid_until_ts"]
        error = self.assertRejected(self.signed(obj), InvalidKeyResponseReason.MISSING_FIELD)
        self.assertIn("valid_until_ts", error.message)

    def test_valid_until_ts_not_int(self) -> None:
        """A string valid_until_ts is rejected as bad_type."""
        self.assertRejected(
            self.signed({**self.valid(), "valid_until_ts": "1"}), InvalidKeyResponseReason.BAD_TYPE
        )

    def test_valid_until_ts_bool(self) -> None:
        """A boolean valid_until_ts is rejected although bool is an int subclass."""
        self.assertRejected(
            self.signed({**self.valid(), "valid_until_ts": True}), InvalidKeyResponseReason.BAD_TYPE
        )

    def test_float_anywhere(self) -> None:
        """A float nested deep inside an unknown field is rejected."""
        obj = self.valid(extra_field={"list": [1, {"x": 1.5}]})
        error = self.assertRejected(obj, InvalidKeyResponseReason.FLOAT_NOT_ALLOWED)
        self.assertIn("extra_field.list.1.x", error.message)

    def test_int_out_of_range(self) -> None:
        """An integer of 2**53 is outside canonical JSON and rejected."""
        self.assertRejected(
            self.signed({**self.valid(), "valid_until_ts": 2**53}),
            InvalidKeyResponseReason.INT_OUT_OF_RANGE,
        )
        self.assertRejected(self.valid(other=-(2**53)), InvalidKeyResponseReason.INT_OUT_OF_RANGE)

    def test_int_range_bounds_accepted(self) -> None:
        """The extreme canonical integers are accepted."""
        obj = self.signed({**self.valid(), "valid_until_ts": 2**53 - 1, "low": -(2**53) + 1})
        self.assertEqual(parse_server_keys_response(obj, ORIGIN).valid_until_ts, 2**53 - 1)

    def test_missing_verify_keys(self) -> None:
        """A response without verify_keys is rejected as missing_field."""
        obj = self.valid()
        del obj["verify_keys"]
        self.assertRejected(self.signed(obj), InvalidKeyResponseReason.MISSING_FIELD)

    def test_verify_keys_not_object(self) -> None:
        """verify_keys as a list is rejected as bad_type."""
        self.assertRejected(
            self.signed({**self.valid(), "verify_keys": []}), InvalidKeyResponseReason.BAD_TYPE
        )

    def test_verify_key_entry_missing_key(self) -> None:
        """A verify_keys entry without "key" is rejected as missing_field."""
        obj = self.signed({**self.valid(), "verify_keys": {key_id(self.key): {}}})
        self.assertRejected(obj, InvalidKeyResponseReason.MISSING_FIELD)

    def test_bad_key_id(self) -> None:
        """An ed25519 key id with characters outside [a-zA-Z0-9_] is rejected."""
        bad = new_signing_key("a-b")
        obj = make_signed_server_keys(ORIGIN, [bad], VALID_UNTIL)
        error = self.assertRejected(obj, InvalidKeyResponseReason.BAD_KEY_ID)
        self.assertIn("ed25519:a-b", error.message)

    def test_other_algorithms_ignored(self) -> None:
        """Keys of unknown algorithms are skipped, not fatal, even if malformed."""
        obj = self.valid()
        obj["verify_keys"]["curve25519:x"] = {"key": "not base64 at all!"}
        obj["old_verify_keys"]["rsa:y"] = {"nothing": True}
        response = parse_server_keys_response(self.signed(obj), ORIGIN)
        self.assertEqual(list(response.verify_keys), ["ed25519:a_1"])
        self.assertEqual(dict(response.old_verify_keys), {})

    def test_bad_key_length(self) -> None:
        """A verify key of 31 bytes is rejected."""
        obj = self.valid()
        obj["verify_keys"][key_id(self.key)] = {"key": encode_base64(b"x" * 31)}
        self.assertRejected(self.signed(obj), InvalidKeyResponseReason.BAD_KEY_LENGTH)

    def test_bad_key_base64(self) -> None:
        """A verify key that is not base64 is rejected."""
        obj = self.valid()
        obj["verify_keys"][key_id(self.key)] = {"key": "!" * 43}
        self.assertRejected(self.signed(obj), InvalidKeyResponseReason.BAD_KEY_LENGTH)

    def test_padded_base64_accepted(self) -> None:
        """A padded base64 verify key is accepted and decodes to the same bytes."""
        obj = self.valid()
        padded = encode_base64(verify_key_bytes(self.key)) + "="
        obj["verify_keys"][key_id(self.key)] = {"key": padded}
        response = parse_server_keys_response(self.signed(obj), ORIGIN)
        self.assertEqual(response.verify_keys[key_id(self.key)], verify_key_bytes(self.key))

    def test_missing_signatures(self) -> None:
        """A response without signatures is rejected as missing_field."""
        obj = self.valid()
        del obj["signatures"]
        self.assertRejected(obj, InvalidKeyResponseReason.MISSING_FIELD)

    def test_not_signed_by_origin(self) -> None:
        """A response signed only under another server's name is rejected."""
        obj = self.valid()
        obj["signatures"] = {"other.example": obj["signatures"][ORIGIN]}
        self.assertRejected(obj, InvalidKeyResponseReason.BAD_SELF_SIGNATURE)

    def test_verify_key_without_self_signature(self) -> None:
        """Every ed25519 verify key must have signed; one unsigned key rejects all."""
        second = new_signing_key("b_2")
        obj = make_signed_server_keys(ORIGIN, [self.key, second], VALID_UNTIL)
        del obj["signatures"][ORIGIN][key_id(second)]
        error = self.assertRejected(obj, InvalidKeyResponseReason.BAD_SELF_SIGNATURE)
        self.assertIn("ed25519:b_2", error.message)

    def test_tampered_response(self) -> None:
        """A change after signing breaks the self-signature."""
        obj = self.valid()
        obj["valid_until_ts"] += 1
        self.assertRejected(obj, InvalidKeyResponseReason.BAD_SELF_SIGNATURE)

    def test_signature_not_a_string(self) -> None:
        """A signature value that is not a string is rejected."""
        obj = self.valid()
        obj["signatures"][ORIGIN][key_id(self.key)] = 5
        self.assertRejected(obj, InvalidKeyResponseReason.BAD_SELF_SIGNATURE)

    def test_no_verify_keys(self) -> None:
        """A response with no ed25519 verify key is rejected."""
        obj = self.valid()
        obj["verify_keys"] = {}
        self.assertRejected(self.signed(obj), InvalidKeyResponseReason.NO_VERIFY_KEYS)

    def test_old_verify_keys_optional(self) -> None:
        """A response without old_verify_keys parses with no old keys."""
        obj = self.valid()
        del obj["old_verify_keys"]
        self.assertEqual(
            dict(parse_server_keys_response(self.signed(obj), ORIGIN).old_verify_keys), {}
        )

    def test_old_verify_keys_not_object(self) -> None:
        """old_verify_keys as a list is rejected as bad_type."""
        self.assertRejected(
            self.signed({**self.valid(), "old_verify_keys": []}), InvalidKeyResponseReason.BAD_TYPE
        )

    def test_old_key_expired_ts_not_int(self) -> None:
        """An old key with a string expired_ts is rejected as bad_type."""
        obj = self.valid()
        obj["old_verify_keys"] = {"ed25519:o": {"key": encode_base64(b"k" * 32), "expired_ts": "5"}}
        self.assertRejected(self.signed(obj), InvalidKeyResponseReason.BAD_TYPE)

    def test_old_key_missing_expired_ts(self) -> None:
        """An old key without expired_ts is rejected as missing_field."""
        obj = self.valid()
        obj["old_verify_keys"] = {"ed25519:o": {"key": encode_base64(b"k" * 32)}}
        self.assertRejected(self.signed(obj), InvalidKeyResponseReason.MISSING_FIELD)

    def test_old_key_bad_length(self) -> None:
        """An old key of the wrong length is rejected."""
        obj = self.valid()
        obj["old_verify_keys"] = {"ed25519:o": {"key": encode_base64(b"k" * 33), "expired_ts": 1}}
        self.assertRejected(self.signed(obj), InvalidKeyResponseReason.BAD_KEY_LENGTH)

    def test_old_key_bad_id(self) -> None:
        """An old ed25519 key id with bad characters is rejected."""
        obj = self.valid()
        obj["old_verify_keys"] = {"ed25519:o.o": {"key": encode_base64(b"k" * 32), "expired_ts": 1}}
        self.assertRejected(self.signed(obj), InvalidKeyResponseReason.BAD_KEY_ID)

    def test_key_ids_are_anchored_ascii(self) -> None:
        """Validly self-signed keys whose ids end in a newline, use other Unicode digits or
        are over-long are rejected as bad_key_id, current or old."""
        for version in ("a\n", "\u0661", "a\x00", "a" * 248):
            bad = new_signing_key(version)
            obj = make_signed_server_keys(ORIGIN, [self.key, bad], VALID_UNTIL)
            self.assertRejected(obj, InvalidKeyResponseReason.BAD_KEY_ID)
            old = {"ed25519:" + version: (verify_key_bytes(bad), 1)}
            obj = make_signed_server_keys(ORIGIN, [self.key], VALID_UNTIL, old_keys=old)
            self.assertRejected(obj, InvalidKeyResponseReason.BAD_KEY_ID)
        longest = new_signing_key("a" * 247)  # "ed25519:" + 247 = 255 characters
        obj = make_signed_server_keys(ORIGIN, [self.key, longest], VALID_UNTIL)
        self.assertIn(key_id(longest), parse_server_keys_response(obj, ORIGIN).verify_keys)

    def test_other_algorithms_need_the_grammar_too(self) -> None:
        """A key id of another algorithm is skipped only if well formed; a malformed one
        (or one with no algorithm) rejects the answer."""
        for bad_id in ("curve25519:a.b", "curve25519:a\n", "rsa", ":a", "\u00e9:a"):
            obj = self.valid()
            obj["verify_keys"][bad_id] = {"key": "x"}
            self.assertRejected(self.signed(obj), InvalidKeyResponseReason.BAD_KEY_ID)

    def test_bad_key_id_message_is_escaped(self) -> None:
        """The rejection names the bad key id escaped and shortened, never raw."""
        obj = self.valid()
        obj["verify_keys"] = {"ed25519:\ud800\n" + "x" * 500: {"key": "k"}, **obj["verify_keys"]}
        error = self.assertRejected(obj, InvalidKeyResponseReason.BAD_KEY_ID)
        self.assertIn("'ed25519:\\ud800\\nxx", error.message)
        self.assertTrue(error.message.isascii() and error.message.isprintable())
        self.assertLess(len(error.message), 200)

    def test_wrong_server_name_message_is_escaped(self) -> None:
        """A hostile server_name in an answer is shown escaped in the rejection."""
        obj = self.valid()
        obj["server_name"] = "evil\n\u202e" + "e" * 1000
        error = self.assertRejected(obj, InvalidKeyResponseReason.WRONG_SERVER_NAME)
        self.assertIn("'evil\\n\\u202e", error.message)
        self.assertTrue(error.message.isascii() and error.message.isprintable())
        self.assertLess(len(error.message), 300)

    def test_notary_signature_required(self) -> None:
        """With a notary given, an entry without its signature is rejected."""
        notary = make_trusted_key_server(NOTARY, self.notary_key)
        self.assertRejected(
            self.valid(), InvalidKeyResponseReason.BAD_NOTARY_SIGNATURE, notary=notary
        )

    def test_notary_signature_with_unconfigured_key(self) -> None:
        """A notary signature by a key not configured for the notary is rejected."""
        notary = make_trusted_key_server(NOTARY, self.notary_key)
        obj = sign_as(self.valid(), NOTARY, new_signing_key("n_1"))
        self.assertRejected(obj, InvalidKeyResponseReason.BAD_NOTARY_SIGNATURE, notary=notary)

    def test_notary_signature_valid(self) -> None:
        """A correctly co-signed entry is accepted with the notary given."""
        notary = make_trusted_key_server(NOTARY, self.notary_key)
        obj = sign_as(self.valid(), NOTARY, self.notary_key)
        response = parse_server_keys_response(obj, ORIGIN, notary=notary)
        self.assertEqual(list(response.verify_keys), [key_id(self.key)])

    def test_notary_signature_does_not_replace_origin(self) -> None:
        """An entry signed by the notary but not the origin is still rejected."""
        notary = make_trusted_key_server(NOTARY, self.notary_key)
        obj = sign_as(self.valid(), NOTARY, self.notary_key)
        del obj["signatures"][ORIGIN]
        self.assertRejected(obj, InvalidKeyResponseReason.BAD_SELF_SIGNATURE, notary=notary)

    def test_json_bytes_keeps_fields_and_drops_foreign_signatures(self) -> None:
        """json_bytes keeps unknown fields and unsigned but only the origin's signatures."""
        obj = self.valid(tls_fingerprints=[{"sha256": "abc"}], unsigned={"age": 3})
        obj = sign_as(obj, NOTARY, self.notary_key)
        response = parse_server_keys_response(
            obj, ORIGIN, notary=make_trusted_key_server(NOTARY, self.notary_key)
        )
        stored = json.loads(response.json_bytes)
        self.assertEqual(stored["tls_fingerprints"], [{"sha256": "abc"}])
        self.assertEqual(stored["unsigned"], {"age": 3})
        self.assertEqual(list(stored["signatures"]), [ORIGIN])
        expected = dict(obj, signatures={ORIGIN: obj["signatures"][ORIGIN]})
        self.assertEqual(stored, expected)
        # Canonical: sorted keys, no whitespace; and it still verifies on its own.
        self.assertEqual(
            response.json_bytes, json.dumps(stored, sort_keys=True, separators=(",", ":")).encode()
        )
        self.assertEqual(parse_server_keys_response(stored, ORIGIN).json_bytes, response.json_bytes)


class LinearValidationTests(SynchronousTestCase):
    """The key cap, and one encoding shared by every signature check."""

    def setUp(self) -> None:
        self.keys = [new_signing_key("k%d" % i) for i in range(20)]
        self.encoded: list[object] = []

        def counting_encode(value: object, value_count: int) -> bytes:
            self.encoded.append(value)
            return encode_canonical(value, value_count)

        self.patch(validation, "encode_canonical", counting_encode)

    def old_keys(self, count: int) -> dict[str, tuple[bytes, int]]:
        return {"ed25519:old%d" % i: (bytes([i % 256]) * 32, i) for i in range(count)}

    def test_many_self_signed_keys_encode_twice(self) -> None:
        """Twenty self-signed keys are all checked against one encoding (plus one for json_bytes)."""
        obj = make_signed_server_keys(ORIGIN, self.keys, VALID_UNTIL)
        response = parse_server_keys_response(obj, ORIGIN)
        self.assertEqual(len(response.verify_keys), 20)
        self.assertEqual(len(self.encoded), 2)
        unsigned_part = {k: v for k, v in obj.items() if k != "signatures"}
        self.assertEqual(self.encoded[0], unsigned_part)

    def test_notary_signature_shares_the_encoding(self) -> None:
        """The notary's signature is checked against the same bytes as the origin's."""
        notary_key = new_signing_key("n_1")
        obj = sign_as(
            make_signed_server_keys(ORIGIN, self.keys[:3], VALID_UNTIL), NOTARY, notary_key
        )
        notary = make_trusted_key_server(NOTARY, new_signing_key("other"), notary_key)
        parse_server_keys_response(obj, ORIGIN, notary=notary)
        self.assertEqual(len(self.encoded), 2)

    def test_one_bad_signature_among_many_is_found(self) -> None:
        """With twenty keys, one whose signature was made by another key rejects the answer."""
        obj = make_signed_server_keys(ORIGIN, self.keys, VALID_UNTIL)
        obj["signatures"][ORIGIN]["ed25519:k7"] = obj["signatures"][ORIGIN]["ed25519:k8"]
        error = self.assertRaises(InvalidKeyResponseError, parse_server_keys_response, obj, ORIGIN)
        self.assertIs(error.reason, InvalidKeyResponseReason.BAD_SELF_SIGNATURE)
        self.assertIn("ed25519:k7", error.message)

    def test_notary_key_ids_in_the_message_are_escaped_and_capped(self) -> None:
        """The message of an entry without a good notary signature shows the key ids it
        was signed with escaped and at most five of them."""
        notary = make_trusted_key_server(NOTARY, new_signing_key("n_1"))
        obj = make_signed_server_keys(ORIGIN, self.keys[:1], VALID_UNTIL)
        obj["signatures"][NOTARY] = {"ed25519:bad\n%04d" % i: "x" for i in range(100)}
        error = self.assertRaises(
            InvalidKeyResponseError, parse_server_keys_response, obj, ORIGIN, notary
        )
        self.assertIs(error.reason, InvalidKeyResponseReason.BAD_NOTARY_SIGNATURE)
        self.assertTrue(error.message.isascii() and error.message.isprintable(), error.message)
        self.assertIn("'ed25519:bad\\n0000', ", error.message)
        self.assertIn("'ed25519:bad\\n0004' and 95 more", error.message)
        self.assertIn("configured: 'ed25519:n_1'", error.message)

    def test_url_safe_signature_base64_accepted(self) -> None:
        """A signature in URL-safe base64 verifies, as signedjson accepts it."""
        obj = make_signed_server_keys(ORIGIN, self.keys[:1], VALID_UNTIL)
        signature = obj["signatures"][ORIGIN]["ed25519:k0"]
        url_safe = signature.replace("+", "-").replace("/", "_")
        self.assertEqual(decode_base64(url_safe), decode_base64(signature))
        obj["signatures"][ORIGIN]["ed25519:k0"] = url_safe
        self.assertEqual(list(parse_server_keys_response(obj, ORIGIN).verify_keys), ["ed25519:k0"])

    def test_signature_with_characters_outside_base64_rejected(self) -> None:
        """A valid signature with other characters inserted (a lenient decoder would skip
        them) is refused, by the origin and by a notary: such a string is never stored."""
        notary_key = new_signing_key("n_1")
        notary = make_trusted_key_server(NOTARY, notary_key)
        for junk in ("!\n* ", " ", "\u00e9", "="):
            for signer, key in ((ORIGIN, "ed25519:k0"), (NOTARY, key_id(notary_key))):
                obj = sign_as(
                    make_signed_server_keys(ORIGIN, self.keys[:1], VALID_UNTIL), NOTARY, notary_key
                )
                signature = obj["signatures"][signer][key]
                obj["signatures"][signer][key] = signature[:10] + junk + signature[10:]
                error = self.assertRaises(
                    InvalidKeyResponseError, parse_server_keys_response, obj, ORIGIN, notary
                )
                expected = (
                    InvalidKeyResponseReason.BAD_SELF_SIGNATURE
                    if signer == ORIGIN
                    else InvalidKeyResponseReason.BAD_NOTARY_SIGNATURE
                )
                self.assertIs(error.reason, expected, (signer, junk))

    def test_padded_signature_accepted_over_padded_rejected(self) -> None:
        """A correctly padded signature verifies (as the keyring accepts it); excess
        padding does not."""
        obj = make_signed_server_keys(ORIGIN, self.keys[:1], VALID_UNTIL)
        obj["signatures"][ORIGIN]["ed25519:k0"] += "=="
        self.assertEqual(list(parse_server_keys_response(obj, ORIGIN).verify_keys), ["ed25519:k0"])
        obj["signatures"][ORIGIN]["ed25519:k0"] += "=="
        error = self.assertRaises(InvalidKeyResponseError, parse_server_keys_response, obj, ORIGIN)
        self.assertIs(error.reason, InvalidKeyResponseReason.BAD_SELF_SIGNATURE)

    def test_signature_of_wrong_length_rejected(self) -> None:
        """A signature that decodes to fewer than 64 bytes does not verify."""
        obj = make_signed_server_keys(ORIGIN, self.keys[:1], VALID_UNTIL)
        obj["signatures"][ORIGIN]["ed25519:k0"] = encode_base64(b"s" * 63)
        error = self.assertRaises(InvalidKeyResponseError, parse_server_keys_response, obj, ORIGIN)
        self.assertIs(error.reason, InvalidKeyResponseReason.BAD_SELF_SIGNATURE)

    def test_keys_up_to_the_cap_accepted(self) -> None:
        """Current plus old keys exactly at max_keys are accepted."""
        obj = make_signed_server_keys(ORIGIN, self.keys[:2], VALID_UNTIL, old_keys=self.old_keys(3))
        response = parse_server_keys_response(obj, ORIGIN, max_keys=5)
        self.assertEqual((len(response.verify_keys), len(response.old_verify_keys)), (2, 3))

    def test_one_key_over_the_cap_rejected_before_any_work(self) -> None:
        """One key over max_keys (old keys and other algorithms count) is refused unencoded."""
        obj = make_signed_server_keys(ORIGIN, self.keys[:2], VALID_UNTIL, old_keys=self.old_keys(2))
        obj["verify_keys"]["curve25519:x"] = {"key": "junk"}
        error = self.assertRaises(
            InvalidKeyResponseError, parse_server_keys_response, obj, ORIGIN, max_keys=4
        )
        self.assertIs(error.reason, InvalidKeyResponseReason.TOO_MANY_KEYS)
        self.assertIn("5 keys", error.message)
        self.assertIn("at most 4", error.message)
        self.assertEqual(self.encoded, [])

    def test_default_cap(self) -> None:
        """Without max_keys the default cap applies: one key more than it is refused."""
        old_keys = self.old_keys(DEFAULT_MAX_KEYS_PER_RESPONSE)
        obj = make_signed_server_keys(ORIGIN, self.keys[:1], VALID_UNTIL, old_keys=old_keys)
        error = self.assertRaises(InvalidKeyResponseError, parse_server_keys_response, obj, ORIGIN)
        self.assertIs(error.reason, InvalidKeyResponseReason.TOO_MANY_KEYS)
        del old_keys["ed25519:old0"]
        obj = make_signed_server_keys(ORIGIN, self.keys[:1], VALID_UNTIL, old_keys=old_keys)
        response = parse_server_keys_response(obj, ORIGIN)
        self.assertEqual(len(response.old_verify_keys), DEFAULT_MAX_KEYS_PER_RESPONSE - 1)

    def test_lone_surrogate_in_signed_part_fails_the_signature(self) -> None:
        """A string UTF-8 cannot encode in the signed part makes every signature fail."""
        obj = make_signed_server_keys(ORIGIN, self.keys[:1], VALID_UNTIL)
        obj["extra"] = "\ud800"
        error = self.assertRaises(InvalidKeyResponseError, parse_server_keys_response, obj, ORIGIN)
        self.assertIs(error.reason, InvalidKeyResponseReason.BAD_SELF_SIGNATURE)

    def test_lone_surrogate_outside_signed_part_is_bad_type(self) -> None:
        """A lone surrogate in unsigned is a bad_type rejection, not an unexpected error."""
        obj = make_signed_server_keys(ORIGIN, self.keys[:1], VALID_UNTIL)
        obj["unsigned"] = {"note": "\udfff"}
        error = self.assertRaises(InvalidKeyResponseError, parse_server_keys_response, obj, ORIGIN)
        self.assertIs(error.reason, InvalidKeyResponseReason.BAD_TYPE)

    def test_big_answer_gives_the_same_bytes(self) -> None:
        """An answer beyond the C codec's fast path is stored as the same canonical bytes."""
        padding = list(range(FAST_PATH_MAX_VALUES))
        obj = make_signed_server_keys(ORIGIN, self.keys[:2], VALID_UNTIL, extra={"pad": padding})
        response = parse_server_keys_response(obj, ORIGIN)
        self.assertEqual(response.json_bytes, encode_canonical_json(obj))
        self.assertEqual(len(response.verify_keys), 2)


def reference_check(value: Any, path: str = "", depth: int = 0) -> int:
    """check_json_types's rules written recursively, visiting children last first; paths
    and outside values in messages are quoted as :func:`quote_untrusted` does."""
    where = quote_untrusted(path, max_chars=120) if path else "/"
    fail = InvalidKeyResponseError
    if depth > 100:
        raise fail(
            InvalidKeyResponseReason.BAD_TYPE, "JSON nested deeper than 100 levels at " + where
        )
    if isinstance(value, (bool, str)) or value is None:
        return 1
    if isinstance(value, int):
        if abs(value) > 2**53 - 1:
            message = "integer %s at %s is outside the canonical JSON range" % (
                quote_untrusted(value),
                where,
            )
            raise fail(InvalidKeyResponseReason.INT_OUT_OF_RANGE, message)
        return 1
    if isinstance(value, float):
        message = "floats are not allowed in canonical JSON, found %r at %s" % (value, where)
        raise fail(InvalidKeyResponseReason.FLOAT_NOT_ALLOWED, message)
    if isinstance(value, dict):
        bad_keys = [key for key in value if not isinstance(key, str)]
        if bad_keys:
            message = "non-string object key %s at %s" % (quote_untrusted(bad_keys[0]), where)
            raise fail(InvalidKeyResponseReason.BAD_TYPE, message)
        items = list(value.items())
    elif isinstance(value, list):
        items = [(str(index), child) for index, child in enumerate(value)]
    else:
        message = "%s at %s is not a JSON value" % (type(value).__name__, where)
        raise fail(InvalidKeyResponseReason.BAD_TYPE, message)
    joined = [(key if not path else path + "." + key, child) for key, child in items]
    return 1 + sum(reference_check(child, where, depth + 1) for where, child in reversed(joined))


# JSON-like values with every kind of mistake mixed in.
messy_values: Any = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**54), 2**54)
    | st.floats(allow_nan=False)
    | st.text(max_size=3)
    | st.frozensets(st.integers(), max_size=1),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=3) | st.integers(0, 3), children, max_size=4)
    ),
    max_leaves=25,
)


class CheckJsonTypesTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(messy_values)
    def test_same_verdict_as_the_recursive_rules(self, value: Any) -> None:
        """The walk counts, or rejects with the same first error, as the recursive rules."""
        try:
            expected: Any = reference_check(value)
        except InvalidKeyResponseError as e:
            expected = (e.reason, e.message)
        try:
            actual: Any = check_json_types(value)
        except InvalidKeyResponseError as e:
            actual = (e.reason, e.message)
        self.assertEqual(actual, expected)

    def test_depth_limit_applies_to_scalars_too(self) -> None:
        """A scalar 101 levels down is refused; 100 levels down is accepted."""
        for levels, ok in ((100, True), (101, False)):
            value: Any = 0
            for _ in range(levels):
                value = [value]
            if ok:
                self.assertEqual(check_json_types(value), levels + 1)
            else:
                error = self.assertRaises(InvalidKeyResponseError, check_json_types, value)
                self.assertIn("nested deeper than 100", error.message)

    def test_accepts_plain_json(self) -> None:
        """Objects, arrays, strings, ints, booleans and null pass, and every value is counted."""
        self.assertEqual(check_json_types({"a": [1, "x", True, None, {"b": -5}]}), 8)

    def test_rejects_float_in_list(self) -> None:
        """A float inside an array is reported with its path."""
        error = self.assertRaises(InvalidKeyResponseError, check_json_types, {"a": [0, 0.0]})
        self.assertEqual(error.reason, InvalidKeyResponseReason.FLOAT_NOT_ALLOWED)
        self.assertIn("a.1", error.message)

    def test_rejects_non_json_value(self) -> None:
        """A Python value that JSON cannot hold (a set) is bad_type."""
        error = self.assertRaises(InvalidKeyResponseError, check_json_types, {"a": {1}})
        self.assertEqual(error.reason, InvalidKeyResponseReason.BAD_TYPE)

    def test_long_key_is_not_copied_for_each_level_below_it(self) -> None:
        """Values below a long key are checked without building their paths: no copy of
        the key is made per level (paths used to be built for every container, which
        made checking quadratic in the answer's size)."""
        long_key = "A" * 200_000
        nested: Any = 0
        for _ in range(50):
            nested = [nested, []]
        value = {long_key: nested}
        tracemalloc.start()
        try:
            count = check_json_types(value)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertEqual(count, 1 + 50 * 2 + 1)
        self.assertLess(peak, len(long_key))

    def test_long_key_holding_many_arrays(self) -> None:
        """A long key holding many arrays is counted, and an error below it shows the
        path cut to 120 characters."""
        long_key = "A" * 50_000
        self.assertEqual(check_json_types({long_key: [[] for _ in range(10_000)]}), 10_002)
        error = self.assertRaises(
            InvalidKeyResponseError, check_json_types, {long_key: [[], [0.5]]}
        )
        self.assertIs(error.reason, InvalidKeyResponseReason.FLOAT_NOT_ALLOWED)
        self.assertIn("found 0.5 at %s" % quote_untrusted(long_key, max_chars=120), error.message)

    def test_rejects_deep_nesting(self) -> None:
        """Nesting beyond 100 levels is refused without recursion errors."""
        value: Any = 1
        for _ in range(5000):
            value = [value]
        error = self.assertRaises(InvalidKeyResponseError, check_json_types, value)
        self.assertEqual(error.reason, InvalidKeyResponseReason.BAD_TYPE)


class DecodeKeyBase64Tests(SynchronousTestCase):
    def test_unpadded_and_padded(self) -> None:
        """Unpadded and padded base64 of 32 bytes decode to the same bytes."""
        raw = bytes(range(32))
        self.assertEqual(decode_key_base64(encode_base64(raw), "k"), raw)
        self.assertEqual(decode_key_base64(encode_base64(raw) + "=", "k"), raw)

    def test_over_padded_key_rejected_as_the_config_rejects_it(self) -> None:
        """A key with more padding than base64 needs is refused, by the same rule as a
        key in the configuration."""
        text = encode_base64(bytes(range(32))) + "=="
        self.assertRaises(ConfigError, as_verify_key_bytes, text, ("k",))
        error = self.assertRaises(InvalidKeyResponseError, decode_key_base64, text, "k")
        self.assertIs(error.reason, InvalidKeyResponseReason.BAD_KEY_LENGTH)

    def test_rejects_urlsafe_and_garbage(self) -> None:
        """Characters outside standard base64 are refused rather than silently dropped."""
        for text in ["A" * 42 + "-", "A" * 20 + "\n" + "A" * 23, "", 5]:
            error = self.assertRaises(InvalidKeyResponseError, decode_key_base64, text, "k")
            self.assertIn(
                error.reason,
                (InvalidKeyResponseReason.BAD_KEY_LENGTH, InvalidKeyResponseReason.BAD_TYPE),
            )
