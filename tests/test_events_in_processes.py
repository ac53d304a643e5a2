"""Tests for checking events in worker processes: :class:`WorkerProcessPool` (bounds,
lifecycle, crash recovery) and ``Keyring.check_events_in_processes`` /
``verify_events_in_processes`` (same outcomes as ``check_events``, chunking, what each
chunk is sent).

These tests start real worker processes (local, a few per test, stopped by each test).
Results come back through ``callFromThread``, which :class:`QueueReactor` queues for
the test thread to run, so the keyring itself stays on its fake clock.
"""

import collections
import os
import queue
import signal
import time
import types
from typing import Any, Callable, Optional

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure
from zope.interface import implementer

from keyring_module.errors import VerificationFailure
from keyring_module.event_chunks import decode_events
from keyring_module.keyring import EventCheck, EventOutcome
from keyring_module.keyring.processes import PoolStopped, WorkerCrashed, WorkerProcessPool
from keyring_module.roomversions import ROOM_VERSIONS
from tests.test_event_checks import hash_and_sign
from tests.test_keyring import ORIGIN, OTHER, KeyringTestCase

#: How long a test waits for its worker processes at most.
TIMEOUT_S = 20.0


@implementer(IReactorFromThreads)
class QueueReactor:
    """``callFromThread`` that queues the call; :meth:`run_until` runs them on the test
    thread."""

    def __init__(self) -> None:
        self.calls: "queue.Queue[tuple[Callable[..., Any], tuple[Any, ...]]]" = queue.Queue()

    def callFromThread(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None:
        self.calls.put((lambda: callable(*args, **kwargs), ()))

    def run_until(
        self,
        done: Callable[[], bool],
        idle: Callable[[], None] = lambda: None,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        """Run queued calls, and ``idle`` whenever there is none, until ``done()``
        (failing the test after ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("worker processes did not answer in time")
            try:
                f, args = self.calls.get(timeout=min(remaining, 0.01))
            except queue.Empty:
                idle()
                continue
            f(*args)


class RecordingPool(WorkerProcessPool):
    """A pool that records the arguments of each job, and runs ``os._exit`` instead of
    a job whose arguments ``crash_if`` picks (a worker that dies on that job)."""

    def __init__(self, *args: Any, crash_if: Optional[Callable[..., bool]] = None, **kw: Any):
        super().__init__(*args, **kw)
        self.jobs: list[tuple[Any, ...]] = []
        self._crash_if = crash_if

    def run(self, fn: Callable[..., Any], *args: Any) -> "defer.Deferred[Any]":
        self.jobs.append(args)
        if self._crash_if is not None and self._crash_if(*args):
            return super().run(os._exit, 3)
        return super().run(fn, *args)

    def run_prepared(
        self, fn: Callable[..., Any], prepare: Callable[[], tuple[Any, ...]]
    ) -> "defer.Deferred[Any]":
        def recorded() -> tuple[Any, ...]:
            args = prepare()
            self.jobs.append(args)
            crash = self._crash_if is not None and self._crash_if(*args)
            return (3 if crash else None, fn, *args)

        return super().run_prepared(exit_or_run, recorded)


def exit_or_run(exit_code: Optional[int], fn: Callable[..., Any], *args: Any) -> Any:
    """In a worker: die with ``exit_code`` (a worker that dies on this job), or run
    ``fn(*args)``."""
    if exit_code is not None:
        os._exit(exit_code)
    return fn(*args)


def _process_gone(pid: int) -> bool:
    """Whether ``pid`` is no longer a live process (gone, or a zombie being reaped)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


class ProcessTestCase(KeyringTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.reactor = QueueReactor()
        #: Times the pool's jobs (``job_timeout``): only tests that advance it see one.
        self.job_clock = task.Clock()

    def pool(self, **kw: Any) -> WorkerProcessPool:
        """A started pool of ``kw`` (one worker by default), stopped after the test."""
        kw.setdefault("max_workers", 1)
        kw.setdefault("clock", self.job_clock)
        pool: WorkerProcessPool = kw.pop("cls", WorkerProcessPool)(self.reactor, **kw)
        self.addCleanup(pool.stop)
        self.wait(pool.start())
        return pool

    def wait(self, d: "defer.Deferred[Any]") -> Any:
        """Run the queued calls until ``d`` fires; its result (or its Failure)."""
        results: list[Any] = []
        d.addBoth(results.append)
        self.reactor.run_until(lambda: bool(results))
        return results[0]

    def wait_all(self, ds: list["defer.Deferred[Any]"]) -> list[Any]:
        """Run queued calls, and the keyring's clock (for key fetches) in between,
        until every one of ``ds`` fired; their results."""
        self.reactor.run_until(lambda: all(d.called for d in ds), idle=self.settle)
        return [self.wait(d) for d in ds]

    def hashed(self, version: str, server: str = ORIGIN, **fields: Any) -> dict[str, Any]:
        """An event from ``server`` with its content hash, signed by that server."""
        key = self.origin_key if server == ORIGIN else self.other_key
        if ROOM_VERSIONS[version].event_id_format is None:
            fields.setdefault("event_id", "$e%d:%s" % (len(fields), server))
        return hash_and_sign(self.event(version, server, key, **fields), version, server, key)

    def mixed_batch(self, version: str) -> list[Any]:
        """Good, redacted, bad signature, float, wrong event id, needs a fetch, and not
        an event at all."""
        good = self.hashed(version)
        return [
            good,
            dict(good, content={"body": "changed"}),
            dict(good, depth=99),
            self.hashed(version, content={"n": 1.5}),
            dict(good, event_id="$wrong"),
            self.hashed(version, OTHER),
            "not an event",
            self.hashed(version, depth=7),
        ]


def summary(checks: list[EventCheck]) -> list[tuple[Any, ...]]:
    """What a check comes to, errors included (by value: they are rebuilt)."""
    return [
        (
            c.outcome,
            c.reason,
            c.redacted_event,
            None if c.error is None else (c.error.server_name, c.error.key_ids, c.error.detail),
        )
        for c in checks
    ]


class CheckEventsInProcessesTests(ProcessTestCase):
    def test_outcomes_equal_check_events_in_several_room_versions(self) -> None:
        """Accepted, redacted (with the same copy) and rejected (same reason, server,
        key ids and detail) come out as check_events gives them, in v1, v3, v5, v10
        and v12; the keys a chunk lacks are fetched on the reactor, once per origin."""
        pool = self.pool(max_workers=2)
        for n, version in enumerate(["1", "3", "5", "10", "12"]):
            events = self.mixed_batch(version)
            got = self.wait_all(
                self.keyring.check_events_in_processes(events, version, pool, chunk_size=3)
            )
            if n == 0:
                self.assertEqual((self.origin_gets(ORIGIN), self.origin_gets(OTHER)), (1, 1))
            expected = self.wait_all(self.keyring.check_events(events, version))
            self.assertEqual(summary(got), summary(expected), version)
            outcomes = [c.outcome for c in got]
            self.assertEqual(
                outcomes[:3], [EventOutcome.ACCEPTED, EventOutcome.REDACTED, EventOutcome.REJECTED]
            )
            self.assertEqual(outcomes[5], EventOutcome.ACCEPTED)  # after its fetch
            self.assertIs(got[6].reason, VerificationFailure.MALFORMED_EVENT)
            if int(version) >= 6:
                self.assertIs(got[3].reason, VerificationFailure.NOT_CANONICAL_JSON)
            if int(version) >= 3:
                self.assertIs(got[4].reason, VerificationFailure.EVENT_ID_MISMATCH)

    def test_verify_events_in_processes_keeps_the_verify_contract(self) -> None:
        """verify_events_in_processes fires accepted and redacted events with None and
        fails the rejected ones with their KeyVerificationError."""
        pool = self.pool()
        events = self.mixed_batch("10")[:4]
        results = self.wait_all(self.keyring.verify_events_in_processes(events, "10", pool))
        self.assertEqual(results[:2], [None, None])
        self.assertIsInstance(results[2], Failure)
        self.assertIs(results[2].value.reason, VerificationFailure.BAD_SIGNATURE)
        self.assertIs(results[3].value.reason, VerificationFailure.NOT_CANONICAL_JSON)

    def test_chunks_carry_only_the_keys_their_events_need(self) -> None:
        """Events are cut into chunks of chunk_size (at most the pool's
        max_chunk_size); each job is sent plain data: the room version id, its events,
        their signers and the keys of those signers only, as bytes tuples."""
        origin_events = [self.hashed("10", depth=d) for d in range(3)]
        other_events = [self.hashed("10", OTHER, depth=d) for d in range(3)]
        self.wait_all(self.keyring.check_events(origin_events + other_events, "10"))  # warm
        pool = self.pool(cls=RecordingPool, max_chunk_size=4)
        events = origin_events + other_events + origin_events[:1]
        checks = self.wait_all(
            self.keyring.check_events_in_processes(events, "10", pool, chunk_size=3)
        )
        self.assertEqual({c.outcome for c in checks}, {EventOutcome.ACCEPTED})
        jobs = pool.jobs  # type: ignore[attr-defined]
        self.assertEqual([len(decode_events(job[1])) for job in jobs], [3, 3, 1])
        for job, server in zip(jobs, [ORIGIN, OTHER, ORIGIN], strict=True):
            version_id, encoded, signers, keys, now, compromised = job
            self.assertEqual(version_id, "10")
            self.assertEqual(encoded[0], "marshal")
            sent = decode_events(encoded)
            self.assertEqual(sent, events[: len(sent)] if server == ORIGIN else other_events)
            self.assertEqual(signers, [(server,)] * len(sent))
            self.assertEqual(list(keys), [server])
            ((key_id, raw, valid_until_ts, expired_ts),) = keys[server]
            self.assertIsInstance(raw, bytes)
            self.assertEqual(len(raw), 32)
            self.assertEqual(now, self.now_ms())
        jobs.clear()
        self.wait_all(self.keyring.check_events_in_processes(events, "10", pool, chunk_size=100))
        self.assertEqual([len(decode_events(job[1])) for job in jobs], [4, 3])  # max_chunk_size
        jobs.clear()
        pool.max_chunk_size = 1000
        self.wait_all(self.keyring.check_events_in_processes(events * 100, "10", pool))
        # By default, chunks that shrink as the batch goes (keyring.chunking)...
        self.assertEqual([len(decode_events(job[1])) for job in jobs], [100, 300, 150, 100, 50])
        jobs.clear()
        self.wait_all(self.keyring.check_events_in_processes(events * 20, "10", pool))
        # ... but not smaller than MIN_DEFAULT_CHUNK_SIZE (but the last).
        self.assertEqual([len(decode_events(job[1])) for job in jobs], [100, 40])

    def test_events_marshal_cannot_carry_are_pickled_or_checked_here(self) -> None:
        """Mappings that are not dicts go to the worker pickled; events that cannot be
        pickled either are checked on the reactor thread: the outcomes are the same."""
        events = self.mixed_batch("10")
        ordered = [collections.OrderedDict(e) if isinstance(e, dict) else e for e in events]
        frozen = [types.MappingProxyType(e) if isinstance(e, dict) else e for e in events]
        expected = summary(self.wait_all(self.keyring.check_events(events, "10")))
        pool = self.pool(cls=RecordingPool)
        for batch, sent_as in [(ordered, ["pickle"]), (frozen, [])]:
            jobs = pool.jobs  # type: ignore[attr-defined]
            jobs.clear()
            got = self.wait_all(self.keyring.check_events_in_processes(batch, "10", pool))
            self.assertEqual(summary(got), expected)
            self.assertEqual(sorted({job[1][0] for job in jobs}), sent_as)

    def test_a_chunk_whose_worker_dies_fails_alone(self) -> None:
        """A chunk that kills its worker (again when run alone) fails its own events
        with INTERNAL_ERROR, without a key fetch; the other chunks, in flight in the
        same broken pool, are run again and get their real outcomes."""
        events = self.mixed_batch("10")

        def crash_if(*args: Any) -> bool:
            sent = decode_events(args[1]) if len(args) > 1 and isinstance(args[1], tuple) else []
            return any(isinstance(e, dict) and e.get("depth") == 99 for e in sent)

        pool = self.pool(cls=RecordingPool, max_workers=2, crash_if=crash_if)
        got = self.wait_all(
            self.keyring.check_events_in_processes(events, "10", pool, chunk_size=3)
        )
        expected = self.wait_all(self.keyring.check_events(events, "10"))
        self.assertEqual(summary(got[3:]), summary(expected[3:]))
        for check in got[:3]:
            self.assertIs(check.reason, VerificationFailure.INTERNAL_ERROR)
            assert check.error is not None
            self.assertIn("worker process died", check.error.detail)
        self.assertGreaterEqual(pool.restarts, 1)
        self.assertEqual(self.wait(pool.run(pow, 7, 2)), 49)  # the pool works again

    def test_bad_arguments(self) -> None:
        """A chunk_size below 1 or an unknown room version raise ValueError."""
        pool = WorkerProcessPool(self.reactor, max_workers=1, clock=self.job_clock)  # never started
        with self.assertRaises(ValueError):
            self.keyring.check_events_in_processes([], "10", pool, chunk_size=0)
        with self.assertRaises(ValueError):
            self.keyring.verify_events_in_processes([], "99", pool)
        with self.assertRaises(ValueError):
            WorkerProcessPool(self.reactor, max_in_flight=0, clock=self.job_clock)
        with self.assertRaises(ValueError):
            WorkerProcessPool(self.reactor, start_method="fork", clock=self.job_clock)

    def test_stopped_pool_rejects_events_as_internal_error(self) -> None:
        """Events given to a pool that is not running are rejected (INTERNAL_ERROR,
        the pool is not running), not left hanging."""
        pool = WorkerProcessPool(self.reactor, max_workers=1, clock=self.job_clock)
        (check,) = self.wait_all(
            self.keyring.check_events_in_processes([self.hashed("10")], "10", pool)
        )
        self.assertIs(check.reason, VerificationFailure.INTERNAL_ERROR)
        assert check.error is not None
        self.assertIn("not running", check.error.detail)


class WorkerProcessPoolTests(ProcessTestCase):
    def test_in_flight_jobs_are_bounded(self) -> None:
        """At most max_in_flight jobs are handed to the workers; the rest wait on the
        reactor side and run as room frees up, every one of them."""
        pool = self.pool(max_in_flight=2)
        results = [pool.run(time.sleep, 0.02) for _ in range(6)]
        self.assertEqual((pool.in_flight, pool.waiting), (2, 4))
        seen: list[int] = []
        for d in results:
            d.addCallback(lambda _: seen.append(pool.in_flight))
        self.assertEqual(self.wait_all(results), [None] * 6)
        self.assertLessEqual(max(seen), 2)
        self.assertEqual((pool.in_flight, pool.waiting), (0, 0))

    def test_errors_of_the_function_come_back(self) -> None:
        """An exception raised in the worker fails the job's Deferred with it."""
        pool = self.pool()
        failure = self.wait(pool.run(int, "not a number"))
        self.assertIsInstance(failure, Failure)
        self.assertIsInstance(failure.value, ValueError)

    def test_crashing_job_fails_and_the_others_are_rerun(self) -> None:
        """A job that kills its worker fails with WorkerCrashed; the jobs in flight in
        the broken pool are run again on new workers and succeed."""
        pool = self.pool(max_workers=2)
        old = set(pool.worker_pids())
        ds: list["defer.Deferred[Any]"] = [pool.run(os.getpid), pool.run(os._exit, 3)]
        ds += [pool.run(os.getpid), pool.run(pow, 2, 10)]
        first, crashed, third, power = self.wait_all(ds)
        self.assertIsInstance(crashed, Failure)
        self.assertIsInstance(crashed.value, WorkerCrashed)
        self.assertEqual((type(first), type(third), power), (int, int, 1024))
        self.assertGreaterEqual(pool.restarts, 1)
        pid = self.wait(pool.run(os.getpid))
        self.assertNotIn(pid, old)

    def test_killed_worker_is_replaced_and_its_job_run_again(self) -> None:
        """A worker killed from outside (SIGKILL) breaks the pool once: new workers
        start and the jobs it broke are run again, and succeed."""
        pool = self.pool(max_workers=2)
        busy = [pool.run(time.sleep, 0.3), pool.run(time.sleep, 0.3)]
        time.sleep(0.1)
        os.kill(pool.worker_pids()[0], signal.SIGKILL)
        self.assertEqual(self.wait_all(busy), [None, None])
        self.assertEqual(pool.restarts, 1)

    def test_stop_joins_the_workers(self) -> None:
        """stop() fails waiting jobs with PoolStopped, lets the one in flight finish
        and joins every worker process; later jobs fail with PoolStopped at once."""
        pool = self.pool(max_workers=2, max_in_flight=1)
        pids = pool.worker_pids()
        self.assertEqual(len(pids), 2)
        in_flight, waiting = pool.run(pow, 3, 3), pool.run(pow, 2, 2)
        pool.stop()
        self.assertFalse(pool.running)
        self.assertEqual([p for p in pids if not _process_gone(p)], [])
        self.assertIsInstance(self.wait(waiting).value, PoolStopped)
        self.assertEqual(self.wait(in_flight), 27)
        self.assertIsInstance(self.wait(pool.run(pow, 1, 1)).value, PoolStopped)
        pool.stop()  # a second stop does nothing
