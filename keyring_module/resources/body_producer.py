"""Sending big answers piece by piece as the client reads them, within one byte budget.

A 238-byte POST can ask for a 9 MB answer. Written with one ``request.write``, the
whole answer is copied into the connection's send buffer and stays there for as long as
the client does not read it. :class:`BodyProducer` hands the connection one piece of
:data:`CHUNK_BYTES` at a time instead, and only when the connection has room: it is a
push producer, paused by the transport when its buffer is full and resumed when the
buffer has gone out. A client that stops reading therefore holds about one send buffer
and one piece of copies, plus a reference to the answer itself.

The answers being sent count toward the site's :class:`SiteResponseBudget` from the
first piece until their clients have taken them (or the connection is gone):

* what is counted is what is held: an answer body sent to several connections at once
  (a cached answer is one object) counts once, in full, plus one send buffer and one
  piece of copies per connection; an answer sent to one connection counts its bytes
  that client has not taken yet;
* all clients together stay within ``max_bytes``, and each client address (the key
  :class:`~keyring_module.resources.per_address.ConnectionsPerAddress` counts
  connections under) within its share, a quarter of it by default. So a few
  connections that never read cannot take the whole budget from everyone else.

Example::

    budget = SiteResponseBudget(max_bytes=64 * 1024 * 1024)
    if budget.can_send(body, client):
        BodyProducer(request, body, budget, client).start()   # finishes by itself
"""

import logging
from typing import Any, Optional, Protocol

from twisted.internet.interfaces import IPushProducer
from twisted.web.server import Request
from zope.interface import implementer

logger = logging.getLogger(__name__)

#: Answers up to this size are written at once; bigger ones go through a BodyProducer.
#: It matches the send buffer size at which Twisted's transports pause their producer.
CHUNK_BYTES = 64 * 1024


class ResponseBudget:
    """A count of answer bytes held, against a limit (a site's, or one client's).

    Args:
        max_bytes: how many bytes may be held.

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
        """The bytes counted as held now."""
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


#: By default one client address may hold this fraction of a site's answer budget.
CLIENT_SHARE_DIVISOR = 4
#: What one connection holds of copies of a shared answer: about one send buffer (the
#: transport pauses its producer past 64 KiB) and one piece.
COPIES_BYTES_PER_CONNECTION = 2 * CHUNK_BYTES


class HeldAnswer(Protocol):
    """One answer being sent (a :class:`BodyProducer`), as the budget sees it."""

    @property
    def body(self) -> bytes:
        """The answer body."""

    @property
    def client(self) -> Optional[str]:
        """The client address key, or None when not known."""

    @property
    def taken_bytes(self) -> int:
        """How much of the body its client has taken."""


class _HeldBody:
    """One body being sent, and the answers sending it."""

    __slots__ = ("body", "answers", "counted")

    def __init__(self, body: bytes) -> None:
        self.body = body  # also keeps id(body) from being reused while counted
        self.answers: set[HeldAnswer] = set()
        self.counted = 0

    def held(self) -> int:
        """What the body holds: sent to one connection, what its client has not taken;
        shared, all of it plus each connection's copies."""
        if len(self.answers) == 1:
            (only,) = self.answers
            return len(self.body) - only.taken_bytes
        return _shared_bytes(self.body, len(self.answers)) if self.answers else 0


def _shared_bytes(body: bytes, connections: int) -> int:
    return len(body) + COPIES_BYTES_PER_CONNECTION * connections


class _Holdings:
    """The bodies a group of answers (a site's, or one client's) holds, each once."""

    def __init__(self, max_bytes: int) -> None:
        self.budget = ResponseBudget(max_bytes)
        self._bodies: dict[int, _HeldBody] = {}

    def __bool__(self) -> bool:
        return bool(self._bodies)

    def fits(self, body: bytes) -> bool:
        """Whether one more answer sending ``body`` fits (a body held already costs only
        what sharing it adds)."""
        held = self._bodies.get(id(body))
        if held is None:
            return self.budget.can_take(len(body))
        shared = _shared_bytes(body, len(held.answers) + 1)
        return self.budget.can_take(shared - held.counted)

    def add(self, answer: HeldAnswer) -> None:
        held = self._bodies.get(id(answer.body))
        if held is None:
            held = self._bodies[id(answer.body)] = _HeldBody(answer.body)
        held.answers.add(answer)
        self._recount(held)

    def changed(self, answer: HeldAnswer) -> None:
        held = self._bodies.get(id(answer.body))
        if held is not None:
            self._recount(held)

    def remove(self, answer: HeldAnswer) -> None:
        held = self._bodies.get(id(answer.body))
        if held is None:
            return
        held.answers.discard(answer)
        self._recount(held)
        if not held.answers:
            del self._bodies[id(answer.body)]

    def _recount(self, held: _HeldBody) -> None:
        now = held.held()
        if now > held.counted:
            self.budget.take(now - held.counted)
        else:
            self.budget.release(held.counted - now)
        held.counted = now


class SiteResponseBudget:
    """The bytes a site's big answers hold until their clients have taken them.

    Each body counts once however many connections it is being sent to: sent to one
    connection, less what that client has taken; shared, in full plus
    :data:`COPIES_BYTES_PER_CONNECTION` per connection. An answer is sent only if what
    it adds keeps all clients together within ``max_bytes`` and its client address
    within ``max_bytes_per_client``; an answer larger than a limit is sent only while
    nothing else is held under it, so that it is still served, alone.

    Args:
        max_bytes: ``inbound.max_buffered_response_bytes``.
        max_bytes_per_client: one client address's share (default: a quarter of
            ``max_bytes``).

    Example::

        >>> class Answer:  # what a BodyProducer shows the budget
        ...     def __init__(self, body, client):
        ...         self.body, self.client, self.taken_bytes = body, client, 0
        >>> budget = SiteResponseBudget(max_bytes=4_000_000)  # 1,000,000 per client
        >>> cached = b"c" * 800_000
        >>> budget.hold(Answer(cached, "192.0.2.1"))
        >>> budget.hold(Answer(cached, "192.0.2.2"))  # one body, and two connections' copies
        >>> budget.held_bytes == 800_000 + 2 * COPIES_BYTES_PER_CONNECTION
        True
        >>> budget.held_by("192.0.2.1")
        800000
        >>> budget.can_send(b"d" * 800_000, "192.0.2.1")  # over that client's share
        False
        >>> budget.can_send(b"d" * 800_000, "192.0.2.3")
        True
    """

    def __init__(self, max_bytes: int, max_bytes_per_client: Optional[int] = None) -> None:
        self.max_bytes = max_bytes
        self.max_bytes_per_client = (
            max_bytes // CLIENT_SHARE_DIVISOR
            if max_bytes_per_client is None
            else max_bytes_per_client
        )
        self._all = _Holdings(max_bytes)
        self._clients: dict[str, _Holdings] = {}

    @property
    def held_bytes(self) -> int:
        """Answer bytes held for all clients together."""
        return self._all.budget.held_bytes

    def held_by(self, client: Optional[str]) -> int:
        """Answer bytes held for one client address."""
        holdings = self._clients.get(client) if client is not None else None
        return holdings.budget.held_bytes if holdings is not None else 0

    def can_send(self, body: bytes, client: Optional[str]) -> bool:
        """Whether one more answer sending ``body`` to ``client`` fits now."""
        if not self._all.fits(body):
            return False
        holdings = self._clients.get(client) if client is not None else None
        return holdings is None or holdings.fits(body)

    def hold(self, answer: HeldAnswer) -> None:
        """Count ``answer`` (its body and client) from now on."""
        self._all.add(answer)
        if answer.client is not None:
            holdings = self._clients.get(answer.client)
            if holdings is None:
                holdings = self._clients[answer.client] = _Holdings(self.max_bytes_per_client)
            holdings.add(answer)

    def taken(self, answer: HeldAnswer) -> None:
        """``answer``'s client has taken more of it."""
        self._all.changed(answer)
        holdings = self._clients.get(answer.client) if answer.client is not None else None
        if holdings is not None:
            holdings.changed(answer)

    def release(self, answer: HeldAnswer) -> None:
        """``answer`` is done (sent, or its connection gone): count it no more."""
        self._all.remove(answer)
        if answer.client is None:
            return
        holdings = self._clients.get(answer.client)
        if holdings is not None:
            holdings.remove(answer)
            if not holdings:
                del self._clients[answer.client]


def response_budget_of(request: Request) -> Optional[SiteResponseBudget]:
    """The budget of the site that received ``request``, if it has one.

    The standalone ``KeyServerSite`` has one; other sites (Synapse's, treq's test
    site) do not, and their big answers are still sent piece by piece.
    """
    site = getattr(request, "site", None)
    budget = getattr(site, "response_budget", None)
    return budget if isinstance(budget, SiteResponseBudget) else None


@implementer(IPushProducer)
class BodyProducer:
    """Writes one answer body to ``request`` in pieces, then finishes the request.

    The response headers (status, ``Content-Length``) must already be set. The body is
    sliced one piece at a time, so at most one piece is copied ahead of the client.

    Args:
        request: the request to answer.
        body: the whole answer body.
        budget: where the answer is counted until its client has taken it, or None.
        client: the client's address key (see
            :func:`~keyring_module.resources.per_address.client_key`), or None.
        chunk_bytes: the size of one piece.

    Example::

        request.setHeader(b"Content-Length", b"%d" % len(body))
        BodyProducer(request, body, response_budget_of(request), client).start()
        return NOT_DONE_YET
    """

    def __init__(
        self,
        request: Request,
        body: bytes,
        budget: Optional[SiteResponseBudget],
        client: Optional[str] = None,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        self._request = request
        self._body = body
        self._budget = budget
        self._client = client
        self._chunk_bytes = chunk_bytes
        self._written = 0  # bytes handed to the connection
        self._taken = 0  # bytes known to have left the connection's send buffer
        self._paused = False
        self._done = False

    @property
    def body(self) -> bytes:
        """The answer body (empty once done)."""
        return self._body

    @property
    def client(self) -> Optional[str]:
        """The client's address key."""
        return self._client

    @property
    def taken_bytes(self) -> int:
        """How much of the body the client has taken (from the send buffer)."""
        return self._taken

    def start(self) -> None:
        """Count the answer toward the budget and write as much as the connection takes."""
        if self._budget is not None:
            self._budget.hold(self)
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
        if upto > self._taken and not self._done:
            self._taken = upto
            if self._budget is not None:
                self._budget.taken(self)

    def _finished(self, result: Any) -> None:
        """The request finished or its connection was lost: release what is left."""
        if self._done:
            return
        self._done = True
        if self._budget is not None:
            self._budget.release(self)
        self._body = b""  # a connection that lingers keeps no answer alive
