"""Property-based fuzzing (Hypothesis) of everything a hostile peer controls.

Four surfaces, each with what must hold for any input:

* **requests to the notary** (methods, paths, query strings, bodies, headers), sent as
  raw HTTP to the site the wiring builds: every request gets a complete JSON answer
  below 500 within the request timeout, and only valid server names are ever fetched;
* **origin answers**, fetched by the notary through the fetcher chain into an in-memory
  store: the notary still answers below 500, every stored key id matches the grammar,
  every stored response validates again, and keys are stored exactly when the answer
  is valid;
* **X-Matrix headers and request bodies**, through ``Keyring.verify_request``: a
  Deferred that fires with the origin or fails with ``KeyVerificationError``, never an
  exception, and a correctly signed request is accepted;
* **event JSON**, through ``Keyring.verify_events``: one Deferred per event, each
  verified or failed with ``KeyVerificationError``.

Examples are derandomized: the same ones, in the same order, on every run, so CI is
stable. Each test runs :data:`MAX_EXAMPLES` of them (more under ``CI=true``, which
``.ci/run`` sets) within a wall-clock budget (:data:`TIME_BUDGET_SECONDS`): examples past
it return at once, so that a slow or busy machine still finishes the module in about a
minute, while at least :data:`MIN_EXAMPLES` must have run. To reproduce a CI failure
locally, run with ``CI=true``.
"""

import base64
import functools
import json
import os
import time
from typing import Any, Callable, Optional, TypeVar, cast
from urllib.parse import quote_from_bytes

from canonicaljson import encode_canonical_json
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy
from nacl.signing import VerifyKey
from signedjson.key import generate_signing_key
from signedjson.sign import sign_json
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from unpaddedbase64 import encode_base64

from keyring_module.errors import KeyVerificationError
from keyring_module.http import InvalidResponseError
from keyring_module.http.body import decode_json
from keyring_module.keyids import is_ed25519_key_id
from keyring_module.roomversions import ROOM_VERSIONS
from keyring_module.servername import is_valid_server_name
from keyring_module.validation import InvalidKeyResponseError, parse_server_keys_response
from tests.fakes import FakeOriginResource, HangingResource
from tests.hostile_inputs import (
    DEEP,
    hostile_json_bytes,
    hostile_text,
    json_bytes,
    json_values,
    key_id_like,
    server_name_like,
)
from tests.notary_site import NOTARY, START_S, RawNotarySite, RawResponse
from tests.utils import key_id, new_signing_key, verify_key_base64

ORIGIN = "origin.test"
SLOW = "slow.test"
QUERY = b"/_matrix/key/v2/query"
DAY_MS = 24 * 60 * 60 * 1000

#: Examples per test: more in CI, fewer for a quick local run of the suite.
MAX_EXAMPLES = 400 if os.environ.get("CI") else 100
#: Wall-clock seconds each test may spend on its examples (5 tests: about a minute).
TIME_BUDGET_SECONDS = 12.0
#: Examples each test must have run within its budget.
MIN_EXAMPLES = 20

#: One profile for every test: the same examples on every run, no example database
#: written to the tree, no per-example deadline (the budget above bounds the total).
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=MAX_EXAMPLES,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def escaped(text: str) -> bytes:
    """A path segment or query value as sent: UTF-8 (lone surrogates as the invalid
    bytes a careless encoder writes), every byte percent-escaped."""
    return quote_from_bytes(text.encode("utf-8", "surrogatepass"), safe=b"").encode("ascii")


def mostly(usual: SearchStrategy[Any], hostile: SearchStrategy[Any]) -> SearchStrategy[Any]:
    """``usual`` three times in four, else ``hostile``: so that whole answers are often
    valid but for one hostile part."""
    return st.sampled_from((usual, usual, usual, hostile)).flatmap(lambda strategy: strategy)


#: Names the fuzzed requests use: near-valid and hostile ones, and the fixture's.
names = mostly(
    server_name_like(), hostile_text(max_size=12) | st.sampled_from([ORIGIN, SLOW, NOTARY])
)


# -- requests to the notary -------------------------------------------------------------

minimums = (
    st.integers(-10, 2**64)
    | json_values(max_leaves=4)
    | st.sampled_from([0, 2**63 - 1, 2**63, DEEP])
)
criteria = json_values(max_leaves=4) | st.dictionaries(
    key_id_like(),
    json_values(max_leaves=3) | st.fixed_dictionaries({"minimum_valid_until_ts": minimums}),
    max_size=3,
)
query_bodies = (
    st.binary(max_size=300)
    | hostile_json_bytes(json_values())
    | hostile_json_bytes(
        st.fixed_dictionaries({"server_keys": st.dictionaries(names, criteria, max_size=4)})
        | st.dictionaries(st.sampled_from(["server_keys", "x"]), json_values(), max_size=2)
    )
)


def get_target(
    name: str, key: Optional[str], minimum: Optional[bytes], junk: Optional[str]
) -> bytes:
    target = QUERY + b"/" + escaped(name)
    if key is not None:
        target += b"/" + escaped(key)
    params = []
    if minimum is not None:
        params.append(b"minimum_valid_until_ts=" + quote_from_bytes(minimum).encode("ascii"))
    if junk is not None:
        params.append(escaped(junk) + b"=1")
    return target + (b"?" + b"&".join(params) if params else b"")


get_targets = st.builds(
    get_target,
    names,
    st.none() | key_id_like(),
    st.none() | st.binary(max_size=24) | st.from_regex(rb"[0-9]{1,21}", fullmatch=True),
    st.none() | hostile_text(max_size=6),
)
other_targets = st.builds(
    lambda prefix, rest: prefix + escaped(rest),
    st.sampled_from([b"/", b"/_matrix/key/v2/", b"/_matrix/key/v2/server/", QUERY + b"/"]),
    hostile_text(max_size=20),
)


def header_bytes(text: str) -> bytes:
    """``text`` as a header value HTTP framing allows: printable ASCII, the rest escaped."""
    return bytes(b for b in text.encode("ascii", "backslashreplace") if 0x20 <= b < 0x7F)


x_matrix_params = st.lists(
    st.tuples(
        st.sampled_from(["origin", "key", "sig", "destination", "ORIGIN", "x"]),
        names | key_id_like() | hostile_text(max_size=10),
        st.booleans(),
    ),
    max_size=5,
)


def x_matrix_header(params: list[tuple[str, str, bool]]) -> str:
    """An ``X-Matrix`` header value from ``(name, value, quoted)`` parameters."""
    parts = []
    for name, value, quoted in params:
        if quoted:
            value = '"%s"' % value.replace("\\", "\\\\").replace('"', '\\"')
        parts.append("%s=%s" % (name, value))
    return "X-Matrix " + ",".join(parts)


#: A well-formed header by the fixture's origin (its signature is wrong), so that what
#: comes after the header (the body) is reached.
PLAUSIBLE_X_MATRIX = 'X-Matrix origin=%s,key="ed25519:o1",sig="%s"' % (ORIGIN, "A" * 86)
x_matrix_headers = (
    st.builds(x_matrix_header, x_matrix_params)
    | hostile_text(max_size=40)
    | st.just(PLAUSIBLE_X_MATRIX)
)
http_headers = st.lists(
    st.tuples(
        st.sampled_from([b"Authorization", b"Content-Type", b"X-Forwarded-For"]),
        x_matrix_headers.map(header_bytes),
    ),
    max_size=2,
)
notary_requests = (
    st.tuples(st.just(b"POST"), st.just(QUERY), query_bodies, http_headers)
    | st.tuples(st.just(b"GET"), get_targets, st.just(b""), http_headers)
    | st.tuples(
        st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS"]),
        other_targets,
        st.binary(max_size=40),
        http_headers,
    )
)


def check_json_answer(test: SynchronousTestCase, response: Optional[RawResponse]) -> Any:
    """The answer is complete, below 500 and a JSON object of the right shape."""
    test.assertIsNotNone(response, "no answer within the wait")
    assert response is not None
    test.assertLess(response.code, 500, response.body[:300])
    test.assertEqual(response.headers.get(b"content-type"), b"application/json")
    body = response.json()
    test.assertIsInstance(body, dict)
    if response.code >= 400:
        test.assertIsInstance(body.get("errcode"), str, body)
        test.assertIsInstance(body.get("error"), str, body)
    return body


class BudgetedTestCase(SynchronousTestCase):
    """A test whose examples (run through :func:`budgeted`) stop once
    :data:`TIME_BUDGET_SECONDS` are spent, and that fails if fewer than
    :data:`MIN_EXAMPLES` ran. After a failure the budget no longer applies, so that
    Hypothesis can shrink the failing example and replay it."""

    def setUp(self) -> None:
        self._deadline = time.monotonic() + TIME_BUDGET_SECONDS
        self._examples_run = 0
        self._failed = False

        def check_examples() -> None:
            self.assertGreaterEqual(self._examples_run, MIN_EXAMPLES, "too few examples ran")

        self.addCleanup(check_examples)


ExampleFunction = TypeVar("ExampleFunction", bound=Callable[..., None])


def budgeted(test: ExampleFunction) -> ExampleFunction:
    """Run an example of a :class:`BudgetedTestCase` test only while its budget lasts."""

    @functools.wraps(test)
    def run(self: BudgetedTestCase, *args: Any, **kwargs: Any) -> None:
        if not self._failed and time.monotonic() > self._deadline:
            return
        self._examples_run += 1
        try:
            test(self, *args, **kwargs)
        except BaseException:
            self._failed = True
            raise

    return cast(ExampleFunction, run)


class NotaryRequestFuzzTests(BudgetedTestCase):
    def setUp(self) -> None:
        super().setUp()
        origin = FakeOriginResource(new_signing_key("o1"), ORIGIN, Clock())
        self.site = RawNotarySite({ORIGIN: origin, SLOW: HangingResource()})
        origin.clock = self.site.reactor

    @FUZZ
    @given(notary_requests)
    @budgeted
    def test_every_request_gets_a_json_answer(
        self, request: tuple[bytes, bytes, bytes, list[tuple[bytes, bytes]]]
    ) -> None:
        """Any request gets a complete JSON answer below 500 within the request timeout,
        and only valid (printable ASCII) server names are ever fetched."""
        method, target, body, headers = request
        response = self.site.request(method, target, body, headers)
        answer = check_json_answer(self, response)
        assert response is not None
        if response.code == 200 and target.startswith(QUERY):
            self.assertIsInstance(answer.get("server_keys"), list, answer)
        for fetched in self.site.client.requests:
            name = fetched.server_name
            self.assertTrue(name.isascii() and name.isprintable(), ascii(name))
            self.assertTrue(is_valid_server_name(name), name)


# -- origin answers ---------------------------------------------------------------------


#: Key versions (the part after ``ed25519:``): valid ones, ones with one hostile
#: character at the end (a trailing newline slips past ``$``), anything.
key_versions = mostly(
    st.from_regex(r"[a-zA-Z0-9_]{1,8}", fullmatch=True),
    st.builds(
        lambda version, end: version + end,
        st.from_regex(r"[a-zA-Z0-9_]{1,8}", fullmatch=True),
        st.sampled_from(["\n", "\x00", "\u0661", ".", "\u00b2", "-"]),
    )
    | hostile_text(1, 6),
)
timestamps = st.integers(-DAY_MS, 40 * DAY_MS).map(lambda offset: START_S * 1000 + offset)


#: How the origin's signature strings may be changed after signing: the URL-safe
#: alphabet or not, then text inserted at a position (characters that are no base64, or
#: padding, possibly in the middle), e.g. ``(10, "!\\n* ", False)``.
SignatureEdit = tuple[int, str, bool]
signature_edits = st.none() | st.tuples(
    st.integers(0, 90),
    st.sampled_from(["!\n* ", " ", "\n", "\x00", "!", "\u00e9", "=", "==", "-", "A", ""]),
    st.booleans(),
)
_URL_SAFE = str.maketrans("+/", "-_")
_STANDARD = str.maketrans("-_", "+/")


def signed_answer(
    versions: list[str],
    server_name: str,
    valid_until_ts: Any,
    old_keys: dict[str, Any],
    extra: dict[str, Any],
    tamper: Optional[str],
    signature_edit: Optional[SignatureEdit] = None,
) -> dict[str, Any]:
    """An origin answer signed by a key per version (when canonical JSON allows), its
    signature strings then changed as ``signature_edit`` says."""
    keys = [generate_signing_key(version) for version in versions]
    obj: dict[str, Any] = {
        **extra,
        "server_name": server_name,
        "valid_until_ts": valid_until_ts,
        "verify_keys": {key_id(k): {"key": verify_key_base64(k)} for k in keys},
        "old_verify_keys": old_keys,
    }
    for key in keys:
        try:
            obj = sign_json(obj, ORIGIN, key)
        except (ValueError, TypeError):
            pass  # not encodable as canonical JSON: left unsigned
    if signature_edit is not None:
        position, inserted, url_safe = signature_edit
        signatures = obj.get("signatures", {}).get(ORIGIN, {})
        for signing_key_id, signature in signatures.items():
            if url_safe:
                signature = signature.translate(_URL_SAFE)
            signatures[signing_key_id] = signature[:position] + inserted + signature[position:]
    if tamper is not None:
        obj[tamper] = "changed after signing"
    return obj


old_key_entries = mostly(
    st.dictionaries(
        key_versions.map(lambda version: "ed25519:" + version),
        st.fixed_dictionaries(
            {
                "key": st.binary(min_size=32, max_size=32).map(encode_base64),
                "expired_ts": st.integers(0, 2**53),
            }
        ),
        max_size=2,
    ),
    st.dictionaries(
        key_id_like(),
        json_values(max_leaves=3)
        | st.fixed_dictionaries(
            {
                "key": st.sampled_from(["A" * 43, "AAAA", ""]) | hostile_text(max_size=44),
                "expired_ts": st.integers(0, 2**53) | json_values(max_leaves=2),
            }
        ),
        max_size=2,
    ),
)
origin_answer_objects = st.builds(
    signed_answer,
    mostly(st.lists(key_versions, min_size=1, max_size=3), st.lists(key_versions, max_size=0)),
    mostly(st.just(ORIGIN), st.sampled_from([ORIGIN + "\n", "other.test"]) | server_name_like()),
    mostly(timestamps, json_values(max_leaves=2)),
    old_key_entries,
    mostly(
        st.dictionaries(
            st.sampled_from(["x", "unsigned", "m.extra"]), st.integers(0, 9), max_size=2
        ),
        st.dictionaries(hostile_text(max_size=8), json_values(max_leaves=4), max_size=2),
    ),
    mostly(st.none(), st.sampled_from(["server_name", "valid_until_ts", "extra_field"])),
    signature_edits,
)
#: Answers that are valid but for their signature strings, which were changed.
signature_edited_objects = st.builds(
    signed_answer,
    st.lists(st.from_regex(r"[a-zA-Z0-9_]{1,8}", fullmatch=True), min_size=1, max_size=2),
    st.just(ORIGIN),
    timestamps,
    st.just({}),
    st.just({}),
    st.none(),
    signature_edits.filter(lambda edit: edit is not None),
)
origin_answers = mostly(
    st.builds(
        json_bytes,
        st.sampled_from([origin_answer_objects, signature_edited_objects]).flatmap(
            lambda objects: objects
        ),
        st.booleans(),
        st.sampled_from([1, 101, 5000]),
    ),
    hostile_json_bytes(json_values()) | st.binary(max_size=200),
)


def check_signatures_independently(test: SynchronousTestCase, json_bytes: bytes) -> None:
    """Every signature of the origin on a stored response, for each of its ed25519 keys,
    is strict base64 (standard or URL-safe alphabet, at most the right padding) of 64
    bytes and verifies, checked without the package's own code: what a strict peer
    checks in the copy we co-sign."""
    obj = json.loads(json_bytes)
    signed = encode_canonical_json(
        {field: value for field, value in obj.items() if field not in ("signatures", "unsigned")}
    )
    for verify_key_id, entry in obj["verify_keys"].items():
        if not verify_key_id.startswith("ed25519:"):
            continue
        signature = obj["signatures"][ORIGIN][verify_key_id]
        test.assertRegex(signature, r"\A[A-Za-z0-9+/_-]+={0,2}\Z")
        padding = "=" * (-len(signature) % 4)
        raw = base64.b64decode(signature.translate(_STANDARD) + padding, validate=True)
        test.assertEqual(len(raw), 64, signature)
        key = entry["key"]
        VerifyKey(base64.b64decode(key + "=" * (-len(key) % 4), validate=True)).verify(signed, raw)


def expected_response(answer: bytes) -> Optional[Any]:
    """The validated response for ``answer``, or None when it is not a valid one."""
    try:
        return parse_server_keys_response(decode_json(answer), ORIGIN)
    except (InvalidResponseError, InvalidKeyResponseError):
        return None


#: A valid answer whose signature holds characters outside base64: a lenient decoder
#: skips them, so it verified (and was stored as it was) until decoding became strict.
SIGNATURE_WITH_JUNK = json_bytes(
    signed_answer(["a1"], ORIGIN, START_S * 1000 + DAY_MS, {}, {}, None, (10, "!\n* ", False)),
    True,
    1,
)


class OriginAnswerFuzzTests(BudgetedTestCase):
    @FUZZ
    @given(origin_answers)
    @example(SIGNATURE_WITH_JUNK)
    @budgeted
    def test_nothing_invalid_is_stored(self, answer: bytes) -> None:
        """Whatever an origin answers, the notary answers below 500, and keys are stored
        exactly when the answer is valid, each with a key id of the grammar and a stored
        response that validates again and whose signatures a strict peer accepts."""
        origin = FakeOriginResource(new_signing_key("o1"), ORIGIN, Clock())
        origin.raw_body = answer
        site = RawNotarySite({ORIGIN: origin})
        body = b'{"server_keys":{"%s":{}}}' % ORIGIN.encode()
        check_json_answer(self, site.request(b"POST", QUERY, body))
        check_json_answer(self, site.request(b"GET", QUERY + b"/" + ORIGIN.encode()))

        stored_keys = self.successResultOf(defer.ensureDeferred(site.store.get_server_keys(ORIGIN)))
        responses = self.successResultOf(
            defer.ensureDeferred(site.store.get_server_responses(ORIGIN))
        )
        self.assertEqual(set(site.store.keys) - {ORIGIN}, set())
        for stored in stored_keys.values():
            self.assertTrue(is_ed25519_key_id(stored.key_id), ascii(stored.key_id))
            self.assertEqual(len(stored.verify_key_bytes), 32)
        for response in responses:
            decoded = json.loads(response.json_bytes)
            self.assertEqual(encode_canonical_json(decoded), response.json_bytes)
            parse_server_keys_response(decoded, ORIGIN)  # raises if it is not valid
            check_signatures_independently(self, response.json_bytes)
        expected = expected_response(answer)
        expected_ids = (
            set() if expected is None else {*expected.verify_keys, *expected.old_verify_keys}
        )
        self.assertEqual(set(stored_keys), expected_ids)


# -- X-Matrix requests ------------------------------------------------------------------

request_bodies = mostly(hostile_json_bytes(json_values()), st.none() | st.binary(max_size=80))
signed_contents = st.none() | json_values(max_leaves=6)


def settle(site: RawNotarySite, until: Callable[[], bool], max_seconds: int = 60) -> None:
    """Let fake time pass (delivering fake answers) until ``until()`` or the limit."""
    for _ in range(max_seconds):
        for _ in range(3):
            site.reactor.advance(0)
            site.client.flush()
        if until():
            return
        site.reactor.advance(1)


def outcome(test: SynchronousTestCase, d: "defer.Deferred[Any]") -> Any:
    """What a fired Deferred gave: its result, or its KeyVerificationError."""
    results: list[Any] = []

    def failed(failure: Failure) -> None:
        results.append(failure)

    d.addCallbacks(results.append, failed)
    test.assertEqual(len(results), 1, "the Deferred has not fired")
    if isinstance(results[0], Failure):
        test.assertIsInstance(results[0].value, KeyVerificationError, results[0].getTraceback())
        return results[0].value
    return results[0]


class XMatrixFuzzTests(BudgetedTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.origin_key = new_signing_key("o1")
        origin = FakeOriginResource(self.origin_key, ORIGIN, Clock())
        self.site = RawNotarySite({ORIGIN: origin})
        origin.clock = self.site.reactor

    def signed_header(self, method: str, uri: str, content: Any) -> Optional[str]:
        """A correct X-Matrix header for ``content``, or None when it cannot be signed."""
        obj: dict[str, Any] = {"method": method, "uri": uri, "origin": ORIGIN}
        obj["destination"] = NOTARY
        if content is not None:
            obj["content"] = content
        try:
            sig = sign_json(obj, ORIGIN, self.origin_key)["signatures"][ORIGIN]
        except (ValueError, TypeError, RecursionError):
            return None
        return 'X-Matrix origin=%s,key="%s",sig="%s"' % (
            ORIGIN,
            key_id(self.origin_key),
            sig[key_id(self.origin_key)],
        )

    @FUZZ
    @given(
        mostly(st.sampled_from([b"GET", b"PUT", "POST"]), st.just(b"\xff")),
        mostly(st.just(b"/_matrix/federation/v1/send/1"), st.binary(max_size=30) | hostile_text()),
        mostly(
            st.lists(st.just(PLAUSIBLE_X_MATRIX), min_size=1, max_size=1),
            st.lists(
                x_matrix_headers
                | hostile_text(max_size=20).map(lambda t: t.encode("utf-8", "surrogatepass")),
                max_size=2,
            ),
        ),
        request_bodies,
    )
    @budgeted
    def test_any_request_fails_cleanly(
        self, method: Any, uri: Any, headers: list[Any], body: Optional[bytes]
    ) -> None:
        """Any method, URI, Authorization headers and body give a Deferred that fires
        with the origin or fails with KeyVerificationError."""
        d = self.site.services.keyring.verify_request(
            method, uri, {"Authorization": headers}, body, NOTARY
        )
        settle(self.site, lambda: d.called)
        result = outcome(self, d)
        if not isinstance(result, KeyVerificationError):
            self.assertTrue(is_valid_server_name(result), ascii(result))

    @FUZZ
    @given(st.sampled_from(["GET", "PUT"]), hostile_text(max_size=12), signed_contents)
    @budgeted
    def test_correctly_signed_requests_are_accepted(
        self, method: str, path: str, content: Any
    ) -> None:
        """A request signed correctly, over any body canonical JSON can hold, is
        accepted."""
        uri = "/_matrix/federation/v1/" + escaped(path).decode("ascii")
        header = self.signed_header(method, uri, content)
        if header is None:
            return
        body = None if content is None else encode_canonical_json(content)
        d = self.site.services.keyring.verify_request(
            method.encode(), uri.encode(), {"Authorization": [header]}, body, NOTARY
        )
        settle(self.site, lambda: d.called)
        self.assertEqual(outcome(self, d), ORIGIN)


# -- events ----------------------------------------------------------------------------

user_ids = st.builds(lambda name: "@u:" + name, names) | json_values(max_leaves=2)
events = st.fixed_dictionaries(
    {},
    optional={
        "sender": user_ids,
        "event_id": st.builds(lambda name: "$e:" + name, names) | json_values(max_leaves=2),
        "origin_server_ts": st.integers(0, 2**53) | json_values(max_leaves=2),
        "type": st.sampled_from(["m.room.member", "m.room.message"]) | hostile_text(),
        "room_id": hostile_text(),
        "content": json_values()
        | st.fixed_dictionaries(
            {},
            optional={
                "membership": st.sampled_from(["join", "invite"]) | hostile_text(),
                "join_authorised_via_users_server": user_ids,
                "third_party_invite": json_values(max_leaves=3),
            },
        ),
        "signatures": json_values(max_leaves=3)
        | st.dictionaries(
            names, st.dictionaries(key_id_like(), hostile_text(max_size=90)), max_size=2
        ),
        "hashes": json_values(max_leaves=2),
        "unsigned": json_values(max_leaves=2),
    },
) | json_values(max_leaves=3)


def nested(depth: int) -> Any:
    """A list nested ``depth`` levels deep (built without recursion)."""
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


#: Enough of an event from the fixture's origin that checking it needs the origin's
#: keys and its signature, so fuzzed fields reach every step of the check.
PLAUSIBLE_EVENT = {
    "type": "m.room.message",
    "room_id": "!r:%s" % ORIGIN,
    "sender": "@u:%s" % ORIGIN,
    "origin_server_ts": START_S * 1000,
    "content": {},
    "hashes": {"sha256": "x"},
    "signatures": {ORIGIN: {"ed25519:o1": "A" * 86}},
}


#: A trusted notary for the keyring (unreachable: what matters is what it is asked).
UPSTREAM_NOTARY = {"server_name": "upstream.test", "verify_keys": {"ed25519:u": "A" * 43}}


class EventFuzzTests(BudgetedTestCase):
    def setUp(self) -> None:
        super().setUp()
        origin = FakeOriginResource(new_signing_key("o1"), ORIGIN, Clock())
        self.site = RawNotarySite({ORIGIN: origin}, {"trusted_key_servers": [UPSTREAM_NOTARY]})
        origin.clock = self.site.reactor

    @FUZZ
    @given(
        st.lists(events, max_size=4),
        st.sampled_from(sorted(ROOM_VERSIONS)),
        st.sampled_from([0, 0, 50, 990, 5000]),
    )
    @budgeted
    def test_every_event_gets_an_outcome(
        self, batch: list[Any], room_version: str, depth: int
    ) -> None:
        """Any batch of events gives one Deferred per event, each verified or failed
        with KeyVerificationError, even with fields nested deeper than any JSON parser
        would allow; only valid server names and key ids are asked for."""
        if batch and isinstance(batch[0], dict):
            batch[0] = {**PLAUSIBLE_EVENT, **batch[0]}
            if depth:
                batch[0]["auth_events"] = nested(depth)  # kept by redaction: signed over
        results = self.site.services.keyring.verify_events(batch, room_version)
        self.assertEqual(len(results), len(batch))
        settle(self.site, lambda: all(d.called for d in results))
        for d in results:
            result = outcome(self, d)
            self.assertTrue(result is None or isinstance(result, KeyVerificationError), result)
        for request in self.site.client.requests:
            self.assertTrue(is_valid_server_name(request.server_name), ascii(request))
            if request.method == "POST":
                for name, criteria in request.body["server_keys"].items():  # type: ignore[index]
                    self.assertTrue(is_valid_server_name(name), ascii(name))
                    self.assertTrue(all(is_ed25519_key_id(k) for k in criteria), ascii(criteria))
