"""Matrix server discovery: from a server name to where and how to connect.

Implements "Resolving server names" of the server-server API:

1. IP literal: that IP, the given port or 8448; ``Host`` is the server name, the
   certificate must be valid for the IP.
2. Hostname with an explicit port: that host and port; ``Host`` is the server name,
   the certificate must be valid for the hostname.
3. ``https://<hostname>/.well-known/matrix/server`` names ``<delegated>[:<port>]``:
   an IP literal or an explicit port is used as is (``Host`` = the delegated name,
   certificate for the delegated host); otherwise SRV ``_matrix-fed._tcp.<delegated>``,
   then the deprecated ``_matrix._tcp.<delegated>``, else ``<delegated>:8448``, with
   ``Host`` and certificate = the delegated hostname.
4. SRV ``_matrix-fed._tcp.<hostname>``, then ``_matrix._tcp.<hostname>``.
5. ``<hostname>:8448``.

Example::

    resolver = ServerResolver(well_known, srv_resolver)
    resolved = await resolver.resolve("example.org")
    # ResolvedServer(host_header="example.org", tls_server_name="example.org",
    #                targets=(("matrix.example.org", 443),))
"""

import logging
import random
from typing import Any, Optional, Protocol

import attr
from twisted.internet import defer
from twisted.names import dns
from twisted.names import error as dns_error

from keyring_module.clock import NetworkReactor
from keyring_module.http import ConnectError, InvalidServerNameError
from keyring_module.http.wellknown import WellKnownLookup
from keyring_module.quoting import quote_untrusted
from keyring_module.servername import DEFAULT_FEDERATION_PORT, ParsedServerName, parse_server_name

logger = logging.getLogger(__name__)

SRV_SERVICES = ("_matrix-fed._tcp", "_matrix._tcp")
RESOLV_CONF_PATH = "/etc/resolv.conf"


@attr.s(auto_attribs=True, frozen=True, slots=True)
class ResolvedServer:
    """Where to send a federation request, and how to address it.

    Attributes:
        host_header: value of the ``Host`` header (``example.org``,
            ``example.org:8449``, ``[::1]:8448``).
        tls_server_name: SNI and certificate name: a DNS name or a bare IP.
        targets: ``(host, port)`` pairs to try in order; ``host`` is a DNS name or a
            bare IP (IPv6 without brackets).
    """

    host_header: str
    tls_server_name: str
    targets: tuple[tuple[str, int], ...]


class SrvResolver(Protocol):
    """The part of a ``twisted.names`` resolver used here."""

    def lookupService(self, name: str, timeout: Any = None) -> "defer.Deferred[Any]":
        """SRV lookup; fires with ``(answers, authority, additional)``."""
        ...


class LazySrvResolver:
    """A ``twisted.names`` DNS resolver on the given reactor, created on the first lookup.

    Creating a Twisted resolver reads ``/etc/resolv.conf`` and schedules re-reads on
    the reactor; doing it lazily keeps constructing the federation client free of
    side effects. Its queries go out through ``reactor.listenUDP`` (and
    ``connectTCP`` for truncated answers); without a ``resolv.conf`` it asks
    127.0.0.1, as Twisted does.

    Args:
        reactor: the reactor the resolver will use.
    """

    def __init__(self, reactor: NetworkReactor) -> None:
        self._reactor = reactor
        self._resolver: Optional[SrvResolver] = None

    @property
    def created(self) -> bool:
        """Whether the real resolver exists yet."""
        return self._resolver is not None

    def lookupService(self, name: str, timeout: Any = None) -> "defer.Deferred[Any]":
        """Create the real resolver if needed, then look up SRV records for ``name``."""
        if self._resolver is None:
            from twisted.names import client

            # Not client.createResolver(): that one runs on the global reactor.
            self._resolver = client.Resolver(resolv=RESOLV_CONF_PATH, reactor=self._reactor)
        return self._resolver.lookupService(name, timeout)


@attr.s(auto_attribs=True, frozen=True, slots=True)
class SrvTarget:
    """One SRV answer."""

    host: str
    port: int
    priority: int
    weight: int


def order_srv_targets(records: list[SrvTarget], rng: random.Random) -> list[tuple[str, int]]:
    """Order SRV records by priority, weighted-randomly within a priority (RFC 2782).

    Args:
        records: the SRV answers.
        rng: source of randomness (injectable for tests).

    Returns:
        ``(host, port)`` pairs, in the order to try them.
    """
    ordered: list[tuple[str, int]] = []
    for priority in sorted({r.priority for r in records}):
        # Zero-weight records first, as RFC 2782 asks, so they get a small chance.
        group = sorted((r for r in records if r.priority == priority), key=lambda r: r.weight)
        while group:
            total = sum(r.weight for r in group)
            pick = rng.randint(0, total) if total else 0
            running = 0
            chosen = group[-1]
            for record in group:
                running += record.weight
                if running >= pick:
                    chosen = record
                    break
            group.remove(chosen)
            ordered.append((chosen.host, chosen.port))
    return ordered


class ServerResolver:
    """Resolves Matrix server names per the specification.

    Args:
        well_known: the cached ``.well-known`` lookup.
        srv_resolver: SRV lookups (a ``twisted.names`` resolver or a fake).
        rng: randomness for SRV weights; ``random.Random()`` by default.

    Example::

        resolved = await ServerResolver(well_known, srv).resolve("example.org:8449")
        assert resolved.targets == (("example.org", 8449),)
    """

    def __init__(
        self,
        well_known: WellKnownLookup,
        srv_resolver: SrvResolver,
        rng: Optional[random.Random] = None,
    ) -> None:
        self._well_known = well_known
        self._srv = srv_resolver
        self._rng = rng or random.Random()

    async def resolve(self, server_name: str) -> ResolvedServer:
        """Work out targets, ``Host`` header and certificate name for ``server_name``.

        Raises:
            InvalidServerNameError: ``server_name`` is not a valid server name.
            ConnectError: SRV explicitly says the service is unavailable (target ".").
        """
        parsed = parse_server_name(server_name)
        if parsed is None:
            raise InvalidServerNameError("invalid server name %s" % quote_untrusted(server_name))
        host_header = _host_and_port(parsed)
        if parsed.is_ip_literal or parsed.port is not None:  # steps 1 and 2
            target = (parsed.host, parsed.port or DEFAULT_FEDERATION_PORT)
            return ResolvedServer(host_header, parsed.host, (target,))

        delegated_name = await self._well_known.get_delegated_server(parsed.host)
        if delegated_name is not None:
            delegated = parse_server_name(delegated_name)
            if delegated is not None:
                logger.debug("%s delegates to %s", server_name, delegated_name)
                return await self._resolve_delegated(delegated)
        return await self._resolve_by_srv(parsed.host)  # steps 4 and 5

    async def _resolve_delegated(self, delegated: ParsedServerName) -> ResolvedServer:
        if delegated.is_ip_literal or delegated.port is not None:  # steps 3.1, 3.2
            target = (delegated.host, delegated.port or DEFAULT_FEDERATION_PORT)
            return ResolvedServer(_host_and_port(delegated), delegated.host, (target,))
        return await self._resolve_by_srv(delegated.host)  # steps 3.3 to 3.5

    async def _resolve_by_srv(self, hostname: str) -> ResolvedServer:
        for service in SRV_SERVICES:
            targets = await self._lookup_srv("%s.%s" % (service, hostname))
            if targets:
                return ResolvedServer(hostname, hostname, tuple(targets))
        return ResolvedServer(hostname, hostname, ((hostname, DEFAULT_FEDERATION_PORT),))

    async def _lookup_srv(self, name: str) -> list[tuple[str, int]]:
        """SRV targets for ``name``, ordered; [] when there are none or DNS fails."""
        try:
            answers, _authority, _additional = await self._srv.lookupService(name)
        except defer.CancelledError:
            raise
        except dns_error.DNSNameError:
            return []
        except Exception as e:
            logger.debug("SRV lookup for %s failed: %r", name, e)
            return []

        records: list[SrvTarget] = []
        for answer in answers:
            if answer.type != dns.SRV or answer.payload is None:
                continue
            payload = answer.payload
            target = payload.target.name.decode("ascii", "replace").rstrip(".")
            records.append(SrvTarget(target, payload.port, payload.priority, payload.weight))
        if len(records) == 1 and not records[0].host:
            raise ConnectError("SRV %s says the service is not available" % (name,))
        records = [r for r in records if _is_srv_target(r.host, name)]
        ordered = order_srv_targets(records, self._rng)
        logger.debug("SRV %s -> %s", name, ordered)
        return ordered


def _is_srv_target(host: str, srv_name: str) -> bool:
    """Whether an SRV target may be connected to: a hostname (or IPv4 address) by the
    server name rules; anything else from DNS is dropped, never resolved."""
    parsed = parse_server_name(host)
    if parsed is not None and parsed.port is None and not host.startswith("["):
        return True
    if host:
        logger.debug("SRV %s: dropped invalid target %s", srv_name, quote_untrusted(host))
    return False


def _host_and_port(parsed: ParsedServerName) -> str:
    """The server name as a ``Host`` header value (IPv6 bracketed, port if given)."""
    host = "[%s]" % parsed.host if ":" in parsed.host else parsed.host
    return host if parsed.port is None else "%s:%d" % (host, parsed.port)
