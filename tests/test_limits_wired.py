"""The outbound limits through the fetchers and the wiring: spelling variants of one
host, dead origins served by a trusted notary, the configured caps and their metrics."""

import random
from typing import Any, Mapping, Optional

from prometheus_client import CollectorRegistry
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from keyring_module.blocking import BlockingRunner
from keyring_module.config import ConfigError, RateLimitConfig, parse_config
from keyring_module.fetchers.base import FailureKind, SourceAnswers
from keyring_module.fetchers.origin import OriginKeyFetcher
from keyring_module.metrics import Metrics
from keyring_module.model import KeyRequest
from keyring_module.ratelimit import OriginRateLimiter, reserved_tokens
from keyring_module.storage.memory import InMemoryKeyStore
from keyring_module.wiring import Fetching
from tests.fake_reactors import FakeReactor
from tests.fakes import (
    FakeFederationClient,
    FakeNotaryResource,
    FakeOriginResource,
    HeldRunner,
)
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
        """150 spellings of one host asked in three batches (not for our own keyring)
        reach it origin_burst times, less the reserve kept for our own keyring."""
        for i in range(3):
            self.fetch(self.variants[i * 50 : (i + 1) * 50])
        burst = RateLimitConfig().origin_burst
        self.assertEqual(self.origin.hits, burst - reserved_tokens(burst))
        self.assertEqual(len(self.client.requests), burst - reserved_tokens(burst))

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
        self,
        resources: Mapping[str, Resource],
        *,
        notaries: bool = True,
        run_blocking: Optional[BlockingRunner] = None,
        **settings: Any,
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
            run_blocking=run_blocking,
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

    def test_backed_off_notaries_gauge(self) -> None:
        """keyring_notaries_backed_off counts the notaries backed off now, and drops back
        once the backoff is over."""
        fetching, _client = self.build({NOTARY: self.notary})
        self.assertEqual(self.sample("keyring_notaries_backed_off"), 0)
        self.notary.code = 500
        self.successResultOf(self.get_keys(fetching, "other.test"))
        self.assertEqual(self.sample("keyring_notaries_backed_off"), 1)
        self.reactor.advance(RateLimitConfig().failure_backoff_initial_ms * 1.2 / 1000 + 1)
        self.assertEqual(self.sample("keyring_notaries_backed_off"), 0)


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


class NotaryQueriesPerServerTests(WiredLimitsTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.now_ms = int(self.reactor.seconds() * 1000)
        self.origin_key = new_signing_key("o1")
        for name in ("origin.test", "x.test", "y.test"):
            entry = make_signed_server_keys(name, [self.origin_key], self.now_ms + DAY_MS)
            self.notary.entries[name] = [entry]

    def ask_notary(
        self, fetching: Fetching, *requests: KeyRequest
    ) -> "defer.Deferred[SourceAnswers]":
        fetcher = fetching.notary_fetchers[0]
        return defer.ensureDeferred(fetcher.fetch_keys({r.server_name: r for r in requests}))

    def asked_about(self, client: FakeFederationClient) -> list[list[str]]:
        """The servers named in each POST to the notary, in order."""
        bodies = [r.body for r in client.requests_to(NOTARY)]
        return [sorted(body["server_keys"]) for body in bodies if isinstance(body, dict)]

    def test_forced_refetches_are_not_relayed_to_the_notary(self) -> None:
        """100 forced refetches of one server with rising minimums reach its origin and
        the notary origin_burst times each (less the reserve kept for our own keyring),
        not the notary a hundred times."""
        origin = FakeOriginResource(self.origin_key, "origin.test", self.reactor)
        fetching, client = self.build({NOTARY: self.notary, "origin.test": origin})
        burst = RateLimitConfig().origin_burst - reserved_tokens(RateLimitConfig().origin_burst)
        for i in range(100):
            request = KeyRequest("origin.test", None, self.now_ms + 365 * DAY_MS + i)
            self.successResultOf(
                defer.ensureDeferred(fetching.chain.get_keys([request], use_cache=False))
            )
        self.assertEqual(origin.hits, burst)
        self.assertEqual(len(client.requests_to(NOTARY)), burst)
        self.assertEqual(
            self.sample("keyring_notary_queries_total", notary=NOTARY, outcome="rate_limited"),
            100 - burst,
        )
        # The bucket refills: one more query per origin_interval.
        self.reactor.advance(RateLimitConfig().origin_interval_ms / 1000)
        request = KeyRequest("origin.test", None, self.now_ms + 400 * DAY_MS)
        self.successResultOf(
            defer.ensureDeferred(fetching.chain.get_keys([request], use_cache=False))
        )
        self.assertEqual(len(client.requests_to(NOTARY)), burst + 1)

    def test_server_out_of_tokens_is_left_out_and_refused(self) -> None:
        """A server with no token left is not asked about; it is reported refused as
        rate_limited while the others of the batch are asked and served."""
        fetching, client = self.build({NOTARY: self.notary}, ratelimit={"origin_burst": 1})
        self.successResultOf(self.ask_notary(fetching, KeyRequest("X.test.")))
        answers = self.successResultOf(
            self.ask_notary(fetching, KeyRequest("x.test"), KeyRequest("y.test"))
        )
        self.assertEqual(self.asked_about(client), [["X.test."], ["y.test"]])
        self.assertEqual(list(answers.results), ["y.test"])
        [failure] = answers.failures["x.test"]
        self.assertEqual(failure.source, "notary:" + NOTARY)
        self.assertEqual(failure.kind, FailureKind.REFUSED)
        self.assertEqual(failure.detail, "rate_limited, retry in 60000 ms")
        self.assertEqual(
            self.sample("keyring_notary_queries_total", notary=NOTARY, outcome="rate_limited"), 0
        )
        answers = self.successResultOf(self.ask_notary(fetching, KeyRequest("x.test")))
        self.assertEqual(answers.results, {})
        self.assertEqual(len(client.requests_to(NOTARY)), 2)
        self.assertEqual(
            self.sample("keyring_notary_queries_total", notary=NOTARY, outcome="rate_limited"), 1
        )

    def test_queries_refused_by_the_notary_limiter_spend_no_token(self) -> None:
        """While the notary is backed off, lookups of a server send nothing and spend
        none of its tokens: it is asked about once the backoff is over."""
        fetching, client = self.build({NOTARY: self.notary}, ratelimit={"origin_burst": 1})
        self.notary.code = 500
        self.successResultOf(self.ask_notary(fetching, KeyRequest("y.test")))
        self.notary.code = 200
        for _ in range(5):
            answers = self.successResultOf(self.ask_notary(fetching, KeyRequest("x.test")))
            [failure] = answers.failures["x.test"]
            self.assertTrue(failure.detail.startswith("backed_off"), failure.detail)
        self.reactor.advance(RateLimitConfig().failure_backoff_initial_ms * 1.2 / 1000 + 1)
        answers = self.successResultOf(self.ask_notary(fetching, KeyRequest("x.test")))
        self.assertEqual(list(answers.results), ["x.test"])
        self.assertEqual(self.asked_about(client), [["y.test"], ["x.test"]])

    def test_concurrent_queries_share_one_flight_whatever_their_minimum(self) -> None:
        """Concurrent queries about the same server and key ids with minimums 1 ms apart
        send one query (the first caller's minimum) and share its answer."""
        runner = HeldRunner()  # keeps each answer's validation, so the flight stays open
        fetching, client = self.build({NOTARY: self.notary}, run_blocking=runner)
        key_ids = frozenset(["ed25519:o1"])
        first = self.ask_notary(fetching, KeyRequest("x.test", key_ids, self.now_ms + 1))
        second = self.ask_notary(fetching, KeyRequest("x.test", key_ids, self.now_ms + 2))
        self.assertEqual(len(client.requests_to(NOTARY)), 1)
        body = client.requests_to(NOTARY)[0].body
        wanted = {"ed25519:o1": {"minimum_valid_until_ts": self.now_ms + 1}}
        self.assertEqual(body, {"server_keys": {"x.test": wanted}})
        runner.run_all()
        for d in (first, second):
            self.assertEqual(list(self.successResultOf(d).results), ["x.test"])
        other = self.ask_notary(fetching, KeyRequest("x.test", None, self.now_ms + 1))
        runner.run_all()
        self.successResultOf(other)
        self.assertEqual(len(client.requests_to(NOTARY)), 2)  # other key ids: a query of its own
