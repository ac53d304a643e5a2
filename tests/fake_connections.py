"""In-memory inbound connections for ``KeyServerSite`` tests: a transport with a send
buffer that pushes back like a real one, and resources that answer with given bodies."""

from typing import Optional

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request

from keyring_module.config import InboundConfig
from keyring_module.resources._json import render_async, respond_json
from keyring_module.resources.site import KeyServerSite


class PushBackTransport(StringTransport):
    """A ``StringTransport`` whose send buffer holds ``buffer_bytes`` before it pauses
    its producer, as Twisted's TCP transport does; :meth:`read` is the client reading.

    Like a real transport, it resumes its producer only once its buffer is empty.
    """

    def __init__(self, peer: IPv4Address, buffer_bytes: int = 128 * 1024) -> None:
        super().__init__(peerAddress=peer, lenient=True)
        self.buffer_bytes = buffer_bytes
        self.received = b""  # what the client has read so far
        self.producer_paused = False

    def unread_bytes(self) -> int:
        """Bytes written and not read by the client yet."""
        return len(self.value())

    def write(self, data: bytes) -> None:
        super().write(data)
        self._push_back()

    def writeSequence(self, data: list[bytes]) -> None:  # type: ignore[override]
        super().writeSequence(data)
        self._push_back()

    def _push_back(self) -> None:
        if self.producer is not None and not self.producer_paused:
            if self.unread_bytes() > self.buffer_bytes:
                self.producer_paused = True
                self.producer.pauseProducing()

    def read(self) -> bytes:
        """The client reads everything buffered; a paused producer is resumed."""
        data: bytes = self.value()
        self.received += data
        self.clear()
        if self.producer_paused and self.producer is not None:
            self.producer_paused = False
            self.producer.resumeProducing()
        return data

    def read_all(self, limit: int = 10_000) -> bytes:
        """Read until nothing more is written (at most ``limit`` rounds)."""
        for _ in range(limit):
            if not self.read() and not self.producer_paused:
                break
        return self.received


class BodiesResource(Resource):
    """Answers ``GET /{name}`` with ``bodies[name]`` through ``respond_json``; the names
    in ``pending`` wait for their Deferred, through ``render_async``."""

    isLeaf = True

    def __init__(self, bodies: dict[bytes, bytes]) -> None:
        super().__init__()
        self.bodies = bodies
        self.pending: dict[bytes, "defer.Deferred[bytes]"] = {}
        self.rendered: list[Request] = []

    def render(self, request: Request) -> object:
        self.rendered.append(request)
        name = (request.postpath or [b""])[0]
        if name in self.pending:
            waiting = self.pending[name]

            async def later() -> tuple[int, bytes]:
                return 200, await waiting

            return render_async(request, later)
        return respond_json(request, 200, self.bodies[name])


def make_site(
    resource: Resource, clock: Optional[Clock] = None, **limits: int
) -> tuple[KeyServerSite, Clock]:
    """A ``KeyServerSite`` on a ``Clock`` with the given ``inbound`` limits."""
    clock = clock if clock is not None else Clock()
    site = KeyServerSite(
        resource, max_request_body=1024, inbound=InboundConfig(**limits), reactor=clock
    )
    return site, clock


def connect(
    site: KeyServerSite, host: str = "192.0.2.1", buffer_bytes: int = 128 * 1024
) -> tuple[Protocol, PushBackTransport]:
    """Build the site's protocol for a client at ``host`` and connect it in memory."""
    peer = IPv4Address("TCP", host, 40000)
    protocol = site.buildProtocol(peer)
    assert protocol is not None
    transport = PushBackTransport(peer, buffer_bytes)
    protocol.makeConnection(transport)
    return protocol, transport


def disconnect(protocol: Protocol) -> None:
    """The client has gone: the transport reports the connection lost."""
    protocol.connectionLost(Failure(ConnectionDone()))


def get(path: bytes) -> bytes:
    """The bytes of a keep-alive ``GET path``."""
    return b"GET %s HTTP/1.1\r\nHost: notary.test\r\n\r\n" % path
