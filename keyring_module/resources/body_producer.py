"""Sending big answers piece by piece as the client reads them, within one byte budget.

A 238-byte POST can ask for a 9 MB answer. Written with one ``request.write``, the
whole answer is copied into the connection's send buffer and stays there for as long as
the client does not read it. :class:`BodyProducer` hands the connection one piece of
:data:`CHUNK_BYTES` at a time instead, and only when the connection has room: it is a
push producer, paused by the transport when its buffer is full and resumed when the
buffer has gone out. A client that stops reading therefore holds about one send buffer
and one piece of copies, plus a reference to the answer itself.

The answer bytes not yet taken by their clients count toward the site's
:class:`ResponseBudget` from the first piece until the client has taken them (or the
connection is gone), so non-reading clients together cannot hold more than the budget.

Example::

    budget = ResponseBudget(max_bytes=64 * 1024 * 1024)
    if budget.can_take(len(body)):
        BodyProducer(request, body, budget).start()   # the request finishes by itself
"""

import logging
from typing import Any, Optional

from twisted.internet.interfaces import IPushProducer
from twisted.web.server import Request
from zope.interface import implementer

logger = logging.getLogger(__name__)

#: Answers up to this size are written at once; bigger ones go through a BodyProducer.
#: It matches the send buffer size at which Twisted's transports pause their producer.
CHUNK_BYTES = 64 * 1024


class ResponseBudget:
    """Counts the answer bytes written for clients but not yet taken by them.

    Args:
        max_bytes: how many such bytes all connections together may hold.

    Example::

        >>> budget = ResponseBudget(max_bytes=10)
        >>> budget.take(8)
        >>> budget.can_take(4), budget.held_bytes
        (False, 8)
        >>> budget.release(8)
        >>> budget.can_take(40)  # nothing held: one oversized answer may go alone
        True
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._held_bytes = 0

    @property
    def held_bytes(self) -> int:
        """Answer bytes written but not yet taken by their clients."""
        return self._held_bytes

    def can_take(self, size: int) -> bool:
        """Whether an answer of ``size`` bytes fits now.

        An answer larger than the whole budget fits only while nothing else is held, so
        that it is still served, alone.
        """
        return self._held_bytes == 0 or self._held_bytes + size <= self.max_bytes

    def take(self, size: int) -> None:
        """Count ``size`` more bytes as held."""
        self._held_bytes += size

    def release(self, size: int) -> None:
        """Count ``size`` held bytes as taken (or dropped with their connection)."""
        self._held_bytes = max(0, self._held_bytes - size)


def response_budget_of(request: Request) -> Optional[ResponseBudget]:
    """The budget of the site that received ``request``, if it has one.

    The standalone ``KeyServerSite`` has one; other sites (Synapse's, treq's test
    site) do not, and their big answers are still sent piece by piece.
    """
    site = getattr(request, "site", None)
    budget = getattr(site, "response_budget", None)
    return budget if isinstance(budget, ResponseBudget) else None


@implementer(IPushProducer)
class BodyProducer:
    """Writes one answer body to ``request`` in pieces, then finishes the request.

    The response headers (status, ``Content-Length``) must already be set. The body is
    sliced one piece at a time, so at most one piece is copied ahead of the client.

    Args:
        request: the request to answer.
        body: the whole answer body.
        budget: where the bytes not yet taken are counted, or None.
        chunk_bytes: the size of one piece.

    Example::

        request.setHeader(b"Content-Length", b"%d" % len(body))
        BodyProducer(request, body, response_budget_of(request)).start()
        return NOT_DONE_YET
    """

    def __init__(
        self,
        request: Request,
        body: bytes,
        budget: Optional[ResponseBudget],
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        self._request = request
        self._body = body
        self._budget = budget
        self._chunk_bytes = chunk_bytes
        self._written = 0  # bytes handed to the connection
        self._taken = 0  # bytes known to have left the connection's send buffer
        self._paused = False
        self._done = False

    @property
    def held_bytes(self) -> int:
        """Bytes of this answer counted toward the budget right now."""
        return 0 if self._done else len(self._body) - self._taken

    def start(self) -> None:
        """Count the body toward the budget and write as much as the connection takes."""
        if self._budget is not None:
            self._budget.take(len(self._body))
        self._request.notifyFinish().addBoth(self._finished)
        self._request.registerProducer(self, True)
        self._write_pieces()

    def resumeProducing(self) -> None:
        """The send buffer has gone out: what was written so far is taken; write more."""
        self._paused = False
        self._count_taken(self._written)
        self._write_pieces()

    def pauseProducing(self) -> None:
        """The send buffer is full: write nothing until it has gone out."""
        self._paused = True

    def stopProducing(self) -> None:
        """The connection is closing: stop, and release the rest of the budget."""
        self._finished(None)

    def _write_pieces(self) -> None:
        body = self._body
        while not self._paused and not self._done and self._written < len(body):
            piece = body[self._written : self._written + self._chunk_bytes]
            self._written += len(piece)
            self._request.write(piece)  # may pause us, synchronously
        if not self._done and self._written >= len(body):
            self._request.unregisterProducer()
            if not self._request._disconnected:
                # The last pieces (at most one send buffer) are no longer counted.
                self._request.finish()
            self._finished(None)

    def _count_taken(self, upto: int) -> None:
        if upto > self._taken:
            if self._budget is not None:
                self._budget.release(upto - self._taken)
            self._taken = upto

    def _finished(self, result: Any) -> None:
        """The request finished or its connection was lost: release what is left."""
        if self._done:
            return
        self._count_taken(len(self._body))
        self._done = True
        self._body = b""  # a connection that lingers keeps no answer alive
