"""Tests for keyring_module.fetchers: origin, notary and the chain, over StubTreq fakes."""

import json
from typing import Any, Mapping, Optional, Sequence

import attr
from prometheus_client import CollectorRegistry
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from keyring_module.config import (
    KeyTrustConfig,
    RateLimitConfig,
    TrustedKeyServer,
    parse_config,
)
from keyring_module.fetchers.base import (
    FailureKind,
    FetchResult,
    SourceAnswers,
    merge_key_requests,
)
from keyring_module.fetchers.chain import KeyFetcherChain
from keyring_module.fetchers.notary_client import NotaryKeyFetcher
from keyring_module.fetchers.origin import OriginKeyFetcher
from keyring_module.fetchers.settling import HEAD_START_SHARE
from keyring_module.fetchers.trace import FetchTrace
from keyring_module.metrics import Metrics
from keyring_module.model import SOURCE_ORIGIN, KeyRequest, StoredKey, notary_source
from keyring_module.notary_limiter import NotaryLimiter
from keyring_module.ratelimit import OriginRateLimiter
from keyring_module.storage.memory import InMemoryKeyStore
from keyring_module.validation import parse_server_keys_response
from keyring_module.wiring import Fetching
from tests.fake_reactors import FakeReactor
from tests.fakes import (
    FakeFederationClient,
    FakeNotaryResource,
    FakeOriginResource,
    HangingResource,
    HeldRunner,
)
from tests.utils import (
    key_id,
    make_signed_server_keys,
    make_trusted_key_server,
    new_signing_key,
    sign_as,
    verify_key_base64,
    verify_key_bytes,
)

NOW_MS = 1_700_000_000_000
DAY_MS = 24 * 60 * 60 * 1000
NOTARY = "notary.example"
NOTARY2 = "notary2.example"
TIMEOUT_S = 10.0
#: How long the first stage of the chain has to itself.
HEAD_START_S = TIMEOUT_S * HEAD_START_SHARE


class FetcherTestCase(SynchronousTestCase):
    """Origins ``s0.example`` .. ``s5.example`` with one key each, on a fake network."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW_MS / 1000)
        self.keys = {"s%d.example" % i: new_signing_key("k%d" % i) for i in range(6)}
        self.origins = {
            name: FakeOriginResource(key, name, self.clock) for name, key in self.keys.items()
        }
        self.notary_key = new_signing_key("n_1")
        self.notary = FakeNotaryResource(NOTARY, self.notary_key)
        self.trusted = make_trusted_key_server(NOTARY, self.notary_key)
        self.limiter = OriginRateLimiter(self.clock, RateLimitConfig(), random=lambda: 0.5)

    def client(self, resources: Optional[Mapping[str, Resource]] = None) -> FakeFederationClient:
        return FakeFederationClient(resources if resources is not None else self.origins)

    def entry(self, server_name: str, valid_until_ts: int = NOW_MS + DAY_MS) -> dict[str, Any]:
        """An origin-signed key object for one of the fake origins."""
        return make_signed_server_keys(server_name, [self.keys[server_name]], valid_until_ts)

    def fetch_answers(self, fetcher: Any, *names: str, **kwargs: Any) -> SourceAnswers:
        """Everything a fetcher answers about ``names``: results and failures."""
        requests = {name: KeyRequest(name, **kwargs) for name in names}
        answers: SourceAnswers = self.successResultOf(
            defer.ensureDeferred(fetcher.fetch_keys(requests))
        )
        return answers

    def fetch(self, fetcher: Any, *names: str, **kwargs: Any) -> dict[str, list[FetchResult]]:
        """The validated responses a fetcher answers about ``names``."""
        return self.fetch_answers(fetcher, *names, **kwargs).results

    def failure_kinds(self, answers: SourceAnswers) -> dict[str, list[FailureKind]]:
        return {name: [f.kind for f in fs] for name, fs in answers.failures.items()}


class OriginKeyFetcherTests(FetcherTestCase):
    def make_fetcher(self, client: FakeFederationClient, **kwargs: Any) -> OriginKeyFetcher:
        return OriginKeyFetcher(client, self.limiter, self.clock, **kwargs)

    def test_answer_validated_through_the_runner(self) -> None:
        """A big answer is validated by the injected runner; the fetch waits for it."""
        self.origins["s1.example"].body_override = make_signed_server_keys(
            "s1.example",
            [self.keys["s1.example"]],
            NOW_MS + DAY_MS,
            extra={"padding": [[] for _ in range(5000)]},
        )
        runner = HeldRunner()
        fetcher = self.make_fetcher(self.client(), run_blocking=runner)
        d = defer.ensureDeferred(fetcher.fetch_keys({"s1.example": KeyRequest("s1.example")}))
        self.assertNoResult(d)
        self.assertEqual(len(runner.jobs), 1)
        runner.run_all()
        answers: SourceAnswers = self.successResultOf(d)
        self.assertEqual(list(answers.results), ["s1.example"])

    def test_small_answer_validated_at_once(self) -> None:
        """A real-sized answer is validated at once: it takes no worker pool slot (a burst
        of origin fetches must not fill the pool)."""
        runner = HeldRunner()
        fetcher = self.make_fetcher(self.client(), run_blocking=runner)
        answers = self.successResultOf(
            defer.ensureDeferred(fetcher.fetch_keys({"s1.example": KeyRequest("s1.example")}))
        )
        self.assertEqual(runner.jobs, [])
        self.assertEqual(list(answers.results), ["s1.example"])

    def test_answer_over_the_key_cap_rejected(self) -> None:
        """An answer listing more keys than max_keys_per_response is an invalid response."""
        three = [self.keys["s1.example"], new_signing_key("x1"), new_signing_key("x2")]
        self.origins["s1.example"].signing_keys = three
        with self.assertLogs("keyring_module.fetchers.origin", "INFO") as logs:
            answers = self.fetch_answers(
                self.make_fetcher(self.client(), max_keys_per_response=2), "s1.example"
            )
        self.assertEqual(answers.results, {})
        [failure] = answers.failures["s1.example"]
        self.assertEqual(failure.kind, FailureKind.INVALID_RESPONSE)
        self.assertIn("too_many_keys", failure.detail)
        self.assertIn("too_many_keys", logs.output[0])
        self.limiter = OriginRateLimiter(self.clock, RateLimitConfig(), random=lambda: 0.5)
        fetcher = self.make_fetcher(self.client(), max_keys_per_response=3)
        self.assertEqual(list(self.fetch(fetcher, "s1.example")), ["s1.example"])

    def test_fetch_ok(self) -> None:
        """A well-signed origin response is returned with the origin source label."""
        client = self.client()
        results = self.fetch(self.make_fetcher(client), "s1.example")
        [result] = results["s1.example"]
        self.assertEqual(result.source, SOURCE_ORIGIN)
        self.assertEqual(
            dict(result.response.verify_keys),
            {key_id(self.keys["s1.example"]): verify_key_bytes(self.keys["s1.example"])},
        )
        self.assertEqual(result.response.valid_until_ts, NOW_MS + DAY_MS)
        self.assertEqual(
            [(r.method, r.path) for r in client.requests], [("GET", "/_matrix/key/v2/server")]
        )

    def test_wrong_server_name_rejected(self) -> None:
        """An origin answering with another server's keys is left out of the result."""
        self.origins["s1.example"].body_override = self.entry("s2.example")
        with self.assertLogs("keyring_module.fetchers.origin", "INFO") as logs:
            answers = self.fetch_answers(self.make_fetcher(self.client()), "s1.example")
        self.assertEqual(answers.results, {})
        self.assertIn("wrong_server_name", logs.output[0])
        [failure] = answers.failures["s1.example"]
        self.assertEqual((failure.source, failure.kind), ("origin", FailureKind.INVALID_RESPONSE))
        self.assertIn("wrong_server_name", failure.detail)

    def test_failing_origins_do_not_affect_others(self) -> None:
        """Unreachable, erroring and non-JSON origins are dropped; the good one is returned."""
        self.origins["s2.example"].code = 500
        self.origins["s3.example"].raw_body = b"<html>not json"
        fetcher = self.make_fetcher(self.client())
        answers = self.fetch_answers(
            fetcher, "s1.example", "s2.example", "s3.example", "unknown.example"
        )
        self.assertEqual(list(answers.results), ["s1.example"])
        unreachable = [FailureKind.UNREACHABLE]
        self.assertEqual(
            self.failure_kinds(answers),
            {"s2.example": unreachable, "s3.example": unreachable, "unknown.example": unreachable},
        )
        self.assertTrue(answers.failures["s2.example"][0].detail.startswith("http_error"))
        self.assertTrue(answers.failures["unknown.example"][0].detail.startswith("connect_error"))

    def test_one_info_line_per_origin(self) -> None:
        """Each origin fetch logs one INFO line with its outcome and duration."""
        self.origins["s2.example"].code = 500
        with self.assertLogs("keyring_module.fetchers.origin", "INFO") as logs:
            self.fetch(self.make_fetcher(self.client()), "s1.example", "s2.example")
        self.assertEqual(len(logs.records), 2)
        by_server = {r.args[0]: r.getMessage() for r in logs.records}  # type: ignore[index]
        self.assertRegex(by_server["s1.example"], r"ok \(1 keys.* in \d+ ms")
        self.assertRegex(by_server["s2.example"], r"http_error.* in \d+ ms")

    def test_concurrent_lookups_share_one_fetch(self) -> None:
        """200 concurrent lookups of one uncached origin make exactly one HTTP request."""
        origin = self.origins["s1.example"]
        origin.hold = True
        client = self.client()
        fetcher = self.make_fetcher(client)
        requests = {"s1.example": KeyRequest("s1.example")}
        pending = [defer.ensureDeferred(fetcher.fetch_keys(requests)) for _ in range(200)]
        self.assertEqual(origin.hits, 1)
        origin.release()
        client.flush()
        for d in pending:
            answers: SourceAnswers = self.successResultOf(d)
            self.assertEqual(list(answers.results), ["s1.example"])
        self.assertEqual(len(client.requests), 1)

    def test_invalid_response_does_not_back_origin_off(self) -> None:
        """An origin that answered with an invalid response is up: it is not backed off,
        and is asked again while its token bucket lasts."""
        self.origins["s1.example"].body_override = {"server_name": "s1.example"}
        fetcher = self.make_fetcher(self.client())
        self.assertEqual(self.fetch(fetcher, "s1.example"), {})
        self.assertEqual(self.fetch(fetcher, "s1.example"), {})
        self.assertEqual(self.origins["s1.example"].hits, 2)
        self.assertFalse(self.limiter.is_backed_off("s1.example"))

    def test_failure_logged_with_its_kind_and_detail(self) -> None:
        """A failed fetch's log line gives the failure's kind and the very detail its
        answers carry."""
        self.origins["s1.example"].body_override = self.entry("s2.example")
        with self.assertLogs("keyring_module.fetchers.origin", "INFO") as logs:
            answers = self.fetch_answers(self.make_fetcher(self.client()), "s1.example")
        [failure] = answers.failures["s1.example"]
        [line] = logs.output
        self.assertIn(
            "Origin key fetch from s1.example: invalid_response: %s in " % failure.detail, line
        )

    def test_unexpected_error_logged_once_with_its_traceback(self) -> None:
        """An unexpected error is one ERROR line with the traceback, and an ERROR failure."""

        def broken(work: Any) -> "defer.Deferred[Any]":
            return defer.fail(RuntimeError("boom"))

        self.origins["s1.example"].body_override = make_signed_server_keys(
            "s1.example",
            [self.keys["s1.example"]],
            NOW_MS + DAY_MS,
            extra={"padding": [[] for _ in range(5000)]},  # big: goes to the runner
        )
        fetcher = self.make_fetcher(self.client(), run_blocking=broken)
        with self.assertLogs("keyring_module.fetchers.origin", "INFO") as logs:
            answers = self.fetch_answers(fetcher, "s1.example")
        [record] = logs.records
        self.assertEqual(record.levelname, "ERROR")
        self.assertIsNotNone(record.exc_info)
        self.assertIn("s1.example: error: RuntimeError: boom in ", record.getMessage())
        [failure] = answers.failures["s1.example"]
        self.assertEqual((failure.kind, failure.detail), (FailureKind.ERROR, "RuntimeError: boom"))

    def test_invalid_server_name_not_fetched(self) -> None:
        """A syntactically invalid server name is never requested."""
        client = self.client()
        self.assertEqual(self.fetch(self.make_fetcher(client), "bad name/x"), {})
        self.assertEqual(client.requests, [])


class NotaryKeyFetcherTests(FetcherTestCase):
    def make_fetcher(
        self,
        resources: Optional[Mapping[str, Resource]] = None,
        trusted: Optional[Sequence[TrustedKeyServer]] = None,
        batch_size: int = 100,
        **kwargs: Any,
    ) -> NotaryKeyFetcher:
        self.fake_client = self.client(
            resources if resources is not None else {NOTARY: self.notary}
        )
        self.notary_limiter = NotaryLimiter(self.clock, RateLimitConfig(), random=lambda: 0.5)
        return NotaryKeyFetcher(
            self.fake_client,
            trusted if trusted is not None else [self.trusted],
            self.notary_limiter,
            self.clock,
            batch_size=batch_size,
            **kwargs,
        )

    def test_entries_validated_through_the_runner(self) -> None:
        """Each POST's entries are validated in one job of the injected runner."""
        for name in ("s1.example", "s2.example", "s3.example"):
            self.notary.entries[name] = [self.entry(name)]
        runner = HeldRunner()
        fetcher = self.make_fetcher(batch_size=2, run_blocking=runner)
        requests = {name: KeyRequest(name) for name in ("s1.example", "s2.example", "s3.example")}
        d = defer.ensureDeferred(fetcher.fetch_keys(requests))
        self.assertNoResult(d)
        self.assertEqual(len(runner.jobs), 2)
        runner.run_all()
        answers: SourceAnswers = self.successResultOf(d)
        self.assertEqual(sorted(answers.results), ["s1.example", "s2.example", "s3.example"])

    def test_entry_over_the_key_cap_dropped_alone(self) -> None:
        """An entry listing more keys than max_keys_per_response is dropped; others are kept."""
        many = make_signed_server_keys(
            "s2.example", [self.keys["s2.example"], new_signing_key("x1")], NOW_MS + DAY_MS
        )
        self.notary.entries = {"s1.example": [self.entry("s1.example")], "s2.example": [many]}
        fetcher = self.make_fetcher(max_keys_per_response=1)
        with self.assertLogs("keyring_module.fetchers.notary_client", "WARNING") as logs:
            answers = self.fetch_answers(fetcher, "s1.example", "s2.example")
        self.assertEqual(list(answers.results), ["s1.example"])
        self.assertEqual(
            self.failure_kinds(answers), {"s2.example": [FailureKind.INVALID_RESPONSE]}
        )
        self.assertIn("too_many_keys", logs.output[0])

    def test_failures_say_why_per_server(self) -> None:
        """An entry missing from the answer, an entry not signed by the notary, a failed
        POST and a backed-off notary are each reported per server."""
        self.notary.entries["s1.example"] = [self.entry("s1.example")]
        bad = self.entry("s2.example")
        self.notary.entries["s2.example"] = [bad]
        honest_cosign = self.notary.cosign
        self.notary.cosign = lambda e: e if e is bad else honest_cosign(e)
        fetcher = self.make_fetcher()
        answers = self.fetch_answers(fetcher, "s1.example", "s2.example", "s3.example")
        self.assertEqual(list(answers.results), ["s1.example"])
        self.assertEqual(
            self.failure_kinds(answers),
            {
                "s2.example": [FailureKind.INVALID_RESPONSE],
                "s3.example": [FailureKind.NOT_IN_ANSWER],
            },
        )
        self.assertEqual(answers.failures["s2.example"][0].source, notary_source(NOTARY))
        self.notary.code = 500
        answers = self.fetch_answers(fetcher, "s1.example")
        self.assertEqual(self.failure_kinds(answers), {"s1.example": [FailureKind.UNREACHABLE]})
        self.assertTrue(answers.failures["s1.example"][0].detail.startswith("http_error"))
        answers = self.fetch_answers(fetcher, "s1.example")  # backed off after the failure
        self.assertEqual(self.failure_kinds(answers), {"s1.example": [FailureKind.REFUSED]})
        self.assertTrue(answers.failures["s1.example"][0].detail.startswith("backed_off"))

    def test_failed_query_logged_with_the_failure_detail(self) -> None:
        """A failed query's log line gives the failure's kind and the very detail its
        answers carry; a query the limiter refuses is logged at DEBUG only."""
        self.notary.code = 500
        fetcher = self.make_fetcher()
        with self.assertLogs("keyring_module.fetchers.notary_client", "INFO") as logs:
            answers = self.fetch_answers(fetcher, "s1.example")
        [failure] = answers.failures["s1.example"]
        [line] = [line for line in logs.output if "Notary key query" in line]
        self.assertIn(
            "Notary key query to %s for 1 servers: unreachable: %s in " % (NOTARY, failure.detail),
            line,
        )
        with self.assertLogs("keyring_module.fetchers.notary_client", "DEBUG") as logs:
            answers = self.fetch_answers(fetcher, "s1.example")
        self.assertEqual(self.failure_kinds(answers), {"s1.example": [FailureKind.REFUSED]})
        self.assertEqual([r.levelname for r in logs.records], ["DEBUG"])
        self.assertIn("refused: backed_off", logs.output[0])

    def test_body_shape(self) -> None:
        """Each wanted key id carries minimum_valid_until_ts; "all keys" is sent as {}."""
        fetcher = self.make_fetcher()
        requests = {
            "s1.example": KeyRequest("s1.example", frozenset({"ed25519:b", "ed25519:a"}), 1234),
            "s2.example": KeyRequest("s2.example", None, 99),
        }
        self.successResultOf(defer.ensureDeferred(fetcher.fetch_keys(requests)))
        [request] = self.fake_client.requests
        self.assertEqual((request.method, request.server_name), ("POST", NOTARY))
        self.assertEqual(request.path, "/_matrix/key/v2/query")
        self.assertEqual(
            self.notary.bodies,
            [
                {
                    "server_keys": {
                        "s1.example": {
                            "ed25519:a": {"minimum_valid_until_ts": 1234},
                            "ed25519:b": {"minimum_valid_until_ts": 1234},
                        },
                        "s2.example": {},
                    }
                }
            ],
        )

    def test_batches(self) -> None:
        """Servers are split into POSTs of at most batch_size, covering each once."""
        for name in self.keys:
            self.notary.entries[name] = [self.entry(name)]
        fetcher = self.make_fetcher(batch_size=2)
        results = self.fetch(fetcher, *self.keys)
        batches = [sorted(body["server_keys"]) for body in self.notary.bodies]
        self.assertEqual(len(batches), 3)
        self.assertTrue(all(len(b) <= 2 for b in batches))
        self.assertEqual(sorted(n for b in batches for n in b), sorted(self.keys))
        self.assertEqual(sorted(results), sorted(self.keys))

    def test_results_labelled_with_notary(self) -> None:
        """Entries are validated and labelled with the notary's source."""
        self.notary.entries["s1.example"] = [self.entry("s1.example")]
        results = self.fetch(self.make_fetcher(), "s1.example")
        [result] = results["s1.example"]
        self.assertEqual(result.source, notary_source(NOTARY))
        self.assertEqual(list(json.loads(result.response.json_bytes)["signatures"]), ["s1.example"])

    def test_bad_entry_dropped_alone(self) -> None:
        """An entry with a broken origin signature is dropped; the others are kept."""
        bad = self.entry("s2.example")
        bad["valid_until_ts"] += 1
        self.notary.entries = {"s1.example": [self.entry("s1.example")], "s2.example": [bad]}
        with self.assertLogs("keyring_module.fetchers.notary_client", "WARNING") as logs:
            results = self.fetch(self.make_fetcher(), "s1.example", "s2.example")
        self.assertEqual(list(results), ["s1.example"])
        self.assertIn("bad_self_signature", logs.output[0])

    def test_unasked_servers_ignored(self) -> None:
        """Valid entries about servers we did not ask about are ignored."""
        self.notary.entries["s1.example"] = [self.entry("s1.example")]
        self.notary.extra_entries = [self.entry("s5.example")]
        results = self.fetch(self.make_fetcher(), "s1.example")
        self.assertEqual(list(results), ["s1.example"])

    def test_entries_about_servers_not_asked_are_only_counted(self) -> None:
        """Entries about servers not asked, or naming none, are counted in one log line,
        not handled one by one."""
        self.notary.entries["s1.example"] = [self.entry("s1.example")]
        unasked: dict[str, object] = {"server_name": "s5.example"}
        nameless: dict[str, object] = {"x": 1}
        self.notary.extra_entries = [unasked] * 300 + [nameless] * 300
        with self.assertLogs("keyring_module.fetchers.notary_client", "DEBUG") as logs:
            answers = self.fetch_answers(self.make_fetcher(), "s1.example")
        self.assertEqual(list(answers.results), ["s1.example"])
        self.assertEqual(answers.failures, {})
        ignoring = [line for line in logs.output if "not asked" in line]
        self.assertEqual(len(ignoring), 1)
        self.assertIn("Ignoring 600 entries from notary %s" % NOTARY, ignoring[0])
        self.assertLessEqual(len(logs.output), 2)

    def test_repeated_invalid_entries_make_one_failure(self) -> None:
        """Repeated invalid entries about a server make one failure and one log line that
        counts them."""
        bad = self.entry("s2.example")
        bad["valid_until_ts"] += 1
        self.notary.entries = {"s2.example": [bad] * 50}
        with self.assertLogs("keyring_module.fetchers.notary_client", "INFO") as logs:
            answers = self.fetch_answers(self.make_fetcher(), "s2.example")
        self.assertEqual(
            self.failure_kinds(answers), {"s2.example": [FailureKind.INVALID_RESPONSE]}
        )
        warnings = [line for line in logs.output if line.startswith("WARNING")]
        self.assertEqual(len(warnings), 1)
        self.assertIn("(and 49 more invalid entries about it)", warnings[0])

    def test_repeated_entries_are_used_once(self) -> None:
        """A valid entry repeated in the answer is returned once, and counted in the
        summary line."""
        self.notary.entries["s1.example"] = [self.entry("s1.example")] * 50
        with self.assertLogs("keyring_module.fetchers.notary_client", "INFO") as logs:
            answers = self.fetch_answers(self.make_fetcher(), "s1.example")
        self.assertEqual(len(answers.results["s1.example"]), 1)
        self.assertTrue(any("and 49 repeated entries" in line for line in logs.output))

    def test_notary_signature_checked(self) -> None:
        """Entries co-signed with a key not configured for the notary are all dropped."""
        self.notary.signing_key = new_signing_key("n_1")
        self.notary.entries["s1.example"] = [self.entry("s1.example")]
        self.assertEqual(self.fetch(self.make_fetcher(), "s1.example"), {})

    def test_notaries_in_parallel_and_merged(self) -> None:
        """Every notary is asked; their answers are merged per server with their sources."""
        key2 = new_signing_key("m_1")
        notary2 = FakeNotaryResource(NOTARY2, key2)
        self.notary.entries["s1.example"] = [self.entry("s1.example")]
        notary2.entries = {
            "s1.example": [self.entry("s1.example")],
            "s2.example": [self.entry("s2.example")],
        }
        fetcher = self.make_fetcher(
            {NOTARY: self.notary, NOTARY2: notary2},
            [self.trusted, make_trusted_key_server(NOTARY2, key2)],
        )
        results = self.fetch(fetcher, "s1.example", "s2.example")
        self.assertEqual(
            sorted(r.source for r in results["s1.example"]),
            [notary_source(NOTARY), notary_source(NOTARY2)],
        )
        self.assertEqual([r.source for r in results["s2.example"]], [notary_source(NOTARY2)])

    def test_notaries_asked_concurrently(self) -> None:
        """A notary that never answers does not stop the next notary from being asked."""
        key2 = new_signing_key("m_1")
        notary2 = FakeNotaryResource(NOTARY2, key2, {"s1.example": [self.entry("s1.example")]})
        fetcher = self.make_fetcher(
            {NOTARY: HangingResource(), NOTARY2: notary2},
            [self.trusted, make_trusted_key_server(NOTARY2, key2)],
        )
        d = defer.ensureDeferred(fetcher.fetch_keys({"s1.example": KeyRequest("s1.example")}))
        self.assertNoResult(d)
        self.assertEqual([r.server_name for r in self.fake_client.requests], [NOTARY, NOTARY2])
        self.assertEqual(len(notary2.bodies), 1)

    def test_failing_notary_does_not_block_other(self) -> None:
        """A notary answering 500 is skipped and backed off; the other notary still answers."""
        key2 = new_signing_key("m_1")
        notary2 = FakeNotaryResource(NOTARY2, key2, {"s1.example": [self.entry("s1.example")]})
        self.notary.code = 500
        fetcher = self.make_fetcher(
            {NOTARY: self.notary, NOTARY2: notary2},
            [self.trusted, make_trusted_key_server(NOTARY2, key2)],
        )
        results = self.fetch(fetcher, "s1.example")
        self.assertEqual([r.source for r in results["s1.example"]], [notary_source(NOTARY2)])
        self.assertTrue(self.notary_limiter.is_backed_off(NOTARY))
        self.fetch(fetcher, "s2.example")
        self.assertEqual(len(self.notary.bodies), 1)

    def test_malformed_answer(self) -> None:
        """An answer without a server_keys array yields nothing and does not raise."""

        class Broken(FakeNotaryResource):
            def render_POST(self, request: Any) -> bytes:
                return self._write_json(request, {"server_keys": {}})

        fetcher = self.make_fetcher({NOTARY: Broken(NOTARY, self.notary_key)})
        self.assertEqual(self.fetch(fetcher, "s1.example"), {})


class ChainTestCase(FetcherTestCase):
    """A store and the fake origins and notary, for chain tests."""

    def setUp(self) -> None:
        super().setUp()
        self.store = InMemoryKeyStore()
        self.resources: dict[str, Resource] = {**self.origins, NOTARY: self.notary}
        self.fake_client = self.client(self.resources)

    def get_keys(
        self, chain: KeyFetcherChain, *requests: KeyRequest, **kw: Any
    ) -> dict[str, dict[str, StoredKey]]:
        result: dict[str, dict[str, StoredKey]] = self.successResultOf(
            defer.ensureDeferred(chain.get_keys(list(requests), **kw))
        )
        return result

    def store_entry(
        self, obj: dict[str, Any], source: str = SOURCE_ORIGIN, ts: int = NOW_MS
    ) -> None:
        response = parse_server_keys_response(obj, str(obj["server_name"]))
        self.successResultOf(
            defer.ensureDeferred(self.store.store_server_keys(response, source, ts))
        )

    def servers_asked(self, server_name: str) -> list[str]:
        """The servers each request to ``server_name`` was about."""
        names: list[str] = []
        for request in self.fake_client.requests_to(server_name):
            assert isinstance(request.body, dict)
            names.extend(sorted(request.body["server_keys"]))
        return names


class KeyFetcherChainTests(ChainTestCase):
    def make_chain(self, order: Sequence[str] = ("origin", "notaries")) -> KeyFetcherChain:
        return KeyFetcherChain(
            self.store,
            OriginKeyFetcher(self.fake_client, self.limiter, self.clock),
            NotaryKeyFetcher(self.fake_client, [self.trusted], self.limiter, self.clock),
            self.clock,
            order=order,
        )

    def test_served_from_store(self) -> None:
        """Stored keys valid until the minimum are served without any request."""
        self.store_entry(self.entry("s1.example"))
        keys = self.get_keys(self.make_chain(), KeyRequest("s1.example", None, NOW_MS))
        self.assertEqual(list(keys["s1.example"]), [key_id(self.keys["s1.example"])])
        self.assertEqual(self.fake_client.requests, [])

    def test_origin_first(self) -> None:
        """By default the origin answers and notaries are not asked."""
        keys = self.get_keys(self.make_chain(), KeyRequest("s1.example", None, NOW_MS))
        [stored] = keys["s1.example"].values()
        self.assertEqual(stored.source, SOURCE_ORIGIN)
        self.assertEqual(self.notary.bodies, [])

    def test_notary_only_for_failed_origins(self) -> None:
        """Only the servers whose origin failed go on to the notaries."""
        self.origins["s2.example"].code = 500
        self.notary.entries = {
            "s1.example": [self.entry("s1.example")],
            "s2.example": [self.entry("s2.example")],
        }
        keys = self.get_keys(self.make_chain(), KeyRequest("s1.example"), KeyRequest("s2.example"))
        self.assertEqual(self.servers_asked(NOTARY), ["s2.example"])
        self.assertEqual(next(iter(keys["s1.example"].values())).source, SOURCE_ORIGIN)
        self.assertEqual(next(iter(keys["s2.example"].values())).source, notary_source(NOTARY))

    def test_notaries_first(self) -> None:
        """With notaries first, origins are asked only about what notaries did not answer."""
        self.notary.entries = {"s1.example": [self.entry("s1.example")]}
        keys = self.get_keys(
            self.make_chain(("notaries", "origin")),
            KeyRequest("s1.example"),
            KeyRequest("s2.example"),
        )
        self.assertEqual(self.servers_asked(NOTARY), ["s1.example", "s2.example"])
        self.assertEqual(
            [r.server_name for r in self.fake_client.requests if r.method == "GET"], ["s2.example"]
        )
        self.assertEqual(next(iter(keys["s1.example"].values())).source, notary_source(NOTARY))
        self.assertEqual(next(iter(keys["s2.example"].values())).source, SOURCE_ORIGIN)

    def test_unsatisfying_origin_response_goes_to_notary(self) -> None:
        """An origin answer not valid until the minimum sends the server on to notaries."""
        minimum = NOW_MS + 2 * DAY_MS
        self.notary.entries = {"s1.example": [self.entry("s1.example", NOW_MS + 3 * DAY_MS)]}
        keys = self.get_keys(self.make_chain(), KeyRequest("s1.example", None, minimum))
        [stored] = keys["s1.example"].values()
        self.assertEqual(stored.valid_until_ts, NOW_MS + 3 * DAY_MS)
        self.assertEqual(self.origins["s1.example"].hits, 1)

    def test_stale_keys_returned_when_all_fail(self) -> None:
        """When every source fails, the stale stored keys are still returned."""
        self.store_entry(self.entry("s1.example", NOW_MS - DAY_MS))
        self.origins["s1.example"].code = 500
        keys = self.get_keys(self.make_chain(), KeyRequest("s1.example", None, NOW_MS))
        [stored] = keys["s1.example"].values()
        self.assertEqual(stored.valid_until_ts, NOW_MS - DAY_MS)
        self.assertEqual(self.servers_asked(NOTARY), ["s1.example"])

    def test_unknown_server_gives_empty_keys(self) -> None:
        """A server no source knows is in the result with no keys."""
        keys = self.get_keys(self.make_chain(), KeyRequest("nowhere.example"))
        self.assertEqual(keys, {"nowhere.example": {}})

    def test_bad_response_never_replaces_good_keys(self) -> None:
        """A forged response (other key bytes, bad signature) never reaches the store."""
        good = self.keys["s1.example"]
        self.store_entry(self.entry("s1.example", NOW_MS + DAY_MS))
        forger = new_signing_key(good.version)
        forged = make_signed_server_keys("s1.example", [forger], NOW_MS + 5 * DAY_MS)
        forged["signatures"] = sign_as(self.entry("s1.example"), "s1.example", good)["signatures"]
        self.origins["s1.example"].body_override = forged
        self.notary.entries = {"s1.example": [forged]}
        keys = self.get_keys(self.make_chain(), KeyRequest("s1.example", None, NOW_MS + 2 * DAY_MS))
        [stored] = keys["s1.example"].values()
        self.assertEqual(stored.verify_key_bytes, verify_key_bytes(good))
        self.assertEqual(stored.valid_until_ts, NOW_MS + DAY_MS)
        self.assertEqual(self.origins["s1.example"].hits, 1)
        self.assertEqual(len(self.notary.bodies), 1)
        responses = self.successResultOf(
            defer.ensureDeferred(self.store.get_server_responses("s1.example"))
        )
        self.assertEqual(len(responses), 1)

    def test_use_cache_false_refetches(self) -> None:
        """use_cache=False fetches even when the stored keys would do."""
        self.store_entry(self.entry("s1.example"), ts=NOW_MS - 1000)
        self.get_keys(self.make_chain(), KeyRequest("s1.example"), use_cache=False)
        self.assertEqual(self.origins["s1.example"].hits, 1)

    def test_invalid_server_name_never_asked_about(self) -> None:
        """An invalid server name is refused by the chain: no origin or notary is asked
        about it, it gets no keys, and the trace says why; valid names go on as usual."""
        self.origins["s1.example"].code = 500
        self.notary.entries["s1.example"] = [self.entry("s1.example")]
        trace = FetchTrace()
        reported: list[str] = []
        keys = self.get_keys(
            self.make_chain(),
            KeyRequest("bad name.example", None, NOW_MS),
            KeyRequest("s1.example", None, NOW_MS),
            trace=trace,
            on_server=lambda name, _: reported.append(name),
        )
        self.assertEqual(keys["bad name.example"], {})
        self.assertEqual(list(keys["s1.example"]), [key_id(self.keys["s1.example"])])
        self.assertEqual(sorted(reported), ["bad name.example", "s1.example"])
        self.assertEqual(self.servers_asked(NOTARY), ["s1.example"])
        self.assertEqual(
            [r.server_name for r in self.fake_client.requests if r.method == "GET"],
            ["s1.example"],
        )
        refused = trace.servers["bad name.example"]
        self.assertEqual(refused.asked, [])
        self.assertEqual(
            [(f.source, f.kind, f.detail) for f in refused.failures],
            [
                (SOURCE_ORIGIN, FailureKind.REFUSED, "invalid server name"),
                (notary_source(NOTARY), FailureKind.REFUSED, "invalid server name"),
            ],
        )

    def test_repeated_notary_entries_are_stored_once(self) -> None:
        """500 copies of one entry in a notary answer make one store write, counted once."""
        self.origins["s1.example"].code = 500
        self.notary.entries["s1.example"] = [self.entry("s1.example")] * 500
        writes: list[str] = []
        store_server_keys = self.store.store_server_keys

        async def counting(response: Any, source: str, *args: Any, **kwargs: Any) -> Any:
            writes.append(source)
            return await store_server_keys(response, source, *args, **kwargs)

        self.store.store_server_keys = counting  # type: ignore[method-assign]
        chain = self.make_chain()
        stored: list[str] = []
        chain.on_stored = stored.append
        keys = self.get_keys(chain, KeyRequest("s1.example", None, NOW_MS))
        self.assertEqual(list(keys["s1.example"]), [key_id(self.keys["s1.example"])])
        self.assertEqual(writes, [notary_source(NOTARY)])
        self.assertEqual(stored, [notary_source(NOTARY)])

    def test_requests_merged(self) -> None:
        """Two requests for one server make a single fetch."""
        self.get_keys(
            self.make_chain(),
            KeyRequest("s1.example", frozenset({"ed25519:x"})),
            KeyRequest("s1.example", None, 5),
        )
        self.assertEqual(self.origins["s1.example"].hits, 1)

    def test_all_keys_names_stored_ids_to_notary(self) -> None:
        """An "all keys" request names the stored key ids to notaries, with the minimum."""
        self.store_entry(self.entry("s1.example", NOW_MS - DAY_MS))
        self.origins["s1.example"].code = 500
        self.get_keys(self.make_chain(), KeyRequest("s1.example", None, NOW_MS))
        self.assertEqual(
            self.notary.bodies[0],
            {
                "server_keys": {
                    "s1.example": {
                        key_id(self.keys["s1.example"]): {"minimum_valid_until_ts": NOW_MS}
                    }
                }
            },
        )


class RecordingFetcher:
    """Wraps a fetcher and records each ``fetch_keys`` call: when, and about which servers."""

    def __init__(self, fetcher: Any, clock: Clock) -> None:
        self.fetcher = fetcher
        self.clock = clock
        self.calls: list[tuple[float, list[str]]] = []

    @property
    def sources(self) -> tuple[str, ...]:
        sources: tuple[str, ...] = self.fetcher.sources
        return sources

    async def fetch_keys(self, requests: Mapping[str, KeyRequest]) -> SourceAnswers:
        self.calls.append((self.clock.seconds(), sorted(requests)))
        answers: SourceAnswers = await self.fetcher.fetch_keys(requests)
        return answers


class ChainOnServerTests(ChainTestCase):
    """``get_keys(on_server=...)``: each server reported once, as soon as its keys are final.

    The chain waits at most TIMEOUT_S for each source; times are seconds since the start.
    """

    def setUp(self) -> None:
        super().setUp()
        self.start = self.clock.seconds()
        self.reports: list[tuple[float, str, Mapping[str, StoredKey]]] = []

    def make_chain(
        self,
        order: Sequence[str] = ("origin", "notaries"),
        notaries: bool = True,
        n: int = 1,
    ) -> KeyFetcherChain:
        """A chain over ``self.resources`` as they are now, recording the fetcher calls."""
        self.fake_client = self.client(self.resources)
        self.origin_calls = RecordingFetcher(
            OriginKeyFetcher(self.fake_client, self.limiter, self.clock), self.clock
        )
        self.notary_calls = RecordingFetcher(
            NotaryKeyFetcher(self.fake_client, [self.trusted], self.limiter, self.clock),
            self.clock,
        )
        return KeyFetcherChain(
            self.store,
            self.origin_calls,
            [self.notary_calls] if notaries else None,
            self.clock,
            order=order,
            trust=KeyTrustConfig(n),
            timeout_ms=int(TIMEOUT_S * 1000),
        )

    def elapsed(self) -> float:
        return round(self.clock.seconds() - self.start, 3)

    def on_server(self, server_name: str, keys: Mapping[str, StoredKey]) -> None:
        self.reports.append((self.elapsed(), server_name, keys))

    def start_get_keys(
        self, chain: KeyFetcherChain, *names: str, **kw: Any
    ) -> "defer.Deferred[dict[str, dict[str, StoredKey]]]":
        requests = [KeyRequest(name) for name in names]
        return defer.ensureDeferred(chain.get_keys(requests, on_server=self.on_server, **kw))

    def reported(self) -> list[tuple[float, str]]:
        """(when, server) of each report so far."""
        return [(t, name) for t, name, _ in self.reports]

    def report_of(self, server_name: str) -> Mapping[str, StoredKey]:
        [keys] = [keys for _, name, keys in self.reports if name == server_name]
        return keys

    def source(self, keys: Mapping[str, StoredKey]) -> str:
        [stored] = keys.values()
        return stored.source

    def hang(self, *names: str) -> None:
        """Let these origins accept requests and never answer."""
        for name in names:
            self.resources[name] = HangingResource()

    def started(self, recorder: RecordingFetcher) -> list[tuple[float, list[str]]]:
        return [(round(t - self.start, 3), names) for t, names in recorder.calls]

    def test_live_origin_reported_before_dead_one(self) -> None:
        """A live origin is reported at once; a dead one in the batch only at the timeout."""
        self.hang("s2.example")
        d = self.start_get_keys(self.make_chain(notaries=False), "s1.example", "s2.example")
        self.assertEqual(self.reported(), [(0, "s1.example")])
        self.assertNoResult(d)
        stored = self.successResultOf(
            defer.ensureDeferred(self.store.get_server_keys("s1.example"))
        )
        self.assertEqual(self.report_of("s1.example"), stored)
        self.assertEqual(list(stored), [key_id(self.keys["s1.example"])])
        self.assertEqual(
            self.started(self.origin_calls), [(0, ["s1.example"]), (0, ["s2.example"])]
        )

        self.clock.advance(TIMEOUT_S - 0.001)
        self.assertEqual(self.reported(), [(0, "s1.example")])
        self.assertNoResult(d)
        self.clock.advance(0.001)
        self.assertEqual(self.reported(), [(0, "s1.example"), (TIMEOUT_S, "s2.example")])
        keys = self.successResultOf(d)
        self.assertEqual(sorted(keys), ["s1.example", "s2.example"])
        self.assertIs(keys["s1.example"], self.report_of("s1.example"))
        self.assertIs(keys["s2.example"], self.report_of("s2.example"))
        self.assertEqual(keys["s2.example"], {})

    def test_notary_asked_once_after_the_origins_head_start(self) -> None:
        """Servers needing notaries wait for the slowest origin, at most for the head
        start (half the timeout), then go in one notary call."""
        self.origins["s2.example"].code = 500  # fails at once, still waits for the others
        self.hang("s3.example", "s4.example")
        self.notary.entries = {
            name: [self.entry(name)] for name in ("s2.example", "s3.example", "s4.example")
        }
        names = ("s1.example", "s2.example", "s3.example", "s4.example")
        d = self.start_get_keys(self.make_chain(), *names)
        self.assertEqual(self.reported(), [(0, "s1.example")])
        self.assertEqual(self.source(self.report_of("s1.example")), SOURCE_ORIGIN)
        self.assertEqual(self.notary_calls.calls, [])
        self.assertEqual(self.started(self.origin_calls), [(0, [name]) for name in names])

        self.clock.advance(HEAD_START_S - 0.001)
        self.assertEqual(self.notary_calls.calls, [])
        self.clock.advance(0.001)
        self.assertEqual(
            self.started(self.notary_calls),
            [(HEAD_START_S, ["s2.example", "s3.example", "s4.example"])],
        )
        self.assertEqual(self.servers_asked(NOTARY), ["s2.example", "s3.example", "s4.example"])
        self.assertEqual(
            self.reported(),
            [(0, "s1.example")] + [(HEAD_START_S, name) for name in names[1:]],
        )
        keys = self.successResultOf(d)
        for name in names[1:]:
            self.assertEqual(self.source(keys[name]), notary_source(NOTARY))
            self.assertIs(keys[name], self.report_of(name))

    def test_notary_asked_at_once_when_every_origin_is_in(self) -> None:
        """When every origin of the round has answered before the head start is over,
        the servers needing notaries go to them at once."""
        self.origins["s2.example"].code = 500
        self.notary.entries = {"s2.example": [self.entry("s2.example")]}
        d = self.start_get_keys(self.make_chain(), "s1.example", "s2.example")
        self.assertEqual(self.started(self.notary_calls), [(0, ["s2.example"])])
        self.assertEqual(self.reported(), [(0, "s1.example"), (0, "s2.example")])
        self.assertEqual(self.source(self.successResultOf(d)["s2.example"]), notary_source(NOTARY))

    def test_store_answers_reported_before_any_fetch(self) -> None:
        """Servers the store answers are reported before any fetch is started."""
        self.store_entry(self.entry("s1.example"))
        self.hang("s2.example")
        chain = self.make_chain()
        fetches_seen: list[tuple[str, int, int]] = []

        def on_server(server_name: str, keys: Mapping[str, StoredKey]) -> None:
            calls = len(self.origin_calls.calls) + len(self.notary_calls.calls)
            fetches_seen.append((server_name, calls, len(self.fake_client.requests)))

        requests = [KeyRequest("s2.example"), KeyRequest("s1.example")]
        d = defer.ensureDeferred(chain.get_keys(requests, on_server=on_server))
        self.assertEqual(fetches_seen, [("s1.example", 0, 0)])
        self.clock.advance(2 * TIMEOUT_S)
        self.assertEqual([name for name, _, _ in fetches_seen], ["s1.example", "s2.example"])
        self.successResultOf(d)

    def test_on_server_errors_logged_and_ignored(self) -> None:
        """A failing on_server is logged for each server; reports and the result go on."""
        self.store_entry(self.entry("s1.example"))  # reported from the store
        self.origins["s3.example"].code = 500  # reported after the notary
        self.notary.entries = {"s3.example": [self.entry("s3.example")]}
        chain = self.make_chain()

        def on_server(server_name: str, keys: Mapping[str, StoredKey]) -> None:
            self.on_server(server_name, keys)
            raise RuntimeError("hook broke on " + server_name)

        requests = [KeyRequest(name) for name in ("s1.example", "s2.example", "s3.example")]
        with self.assertLogs("keyring_module.fetchers.chain", "ERROR") as logs:
            keys = self.successResultOf(
                defer.ensureDeferred(chain.get_keys(requests, on_server=on_server))
            )
        self.assertEqual(
            [name for _, name in self.reported()], ["s1.example", "s2.example", "s3.example"]
        )
        self.assertEqual(len(logs.records), 3)
        for record, name in zip(
            logs.records, ["s1.example", "s2.example", "s3.example"], strict=True
        ):
            self.assertIn("on_server", record.getMessage())
            self.assertIn(name, record.getMessage())
            assert record.exc_info is not None
            self.assertEqual(str(record.exc_info[1]), "hook broke on " + name)
        self.assertEqual(
            {name: self.source(k) for name, k in keys.items()},
            {
                "s1.example": SOURCE_ORIGIN,
                "s2.example": SOURCE_ORIGIN,
                "s3.example": notary_source(NOTARY),
            },
        )

    def test_notaries_first_reports_before_slow_origin(self) -> None:
        """Notaries first: a server the notary answers is reported before another's origin."""
        self.notary.entries = {"s1.example": [self.entry("s1.example")]}
        self.origins["s2.example"].hold = True
        d = self.start_get_keys(self.make_chain(("notaries", "origin")), "s1.example", "s2.example")
        self.assertEqual(self.reported(), [(0, "s1.example")])
        self.assertEqual(self.source(self.report_of("s1.example")), notary_source(NOTARY))
        self.assertEqual(self.started(self.origin_calls), [(0, ["s2.example"])])
        self.assertNoResult(d)

        self.clock.advance(1)
        self.origins["s2.example"].release()
        self.fake_client.flush()
        self.assertEqual(self.reported(), [(0, "s1.example"), (1, "s2.example")])
        keys = self.successResultOf(d)
        self.assertEqual(self.source(keys["s2.example"]), SOURCE_ORIGIN)
        self.assertEqual(self.started(self.notary_calls), [(0, ["s1.example", "s2.example"])])

    def test_two_sources_server_reported_without_other_origins(self) -> None:
        """N=2: a server is reported once its origin and the notary answered, not later."""
        self.notary.entries = {
            "s1.example": [self.entry("s1.example")],
            "s2.example": [self.entry("s2.example")],
        }
        self.origins["s2.example"].hold = True
        d = self.start_get_keys(self.make_chain(n=2), "s1.example", "s2.example")
        self.assertEqual(self.reported(), [(0, "s1.example")])
        self.assertEqual(list(self.report_of("s1.example")), [key_id(self.keys["s1.example"])])
        self.assertEqual(self.started(self.notary_calls), [(0, ["s1.example", "s2.example"])])
        self.assertNoResult(d)

        self.clock.advance(1)
        self.assertNoResult(d)
        self.origins["s2.example"].release()
        self.fake_client.flush()
        self.assertEqual(self.reported(), [(0, "s1.example"), (1, "s2.example")])
        keys = self.successResultOf(d)
        self.assertEqual(list(keys["s2.example"]), [key_id(self.keys["s2.example"])])
        self.assertEqual(len(self.notary.bodies), 1)

    def test_two_sources_wait_for_the_notary(self) -> None:
        """N=2: an origin's answer alone does not settle a server while the notary is out."""
        self.resources[NOTARY] = HangingResource()
        d = self.start_get_keys(self.make_chain(n=2), "s1.example")
        self.assertEqual(self.reported(), [])
        self.clock.advance(TIMEOUT_S)
        self.assertEqual(self.reported(), [(TIMEOUT_S, "s1.example")])
        self.assertEqual(self.successResultOf(d), {"s1.example": {}})

    def test_one_report_per_server(self) -> None:
        """Each requested server is reported exactly once, duplicates merged, in every mode."""
        self.store_entry(self.entry("s3.example"))
        self.origins["s2.example"].code = 500
        self.notary.entries = {"s2.example": [self.entry("s2.example")]}
        requests = [
            KeyRequest("s1.example", frozenset({key_id(self.keys["s1.example"])})),
            KeyRequest("s1.example"),
            KeyRequest("s2.example"),
            KeyRequest("s2.example", None, 5),
            KeyRequest("s3.example"),
            KeyRequest("s3.example"),
            KeyRequest("nowhere.example"),
        ]
        wanted = ["nowhere.example", "s1.example", "s2.example", "s3.example"]
        modes: list[tuple[Sequence[str], bool, int]] = [
            (("origin", "notaries"), True, 1),
            (("notaries", "origin"), True, 1),
            (("origin", "notaries"), True, 2),
            (("origin",), False, 1),
            (("notaries",), False, 1),  # no source at all
        ]
        for order, notaries, n in modes:
            for use_cache in (True, False):
                mode = "%s N=%d use_cache=%s" % (order, n, use_cache)
                self.reports = []
                self.limiter = OriginRateLimiter(self.clock, RateLimitConfig(), random=lambda: 0.5)
                chain = self.make_chain(order, notaries=notaries, n=n)
                keys = self.successResultOf(
                    defer.ensureDeferred(
                        chain.get_keys(requests, use_cache=use_cache, on_server=self.on_server)
                    )
                )
                self.assertEqual(sorted(name for _, name in self.reported()), wanted, mode)
                self.assertEqual(sorted(keys), wanted, mode)
                for name in wanted:
                    self.assertIs(keys[name], self.report_of(name), mode)


class ChainTraceTests(ChainTestCase):
    """``get_keys(trace=...)`` records, per server, who was asked and what came of it."""

    def make_chain(self, **kw: Any) -> KeyFetcherChain:
        return KeyFetcherChain(
            self.store,
            OriginKeyFetcher(self.fake_client, self.limiter, self.clock),
            [NotaryKeyFetcher(self.fake_client, [self.trusted], self.limiter, self.clock)],
            self.clock,
            **kw,
        )

    def test_failed_origin_then_used_notary(self) -> None:
        """The origin's failure and the notary's used answer are both recorded."""
        self.origins["s1.example"].code = 500
        self.notary.entries["s1.example"] = [self.entry("s1.example")]
        trace = FetchTrace()
        self.get_keys(self.make_chain(), KeyRequest("s1.example", None, NOW_MS), trace=trace)
        server = trace.servers["s1.example"]
        self.assertEqual(server.asked, [SOURCE_ORIGIN, notary_source(NOTARY)])
        [failure] = server.failures
        self.assertEqual((failure.source, failure.kind), (SOURCE_ORIGIN, FailureKind.UNREACHABLE))
        self.assertEqual([r.source for r in server.answers], [notary_source(NOTARY)])
        self.assertEqual([r.source for r in server.used], [notary_source(NOTARY)])
        self.assertEqual(server.unused, [])

    def test_untrusted_answers_are_recorded_with_the_reason(self) -> None:
        """With two sources required, a lone origin answer is unused, and says why."""
        trace = FetchTrace()
        chain = self.make_chain(trust=KeyTrustConfig(min_agreeing_sources=2))
        self.get_keys(chain, KeyRequest("s1.example", None, NOW_MS), trace=trace)
        server = trace.servers["s1.example"]
        self.assertEqual(server.used, [])
        [unused] = server.unused
        self.assertEqual(unused.result.source, SOURCE_ORIGIN)
        self.assertIn(
            "not trusted: key %s has 1 of 2" % key_id(self.keys["s1.example"]), unused.reason
        )
        self.assertEqual(
            [(f.source, f.kind) for f in server.failures],
            [(notary_source(NOTARY), FailureKind.NOT_IN_ANSWER)],
        )

    def test_direct_confirmation_is_recorded(self) -> None:
        """A direct confirmation started by the call is recorded in its trace."""
        self.notary.entries["s1.example"] = [self.entry("s1.example", NOW_MS + DAY_MS - 5)]
        chain = self.make_chain(
            order=("notaries", "origin"), trust=KeyTrustConfig(confirm_notary_keys_directly=True)
        )
        trace = FetchTrace()
        self.get_keys(chain, KeyRequest("s1.example", None, NOW_MS), trace=trace)
        self.successResultOf(defer.ensureDeferred(chain.wait_for_confirmations()))
        server = trace.servers["s1.example"]
        self.assertEqual(server.asked, [notary_source(NOTARY), SOURCE_ORIGIN])
        self.assertEqual([r.source for r in server.used], [notary_source(NOTARY), SOURCE_ORIGIN])
        self.assertEqual(self.origins["s1.example"].hits, 1)

    def test_a_source_past_the_deadline_is_timed_out(self) -> None:
        """A source that does not answer within the chain's timeout is recorded as such."""
        self.resources["s1.example"] = HangingResource()
        self.fake_client = self.client(self.resources)
        trace = FetchTrace()
        chain = self.make_chain(order=("origin",), timeout_ms=5000)
        d = defer.ensureDeferred(
            chain.get_keys([KeyRequest("s1.example", None, NOW_MS)], trace=trace)
        )
        self.clock.advance(5)
        self.successResultOf(d)
        [failure] = trace.servers["s1.example"].failures
        self.assertEqual(failure.kind, FailureKind.TIMED_OUT)
        self.assertEqual(failure.detail, "timeout (no answer within 5s)")


class WiredLimitsTests(FetcherTestCase):
    def test_configured_key_cap_reaches_every_fetcher(self) -> None:
        """federation.max_keys_per_response is applied to origin answers and notary entries."""
        two_keys = [self.keys["s1.example"], new_signing_key("x1")]
        self.origins["s1.example"].signing_keys = two_keys
        self.notary.entries["s1.example"] = [self.origins["s1.example"].keys_json()]
        raw = {
            "signing_key_path": "unused",
            "trusted_key_servers": [
                {
                    "server_name": NOTARY,
                    "verify_keys": {key_id(self.notary_key): verify_key_base64(self.notary_key)},
                }
            ],
        }
        found = {}
        for cap in (1, 2):
            config = parse_config(
                {**raw, "federation": {"max_keys_per_response": cap}}, standalone=False
            )
            for source, resources in (
                ("origin", {"s1.example": self.origins["s1.example"]}),
                ("notary", {NOTARY: self.notary}),
            ):
                fetching = Fetching.build(
                    FakeReactor(), config, InMemoryKeyStore(), client=self.client(resources)
                )
                keys = self.successResultOf(
                    defer.ensureDeferred(fetching.chain.get_keys([KeyRequest("s1.example")]))
                )
                found[cap, source] = sorted(keys["s1.example"])
        both = sorted(key_id(k) for k in two_keys)
        self.assertEqual(
            found,
            {(1, "origin"): [], (1, "notary"): [], (2, "origin"): both, (2, "notary"): both},
        )


class WiredChainsTests(FetcherTestCase):
    def test_request_auth_chain_counts_and_logs_with_the_main_chain(self) -> None:
        """Stores and conflicts seen by the X-Matrix request-key chain are counted in the
        metrics, and both chains write one conflict log."""
        registry = CollectorRegistry()
        store = InMemoryKeyStore()
        earlier = make_signed_server_keys("s1.example", [new_signing_key("k1")], NOW_MS + DAY_MS)
        self.successResultOf(
            defer.ensureDeferred(
                store.store_server_keys(
                    parse_server_keys_response(earlier, "s1.example"), "notary:old.example", 1
                )
            )
        )
        config = parse_config({"signing_key_path": "unused"}, standalone=False)
        fetching = Fetching.build(
            FakeReactor(), config, store, client=self.client(), metrics=Metrics(registry)
        )
        self.assertIsNot(fetching.request_auth_chain, fetching.chain)
        requests = [KeyRequest("s1.example"), KeyRequest("s2.example")]
        with self.assertLogs("keyring_module.fetchers.chain", "WARNING") as logs:
            self.successResultOf(
                defer.ensureDeferred(
                    fetching.request_auth_chain.get_keys(requests, use_cache=False)
                )
            )
        self.assertIn("Key conflict for s1.example", logs.output[0])
        stored = registry.get_sample_value("keyring_keys_stored_total", {"source": "origin"})
        self.assertEqual(stored, 1)
        self.assertEqual(registry.get_sample_value("keyring_key_conflicts_total"), 1)
        self.assertIs(fetching.request_auth_chain.conflict_log, fetching.chain.conflict_log)


class KeyRequestTests(SynchronousTestCase):
    def stored(self, kid: str, valid_until_ts: int, expired_ts: Optional[int] = None) -> StoredKey:
        return StoredKey(
            "s.example", kid, b"k" * 32, valid_until_ts, expired_ts, 0, SOURCE_ORIGIN, "r"
        )

    def test_merge(self) -> None:
        """Merging takes the union of key ids and the highest minimum; all-keys absorbs ids."""
        merged = merge_key_requests(
            [
                KeyRequest("a", frozenset({"ed25519:1"}), 5),
                KeyRequest("a", frozenset({"ed25519:2"}), 9),
                KeyRequest("b", frozenset({"ed25519:1"}), 1),
                KeyRequest("b", None, 0),
            ]
        )
        self.assertEqual(merged["a"], KeyRequest("a", frozenset({"ed25519:1", "ed25519:2"}), 9))
        self.assertEqual(merged["b"], KeyRequest("b", None, 1))

    def test_is_satisfied(self) -> None:
        """Current keys must reach the minimum (inclusive); old keys always count."""
        keys = {
            "ed25519:cur": self.stored("ed25519:cur", 100),
            "ed25519:old": self.stored("ed25519:old", 1, 50),
        }
        self.assertTrue(KeyRequest("s", frozenset({"ed25519:cur"}), 100).is_satisfied_by(keys))
        self.assertFalse(KeyRequest("s", frozenset({"ed25519:cur"}), 101).is_satisfied_by(keys))
        self.assertTrue(KeyRequest("s", frozenset({"ed25519:old"}), 10**9).is_satisfied_by(keys))
        self.assertFalse(KeyRequest("s", frozenset({"ed25519:new"}), 0).is_satisfied_by(keys))
        self.assertTrue(KeyRequest("s", None, 100).is_satisfied_by(keys))
        self.assertFalse(KeyRequest("s", None, 101).is_satisfied_by(keys))
        self.assertFalse(KeyRequest("s").is_satisfied_by({}))

    def test_empty_key_ids_refused(self) -> None:
        """An empty set of key ids is refused (None means all keys), also through evolve."""
        with self.assertRaisesRegex(ValueError, "use None for all keys"):
            KeyRequest("s", frozenset(), 5)
        with self.assertRaisesRegex(ValueError, "use None for all keys"):
            attr.evolve(KeyRequest("s", frozenset({"ed25519:a"})), key_ids=frozenset())
        self.assertIsNone(KeyRequest("s", None, 5).key_ids)
