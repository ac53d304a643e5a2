"""Tests for keyring_module.ratelimit: single flight, token bucket, backoff, pruning by age."""

from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.config import RateLimitConfig
from keyring_module.errors import KeyLookupError
from keyring_module.http import ConnectError
from keyring_module.ratelimit import (
    PRUNE_PER_CALL,
    BackedOffError,
    OriginRateLimiter,
    RateLimitedError,
)

CONFIG = RateLimitConfig(
    origin_burst=3,
    origin_interval_ms=60_000,
    failure_backoff_initial_ms=30_000,
    failure_backoff_max_ms=3_600_000,
)
# A bucket that never runs dry, for tests about backoff alone.
NO_BUCKET = RateLimitConfig(
    origin_burst=1000,
    origin_interval_ms=1,
    failure_backoff_initial_ms=30_000,
    failure_backoff_max_ms=240_000,
)


class CountingFetch:
    """A fetch callable counting calls; each call returns a fresh Deferred to fire later."""

    def __init__(self) -> None:
        self.calls = 0
        self.pending: list[defer.Deferred[str]] = []

    def __call__(self) -> "defer.Deferred[str]":
        self.calls += 1
        d: defer.Deferred[str] = defer.Deferred()
        self.pending.append(d)
        return d


class OriginRateLimiterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.limiter = OriginRateLimiter(self.clock, CONFIG, random=lambda: 0.5)

    def run_(self, origin: str, fetch: Callable[[], Any], **kwargs: Any) -> "defer.Deferred[Any]":
        return defer.ensureDeferred(self.limiter.run(origin, fetch, **kwargs))

    def succeed(self, origin: str = "a.example", **kwargs: Any) -> Any:
        async def fetch() -> str:
            return "ok"

        return self.successResultOf(self.run_(origin, fetch, **kwargs))

    def fail_once(
        self, origin: str = "a.example", limiter: "OriginRateLimiter | None" = None
    ) -> None:
        async def fetch() -> str:
            raise ConnectError("down")

        d = defer.ensureDeferred((limiter or self.limiter).run(origin, fetch))
        self.failureResultOf(d, ConnectError)

    def test_single_flight_200_callers(self) -> None:
        """200 concurrent lookups of one origin cause exactly one fetch and share its result."""
        fetch = CountingFetch()
        waiters = [self.run_("a.example", fetch) for _ in range(200)]
        self.assertEqual(fetch.calls, 1)
        for d in waiters:
            self.assertNoResult(d)
        fetch.pending[0].callback("keys")
        self.assertEqual([self.successResultOf(d) for d in waiters], ["keys"] * 200)

    def test_single_flight_shares_failure(self) -> None:
        """Every concurrent caller sees the shared fetch's failure."""
        fetch = CountingFetch()
        waiters = [self.run_("a.example", fetch) for _ in range(3)]
        fetch.pending[0].errback(ConnectError("down"))
        for d in waiters:
            self.failureResultOf(d, ConnectError)
        self.assertEqual(fetch.calls, 1)

    def test_joiners_spend_no_tokens(self) -> None:
        """Callers joining a flight do not use up the origin's tokens."""
        fetch = CountingFetch()
        for _ in range(10):
            self.run_("a.example", fetch)
        fetch.pending[0].callback("keys")
        self.succeed()
        self.succeed()

    def test_retry_after_follows_backoff_and_bucket(self) -> None:
        """retry_after_ms is 0 for a fresh origin, the rest of a backoff after a failure,
        and the time to the next token once the bucket is empty."""
        self.assertEqual(self.limiter.retry_after_ms("a.example"), 0)
        self.fail_once("a.example")
        self.assertEqual(self.limiter.retry_after_ms("a.example"), 30_000)
        self.clock.advance(0.01)
        self.assertEqual(self.limiter.retry_after_ms("a.example"), 29_990)
        for _ in range(3):
            self.succeed("b.example")
        self.assertEqual(self.limiter.retry_after_ms("b.example"), 60_000)
        self.clock.advance(59)
        self.assertIn(self.limiter.retry_after_ms("b.example"), (1_000, 1_001))  # rounded up

    def test_cancel_one_caller(self) -> None:
        """Cancelling one caller neither cancels the fetch nor affects the other callers."""
        fetch = CountingFetch()
        first = self.run_("a.example", fetch)
        second = self.run_("a.example", fetch)
        first.cancel()
        self.failureResultOf(first, defer.CancelledError)
        self.assertFalse(fetch.pending[0].called)
        fetch.pending[0].callback("keys")
        self.assertEqual(self.successResultOf(second), "keys")

    def test_flight_key_separates_flights(self) -> None:
        """Runs with different flight keys for one origin are separate fetches."""
        fetch = CountingFetch()
        self.run_("n.example", fetch, flight_key="batch1")
        self.run_("n.example", fetch, flight_key="batch2")
        self.run_("n.example", fetch, flight_key="batch1")
        self.assertEqual(fetch.calls, 2)

    def test_burst_then_rate_limited_then_recovers(self) -> None:
        """Forced refetches stop after origin_burst, then one more per interval."""
        for _ in range(3):
            self.assertEqual(self.succeed(), "ok")
        fetch = CountingFetch()
        error = self.failureResultOf(self.run_("a.example", fetch), RateLimitedError).value
        self.assertEqual(fetch.calls, 0)
        self.assertEqual(error.retry_after_ms, 60_000)
        self.assertIsInstance(error, KeyLookupError)

        self.clock.advance(59.999)
        self.failureResultOf(self.run_("a.example", fetch), RateLimitedError)
        self.clock.advance(0.001)
        self.assertEqual(self.succeed(), "ok")
        self.failureResultOf(self.run_("a.example", fetch), RateLimitedError)
        self.assertEqual(fetch.calls, 0)

    def test_bucket_refills_to_burst_only(self) -> None:
        """A long idle period refills the bucket to origin_burst and no more."""
        for _ in range(3):
            self.succeed()
        self.clock.advance(3600)
        for _ in range(3):
            self.succeed()
        self.failureResultOf(self.run_("a.example", CountingFetch()), RateLimitedError)

    def test_take_token_spends_the_bucket_run_uses(self) -> None:
        """take_token spends the same bucket as run, and once it is empty spends nothing
        and says how long until a token is back."""
        self.succeed("a.example")
        self.assertEqual(self.limiter.take_token("A.example."), 0)
        self.assertEqual(self.limiter.take_token("a.example"), 0)
        self.assertEqual(self.limiter.take_token("a.example"), 60_000)
        self.failureResultOf(self.run_("a.example", CountingFetch()), RateLimitedError)
        self.clock.advance(60)
        self.assertEqual(self.limiter.take_token("a.example"), 0)
        self.assertEqual(self.limiter.retry_after_ms("a.example"), 60_000)

    def test_origins_have_separate_buckets(self) -> None:
        """Using up one origin's tokens leaves another origin's alone."""
        for _ in range(3):
            self.succeed("a.example")
        self.failureResultOf(self.run_("a.example", CountingFetch()), RateLimitedError)
        self.assertEqual(self.succeed("b.example"), "ok")

    def test_backoff_after_failure(self) -> None:
        """After a failure, run refuses at once without fetching until the backoff ends."""
        limiter = OriginRateLimiter(self.clock, NO_BUCKET, random=lambda: 0.5)
        self.fail_once(limiter=limiter)
        self.assertTrue(limiter.is_backed_off("a.example"))
        self.assertEqual(limiter.backed_off_origins(), 1)
        fetch = CountingFetch()
        d = defer.ensureDeferred(limiter.run("a.example", fetch))
        error = self.failureResultOf(d, BackedOffError).value
        self.assertEqual(error.retry_after_ms, 30_000)
        self.assertEqual(fetch.calls, 0)
        self.clock.advance(30)
        self.assertFalse(limiter.is_backed_off("a.example"))
        defer.ensureDeferred(limiter.run("a.example", fetch))
        self.assertEqual(fetch.calls, 1)

    def backoff_sequence(self, random_value: float, failures: int) -> list[int]:
        """Fail ``failures`` times in a row, returning each backoff delay in ms."""
        limiter = OriginRateLimiter(self.clock, NO_BUCKET, random=lambda: random_value)
        delays = []
        for _ in range(failures):
            self.fail_once(limiter=limiter)
            d = defer.ensureDeferred(limiter.run("a.example", CountingFetch()))
            delay = self.failureResultOf(d, BackedOffError).value.retry_after_ms
            delays.append(delay)
            self.clock.advance(delay / 1000)
        return delays

    def test_backoff_doubles_and_caps(self) -> None:
        """Without jitter the backoff doubles from the initial delay up to the maximum."""
        self.assertEqual(
            self.backoff_sequence(0.5, 6), [30_000, 60_000, 120_000, 240_000, 240_000, 240_000]
        )

    def test_backoff_jitter_bounds(self) -> None:
        """Jitter keeps each delay within ±20% of the doubling schedule and under the cap."""
        low = self.backoff_sequence(0.0, 5)
        high = self.backoff_sequence(0.9999, 5)
        self.assertEqual(low, [24_000, 48_000, 96_000, 192_000, 192_000])
        for delay, base in zip(high, [30_000, 60_000, 120_000, 240_000, 240_000], strict=True):
            self.assertTrue(base < delay <= min(base * 1.2, 240_000) or delay == 240_000, delay)
        self.assertTrue(all(d <= 240_000 for d in low + high))

    def test_success_resets_backoff(self) -> None:
        """A success after failures makes the next failure back off by the initial delay."""
        limiter = OriginRateLimiter(self.clock, NO_BUCKET, random=lambda: 0.5)
        self.fail_once(limiter=limiter)
        self.clock.advance(30)
        self.fail_once(limiter=limiter)
        self.clock.advance(60)

        async def ok() -> str:
            return "ok"

        self.successResultOf(defer.ensureDeferred(limiter.run("a.example", ok)))
        self.assertFalse(limiter.is_backed_off("a.example"))
        self.fail_once(limiter=limiter)
        d = defer.ensureDeferred(limiter.run("a.example", CountingFetch()))
        self.assertEqual(self.failureResultOf(d, BackedOffError).value.retry_after_ms, 30_000)

    def test_key_lookup_error_does_not_back_off(self) -> None:
        """An invalid response (KeyLookupError) came from a live origin: no backoff."""

        async def invalid() -> str:
            raise KeyLookupError("bad signature")

        self.failureResultOf(self.run_("a.example", invalid), KeyLookupError)
        self.assertFalse(self.limiter.is_backed_off("a.example"))

    def test_other_exceptions_do_not_back_off(self) -> None:
        """An unexpected exception (a bug) reaches the caller but causes no backoff."""

        async def buggy() -> str:
            raise ZeroDivisionError()

        self.failureResultOf(self.run_("a.example", buggy), ZeroDivisionError)
        self.assertFalse(self.limiter.is_backed_off("a.example"))

    def test_hanging_origin_does_not_delay_another(self) -> None:
        """A fetch that never answers for one origin does not hold up another origin."""
        hanging = CountingFetch()
        stuck = self.run_("slow.example", hanging)
        self.assertEqual(self.succeed("fast.example"), "ok")
        self.assertNoResult(stuck)
        # Joining the hanging origin waits too, but starts no second fetch.
        self.assertNoResult(self.run_("slow.example", hanging))
        self.assertEqual(hanging.calls, 1)

    def test_failure_streak_lasts_as_long_as_the_next_backoff(self) -> None:
        """A failure soon after a backoff ends doubles it; once the backoff has been over
        for as long as the next (doubled) delay, the next failure counts as a first one."""
        limiter = OriginRateLimiter(self.clock, NO_BUCKET, random=lambda: 0.5)
        self.fail_once(limiter=limiter)
        self.clock.advance(30 + 59.999)  # the 30 s backoff, then just short of 60 s more
        self.fail_once(limiter=limiter)
        d = defer.ensureDeferred(limiter.run("a.example", CountingFetch()))
        self.assertEqual(self.failureResultOf(d, BackedOffError).value.retry_after_ms, 60_000)
        self.clock.advance(60 + 120)  # the 60 s backoff, then the next delay (120 s)
        self.fail_once(limiter=limiter)
        d = defer.ensureDeferred(limiter.run("a.example", CountingFetch()))
        self.assertEqual(self.failureResultOf(d, BackedOffError).value.retry_after_ms, 30_000)

    def test_dead_origin_asked_once_a_minute_backs_off_exponentially(self) -> None:
        """An origin that never answers, asked about every 61 s for two hours, is fetched
        8 times: each failure lands inside the streak, so the delay doubles up to 1 h."""
        fetch = CountingFetch()
        delays = []
        for _ in range(120):
            d = defer.ensureDeferred(self.limiter.run("dead.example", fetch))
            if fetch.pending:
                fetch.pending.pop().errback(ConnectError("down"))
                self.failureResultOf(d, ConnectError)
                again = defer.ensureDeferred(self.limiter.run("dead.example", fetch))
                delays.append(self.failureResultOf(again, BackedOffError).value.retry_after_ms)
            else:
                self.failureResultOf(d, BackedOffError)
            self.clock.advance(61)
        self.assertEqual(fetch.calls, 8)
        self.assertEqual(
            delays,
            [30_000, 60_000, 120_000, 240_000, 480_000, 960_000, 1_920_000, 3_600_000],
        )

    def fail_many(self, limiter: OriginRateLimiter, count: int) -> None:
        """``count`` distinct names fail once each."""
        for i in range(count):
            self.fail_once("dead%d.example" % i, limiter=limiter)

    def run_other(self, limiter: OriginRateLimiter, calls: int) -> None:
        """``calls`` token requests for one other name (each prunes a little)."""
        for _ in range(calls):
            limiter.take_token("busy.example")

    def test_failed_names_are_forgotten_by_age(self) -> None:
        """Names that failed once are kept while their backoff, failure streak or bucket
        still matter, and dropped by later calls once all three are over."""
        limiter = OriginRateLimiter(self.clock, CONFIG, random=lambda: 0.5)
        self.fail_many(limiter, 5000)
        self.assertEqual(limiter.tracked_origins(), 5000)
        # At 89.999 s the backoff (30 s) and the bucket refill (60 s) are over, but not
        # the failure streak (the backoff, then as long as the next delay: 60 s).
        self.clock.advance(89.999)
        self.run_other(limiter, 400)
        self.assertEqual(limiter.tracked_origins(), 5001)
        self.assertFalse(limiter.is_backed_off("dead0.example"))
        self.clock.advance(0.001)
        # Each call drops PRUNE_PER_CALL due states and queues its own state once.
        self.run_other(limiter, 5000 // (PRUNE_PER_CALL - 1) + 2)
        self.assertLessEqual(limiter.tracked_origins(), 1)
        # A forgotten name behaves as a fresh one: its next failure is a first one.
        self.fail_once("dead0.example", limiter=limiter)
        d = defer.ensureDeferred(limiter.run("dead0.example", CountingFetch()))
        self.assertEqual(self.failureResultOf(d, BackedOffError).value.retry_after_ms, 30_000)

    def test_each_call_prunes_a_bounded_amount(self) -> None:
        """One call drops at most PRUNE_PER_CALL states, however many are due."""
        limiter = OriginRateLimiter(self.clock, CONFIG, random=lambda: 0.5)
        self.fail_many(limiter, 100)
        self.clock.advance(3600)
        self.run_other(limiter, 1)
        self.assertEqual(limiter.tracked_origins(), 100 - PRUNE_PER_CALL + 1)

    def test_backed_off_origin_is_kept(self) -> None:
        """An origin that is backed off is never dropped, however many others come and go."""
        config = RateLimitConfig(
            origin_burst=3,
            origin_interval_ms=60_000,
            failure_backoff_initial_ms=3_600_000,
            failure_backoff_max_ms=3_600_000,
        )
        limiter = OriginRateLimiter(self.clock, config, random=lambda: 0.5)
        self.fail_once("failing.example", limiter=limiter)
        for i in range(1000):
            if i % 100 == 0:
                self.clock.advance(200)  # every origin seen so far has a full bucket again
            self.successResultOf(defer.ensureDeferred(limiter.run("o%d.example" % i, _ok)))
        self.assertLessEqual(limiter.tracked_origins(), 110)
        self.assertTrue(limiter.is_backed_off("failing.example"))
        self.assertEqual(limiter.backed_off_origins(), 1)

    def test_origin_with_empty_bucket_is_kept(self) -> None:
        """Pruning only forgets origins whose fresh state would behave the same."""
        limiter = OriginRateLimiter(self.clock, CONFIG, random=lambda: 0.5)
        for _ in range(3):
            self.successResultOf(defer.ensureDeferred(limiter.run("busy.example", _ok)))
        for i in range(100):
            self.clock.advance(0.5)
            self.successResultOf(defer.ensureDeferred(limiter.run("x%d.example" % i, _ok)))
        d = defer.ensureDeferred(limiter.run("busy.example", _ok))
        self.failureResultOf(d, RateLimitedError)

    def test_origin_in_flight_is_kept(self) -> None:
        """An origin with a fetch in flight is kept, so callers keep joining that fetch."""
        limiter = OriginRateLimiter(self.clock, NO_BUCKET, random=lambda: 0.5)
        fetch = CountingFetch()
        first = defer.ensureDeferred(limiter.run("slow.example", fetch))
        self.clock.advance(3600)
        for i in range(100):
            self.successResultOf(defer.ensureDeferred(limiter.run("x%d.example" % i, _ok)))
        second = defer.ensureDeferred(limiter.run("slow.example", fetch))
        self.assertEqual(fetch.calls, 1)
        fetch.pending[0].callback("keys")
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), ("keys",) * 2)


async def _ok() -> str:
    return "ok"


class OwnFailureTests(SynchronousTestCase):
    def test_our_full_worker_pool_does_not_back_the_origin_off(self) -> None:
        """A fetch that failed because our own worker pool was full is passed on, but
        the origin is not backed off: the next fetch goes ahead at once."""
        from keyring_module.blocking import WorkerPoolBusyError

        clock = Clock()
        limiter = OriginRateLimiter(clock, CONFIG, random=lambda: 0.5)

        async def busy() -> None:
            raise WorkerPoolBusyError("the worker pool already holds 64 jobs")

        d = defer.ensureDeferred(limiter.run("a.example", busy))
        self.failureResultOf(d, WorkerPoolBusyError)
        self.assertFalse(limiter.is_backed_off("a.example"))
        d = defer.ensureDeferred(limiter.run("a.example", busy))
        self.failureResultOf(d, WorkerPoolBusyError)  # asked again, not refused
