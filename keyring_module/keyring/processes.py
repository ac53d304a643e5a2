"""A bounded pool of worker processes whose results come back as Deferreds.

:class:`WorkerProcessPool` runs picklable functions (e.g.
:func:`keyring_module.event_chunks.check_event_chunk`) in worker processes of a
:class:`concurrent.futures.ProcessPoolExecutor` and fires a Deferred on the reactor
thread with each result. The keyring's ``*_in_processes`` event methods use it for
the signature checks of large batches::

    pool = WorkerProcessPool(reactor, max_workers=2)
    await pool.start()                                  # workers started and ready
    reactor.addSystemEventTrigger("before", "shutdown", pool.stop)
    checks = keyring.check_events_in_processes(pdus, "10", pool)
    square = await pool.run(pow, 7, 2)                  # any picklable function: 49

Bounds and lifecycle:

* at most ``max_workers`` processes, started with ``forkserver`` where the platform
  has it, else ``spawn`` (never ``fork``: forking a process that runs a reactor and
  threads copies their state half-way);
* at most ``max_in_flight`` jobs handed to the executor at once; the others wait on
  the reactor side, and a job given by :meth:`WorkerProcessPool.run_prepared` builds
  its arguments only then, so a large batch never piles up encoded copies of its
  events;
* a job not back ``job_timeout`` after it was handed to the workers (60 s by default; a
  chunk of a thousand events takes a tenth of a second, and a job waits for at most
  ``max_in_flight / max_workers`` others) is taken for a stuck worker: the workers are
  killed and the job is treated as a crash (below), so a worker that hangs never holds
  its events' Deferreds, or the pool, for ever;
* :meth:`WorkerProcessPool.stop` fails the waiting jobs with :class:`PoolStopped`,
  lets the jobs in flight finish (killing the workers if they take longer than
  ``job_timeout``) and joins every worker process.

Results come back on the executor's own thread, as a :class:`concurrent.futures.Future`
whose done-callback hands it to the reactor with ``reactor.callFromThread`` (not
``Deferred.fromFuture``, which is for asyncio futures and wants an asyncio loop); the
job's Deferred is fired there, on the reactor thread, and nowhere else.

A worker that dies (killed, out of memory, a crash in C code) breaks the executor: it
fails every job it had. The pool then starts a new executor and runs each of those
jobs again, one at a time: a job that breaks the new executor on its own is the one
that killed its worker, and fails with :class:`WorkerCrashed` (:class:`JobTimedOut`
if it timed out on its own too); the others get their results. Jobs waiting meanwhile
run once the suspects are through.
"""

import collections
import logging
import multiprocessing
import os
from concurrent import futures
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Optional, TypeVar

import attr
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.python.failure import Failure

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Events per chunk at most, unless the pool is built with another bound.
DEFAULT_MAX_CHUNK_SIZE = 1000

#: Seconds a job may take from its hand-off to the workers, unless the pool is built
#: with another bound: hundreds of times what a chunk of ``DEFAULT_MAX_CHUNK_SIZE``
#: events needs, so only a stuck worker reaches it.
DEFAULT_JOB_TIMEOUT_S = 60.0
#: The longest ``job_timeout`` accepted: a day.
MAX_JOB_TIMEOUT_S = 86_400


class PoolStopped(Exception):
    """The pool was stopped (or not started) before the job could run."""


class WorkerCrashed(Exception):
    """The worker process running the job died, again when the job ran on its own."""


class JobTimedOut(WorkerCrashed):
    """The job ran longer than the pool's ``job_timeout``, again when it ran on its own;
    the workers running it were killed."""


@attr.s(slots=True, auto_attribs=True, eq=False)
class _Job:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    deferred: "defer.Deferred[Any]"
    #: Builds ``args`` when the job is handed to the workers (then None).
    prepare: Optional[Callable[[], tuple[Any, ...]]] = None
    retried: bool = False
    #: Whether its latest run reached ``job_timeout``.
    timed_out: bool = False
    timer: Optional[IDelayedCall] = None
    future: "Optional[Future[Any]]" = None


class WorkerProcessPool:
    """Worker processes with a start/stop lifecycle, bounded, delivering Deferreds.

    Args:
        reactor: the reactor to deliver results on (``callFromThread``).
        max_workers: worker processes at most (default: the CPUs this process may run
            on; the reactor shares them, which costs less than leaving a core to it:
            on 2 cores, 2 workers check events 1.65-1.78x as fast as the raw loop, 1
            worker about as fast).
        max_chunk_size: the largest chunk the event methods send in one job.
        max_in_flight: jobs handed to the workers at once (default: twice
            ``max_workers``, so that each worker has its next job ready).
        start_method: ``"forkserver"`` or ``"spawn"`` (default: ``forkserver`` where
            available).
        job_timeout: seconds a job may take from its hand-off to the workers before
            the workers are killed and it counts as a crash (see the module
            docstring); None for no limit.
        clock: what times jobs (default: ``reactor``, which must then provide
            ``callLater``).

    Raises:
        ValueError: a bound below 1 (``job_timeout``: not above 0), or the start
            method ``fork``.

    Example::

        pool = WorkerProcessPool(reactor, max_workers=4, max_in_flight=8)
        await pool.start()
        total = await pool.run(sum, [1, 2, 3])   # 6
        pool.stop()
    """

    def __init__(
        self,
        reactor: IReactorFromThreads,
        *,
        max_workers: Optional[int] = None,
        max_chunk_size: int = DEFAULT_MAX_CHUNK_SIZE,
        max_in_flight: Optional[int] = None,
        start_method: Optional[str] = None,
        job_timeout: Optional[float] = DEFAULT_JOB_TIMEOUT_S,
        clock: Optional[IReactorTime] = None,
    ) -> None:
        if max_workers is None:
            max_workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        if max_in_flight is None:
            max_in_flight = 2 * max_workers
        if min(max_workers, max_chunk_size, max_in_flight) < 1:
            raise ValueError("max_workers, max_chunk_size and max_in_flight must be at least 1")
        if start_method is None:
            methods = multiprocessing.get_all_start_methods()
            start_method = "forkserver" if "forkserver" in methods else "spawn"
        if start_method not in ("forkserver", "spawn"):
            raise ValueError("start_method must be 'forkserver' or 'spawn', not %r" % start_method)
        if job_timeout is not None and not 0 < job_timeout <= MAX_JOB_TIMEOUT_S:
            raise ValueError(
                "job_timeout must be above 0 and at most %d (or None), not %r"
                % (MAX_JOB_TIMEOUT_S, job_timeout)
            )
        if job_timeout is not None and clock is None:
            if not IReactorTime.providedBy(reactor):
                raise ValueError("a job_timeout needs a clock: pass clock=, or a reactor")
            clock = reactor  # type: ignore[assignment]
        self._clock = clock
        self.job_timeout = job_timeout
        self._reactor = reactor
        self.max_workers = max_workers
        self.max_chunk_size = max_chunk_size
        self.max_in_flight = max_in_flight
        self._context = multiprocessing.get_context(start_method)
        self._executor: Optional[ProcessPoolExecutor] = None
        self._waiting: collections.deque[_Job] = collections.deque()
        self._suspects: collections.deque[_Job] = collections.deque()
        self._in_flight: dict[_Job, ProcessPoolExecutor] = {}
        #: How many times a broken executor was replaced.
        self.restarts = 0

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the pool is started and not stopped."""
        return self._executor is not None

    def start(self) -> "defer.Deferred[None]":
        """Start the worker processes.

        Returns:
            A Deferred firing once every worker has started and answered (jobs may be
            run before: they wait for the workers).

        Raises:
            RuntimeError: the pool is already running.
        """
        if self._executor is not None:
            raise RuntimeError("the pool is already running")
        self._executor = self._new_executor()
        # One job per worker makes the executor start them all now, not on demand.
        warm = [
            self._submit(_Job(os.getpid, (), defer.Deferred())) for _ in range(self.max_workers)
        ]
        return defer.gatherResults(warm, consumeErrors=True).addCallback(lambda _: None)

    def stop(self) -> None:
        """Stop the pool: fail the waiting jobs with :class:`PoolStopped`, let the
        jobs in flight finish (at most ``max_in_flight``; their Deferreds fire on the
        reactor thread soon after) and join the worker processes. Blocks until they
        have exited, killing them if the jobs in flight take longer than
        ``job_timeout``; does nothing if the pool is not running."""
        executor = self._executor
        if executor is None:
            return
        self._executor = None
        waiting = [*self._suspects, *self._waiting]
        self._suspects.clear()
        self._waiting.clear()
        for job in waiting:
            job.deferred.errback(Failure(PoolStopped("the worker pool was stopped")))
        in_flight = [job.future for job in self._in_flight if job.future is not None]
        for job in self._in_flight:
            _cancel_timer(job)
        try:
            _, late = futures.wait(in_flight, timeout=self.job_timeout)
            if late:
                logger.error(
                    "%d jobs still running after %gs: killing the worker processes",
                    len(late),
                    self.job_timeout,
                )
                _kill_workers(executor)
        finally:
            executor.shutdown(wait=True)

    # -- jobs ---------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Jobs handed to the workers and not back yet (at most ``max_in_flight``)."""
        return len(self._in_flight)

    @property
    def waiting(self) -> int:
        """Jobs waiting for room among the in-flight jobs."""
        return len(self._waiting) + len(self._suspects)

    def worker_pids(self) -> list[int]:
        """The process ids of the current workers (those the executor has started;
        read from its table of processes, which it does not publish otherwise)."""
        if self._executor is None:
            return []
        return sorted(_worker_processes(self._executor))

    def run(self, fn: Callable[..., T], *args: Any) -> "defer.Deferred[T]":
        """Run ``fn(*args)`` in a worker process.

        ``fn`` and ``args`` are pickled: ``fn`` must be importable by name (a module's
        function, or a builtin) and ``args`` plain data.

        Returns:
            A Deferred firing on the reactor thread with the result, or failing with
            the exception ``fn`` raised, :class:`WorkerCrashed` (its worker died, also
            when it ran again on its own) or :class:`PoolStopped`.
        """
        return self._add(_Job(fn, args, defer.Deferred()))

    def run_prepared(
        self, fn: Callable[..., T], prepare: Callable[[], tuple[Any, ...]]
    ) -> "defer.Deferred[T]":
        """Run ``fn(*prepare())`` in a worker process, calling ``prepare`` (on the
        reactor thread) only when the job is handed to the workers: a job waiting for
        room holds no copy of its arguments, so however many wait, at most
        ``max_in_flight`` jobs' arguments (e.g. a chunk's encoded events) exist.

        Returns:
            As :meth:`run`; also failing with what ``prepare`` raised.
        """
        return self._add(_Job(fn, (), defer.Deferred(), prepare=prepare))

    def _add(self, job: _Job) -> "defer.Deferred[Any]":
        if self._executor is None:
            job.deferred.errback(Failure(PoolStopped("the worker pool is not running")))
            return job.deferred
        self._waiting.append(job)
        self._pump()
        return job.deferred

    # -- internals ----------------------------------------------------------------------

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self.max_workers, mp_context=self._context)

    def _pump(self) -> None:
        """Hand waiting jobs to the executor, within the bounds. After a crash, the
        suspects run first, one at a time."""
        while self._executor is not None:
            if self._suspects:
                if self._in_flight:
                    return
                job = self._suspects.popleft()
            elif self._waiting and len(self._in_flight) < self.max_in_flight:
                if any(j.retried for j in self._in_flight):
                    return  # a suspect runs alone
                job = self._waiting.popleft()
            else:
                return
            self._submit(job)

    def _submit(self, job: _Job) -> "defer.Deferred[Any]":
        executor = self._executor
        assert executor is not None
        if job.prepare is not None:
            prepare, job.prepare = job.prepare, None
            try:
                job.args = prepare()
            except Exception:
                job.deferred.errback(Failure())
                return job.deferred
        try:
            future = executor.submit(job.fn, *job.args)
        except BrokenProcessPool:
            # Broken before its failures reached us: nothing of this job ran.
            self._replace(executor)
            self._waiting.appendleft(job)
            return job.deferred
        self._in_flight[job] = executor
        job.future = future
        job.timed_out = False
        if self.job_timeout is not None and self._clock is not None:
            job.timer = self._clock.callLater(self.job_timeout, self._timed_out, job, executor)
        future.add_done_callback(
            lambda f: self._reactor.callFromThread(self._done, job, executor, f)
        )
        return job.deferred

    def _done(self, job: _Job, executor: ProcessPoolExecutor, future: "Future[Any]") -> None:
        """A job's future is done (on the reactor thread): deliver, or retry after a
        crash."""
        del self._in_flight[job]
        job.future = None
        _cancel_timer(job)
        if future.cancelled():
            job.deferred.errback(Failure(PoolStopped("the worker pool was stopped")))
            return
        error = future.exception()
        if error is None:
            job.deferred.callback(future.result())
        elif not isinstance(error, BrokenProcessPool):
            job.deferred.errback(Failure(error))
        elif job.retried or self._executor is None:
            if job.timed_out:
                limit = self.job_timeout or 0.0
                logger.error("%s ran longer than %gs (again, on its own)", _name(job.fn), limit)
                crash: WorkerCrashed = JobTimedOut(
                    "the job ran longer than %gs; its worker process was killed" % (limit,)
                )
            else:
                logger.error("A worker process died running %s (again, on its own)", _name(job.fn))
                crash = WorkerCrashed("a worker process died while running this job")
            job.deferred.errback(Failure(crash))
        else:
            self._replace(executor)
            job.retried = True
            self._suspects.append(job)
        self._pump()

    def _timed_out(self, job: _Job, executor: ProcessPoolExecutor) -> None:
        """``job`` reached ``job_timeout``: kill its executor's workers, which fails it
        (and the others in flight there) as a crash."""
        job.timer = None
        if self._in_flight.get(job) is not executor:
            return
        if job.future is not None and job.future.done():
            return  # back, its result on its way to the reactor: nothing is stuck
        job.timed_out = True
        logger.warning(
            "%s has run for %gs: killing its worker processes", _name(job.fn), self.job_timeout
        )
        _kill_workers(executor)

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        """Replace ``broken`` by a new executor (once, however many jobs report it)."""
        if self._executor is not broken:
            return
        logger.warning("A worker process died; starting new worker processes")
        # Its workers are gone; it fails its own pending jobs (cancelling them instead
        # could race with that and report them as stopped).
        broken.shutdown(wait=False)
        self._executor = self._new_executor()
        self.restarts += 1


def _worker_processes(executor: ProcessPoolExecutor) -> dict[int, Any]:
    """An executor's worker processes by pid (its own table: it publishes none)."""
    processes: Optional[dict[int, Any]] = getattr(executor, "_processes", None)
    return dict(processes or {})


def _kill_workers(executor: ProcessPoolExecutor) -> None:
    """SIGKILL every worker process of ``executor`` (the executor then fails the jobs
    they had with ``BrokenProcessPool``)."""
    for process in _worker_processes(executor).values():
        try:
            process.kill()  # (does nothing once the process is known to have exited)
        except OSError:
            pass


def _cancel_timer(job: _Job) -> None:
    if job.timer is not None:
        if job.timer.active():
            job.timer.cancel()
        job.timer = None


def _name(fn: Callable[..., Any]) -> str:
    return "%s.%s" % (getattr(fn, "__module__", "?"), getattr(fn, "__qualname__", repr(fn)))
