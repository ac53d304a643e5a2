"""Matrix server name grammar: ``hostname [":" port]``, IPv4, or ``[IPv6]``, ASCII only.

Examples of valid names: ``example.org``, ``example.org:8448``, ``1.2.3.4:8449``,
``[::1]:8448``, ``xn--bcher-kva.example``. Used to refuse bad names before any fetch,
any DNS lookup and any log line.

The rules (the specification's grammar, held strictly, since names come from anyone):

* only ASCII: digits are ``0-9`` (never other Unicode digits), every pattern is anchored
  with ``\\Z`` (``$`` would also match before a trailing newline);
* a port is 1 to 5 digits, 1..65535;
* an IPv4 literal is four decimal numbers 0..255 without leading zeros (``010.0.0.1``
  could mean 8.0.0.1 to a system resolver);
* an IPv6 literal is in brackets, made of hex digits, ``:`` and ``.`` only (no
  ``%scope``), and is a valid address;
* a hostname is at most 255 characters of dot-separated labels of letters, digits and
  inner hyphens, at most 63 each, with an optional trailing dot; its last label is not
  all digits (``1.2.3.999`` is no hostname); a label starting with ``xn--`` must be a
  valid IDNA A-label.

:func:`network_target` maps the spellings of one host to one string (the key of the
per-origin limiter), so case or spelling variants of a name count as one origin.
"""

import functools
import ipaddress
import re
from typing import Optional

import attr
import idna

MAX_SERVER_NAME_LENGTH = 255

#: The port an IP literal without one means (a hostname without one is delegated).
DEFAULT_FEDERATION_PORT = 8448

_PORT_RE = re.compile(r"[0-9]{1,5}\Z")
_IPV4_RE = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}\Z")
_IPV6_RE = re.compile(r"[0-9A-Fa-f:.]{2,45}\Z")
_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\Z")
_DIGITS_RE = re.compile(r"[0-9]+\Z")
_IDNA_PREFIX = "xn--"


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
    """Split and validate a server name; None when it is not a valid one.

    Example:
        >>> parse_server_name("[::1]:8448")
        ParsedServerName(host='::1', port=8448, is_ip_literal=True)
        >>> parse_server_name("example.org:\u0668\u0664\u0664\u0668") is None
        True
    """
    if not isinstance(name, str) or not 0 < len(name) <= MAX_SERVER_NAME_LENGTH:
        return None
    if not name.isascii():
        return None
    if name.startswith("["):
        end = name.find("]")
        if end < 0:
            return None
        host, rest = name[1:end], name[end + 1 :]
        if not _is_ipv6(host):
            return None
        port: Optional[int] = None
        if rest:
            if not rest.startswith(":"):
                return None
            port = _parse_port(rest[1:])
            if port is None:
                return None
        return ParsedServerName(host=host, port=port, is_ip_literal=True)

    host, sep, port_text = name.partition(":")
    port = None
    if sep:
        port = _parse_port(port_text)
        if port is None:
            return None
    if _IPV4_RE.match(host):
        return (
            ParsedServerName(host=host, port=port, is_ip_literal=True) if _is_ipv4(host) else None
        )
    if not is_valid_hostname(host):
        return None
    return ParsedServerName(host=host, port=port, is_ip_literal=False)


def is_valid_server_name(name: str) -> bool:
    """True for ``example.org``, ``example.org:8448``, ``1.2.3.4``, ``[::1]:8448``.

    Names repeat a lot (every event, every notary query), so verdicts are memoised in a
    bounded cache; over-long names are refused before they could fill it.

    Example:
        >>> is_valid_server_name("example.org:8448"), is_valid_server_name("example.org\\n")
        (True, False)
    """
    if not isinstance(name, str) or len(name) > MAX_SERVER_NAME_LENGTH:
        return False
    return _cached_is_valid(name)


def is_valid_hostname(host: str) -> bool:
    """Whether ``host`` is a DNS hostname by the rules above (no port, no IP literal).

    Example:
        >>> is_valid_hostname("matrix.example.org."), is_valid_hostname("xn--zz.example")
        (True, False)
    """
    if not isinstance(host, str) or not 0 < len(host) <= MAX_SERVER_NAME_LENGTH:
        return False
    if not host.isascii():
        return False
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if not all(_LABEL_RE.match(label) for label in labels):
        return False
    if _DIGITS_RE.match(labels[-1]):
        return False  # dotted numbers are IP addresses (or tricks), never hostnames
    return all(_is_idna_label(label) for label in labels)


def network_target(name: str) -> str:
    """The network target a server name points at, one spelling per host and port.

    The host is lower-cased and loses a trailing dot, the port is written without
    leading zeros, and an IP literal is written in its canonical (compressed) form. An
    IP literal always means one address and port (no delegation), so it gets its
    default port 8448 written out, and an IPv4-mapped IPv6 literal is that IPv4
    address. A hostname without a port stays distinct from the same host with
    ``:8448``: only the former is delegated (``.well-known``, SRV), so the two may
    reach different servers. A name that is not a valid server name is returned as it
    is. Keys are still stored under the exact name: this only says which names reach
    the same server.

    Example:
        >>> network_target("Matrix.Example.ORG.:08448")
        'matrix.example.org:8448'
        >>> network_target("matrix.example.org")  # delegated: not the same as :8448
        'matrix.example.org'
        >>> network_target("1.2.3.4"), network_target("[0:0::1]"), network_target("[::1]:8448")
        ('1.2.3.4:8448', '[::1]:8448', '[::1]:8448')
        >>> network_target("[::ffff:1.2.3.4]")
        '1.2.3.4:8448'
        >>> network_target("not a name")
        'not a name'
    """
    parsed = parse_server_name(name) if isinstance(name, str) else None
    if parsed is None:
        return name
    if not parsed.is_ip_literal:
        host = parsed.host.lower().rstrip(".")
        return host if parsed.port is None else "%s:%d" % (host, parsed.port)
    address = ipaddress.ip_address(parsed.host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    host = "[%s]" % (address.compressed,) if address.version == 6 else address.compressed
    port = DEFAULT_FEDERATION_PORT if parsed.port is None else parsed.port
    return "%s:%d" % (host, port)


@functools.lru_cache(maxsize=16384)
def _cached_is_valid(name: str) -> bool:
    return parse_server_name(name) is not None


def _parse_port(text: str) -> Optional[int]:
    if not _PORT_RE.match(text):
        return None
    port = int(text)
    return port if 0 < port <= 65535 else None


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)  # refuses parts over 255 and leading zeros
    except ValueError:
        return False
    return True


def _is_ipv6(host: str) -> bool:
    if not _IPV6_RE.match(host):
        return False
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def _is_idna_label(label: str) -> bool:
    """A label is fine unless it claims to be an A-label (``xn--``) and is not a valid
    one: it must decode to a valid IDNA 2008 U-label that encodes back to it."""
    if not label[:4].lower() == _IDNA_PREFIX:
        return True
    try:
        return idna.alabel(idna.ulabel(label)).decode("ascii") == label.lower()
    except (idna.IDNAError, UnicodeError, ValueError):
        return False
