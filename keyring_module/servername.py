"""Matrix server name grammar: ``hostname [":" port]``, IPv4, or ``[IPv6]``.

Examples of valid names: ``example.org``, ``example.org:8448``, ``1.2.3.4:8449``,
``[::1]:8448``. Used to refuse bad names before any fetch.
"""

import functools
import ipaddress
import re
from typing import Optional

import attr

MAX_SERVER_NAME_LENGTH = 255

_DNS_NAME_RE = re.compile(r"^[A-Za-z0-9\-.]{1,255}$")
_LABEL_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?$")


@attr.s(auto_attribs=True, frozen=True, slots=True)
class ParsedServerName:
    """A server name split into host and optional port.

    ``host`` keeps IPv6 literals without brackets; ``is_ip_literal`` says whether it is
    an IP address rather than a DNS name.
    """

    host: str
    port: Optional[int]
    is_ip_literal: bool


def parse_server_name(name: str) -> Optional[ParsedServerName]:
    """Split and validate a server name; None when it is not a valid one."""
    if not isinstance(name, str) or not 0 < len(name) <= MAX_SERVER_NAME_LENGTH:
        return None
    port: Optional[int] = None
    if name.startswith("["):
        end = name.find("]")
        if end < 0:
            return None
        host, rest = name[1:end], name[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
        if rest:
            if not rest.startswith(":"):
                return None
            port = _parse_port(rest[1:])
            if port is None:
                return None
        return ParsedServerName(host=host, port=port, is_ip_literal=True)

    host, sep, port_text = name.partition(":")
    if sep:
        port = _parse_port(port_text)
        if port is None:
            return None
    if _is_ipv4(host):
        return ParsedServerName(host=host, port=port, is_ip_literal=True)
    if not _DNS_NAME_RE.match(host):
        return None
    labels = host.rstrip(".").split(".") if host != "." else []
    if not labels or not all(_LABEL_RE.match(label) for label in labels):
        return None
    return ParsedServerName(host=host, port=port, is_ip_literal=False)


def is_valid_server_name(name: str) -> bool:
    """True for ``example.org``, ``example.org:8448``, ``1.2.3.4``, ``[::1]:8448``.

    Names repeat a lot (every event, every notary query), so verdicts are memoised in a
    bounded cache; over-long names are refused before they could fill it.
    """
    if not isinstance(name, str) or len(name) > MAX_SERVER_NAME_LENGTH:
        return False
    return _cached_is_valid(name)


@functools.lru_cache(maxsize=16384)
def _cached_is_valid(name: str) -> bool:
    return parse_server_name(name) is not None


def _parse_port(text: str) -> Optional[int]:
    if not text.isdigit() or len(text) > 5:
        return None
    port = int(text)
    return port if 0 < port <= 65535 else None


def _is_ipv4(host: str) -> bool:
    parts = host.split(".")
    if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 for p in parts):
        return False
    return all(int(p) <= 255 for p in parts)
