"""The outbound limits through the fetchers and the wiring: spelling variants of one
host, dead origins served by a trusted notary, the configured caps and their metrics."""

import random
from typing import Any, Mapping, Optional

from prometheus_client import CollectorRegistry
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from keyring_module.config import ConfigError, RateLimitConfig, parse_config
from keyring_module.fetchers.base import FailureKind, SourceAnswers
from keyring_module.fetchers.origin import OriginKeyFetcher
from keyring_module.metrics import Metrics
from keyring_module.model import KeyRequest
from keyring_module.ratelimit import OriginRateLimiter
from keyring_module.storage.memory import InMemoryKeyStore
from keyring_module.wiring import Fetching
from tests.fake_reactors import FakeReactor
from tests.fakes import FakeFederationClient, FakeNotaryResource, FakeOriginResource
from tests.utils import (
    key_id,
    make_signed_server_keys,
    new_signing_key,
    verify_key_base64,
)

NOTARY = "notary.test"
DAY_MS = 24 * 60 * 60 * 1000


def spelling_variants(name: str, count: int, seed: int = 15) -> list[str]:
    """``count`` distinct case (and trailing dot) variants of ``name``, ``name`` first."""
    rng = random.Random(seed)
    variants = [name]
    while len(variants) < count:
        spelled = "".join(c.upper() if rng.random() < 0.5 else c for c in name)
        spelled += "." if rng.random() < 0.5 else ""
        if spelled not in variants:
            variants.append(spelled)
    return variants


class SpellingVariantTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.reactor.advance(1_700_000_000)
        self.origin = FakeOriginResource(new_signing_key("o1"), "origin.test", self.reactor)
        self.variants = spelling_variants("origin.test", 150)
        # Every spelling reaches the same server, as DNS would have it.
        self.client = FakeFederationClient(dict.fromkeys(self.variants, self.origin))
        self.limiter = OriginRateLimiter(self.reactor, RateLimitConfig())
        self.fetcher = OriginKeyFetcher(self.client, self.limiter, self.reactor)

    def fetch(self, names: list[str]) -> SourceAnswers:
        requests = {name: KeyRequest(name) for name in names}
        answers: SourceAnswers = self.successResultOf(
            defer.ensureDeferred(self.fetcher.fetch_keys(requests))
        )
        return answers

    def test_150_variants_in_3_requests_reach_the_host_at_most_burst_times(self) -> None:
        """150 spellings of one host asked in three batches reach it origin_burst times."""
        for i in range(3):
            self.fetch(self.variants[i * 50 : (i + 1) * 50])
        self.assertEqual(self.origin.hits, RateLimitConfig().origin_burst)
        self.assertEqual(len(self.client.requests), RateLimitConfig().origin_burst)

    def test_each_caller_is_answered_for_its_own_name(self) -> None:
        """Concurrent askers of two spellings each get an answer validated against their
        own name: the origin's server_name matches only the exact one."""
        self.client = FakeFederationClient({"origin.test": self.origin, "Origin.Test": self.origin})
        self.fetcher = OriginKeyFetcher(self.client, self.limiter, self.reactor)
        answers = self.fetch(["origin.test", "Origin.Test"])
        self.assertEqual(list(answers.results), ["origin.test"])
        [failure] = answers.failures["Origin.Test"]
        self.assertEqual(failure.kind, FailureKind.INVALID_RESPONSE)
        self.assertIn("wrong_server_name", failure.detail)
        self.assertEqual(self.origin.hits, 2)


class WiredLimitsTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.reactor.advance(1_700_000_000)
        self.notary_key = new_signing_key("n1")
        self.notary = FakeNotaryResource(NOTARY, self.notary_key)
        self.registry = CollectorRegistry()

    def build(
        self, resources: Mapping[str, Resource], *, notaries: bool = True, **settings: Any
    ) -> tuple[Fetching, FakeFederationClient]:
        trusted = {
            "server_name": NOTARY,
            "verify_keys": {key_id(self.notary_key): verify_key_base64(self.notary_key)},
        }
        raw = {
            "signing_key_path": "unused",
            "trusted_key_servers": [trusted] if notaries else [],
            **settings,
        }
        client = FakeFederationClient(resources)
        fetching = Fetching.build(
            self.reactor,
            parse_config(raw, standalone=False),
            InMemoryKeyStore(),
            client=client,
            metrics=Metrics(self.registry),
        )
        return fetching, client

    def get_keys(self, fetching: Fetching, name: str) -> "defer.Deferred[Any]":
        return defer.ensureDeferred(fetching.chain.get_keys([KeyRequest(name)]))

    def sample(self, name: str, **labels: str) -> float:
        value: Optional[float] = self.registry.get_sample_value(name, labels)
        return value or 0.0


class NotaryPolicyWiredTests(WiredLimitsTestCase):
    def test_dead_origins_known_to_the_notary_are_all_served(self) -> None:
        """8 one-server queries in a row about 8 dead origins that the trusted notary
        knows are all answered, even with a small origin burst."""
        now_ms = int(self.reactor.seconds() * 1000)
        dead = ["dead%d.test" % i for i in range(8)]
        for name in dead:
            entry = make_signed_server_keys(name, [new_signing_key("d1")], now_ms + DAY_MS)
            self.notary.entries[name] = [entry]
        fetching, client = self.build({NOTARY: self.notary}, ratelimit={"origin_burst": 3})
        for name in dead:
            keys = self.successResultOf(self.get_keys(fetching, name))
            self.assertEqual(list(keys[name]), ["ed25519:d1"], name)
        self.assertEqual(len(client.requests_to(NOTARY)), 8)
        self.assertEqual(
            self.sample("keyring_notary_queries_total", notary=NOTARY, outcome="ok"), 8
        )

    def test_notary_and_origin_of_one_name_share_no_state(self) -> None:
        """An origin fetch from the notary's own name does not spend or back off the
        notary's queries, and a backed-off notary leaves that origin alone."""
        fetching, client = self.build({NOTARY: self.notary}, ratelimit={"origin_burst": 1})
        # Asked about itself: a GET to it as an origin (answered 405, spending the
        # origin's only token), then a POST to it as a notary.
        self.successResultOf(self.get_keys(fetching, NOTARY))
        self.assertGreater(fetching.limiter.retry_after_ms(NOTARY), 0)
        self.notary.code = 500
        self.successResultOf(self.get_keys(fetching, "other.test"))
        self.assertEqual([r.method for r in client.requests_to(NOTARY)], ["GET", "POST", "POST"])
        assert fetching.notary_limiter is not None
        self.assertTrue(fetching.notary_limiter.is_backed_off(NOTARY))
        self.assertFalse(fetching.limiter.is_backed_off(NOTARY))
        self.assertEqual(self.sample("keyring_notary_backoffs_total", notary=NOTARY), 1)
        self.assertEqual(
            self.sample("keyring_notary_queries_total", notary=NOTARY, outcome="http_error"), 1
        )
        self.successResultOf(self.get_keys(fetching, "third.test"))
        self.assertEqual(
            self.sample("keyring_notary_queries_total", notary=NOTARY, outcome="backed_off"), 1
        )


class GlobalCapWiredTests(WiredLimitsTestCase):
    def test_configured_cap_queues_then_refuses_as_busy(self) -> None:
        """federation.max_concurrent_fetches bounds fetches in flight; beyond its queue a
        fetch is refused at once and counted as busy."""
        origins = {
            "o%d.test" % i: FakeOriginResource(new_signing_key("k"), "o%d.test" % i, self.reactor)
            for i in range(6)
        }
        for origin in origins.values():
            origin.hold = True
        fetching, client = self.build(
            origins, notaries=False, federation={"max_concurrent_fetches": 1}
        )
        pending = [self.get_keys(fetching, "o%d.test" % i) for i in range(6)]
        self.assertEqual(len(client.requests), 1)  # one in flight, four queued
        self.assertEqual(self.sample("keyring_fetches_in_flight"), 1)
        self.assertEqual(self.sample("keyring_fetches_queued"), 4)
        self.assertEqual(self.successResultOf(pending[5]), {"o5.test": {}})
        self.assertEqual(self.sample("keyring_origin_fetches_total", outcome="busy"), 1)
        self.assertFalse(fetching.limiter.is_backed_off("o5.test"))
        origins["o0.test"].release()
        client.flush()
        self.assertEqual(len(client.requests), 2)  # the first queued fetch went out
        self.assertEqual(list(self.successResultOf(pending[0])["o0.test"]), ["ed25519:k"])


class LimitsConfigTests(SynchronousTestCase):
    def test_new_settings_parse_and_default(self) -> None:
        """The cap and the notary concurrency are read from the config, with defaults."""
        config = parse_config(
            {
                "signing_key_path": "k",
                "federation": {"max_concurrent_fetches": 32},
                "ratelimit": {"notary_max_concurrent": 2},
            },
            standalone=False,
        )
        self.assertEqual(config.federation.max_concurrent_fetches, 32)
        self.assertEqual(config.ratelimit.notary_max_concurrent, 2)
        defaults = parse_config({"signing_key_path": "k"}, standalone=False)
        self.assertEqual(defaults.federation.max_concurrent_fetches, 256)
        self.assertEqual(defaults.ratelimit.notary_max_concurrent, 8)
        self.assertEqual(defaults.ratelimit.origin_burst, 10)

    def test_zero_is_refused_by_name(self) -> None:
        """A cap of 0 would stop every fetch: it is a config error naming the key."""
        for section, key in (
            ("federation", "max_concurrent_fetches"),
            ("ratelimit", "notary_max_concurrent"),
        ):
            with self.subTest(key=key):
                with self.assertRaisesRegex(ConfigError, "%s.%s" % (section, key)):
                    parse_config({"signing_key_path": "k", section: {key: 0}}, standalone=False)
