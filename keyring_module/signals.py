"""Stopping the reactor on SIGTERM/SIGINT once, however many signals arrive.

Twisted's own handlers call ``reactor.stop`` for every signal, so a second SIGTERM
while shutting down (``timeout`` forwarding one, an impatient operator) logs a
``ReactorNotRunning`` traceback at CRITICAL. The entry points install these instead,
once the reactor runs (after Twisted installed its own)::

    reactor.callWhenRunning(install_stop_handlers, reactor)
"""

import logging
import signal
from types import FrameType
from typing import Any, Callable, Optional

logger = logging.getLogger(__name__)

SignalHandler = Callable[[int, Optional[FrameType]], None]


def stop_handler(reactor: Any) -> SignalHandler:
    """A signal handler stopping ``reactor`` on the first signal and only logging later ones.

    Example:
        >>> class Reactor:
        ...     calls = 0
        ...     def stop(self): pass
        ...     def callFromThread(self, f): Reactor.calls += 1
        >>> handler = stop_handler(Reactor())
        >>> handler(signal.SIGTERM, None); handler(signal.SIGTERM, None); Reactor.calls
        1
    """
    stopping = False

    def handle(number: int, frame: Optional[FrameType]) -> None:
        nonlocal stopping
        name = signal.Signals(number).name
        if stopping:
            logger.info("Received %s again; already shutting down", name)
            return
        stopping = True
        logger.info("Received %s, shutting down", name)
        reactor.callFromThread(reactor.stop)

    return handle


def install_stop_handlers(reactor: Any) -> None:
    """Make SIGTERM and SIGINT stop ``reactor`` once (main thread only)."""
    handler = stop_handler(reactor)
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, handler)
