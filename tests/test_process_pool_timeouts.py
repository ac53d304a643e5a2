"""A worker process that hangs never holds its jobs, or the pool, for ever.

Real worker processes; the jobs' time is a :class:`twisted.internet.task.Clock` the
tests advance, so a job "runs too long" exactly when a test says so.
"""

import os
import time
from typing import Any, Callable

from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from keyring_module.keyring.processes import JobTimedOut, WorkerCrashed, WorkerProcessPool
from tests.test_events_in_processes import ProcessTestCase, QueueReactor, _process_gone


class JobTimeoutTests(ProcessTestCase):
    def advance_when_only_hung_jobs_are_timed(self) -> None:
        """Advance the jobs' clock past the limit when every job being timed is a hung
        one (``time.sleep(30)``), so that no other job reaches its limit."""
        calls = self.job_clock.getDelayedCalls()
        if calls and all(c.args[0].args == (30,) for c in calls):  # type: ignore[attr-defined]
            self.job_clock.advance(5.0)

    def test_a_job_running_too_long_fails_and_the_others_are_rerun(self) -> None:
        """A job past job_timeout gets its workers killed; run again on its own it
        times out again and fails with JobTimedOut, while the job that was in flight
        beside it is run again and succeeds; the pool keeps working."""
        pool = self.pool(max_workers=2, job_timeout=5.0)
        old = set(pool.worker_pids())
        hung = pool.run(time.sleep, 30)
        self.job_clock.advance(3.0)
        quick = pool.run(time.sleep, 0.5)  # in flight when the workers are killed
        time.sleep(0.1)  # both running
        self.job_clock.advance(2.0)  # the hung job's limit, not the other's
        self.reactor.run_until(
            lambda: quick.called and hung.called, idle=self.advance_when_only_hung_jobs_are_timed
        )
        self.assertEqual(self.wait(quick), None)
        failure = self.wait(hung)
        self.assertIsInstance(failure, Failure)
        self.assertIsInstance(failure.value, JobTimedOut)
        self.assertIsInstance(failure.value, WorkerCrashed)  # callers of crashes see it too
        self.assertGreaterEqual(pool.restarts, 2)
        self.assertEqual([p for p in old if not _process_gone(p)], [])
        self.assertEqual(self.wait(pool.run(pow, 2, 5)), 32)

    def test_a_job_that_finishes_in_time_is_not_touched(self) -> None:
        """The timer stops when the job is back: advancing past the limit afterwards
        kills nothing."""
        pool = self.pool(job_timeout=5.0)
        pids = pool.worker_pids()
        self.assertEqual(self.wait(pool.run(pow, 3, 2)), 9)
        self.job_clock.advance(60)
        self.assertEqual(self.job_clock.getDelayedCalls(), [])
        self.assertEqual(pool.worker_pids(), pids)
        self.assertEqual(pool.restarts, 0)

    def test_a_slow_job_that_finishes_on_its_rerun_succeeds(self) -> None:
        """Timing out once is not failing: a job that was killed for its time and then
        finishes in time on its own gets its result."""
        pool = self.pool(job_timeout=5.0)
        d = pool.run(time.sleep, 0.3)
        time.sleep(0.05)
        self.job_clock.advance(5.0)
        self.assertIsNone(self.wait(d))
        self.assertEqual(pool.restarts, 1)

    def test_no_limit(self) -> None:
        """job_timeout=None schedules nothing."""
        pool = self.pool(job_timeout=None)
        d = pool.run(os.getpid)
        self.assertEqual(self.job_clock.getDelayedCalls(), [])
        self.assertIsInstance(self.wait(d), int)

    def test_stop_kills_workers_whose_jobs_outlast_the_limit(self) -> None:
        """stop() waits at most job_timeout (real seconds) for the jobs in flight,
        then kills the workers: shutting down never hangs on a stuck worker."""
        pool = self.pool(job_timeout=0.5)
        pids = pool.worker_pids()
        hung = pool.run(time.sleep, 30)
        time.sleep(0.05)
        started = time.monotonic()
        pool.stop()
        self.assertLess(time.monotonic() - started, 10)
        self.assertEqual([p for p in pids if not _process_gone(p)], [])
        self.reactor.run_until(lambda: hung.called)
        self.assertIsInstance(self.wait(hung), Failure)

    def test_a_job_back_but_not_yet_delivered_is_not_taken_for_stuck(self) -> None:
        """The limit passing after the job's result came back, but before the reactor
        delivered it, kills nothing: the job is not stuck."""
        pool = self.pool(job_timeout=5.0)
        pids = pool.worker_pids()
        d = pool.run(pow, 2, 3)
        (job,) = list(pool._in_flight)
        deadline = time.monotonic() + 20
        while not (job.future is not None and job.future.done()):
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.01)
        self.job_clock.advance(5.0)  # the reactor has not run the delivery yet
        time.sleep(0.3)  # a SIGKILL would have taken effect by now
        self.assertEqual([p for p in pids if _process_gone(p)], [])
        self.assertEqual(self.wait(d), 8)
        self.assertEqual((pool.restarts, pool.worker_pids()), (0, pids))

    def test_bad_limits(self) -> None:
        for bad in (0, -1.0, float("inf"), float("nan"), 1e12):
            with self.assertRaises(ValueError):
                WorkerProcessPool(self.reactor, job_timeout=bad, clock=self.job_clock)
        # A reactor with no callLater and no clock: a limit cannot be kept.
        with self.assertRaises(ValueError):
            WorkerProcessPool(QueueReactor())
        WorkerProcessPool(QueueReactor(), job_timeout=None)  # no limit, no clock needed

    def test_the_reactor_times_jobs_by_default(self) -> None:
        """With no clock given, a reactor that has callLater times the jobs."""
        reactor = TimedQueueReactor()
        pool = WorkerProcessPool(reactor, max_workers=1, job_timeout=5.0)
        self.addCleanup(pool.stop)
        self.reactor = reactor
        self.wait(pool.start())
        d: "defer.Deferred[Any]" = pool.run(os.getpid)
        self.assertEqual(len(reactor.clock.getDelayedCalls()), 1)
        self.assertIsInstance(self.wait(d), int)
        self.assertEqual(reactor.clock.getDelayedCalls(), [])


@implementer(IReactorTime)
class TimedQueueReactor(QueueReactor):
    """A :class:`QueueReactor` with ``callLater`` (a Clock's)."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = task.Clock()

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: object, **kwargs: object
    ) -> IDelayedCall:
        return self.clock.callLater(delay, callable, *args, **kwargs)

    def seconds(self) -> float:
        return self.clock.seconds()

    def getDelayedCalls(self) -> Any:
        return self.clock.getDelayedCalls()
