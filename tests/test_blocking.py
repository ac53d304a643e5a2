"""Tests for keyring_module.blocking: work inline, and in our own bounded worker pool."""

import threading
from typing import Any, Callable

from canonicaljson import encode_canonical_json
from prometheus_client import CollectorRegistry
from twisted.internet import defer
from twisted.internet import reactor as global_reactor
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from keyring_module.blocking import (
    WorkerPool,
    WorkerPoolBusyError,
    run_inline,
    worker_pool,
)
from keyring_module.config import RateLimitConfig, parse_config
from keyring_module.errors import KeyLookupError
from keyring_module.fetchers.base import FailureKind
from keyring_module.fetchers.origin import OriginKeyFetcher
from keyring_module.metrics import Metrics
from keyring_module.model import KeyRequest, StoredResponse, response_id_for
from keyring_module.notary.caches import SIGN_ALONE_BYTES, CoSigner
from keyring_module.ratelimit import OriginRateLimiter
from keyring_module.signing import OwnKeys
from keyring_module.storage.memory import InMemoryKeyStore
from keyring_module.wiring import Fetching
from tests.fake_reactors import MemoryNetworkReactor
from tests.fakes import FakeFederationClient, FakeOriginResource
from tests.utils import make_signed_server_keys, new_signing_key

DAY_MS = 24 * 60 * 60 * 1000


class QueuedThreadPool:
    """A thread pool whose jobs wait until :meth:`run_all` (no real thread)."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Any, Callable[[], object]]] = []
        self.started = 0
        self.stopped = 0

    def callInThreadWithCallback(self, on_result: Any, f: Callable[[], object]) -> None:
        self.jobs.append((on_result, f))

    def start(self) -> None:
        self.started += 1

    def stop(self) -> None:
        self.stopped += 1

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
    """A clock that starts things when it runs, has shutdown triggers, and delivers
    results through ``callFromThread``."""

    def __init__(self) -> None:
        super().__init__()
        self.from_thread: list[Callable[[], object]] = []
        self.when_running: list[Callable[[], object]] = []
        self.triggers: dict[int, tuple[str, str, Callable[[], object]]] = {}

    def callFromThread(self, f: Callable[..., object], *args: object, **kw: object) -> None:
        self.from_thread.append(lambda: f(*args, **kw))

    def callWhenRunning(self, f: Callable[..., object], *args: object, **kw: object) -> None:
        self.when_running.append(lambda: f(*args, **kw))

    def addSystemEventTrigger(
        self, phase: str, event: str, f: Callable[..., object], *args: object, **kw: object
    ) -> int:
        handle = len(self.triggers) + 1
        self.triggers[handle] = (phase, event, lambda: f(*args, **kw))
        return handle

    def removeSystemEventTrigger(self, handle: int) -> None:
        del self.triggers[handle]

    def run(self) -> None:
        calls, self.when_running = self.when_running, []
        for call in calls:
            call()

    def shut_down(self) -> None:
        for handle, (_, event, call) in list(self.triggers.items()):
            if event == "shutdown":
                del self.triggers[handle]
                call()

    def deliver(self) -> None:
        calls, self.from_thread = self.from_thread, []
        for call in calls:
            call()


class RunnerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = ThreadedFakeReactor()
        self.threads = QueuedThreadPool()

    def pool(self, **kwargs: Any) -> WorkerPool:
        return WorkerPool(self.reactor, pool=self.threads, **kwargs)  # type: ignore[arg-type]

    def test_run_inline_gives_the_result_at_once(self) -> None:
        """run_inline runs the work before returning and fires with its result."""
        self.assertEqual(self.successResultOf(run_inline(lambda: 6 * 7)), 42)

    def test_run_inline_turns_exceptions_into_failures(self) -> None:
        """An exception in the work becomes a failed Deferred, not a raise."""

        def fail() -> None:
            raise ValueError("bad")

        self.failureResultOf(run_inline(fail), ValueError)

    def test_reactors_without_threads_get_no_pool(self) -> None:
        """In-memory test reactors run no threads, so the wiring runs work inline."""
        self.assertIsNone(worker_pool(Clock()))
        self.assertIsNone(worker_pool(MemoryNetworkReactor()))
        self.assertIsNone(worker_pool(self.reactor))

    def test_worker_pool_hands_work_to_its_pool(self) -> None:
        """Work waits in the pool; its result comes back through callFromThread."""
        runner = self.pool()
        done = runner(lambda: "validated")
        failed = runner(lambda: 1 // 0)
        self.assertNoResult(done)
        self.assertEqual(len(self.threads.jobs), 2)
        self.threads.run_all()
        self.assertNoResult(done)  # not yet delivered on the reactor thread
        self.reactor.deliver()
        self.assertEqual(self.successResultOf(done), "validated")
        self.failureResultOf(failed, ZeroDivisionError)

    def test_jobs_beyond_the_bound_fail_at_once(self) -> None:
        """Past max_jobs (running or waiting) work fails at once as a failed fetch, and
        is accepted again once a job is done."""
        runner = self.pool(max_jobs=2)
        first, second = runner(lambda: 1), runner(lambda: 2)
        refused = runner(lambda: 3)
        error = self.failureResultOf(refused, WorkerPoolBusyError).value
        self.assertIsInstance(error, KeyLookupError)  # a failed fetch, not the origin's fault
        self.assertFalse(error.blames_server)
        self.assertEqual(error.outcome, "workers_busy")
        self.assertIn("2 jobs", str(error))
        self.assertEqual((runner.jobs, len(self.threads.jobs)), (2, 2))
        self.threads.run_all()
        self.assertEqual(runner.jobs, 2)  # done in the threads, not yet delivered
        self.reactor.deliver()
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), (1, 2))
        self.assertEqual(runner.jobs, 0)
        third = runner(lambda: 3)
        self.threads.run_all()
        self.reactor.deliver()
        self.assertEqual(self.successResultOf(third), 3)

    def test_failed_jobs_free_their_place(self) -> None:
        """A job whose work raised no longer counts against the bound."""
        runner = self.pool(max_jobs=1)
        failed = runner(lambda: 1 // 0)
        self.threads.run_all()
        self.reactor.deliver()
        self.failureResultOf(failed, ZeroDivisionError)
        self.assertEqual(runner.jobs, 0)

    def test_started_with_the_reactor_and_stopped_once(self) -> None:
        """The pool starts when the reactor runs; stop() stops it once, drops the
        shutdown trigger, and later work fails at once."""
        runner = self.pool()
        self.assertEqual(self.threads.started, 0)
        self.reactor.run()
        self.assertEqual(self.threads.started, 1)
        runner.stop()
        runner.stop()
        self.assertEqual(self.threads.stopped, 1)
        self.assertEqual(self.reactor.triggers, {})
        error = self.failureResultOf(runner(lambda: 1), WorkerPoolBusyError).value
        self.assertIn("stopped", str(error))
        self.assertEqual(self.threads.jobs, [])

    def test_stopped_at_shutdown_if_nobody_stopped_it(self) -> None:
        """Reactor shutdown stops a pool that was never stopped."""
        runner = self.pool()
        self.reactor.run()
        self.reactor.shut_down()
        self.assertEqual(self.threads.stopped, 1)
        self.failureResultOf(runner(lambda: 1), WorkerPoolBusyError)

    def test_stopped_before_the_reactor_runs_never_starts(self) -> None:
        """A pool stopped before the reactor runs is not started by it."""
        self.pool().stop()
        self.reactor.run()
        self.assertEqual((self.threads.started, self.threads.stopped), (0, 1))

    def test_refused_answer_is_a_failed_fetch(self) -> None:
        """An origin answer the busy pool refuses is counted as a failed fetch, outcome
        workers_busy, and the fetch fails like an unreachable origin."""
        clock = Clock()
        origin_key = new_signing_key("o1")
        origin = FakeOriginResource(origin_key, "origin.test", clock)
        # Big enough to need the pool (small answers are validated at once).
        origin.body_override = make_signed_server_keys(
            "origin.test", [origin_key], DAY_MS, extra={"padding": [[] for _ in range(5000)]}
        )
        metrics = Metrics(CollectorRegistry())
        fetcher = OriginKeyFetcher(
            FakeFederationClient({"origin.test": origin}),
            OriginRateLimiter(clock, RateLimitConfig()),
            clock,
            metrics=metrics,
            run_blocking=self.pool(max_jobs=0),
        )
        answers = self.successResultOf(
            defer.ensureDeferred(fetcher.fetch_keys({"origin.test": KeyRequest("origin.test")}))
        )
        self.assertEqual(answers.results, {})
        [failure] = answers.failures["origin.test"]
        self.assertEqual(failure.kind, FailureKind.UNREACHABLE)
        self.assertIn("workers_busy", failure.detail)
        refused = metrics.registry.get_sample_value(
            "keyring_origin_fetches_total", {"outcome": "workers_busy"}
        )
        self.assertEqual(refused, 1)


class CoSignerTests(SynchronousTestCase):
    def test_big_response_the_busy_pool_refuses_is_left_out(self) -> None:
        """A big stored response that the full pool refuses to co-sign is left out of
        the answer (no co-signed copy), not turned into an error."""
        reactor = ThreadedFakeReactor()
        runner = WorkerPool(reactor, pool=QueuedThreadPool(), max_jobs=0)  # type: ignore[arg-type]
        own_keys = OwnKeys("notary.test", [new_signing_key("n1")])
        padding = "x" * (SIGN_ALONE_BYTES + 1)
        json_bytes = encode_canonical_json({"server_name": "a.example", "pad": padding})
        response = StoredResponse(
            response_id_for(json_bytes), "a.example", 5, 0, "origin", json_bytes
        )
        cosigner = CoSigner(own_keys, 1024 * 1024, runner=runner)
        self.assertIsNone(self.successResultOf(defer.ensureDeferred(cosigner.cosign(response))))
        self.assertEqual(cosigner.total_bytes, 0)


class RealThreadTests(TestCase):
    """Our pool on the real reactor, with real threads."""

    def test_work_runs_in_our_threads_not_the_reactors(self) -> "defer.Deferred[None]":
        """Work runs in a thread of our own pool, never in the reactor's shared one."""
        reactor: Any = global_reactor
        runner = worker_pool(reactor)
        assert runner is not None
        self.addCleanup(runner.stop)
        shared = {thread.ident for thread in reactor.getThreadPool().threads}

        def where() -> tuple[str, int]:
            thread = threading.current_thread()
            return thread.name, thread.ident or 0

        def check(found: tuple[str, int]) -> None:
            name, ident = found
            self.assertIn("keyring-module", name)
            self.assertNotIn(ident, shared)
            self.assertNotEqual(ident, threading.get_ident())

        return runner(where).addCallback(check)

    async def test_wiring_builds_a_small_pool_and_close_stops_it(self) -> None:
        """Fetching built on a threaded reactor runs heavy work in a worker pool of its
        own, which close() stops."""
        config = parse_config({"signing_key_path": "unused"}, standalone=False)
        fetching = Fetching.build(
            global_reactor,  # type: ignore[arg-type]
            config,
            InMemoryKeyStore(),
            client=FakeFederationClient({}),
            metrics=Metrics(CollectorRegistry()),
        )
        workers = fetching.workers
        assert workers is not None
        self.assertIs(fetching.run_blocking, workers)
        self.assertIn("keyring-module", await workers(lambda: threading.current_thread().name))
        await fetching.close()
        with self.assertRaises(WorkerPoolBusyError):
            await workers(lambda: 1)
