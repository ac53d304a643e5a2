"""The per-client-address connection cap of the standalone site."""

import logging

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.resources.channel import GuardedHTTPChannel
from keyring_module.resources.per_address import (
    ConnectionsPerAddress,
    RefusedConnection,
    client_key,
)
from tests.fake_connections import BodiesResource, connect, disconnect, get, make_site


class ClientKeyTests(SynchronousTestCase):
    def test_keys(self) -> None:
        """IPv4 counts per address, IPv6 per /64, IPv4-mapped as IPv4, sockets uncapped."""
        cases = {
            IPv4Address("TCP", "198.51.100.7", 1): "198.51.100.7",
            IPv6Address("TCP", "2001:db8:0:1::5", 1): "2001:db8:0:1::/64",
            IPv6Address("TCP", "2001:db8:0:1:ffff::9", 1): "2001:db8:0:1::/64",
            IPv6Address("TCP", "2001:db8:0:2::5", 1): "2001:db8:0:2::/64",
            IPv6Address("TCP", "fe80::1%eth0", 1): "fe80::/64",
            IPv6Address("TCP", "::ffff:198.51.100.7", 1): "198.51.100.7",
        }
        for address, expected in cases.items():
            self.assertEqual(client_key(address), expected, address)
        self.assertIsNone(client_key(UNIXAddress(b"/run/keyring.sock")))
        self.assertIsNone(client_key(None))


class ConnectionsPerAddressTests(SynchronousTestCase):
    def test_zero_means_no_cap(self) -> None:
        """With max 0 every connection is accepted."""
        cap = ConnectionsPerAddress(0)
        self.assertTrue(all(cap.try_open("192.0.2.1") for _ in range(1000)))

    def test_refusals_are_logged_at_most_once_a_minute(self) -> None:
        """Refusals are summed into one WARNING per minute, naming the setting."""
        clock = Clock()
        cap = ConnectionsPerAddress(1, clock)
        cap.try_open("192.0.2.1")
        with self.assertLogs("keyring_module.resources.per_address", logging.WARNING) as logs:
            for _ in range(5):
                cap.try_open("192.0.2.1")
            clock.advance(60)
            cap.try_open("192.0.2.1")
        self.assertEqual(len(logs.records), 2)
        self.assertIn(
            "Refused 1 connection(s) over inbound.max_connections_per_address (1)", logs.output[0]
        )
        self.assertIn("Refused 5 connection(s)", logs.output[1])


class SiteConnectionCapTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.resource = BodiesResource({b"small": b"{}"})
        self.site, self.clock = make_site(self.resource, max_connections_per_address=3)

    def test_connection_over_the_cap_is_dropped_and_a_closed_one_frees_a_place(self) -> None:
        """The fourth connection from one address is dropped unread; after one closes, one more is served."""
        connections = [connect(self.site, host="192.0.2.1") for _ in range(3)]
        for channel, _ in connections:
            self.assertIsInstance(channel, GuardedHTTPChannel)
        with self.assertLogs("keyring_module.resources.per_address", logging.WARNING):
            refused, transport = connect(self.site, host="192.0.2.1")
        self.assertIsInstance(refused, RefusedConnection)
        self.assertTrue(transport.disconnected)

        # Other addresses are not affected.
        other, other_transport = connect(self.site, host="192.0.2.2")
        other.dataReceived(get(b"/small"))
        self.assertIn(b"200 OK", other_transport.read())

        disconnect(connections[0][0])
        channel, transport = connect(self.site, host="192.0.2.1")
        channel.dataReceived(get(b"/small"))
        self.assertIn(b"200 OK", transport.read())
        self.assertEqual(self.site.connections.open_count("192.0.2.1"), 3)

    def test_ipv6_clients_are_capped_per_64(self) -> None:
        """Different addresses in one IPv6 /64 share one cap."""
        for i in range(3):
            protocol = self.site.buildProtocol(IPv6Address("TCP", "2001:db8::%x" % (i + 1), 1))
            self.assertIsInstance(protocol, GuardedHTTPChannel)
        with self.assertLogs("keyring_module.resources.per_address", logging.WARNING):
            protocol = self.site.buildProtocol(IPv6Address("TCP", "2001:db8::ff", 1))
        self.assertIsInstance(protocol, RefusedConnection)
        protocol = self.site.buildProtocol(IPv6Address("TCP", "2001:db8:0:1::1", 1))
        self.assertIsInstance(protocol, GuardedHTTPChannel)

    def test_drop_connections_closes_every_open_connection(self) -> None:
        """At shutdown every open connection is dropped and the Deferred fires once all are gone."""
        connections = [connect(self.site, host="192.0.2.%d" % i) for i in range(1, 4)]
        d = self.site.drop_connections()
        self.assertTrue(all(t.disconnected for _, t in connections))
        self.assertNoResult(d)
        for channel, _ in connections:
            disconnect(channel)
        self.successResultOf(d)
        self.assertEqual(self.site.connections.open_count("192.0.2.1"), 0)
        self.successResultOf(self.site.drop_connections())
