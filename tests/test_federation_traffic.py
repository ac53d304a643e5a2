"""Acceptance tests: the notary under federation traffic as real peers send it.

Each test goes through the whole wiring (:class:`~tests.notary_site.RawNotarySite`: the
standalone server's site with everything ``KeyringServices`` builds), with fake
origins, an in-memory store and a fake reactor, at the default configuration unless a
test says otherwise. Sources (notaries, hanging and dead origins, the IP policy) are in
``test_federation_traffic_sources.py``.
"""

import itertools
from typing import Any, Optional
from urllib.parse import quote

from signedjson.key import decode_verify_key_bytes
from signedjson.sign import verify_signed_json
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase
from unpaddedbase64 import decode_base64

from keyring_module.clock import now_ms
from tests.fakes import FakeOriginResource, HangingResource
from tests.federation_traffic import (
    DAY_MS,
    SynapseBatch,
    notary_with_origins,
    post_body,
    server_keys,
    unused_clock,
    verify_keys_by_server,
)
from tests.notary_site import NOTARY, START_S, RawResponse, request_bytes
from tests.utils import key_id, make_signed_server_keys, new_signing_key, verify_key_base64

#: The one origin SyTest's key tests talk about (its test server: a name with a port).
SYTEST_ORIGIN = "sytest.test:8800"
QUERY = b"/_matrix/key/v2/query"


class SyTestKeysReplayTests(SynchronousTestCase):
    """SyTest's ``tests/50federation/01keys.pl`` notary tests, replayed in SyTest's order
    against one origin (same name and port throughout), about a second apart.

    SyTest's answers from the origin are set per step on one fake origin that counts the
    requests it gets; where SyTest waits for the notary's request to the origin
    (``await_http_request``), the origin must be asked, or SyTest would wait forever.
    """

    def setUp(self) -> None:
        # The key SyTest's own federation server publishes (its "inbound server").
        self.inbound_key = new_signing_key("inbound")
        self.origin = FakeOriginResource(self.inbound_key, SYTEST_ORIGIN, unused_clock())
        self.site = notary_with_origins({SYTEST_ORIGIN: self.origin})

    def test_notary_tests_pass_in_their_order_against_one_origin(self) -> None:
        """SyTest's four notary tests pass one after another against one origin, a
        second apart, at the default configuration."""
        self.can_act_as_notary(b"GET")
        self.a_second_later()
        self.can_act_as_notary(b"POST")
        self.a_second_later()
        self.returns_an_expired_key_if_it_cannot_find_any_others()
        self.a_second_later()
        self.does_not_overwrite_a_valid_key_with_a_spurious_result()

    # -- SyTest's tests, step by step ------------------------------------------------

    def can_act_as_notary(self, method: bytes) -> None:
        """SyTest's "Federation key API can act as a notary server via a GET/POST request"."""
        step = "can act as a notary server via a %s request" % method.decode()
        self.origin_answers(None, 200)  # SyTest's federation server serves its own key
        wanted = key_id(self.inbound_key)
        if method == b"GET":
            response = self.key_query_via_get(wanted)
        else:
            response = self.key_query_via_post(wanted)
        entries = self.answer(step, response)
        entry = next(
            (
                e
                for e in entries
                if e["server_name"] == SYTEST_ORIGIN and wanted in e.get("verify_keys", {})
            ),
            None,
        )
        self.assertIsNotNone(entry, "%s: no response about %s" % (step, wanted))
        assert entry is not None
        ours = entry["signatures"].get(NOTARY)
        self.assertIsNotNone(ours, "%s: not signed by the notary" % step)
        self.assertEqual(len(ours), 1, "%s: the notary must apply one signature" % step)
        ((our_key_id, signature),) = ours.items()
        self.assertEqual(len(decode_base64(signature)), 64, step)
        verify_signed_json(entry, NOTARY, self.notary_verify_key(our_key_id))

    def returns_an_expired_key_if_it_cannot_find_any_others(self) -> None:
        """SyTest's "Key notary server should return an expired key if it can't find any
        others" (three rounds, the third answered 400 by the origin)."""
        step = "return an expired key"
        key_0 = new_signing_key("key_0")
        kid = key_id(key_0)
        key_expiry = self.now_ms() - DAY_MS
        key_response = make_signed_server_keys(SYTEST_ORIGIN, [key_0], key_expiry)

        # Request 1 populates the notary's store.
        self.origin_answers(key_response, 200)
        self.awaited(step + ", request 1", lambda: self.key_query_via_post(kid))
        self.a_second_later()

        # Request 2: a later minimum forces a refetch; the origin answers the same.
        self.origin_answers(key_response, 200)
        minimum = key_expiry + 1000
        entries = self.awaited(step + ", request 2", lambda: self.key_query_via_post(kid, minimum))
        self.assert_first_entry(step + ", request 2", entries, kid, key_expiry)
        self.a_second_later()

        # Request 3: the origin answers 400; the expired key is still served.
        self.origin_answers({}, 400)
        entries = self.awaited(step + ", request 3", lambda: self.key_query_via_post(kid, minimum))
        self.assert_first_entry(step + ", request 3", entries, kid, key_expiry)

    def does_not_overwrite_a_valid_key_with_a_spurious_result(self) -> None:
        """SyTest's "Key notary server must not overwrite a valid key with a spurious
        result from the origin server" (three rounds)."""
        step = "must not overwrite a valid key"
        key_1 = new_signing_key("key_1")
        kid_1 = key_id(key_1)
        key1_expiry = self.now_ms() - DAY_MS

        # Request 1 for key_1.
        self.origin_answers(make_signed_server_keys(SYTEST_ORIGIN, [key_1], key1_expiry), 200)
        entries = self.awaited(step + ", request 1", lambda: self.key_query_via_post(kid_1))
        self.assert_first_entry(step + ", request 1", entries, kid_1)
        self.a_second_later()

        # Request 2: a later minimum forces a refetch; the origin now lists key_2 only.
        key_2 = new_signing_key("key_2")
        self.origin_answers(
            make_signed_server_keys(SYTEST_ORIGIN, [key_2], key1_expiry + 1000), 200
        )
        self.awaited(step + ", request 2", lambda: self.key_query_via_post(kid_1, self.now_ms()))
        self.a_second_later()

        # Request 3 with the old minimum: key_1 is still served. SyTest does not wait
        # for a request to the origin here; its test server would not know the path.
        self.origin_answers({"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}, 404)
        response = self.key_query_via_post(kid_1, key1_expiry)
        self.assert_first_entry(step + ", request 3", self.answer(step, response), kid_1)

    # -- helpers ---------------------------------------------------------------------

    def now_ms(self) -> int:
        return now_ms(self.site.reactor)

    def a_second_later(self) -> None:
        self.site.reactor.advance(1)
        self.site.deliver()

    def origin_answers(self, body: object, code: int) -> None:
        """What the origin answers from now on (None: its own signed keys)."""
        self.origin.body_override = body
        self.origin.code = code

    def key_query_via_get(self, wanted: str) -> Optional[RawResponse]:
        """SyTest's ``key_query_via_get``: the deprecated GET naming a key id."""
        target = "%s/%s/%s" % (QUERY.decode(), quote(SYTEST_ORIGIN), quote(wanted))
        return self.site.request(b"GET", target.encode())

    def key_query_via_post(self, wanted: str, minimum: int = 0) -> Optional[RawResponse]:
        """SyTest's ``key_query_via_post``: one server, one key id, one minimum."""
        body = post_body({SYTEST_ORIGIN: {wanted: {"minimum_valid_until_ts": minimum}}})
        return self.site.request(b"POST", QUERY, body)

    def answer(self, step: str, response: Optional[RawResponse]) -> list[dict[str, Any]]:
        self.assertIsNotNone(response, "%s: no answer" % step)
        assert response is not None
        self.assertEqual(response.code, 200, "%s: %r" % (step, response.body[:300]))
        body = response.json()
        self.assertIsInstance(body.get("server_keys"), list, step)
        entries: list[dict[str, Any]] = body["server_keys"]
        return entries

    def awaited(self, step: str, send: Any) -> list[dict[str, Any]]:
        """Send a query SyTest sends while awaiting the notary's request to the origin:
        SyTest needs both the answer and that request."""
        asked_before = self.origin.hits
        entries = self.answer(step, send())
        self.assertGreater(
            self.origin.hits,
            asked_before,
            "%s: the notary never asked the origin; SyTest would wait for it forever" % step,
        )
        return entries

    def assert_first_entry(
        self,
        step: str,
        entries: list[dict[str, Any]],
        wanted: str,
        valid_until_ts: Optional[int] = None,
    ) -> None:
        """SyTest's checks on ``server_keys[0]``."""
        self.assertTrue(entries, "%s: server_keys is empty" % step)
        first = entries[0]
        self.assertEqual(first["server_name"], SYTEST_ORIGIN, step)
        self.assertIn(wanted, first["verify_keys"], step)
        if valid_until_ts is not None:
            self.assertEqual(first["valid_until_ts"], valid_until_ts, step)

    def notary_verify_key(self, wanted: str) -> Any:
        """The notary's published key ``wanted``, from its ``/_matrix/key/v2/server``."""
        response = self.site.request(b"GET", b"/_matrix/key/v2/server")
        assert response is not None and response.code == 200
        published = response.json()["verify_keys"][wanted]["key"]
        return decode_verify_key_bytes(wanted, decode_base64(published))


class BigBatchTests(SynchronousTestCase):
    """Synapse's perspectives client sends every queued server in one POST."""

    def test_a_3000_server_synapse_batch_is_answered_in_time(self) -> None:
        """A 3,000-server POST of about 270 KB, built as Synapse builds it, is answered
        200 within request_timeout + 3 s at the default configuration, with every stored
        server in it served from the store."""
        hanging = HangingResource()
        start_ms = START_S * 1000
        batch = SynapseBatch.build(3000, start_ms)
        stored, unknown = batch.server_names[:2900], batch.server_names[2900:]
        site = notary_with_origins(dict.fromkeys(unknown, hanging))
        self.assertEqual(now_ms(site.reactor), start_ms)
        for signed in batch.signed_responses(stored, start_ms + DAY_MS):
            self.successResultOf(
                defer.ensureDeferred(site.store.store_server_keys(signed, "origin", start_ms))
            )
        body = batch.body()
        self.assertTrue(250_000 <= len(body) <= 300_000, len(body))
        timeout_s = site.services.config.federation.request_timeout_ms / 1000

        response = site.request(b"POST", QUERY, body, max_wait_seconds=int(timeout_s) + 10)
        elapsed_s = site.reactor.seconds() - start_ms / 1000

        entries = server_keys(response)
        self.assertLessEqual(elapsed_s, timeout_s + 3)
        served = verify_keys_by_server(entries)
        self.assertEqual(sorted(served), sorted(stored))
        for name in stored:
            self.assertEqual(
                served[name],
                {key_id(batch.signing_keys[name]): verify_key_base64(batch.signing_keys[name])},
            )
        for entry in entries:
            self.assertIn(NOTARY, entry["signatures"], "co-signed")
        fetched = {request.server_name for request in site.client.requests}
        self.assertEqual(fetched, set(unknown), "stored servers are answered from the store")


class CacheableQueriesTests(SynchronousTestCase):
    """Cacheable queries are never 429: ``notary.max_concurrent_requests`` (2 here)
    counts only requests that must wait for a fetch.

    Each test starts with the origin's key stored (by an earlier POST, whose answer
    needed a fetch and so is not kept whole) and both slots held by GETs about two
    hanging origins; it ends by letting the held GETs finish, with those origins left
    out of a 200 (they were waiting, not refused).
    """

    def setUp(self) -> None:
        self.origin_key = new_signing_key("o1")
        self.kid = key_id(self.origin_key)
        self.hanging = HangingResource()
        self.site = notary_with_origins(
            {
                "origin.test": FakeOriginResource(self.origin_key, "origin.test", unused_clock()),
                "slow1.test": self.hanging,
                "slow2.test": self.hanging,
            },
            {"notary": {"max_concurrent_requests": 2}},
        )
        self.origin_keys = {"origin.test": {self.kid: verify_key_base64(self.origin_key)}}
        self.earlier_body = post_body({"origin.test": {self.kid: {"minimum_valid_until_ts": 0}}})
        stored = self.site.request(b"POST", QUERY, self.earlier_body)
        self.assertEqual(verify_keys_by_server(server_keys(stored)), self.origin_keys)
        self.held = [
            self.site.open(request_bytes(b"GET", QUERY + b"/" + name))
            for name in (b"slow1.test", b"slow2.test")
        ]
        self.assertEqual([h.response() for h in self.held], [None, None])
        self.assertEqual(self.hanging.hits, 2, "both held queries are waiting for a fetch")
        self.addCleanup(self.held_queries_end_with_the_origins_left_out)

    def held_queries_end_with_the_origins_left_out(self) -> None:
        timeout_s = self.site.services.config.federation.request_timeout_ms / 1000
        self.site.reactor.advance(timeout_s)
        self.site.deliver()
        for pending in self.held:
            self.assertEqual(server_keys(pending.response()), [])
            pending.close()

    def answered_at_once(self, method: bytes, target: bytes, body: bytes = b"") -> Any:
        return server_keys(self.site.request(method, target, body, max_wait_seconds=0))

    def test_a_get_for_a_stored_key_is_answered(self) -> None:
        """With both slots held, a GET for a stored key gets 200 with that key."""
        entries = self.answered_at_once(b"GET", QUERY + b"/origin.test")
        self.assertEqual(verify_keys_by_server(entries), self.origin_keys)

    def test_a_query_about_ourselves_is_answered(self) -> None:
        """With both slots held, a query about our own server gets 200 with our keys."""
        (entry,) = self.answered_at_once(b"GET", QUERY + b"/" + NOTARY.encode())
        published = self.site.request(b"GET", b"/_matrix/key/v2/server")
        assert published is not None
        self.assertEqual(entry, published.json())

    def test_a_post_about_stored_keys_in_new_bytes_is_answered(self) -> None:
        """With both slots held, a POST about the stored key whose bytes differ from the
        earlier body gets 200 with that key."""
        new_bytes = (
            b'{ "server_keys": { "origin.test": { "%s": { "minimum_valid_until_ts": 0 } } } }'
            % self.kid.encode()
        )
        self.assertNotEqual(new_bytes, self.earlier_body)
        entries = self.answered_at_once(b"POST", QUERY, new_bytes)
        self.assertEqual(verify_keys_by_server(entries), self.origin_keys)


class SpellingVariantsTests(SynchronousTestCase):
    """One host, one limiter entry: however its name is spelled."""

    def test_150_spellings_of_one_host_reach_it_no_more_than_the_limiter_allows(self) -> None:
        """150 valid spellings of one origin (letter case, trailing dot, port with a
        leading zero), asked about in 3 POSTs, reach it at most ``origin_burst`` times
        (plus the tokens regained meanwhile)."""
        signing_key = new_signing_key("o1")
        variants = spellings_of("origin.test", 8448, 150)
        self.assertIn("Origin.Test:8448", variants)
        self.assertIn("origin.test.:8448", variants)
        self.assertIn("origin.test:08448", variants)
        # The host answers to every spelling, signing its keys under the name asked.
        origins = {name: FakeOriginResource(signing_key, name, unused_clock()) for name in variants}
        site = notary_with_origins(origins)
        limits = site.services.config.ratelimit
        start_s = site.reactor.seconds()
        for i in range(3):
            batch = variants[i * 50 : (i + 1) * 50]
            response = site.request(b"POST", QUERY, post_body({name: {} for name in batch}))
            assert response is not None
            self.assertEqual(response.code, 200, response.body[:300])
        elapsed_ms = int((site.reactor.seconds() - start_s) * 1000)
        allowed = limits.origin_burst + elapsed_ms // limits.origin_interval_ms
        reached = sum(origin.hits for origin in origins.values())
        self.assertGreater(reached, 0)
        self.assertLessEqual(reached, allowed)


def spellings_of(host: str, port: int, count: int) -> list[str]:
    """``count`` distinct valid server names for the network target ``host:port``:
    letter case (the usual ones first), a trailing dot, and the port with a leading
    zero.

    Example:
        >>> spellings_of("a.b", 8448, 3)
        ['a.b:8448', 'a.b:08448', 'a.b.:8448']
    """
    usual = [host, ".".join(label.capitalize() for label in host.split(".")), host.upper()]
    usual.append(host.split(".")[0].upper() + host[len(host.split(".")[0]) :])
    letters = [i for i, c in enumerate(host) if c.isalpha()]
    every_case = (
        "".join(
            c.upper() if i in letters and mask >> letters.index(i) & 1 else c
            for i, c in enumerate(host)
        )
        for mask in range(2 ** len(letters))
    )
    names: list[str] = []
    for spelled in itertools.chain(usual, every_case):
        for dot, port_text in itertools.product(("", "."), ("%d" % port, "0%d" % port)):
            name = "%s%s:%s" % (spelled, dot, port_text)
            if name not in names:
                names.append(name)
            if len(names) == count:
                return names
    raise ValueError("fewer than %d spellings of %s" % (count, host))
