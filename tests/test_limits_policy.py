"""Tests for the outbound limits: one limiter entry per host, backoff only for
unreachable origins, the default bucket, the global cap on fetches in flight
(keyring_module.fetch_slots) and the upstream notary policy (keyring_module.notary_limiter).
"""

from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.config import RateLimitConfig
from keyring_module.fetch_slots import FetchSlots, NoFetchSlotError
from keyring_module.http import (
    ConnectError,
    DeniedAddressError,
    FederationRequestError,
    HttpStatusError,
    InvalidResponseError,
    RequestTimeoutError,
    ResponseTooLargeError,
    TLSError,
)
from keyring_module.notary_limiter import NotaryLimiter
from keyring_module.ratelimit import (
    BackedOffError,
    BusyError,
    OriginRateLimiter,
    RateLimitedError,
)
from keyring_module.servername import network_target
from keyring_module.validation import InvalidKeyResponseError, InvalidKeyResponseReason

# A bucket that never runs dry, for tests about the cap and the backoff alone.
NO_BUCKET = RateLimitConfig(origin_burst=1000, origin_interval_ms=1)


class PendingFetch:
    """A fetch callable whose calls each return a Deferred fired later by the test."""

    def __init__(self) -> None:
        self.pending: list[defer.Deferred[str]] = []

    @property
    def calls(self) -> int:
        return len(self.pending)

    def __call__(self) -> "defer.Deferred[str]":
        d: defer.Deferred[str] = defer.Deferred()
        self.pending.append(d)
        return d


def failing(error: Exception) -> Callable[[], Any]:
    """A fetch that fails at once with ``error``."""

    async def fetch() -> str:
        raise error

    return fetch


async def answer() -> str:
    return "keys"


class NetworkTargetTests(SynchronousTestCase):
    def test_spellings_of_one_host_are_one_target(self) -> None:
        """Case, a trailing dot and leading zeros in the port do not make another target."""
        self.assertEqual(
            {network_target(n) for n in ("Example.ORG", "example.org.", "EXAMPLE.org")},
            {"example.org"},
        )
        self.assertEqual(network_target("Example.org.:08448"), "example.org:8448")
        self.assertNotEqual(network_target("example.org:8448"), network_target("example.org"))

    def test_ip_literals_in_canonical_form(self) -> None:
        """IPv6 literals are compressed and lower-cased; IPv4 literals stay as they are."""
        self.assertEqual(network_target("[0:0::1]:8448"), "[::1]:8448")
        self.assertEqual(network_target("[2001:DB8:0:0::1]:443"), "[2001:db8::1]:443")
        self.assertEqual(network_target("1.2.3.4:8448"), "1.2.3.4:8448")

    def test_ip_literal_without_port_is_port_8448(self) -> None:
        """An IP literal without a port is the same target as with :8448 (no delegation)."""
        self.assertEqual(network_target("1.2.3.4"), network_target("1.2.3.4:8448"))
        self.assertEqual(network_target("[::1]"), network_target("[::1]:8448"))
        self.assertEqual(network_target("[2001:db8::1]"), network_target("[2001:DB8::1]:8448"))
        self.assertNotEqual(network_target("1.2.3.4"), network_target("1.2.3.4:8449"))

    def test_ipv4_mapped_ipv6_literal_is_the_ipv4_target(self) -> None:
        """[::ffff:1.2.3.4] reaches 1.2.3.4, so it is that address's target."""
        self.assertEqual(network_target("[::ffff:1.2.3.4]"), "1.2.3.4:8448")
        self.assertEqual(network_target("[::FFFF:102:304]:8448"), network_target("1.2.3.4"))
        self.assertEqual(network_target("[::ffff:1.2.3.4]:443"), "1.2.3.4:443")

    def test_hostname_without_port_stays_apart_from_8448(self) -> None:
        """A hostname without a port is delegated, so it is not the same target as :8448."""
        self.assertEqual(network_target("Example.org"), "example.org")
        self.assertNotEqual(network_target("example.org"), network_target("example.org:8448"))

    def test_invalid_name_is_returned_unchanged(self) -> None:
        """A name that is not a server name is its own (unnormalised) target."""
        self.assertEqual(network_target("Bad Name"), "Bad Name")


class LimiterTargetTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.limiter = OriginRateLimiter(
            self.clock, RateLimitConfig(origin_burst=3), random=lambda: 0.5
        )

    def run_(self, origin: str, fetch: Callable[[], Any], **kwargs: Any) -> "defer.Deferred[Any]":
        return defer.ensureDeferred(self.limiter.run(origin, fetch, **kwargs))

    def test_spelling_variants_share_one_bucket(self) -> None:
        """Variants of one host, each its own flight, start no more fetches than the burst."""
        fetch = PendingFetch()
        variants = ["a.example", "A.example", "a.EXAMPLE", "a.example.", "A.Example."]
        outcomes = [self.run_(name, fetch, flight_key=name) for name in variants]
        self.assertEqual(fetch.calls, 3)
        for d in outcomes[3:]:
            self.failureResultOf(d, RateLimitedError)
        self.assertEqual(self.run_("b.example", answer).result, "keys")  # another host

    def test_spelling_variants_share_one_backoff(self) -> None:
        """An unreachable host is backed off under every spelling of its name."""
        self.failureResultOf(self.run_("A.Example.", failing(ConnectError("down"))), ConnectError)
        self.assertTrue(self.limiter.is_backed_off("a.example"))
        self.failureResultOf(self.run_("a.example", answer), BackedOffError)
        self.assertGreater(self.limiter.retry_after_ms("A.EXAMPLE"), 0)

    def test_flights_are_per_exact_name(self) -> None:
        """Concurrent callers share a flight only when they asked about the same exact name."""
        fetch = PendingFetch()
        first = self.run_("a.example", fetch, flight_key="a.example")
        same = self.run_("a.example", fetch, flight_key="a.example")
        other = self.run_("A.example", fetch, flight_key="A.example")
        self.assertEqual(fetch.calls, 2)
        fetch.pending[0].callback("lower")
        fetch.pending[1].callback("upper")
        self.assertEqual(
            [self.successResultOf(d) for d in (first, same, other)], ["lower", "lower", "upper"]
        )


class BackoffPolicyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)

    def backed_off_after(self, error: Exception) -> bool:
        limiter = OriginRateLimiter(self.clock, NO_BUCKET, random=lambda: 0.5)
        d = defer.ensureDeferred(limiter.run("a.example", failing(error)))
        self.failureResultOf(d, type(error))
        return limiter.is_backed_off("a.example")

    def test_unreachable_origins_are_backed_off(self) -> None:
        """Connection and DNS failures, timeouts, TLS failures and denied addresses back off."""
        for error in (
            ConnectError("DNS lookup failed"),
            RequestTimeoutError("no answer within 10s"),
            TLSError("bad certificate"),
            DeniedAddressError("127.0.0.1 is denied"),
            FederationRequestError("connection lost"),
        ):
            with self.subTest(error=error):
                self.assertTrue(self.backed_off_after(error))

    def test_live_origins_are_not_backed_off(self) -> None:
        """An origin that answered (HTTP error, bad body, invalid keys) is not backed off."""
        for error in (
            HttpStatusError(400),
            HttpStatusError(500),
            InvalidResponseError("not JSON"),
            ResponseTooLargeError("over 1M"),
            InvalidKeyResponseError(InvalidKeyResponseReason.WRONG_SERVER_NAME, "other name"),
        ):
            with self.subTest(error=error):
                self.assertFalse(self.backed_off_after(error))

    def test_live_error_keeps_an_earlier_backoff_streak(self) -> None:
        """An HTTP error after an unreachable spell neither ends nor extends the streak."""
        limiter = OriginRateLimiter(self.clock, NO_BUCKET, random=lambda: 0.5)

        def run(fetch: Callable[[], Any]) -> "defer.Deferred[Any]":
            return defer.ensureDeferred(limiter.run("a.example", fetch))

        self.failureResultOf(run(failing(ConnectError("down"))), ConnectError)
        self.clock.advance(30)
        self.failureResultOf(run(failing(HttpStatusError(502))), HttpStatusError)
        self.assertFalse(limiter.is_backed_off("a.example"))
        self.failureResultOf(run(failing(ConnectError("down"))), ConnectError)
        self.assertEqual(limiter.retry_after_ms("a.example"), 60_000)  # the second failure


class DefaultBucketTests(SynchronousTestCase):
    def forced_fetches(self, config: RateLimitConfig) -> list[str]:
        """SyTest's notary tests against one origin: six fetches within three seconds,
        the fourth answered 400; the outcome of each."""
        clock = Clock()
        limiter = OriginRateLimiter(clock, config, random=lambda: 0.5)
        outcomes = []
        for i in range(6):
            fetch = failing(HttpStatusError(400)) if i == 3 else answer
            d = defer.ensureDeferred(limiter.run("origin.test", fetch))
            d.addCallbacks(lambda _: "fetched", lambda f: f.value.__class__.__name__)
            outcomes.append(self.successResultOf(d))
            clock.advance(0.5)
        return outcomes

    def test_default_lets_sytest_order_reach_the_origin(self) -> None:
        """With the default config every one of SyTest's fetches reaches the origin."""
        self.assertEqual(RateLimitConfig().origin_burst, 10)
        self.assertEqual(
            self.forced_fetches(RateLimitConfig()),
            ["fetched", "fetched", "fetched", "HttpStatusError", "fetched", "fetched"],
        )

    def test_small_configured_burst_still_caps_forced_refetches(self) -> None:
        """origin_burst 3 refuses the fourth fetch within the interval, as before."""
        self.assertEqual(
            self.forced_fetches(RateLimitConfig(origin_burst=3)),
            ["fetched"] * 3 + ["RateLimitedError"] * 3,
        )


class FetchSlotsTests(SynchronousTestCase):
    def test_waiters_get_slots_in_order(self) -> None:
        """Beyond the limit callers wait and get freed slots first come, first served."""
        slots = FetchSlots(limit=1)
        first, second, third = slots.acquire(), slots.acquire(), slots.acquire()
        self.assertEqual((first.called, second.called, third.called), (True, False, False))
        slots.release()
        self.assertEqual((second.called, third.called), (True, False))
        slots.release()
        self.assertTrue(third.called)
        slots.release()
        self.assertEqual((slots.in_use, slots.waiting), (0, 0))

    def test_cancelled_waiter_leaves_the_queue(self) -> None:
        """A caller that stops waiting leaves the queue and never holds a slot."""
        slots = FetchSlots(limit=1, max_waiting=2)
        slots.acquire()
        gone, next_ = slots.acquire(), slots.acquire()
        gone.cancel()
        self.failureResultOf(gone, defer.CancelledError)
        self.assertEqual(slots.waiting, 1)
        slots.release()
        self.assertTrue(next_.called)
        self.assertEqual(slots.in_use, 1)

    def test_work_ending_at_once_hands_slots_on_without_recursion(self) -> None:
        """Thousands of waiters whose work ends as soon as they get a slot are served in
        a loop, not by a recursion as deep as the queue."""
        slots = FetchSlots(limit=1, max_waiting=5000)
        slots.acquire()
        served: list[int] = []

        def work(_: None, i: int) -> None:
            served.append(i)
            slots.release()

        for i in range(5000):
            slots.acquire().addCallback(work, i)
        slots.release()
        self.assertEqual(served, list(range(5000)))
        self.assertEqual((slots.in_use, slots.waiting), (0, 0))

    def test_full_queue_refuses_at_once(self) -> None:
        """With every slot taken and the queue full, acquire raises instead of queueing."""
        slots = FetchSlots(limit=2, max_waiting=1)
        slots.acquire(), slots.acquire(), slots.acquire()
        self.assertFalse(slots.has_room())
        self.assertRaises(NoFetchSlotError, slots.acquire)
        self.assertEqual(FetchSlots(limit=3).max_waiting, 12)  # four per slot by default


class GlobalCapTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.slots = FetchSlots(limit=2, max_waiting=1)
        self.limiter = OriginRateLimiter(
            self.clock, RateLimitConfig(origin_burst=3), random=lambda: 0.5, fetch_slots=self.slots
        )

    def run_(self, origin: str, fetch: Callable[[], Any]) -> "defer.Deferred[Any]":
        return defer.ensureDeferred(self.limiter.run(origin, fetch))

    def test_flights_beyond_the_cap_wait_their_turn(self) -> None:
        """A flight beyond the cap is not started until a slot frees up."""
        fetch = PendingFetch()
        running = [self.run_("a%d.example" % i, fetch) for i in range(2)]
        queued = self.run_("b.example", fetch)
        self.assertEqual(fetch.calls, 2)
        fetch.pending[0].callback("a0")
        self.assertEqual(self.successResultOf(running[0]), "a0")
        self.assertEqual(fetch.calls, 3)
        fetch.pending[2].callback("b")
        self.assertEqual(self.successResultOf(queued), "b")

    def test_full_queue_is_busy_without_backoff_or_token(self) -> None:
        """Beyond the queue a fetch is refused as busy; the origin is neither backed off
        nor charged a token."""
        fetch = PendingFetch()
        for i in range(3):
            self.run_("a%d.example" % i, fetch)
        error = self.failureResultOf(self.run_("c.example", fetch), BusyError).value
        self.assertEqual(error.reason, "busy")
        self.assertFalse(self.limiter.is_backed_off("c.example"))
        self.assertEqual(self.limiter.retry_after_ms("c.example"), 0)
        self.assertEqual(fetch.calls, 2)

    def test_joining_a_flight_needs_no_slot(self) -> None:
        """With every slot and queue place taken, a caller may still join a flight."""
        fetch = PendingFetch()
        first = self.run_("a0.example", fetch)
        for i in range(1, 3):
            self.run_("a%d.example" % i, fetch)
        joined = self.run_("a0.example", fetch)
        fetch.pending[0].callback("shared")
        self.assertEqual(self.successResultOf(first), "shared")
        self.assertEqual(self.successResultOf(joined), "shared")

    def test_abandoned_queued_flight_leaves_and_refunds_its_token(self) -> None:
        """When every caller of a queued flight gives up, it leaves the queue unsent and
        the origin's token is given back."""
        fetch = PendingFetch()
        for i in range(2):
            self.run_("a%d.example" % i, fetch)
        gone = self.run_("b.example", fetch)
        gone.cancel()
        self.failureResultOf(gone, defer.CancelledError)
        self.assertEqual(self.slots.waiting, 0)
        fetch.pending[0].callback("a0")
        self.assertEqual(fetch.calls, 2)  # the abandoned flight never fetched
        self.assertEqual(self.limiter.retry_after_ms("b.example"), 0)
        self.assertFalse(self.limiter.is_backed_off("b.example"))

    def test_busy_refusals_leave_no_state_behind(self) -> None:
        """Names refused as busy are not tracked: 10,000 of them leave the limiter with
        the one origin that holds a slot, and take_token refusals leave nothing either."""
        slots = FetchSlots(limit=1, max_waiting=0)
        limiter = OriginRateLimiter(self.clock, RateLimitConfig(), fetch_slots=slots)
        fetch = PendingFetch()
        defer.ensureDeferred(limiter.run("holder.example", fetch))
        for i in range(10_000):
            refused = defer.ensureDeferred(limiter.run("n%d.attacker.example" % i, fetch))
            self.failureResultOf(refused, BusyError)
        self.assertEqual(limiter.tracked_origins(), 1)
        self.assertEqual(fetch.calls, 1)
        buckets = OriginRateLimiter(self.clock, RateLimitConfig(origin_burst=1))
        self.assertEqual(buckets.take_token("once.example"), 0)
        self.assertGreater(buckets.take_token("once.example"), 0)
        self.assertEqual(buckets.tracked_origins(), 1)

    def test_states_of_spent_tokens_are_pruned_once_idle(self) -> None:
        """A name whose token take_token spent is dropped once its bucket is full again."""
        buckets = OriginRateLimiter(self.clock, RateLimitConfig(origin_burst=2))
        for i in range(100):
            self.assertEqual(buckets.take_token("s%d.example" % i), 0)
        self.assertEqual(buckets.tracked_origins(), 100)
        self.clock.advance(60)
        for _ in range(10):
            buckets.take_token("other.example")
        self.assertEqual(buckets.tracked_origins(), 1)

    def test_notaries_and_origins_share_the_cap(self) -> None:
        """Queries to notaries take slots of the same global cap as origin fetches."""
        notaries = NotaryLimiter(self.clock, RateLimitConfig(), fetch_slots=self.slots)
        fetch = PendingFetch()
        defer.ensureDeferred(notaries.run("n.example", fetch))
        defer.ensureDeferred(notaries.run("n.example", fetch, flight_key="other"))
        waiting = self.run_("a.example", fetch)
        self.assertEqual(fetch.calls, 2)
        fetch.pending[0].callback("answers")
        self.assertEqual(fetch.calls, 3)
        fetch.pending[2].callback("keys")
        self.assertEqual(self.successResultOf(waiting), "keys")


class NotaryLimiterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.backoffs: list[tuple[str, int]] = []
        self.limiter = NotaryLimiter(
            self.clock,
            RateLimitConfig(notary_max_concurrent=2, failure_backoff_max_ms=600_000),
            random=lambda: 0.5,
            on_backoff=lambda notary, ms: self.backoffs.append((notary, ms)),
        )

    def run_(self, fetch: Callable[[], Any], key: object = None) -> "defer.Deferred[Any]":
        return defer.ensureDeferred(self.limiter.run("n.example", fetch, flight_key=key))

    def fail_with(self, error: Exception) -> Optional[int]:
        """Fail one query with ``error``; how long the notary is then backed off (ms)."""
        self.failureResultOf(self.run_(failing(error)), type(error))
        d = self.run_(answer)
        if not self.limiter.is_backed_off("n.example"):
            self.successResultOf(d)
            return None
        return int(self.failureResultOf(d, BackedOffError).value.retry_after_ms)

    def test_no_token_bucket(self) -> None:
        """Many queries in a row all reach the notary: there is no per-notary bucket."""
        for _ in range(50):
            self.assertEqual(self.successResultOf(self.run_(answer)), "keys")

    def test_concurrent_queries_capped_then_queued_then_busy(self) -> None:
        """At most notary_max_concurrent queries run at once; the next ones wait in a
        queue four times as long; beyond it a query is refused as busy."""
        fetch = PendingFetch()
        outcomes = [self.run_(fetch, key=i) for i in range(10)]
        self.assertEqual(fetch.calls, 2)
        self.failureResultOf(self.run_(fetch, key="one more"), BusyError)
        fetch.pending[0].callback("first")
        self.assertEqual(self.successResultOf(outcomes[0]), "first")
        self.assertEqual(fetch.calls, 3)  # the first queued query got the slot
        self.assertFalse(self.limiter.is_backed_off("n.example"))

    def test_busy_refusals_leave_no_state_behind(self) -> None:
        """A query refused as busy before any state existed leaves none for its name."""
        full = FetchSlots(limit=1, max_waiting=0)
        limiter = NotaryLimiter(self.clock, RateLimitConfig(), fetch_slots=full)
        holder = PendingFetch()
        defer.ensureDeferred(limiter.run("n.example", holder))
        for i in range(100):
            refused = defer.ensureDeferred(limiter.run("m%d.example" % i, holder))
            self.failureResultOf(refused, BusyError)
        holder.pending[0].callback("answers")
        self.assertEqual(limiter.tracked_notaries(), 1)

    def test_global_queue_filled_while_waiting_is_busy(self) -> None:
        """A query that waited for its notary's slot and then finds the global queue
        full is refused as busy (no raw NoFetchSlotError), and backs nothing off."""
        global_slots = FetchSlots(limit=1, max_waiting=1)
        limiter = NotaryLimiter(
            self.clock, RateLimitConfig(notary_max_concurrent=1), fetch_slots=global_slots
        )
        fetch = PendingFetch()
        first = defer.ensureDeferred(limiter.run("n.example", fetch, flight_key=1))
        second = defer.ensureDeferred(limiter.run("n.example", fetch, flight_key=2))
        other = global_slots.acquire()  # another fetch takes the global queue's place
        queued_again: list[defer.Deferred[None]] = []
        # When `other` gets its slot, its work at once queues one more global fetch.
        other.addCallback(lambda _: queued_again.append(global_slots.acquire()))
        fetch.pending[0].callback("one")
        self.assertEqual(self.successResultOf(first), "one")
        error = self.failureResultOf(second, BusyError).value
        self.assertEqual(error.reason, "busy")
        self.assertEqual(fetch.calls, 1)
        self.assertFalse(limiter.is_backed_off("n.example"))
        self.assertEqual(len(queued_again), 1)
        # The notary's own slot was given back: the next query is sent once room frees.
        global_slots.release()
        global_slots.release()
        later = defer.ensureDeferred(limiter.run("n.example", fetch, flight_key=3))
        self.assertEqual(fetch.calls, 2)
        fetch.pending[1].callback("three")
        self.assertEqual(self.successResultOf(later), "three")

    def test_identical_queries_share_a_flight(self) -> None:
        """Concurrent queries with the same flight key send one query."""
        fetch = PendingFetch()
        first, second = self.run_(fetch, key="q"), self.run_(fetch, key="q")
        self.assertEqual(fetch.calls, 1)
        fetch.pending[0].callback("answers")
        self.assertEqual(self.successResultOf(second), "answers")
        self.assertEqual(self.successResultOf(first), "answers")

    def test_failures_back_off_exponentially_until_a_success(self) -> None:
        """Unreachable and 5xx back the notary off, doubling; a success resets it."""
        self.assertEqual(self.fail_with(ConnectError("down")), 30_000)
        self.clock.advance(30)
        self.assertEqual(self.fail_with(HttpStatusError(503)), 60_000)
        self.clock.advance(60)
        self.successResultOf(self.run_(answer))
        self.assertEqual(self.fail_with(InvalidResponseError("not JSON")), 30_000)
        self.assertEqual(
            self.backoffs, [("n.example", 30_000), ("n.example", 60_000), ("n.example", 30_000)]
        )

    def test_429_honours_retry_after_ms(self) -> None:
        """A 429's retry_after_ms (body) or Retry-After (header) sets the backoff, capped."""
        body = b'{"errcode":"M_LIMIT_EXCEEDED","retry_after_ms":2000}'
        self.assertEqual(self.fail_with(HttpStatusError(429, body)), 2000)
        self.clock.advance(2)
        self.assertEqual(self.fail_with(HttpStatusError(429, b"", retry_after_ms=5000)), 5000)
        self.clock.advance(5)
        huge = b'{"errcode":"M_LIMIT_EXCEEDED","retry_after_ms":86400000}'
        self.assertEqual(self.fail_with(HttpStatusError(429, huge)), 600_000)
        self.clock.advance(600)
        self.assertEqual(self.fail_with(HttpStatusError(429, b"slow down")), 30_000)

    def test_other_4xx_and_our_own_errors_do_not_back_off(self) -> None:
        """A 4xx other than 429 refused one query, not the notary: no backoff."""
        for error in (HttpStatusError(400), HttpStatusError(404), ZeroDivisionError()):
            with self.subTest(error=error):
                self.assertIsNone(self.fail_with(error))
        self.assertEqual(self.backoffs, [])

    def test_invalid_answer_backs_off(self) -> None:
        """An answer that is no key query answer (no server_keys array) is a failure."""
        error = InvalidKeyResponseError(InvalidKeyResponseReason.BAD_TYPE, "no server_keys")
        self.assertEqual(self.fail_with(error), 30_000)
        self.assertEqual(self.limiter.backed_off_notaries(), 1)
