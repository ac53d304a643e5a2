"""The SSRF guard: which IP addresses an origin may make us connect to.

Two pieces:

* :class:`IPRangeFilter` answers "is this address denied?" from
  ``federation.ip_range_denylist`` minus ``federation.ip_range_allowlist``. IPv6 forms
  that carry an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, IPv4-translated
  ``::ffff:0:a.b.c.d``, IPv4-compatible, 6to4, NAT64 and Teredo) are also judged by the
  embedded IPv4 address.
* :class:`IPFilteringResolver` wraps a Twisted :class:`IHostnameResolver` and drops
  denied addresses from every resolution, and :class:`ResolverOverrideReactor` hands it
  to :class:`~twisted.internet.endpoints.HostnameEndpoint`, so a name that resolves only
  to denied addresses gets no connection attempt at all.

Example::

    from keyring_module.config import FederationConfig

    config = FederationConfig()
    ip_filter = IPRangeFilter(config.ip_range_denylist, config.ip_range_allowlist)
    ip_filter.is_denied("10.1.2.3")          # True: private
    ip_filter.is_denied("::ffff:127.0.0.1")  # True: IPv4-mapped loopback
    ip_filter.is_denied("93.184.215.14")     # False
"""

import ipaddress
import logging
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import attr
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IDelayedCall,
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
    IResolutionReceiver,
)
from twisted.internet.protocol import ClientFactory
from zope.interface import implementer

from keyring_module.clock import NetworkReactor

logger = logging.getLogger(__name__)

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_COMPAT = ipaddress.IPv6Network("::/96")
_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # SIIT (RFC 2765)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")


class _RangeTable:
    """Networks of one IP version, bucketed by prefix length for set lookups."""

    def __init__(self, bits: int, networks: Iterable[IPNetwork]) -> None:
        self._bits = bits
        buckets: dict[int, set[int]] = {}
        for net in networks:
            shift = bits - net.prefixlen
            buckets.setdefault(shift, set()).add(int(net.network_address) >> shift)
        # Few distinct prefix lengths, so a lookup costs a handful of set probes.
        self._buckets = tuple(sorted(buckets.items()))

    def contains(self, value: int) -> bool:
        return any((value >> shift) in prefixes for shift, prefixes in self._buckets)


class IPRangeFilter:
    """Decides whether an IP address is off limits for outbound connections.

    An address is denied when it lies in a denylist range and in no allowlist range.
    An IPv6 address that embeds an IPv4 address is denied when either the IPv6
    address or the embedded IPv4 address is; an IPv4-mapped address
    (``::ffff:a.b.c.d``) is judged exactly as its IPv4 address, since that is where
    the kernel connects. Anything that does not parse as an IP address is denied.

    Args:
        denylist: ranges to refuse (networks or strings like ``"10.0.0.0/8"``).
        allowlist: carve-outs from the denylist.

    Example::

        f = IPRangeFilter(["127.0.0.0/8", "::1/128"], allowlist=["127.0.0.1/32"])
        f.is_denied("127.0.0.1")   # False: allow-listed
        f.is_denied("127.0.0.2")   # True
        f.is_denied("not an ip")   # True
    """

    def __init__(
        self,
        denylist: Iterable[Union[IPNetwork, str]],
        allowlist: Iterable[Union[IPNetwork, str]] = (),
    ) -> None:
        deny = [_as_network(n) for n in denylist]
        allow = [_as_network(n) for n in allowlist]
        self._deny4 = _RangeTable(32, (n for n in deny if n.version == 4))
        self._deny6 = _RangeTable(128, (n for n in deny if n.version == 6))
        self._allow4 = _RangeTable(32, (n for n in allow if n.version == 4))
        self._allow6 = _RangeTable(128, (n for n in allow if n.version == 6))

    def is_denied(self, ip: str) -> bool:
        """Whether connecting to ``ip`` is forbidden.

        Args:
            ip: an IPv4 or IPv6 address as text (brackets and a ``%scope`` are allowed).

        Returns:
            True when the address is denied or is not a valid IP address.
        """
        address = parse_ip(ip)
        if address is None:
            return True
        return self.is_address_denied(address)

    def is_address_denied(self, address: IPAddress) -> bool:
        """Like :meth:`is_denied`, for an already parsed address."""
        if isinstance(address, ipaddress.IPv4Address):
            return self._v4_denied(int(address))
        value = int(address)
        if address in _MAPPED:
            return self._v4_denied(value & 0xFFFFFFFF)
        if self._deny6.contains(value) and not self._allow6.contains(value):
            return True
        return any(self._v4_denied(v4) for v4 in _embedded_ipv4(address))

    def _v4_denied(self, value: int) -> bool:
        return self._deny4.contains(value) and not self._allow4.contains(value)


def parse_ip(text: str) -> Optional[IPAddress]:
    """Parse an IP address, tolerating ``[v6]`` brackets; None when not an address."""
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _as_network(value: Union[IPNetwork, str]) -> IPNetwork:
    if isinstance(value, str):
        return ipaddress.ip_network(value, strict=False)
    return value


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[int]:
    """IPv4 addresses (as ints) that traffic to ``address`` may really reach."""
    value = int(address)
    found: list[int] = []
    if (address in _COMPAT and value > 1) or address in _TRANSLATED:
        found.append(value & 0xFFFFFFFF)
    if address.sixtofour is not None:
        found.append(int(address.sixtofour))
    if address in _NAT64 or address in _NAT64_LOCAL:
        found.append(value & 0xFFFFFFFF)
    if address in _NAT64_LOCAL:
        # RFC 6052 /48 layout: v4 bits at 48..63 and 72..87 (octet 64..71 is zero).
        found.append((((value >> 64) & 0xFFFF) << 16) | ((value >> 40) & 0xFFFF))
    if address.teredo is not None:
        found.append(int(address.teredo[1]))
    return found


@implementer(IHostResolution)
@attr.s(auto_attribs=True, slots=True)
class FinishedResolution:
    """A resolution that finished synchronously (IP literals; fake resolvers in tests)."""

    name: str

    def cancel(self) -> None:
        """Nothing to cancel: the resolution is already finished."""


@implementer(IResolutionReceiver)
class _FilteringReceiver:
    """Passes resolved addresses on to ``inner`` unless the filter denies them."""

    def __init__(
        self,
        inner: IResolutionReceiver,
        hostname: str,
        ip_filter: IPRangeFilter,
        on_denied: Optional[Callable[[str, str], None]],
    ) -> None:
        self._inner = inner
        self._hostname = hostname
        self._filter = ip_filter
        self._on_denied = on_denied

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        self._inner.resolutionBegan(resolutionInProgress)

    def addressResolved(self, address: IAddress) -> None:
        host = getattr(address, "host", None)
        if not isinstance(host, str) or self._filter.is_denied(host):
            logger.debug("Dropped denied address %s for %s", host, self._hostname)
            if self._on_denied is not None:
                self._on_denied(self._hostname, str(host))
            return
        self._inner.addressResolved(address)

    def resolutionComplete(self) -> None:
        self._inner.resolutionComplete()


@implementer(IHostnameResolver)
class IPFilteringResolver:
    """A hostname resolver that never yields a denied address.

    IP literals are checked directly (no lookup happens); names are resolved by
    ``inner`` and each resulting address is checked. Denied addresses are dropped and
    reported to ``on_denied(hostname, address)``, so a caller can tell "resolved only
    to denied addresses" apart from "did not resolve".

    Args:
        inner: the real resolver, usually ``reactor.nameResolver``.
        ip_filter: the range filter to apply.
        on_denied: optional callback for each dropped address.

    Example::

        dropped = []
        resolver = IPFilteringResolver(
            reactor.nameResolver, ip_filter, lambda name, ip: dropped.append(ip)
        )
        endpoint = HostnameEndpoint(
            ResolverOverrideReactor(reactor, resolver), "example.org", 8448
        )
    """

    def __init__(
        self,
        inner: IHostnameResolver,
        ip_filter: IPRangeFilter,
        on_denied: Optional[Callable[[str, str], None]] = None,
    ) -> None:
        self._inner = inner
        self._filter = ip_filter
        self._on_denied = on_denied

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Optional[Sequence[type[IAddress]]] = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        """Resolve ``hostName``, delivering only allowed addresses to the receiver."""
        literal = parse_ip(hostName)
        if literal is not None:
            return self._resolve_literal(
                resolutionReceiver, hostName, literal, portNumber, addressTypes
            )
        receiver = _FilteringReceiver(resolutionReceiver, hostName, self._filter, self._on_denied)
        return self._inner.resolveHostName(
            receiver, hostName, portNumber, addressTypes, transportSemantics
        )

    def _resolve_literal(
        self,
        receiver: IResolutionReceiver,
        host_name: str,
        literal: IPAddress,
        port: int,
        address_types: Optional[Sequence[type[IAddress]]],
    ) -> IHostResolution:
        resolution = FinishedResolution(host_name)
        receiver.resolutionBegan(resolution)
        if self._filter.is_address_denied(literal):
            logger.debug("Refused denied IP literal %s", host_name)
            if self._on_denied is not None:
                self._on_denied(host_name, str(literal))
        else:
            address: IAddress
            if isinstance(literal, ipaddress.IPv4Address):
                address = IPv4Address("TCP", str(literal), port)
            else:
                address = IPv6Address("TCP", str(literal), port)
            if address_types is None or type(address) in address_types:
                receiver.addressResolved(address)
        receiver.resolutionComplete()
        return resolution


@implementer(IReactorPluggableNameResolver)
class ResolverOverrideReactor:
    """A reactor view whose ``nameResolver`` is replaced; the rest delegates.

    ``HostnameEndpoint`` reads ``reactor.nameResolver``; giving it this view makes it
    resolve through an :class:`IPFilteringResolver` without touching the real reactor.
    The view offers what ``HostnameEndpoint`` uses: ``connectTCP`` and time.

    Args:
        reactor: the real reactor.
        resolver: the resolver ``HostnameEndpoint`` should use.
    """

    def __init__(self, reactor: NetworkReactor, resolver: IHostnameResolver) -> None:
        self._reactor = reactor
        self._resolver = resolver

    @property
    def nameResolver(self) -> IHostnameResolver:
        """The overriding resolver."""
        return self._resolver

    def installNameResolver(self, resolver: IHostnameResolver) -> IHostnameResolver:
        """Replace the resolver of this view only; returns the previous one."""
        previous, self._resolver = self._resolver, resolver
        return previous

    def connectTCP(
        self,
        host: str,
        port: int,
        factory: "ClientFactory[Any]",
        timeout: float = 30,
        bindAddress: Optional[tuple[str, int]] = None,
    ) -> IConnector:
        """Delegate to the real reactor."""
        return self._reactor.connectTCP(host, port, factory, timeout, bindAddress)

    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kw: object
    ) -> IDelayedCall:
        """Delegate to the real reactor."""
        return self._reactor.callLater(delay, callable, *args, **kw)

    def seconds(self) -> float:
        """Delegate to the real reactor."""
        return self._reactor.seconds()
