"""Tests for keyring_module.http.ipfilter: the IP range guard and filtering resolver."""

import ipaddress
from typing import Optional

from twisted.internet import error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IAddress, IHostResolution, IResolutionReceiver
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from keyring_module.config import DEFAULT_IP_RANGE_DENYLIST
from keyring_module.http.ipfilter import (
    IPFilteringResolver,
    IPRangeFilter,
    ResolverOverrideReactor,
    parse_ip,
)
from tests.fake_reactors import MemoryNetworkReactor
from tests.tls_helpers import FakeHostnameResolver


def default_filter(allow: tuple[str, ...] = ()) -> IPRangeFilter:
    return IPRangeFilter(DEFAULT_IP_RANGE_DENYLIST, allow)


class IPRangeFilterTests(SynchronousTestCase):
    def test_default_denylist_denies_internal_ranges(self) -> None:
        """Loopback, private, CGNAT, link-local, ULA, multicast and unspecified are denied."""
        f = default_filter()
        for ip in (
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "ff02::1",
        ):
            self.assertTrue(f.is_denied(ip), ip)

    def test_public_addresses_are_allowed(self) -> None:
        """Ordinary public IPv4 and IPv6 addresses pass the default denylist."""
        f = default_filter()
        for ip in ("93.184.215.14", "8.8.8.8", "2606:4700::1111", "2a00:1450:4001::1"):
            self.assertFalse(f.is_denied(ip), ip)

    def test_allowlist_carves_out_of_denylist(self) -> None:
        """An allow-listed address inside a denied range is allowed; its neighbours are not."""
        f = default_filter(("127.0.0.1/32", "fd12:3456::/32"))
        self.assertFalse(f.is_denied("127.0.0.1"))
        self.assertTrue(f.is_denied("127.0.0.2"))
        self.assertFalse(f.is_denied("fd12:3456::7"))
        self.assertTrue(f.is_denied("fd12:3457::7"))

    def test_allowlist_alone_denies_nothing_extra(self) -> None:
        """An address in the allowlist but in no denied range is simply allowed."""
        f = IPRangeFilter(["10.0.0.0/8"], ["8.8.8.0/24"])
        self.assertFalse(f.is_denied("8.8.8.8"))
        self.assertFalse(f.is_denied("1.1.1.1"))

    def test_ipv4_mapped_ipv6_is_judged_as_ipv4(self) -> None:
        """``::ffff:a.b.c.d`` gets exactly the verdict of ``a.b.c.d``."""
        f = default_filter(("127.0.0.1/32",))
        self.assertTrue(f.is_denied("::ffff:10.0.0.1"))
        self.assertTrue(f.is_denied("::ffff:127.0.0.2"))
        self.assertFalse(f.is_denied("::ffff:127.0.0.1"))
        self.assertFalse(f.is_denied("::ffff:8.8.8.8"))

    def test_ipv4_mapped_caught_without_ipv6_ranges(self) -> None:
        """A denylist with only IPv4 ranges still catches their IPv4-mapped forms."""
        f = IPRangeFilter(["10.0.0.0/8"])
        self.assertTrue(f.is_denied("::ffff:10.9.9.9"))
        self.assertTrue(f.is_denied("::ffff:a09:909"))

    def test_6to4_embedded_ipv4_is_checked(self) -> None:
        """A 6to4 address is denied when the IPv4 address it embeds is denied."""
        f = IPRangeFilter(["10.0.0.0/8"])
        self.assertTrue(f.is_denied("2002:0a00:0001::1"))
        self.assertFalse(f.is_denied("2002:0808:0808::1"))

    def test_nat64_embedded_ipv4_is_checked(self) -> None:
        """NAT64 (64:ff9b::/96 and the /48 local-use prefix) embeddings are checked."""
        f = IPRangeFilter(["127.0.0.1/32"])
        self.assertTrue(f.is_denied("64:ff9b::127.0.0.1"))
        self.assertFalse(f.is_denied("64:ff9b::8.8.8.8"))
        self.assertTrue(f.is_denied("64:ff9b:1::7f00:1"))
        # RFC 6052 /48 layout: 7f00 at bits 48-63, u-octet, then 0001 at bits 72-87.
        self.assertTrue(f.is_denied("64:ff9b:1:7f00:0:100::"))
        self.assertFalse(f.is_denied("64:ff9b:1:7f00:0:200::"))

    def test_ipv4_compatible_and_teredo_embedded_ipv4_is_checked(self) -> None:
        """IPv4-compatible (``::a.b.c.d``) and Teredo client addresses are checked."""
        f = IPRangeFilter(["10.0.0.0/8"])
        self.assertTrue(f.is_denied("::10.0.0.1"))
        teredo_client_10 = ipaddress.IPv6Address(
            (0x20010000 << 96) | (0x01020304 << 64) | (~0x0A000001 & 0xFFFFFFFF)
        )
        self.assertEqual(teredo_client_10.teredo[1], ipaddress.IPv4Address("10.0.0.1"))  # type: ignore[index]
        self.assertTrue(f.is_denied(str(teredo_client_10)))

    def test_ipv4_translated_embedded_ipv4_is_checked(self) -> None:
        """IPv4-translated addresses (``::ffff:0:a.b.c.d``, SIIT) are judged by their IPv4
        address too, under the default denylist and an IPv4-only one."""
        for f in (default_filter(), IPRangeFilter(["127.0.0.0/8", "10.0.0.0/8"])):
            self.assertTrue(f.is_denied("::ffff:0:127.0.0.1"))
            self.assertTrue(f.is_denied("::ffff:0:10.1.2.3"))
            self.assertTrue(f.is_denied("0:0:0:0:ffff:0:7f00:1"))
            self.assertFalse(f.is_denied("::ffff:0:8.8.8.8"))

    def test_ipv6_form_itself_is_still_checked(self) -> None:
        """A 6to4 address is denied by the IPv6 denylist even if its IPv4 part is fine."""
        f = default_filter()
        self.assertTrue(f.is_denied("2002:0808:0808::1"))

    def test_unparsable_is_denied(self) -> None:
        """Anything that is not an IP address is denied."""
        f = IPRangeFilter([])
        for value in ("", "example.org", "1.2.3", "1.2.3.256", "::g", "[::1"):
            self.assertTrue(f.is_denied(value), value)

    def test_brackets_and_scope_are_tolerated(self) -> None:
        """Bracketed IPv6 and a ``%scope`` suffix parse and are judged normally."""
        f = default_filter()
        self.assertTrue(f.is_denied("[::1]"))
        self.assertTrue(f.is_denied("fe80::1%eth0"))
        self.assertFalse(f.is_denied("[2606:4700::1111]"))
        self.assertIsNone(parse_ip("not-an-ip"))

    def test_accepts_network_objects(self) -> None:
        """Networks from the parsed config work as well as strings."""
        f = IPRangeFilter(
            [ipaddress.ip_network("192.0.2.0/24")], [ipaddress.ip_network("192.0.2.7/32")]
        )
        self.assertTrue(f.is_denied("192.0.2.1"))
        self.assertFalse(f.is_denied("192.0.2.7"))


@implementer(IResolutionReceiver)
class RecordingReceiver:
    def __init__(self) -> None:
        self.addresses: list[IAddress] = []
        self.began = False
        self.completed = False

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        self.began = True

    def addressResolved(self, address: IAddress) -> None:
        self.addresses.append(address)

    def resolutionComplete(self) -> None:
        self.completed = True


class IPFilteringResolverTests(SynchronousTestCase):
    def make(
        self, table: dict[str, list[str]], allow: tuple[str, ...] = ()
    ) -> tuple[IPFilteringResolver, FakeHostnameResolver, list[tuple[str, str]]]:
        inner = FakeHostnameResolver(table)
        dropped: list[tuple[str, str]] = []
        resolver = IPFilteringResolver(
            inner, default_filter(allow), lambda name, ip: dropped.append((name, ip))
        )
        return resolver, inner, dropped

    def test_drops_denied_addresses(self) -> None:
        """Only allowed addresses reach the receiver; dropped ones are reported."""
        resolver, _inner, dropped = self.make({"mixed.test": ["10.0.0.1", "93.184.215.14"]})
        receiver = RecordingReceiver()
        resolver.resolveHostName(receiver, "mixed.test", 8448)
        self.assertTrue(receiver.began and receiver.completed)
        self.assertEqual(receiver.addresses, [IPv4Address("TCP", "93.184.215.14", 8448)])
        self.assertEqual(dropped, [("mixed.test", "10.0.0.1")])

    def test_mapped_address_from_dns_is_dropped(self) -> None:
        """A name resolving to an IPv4-mapped loopback address yields nothing."""
        resolver, _inner, dropped = self.make({"sneaky.test": ["::ffff:127.0.0.1"]})
        receiver = RecordingReceiver()
        resolver.resolveHostName(receiver, "sneaky.test", 443)
        self.assertEqual(receiver.addresses, [])
        self.assertEqual(len(dropped), 1)

    def test_ip_literals_are_checked_without_lookup(self) -> None:
        """IP literals never reach the inner resolver, and denied ones are dropped."""
        resolver, inner, dropped = self.make({})
        denied, allowed, v6 = RecordingReceiver(), RecordingReceiver(), RecordingReceiver()
        resolver.resolveHostName(denied, "10.0.0.1", 80)
        resolver.resolveHostName(allowed, "93.184.215.14", 80)
        resolver.resolveHostName(v6, "2606:4700::1111", 443)
        self.assertEqual(inner.lookups, [])
        self.assertEqual(denied.addresses, [])
        self.assertTrue(denied.completed)
        self.assertEqual(dropped, [("10.0.0.1", "10.0.0.1")])
        self.assertEqual(allowed.addresses, [IPv4Address("TCP", "93.184.215.14", 80)])
        self.assertEqual(v6.addresses, [IPv6Address("TCP", "2606:4700::1111", 443)])

    def test_allowlisted_literal_passes(self) -> None:
        """An allow-listed loopback literal is delivered."""
        resolver, _inner, _dropped = self.make({}, allow=("127.0.0.1/32",))
        receiver = RecordingReceiver()
        resolver.resolveHostName(receiver, "127.0.0.1", 8443)
        self.assertEqual(receiver.addresses, [IPv4Address("TCP", "127.0.0.1", 8443)])

    def test_hostname_endpoint_makes_no_connection_to_denied_names(self) -> None:
        """Through ResolverOverrideReactor, HostnameEndpoint never calls connectTCP."""
        reactor = MemoryNetworkReactor()
        resolver, _inner, dropped = self.make({"internal.test": ["10.0.0.1", "192.168.0.1"]})
        endpoint = HostnameEndpoint(
            ResolverOverrideReactor(reactor, resolver), "internal.test", 8448
        )
        d = endpoint.connect(Factory.forProtocol(Protocol))
        self.failureResultOf(d, error.DNSLookupError)
        self.assertEqual(reactor.tcpClients, [])
        self.assertEqual(len(dropped), 2)

    def test_hostname_endpoint_connects_to_allowed_only(self) -> None:
        """Of a mixed resolution, only the allowed address gets a connection attempt."""
        reactor = MemoryNetworkReactor()
        resolver, _inner, _dropped = self.make({"mixed.test": ["10.0.0.1", "93.184.215.14"]})
        view = ResolverOverrideReactor(reactor, resolver)
        endpoint = HostnameEndpoint(view, "mixed.test", 8448)
        d: Optional[object] = endpoint.connect(Factory.forProtocol(Protocol))
        self.assertNoResult(d)  # type: ignore[arg-type]
        reactor.advance(1)
        self.assertEqual([(h, p) for h, p, *_ in reactor.tcpClients], [("93.184.215.14", 8448)])
        self.assertIs(view.nameResolver, resolver)
        self.assertEqual(view.seconds(), reactor.seconds())
