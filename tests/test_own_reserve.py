"""The per-origin limiter's reserve: notary load never starves our own verification.

The notary (any server may query it) and our own keyring (the homeserver's lookups,
``module.keyring``) share one token bucket per origin. Fetches on behalf of other
servers may not spend the last :func:`~keyring_module.ratelimit.reserved_tokens`;
fetches for our own keyring may. Lookups for a time beyond the 7-day cap fetch nothing.
"""

import os
from typing import Any

import attr
from prometheus_client import CollectorRegistry
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from keyring_module.clock import global_reactor
from keyring_module.config import RateLimitConfig, parse_config
from keyring_module.metrics import Metrics
from keyring_module.model import FetchPurpose, KeyRequest
from keyring_module.notary.query import ServerQuery
from keyring_module.ratelimit import (
    OWN_RESERVE_TOKENS,
    OriginRateLimiter,
    RateLimitedError,
    reserved_tokens,
)
from keyring_module.shared_limits import LimitRules, SharedOriginLimits
from keyring_module.signing import OwnKeys
from keyring_module.storage.memory import InMemoryKeyStore
from keyring_module.storage.sqlite import SqliteKeyStore
from keyring_module.storage.sqlite_coordination import SqliteCoordination
from keyring_module.synapse_fetcher import ModuleKeyFetcher
from keyring_module.wiring import Fetching, KeyringServices
from tests.fake_reactors import FakeReactor
from tests.fakes import FakeFederationClient, FakeOriginResource
from tests.test_limits_wired import NOTARY, WiredLimitsTestCase
from tests.utils import key_id, new_signing_key

ORIGIN = "origin.example.org"
DAY_MS = 86_400_000


class Result:
    """Synapse's FetchKeyResult(verify_key, valid_until_ts), as the fetcher builds it."""

    def __init__(self, verify_key: Any, valid_until_ts: int) -> None:
        self.verify_key, self.valid_until_ts = verify_key, valid_until_ts


async def _ok() -> str:
    return "ok"


class ReserveRuleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.config = RateLimitConfig(origin_burst=5, origin_interval_ms=60_000)
        self.limiter = OriginRateLimiter(self.clock, self.config)

    def run_(self, may_use_reserve: bool) -> "defer.Deferred[str]":
        return defer.ensureDeferred(
            self.limiter.run("a.example", _ok, may_use_reserve=may_use_reserve)
        )

    def test_reserve_size(self) -> None:
        """The reserve is OWN_RESERVE_TOKENS, but leaves others at least one token."""
        self.assertEqual(OWN_RESERVE_TOKENS, 2)
        self.assertEqual([reserved_tokens(b) for b in (1, 2, 3, 10)], [0, 1, 2, 2])

    def test_others_stop_at_the_reserve_ours_spend_it(self) -> None:
        """Fetches for others get burst - reserve tokens; ours then get the reserve; both
        together never more than the burst, and the refill goes to the reserve first."""
        for _ in range(3):
            self.successResultOf(self.run_(False))
        error = self.failureResultOf(self.run_(False), RateLimitedError).value
        self.assertEqual(error.retry_after_ms, 60_000)
        self.assertEqual(self.limiter.retry_after_ms("a.example", may_use_reserve=False), 60_000)
        self.assertEqual(self.limiter.retry_after_ms("a.example"), 0)
        for _ in range(2):
            self.successResultOf(self.run_(True))
        self.failureResultOf(self.run_(True), RateLimitedError)
        self.clock.advance(60)
        # One token back: below the reserve, so only ours may have it.
        self.failureResultOf(self.run_(False), RateLimitedError)
        self.successResultOf(self.run_(True))

    def test_the_view_keeping_the_reserve(self) -> None:
        """keeping_reserve() runs and answers retry_after_ms as others see the bucket."""
        view = self.limiter.keeping_reserve()
        for _ in range(3):
            self.successResultOf(defer.ensureDeferred(view.run("a.example", _ok)))
        self.failureResultOf(defer.ensureDeferred(view.run("a.example", _ok)), RateLimitedError)
        self.assertEqual(view.retry_after_ms("a.example"), 60_000)

    def test_take_token_keeps_the_reserve_too(self) -> None:
        """The notary fetchers' per-server buckets keep the same reserve."""
        takes = [self.limiter.take_token("a.example", may_use_reserve=False) for _ in range(4)]
        self.assertEqual(takes, [0, 0, 0, 60_000])
        self.assertEqual(self.limiter.take_token("a.example"), 0)

    def test_shared_limits_keep_the_reserve(self) -> None:
        """The bucket shared across processes follows the same rule."""
        rules = LimitRules(self.config)
        state = None
        for _ in range(3):
            state, answer = rules.take(0, may_use_reserve=False)(state)
            self.assertEqual(answer, 0)
        self.assertEqual(rules.take(0, may_use_reserve=False)(state)[1], 60_000)
        for _ in range(2):
            state, answer = rules.take(0)(state)
            self.assertEqual(answer, 0)
        self.assertEqual(rules.take(0)(state)[1], 60_000)

    def test_merged_requests_are_ours_if_either_is(self) -> None:
        """Merging a request of ours with one for others gives a request of ours."""
        theirs = KeyRequest("a.example", None, 5)
        ours = KeyRequest("a.example", None, 0, FetchPurpose.OWN)
        self.assertFalse(theirs.may_use_reserve)
        self.assertTrue(theirs.merge(ours).may_use_reserve)
        self.assertTrue(ours.merge(theirs).may_use_reserve)


class NotaryLoadTests(SynchronousTestCase):
    """The whole stack: notary queries and the homeserver's lookups share the limiter."""

    def setUp(self) -> None:
        self.clock = FakeReactor()
        self.clock.advance(1_800_000_000)
        self.key1 = new_signing_key("o1")
        self.origin = FakeOriginResource(self.key1, ORIGIN, self.clock)
        self.client = FakeFederationClient({ORIGIN: self.origin})
        config = parse_config({"signing_key_path": "k"}, standalone=False)
        own = OwnKeys("hs.example.org", [new_signing_key("own")], ())
        self.services = KeyringServices.build(
            self.clock,
            config,
            own,
            InMemoryKeyStore(),
            client=self.client,
            metrics=Metrics(CollectorRegistry()),
        )
        assert self.services.notary is not None
        self.notary = self.services.notary
        self.fetcher = ModuleKeyFetcher(
            self.services.keyring.lookup_keys, Result, lambda r: None, self.clock
        )

    def now(self) -> int:
        return int(self.clock.seconds() * 1000)

    def settle(self) -> None:
        for _ in range(10):
            self.clock.advance(0)
            self.client.flush()

    def synapse_get(self, kid: str, minimum: int) -> dict[str, Any]:
        d = defer.ensureDeferred(self.fetcher.get_keys(ORIGIN, [kid], minimum))
        self.settle()
        return self.successResultOf(d)

    def rotate(self) -> str:
        key2 = new_signing_key("o2")
        self.origin.signing_keys = [key2]
        return key_id(key2)

    def test_notary_queries_leave_the_reserve_for_our_lookups(self) -> None:
        """After anonymous notary queries with far-future minimums use up what they may,
        the homeserver still fetches the origin's rotated key."""
        self.assertIn(key_id(self.key1), self.synapse_get(key_id(self.key1), self.now()))
        self.clock.advance(600)  # bucket full again
        hits = self.origin.hits
        for _ in range(12):
            d = defer.ensureDeferred(
                self.notary.query([ServerQuery(ORIGIN, {}, self.now() + 10**12)])
            )
            self.settle()
            self.successResultOf(d)
        burst = RateLimitConfig().origin_burst
        self.assertEqual(self.origin.hits - hits, burst - reserved_tokens(burst))
        new_kid = self.rotate()
        self.assertIn(new_kid, self.synapse_get(new_kid, self.now()))

    def test_lookups_beyond_the_cap_fetch_nothing(self) -> None:
        """Lookups with minimums beyond now + 7 days (events claiming a far-future time)
        are answered from the store and fetch nothing, so a rotated key still gets in."""
        self.assertIn(key_id(self.key1), self.synapse_get(key_id(self.key1), self.now()))
        self.clock.advance(600)
        hits = self.origin.hits
        for _ in range(12):
            found = self.synapse_get(key_id(self.key1), self.now() + 365 * DAY_MS)
            self.assertIn(key_id(self.key1), found)  # the stored key, as it is
        self.assertEqual(self.origin.hits, hits)
        found = self.synapse_get("ed25519:unknown", self.now() + 7 * DAY_MS + 1)
        self.assertEqual((found, self.origin.hits), ({}, hits))
        new_kid = self.rotate()
        self.assertIn(new_kid, self.synapse_get(new_kid, self.now()))


class NotaryQueryReserveTests(WiredLimitsTestCase):
    """Queries to a trusted notary about one server keep the same reserve."""

    def ask(self, fetching: Fetching, request: KeyRequest) -> list[list[str]]:
        fetcher = fetching.notary_fetchers[0]
        self.successResultOf(defer.ensureDeferred(fetcher.fetch_keys({"x.test": request})))
        return [
            sorted(r.body["server_keys"])
            for r in self.client.requests_to(NOTARY)
            if isinstance(r.body, dict)
        ]

    def test_our_requests_still_reach_the_notary(self) -> None:
        """With burst 3, requests for others are sent about a server once; ours twice more."""
        fetching, self.client = self.build({NOTARY: self.notary}, ratelimit={"origin_burst": 3})
        theirs = KeyRequest("x.test")
        ours = KeyRequest("x.test", None, 0, FetchPurpose.OWN)
        self.assertEqual(len(self.ask(fetching, theirs)), 1)
        self.assertEqual(len(self.ask(fetching, attr.evolve(theirs, minimum_valid_until_ts=5))), 1)
        self.assertEqual(len(self.ask(fetching, ours)), 2)
        self.assertEqual(len(self.ask(fetching, attr.evolve(ours, minimum_valid_until_ts=5))), 3)
        self.assertEqual(len(self.ask(fetching, attr.evolve(ours, minimum_valid_until_ts=9))), 3)


class SharedReserveTests(TestCase):
    """Two processes on one SQLite file: one's notary cannot spend the other's reserve."""

    async def test_the_shared_bucket_keeps_the_reserve_across_processes(self) -> None:
        """Burst 3: process A's fetches for others get one token; B's own get the two left."""
        clock = Clock()
        clock.advance(1_000_000)
        config = RateLimitConfig(origin_burst=3, origin_interval_ms=60_000)
        path = os.path.abspath(self.mktemp()) + ".db"
        limits = []
        for _ in range(2):
            store = SqliteKeyStore(path, global_reactor())
            await store.migrate()
            self.addCleanup(store.close)
            coordination = SqliteCoordination(store, clock, lease_ms=10_000, poll_interval_ms=100)
            limits.append(SharedOriginLimits(coordination, clock, config, lambda: 0.5))
        a, b = limits
        await a.take("example.org", may_use_reserve=False)
        with self.assertRaises(RateLimitedError):
            await a.take("example.org", may_use_reserve=False)
        await b.take("example.org")
        await b.take("example.org")
        with self.assertRaises(RateLimitedError):
            await b.take("example.org")
