"""Time, deadlines and the typed reactor: every piece of logic reads time from an
injected reactor.

Tests pass :class:`twisted.internet.task.Clock` (or ``MemoryReactorClock``); only the
entry points (``server.py``, ``module.py``, the CLI) choose the real reactor, and they
hand it down typed as the narrowest protocol each part needs:

* :class:`SecondsClock` / :class:`ReactorClock`: reading time and scheduling calls
  (almost everything);
* :class:`ThreadedReactor`: a database connection pool and thread-pool work;
* :class:`NetworkReactor`: outbound connections and name resolution;
* :class:`KeyringReactor`: all of the above plus listening, for the wiring.

A wait is bounded in one way everywhere, with :func:`with_deadline`::

    keys = await with_deadline(clock, fetch(), 10.0, cancel_work=False)
    # raises DeadlineExceeded after 10 s; the fetch goes on for whoever else waits
"""

from typing import Any, Awaitable, Callable, Optional, Protocol, TypeVar, Union, cast

from twisted.internet import defer
from twisted.internet.interfaces import (
    IConnector,
    IDelayedCall,
    IHostnameResolver,
    IListeningPort,
)
from twisted.internet.protocol import ClientFactory, DatagramProtocol
from twisted.python.failure import Failure

T = TypeVar("T")


class SecondsClock(Protocol):
    """Anything with a reactor's ``seconds()`` (for code that only reads the time)."""

    def seconds(self) -> float: ...


class ReactorClock(SecondsClock, Protocol):
    """The part of a reactor that logic code may use for time."""

    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kw: object
    ) -> IDelayedCall: ...


class ThreadedReactor(ReactorClock, Protocol):
    """What a database connection pool (``adbapi``) and thread-pool work need."""

    def callWhenRunning(self, callable: Callable[..., Any], *args: Any, **kwargs: Any) -> Any: ...

    def addSystemEventTrigger(
        self, phase: str, eventType: str, callable: Callable[..., Any], *args: Any, **kw: Any
    ) -> Any: ...

    def removeSystemEventTrigger(self, triggerID: Any) -> None: ...

    def callFromThread(self, callable: Callable[..., Any], *args: Any, **kwargs: Any) -> None: ...


class NetworkReactor(ReactorClock, Protocol):
    """What outbound connections need: TCP, time, a hostname resolver, and UDP for the
    DNS (SRV) queries that ``twisted.names`` sends."""

    @property
    def nameResolver(self) -> IHostnameResolver: ...

    def connectTCP(
        self,
        host: str,
        port: int,
        factory: ClientFactory,
        timeout: float = 30,
        bindAddress: Optional[tuple[str, int]] = None,
    ) -> IConnector: ...

    def listenUDP(
        self, port: int, protocol: DatagramProtocol, interface: str = "", maxPacketSize: int = 8192
    ) -> IListeningPort: ...


class KeyringReactor(ThreadedReactor, NetworkReactor, Protocol):
    """Everything the wiring hands down, plus listening and running (the standalone
    server)."""

    def run(self) -> None: ...

    def stop(self) -> None: ...

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any: ...

    def listenSSL(
        self, port: int, factory: Any, contextFactory: Any, backlog: int = 50, interface: str = ""
    ) -> Any: ...


def global_reactor() -> KeyringReactor:
    """Twisted's global reactor, typed: for the entry points (and integration tests)
    only; everything below them is handed the reactor they chose."""
    from twisted.internet import reactor

    return cast(KeyringReactor, reactor)


def now_ms(clock: SecondsClock) -> int:
    """The current time in integer milliseconds since the epoch, as Matrix uses it."""
    return int(clock.seconds() * 1000)


class DeadlineExceeded(Exception):
    """A wait bounded by :func:`with_deadline` outlasted its deadline."""

    def __init__(self, seconds: float) -> None:
        super().__init__("no result within %.3gs" % (seconds,))
        self.seconds = seconds


def with_deadline(
    clock: ReactorClock,
    work: "Union[defer.Deferred[T], Awaitable[T]]",
    seconds: Optional[float],
    *,
    cancel_work: bool,
) -> "defer.Deferred[T]":
    """Wait for ``work`` for at most ``seconds``.

    Args:
        clock: where the deadline is scheduled.
        work: a Deferred or a coroutine (run with ``ensureDeferred``).
        seconds: the deadline; None waits as long as it takes.
        cancel_work: at the deadline, cancel ``work`` (an HTTP exchange) or let it go
            on (a fetch other callers share, which stores what it finds).

    Returns:
        A Deferred firing with ``work``'s result or failure, or failing with
        :class:`DeadlineExceeded` when the deadline comes first. ``work``'s result (or
        failure) is consumed: callbacks added to ``work`` afterwards see None, so a
        caller that wants to log a late failure adds its own callbacks to ``work``
        before calling this. Whatever ``work`` does after the deadline is dropped here.
        Cancelling the returned Deferred stops the timer, and cancels ``work`` only when
        ``cancel_work`` is set (also with ``seconds`` None: shared work is never
        cancelled by one waiter).

    Example::

        try:
            body = await with_deadline(reactor, exchange(), 10.0, cancel_work=True)
        except DeadlineExceeded:
            raise RequestTimeoutError("no complete response within 10s")
    """
    running: "defer.Deferred[T]" = (
        work if isinstance(work, defer.Deferred) else defer.ensureDeferred(work)  # type: ignore[arg-type]
    )
    timer: Optional[IDelayedCall] = None

    def cancel(_: object) -> None:
        if timer is not None and timer.active():
            timer.cancel()
        if cancel_work:
            running.cancel()

    result: "defer.Deferred[T]" = defer.Deferred(cancel)

    def expire(deadline: float) -> None:
        if result.called:
            return
        result.errback(DeadlineExceeded(deadline))
        if cancel_work:
            running.cancel()

    def finished(outcome: Union[T, Failure]) -> None:
        if timer is not None and timer.active():
            timer.cancel()
        if result.called:
            return  # past the deadline (or cancelled): dropped, see above
        if isinstance(outcome, Failure):
            result.errback(outcome)
        else:
            result.callback(outcome)

    if seconds is not None:
        timer = clock.callLater(seconds, expire, seconds)
    running.addBoth(finished)
    return result
