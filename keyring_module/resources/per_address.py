"""A cap on concurrent connections per client address (``inbound.max_connections_per_address``),
and whose share of the notary's fetches a request takes (:func:`fetch_client_of`).

A client is its IPv4 address, or its IPv6 /64 (one host usually has a whole /64, so
counting single IPv6 addresses would cap nothing). IPv4-mapped IPv6 addresses count as
their IPv4 address. A connection over the cap is accepted and dropped at once by
:class:`RefusedConnection`, which works the same under TLS (a factory may not refuse a
TLS connection by returning None).

Example::

    >>> from twisted.internet.address import IPv4Address
    >>> cap = ConnectionsPerAddress(max_per_address=2)
    >>> key = client_key(IPv4Address("TCP", "192.0.2.7", 40000))
    >>> cap.try_open(key), cap.try_open(key), cap.try_open(key)
    (True, True, False)
    >>> cap.close(key)
    >>> cap.try_open(key)
    True
"""

import ipaddress
import logging
from typing import Optional

from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Protocol
from twisted.web.server import Request

from keyring_module.clock import SecondsClock

logger = logging.getLogger(__name__)

#: At most one log line about refused connections per this many seconds.
REFUSAL_LOG_INTERVAL_SECONDS = 60.0


def client_key(address: Optional[IAddress]) -> Optional[str]:
    """What connections are counted under: an IPv4 address or an IPv6 /64.

    Returns None for addresses without a host (e.g. UNIX sockets), which are not capped.

    Example::

        >>> from twisted.internet.address import IPv6Address
        >>> client_key(IPv6Address("TCP", "2001:db8:1:2:aaaa::1", 443))
        '2001:db8:1:2::/64'
        >>> client_key(IPv6Address("TCP", "::ffff:192.0.2.7", 443))
        '192.0.2.7'
    """
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return None
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def fetch_client_of(request: Request) -> Optional[str]:
    """Whose share of the notary's fetches a request's queries take (see
    :mod:`~keyring_module.notary.client_budget`): its :func:`client_key`, or None (not
    bounded) when clients cannot be told apart: a site counting no connections per
    address (``inbound.max_connections_per_address: 0``, as behind a reverse proxy), or
    an address without a host. Inside Synapse, the address is the one Synapse gives
    the request.
    """
    connections = getattr(getattr(request, "site", None), "connections", None)
    if isinstance(connections, ConnectionsPerAddress) and connections.max_per_address == 0:
        return None
    return client_key(request.getClientAddress())


class ConnectionsPerAddress:
    """Counts open connections per client key, up to ``max_per_address`` (0: no cap).

    Args:
        max_per_address: connections one client may have open at once; 0 for no cap.
        clock: for rate-limiting the log line about refusals (None: log each one).
    """

    def __init__(self, max_per_address: int, clock: Optional[SecondsClock] = None) -> None:
        self.max_per_address = max_per_address
        self._clock = clock
        self._open: dict[str, int] = {}
        self._refused_since_log = 0
        self._last_log_seconds: Optional[float] = None

    def open_count(self, key: Optional[str]) -> int:
        """How many connections ``key`` has open."""
        return self._open.get(key, 0) if key is not None else 0

    def try_open(self, key: Optional[str]) -> bool:
        """Count one more connection for ``key``, unless it is at the cap (False)."""
        if key is None or self.max_per_address == 0:
            return True
        count = self._open.get(key, 0)
        if count >= self.max_per_address:
            self._log_refusal(key)
            return False
        self._open[key] = count + 1
        return True

    def close(self, key: Optional[str]) -> None:
        """One connection of ``key`` has closed."""
        if key is None or key not in self._open:
            return
        count = self._open[key] - 1
        if count > 0:
            self._open[key] = count
        else:
            del self._open[key]

    def _log_refusal(self, key: str) -> None:
        self._refused_since_log += 1
        now = self._clock.seconds() if self._clock is not None else None
        last = self._last_log_seconds
        if now is not None and last is not None and now - last < REFUSAL_LOG_INTERVAL_SECONDS:
            return
        logger.warning(
            "Refused %d connection(s) over inbound.max_connections_per_address (%d), "
            "the last from %s",
            self._refused_since_log,
            self.max_per_address,
            key,
        )
        self._refused_since_log = 0
        self._last_log_seconds = now


class RefusedConnection(Protocol):
    """A connection over the cap: dropped as soon as it is made, before any byte is read."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.abortConnection()  # type: ignore[attr-defined]
