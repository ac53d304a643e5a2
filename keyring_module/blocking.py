"""Run CPU-heavy work (decoding and validating big answers) off the reactor thread.

The work is handed to an injected :class:`BlockingRunner`: the wiring uses the
reactor's thread pool (:func:`thread_pool_runner`); unit tests on ``Clock`` use
:func:`run_inline`, which runs the work at once and keeps them synchronous. Work given to
a runner must not touch the reactor or shared state; pure functions such as
:func:`~keyring_module.validation.parse_server_keys_response` fit.

Example::

    run = thread_pool_runner(reactor)
    response = await run(lambda: parse_server_keys_response(body, "example.org"))
"""

from typing import Callable, Optional, Protocol, TypeVar, cast

from twisted.internet import defer
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


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


class ThreadPoolRunner:
    """Runs each call in ``pool`` and fires its Deferred through ``reactor``.

    Args:
        reactor: delivers results back on the reactor thread (``callFromThread``).
        pool: the thread pool, e.g. ``reactor.getThreadPool()``.
    """

    def __init__(self, reactor: IReactorFromThreads, pool: ThreadPool) -> None:
        self._reactor = reactor
        self._pool = pool

    def __call__(self, work: Callable[[], T]) -> "defer.Deferred[T]":
        return deferToThreadPool(self._reactor, self._pool, work)


def thread_pool_runner(reactor: object) -> BlockingRunner:
    """A runner on ``reactor``'s own thread pool, or :func:`run_inline` if it has none.

    In-memory test reactors (``Clock``, ``MemoryReactorClock``) have no thread pool, so
    everything built on them stays synchronous.
    """
    get_thread_pool: Optional[Callable[[], ThreadPool]] = getattr(reactor, "getThreadPool", None)
    if get_thread_pool is None or not hasattr(reactor, "callFromThread"):
        return run_inline
    return ThreadPoolRunner(cast(IReactorFromThreads, reactor), get_thread_pool())
