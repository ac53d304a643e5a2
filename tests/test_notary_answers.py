"""The notary's answers and fetch budget under repeated and concurrent traffic.

Background refreshes made once per server and bounded, one batched fetch per request,
budget not spent on backed-off origins, keys rewritten between planning and answering,
copies the store dropped, and clients that go away while a batch is being fetched.
"""

import json
import logging
from typing import Any, Mapping, Optional

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.clock import now_ms
from keyring_module.model import SOURCE_ORIGIN, StoredKey
from keyring_module.notary.service import NotaryService, ServerQuery
from keyring_module.signing import OwnKeys, ServerKeyPublisher
from keyring_module.storage.limits import StoreLimits
from keyring_module.storage.memory import InMemoryKeyStore
from keyring_module.validation import parse_server_keys_response
from tests.fakes import DAY_MS, FakeNotaryResource, HangingResource
from tests.federation_traffic import synapse_body, trusted_notary
from tests.notary_site import RawNotarySite, request_bytes
from tests.test_notary_big_batches import (
    QUERY_PATH,
    REQUEST_TIMEOUT_S,
    SERVER_KEY,
    SERVER_KEY_ID,
    BigBatchTestCase,
    answered,
    server_name,
    skipped,
)
from tests.utils import key_id, make_signed_server_keys, new_signing_key

UPSTREAM = "upstream.test"


def answer_count(site: RawNotarySite, result: str) -> float:
    """``keyring_notary_answers_total`` for ``result`` (0 when never counted)."""
    value = site.services.metrics.registry.get_sample_value(
        "keyring_notary_answers_total", {"result": result}
    )
    return value or 0.0


class CountingChain:
    """Wraps a chain's ``get_keys`` to count the calls still running."""

    def __init__(self, site: RawNotarySite, test: SynchronousTestCase) -> None:
        chain = site.services.fetching.chain
        original = chain.get_keys
        self.running = 0
        self.calls = 0

        async def counting(*args: Any, **kwargs: Any) -> Any:
            self.running += 1
            self.calls += 1
            try:
                return await original(*args, **kwargs)
            finally:
                self.running -= 1

        test.patch(chain, "get_keys", counting)


class BackgroundRefreshTests(BigBatchTestCase):
    """Servers past their half-life are refreshed once at a time, within a global cap."""

    def past_half_life_site(
        self, names: list[str], config: Optional[Mapping[str, Any]] = None
    ) -> RawNotarySite:
        site = RawNotarySite({n: HangingResource() for n in names}, config)
        now = now_ms(site.reactor)
        # Valid for another day, fetched three days ago: past half-life, minimum met.
        self.seed(site, names, now + DAY_MS, now - 3 * DAY_MS)
        return site

    def post(self, site: RawNotarySite, names: list[str]) -> dict[str, Any]:
        body = synapse_body(names, now_ms(site.reactor), SERVER_KEY_ID)
        pending = site.open(request_bytes(b"POST", QUERY_PATH, body))
        response = pending.response()
        assert response is not None and response.code == 200, response
        pending.close()
        return answered(response)

    def test_repeated_queries_refresh_each_server_once(self) -> None:
        """50 identical POSTs about 100 servers past half-life, whose origins hang, are
        all answered at once and start one background refresh of the 100, not 5,000
        (the later POSTs join it, taking none of the client's share)."""
        names = [server_name(i) for i in range(100)]
        # Room for 100 refreshes at once (a quarter of the global cap).
        site = self.past_half_life_site(names, {"federation": {"max_concurrent_fetches": 400}})
        chain = CountingChain(site, self)
        for _ in range(50):
            self.assertEqual(set(self.post(site, names)), set(names))
        self.assertEqual((chain.calls, chain.running), (1, 1))
        notary = site.services.notary
        assert notary is not None
        self.assertEqual(notary.refreshing, frozenset(names))
        self.assertEqual(answer_count(site, "refresh"), 50 * 100)

    def test_a_server_is_refreshed_again_once_its_refresh_is_over(self) -> None:
        """When a background refresh has given up (the origin never answered), the next
        query past half-life refreshes the server again."""
        names = [server_name(0)]
        site = self.past_half_life_site(names)
        chain = CountingChain(site, self)
        self.post(site, names)
        site.reactor.advance(3 * REQUEST_TIMEOUT_S)  # every source has timed out
        self.assertEqual(chain.running, 0)
        notary = site.services.notary
        assert notary is not None
        self.assertEqual(notary.refreshing, frozenset())
        self.post(site, names)
        self.assertEqual(chain.calls, 2)

    def test_refreshes_beyond_the_global_cap_are_skipped_and_served_stale(self) -> None:
        """With ``federation.max_concurrent_fetches: 12`` (3 background refreshes at
        once, a quarter), 5 servers past half-life are all served; 3 are refreshed, 2
        are counted as skipped (``refresh_cap``) and answered as ``stale``, not
        ``fresh``."""
        names = [server_name(i) for i in range(5)]
        site = self.past_half_life_site(names, {"federation": {"max_concurrent_fetches": 12}})
        self.assertEqual(set(self.post(site, names)), set(names))
        notary = site.services.notary
        assert notary is not None
        self.assertEqual(notary.refreshing, frozenset(names[:3]))
        self.assertEqual(skipped(site, "refresh_cap"), 2)
        self.assertEqual(
            [answer_count(site, r) for r in ("refresh", "stale", "fresh")], [3.0, 2.0, 0.0]
        )

    def test_refreshes_beyond_the_request_cap_are_counted_stale(self) -> None:
        """Servers past half-life beyond ``max_fetches_per_request`` are answered and
        counted as ``stale`` (a refresh they needed was skipped), not ``fresh``."""
        names = [server_name(i) for i in range(4)]
        site = self.past_half_life_site(names, {"notary": {"max_fetches_per_request": 1}})
        self.assertEqual(set(self.post(site, names)), set(names))
        self.assertEqual(skipped(site, "refresh_cap"), 3)
        self.assertEqual([answer_count(site, r) for r in ("refresh", "stale")], [1.0, 3.0])


class BatchedFetchTests(SynchronousTestCase):
    """The servers one request fetches are fetched with one call of the chain."""

    def test_a_hundred_dead_origins_a_notary_knows_are_all_served(self) -> None:
        """One POST about 100 servers whose origins are down, all known to the trusted
        notary, is answered with all 100, the notary asked once about them all."""
        upstream_key = new_signing_key("u1")
        start_ms = now_ms(Clock()) + 1_700_000_000_000
        names = ["dead%03d.test" % i for i in range(100)]
        entries = {
            name: [make_signed_server_keys(name, [SERVER_KEY], start_ms + DAY_MS)] for name in names
        }
        upstream = FakeNotaryResource(UPSTREAM, upstream_key, entries)
        site = RawNotarySite(
            {UPSTREAM: upstream}, {"trusted_key_servers": [trusted_notary(UPSTREAM, upstream_key)]}
        )
        response = site.request(
            b"POST", QUERY_PATH, synapse_body(names, now_ms(site.reactor), SERVER_KEY_ID)
        )
        assert response is not None
        self.assertEqual(response.code, 200)
        self.assertEqual(set(answered(response)), set(names))
        self.assertEqual(len(upstream.bodies), 1)
        self.assertEqual(set(upstream.bodies[0]["server_keys"]), set(names))


class BackedOffBudgetTests(BigBatchTestCase):
    """Origins the limiter would refuse now spend none of a request's fetch budget,
    unless a trusted notary could answer for them."""

    dead = [server_name(0), server_name(1)]  # nothing serves them: connection refused
    live = [server_name(2), server_name(3)]

    def batch_twice(self, site: RawNotarySite, times: int = 2) -> list[str]:
        """The same batch twice (or ``times`` times), 10 s apart (within the dead
        origins' backoff); what the last one fetched."""
        body = synapse_body(self.dead + self.live, 0, SERVER_KEY_ID)
        for _ in range(times - 1):
            self.assertIsNotNone(site.request(b"POST", QUERY_PATH, body))
            site.reactor.advance(10)
        before = len(site.client.requests)
        response = site.request(b"POST", QUERY_PATH, body)
        assert response is not None and response.code == 200
        return [r.server_name for r in site.client.requests[before:]]

    def test_backed_off_origins_leave_the_budget_to_live_ones(self) -> None:
        """Without notaries, dead origins backed off after one batch are not fetched in
        the next one (counted as ``backed_off``); the live servers are fetched."""
        site = self.make_site_with_origins(self.live, {"max_fetches_per_request": 2})
        self.assertEqual(sorted(self.batch_twice(site)), self.live)
        self.assertEqual(self.fetched(site)[:2], self.dead, "first: nothing stored, by name")
        self.assertEqual(skipped(site, "backed_off"), 2)

    def test_with_a_notary_backed_off_origins_keep_their_fetch(self) -> None:
        """With a trusted notary configured, a backed-off origin's server is still
        fetched (the notary may answer for it) when its turn comes again (the second
        batch fetches the two servers never tried, the third the two tried first), and
        nothing counts as ``backed_off``."""
        upstream_key = new_signing_key("u1")
        upstream = FakeNotaryResource(UPSTREAM, upstream_key, {})
        site = RawNotarySite(
            {UPSTREAM: upstream},
            {
                "trusted_key_servers": [trusted_notary(UPSTREAM, upstream_key)],
                "notary": {"max_fetches_per_request": 2},
            },
        )
        self.assertIn(UPSTREAM, self.batch_twice(site, times=3))
        self.assertEqual(set(upstream.bodies[-2]["server_keys"]), set(self.live))
        self.assertEqual(set(upstream.bodies[-1]["server_keys"]), set(self.dead))
        self.assertEqual(skipped(site, "backed_off"), 0)


class NoFetch:
    """A chain that fetches nothing."""

    async def get_keys(self, requests: Any, **kwargs: Any) -> dict[str, dict[str, StoredKey]]:
        return {}


class StoredCopiesTests(SynchronousTestCase):
    """Answers follow the store's current copies, not those read when planning."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.now = now_ms(self.clock)
        self.store = InMemoryKeyStore(StoreLimits(max_keys=10, max_responses=2, max_conflicts=10))
        own = OwnKeys("notary.test", [new_signing_key("n1")])
        publisher = ServerKeyPublisher(own, self.clock, DAY_MS)
        self.notary = NotaryService(own, publisher, self.store, NoFetch(), self.clock, 10_000)

    def put(self, signing_key: Any, valid_until_ts: int) -> None:
        obj = make_signed_server_keys("o.test", [signing_key], valid_until_ts)
        response = parse_server_keys_response(obj, "o.test")
        self.successResultOf(
            ensureDeferred(self.store.store_server_keys(response, SOURCE_ORIGIN, self.now))
        )

    def served(self, body: bytes) -> list[str]:
        return [entry["server_name"] for entry in json.loads(body)["server_keys"]]

    def test_keys_rewritten_between_plan_and_answer_are_still_served(self) -> None:
        """A stored server whose keys are re-pointed at a newer response after the plan
        read them (its old response deleted) is still in the answer."""
        signing_key = new_signing_key("a")
        self.put(signing_key, self.now + DAY_MS)
        asked = self.notary.normalise(
            [
                ServerQuery("o.test", {key_id(signing_key): 0}),
                ServerQuery("p.test", {key_id(signing_key): 0}),
            ]
        )
        plan = self.successResultOf(ensureDeferred(self.notary.plan_for(asked)))
        self.put(signing_key, self.now + 2 * DAY_MS)  # a refresh lands
        body = self.successResultOf(ensureDeferred(self.notary.answer_plan(asked, plan)))
        (entry,) = json.loads(body)["server_keys"]
        self.assertEqual(entry["valid_until_ts"], self.now + 2 * DAY_MS)

    def query(self, kid: str) -> list[str]:
        body = self.successResultOf(
            ensureDeferred(self.notary.query([ServerQuery("o.test", {kid: None})]))
        )
        return self.served(body)

    def test_a_dropped_copy_is_not_served_even_when_cosigned_before(self) -> None:
        """A key whose only copy the store dropped at its bounds is not served, also
        when that copy was co-signed (and cached) before it was dropped."""
        old, b, c = new_signing_key("a"), new_signing_key("b"), new_signing_key("c")
        self.put(old, self.now - 1000)
        self.assertEqual(self.query(key_id(old)), ["o.test"])  # co-signs its copy
        self.put(b, self.now + DAY_MS)
        self.put(c, self.now + DAY_MS)  # 3 copies > max_responses 2: the old one dropped
        responses = self.successResultOf(ensureDeferred(self.store.get_server_responses("o.test")))
        keys = self.successResultOf(ensureDeferred(self.store.get_server_keys("o.test")))
        self.assertNotIn(keys[key_id(old)].response_id, {r.response_id for r in responses})
        self.assertEqual(self.query(key_id(old)), [])
        self.assertEqual(self.query(key_id(c)), ["o.test"])


class DisconnectTests(SynchronousTestCase):
    """A client that goes away while its query waits for fetches."""

    def test_disconnect_during_a_multi_server_fetch_is_no_error(self) -> None:
        """Closing the connection while a two-server query waits for a hanging origin
        logs no error, tries no answer, and frees the request's slot."""
        site = RawNotarySite({"hang.test": HangingResource()})
        body = json.dumps({"server_keys": {"hang.test": {}, "other.test": {}}}).encode()
        pending = site.open(request_bytes(b"POST", QUERY_PATH, body))
        self.assertIsNone(pending.response())
        with self.assertNoLogs("keyring_module", logging.ERROR):
            pending.close()
            site.reactor.advance(REQUEST_TIMEOUT_S + 1)
        self.assertEqual(self.flushLoggedErrors(), [])
        # The slot is free: with max_concurrent_requests 1, a new fetching query runs.
        site = RawNotarySite(
            {"hang.test": HangingResource()}, {"notary": {"max_concurrent_requests": 1}}
        )
        pending = site.open(request_bytes(b"POST", QUERY_PATH, body))
        pending.close()
        response = site.request(b"GET", QUERY_PATH + b"/hang.test")
        assert response is not None
        self.assertEqual(response.code, 200)
