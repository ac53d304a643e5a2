"""End-to-end notary tests: requester → our KeyQueryResource → NotaryService → fake origins.

Everything runs on a ``Clock`` with ``StubTreq``-backed fake servers; no real network.
"""

import functools
import json
import logging
from typing import Any, Optional

from signedjson.key import decode_verify_key_bytes
from signedjson.sign import verify_signed_json
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from unpaddedbase64 import decode_base64

from keyring_module.config import HOUR_MS, NotaryConfig, RateLimitConfig
from keyring_module.fetchers.chain import KeyFetcherChain
from keyring_module.fetchers.notary_client import NotaryKeyFetcher
from keyring_module.fetchers.origin import OriginKeyFetcher
from keyring_module.model import KeyRequest
from keyring_module.notary.caches import CoSigner
from keyring_module.notary.service import NotaryService
from keyring_module.ratelimit import OriginRateLimiter
from keyring_module.resources.key_query import KeyQueryResource
from keyring_module.resources.tree import build_key_resource, build_root
from keyring_module.signing import OwnKeys, ServerKeyPublisher
from keyring_module.storage import KeyStore
from keyring_module.storage.cache import CachedKeyStore
from keyring_module.storage.errors import StorageUnavailableError
from keyring_module.storage.memory import InMemoryKeyStore
from tests.fakes import FakeFederationClient, FakeOriginResource, HangingResource
from tests.memory import traced_bytes
from tests.storage_writer import make_response
from tests.utils import key_id, make_signed_server_keys, make_trusted_key_server, new_signing_key

NOTARY = "notary.test"
ORIGIN = "origin.test"
DAY_MS = 24 * HOUR_MS
START_S = 1_700_000_000


class NotaryTestCase(SynchronousTestCase):
    #: Whether the notary reads through the in-memory cache (as deployed) or the bare store.
    cached_store = True

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START_S)
        self.origin_key = new_signing_key("o1")
        self.origin = FakeOriginResource(self.origin_key, ORIGIN, self.clock)
        self.slow = HangingResource()
        self.outbound = FakeFederationClient({ORIGIN: self.origin, "slow.test": self.slow})
        self.backend = InMemoryKeyStore()
        self.store: KeyStore = (
            CachedKeyStore(self.backend, self.clock, 1000, 10_000)
            if self.cached_store
            else self.backend
        )
        limiter = OriginRateLimiter(self.clock, RateLimitConfig(), random=lambda: 0.5)
        origin_fetcher = OriginKeyFetcher(self.outbound, limiter, self.clock)
        chain = KeyFetcherChain(self.store, origin_fetcher, None, self.clock)
        self.notary_key = new_signing_key("n1")
        self.own_keys = OwnKeys(NOTARY, [self.notary_key])
        self.publisher = ServerKeyPublisher(self.own_keys, self.clock, DAY_MS)
        self.notary = NotaryService(
            self.own_keys, self.publisher, self.store, chain, self.clock, 10_000
        )
        self.config = NotaryConfig(max_servers_per_request=3, max_request_body=4096)
        self.root = build_root(
            build_key_resource(self.publisher, KeyQueryResource(self.notary, self.config))
        )
        self.http = StubTreq(self.root)

    # -- helpers -----------------------------------------------------------------------

    def now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    def request(
        self, method: str, path: str, body: Any = None, raw: Optional[bytes] = None, **kw: Any
    ) -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        d = self.http.request(  # type: ignore[attr-defined]
            method, "https://" + NOTARY + path, data=data, **kw
        )
        for _ in range(3):
            self.http.flush()
            self.outbound.flush()
        response = self.successResultOf(d)
        content = self.successResultOf(response.content())
        self.assertEqual(response.headers.getRawHeaders(b"Content-Type"), [b"application/json"])
        return response.code, json.loads(content)

    def raw_request(self, method: str, path: str, data: Optional[bytes] = None) -> bytes:
        """The body of a 200 answer, as bytes (not decoded)."""
        d = self.http.request(  # type: ignore[attr-defined]
            method, "https://" + NOTARY + path, data=data
        )
        for _ in range(3):
            self.http.flush()
            self.outbound.flush()
        response = self.successResultOf(d)
        content: bytes = self.successResultOf(response.content())
        self.assertEqual(response.code, 200, content[:200])
        return content

    def count_store_reads(self) -> list[str]:
        """From now on, record the name of every read the notary makes of its store."""
        reads: list[str] = []
        for name in ("get_server_keys", "get_many_server_keys", "get_server_responses"):
            original = getattr(self.store, name)

            def counting(*args: Any, _name: str = name, _original: Any = original) -> Any:
                reads.append(_name)
                return _original(*args)

            self.patch(self.store, name, counting)
        return reads

    def post(self, server_keys: Any) -> list[dict[str, Any]]:
        code, body = self.request("POST", "/_matrix/key/v2/query", {"server_keys": server_keys})
        self.assertEqual(code, 200, body)
        result: list[dict[str, Any]] = body["server_keys"]
        return result

    def assert_cosigned(self, entry: dict[str, Any]) -> None:
        """The entry carries the origin's signature and exactly one valid one of ours."""
        self.assertEqual(set(entry["signatures"]), {entry["server_name"], NOTARY})
        ours = entry["signatures"][NOTARY]
        self.assertEqual(len(ours), 1)
        published = json.loads(self.publisher.response_bytes())["verify_keys"]
        (our_key_id,) = ours
        self.assertIn(our_key_id, published)
        verify_signed_json(
            entry,
            NOTARY,
            decode_verify_key_bytes(our_key_id, decode_base64(published[our_key_id]["key"])),
        )
        origin_key_id = key_id(self.origin_key)
        if origin_key_id in entry["verify_keys"]:
            verify_signed_json(
                entry,
                entry["server_name"],
                decode_verify_key_bytes(
                    origin_key_id, decode_base64(entry["verify_keys"][origin_key_id]["key"])
                ),
            )


class FreshnessTests(NotaryTestCase):
    def test_cold_query_fetches_and_cosigns(self) -> None:
        """A cold POST fetches from the origin once and returns its JSON co-signed."""
        entries = self.post({ORIGIN: {key_id(self.origin_key): {"minimum_valid_until_ts": 0}}})
        self.assertEqual(len(entries), 1)
        self.assertEqual(self.origin.hits, 1)
        expected = self.origin.keys_json()
        got = dict(entries[0])
        got["signatures"] = {ORIGIN: got["signatures"][ORIGIN]}
        self.assertEqual(got, expected)
        self.assert_cosigned(entries[0])
        # A second query with a met minimum is answered from the cache.
        self.post({ORIGIN: {key_id(self.origin_key): {"minimum_valid_until_ts": 0}}})
        self.assertEqual(self.origin.hits, 1)

    def test_expired_key_returned_when_nothing_else(self) -> None:
        """SyTest: an expired key is served with its exact valid_until_ts when nothing better exists."""
        self.origin.valid_for_ms = -HOUR_MS  # the origin only ever serves an expired key
        minimum = self.now_ms() + 60_000
        criteria = {ORIGIN: {key_id(self.origin_key): {"minimum_valid_until_ts": minimum}}}
        first = self.post(criteria)
        self.assertEqual(self.origin.hits, 1)
        expired_until = first[0]["valid_until_ts"]
        self.assertLess(expired_until, self.now_ms())
        # Seconds later the minimum is still not met: the origin is asked again.
        self.clock.advance(2)
        second = self.post(criteria)
        self.assertEqual(self.origin.hits, 2)
        self.assertEqual(len(second), 1)
        # Now the origin fails (400); the stored expired key is still served, unchanged.
        self.origin.code = 400
        self.origin.body_override = {"errcode": "M_UNKNOWN", "error": "gone"}
        self.clock.advance(2)
        third = self.post(criteria)
        self.assertEqual(self.origin.hits, 3)
        self.assertEqual(len(third), 1)
        newest_stored = second[0]["valid_until_ts"]
        self.assertEqual(third[0]["valid_until_ts"], newest_stored)
        self.assertLess(newest_stored, self.now_ms())
        self.assert_cosigned(third[0])

    def test_valid_key_not_overwritten_by_spurious_result(self) -> None:
        """SyTest: after the origin drops key_1 for key_2, key_1 is still served for a met minimum."""
        key_1 = key_id(self.origin_key)
        self.post({ORIGIN: {key_1: {"minimum_valid_until_ts": 0}}})
        new_key = new_signing_key("o2")
        self.origin.signing_keys = [new_key]
        # A query that forces a fetch stores the new response...
        self.clock.advance(60)
        entries = self.post({ORIGIN: {key_id(new_key): {"minimum_valid_until_ts": 0}}})
        self.assertEqual(self.origin.hits, 2)
        self.assertEqual(list(entries[0]["verify_keys"]), [key_id(new_key)])
        # ...and key_1 is still answered, from the response that held it.
        entries = self.post({ORIGIN: {key_1: {"minimum_valid_until_ts": self.now_ms()}}})
        self.assertEqual(self.origin.hits, 2)
        self.assertEqual(len(entries), 1)
        self.assertEqual(list(entries[0]["verify_keys"]), [key_1])
        # All keys: both responses.
        code, body = self.request(
            "GET", "/_matrix/key/v2/query/" + ORIGIN + "?minimum_valid_until_ts=0"
        )
        self.assertEqual(code, 200)
        self.assertEqual(
            sorted(k for e in body["server_keys"] for k in e["verify_keys"]),
            sorted([key_1, key_id(new_key)]),
        )

    def test_half_life_refresh_in_background(self) -> None:
        """Past half-life a met minimum is answered at once and refreshed in the background."""
        criteria = {ORIGIN: {key_id(self.origin_key): {"minimum_valid_until_ts": 0}}}
        first = self.post(criteria)
        self.clock.advance(11 * 3600)
        self.post(criteria)
        self.assertEqual(self.origin.hits, 1, "before half-life: no refresh")
        self.clock.advance(2 * 3600)
        self.origin.hold = True  # the refresh hangs: the answer must not wait for it
        answer = self.post(criteria)
        self.assertEqual(answer[0]["valid_until_ts"], first[0]["valid_until_ts"])
        self.assertEqual(self.origin.hits, 2, "a background refresh was started")
        self.origin.release()
        self.outbound.flush()
        refreshed = self.post(criteria)
        self.assertGreater(refreshed[0]["valid_until_ts"], first[0]["valid_until_ts"])

    def test_no_minimum_means_now_and_half_life(self) -> None:
        """Without a minimum, an entry past its half-life is fetched before answering."""
        criteria: dict[str, Any] = {ORIGIN: {key_id(self.origin_key): {}}}
        first = self.post(criteria)
        self.clock.advance(13 * 3600)
        second = self.post(criteria)
        self.assertEqual(self.origin.hits, 2)
        self.assertGreater(second[0]["valid_until_ts"], first[0]["valid_until_ts"])

    def test_all_keys_queries_refresh_like_others(self) -> None:
        """GET /query/{server} and POST {} follow the same freshness rules as key queries."""
        code, body = self.request("GET", "/_matrix/key/v2/query/" + ORIGIN)
        self.assertEqual((code, len(body["server_keys"])), (200, 1))
        self.assertEqual(self.origin.hits, 1)
        self.post({ORIGIN: {}})
        self.assertEqual(self.origin.hits, 1, "fresh: answered from the cache")
        self.clock.advance(13 * 3600)
        self.post({ORIGIN: {}})
        self.assertEqual(self.origin.hits, 2, "past half-life without a minimum: fetched first")
        self.clock.advance(13 * 3600)
        self.request("GET", "/_matrix/key/v2/query/" + ORIGIN)
        self.assertEqual(self.origin.hits, 3)

    def test_stale_served_when_origin_fails(self) -> None:
        """A needed fetch that fails still gets the last stored response, even expired."""
        first = self.post({ORIGIN: {}})
        self.clock.advance(2 * 86400)  # the stored response has expired
        self.origin.code = 500
        entries = self.post(
            {ORIGIN: {key_id(self.origin_key): {"minimum_valid_until_ts": self.now_ms()}}}
        )
        self.assertEqual(self.origin.hits, 2)
        self.assertEqual(entries[0]["valid_until_ts"], first[0]["valid_until_ts"])

    def test_bad_origin_answer_never_replaces_good_keys(self) -> None:
        """Invalid origin answers (wrong server, bad signature, not JSON) leave the stored keys alone."""
        good = self.post({ORIGIN: {}})
        bad_bodies: list[Any] = []
        wrong_name = self.origin.keys_json()
        wrong_name["server_name"] = "evil.test"
        bad_bodies.append(wrong_name)
        tampered = self.origin.keys_json()
        tampered["valid_until_ts"] = int(str(tampered["valid_until_ts"])) + 1
        bad_bodies.append(tampered)
        for body in bad_bodies:
            self.origin.body_override = body
            self.clock.advance(60)
            entries = self.post(
                {
                    ORIGIN: {
                        key_id(self.origin_key): {
                            "minimum_valid_until_ts": self.now_ms() + 7 * DAY_MS
                        }
                    }
                }
            )
            self.assertEqual(entries[0]["valid_until_ts"], good[0]["valid_until_ts"])
        self.origin.body_override = None
        self.origin.raw_body = b"not json"
        self.clock.advance(3600)
        entries = self.post({ORIGIN: {}})
        self.assertEqual(len(entries), 1)
        self.assertEqual(entries[0]["valid_until_ts"], good[0]["valid_until_ts"])

    def test_unreachable_origin_left_out(self) -> None:
        """An unreachable origin with nothing stored is left out of a 200 answer."""
        self.assertEqual(self.post({"nowhere.test": {}}), [])
        code, body = self.request("GET", "/_matrix/key/v2/query/nowhere.test")
        self.assertEqual((code, body), (200, {"server_keys": []}))

    def test_self_query_needs_no_network(self) -> None:
        """A query about our own server is answered from our keys with no outbound request."""
        entries = self.post({NOTARY: {}})
        code, body = self.request(
            "GET", "/_matrix/key/v2/query/" + NOTARY + "?minimum_valid_until_ts=0"
        )
        self.assertEqual(self.outbound.requests, [])
        self.assertEqual(entries, [json.loads(self.publisher.response_bytes())])
        self.assertEqual(body["server_keys"], [json.loads(self.publisher.response_bytes())])
        verify_signed_json(
            entries[0],
            NOTARY,
            decode_verify_key_bytes(key_id(self.notary_key), self.notary_key.verify_key.encode()),
        )

    def test_self_queries_with_junk_key_ids_share_one_cached_answer(self) -> None:
        """Questions about our own server naming ever new key ids (GET or POST) reuse one
        kept answer, since our answer does not depend on them."""
        for i in range(10):
            code, body = self.request(
                "GET", "/_matrix/key/v2/query/%s/ed25519:junk%d" % (NOTARY, i)
            )
            self.assertEqual(
                (code, body["server_keys"]), (200, [json.loads(self.publisher.response_bytes())])
            )
            self.post({NOTARY: {"ed25519:j%d" % i: {}}})
            self.post({NOTARY: {"ed25519:j%d" % i: {}}, ORIGIN: {}})
        self.assertEqual(self.origin.hits, 1)
        self.assertEqual(len(self.notary.answer_cache), 2)

    def test_slow_origin_bounded_by_timeout(self) -> None:
        """A hanging origin holds the batch for at most the request timeout; others are answered."""
        d = self.http.request(  # type: ignore[attr-defined]
            "POST",
            "https://" + NOTARY + "/_matrix/key/v2/query",
            data=json.dumps({"server_keys": {ORIGIN: {}, "slow.test": {}}}).encode(),
        )
        self.http.flush()
        self.assertNoResult(d)
        self.clock.advance(9.9)
        self.http.flush()
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.http.flush()
        response = self.successResultOf(d)
        body = json.loads(self.successResultOf(response.content()))
        self.assertEqual([e["server_name"] for e in body["server_keys"]], [ORIGIN])
        self.assertEqual(self.slow.hits, 1)

    def test_deprecated_get_with_key_id_orders_answer(self) -> None:
        """GET /query/{server}/{keyId} answers all keys, those holding keyId first."""
        key_1 = key_id(self.origin_key)
        self.post({ORIGIN: {key_1: {"minimum_valid_until_ts": 0}}})
        key_2 = new_signing_key("o2")
        self.origin.signing_keys = [key_2]
        self.clock.advance(60)
        self.post({ORIGIN: {key_id(key_2): {"minimum_valid_until_ts": 0}}})
        for wanted in (key_1, key_id(key_2)):
            code, body = self.request(
                "GET",
                "/_matrix/key/v2/query/%s/%s?minimum_valid_until_ts=0"
                % (ORIGIN, wanted.replace(":", "%3A")),
            )
            self.assertEqual(code, 200)
            self.assertEqual(len(body["server_keys"]), 2)
            self.assertIn(wanted, body["server_keys"][0]["verify_keys"])

    def test_cosigned_bytes_cached(self) -> None:
        """Repeated answers reuse the co-signed bytes: no signing on the hot path."""
        self.post({ORIGIN: {}})
        calls = []
        original = CoSigner._sign

        def counting(cosigner: CoSigner, response: Any) -> Any:
            calls.append(response.response_id)
            return original(cosigner, response)

        self.patch(CoSigner, "_sign", counting)
        for _ in range(5):
            self.post({ORIGIN: {}})
        self.assertEqual(calls, [])


class StoreOutageTests(NotaryTestCase):
    def test_store_down_is_503_json(self) -> None:
        """With the database unreachable and nothing in memory, queries get 503 JSON."""

        async def down(*args: Any) -> Any:
            raise StorageUnavailableError("connection refused")

        for name in ("get_server_keys", "get_many_server_keys", "get_server_responses"):
            self.patch(self.backend, name, down)
        code, body = self.request("POST", "/_matrix/key/v2/query", {"server_keys": {ORIGIN: {}}})
        self.assertEqual((code, body["errcode"]), (503, "M_UNKNOWN"))
        self.assertEqual(body["retry_after_ms"], 5000)
        # Our own keys need no database.
        self.assertEqual(len(self.post({NOTARY: {}})), 1)

    def test_store_down_serves_memory(self) -> None:
        """With the database down, what the in-memory cache holds is still served."""
        first = self.post({ORIGIN: {}})

        async def down(*args: Any) -> Any:
            raise StorageUnavailableError("connection refused")

        for name in ("get_server_keys", "get_many_server_keys", "get_server_responses"):
            self.patch(self.backend, name, down)
        self.clock.advance(60)  # past the memory cache's TTL: the backend is asked, fails
        self.assertEqual(self.post({ORIGIN: {}}), first)


class ConcurrencyLimitTests(NotaryTestCase):
    def start_post(self, server_keys: Any) -> Any:
        d = self.http.request(  # type: ignore[attr-defined]
            "POST",
            "https://" + NOTARY + "/_matrix/key/v2/query",
            data=json.dumps({"server_keys": server_keys}).encode(),
        )
        self.http.flush()
        return d

    def test_over_limit_is_429_and_recovers(self) -> None:
        """Past notary.max_concurrent_requests queries get 429 until one finishes; cached ones pass."""
        self.config = NotaryConfig(max_concurrent_requests=2)
        self.http = StubTreq(
            build_root(
                build_key_resource(self.publisher, KeyQueryResource(self.notary, self.config))
            )
        )
        cached = self.post({NOTARY: {}})  # answered at once, and kept in the answer cache
        self.origin.hold = True
        first = self.start_post({ORIGIN: {}})
        second = self.start_post({ORIGIN: {"ed25519:x": {}}})
        self.assertNoResult(first)
        self.assertNoResult(second)
        code, body = self.request("POST", "/_matrix/key/v2/query", {"server_keys": {"x.test": {}}})
        self.assertEqual(
            (code, body["errcode"], body["retry_after_ms"]), (429, "M_LIMIT_EXCEEDED", 1000)
        )
        code, _ = self.request("GET", "/_matrix/key/v2/query/x.test")
        self.assertEqual(code, 429)
        self.assertEqual(self.post({NOTARY: {}}), cached, "cached answers are never refused")
        self.origin.release()
        for _ in range(3):
            self.outbound.flush()
            self.http.flush()
        self.assertEqual(self.successResultOf(first).code, 200)
        self.assertEqual(self.successResultOf(second).code, 200)
        self.assertEqual(self.post({"x.test": {}}), [], "slots are free again")

    def test_empty_question_is_answered_at_once(self) -> None:
        """``{"server_keys": {}}`` is answered at once, even with every slot taken."""
        self.config = NotaryConfig(max_concurrent_requests=1)
        resource = KeyQueryResource(self.notary, self.config)
        self.http = StubTreq(build_root(build_key_resource(self.publisher, resource)))
        self.origin.hold = True
        pending = self.start_post({ORIGIN: {}})
        self.assertEqual(resource._in_flight, 1)
        self.assertEqual(self.post({}), [])
        self.origin.release()
        for _ in range(3):
            self.outbound.flush()
            self.http.flush()
        self.assertEqual(self.successResultOf(pending).code, 200)

    def test_disconnected_client_frees_its_slot(self) -> None:
        """A query whose client went away does not keep its slot."""
        self.config = NotaryConfig(max_concurrent_requests=1)
        resource = KeyQueryResource(self.notary, self.config)
        self.http = StubTreq(build_root(build_key_resource(self.publisher, resource)))
        self.origin.hold = True
        pending = self.start_post({ORIGIN: {}})
        self.assertEqual(resource._in_flight, 1)
        pending.cancel()  # the client disconnects
        self.http.flush()
        self.failureResultOf(pending)
        self.assertEqual(resource._in_flight, 0)

    def test_failing_query_frees_its_slot(self) -> None:
        """A query that fails with an unexpected error (500) does not keep its slot:
        the next query that needs a fetch is answered."""
        self.config = NotaryConfig(max_concurrent_requests=1)
        resource = KeyQueryResource(self.notary, self.config)
        self.http = StubTreq(build_root(build_key_resource(self.publisher, resource)))
        self.origin.hold = True
        answer_plan = self.notary.answer_plan

        held: "defer.Deferred[None]" = defer.Deferred()

        async def failing(*args: Any) -> bytes:
            await held
            raise RuntimeError("a bug")

        self.patch(self.notary, "answer_plan", failing)
        pending = self.start_post({ORIGIN: {}})
        self.assertEqual(resource._in_flight, 1)
        with self.assertLogs("keyring_module", logging.ERROR):
            held.callback(None)
            self.http.flush()
        self.assertEqual(self.successResultOf(pending).code, 500)
        self.assertEqual(resource._in_flight, 0)
        self.patch(self.notary, "answer_plan", answer_plan)
        self.origin.hold = False
        self.assertEqual(self.post({ORIGIN: {}})[0]["server_name"], ORIGIN)


class InputValidationTests(NotaryTestCase):
    def assert_error(self, code: int, errcode: str, method: str, path: str, **kw: Any) -> None:
        got_code, body = self.request(method, path, **kw)
        self.assertEqual((got_code, body.get("errcode")), (code, errcode), body)
        self.assertIn("error", body)

    def test_not_json(self) -> None:
        """A body that is not JSON gets 400 M_NOT_JSON."""
        for raw in (b"not json", b"\xff\xfe", b'{"server_keys": NaN}', b""):
            self.assert_error(400, "M_NOT_JSON", "POST", "/_matrix/key/v2/query", raw=raw)

    def test_bad_shapes(self) -> None:
        """Wrong shapes get 400 M_BAD_JSON."""
        body: Any
        for body in (
            [],
            {},
            {"server_keys": []},
            {"server_keys": {ORIGIN: None}},
            {"server_keys": {ORIGIN: []}},
            {"server_keys": {ORIGIN: {"ed25519:a": 5}}},
        ):
            self.assert_error(400, "M_BAD_JSON", "POST", "/_matrix/key/v2/query", body=body)

    def test_bad_minimum(self) -> None:
        """A non-integer or negative minimum gets 400 M_INVALID_PARAM."""
        for value in (-1, 1.5, "5", True, 2**64):
            self.assert_error(
                400,
                "M_INVALID_PARAM",
                "POST",
                "/_matrix/key/v2/query",
                body={"server_keys": {ORIGIN: {"ed25519:a": {"minimum_valid_until_ts": value}}}},
            )
        for text in ("-1", "abc", "1.5", "1e3", "99999999999999999999"):
            self.assert_error(
                400,
                "M_INVALID_PARAM",
                "GET",
                "/_matrix/key/v2/query/%s?minimum_valid_until_ts=%s" % (ORIGIN, text),
            )

    def test_bad_server_names_never_fetched(self) -> None:
        """Invalid server names get 400 M_INVALID_PARAM and cause no fetch."""
        for name in ("bad name", "a" * 256, "x:99999", "[::1", "exa_mple.org"):
            self.assert_error(
                400,
                "M_INVALID_PARAM",
                "POST",
                "/_matrix/key/v2/query",
                body={"server_keys": {name: {}}},
            )
        self.assert_error(400, "M_INVALID_PARAM", "GET", "/_matrix/key/v2/query/bad%20name")
        self.assertEqual(self.outbound.requests, [])

    def test_too_many_servers(self) -> None:
        """More servers than notary.max_servers_per_request get 400 M_INVALID_PARAM."""
        body: Any = {"server_keys": {"s%d.test" % i: {} for i in range(4)}}
        self.assert_error(400, "M_INVALID_PARAM", "POST", "/_matrix/key/v2/query", body=body)
        self.assertEqual(self.outbound.requests, [])

    def test_body_too_large(self) -> None:
        """A body over notary.max_request_body gets 413 M_TOO_LARGE."""
        body: Any = {
            "server_keys": {ORIGIN: {"ed25519:a": {}}},
            "pad": "x" * 5000,
        }
        self.assert_error(413, "M_TOO_LARGE", "POST", "/_matrix/key/v2/query", body=body)

    def test_empty_query_and_auth_header(self) -> None:
        """{"server_keys": {}} gives [] and an X-Matrix Authorization header is ignored."""
        code, body = self.request(
            "POST",
            "/_matrix/key/v2/query",
            {"server_keys": {}},
            headers={b"Authorization": [b'X-Matrix origin="a.test",key="ed25519:x",sig="bad"']},
        )
        self.assertEqual((code, body), (200, {"server_keys": []}))

    def test_wrong_method_and_paths(self) -> None:
        """Wrong methods get 405 and unknown sub-paths 404, both M_UNRECOGNIZED."""
        self.assert_error(405, "M_UNRECOGNIZED", "GET", "/_matrix/key/v2/query")
        self.assert_error(405, "M_UNRECOGNIZED", "POST", "/_matrix/key/v2/query/" + ORIGIN)
        self.assert_error(404, "M_UNRECOGNIZED", "GET", "/_matrix/key/v2/query/%s/a/b" % ORIGIN)
        self.assert_error(404, "M_UNRECOGNIZED", "GET", "/_matrix/key/v2/query/%s/a/b/0" % ORIGIN)


class RequesterEndToEndTests(NotaryTestCase):
    def test_notary_fetcher_through_our_notary(self) -> None:
        """Our NotaryKeyFetcher, talking to our notary, gets the origin's keys validated."""
        requester_client = FakeFederationClient({NOTARY: self.root})
        limiter = OriginRateLimiter(self.clock, RateLimitConfig())
        fetcher = NotaryKeyFetcher(
            requester_client,
            [make_trusted_key_server(NOTARY, self.notary_key)],
            limiter,
            self.clock,
        )
        d = defer.ensureDeferred(
            fetcher.fetch_keys(
                {ORIGIN: KeyRequest(ORIGIN, frozenset([key_id(self.origin_key)]), self.now_ms())}
            )
        )
        for _ in range(3):
            requester_client.flush()
            self.outbound.flush()
        answers = self.successResultOf(d)
        self.assertEqual(answers.failures, {})
        (result,) = answers.results[ORIGIN]
        self.assertEqual(result.source, "notary:" + NOTARY)
        self.assertEqual(
            result.response.verify_keys,
            {key_id(self.origin_key): self.origin_key.verify_key.encode()},
        )
        sent = requester_client.requests_to(NOTARY)[0].body
        self.assertEqual(
            sent,
            {
                "server_keys": {
                    ORIGIN: {key_id(self.origin_key): {"minimum_valid_until_ts": self.now_ms()}}
                }
            },
        )


class AnswerCacheTests(NotaryTestCase):
    """Whole answers to repeated identical queries are reused only while they are right."""

    def test_repeated_query_served_without_store_reads(self) -> None:
        """An identical query for fresh servers is answered from the answer cache."""
        body: dict[str, Any] = {ORIGIN: {}, NOTARY: {}}
        first = self.post(body)
        second = self.post(body)  # cached now: both servers fresh
        reads = self.count_store_reads()
        third = self.post(body)
        self.assertEqual(reads, [])
        self.assertEqual(first, second)
        self.assertEqual(second, third)
        self.assertEqual(self.origin.hits, 1)

    def test_store_write_invalidates(self) -> None:
        """A key write in this process of the server asked about makes the next
        identical query look at the store; a write of another server does so only when
        the store does not tell which server it wrote (the plain store)."""
        self.post({ORIGIN: {}})
        self.post({ORIGIN: {}})
        other_key = new_signing_key("x1")
        self.outbound._stubs["other.test"] = StubTreq(
            FakeOriginResource(other_key, "other.test", self.clock)
        )
        self.post({"other.test": {}})  # fetched and stored: a write
        reads = self.count_store_reads()
        self.post({ORIGIN: {}})
        self.assertEqual(reads != [], not self.cached_store)
        self.post({ORIGIN: {}})  # cached again
        response = make_response(ORIGIN, self.now_ms() + DAY_MS, {"ed25519:new": b"n" * 32})
        self.successResultOf(
            defer.ensureDeferred(self.store.store_server_keys(response, "origin", self.now_ms()))
        )
        reads.clear()
        self.post({ORIGIN: {}})
        self.assertNotEqual(reads, [])

    def test_expires_at_half_life(self) -> None:
        """A cached answer is not reused past the half-life of the keys it holds."""
        self.origin.valid_for_ms = 6000  # half-life 3 s after the fetch
        self.post({ORIGIN: {}})
        self.post({ORIGIN: {}})
        reads = self.count_store_reads()
        self.clock.advance(2)
        self.post({ORIGIN: {}})
        self.assertEqual(reads, [], "before the half-life: cached")
        self.clock.advance(1.5)
        self.post({ORIGIN: {}})
        self.assertNotEqual(reads, [], "past the half-life: judged again")
        self.assertEqual(self.origin.hits, 2, "and refetched")

    def test_fetched_answers_not_cached(self) -> None:
        """An answer that needed a fetch (or had a miss) is not kept whole."""
        self.post({ORIGIN: {}, "nowhere.test": {}})
        self.post({ORIGIN: {}, "nowhere.test": {}})
        reads = self.count_store_reads()
        self.post({ORIGIN: {}, "nowhere.test": {}})
        self.assertNotEqual(reads, [])


class AnswerCacheOnPlainStoreTests(AnswerCacheTests):
    """The same, with the notary on a store without the in-memory cache: its own write
    counter still invalidates cached answers."""

    cached_store = False


class NormalisedAnswerCacheTests(NotaryTestCase):
    """Requests that ask the same thing share one cached answer, however they are written,
    and the caches stay bounded in bytes."""

    def setUp(self) -> None:
        super().setUp()
        self.config = NotaryConfig(max_servers_per_request=10, max_request_body=4096)
        self.http = StubTreq(
            build_root(
                build_key_resource(self.publisher, KeyQueryResource(self.notary, self.config))
            )
        )

    def test_junk_parameter_gets_share_one_big_answer(self) -> None:
        """Hundreds of junk-parameter GETs for one ~900 KB stored answer keep one copy of it."""
        self.origin.body_override = make_signed_server_keys(
            ORIGIN,
            [self.origin_key],
            self.now_ms() + DAY_MS,
            extra={"padding": "x" * 900_000},
        )
        path = "/_matrix/key/v2/query/" + ORIGIN
        first = self.raw_request("GET", path)
        self.assertGreater(len(first), 900_000)
        for i in range(300):
            minimum = self.now_ms() + i * 60_000
            variant = (
                "%s?junk=%d" % (path, i),
                "%s/?junk=%d&minimum_valid_until_ts=%d" % (path, i, minimum),
                "%s?minimum_valid_until_ts=%d&junk%d=%s" % (path, minimum, i, "y" * 100),
            )[i % 3]
            self.assertEqual(self.raw_request("GET", variant), first)
        self.assertEqual(self.origin.hits, 1)
        self.assertEqual(len(self.notary.answer_cache), 1)
        one_copy = len(first) + 10_000
        self.assertLess(self.notary.answer_cache.total_bytes, one_copy)
        self.assertLess(self.notary.cosigned_cache.total_bytes, one_copy)
        assert isinstance(self.store, CachedKeyStore)
        self.assertLess(self.store.total_bytes, one_copy)

    def test_a_repeated_post_body_is_not_parsed_again(self) -> None:
        """A POST body seen before whose answer is cached skips parsing; the memo of
        bodies stays within its byte budget however many distinct bodies arrive."""
        from keyring_module.resources import key_query

        body = json.dumps({"server_keys": {ORIGIN: {}}}).encode()
        self.raw_request("POST", "/_matrix/key/v2/query", body)  # fetched, not cached
        first = self.raw_request("POST", "/_matrix/key/v2/query", body)  # cached
        parsed: list[bytes] = []
        real_parse = key_query.parse_query_body

        def counting_parse(raw: bytes, limit: int) -> Any:
            parsed.append(raw)
            return real_parse(raw, limit)

        self.patch(key_query, "parse_query_body", counting_parse)
        self.assertEqual(self.raw_request("POST", "/_matrix/key/v2/query", body), first)
        self.assertEqual(parsed, [])
        for i in range(700):  # distinct junk bodies asking the same thing
            junk = json.dumps({"server_keys": {ORIGIN: {}}, "junk": "z" * 1000 + str(i)})
            self.assertEqual(
                self.raw_request("POST", "/_matrix/key/v2/query", junk.encode()), first
            )
        self.assertEqual(len(parsed), 700)
        resource = self.http._agent._rootResource.children[b"_matrix"]  # type: ignore[attr-defined]
        seen = resource.children[b"key"].children[b"v2"].children[b"query"]._seen_posts
        self.assertLessEqual(seen.total_bytes, key_query.SEEN_POSTS_BYTES)
        self.assertEqual(len(self.notary.answer_cache), 1)

    def test_memo_of_post_bodies_holds_about_its_budget(self) -> None:
        """The memo of parsed POST bodies really holds about its byte budget (measured),
        whatever the bodies' shape: many servers, many key ids, or many small bodies."""
        from keyring_module.resources import key_query

        def remember_all(resource: KeyQueryResource, bodies: list[bytes]) -> None:
            for body in bodies:
                self.successResultOf(defer.ensureDeferred(resource._parse_post(body)))

        budget = 1024 * 1024
        self.patch(key_query, "SEEN_POSTS_BYTES", budget)
        config = NotaryConfig(max_servers_per_request=10_000, max_request_body=2 * 1024 * 1024)
        shapes: dict[str, list[dict[str, Any]]] = {
            "servers": [{"s%d-%d.example" % (i, j): {} for j in range(1000)} for i in range(8)],
            "key ids": [
                {"k%d.example" % i: {"ed25519:k%d" % j: {} for j in range(2000)}} for i in range(12)
            ],
            "minimums": [
                {
                    "m%d-%d.example" % (i, j): {"ed25519:a": {"minimum_valid_until_ts": j}}
                    for j in range(500)
                }
                for i in range(8)
            ],
            "small": [{"x%d.example" % i: {}} for i in range(4000)],
        }
        for shape, server_keys in shapes.items():
            bodies = [json.dumps({"server_keys": keys}).encode() for keys in server_keys]
            for body in bodies:  # names checked once beforehand (their verdicts are memoised)
                key_query.parse_query_body(body, 10_000)
            resource = KeyQueryResource(self.notary, config)
            _, held = traced_bytes(functools.partial(remember_all, resource, bodies))
            self.assertLess(held, 1.25 * budget, shape)
            self.assertGreater(len(resource._seen_posts), 0, shape)

    def test_a_post_is_parsed_and_normalised_once(self) -> None:
        """A POST whose answer is not cached is parsed and normalised once; sent again
        while its answer still is not cached, it is neither parsed nor normalised again."""
        from keyring_module.notary import query, service
        from keyring_module.resources import key_query

        calls: list[str] = []
        real_parse, real_normalise = key_query.parse_query_body, query.normalise_queries

        def counting_parse(raw: bytes, limit: int, **kwargs: Any) -> Any:
            calls.append("parse")
            return real_parse(raw, limit, **kwargs)

        def counting_normalise(*args: Any) -> Any:
            calls.append("normalise")
            return real_normalise(*args)

        self.patch(key_query, "parse_query_body", counting_parse)
        self.patch(service, "normalise_queries", counting_normalise)
        body = json.dumps({"server_keys": {ORIGIN: {}, "nowhere.test": {}}}).encode()
        self.raw_request("POST", "/_matrix/key/v2/query", body)  # fetched: not kept
        self.assertEqual(calls, ["parse", "normalise"])
        self.raw_request("POST", "/_matrix/key/v2/query", body)  # one server left out
        self.assertEqual(len(self.notary.answer_cache), 0)
        self.assertEqual(calls, ["parse", "normalise"])

    def test_post_order_whitespace_and_minimums_share_one_answer(self) -> None:
        """Reordered servers and key ids, whitespace and met minimums reuse one answer."""
        origin_key_id = key_id(self.origin_key)
        self.post({ORIGIN: {}, NOTARY: {}})
        now = self.now_ms()
        bodies = [
            b'{"server_keys":{"%s":{},"%s":{}}}' % (ORIGIN.encode(), NOTARY.encode()),
            b' {\n "server_keys" : { "%s" : { } ,\t"%s" : {} } }  '
            % (NOTARY.encode(), ORIGIN.encode()),
            json.dumps(
                {"server_keys": {NOTARY: {}, ORIGIN: {}}, "junk": list(range(100))}
            ).encode(),
            json.dumps({"server_keys": {ORIGIN: {}, NOTARY: {"ed25519:x": {}}}, "x": 1}).encode(),
        ]
        answers = [self.raw_request("POST", "/_matrix/key/v2/query", body) for body in bodies]
        self.assertEqual(len(set(answers[:3])), 1)
        reads = self.count_store_reads()
        for minimum in (None, now, now + HOUR_MS):
            criteria: dict[str, Any] = (
                {} if minimum is None else {"minimum_valid_until_ts": minimum}
            )
            reordered = {NOTARY: {}, ORIGIN: {origin_key_id: criteria}}
            self.post(reordered)
            self.post({ORIGIN: {origin_key_id: criteria}, NOTARY: {}})
        # Two questions: all keys of both, and one key id of the origin (the key id
        # asked of our own server in the last body makes no other question).
        self.assertEqual(len(self.notary.answer_cache), 2)
        self.assertEqual(self.origin.hits, 1)
        # One read of the keys; the one key id's response was co-signed already, so
        # the stored responses are not read.
        self.assertEqual(reads, ["get_many_server_keys"])

    def test_minimum_above_what_the_answer_meets_is_fetched(self) -> None:
        """A cached answer never serves a minimum its keys do not meet: that one fetches."""
        self.post({ORIGIN: {}})
        self.post({ORIGIN: {}})
        self.assertEqual(self.origin.hits, 1)
        beyond = self.now_ms() + 2 * DAY_MS
        self.post({ORIGIN: {key_id(self.origin_key): {"minimum_valid_until_ts": beyond}}})
        self.assertEqual(self.origin.hits, 2)

    def test_answers_list_servers_by_name(self) -> None:
        """Servers are answered in the order of their names, however they were asked."""
        entries = self.post({ORIGIN: {}, NOTARY: {}})
        self.assertEqual([e["server_name"] for e in entries], sorted([NOTARY, ORIGIN]))

    def test_get_answers_are_reused(self) -> None:
        """A repeated GET is answered from the answer cache, with no store read."""
        path = "/_matrix/key/v2/query/%s?minimum_valid_until_ts=0" % ORIGIN
        self.raw_request("GET", path)  # fetched: not kept
        first = self.raw_request("GET", path)  # from fresh stored copies: kept
        reads = self.count_store_reads()
        self.assertEqual(self.raw_request("GET", path + "&x=1"), first)
        self.assertEqual(reads, [])

    def test_unknown_preferred_key_ids_make_no_entries(self) -> None:
        """Deprecated GETs naming key ids the server never had are answered, not kept."""
        self.post({ORIGIN: {}})
        reference = self.raw_request("GET", "/_matrix/key/v2/query/%s" % ORIGIN)
        for i in range(50):
            path = "/_matrix/key/v2/query/%s/ed25519:junk%d" % (ORIGIN, i)
            self.assertEqual(self.raw_request("GET", path), reference)
        self.assertEqual(len(self.notary.answer_cache), 1)
        known = "/_matrix/key/v2/query/%s/%s" % (ORIGIN, key_id(self.origin_key))
        self.raw_request("GET", known)
        self.assertEqual(len(self.notary.answer_cache), 2, "a stored key id is its own question")
