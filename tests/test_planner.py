"""Tests for :mod:`keyring_module.keyring.planner`: the pure planner tables and the coalescer."""

from typing import Mapping, Optional

import attr
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.clock import DeadlineExceeded
from keyring_module.fetchers.base import ServerKeysReport
from keyring_module.keyring.planner import (
    FetchPlan,
    KeyFetchCoalescer,
    KeyNeed,
    plan_key_fetches,
)
from keyring_module.model import KeyRequest, StoredKey
from keyring_module.verify import MAX_KEY_VALIDITY_MS

NOW = 1_000_000_000
K1 = "ed25519:1"
K2 = "ed25519:2"


def req(
    server: str, ts: int, *key_ids: str, enforce: bool = True, purpose: str = "event"
) -> KeyNeed:
    """A :class:`KeyNeed` (default key id ``ed25519:1``)."""
    return KeyNeed(
        server,
        frozenset(key_ids or (K1,)),
        ts,
        enforce_validity=enforce,
        purpose="request" if purpose == "request" else "event",
    )


def key(
    server: str, key_id: str, valid_until_ts: int, expired_ts: Optional[int] = None
) -> StoredKey:
    """A stored key with dummy bytes."""
    return StoredKey(server, key_id, b"k" * 32, valid_until_ts, expired_ts, 0, "origin", "r")


def fetch(server: str, minimum: int, *key_ids: str) -> KeyRequest:
    """An :class:`KeyRequest` (default key id ``ed25519:1``)."""
    return KeyRequest(server, frozenset(key_ids or (K1,)), minimum)


@attr.s(auto_attribs=True)
class PlanCase:
    """One row of the planning table."""

    name: str
    requests: list[KeyNeed]
    expected: dict[str, KeyRequest]
    stored: Mapping[str, Mapping[str, StoredKey]] = attr.Factory(dict)
    unsatisfiable: list[KeyNeed] = attr.Factory(list)
    ready: list[KeyNeed] = attr.Factory(list)


PLAN_CASES = [
    PlanCase(
        "grouped per origin",
        [req("a.org", 10, K1), req("b.org", 20, K1), req("a.org", 5, K2)],
        {"a.org": fetch("a.org", 10, K1, K2), "b.org": fetch("b.org", 20)},
    ),
    PlanCase(
        "highest valid_at_ts per (origin, key_id)",
        [req("a.org", 5000), req("a.org", 7000), req("a.org", 6000)],
        {"a.org": fetch("a.org", 7000)},
    ),
    PlanCase(
        "rooms v1-v4 need only that the key exists",
        [req("a.org", 9000, enforce=False), req("b.org", 9000, enforce=False), req("b.org", 3000)],
        {"a.org": fetch("a.org", 0), "b.org": fetch("b.org", 3000)},
    ),
    PlanCase(
        "request authentication asks for keys valid now",
        [req("a.org", 0, purpose="request")],
        {"a.org": fetch("a.org", NOW)},
    ),
    PlanCase(
        "beyond the 7-day cap: no fetch, unsatisfiable",
        [req("a.org", NOW + MAX_KEY_VALIDITY_MS + 1), req("b.org", NOW + MAX_KEY_VALIDITY_MS)],
        {"b.org": fetch("b.org", NOW + MAX_KEY_VALIDITY_MS)},
        unsatisfiable=[req("a.org", NOW + MAX_KEY_VALIDITY_MS + 1)],
    ),
    PlanCase(
        "beyond the cap does not raise the batch minimum",
        [req("a.org", NOW + 30 * MAX_KEY_VALIDITY_MS), req("a.org", NOW)],
        {"a.org": fetch("a.org", NOW)},
        unsatisfiable=[req("a.org", NOW + 30 * MAX_KEY_VALIDITY_MS)],
    ),
    PlanCase(
        "beyond the cap but a stored old key covers it",
        [req("a.org", NOW + 2 * MAX_KEY_VALIDITY_MS)],
        {},
        stored={"a.org": {K1: key("a.org", K1, 0, expired_ts=NOW + 3 * MAX_KEY_VALIDITY_MS)}},
        ready=[req("a.org", NOW + 2 * MAX_KEY_VALIDITY_MS)],
    ),
    PlanCase(
        "already satisfied keys are not fetched",
        [req("a.org", 5000), req("a.org", 6000, enforce=False)],
        {},
        stored={"a.org": {K1: key("a.org", K1, 6000)}},
        ready=[req("a.org", 5000), req("a.org", 6000, enforce=False)],
    ),
    PlanCase(
        "a stored key too short for one request is refetched with that request's time",
        [req("a.org", 5000), req("a.org", 7000)],
        {"a.org": fetch("a.org", 7000)},
        stored={"a.org": {K1: key("a.org", K1, 6000)}},
        ready=[req("a.org", 5000)],
    ),
    PlanCase(
        "only the unsatisfied key ids of a request are fetched",
        [req("a.org", 5000, K1, K2)],
        {"a.org": fetch("a.org", 5000, K2)},
        stored={"a.org": {K1: key("a.org", K1, 9000)}},
    ),
    PlanCase(
        "v1-v4 ignore a stale valid_until_ts in the store",
        [req("a.org", 9000, enforce=False)],
        {},
        stored={"a.org": {K1: key("a.org", K1, 1)}},
        ready=[req("a.org", 9000, enforce=False)],
    ),
    PlanCase(
        "an old key does not authenticate requests, so it is fetched",
        [req("a.org", 0, purpose="request")],
        {"a.org": fetch("a.org", NOW)},
        stored={"a.org": {K1: key("a.org", K1, NOW * 2, expired_ts=NOW * 2)}},
    ),
    PlanCase(
        "a request with no key ids is unsatisfiable",
        [KeyNeed("a.org", frozenset(), 10)],
        {},
        unsatisfiable=[KeyNeed("a.org", frozenset(), 10)],
    ),
]


class PlanKeyFetchesTests(SynchronousTestCase):
    def test_planning_table(self) -> None:
        """Each row of the planning table yields exactly its expected fetches and fast failures."""
        for case in PLAN_CASES:
            plan = plan_key_fetches(case.requests, case.stored, NOW)
            self.assertEqual(dict(plan.fetches), case.expected, case.name)
            self.assertEqual(list(plan.unsatisfiable), case.unsatisfiable, case.name)
            self.assertEqual(list(plan.ready), case.ready, case.name)
            expected_waiting = [
                r for r in case.requests if r not in case.ready and r not in case.unsatisfiable
            ]
            self.assertEqual(list(plan.waiting), expected_waiting, case.name)

    def test_cold_store_many_requests_one_fetch_per_origin(self) -> None:
        """10,000 requests from 100 origins with a cold store plan exactly 100 fetches."""
        requests = [
            req("s%d.org" % (i % 100), NOW - i, "ed25519:%d" % (i % 3)) for i in range(10_000)
        ]
        plan = plan_key_fetches(requests, {}, NOW)
        self.assertEqual(len(plan.fetches), 100)
        self.assertEqual(
            plan.fetches["s7.org"],
            fetch("s7.org", NOW - 7, "ed25519:0", "ed25519:1", "ed25519:2"),
        )
        self.assertEqual(len(plan.waiting), 10_000)

    def test_origin_fetch_covers_and_merge(self) -> None:
        """A fetch covers another with a subset of key ids and a minimum no higher; merge takes both."""
        big = fetch("a", 100, K1, K2)
        self.assertTrue(big.covers(fetch("a", 100, K1)))
        self.assertTrue(big.covers(fetch("a", 50, K2)))
        self.assertFalse(big.covers(fetch("a", 101, K1)))
        self.assertFalse(big.covers(fetch("a", 10, "ed25519:3")))
        self.assertEqual(fetch("a", 5, K1).merge(fetch("a", 9, K2)), fetch("a", 9, K1, K2))

    def test_plan_is_a_value(self) -> None:
        """Planning returns a frozen FetchPlan and does not depend on request order for fetches."""
        requests = [req("a.org", 1), req("a.org", 3), req("b.org", 2)]
        one = plan_key_fetches(requests, {}, NOW)
        two = plan_key_fetches(list(reversed(requests)), {}, NOW)
        self.assertIsInstance(one, FetchPlan)
        self.assertEqual(dict(one.fetches), dict(two.fetches))


class FakeBatchFetcher:
    """Records each batch; the test reports origins and ends the batch by hand."""

    def __init__(self) -> None:
        self.batches: list[dict[str, KeyRequest]] = []
        self.reports: list[ServerKeysReport] = []
        self.results: list["defer.Deferred[None]"] = []

    def __call__(
        self, batch: dict[str, KeyRequest], report: ServerKeysReport
    ) -> "defer.Deferred[None]":
        self.batches.append(dict(batch))
        self.reports.append(report)
        d: "defer.Deferred[None]" = defer.Deferred()
        self.results.append(d)
        return d


A_KEYS = {K1: key("a", K1, 100)}
B_KEYS = {K1: key("b", K1, 100)}


class KeyFetchCoalescerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.fetcher = FakeBatchFetcher()
        self.coalescer = KeyFetchCoalescer(self.clock, self.fetcher)

    def test_same_turn_requests_form_one_batch(self) -> None:
        """Requests in one reactor turn are merged per origin into a single fetch call."""
        d1 = self.coalescer.request(fetch("a", 10, K1))
        d2 = self.coalescer.request(fetch("a", 30, K2))
        d3 = self.coalescer.request(fetch("b", 5))
        self.assertEqual(self.fetcher.batches, [])
        self.clock.pump([0])
        self.assertEqual(self.fetcher.batches, [{"a": fetch("a", 30, K1, K2), "b": fetch("b", 5)}])
        self.assertNoResult(d1)
        self.fetcher.reports[0]("a", A_KEYS)
        self.fetcher.reports[0]("b", B_KEYS)
        self.assertEqual(self.successResultOf(d1), A_KEYS)
        self.assertEqual(self.successResultOf(d2), A_KEYS)
        self.assertEqual(self.successResultOf(d3), B_KEYS)

    def test_each_origin_is_done_when_reported(self) -> None:
        """A reported origin's callers get its keys while another origin of the batch is
        still being fetched, and that origin can be fetched again at once."""
        da = self.coalescer.request(fetch("a", 1))
        db = self.coalescer.request(fetch("b", 1))
        self.clock.advance(0)
        self.fetcher.reports[0]("a", A_KEYS)
        self.assertEqual(self.successResultOf(da), A_KEYS)
        self.assertNoResult(db)
        again = self.coalescer.request(fetch("a", 5))
        self.clock.advance(0)
        self.assertEqual(self.fetcher.batches[1], {"a": fetch("a", 5)})
        self.fetcher.reports[1]("a", A_KEYS)
        self.successResultOf(again)
        self.assertNoResult(db)
        self.fetcher.results[0].callback(None)
        self.assertEqual(self.successResultOf(db), {})

    def test_late_and_repeated_reports_are_ignored(self) -> None:
        """Only the first report of an origin counts; origins outside the batch are ignored."""
        da = self.coalescer.request(fetch("a", 1))
        self.clock.advance(0)
        self.fetcher.reports[0]("a", A_KEYS)
        self.fetcher.reports[0]("a", {})
        self.fetcher.reports[0]("zzz", B_KEYS)
        self.assertEqual(self.successResultOf(da), A_KEYS)
        next_a = self.coalescer.request(fetch("a", 9))
        self.clock.advance(0)
        self.fetcher.reports[0]("a", {})  # a report from the old batch for the new one
        self.assertNoResult(next_a)
        self.fetcher.reports[1]("a", A_KEYS)
        self.assertEqual(self.successResultOf(next_a), A_KEYS)

    def test_in_flight_fetch_is_shared_when_it_covers(self) -> None:
        """A request covered by the in-flight fetch for its origin waits on it, with no new fetch."""
        first = self.coalescer.request(fetch("a", 100, K1, K2))
        self.clock.advance(0)
        shared = self.coalescer.request(fetch("a", 50, K1))
        self.clock.advance(0)
        self.assertEqual(len(self.fetcher.batches), 1)
        self.assertNoResult(shared)
        self.fetcher.results[0].callback(None)
        self.successResultOf(first)
        self.successResultOf(shared)
        self.clock.advance(0)
        self.assertEqual(len(self.fetcher.batches), 1)

    def test_uncovered_request_joins_the_next_batch(self) -> None:
        """A request the in-flight fetch does not cover starts only after it completes, merged with others."""
        first = self.coalescer.request(fetch("a", 100))
        self.clock.advance(0)
        higher = self.coalescer.request(fetch("a", 200))
        more_keys = self.coalescer.request(fetch("a", 10, K2))
        self.clock.advance(0)
        self.assertEqual(len(self.fetcher.batches), 1)

        self.fetcher.results[0].callback(None)
        self.successResultOf(first)
        self.assertNoResult(higher)
        self.clock.advance(0)
        self.assertEqual(self.fetcher.batches[1], {"a": fetch("a", 200, K1, K2)})
        self.fetcher.results[1].callback(None)
        self.successResultOf(higher)
        self.successResultOf(more_keys)

    def test_other_origins_are_not_blocked_by_an_in_flight_one(self) -> None:
        """While one origin is in flight, a request for another origin gets its own batch next turn."""
        self.coalescer.request(fetch("a", 1))
        self.clock.advance(0)
        self.coalescer.request(fetch("a", 2))
        other = self.coalescer.request(fetch("b", 1))
        self.clock.advance(0)
        self.assertEqual(self.fetcher.batches[1], {"b": fetch("b", 1)})
        self.fetcher.results[1].callback(None)
        self.successResultOf(other)

    def test_batch_failure_fails_every_unreported_waiter(self) -> None:
        """If the fetch raises, every caller of every origin not yet reported gets the error."""
        da = self.coalescer.request(fetch("a", 1))
        db = self.coalescer.request(fetch("b", 1))
        dc = self.coalescer.request(fetch("c", 1))
        self.clock.advance(0)
        shared = self.coalescer.request(fetch("a", 1))
        self.fetcher.reports[0]("c", {})
        with self.assertLogs("keyring_module.keyring.planner", "WARNING"):
            self.fetcher.results[0].errback(RuntimeError("down"))
        for d in (da, db, shared):
            self.failureResultOf(d, RuntimeError)
        self.assertEqual(self.successResultOf(dc), {})

    def test_next_batch_runs_after_a_failure(self) -> None:
        """A failed in-flight fetch still releases the queued next batch for that origin."""
        first = self.coalescer.request(fetch("a", 1))
        self.clock.advance(0)
        second = self.coalescer.request(fetch("a", 2))
        with self.assertLogs("keyring_module.keyring.planner", "WARNING"):
            self.fetcher.results[0].errback(RuntimeError("x"))
        self.failureResultOf(first, RuntimeError)
        self.clock.advance(0)
        self.assertEqual(self.fetcher.batches[1], {"a": fetch("a", 2)})
        self.fetcher.results[1].callback(None)
        self.successResultOf(second)

    def test_cancelled_waiter_does_not_break_the_others(self) -> None:
        """A caller that cancels its Deferred is skipped when the fetch completes."""
        cancelled = self.coalescer.request(fetch("a", 1))
        kept = self.coalescer.request(fetch("a", 1))
        self.clock.advance(0)
        cancelled.cancel()
        self.failureResultOf(cancelled, defer.CancelledError)
        self.fetcher.results[0].callback(None)
        self.successResultOf(kept)

    def test_synchronous_fetcher(self) -> None:
        """A coroutine fetcher that finishes at once completes its callers in the same turn."""
        seen: list[list[str]] = []

        async def fetch_now(batch: dict[str, KeyRequest], report: ServerKeysReport) -> None:
            seen.append(sorted(batch))
            report("a", A_KEYS)

        coalescer = KeyFetchCoalescer(self.clock, fetch_now)
        d = coalescer.request(fetch("a", 1))
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(d), A_KEYS)
        self.assertEqual(seen, [["a"]])


class KeyFetchCoalescerGiveUpTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.fetcher = FakeBatchFetcher()
        self.coalescer = KeyFetchCoalescer(self.clock, self.fetcher, give_up_after_s=5)

    def test_unreported_origins_fail_at_the_limit_and_can_be_fetched_again(self) -> None:
        """Past the limit, unreported origins fail; reported ones are unaffected; the hung
        batch's late reports and end do not touch the next batch of the same origin."""
        da = self.coalescer.request(fetch("a", 1))
        db = self.coalescer.request(fetch("b", 1))
        self.clock.advance(0)
        self.fetcher.reports[0]("b", B_KEYS)
        self.clock.advance(4.999)
        self.assertNoResult(da)
        with self.assertLogs("keyring_module.keyring.planner", "WARNING") as logs:
            self.clock.advance(0.001)
        self.assertIn("giving up", logs.output[0])
        self.failureResultOf(da, DeadlineExceeded)
        self.assertEqual(self.successResultOf(db), B_KEYS)

        again = self.coalescer.request(fetch("a", 1))
        self.clock.advance(0)
        self.assertEqual(len(self.fetcher.batches), 2)
        self.fetcher.reports[0]("a", {})  # the hung batch wakes up late
        self.fetcher.results[0].callback(None)
        self.assertNoResult(again)
        self.fetcher.reports[1]("a", A_KEYS)
        self.assertEqual(self.successResultOf(again), A_KEYS)

    def test_a_batch_that_ends_in_time_cancels_its_timer(self) -> None:
        """No give-up (and no warning) for a batch that finished."""
        d = self.coalescer.request(fetch("a", 1))
        self.clock.advance(0)
        self.fetcher.results[0].callback(None)
        self.assertEqual(self.successResultOf(d), {})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_batch_failing_after_the_limit_is_logged(self) -> None:
        """A hung batch that fails after its origins were given up on is still logged."""
        d = self.coalescer.request(fetch("a", 1))
        self.clock.advance(0)
        with self.assertLogs("keyring_module.keyring.planner", "WARNING"):
            self.clock.advance(5)
        self.failureResultOf(d, DeadlineExceeded)
        with self.assertLogs("keyring_module.keyring.planner", "WARNING") as logs:
            self.fetcher.results[0].errback(RuntimeError("store down"))
        self.assertEqual(len(logs.output), 1)
        self.assertIn("Key fetch batch failed: store down", logs.output[0])

    def test_a_batch_failure_in_time_is_logged_once(self) -> None:
        """A batch failing before the limit is logged once, and fails its waiters."""
        d = self.coalescer.request(fetch("a", 1))
        self.clock.advance(0)
        with self.assertLogs("keyring_module.keyring.planner", "WARNING") as logs:
            self.fetcher.results[0].errback(RuntimeError("down"))
        self.assertEqual(len(logs.output), 1)
        self.assertIn("Key fetch batch failed: down", logs.output[0])
        self.failureResultOf(d, RuntimeError)
