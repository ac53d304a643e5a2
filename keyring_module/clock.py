"""Time helpers: every piece of logic reads time from an injected reactor.

Tests pass :class:`twisted.internet.task.Clock` (or ``MemoryReactorClock``); only the
entry points (``server.py``, ``module.py``) choose the real reactor.
"""

from typing import Callable, Protocol

from twisted.internet.interfaces import IDelayedCall


class SecondsClock(Protocol):
    """Anything with a reactor's ``seconds()`` (for code that only reads the time)."""

    def seconds(self) -> float: ...


class ReactorClock(SecondsClock, Protocol):
    """The part of a reactor that logic code may use for time."""

    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kw: object
    ) -> IDelayedCall: ...


def now_ms(clock: ReactorClock) -> int:
    """The current time in integer milliseconds since the epoch, as Matrix uses it."""
    return int(clock.seconds() * 1000)
