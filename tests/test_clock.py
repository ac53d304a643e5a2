"""Tests for :func:`keyring_module.clock.with_deadline`."""

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.clock import DeadlineExceeded, with_deadline


class WithDeadlineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def test_result_passed_on_before_the_deadline(self) -> None:
        """Work that ends in time gives its result, and its timer is cancelled."""
        work: "defer.Deferred[int]" = defer.Deferred()
        d = with_deadline(self.clock, work, 5.0, cancel_work=False)
        work.callback(7)
        self.assertEqual(self.successResultOf(d), 7)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_deadline_fails_the_wait_and_leaves_shared_work_running(self) -> None:
        """At the deadline the wait fails with DeadlineExceeded; shared work goes on."""
        work: "defer.Deferred[int]" = defer.Deferred()
        d = with_deadline(self.clock, work, 5.0, cancel_work=False)
        self.clock.advance(5)
        self.assertEqual(self.failureResultOf(d, DeadlineExceeded).value.seconds, 5.0)
        self.assertNoResult(work)

    def test_deadline_cancels_work_when_asked(self) -> None:
        """With cancel_work, the work is cancelled at the deadline."""
        cancelled: list[object] = []
        work: "defer.Deferred[int]" = defer.Deferred(cancelled.append)
        d = with_deadline(self.clock, work, 5.0, cancel_work=True)
        self.clock.advance(5)
        self.failureResultOf(d, DeadlineExceeded)
        self.assertEqual(cancelled, [work])

    def test_no_deadline_cancelling_the_wait_leaves_shared_work_running(self) -> None:
        """With no deadline and cancel_work false, cancelling the wait does not cancel
        the work that others share."""
        work: "defer.Deferred[int]" = defer.Deferred()
        d = with_deadline(self.clock, work, None, cancel_work=False)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertNoResult(work)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_deadline_cancelling_the_wait_cancels_owned_work(self) -> None:
        """With no deadline and cancel_work set, cancelling the wait cancels the work."""
        cancelled: list[object] = []
        work: "defer.Deferred[int]" = defer.Deferred(cancelled.append)
        d = with_deadline(self.clock, work, None, cancel_work=True)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(cancelled, [work])

    def test_no_deadline_waits_as_long_as_it_takes(self) -> None:
        """With no deadline, the wait ends only when the work does."""
        work: "defer.Deferred[int]" = defer.Deferred()
        d = with_deadline(self.clock, work, None, cancel_work=False)
        self.clock.advance(10**6)
        self.assertNoResult(d)
        work.callback(3)
        self.assertEqual(self.successResultOf(d), 3)

    def test_work_result_is_consumed(self) -> None:
        """Callbacks added to the work after the call see None (with or without deadline)."""
        for seconds in (None, 5.0):
            work: "defer.Deferred[int]" = defer.Deferred()
            d = with_deadline(self.clock, work, seconds, cancel_work=False)
            seen: list[object] = []
            work.addBoth(seen.append)
            work.callback(1)
            self.assertEqual(seen, [None])
            self.assertEqual(self.successResultOf(d), 1)
