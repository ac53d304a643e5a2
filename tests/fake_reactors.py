"""In-memory reactors for wiring and network tests: no socket, thread or timer is real."""

from typing import Any, Callable, Optional

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IListeningPort, IUDPTransport
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer


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


class FakeReactor(MemoryNetworkReactor):
    """A ``MemoryReactorClock`` that is a whole
    :class:`~keyring_module.clock.KeyringReactor`: calls "from a thread" run at once.

    For wiring tests whose store and federation client are fakes, so that no thread,
    socket or listener is ever used.
    """

    def callFromThread(self, callable: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        callable(*args, **kwargs)
