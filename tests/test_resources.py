"""HTTP tests of /_matrix/key/v2/server, JSON errors and /health (through StubTreq), and
of broken input sent to the notary as raw bytes."""

import json
from typing import Any

from canonicaljson import encode_canonical_json
from nacl.signing import VerifyKey as NaclVerifyKey
from signedjson.key import generate_signing_key
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from unpaddedbase64 import decode_base64

from keyring_module.config import HOUR_MS
from keyring_module.errors import RequestError
from keyring_module.resources._json import FALLBACK_ERROR_BODY, error_body
from keyring_module.resources.health import HealthResource
from keyring_module.resources.tree import build_key_resource, build_root
from keyring_module.signing import OwnKeys, ServerKeyPublisher
from tests.notary_site import RawNotarySite

BASE = "http://notary.test"


def strip_signatures_from_raw(raw: bytes) -> bytes:
    """Cut the ``"signatures"`` member out of canonical JSON bytes, without re-encoding."""
    text = raw.decode("utf-8")
    marker = '"signatures":'
    start = text.index(marker)
    _, end = json.JSONDecoder().raw_decode(text, start + len(marker))
    if text[end] == ",":
        end += 1
    elif text[start - 1] == ",":
        start -= 1
    return (text[:start] + text[end:]).encode("utf-8")


class ServerKeyResourceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.key = generate_signing_key("a_abc")
        self.publisher = ServerKeyPublisher(
            OwnKeys("notary.test", [self.key]), self.clock, 24 * HOUR_MS
        )
        self.healthy = True

        async def check() -> None:
            if not self.healthy:
                raise RuntimeError("database is gone")

        root = build_root(build_key_resource(self.publisher), HealthResource(check))
        self.treq = StubTreq(root)

    def request(
        self, method: str, path: str, **kwargs: Any
    ) -> tuple[int, dict[bytes, list[bytes]], bytes]:
        d = self.treq.request(  # type: ignore[attr-defined]
            method, BASE + path, **kwargs
        )
        self.treq.flush()
        response = self.successResultOf(d)
        body = self.successResultOf(response.content())
        return response.code, dict(response.headers.getAllRawHeaders()), body

    def test_signatures_verify_over_raw_bytes(self) -> None:
        """Every signature verifies against the served bytes with signatures cut out, not re-encoded."""
        code, headers, body = self.request("GET", "/_matrix/key/v2/server")
        self.assertEqual(code, 200)
        self.assertEqual(headers[b"Content-Type"], [b"application/json"])
        obj = json.loads(body)
        self.assertEqual(encode_canonical_json(obj), body, "the body is canonical JSON")
        signed_part = strip_signatures_from_raw(body)
        self.assertNotIn(b"signatures", signed_part)
        sigs = obj["signatures"]["notary.test"]
        self.assertEqual(set(sigs), set(obj["verify_keys"]))
        for key_id, sig in sigs.items():
            verify_key = NaclVerifyKey(decode_base64(obj["verify_keys"][key_id]["key"]))
            verify_key.verify(signed_part, decode_base64(sig))  # raises if invalid

    def test_required_fields_and_validity(self) -> None:
        """The answer has every required field and is valid between now+1h and now+7d."""
        _, _, body = self.request("GET", "/_matrix/key/v2/server")
        obj = json.loads(body)
        for field in (
            "server_name",
            "verify_keys",
            "old_verify_keys",
            "signatures",
            "valid_until_ts",
        ):
            self.assertIn(field, obj)
        now_ms = int(self.clock.seconds() * 1000)
        self.assertGreaterEqual(obj["valid_until_ts"], now_ms + HOUR_MS)
        self.assertLessEqual(obj["valid_until_ts"], now_ms + 7 * 24 * HOUR_MS)
        self.assertEqual(obj["old_verify_keys"], {})

    def test_trailing_slash_and_deprecated_key_id(self) -> None:
        """/server/, /server/{keyId} (escaped or not) serve the very same bytes."""
        _, _, expected = self.request("GET", "/_matrix/key/v2/server")
        for path in (
            "/_matrix/key/v2/server/",
            "/_matrix/key/v2/server/ed25519:a_abc",
            "/_matrix/key/v2/server/ed25519%3Aa_abc",
            "/_matrix/key/v2/server/ed25519%3Aunknown/",
        ):
            code, headers, body = self.request("GET", path)
            self.assertEqual((code, body), (200, expected), path)
            self.assertEqual(headers[b"Content-Type"], [b"application/json"])

    def test_unknown_paths_are_json_404(self) -> None:
        """Unknown paths under /_matrix/key get 404 M_UNRECOGNIZED as JSON."""
        for path in (
            "/_matrix/key/v1",
            "/_matrix/key/v2",
            "/_matrix/key/v2/nope",
            "/_matrix/key/v2/server/a/b",
            "/_matrix/key/v2/query",  # notary not mounted in this tree
            "/_matrix",
            "/",
        ):
            code, headers, body = self.request("GET", path)
            self.assertEqual(code, 404, path)
            self.assertEqual(headers[b"Content-Type"], [b"application/json"], path)
            self.assertEqual(json.loads(body)["errcode"], "M_UNRECOGNIZED", path)

    def test_wrong_method_is_json_405(self) -> None:
        """POST/PUT/DELETE on /server get 405 M_UNRECOGNIZED as JSON."""
        for method in ("POST", "PUT", "DELETE"):
            code, headers, body = self.request(method, "/_matrix/key/v2/server")
            self.assertEqual(code, 405, method)
            self.assertEqual(
                json.loads(body), {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}
            )
            self.assertEqual(headers[b"Allow"], [b"GET, HEAD"])

    def test_serving_costs_no_signing(self) -> None:
        """Repeated requests return the same cached bytes object (no signing, no encoding)."""
        first = self.publisher.response_bytes()
        self.request("GET", "/_matrix/key/v2/server")
        self.assertIs(self.publisher.response_bytes(), first)

    def test_health(self) -> None:
        """/health is 200 while the check passes and 503 with JSON when it fails."""
        code, _, body = self.request("GET", "/health")
        self.assertEqual((code, json.loads(body)), (200, {"status": "ok"}))
        self.healthy = False
        code, _, body = self.request("GET", "/health")
        self.assertEqual(code, 503)
        self.assertEqual(json.loads(body)["status"], "unavailable")
        code, _, _ = self.request("POST", "/health")
        self.assertEqual(code, 405)


class ErrorBodyTests(SynchronousTestCase):
    def test_unencodable_message_is_escaped(self) -> None:
        """A message echoing a lone surrogate is written with the surrogate escaped."""
        body = error_body(RequestError(400, "M_INVALID_PARAM", "Invalid key id 'a\udc80'"))
        self.assertEqual(
            json.loads(body.decode("utf-8")),
            {"errcode": "M_INVALID_PARAM", "error": "Invalid key id 'a\\udc80'"},
        )

    def test_error_that_cannot_be_encoded_still_gets_a_body(self) -> None:
        """An error whose fields canonical JSON refuses gets the generic 500 body."""
        error = RequestError(429, "M_LIMIT_EXCEEDED", "slow down", retry_after_ms=float("inf"))  # type: ignore[arg-type]
        with self.assertLogs("keyring_module.resources._json", "ERROR"):
            self.assertEqual(error_body(error), FALLBACK_ERROR_BODY)
        self.assertEqual(json.loads(FALLBACK_ERROR_BODY)["errcode"], "M_UNKNOWN")


#: Requests no client should send, and the answer each gets: (method, target, body,
#: status, errcode). Sent as raw bytes, so paths and bodies arrive exactly like this.
BROKEN_INPUTS: list[tuple[bytes, bytes, bytes, int, str]] = [
    # A lone surrogate in a key id (its criteria not even an object), a server name, NUL.
    (b"POST", b"", b'{"server_keys":{"o.test":{"ed25519:\\ud800":5}}}', 400, "M_BAD_JSON"),
    (b"POST", b"", b'{"server_keys":{"\\udfff.test":{}}}', 400, "M_INVALID_PARAM"),
    (b"POST", b"", b'{"server_keys":{"o.test\\u0000":{}}}', 400, "M_INVALID_PARAM"),
    (b"POST", b"", b'{"server_keys":{"o.test:\\u00b9\\u00b2":{}}}', 400, "M_INVALID_PARAM"),
    # Invalid UTF-8, a surrogate encoded in UTF-8 bytes, NaN, nesting beyond the parser.
    (b"POST", b"", b'{"server_keys":{"\xff":{}}}', 400, "M_NOT_JSON"),
    (b"POST", b"", b'{"server_keys":{"\xed\xa0\x80":{}}}', 400, "M_NOT_JSON"),
    (b"POST", b"", b'{"server_keys":{"o.test":{"ed25519:a":NaN}}}', 400, "M_NOT_JSON"),
    (b"POST", b"", b'{"server_keys":' + b"[" * 50_000, 400, "M_NOT_JSON"),
    # Parsable, but deep, huge or odd where a minimum belongs.
    (
        b"POST",
        b"",
        b'{"server_keys":{"o.test":{"ed25519:a":{"minimum_valid_until_ts":'
        + b"[" * 900
        + b"]" * 900
        + b"}}}}",
        400,
        "M_INVALID_PARAM",
    ),
    (
        b"POST",
        b"",
        b'{"server_keys":{"o.test":{"ed25519:a":{"minimum_valid_until_ts":1'
        + b"0" * 4000
        + b"}}}}",
        400,
        "M_INVALID_PARAM",
    ),
    # Paths: newline, invalid UTF-8, encoded surrogate, NUL, Unicode digits, scope id.
    (b"GET", b"/o.test%0A", b"", 400, "M_INVALID_PARAM"),
    (b"GET", b"/%FF", b"", 400, "M_INVALID_PARAM"),
    (b"GET", b"/%ED%A0%80", b"", 400, "M_INVALID_PARAM"),
    (b"GET", b"/o.test%00", b"", 400, "M_INVALID_PARAM"),
    (b"GET", b"/o.test:%C2%B9%C2%B2", b"", 400, "M_INVALID_PARAM"),
    (b"GET", b"/1.2.3.%D9%A4", b"", 400, "M_INVALID_PARAM"),
    (b"GET", b"/[fe80::1%25eth0]", b"", 400, "M_INVALID_PARAM"),
    (b"GET", b"/o.test/ed25519:a%0A", b"", 400, "M_INVALID_PARAM"),
    (b"GET", b"/o.test/ed25519:%ED%A0%80", b"", 400, "M_INVALID_PARAM"),
    (b"GET", b"/o.test?minimum_valid_until_ts=%C2%B9", b"", 400, "M_INVALID_PARAM"),
    (b"GET", b"/o.test?minimum_valid_until_ts=%00", b"", 400, "M_INVALID_PARAM"),
]


class BrokenInputTests(SynchronousTestCase):
    def test_every_broken_input_gets_a_json_answer(self) -> None:
        """Lone surrogates, NUL, invalid UTF-8, Unicode digits and deep nesting in
        bodies and paths each get their 4xx JSON error, and nothing is fetched."""
        site = RawNotarySite()
        for method, path, body, code, errcode in BROKEN_INPUTS:
            target = b"/_matrix/key/v2/query" + path
            response = site.request(method, target, body)
            self.assertIsNotNone(response, target + body[:80])
            assert response is not None
            self.assertEqual(response.headers[b"content-type"], b"application/json")
            self.assertEqual(
                (response.code, response.json()["errcode"]), (code, errcode), target + body[:80]
            )
        self.assertEqual(site.client.requests, [])

    def test_malformed_key_ids_in_a_batch_are_left_out(self) -> None:
        """Key ids outside the grammar (lone surrogate, NUL, newline) name no stored key:
        they are left out of a POST batch instead of failing it, a server asked only
        for such key ids is left out of the answer, and none is fetched."""
        site = RawNotarySite()
        for bad in (b"ed25519:\\ud800", b"ed25519:a\\u0000", b"ed25519:a\\n", b"ed25519:a.b"):
            body = b'{"server_keys":{"o.test":{"%s":{}}}}' % bad
            response = site.request(b"POST", b"/_matrix/key/v2/query", body)
            assert response is not None
            self.assertEqual((response.code, response.json()), (200, {"server_keys": []}), bad)
        self.assertEqual(site.client.requests, [])
        body = b'{"server_keys":{"o.test":{"ed25519:a\\n":{},"ed25519:ok":{}}}}'
        response = site.request(b"POST", b"/_matrix/key/v2/query", body)
        assert response is not None
        self.assertEqual(response.code, 200)
        self.assertEqual([r.server_name for r in site.client.requests], ["o.test"])

    def test_error_echoes_bad_values_escaped(self) -> None:
        """The error names a bad key id or server name escaped and shortened, as ASCII."""
        site = RawNotarySite()
        for body, shown in (
            (b'{"server_keys":{"o.test":{"ed25519:\\ud800\\n":5}}}', "'ed25519:\\ud800\\n'"),
            (b'{"server_keys":{"\\u202e' + b"x" * 5000 + b'":{}}}', "'\\u202exxxx"),
        ):
            response = site.request(b"POST", b"/_matrix/key/v2/query", body)
            assert response is not None
            error = response.json()["error"]
            self.assertIn(shown, error)
            self.assertTrue(error.isascii() and error.isprintable(), error)
            self.assertLess(len(error), 200)
