"""Run CPU-heavy work (decoding and validating big answers) off the reactor thread.

The work is handed to an injected :class:`BlockingRunner`. The wiring builds a
:class:`WorkerPool`: a small thread pool of our own, with a bound on the jobs it holds.
Unit tests on ``Clock`` use :func:`run_inline`, which runs the work at once and keeps
them synchronous (:func:`worker_pool` gives None for reactors without threads). Work
given to a runner must not touch the reactor or shared state; pure functions such as
:func:`~keyring_module.validation.parse_server_keys_response` fit.

Example::

    pool = worker_pool(reactor)          # None on Clock / MemoryReactorClock
    run = pool if pool is not None else run_inline
    response = await run(lambda: parse_server_keys_response(body, "example.org"))
    ...
    pool.stop()
"""

from typing import Any, Callable, Optional, Protocol, TypeVar, cast

from twisted.internet import defer
from twisted.internet.interfaces import IReactorFromThreads, IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from keyring_module.clock import ThreadedReactor
from keyring_module.errors import KeyLookupError

T = TypeVar("T")

#: Threads of a :class:`WorkerPool`: enough to keep validation off the reactor thread,
#: few enough that hostile answers cannot take many cores (or the GIL) from it.
WORKER_THREADS = 2

#: Jobs a :class:`WorkerPool` holds at once, running or waiting; more are refused at
#: once. Real answers take well under a millisecond each, so this is only reached by a
#: flood of big (hostile) ones, each of which keeps its body in memory while it waits.
MAX_WORKER_JOBS = 64


class BlockingRunner(Protocol):
    """Runs a blocking call somewhere and delivers its result on the reactor thread."""

    def __call__(self, work: Callable[[], T]) -> "defer.Deferred[T]": ...


def run_inline(work: Callable[[], T]) -> "defer.Deferred[T]":
    """Run ``work`` now, on the calling thread (tests, and reactors without threads).

    Example::

        >>> d = run_inline(lambda: 6 * 7)
        >>> d.addCallback(print) and None
        42
    """
    return defer.maybeDeferred(work)


class WorkerPoolBusyError(KeyLookupError):
    """Work was refused: the worker pool already holds its most jobs, or is stopped.

    The fetch whose answer could not be handled fails and is counted (outcome
    ``workers_busy``), but the server is not to blame: ``blames_server`` tells the
    per-origin limiter not to back it off.
    """

    outcome = "workers_busy"
    blames_server = False


class WorkerPool:
    """A small thread pool of our own for CPU-heavy work, holding a bounded number of
    jobs; a :class:`BlockingRunner`.

    Not the reactor's shared pool (``reactor.getThreadPool()``): Twisted's default name
    resolver, and Synapse, run their own work there, so answers that each keep a
    thread busy for a second would delay DNS lookups for the whole process. The pool is
    started once the reactor runs, stopped by :meth:`stop` (and at reactor shutdown,
    if nobody called it).

    Args:
        reactor: runs the results' callbacks on its thread (``callFromThread``) and
            starts and stops the pool.
        threads: at most this many threads run jobs.
        max_jobs: at most this many jobs, running or waiting; beyond it a call fails at
            once with :class:`WorkerPoolBusyError`.
        pool: the pool to run the jobs in (tests); a new ``ThreadPool`` otherwise.

    Example::

        pool = WorkerPool(reactor)
        response = await pool(lambda: parse_server_keys_response(body, "example.org"))
        pool.stop()
    """

    def __init__(
        self,
        reactor: ThreadedReactor,
        *,
        threads: int = WORKER_THREADS,
        max_jobs: int = MAX_WORKER_JOBS,
        pool: Optional[ThreadPool] = None,
    ) -> None:
        self._reactor = reactor
        self._max_jobs = max_jobs
        self._pool = pool if pool is not None else ThreadPool(0, threads, "keyring-module")
        self._jobs = 0
        self._stopped = False
        reactor.callWhenRunning(self._start)
        self._shutdown_trigger: Any = reactor.addSystemEventTrigger(
            "during", "shutdown", self._stop_at_shutdown
        )

    @property
    def jobs(self) -> int:
        """The jobs it holds now: running, or waiting for a thread."""
        return self._jobs

    def __call__(self, work: Callable[[], T]) -> "defer.Deferred[T]":
        """Run ``work`` in a thread of the pool; fire with its result on the reactor.

        Returns:
            A Deferred firing with ``work()``'s result or failure, or failing at once
            with :class:`WorkerPoolBusyError`.
        """
        if self._stopped:
            return defer.fail(WorkerPoolBusyError("the worker pool is stopped"))
        if self._jobs >= self._max_jobs:
            return defer.fail(
                WorkerPoolBusyError("the worker pool already holds %d jobs" % self._jobs)
            )
        self._jobs += 1
        d = deferToThreadPool(cast(IReactorFromThreads, self._reactor), self._pool, work)
        return d.addBoth(self._finished)

    def stop(self) -> None:
        """Refuse new work and stop the threads, once the jobs they run are done."""
        if self._stopped:
            return
        self._stopped = True
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        self._pool.stop()

    def _start(self) -> None:
        if not self._stopped:
            self._pool.start()

    def _stop_at_shutdown(self) -> None:
        self._shutdown_trigger = None  # it is firing: no longer registered
        self.stop()

    def _finished(self, result: T) -> T:
        self._jobs -= 1
        return result


def worker_pool(reactor: object) -> Optional[WorkerPool]:
    """A new :class:`WorkerPool` on ``reactor``, or None if it runs no threads.

    In-memory test reactors (``Clock``, ``MemoryReactorClock``) run no threads, so
    everything built on them runs its heavy work inline (:func:`run_inline`) and stays
    synchronous.
    """
    if not IReactorThreads.providedBy(reactor):
        return None
    return WorkerPool(cast(ThreadedReactor, reactor))
