"""Tests for keyring_module.blocking: runners inline and on a (fake) thread pool."""

from typing import Any, Callable

from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.blocking import ThreadPoolRunner, run_inline, thread_pool_runner
from tests.fake_reactors import MemoryNetworkReactor


class QueuedThreadPool:
    """A thread pool whose jobs wait until :meth:`run_all` (no real thread)."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Any, Callable[[], object]]] = []

    def callInThreadWithCallback(self, on_result: Any, f: Callable[[], object]) -> None:
        self.jobs.append((on_result, f))

    def run_all(self) -> None:
        jobs, self.jobs = self.jobs, []
        for on_result, f in jobs:
            try:
                result = f()
            except Exception:
                on_result(False, Failure())
            else:
                on_result(True, result)


class ThreadedFakeReactor(Clock):
    """A clock with a thread pool, delivering results through ``callFromThread``."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = QueuedThreadPool()
        self.from_thread: list[Callable[[], object]] = []

    def getThreadPool(self) -> QueuedThreadPool:
        return self.pool

    def callFromThread(self, f: Callable[..., object], *args: object, **kw: object) -> None:
        self.from_thread.append(lambda: f(*args, **kw))

    def deliver(self) -> None:
        calls, self.from_thread = self.from_thread, []
        for call in calls:
            call()


class RunnerTests(SynchronousTestCase):
    def test_run_inline_gives_the_result_at_once(self) -> None:
        """run_inline runs the work before returning and fires with its result."""
        self.assertEqual(self.successResultOf(run_inline(lambda: 6 * 7)), 42)

    def test_run_inline_turns_exceptions_into_failures(self) -> None:
        """An exception in the work becomes a failed Deferred, not a raise."""

        def fail() -> None:
            raise ValueError("bad")

        self.failureResultOf(run_inline(fail), ValueError)

    def test_reactors_without_threads_run_inline(self) -> None:
        """In-memory test reactors have no thread pool, so work runs inline."""
        self.assertIs(thread_pool_runner(Clock()), run_inline)
        self.assertIs(thread_pool_runner(MemoryNetworkReactor()), run_inline)

    def test_thread_pool_runner_hands_work_to_the_pool(self) -> None:
        """Work waits in the reactor's pool; its result comes back through callFromThread."""
        reactor = ThreadedFakeReactor()
        runner = thread_pool_runner(reactor)
        self.assertIsInstance(runner, ThreadPoolRunner)
        done = runner(lambda: "validated")
        failed = runner(lambda: 1 // 0)
        self.assertNoResult(done)
        self.assertEqual(len(reactor.pool.jobs), 2)
        reactor.pool.run_all()
        self.assertNoResult(done)  # not yet delivered on the reactor thread
        reactor.deliver()
        self.assertEqual(self.successResultOf(done), "validated")
        self.failureResultOf(failed, ZeroDivisionError)
