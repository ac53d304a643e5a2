"""Shared fakes for the outbound HTTP tests: resolvers, SRV, well-known, TLS origins.

Nothing here performs a real DNS lookup; the TLS origin listens on 127.0.0.1 only.
"""

from typing import Any, Optional, Sequence, Union

import trustme
from twisted.internet import defer, ssl
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IListeningPort,
    IResolutionReceiver,
    IUDPTransport,
)
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.testing import MemoryReactorClock
from twisted.names import dns
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from keyring_module.http.ipfilter import FinishedResolution
from keyring_module.http.wellknown import FetchedResponse


@implementer(IHostnameResolver)
class FakeHostnameResolver:
    """Resolves names from a fixed table, synchronously; unknown names have no address."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.lookups: list[str] = []

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Optional[Sequence[type[IAddress]]] = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        self.lookups.append(hostName)
        resolution = FinishedResolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        for ip in self.table.get(hostName, ()):
            address: IAddress
            if ":" in ip:
                address = IPv6Address("TCP", ip, portNumber)
            else:
                address = IPv4Address("TCP", ip, portNumber)
            resolutionReceiver.addressResolved(address)
        resolutionReceiver.resolutionComplete()
        return resolution


@implementer(IListeningPort, IUDPTransport)
class MemoryDatagramPort:
    """The UDP port :class:`MemoryNetworkReactor` hands out: records what is sent."""

    def __init__(self, port: int, protocol: DatagramProtocol) -> None:
        self.port = port
        self.protocol = protocol
        self.sent: list[tuple[bytes, Optional[tuple[str, int]]]] = []
        self.listening = True
        self.connected_to: Optional[tuple[str, int]] = None
        self.broadcast_allowed = False

    def write(self, packet: bytes, addr: Optional[tuple[str, int]] = None) -> None:
        self.sent.append((packet, addr))

    def connect(self, host: str, port: int) -> None:
        self.connected_to = (host, port)

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", "127.0.0.1", self.port)

    def startListening(self) -> None:
        self.listening = True

    def stopListening(self) -> None:
        self.listening = False
        self.protocol.doStop()

    def setBroadcastAllowed(self, enabled: bool) -> None:
        self.broadcast_allowed = enabled

    def getBroadcastAllowed(self) -> bool:
        return self.broadcast_allowed


class MemoryNetworkReactor(MemoryReactorClock):
    """``MemoryReactorClock`` plus in-memory UDP, so it is a full ``NetworkReactor``.

    ``listenUDP`` opens no socket: it connects the protocol to a
    :class:`MemoryDatagramPort` (kept in ``udp_ports``) that records every datagram.
    """

    def __init__(self) -> None:
        super().__init__()
        self.udp_ports: list[MemoryDatagramPort] = []

    def listenUDP(
        self, port: int, protocol: DatagramProtocol, interface: str = "", maxPacketSize: int = 8192
    ) -> IListeningPort:
        udp_port = MemoryDatagramPort(port, protocol)
        self.udp_ports.append(udp_port)
        protocol.makeConnection(udp_port)
        return udp_port


SrvRecord = tuple[int, int, int, str]  # priority, weight, port, target


class FakeSrvResolver:
    """Answers SRV lookups from a table of ``name -> [(priority, weight, port, target)]``.

    Names not in the table fail with DNSNameError (NXDOMAIN); names in ``errors`` fail
    with that exception.
    """

    def __init__(
        self,
        records: Optional[dict[str, list[SrvRecord]]] = None,
        errors: Optional[dict[str, Exception]] = None,
    ) -> None:
        self.records = records or {}
        self.errors = errors or {}
        self.lookups: list[str] = []

    def lookupService(self, name: str, timeout: Any = None) -> "defer.Deferred[Any]":
        from twisted.names.error import DNSNameError

        self.lookups.append(name)
        if name in self.errors:
            return defer.fail(self.errors[name])
        if name not in self.records:
            return defer.fail(DNSNameError(name))
        answers = [
            dns.RRHeader(
                name=name,
                type=dns.SRV,
                payload=dns.Record_SRV(priority, weight, port, target.encode("ascii")),
            )
            for priority, weight, port, target in self.records[name]
        ]
        return defer.succeed((answers, [], []))


Answer = Union[FetchedResponse, Exception, "defer.Deferred[FetchedResponse]"]


class FakeWellKnownFetcher:
    """Serves canned answers per URL; unknown URLs answer 404."""

    def __init__(self, answers: Optional[dict[str, Answer]] = None) -> None:
        self.answers: dict[str, Answer] = answers or {}
        self.fetched: list[str] = []

    async def fetch(self, url: str, max_size: int) -> FetchedResponse:
        self.fetched.append(url)
        answer = self.answers.get(url, FetchedResponse(404, {}, b""))
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, defer.Deferred):
            return await answer
        return answer


def json_response(body: bytes, **headers: str) -> FetchedResponse:
    """A 200 answer with the given body and (lower-cased) headers."""
    return FetchedResponse(200, {k.replace("_", "-").lower(): v for k, v in headers.items()}, body)


class JsonResource(Resource):
    """Serves a fixed body (and content type) for every GET/POST path."""

    isLeaf = True

    def __init__(self, body: bytes, content_type: Optional[bytes] = b"application/json") -> None:
        super().__init__()
        self.body = body
        self.content_type = content_type
        self.requests: list[tuple[bytes, bytes, Optional[bytes]]] = []

    def render_GET(self, request: Request) -> bytes:
        host = request.getHeader(b"host")
        self.requests.append((request.method, request.uri, host))
        if self.content_type is not None:
            request.setHeader(b"Content-Type", self.content_type)
        return self.body

    render_POST = render_GET


def make_ca() -> trustme.CA:
    """A fresh test CA, created at test time."""
    return trustme.CA()


def write_ca_pem(ca: trustme.CA, path: str) -> str:
    """Write ``ca``'s certificate as a PEM file; returns the path."""
    with open(path, "wb") as f:
        f.write(ca.cert_pem.bytes())
    return path


def listen_tls(
    reactor: Any, ca: trustme.CA, resource: Resource, identities: Sequence[str]
) -> IListeningPort:
    """Serve ``resource`` over TLS on 127.0.0.1 (random port), cert for ``identities``."""
    server_cert = ca.issue_cert(*identities)
    pem = server_cert.private_key_and_cert_chain_pem.bytes()
    options = ssl.PrivateCertificate.loadPEM(pem).options()
    port: IListeningPort = reactor.listenSSL(0, Site(resource), options, interface="127.0.0.1")
    return port
