"""The standalone server's HTTP connection: deadlines a slow client cannot stretch.

Twisted's ``HTTPChannel`` has one idle timeout, reset by every byte received, so a
client sending one byte a minute keeps its connection (and a file descriptor) forever.
:class:`GuardedHTTPChannel` turns that off and keeps three deadlines of its own, none of
which traffic resets (``inbound:`` in the config):

* ``idle_timeout``: with no request in progress (after connecting, or once the previous
  answer is written), the first byte of the next request must come within it, or the
  connection is closed;
* ``header_timeout``: from a request's first byte, its headers and body must all have
  arrived within it, or the connection is dropped;
* ``send_timeout``: once the client falls behind reading (the connection's send buffer
  is full), it must have taken everything written within it, counted from the moment it
  first fell behind and not from its last read, or the connection is dropped.

While a client is behind, a request it pipelined waits: it is processed once the client
has read what was already sent, so a client that sends requests without reading the
answers cannot make us queue answers for it.

A request is in one of three phases::

    IDLE --first byte--> RECEIVING --headers and body in--> HANDLING --answer written--> IDLE
    (idle_timeout)       (header_timeout)                   (send_timeout while behind)
"""

import enum
import logging
from typing import Callable, Optional

from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, Request

from keyring_module.clock import SecondsClock
from keyring_module.config import InboundConfig

logger = logging.getLogger(__name__)

#: After a graceful close, how long the client may take to let it complete before the
#: connection is dropped (a client that never reads would keep it open otherwise).
CLOSE_GRACE_SECONDS = 5.0
# A wake-up may run a hair before its deadline (float arithmetic on clock times).
_CLOCK_SLACK_SECONDS = 1e-6


class Phase(enum.Enum):
    """Where a connection is in its request/answer cycle."""

    IDLE = "idle"  # no request in progress
    RECEIVING = "receiving"  # part of a request has arrived
    HANDLING = "handling"  # a whole request arrived; its answer is not written yet
    ANSWERED = "answered"  # transient: an answer was just written


class GuardedHTTPChannel(HTTPChannel):
    """An ``HTTPChannel`` with idle, header and send deadlines (see the module docstring).

    ``KeyServerSite.buildProtocol`` sets :attr:`limits`, :attr:`clock` and
    :attr:`on_closed`; the site's reactor runs the deadlines (``callLater``), and
    Twisted's own idle timeout must be off (``timeout=None`` on the site).
    """

    #: The deadlines; the site sets its own.
    limits: InboundConfig = InboundConfig()
    #: The clock the deadlines are read from (the site's reactor).
    clock: Optional[SecondsClock] = None
    #: Called once when the connection is gone (the site counts connections with it).
    on_closed: Optional[Callable[[], None]] = None

    def __init__(self) -> None:
        super().__init__()
        self.phase = Phase.IDLE
        # The idle or header deadline (by phase), checked by one wake-up call that is
        # never moved sooner (see _watch), so a request costs no timer operation.
        self._deadline_seconds = 0.0
        self._wakeup: Optional[IDelayedCall] = None
        self._deadlines: dict[str, IDelayedCall] = {}  # "send", "grace"
        self._waiting_request: Optional[Callable[[], None]] = None
        self._closed = False

    # -- the request/answer cycle -------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        self._become_idle()

    def dataReceived(self, data: bytes) -> None:
        # ANSWERED: Twisted replays bytes pipelined behind the answered request from
        # requestDone; a partial request among them starts its header deadline now.
        if self.phase in (Phase.IDLE, Phase.ANSWERED) and data:
            self.phase = Phase.RECEIVING
            self._watch(self.limits.header_timeout_ms)
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self.phase = Phase.HANDLING  # no idle or header deadline while handling
        super().allContentReceived()

    def requestDone(self, request: Request) -> None:
        self.phase = Phase.ANSWERED
        # Twisted replays pipelined bytes here (through dataReceived); they may start
        # (or even finish) the next request, which then sets the phase itself.
        super().requestDone(request)
        if self.phase is Phase.ANSWERED:
            self._become_idle()
        self._check_caught_up()

    @property
    def client_behind(self) -> bool:
        """Whether the client has fallen behind reading: the send buffer is full (Twisted's
        own flag, set and cleared by the transport's pause and resume)."""
        return bool(self._waitingForTransport)

    def process_when_caught_up(self, process: Callable[[], None]) -> None:
        """Run ``process`` now if the client has read what was sent, else once it has."""
        if self.client_behind:
            self._waiting_request = process
        else:
            process()

    # -- back-pressure from the transport ------------------------------------------------

    def pauseProducing(self) -> None:
        """The send buffer is full: the client is behind; its send deadline starts."""
        super().pauseProducing()
        if "send" not in self._deadlines:
            self._set_deadline("send", self.limits.send_timeout_ms, self._send_timed_out)

    def resumeProducing(self) -> None:
        """The send buffer has gone out: write more, or run the waiting request."""
        super().resumeProducing()
        waiting, self._waiting_request = self._waiting_request, None
        if waiting is not None:
            self.process_when_caught_up(waiting)
        self._check_caught_up()

    def _check_caught_up(self) -> None:
        # The send deadline runs until the client has taken every answer in full.
        if not self.client_behind and self.phase is not Phase.HANDLING:
            self._cancel("send")

    # -- idle and header deadlines --------------------------------------------------------

    def _become_idle(self) -> None:
        self.phase = Phase.IDLE
        self._watch(self.limits.idle_timeout_ms)

    def _watch(self, timeout_ms: int) -> None:
        """Set the idle or header deadline to ``timeout_ms`` from now.

        The wake-up call is scheduled at most the shorter of the two timeouts ahead and
        re-armed when it fires early, so a new deadline is never before it: moving a
        reactor call sooner costs a linear search of all pending calls.
        """
        assert self.clock is not None, "the site sets the clock"
        self._deadline_seconds = self.clock.seconds() + timeout_ms / 1000.0
        if self._wakeup is None or not self._wakeup.active():
            self._schedule_wakeup()

    def _schedule_wakeup(self) -> None:
        assert self.clock is not None
        if self._closed:
            return
        step = min(self.limits.idle_timeout_ms, self.limits.header_timeout_ms) / 1000.0
        remaining = max(0.0, self._deadline_seconds - self.clock.seconds())
        self._wakeup = self.callLater(min(step, remaining), self._woken)

    def _woken(self) -> None:
        self._wakeup = None
        if self._closed or self.phase not in (Phase.IDLE, Phase.RECEIVING):
            return  # handling a request: the next _watch schedules anew
        assert self.clock is not None
        if self.clock.seconds() + _CLOCK_SLACK_SECONDS < self._deadline_seconds:
            self._schedule_wakeup()
        elif self.phase is Phase.IDLE:
            self._idle_timed_out()
        else:
            self._header_timed_out()

    # -- the send deadline and closing ----------------------------------------------------

    def _set_deadline(self, name: str, delay_ms: int, action: Callable[[], None]) -> None:
        self._cancel(name)
        if self._closed:
            return

        def expire() -> None:
            self._deadlines.pop(name, None)
            action()

        self._deadlines[name] = self.callLater(delay_ms / 1000.0, expire)

    def _cancel(self, name: str) -> None:
        call = self._deadlines.pop(name, None)
        if call is not None and call.active():
            call.cancel()

    def _idle_timed_out(self) -> None:
        logger.debug("Closing idle connection from %s", self._peer())
        self.close_gracefully()

    def _header_timed_out(self) -> None:
        logger.debug("Dropping %s: request not in within the header timeout", self._peer())
        self.drop()

    def _send_timed_out(self) -> None:
        logger.debug("Dropping %s: answer not read within the send timeout", self._peer())
        self.drop()

    def close_gracefully(self) -> None:
        """Close once the send buffer has gone out; drop it if that takes too long."""
        if self.transport is None or self._closed:
            return
        self.transport.loseConnection()
        self._deadlines["grace"] = self.callLater(CLOSE_GRACE_SECONDS, self.drop)

    def drop(self) -> None:
        """Close the connection now, discarding anything not sent."""
        if self.transport is not None and not self._closed:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._closed = True
        for name in list(self._deadlines):
            self._cancel(name)
        if self._wakeup is not None and self._wakeup.active():
            self._wakeup.cancel()
        self._wakeup = None
        self._waiting_request = None
        super().connectionLost(reason)
        on_closed, self.on_closed = self.on_closed, None
        if on_closed is not None:
            on_closed()

    def _peer(self) -> str:
        peer = self.transport.getPeer() if self.transport is not None else None
        return str(getattr(peer, "host", peer))
