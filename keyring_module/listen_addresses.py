"""Which listen addresses clash on one port, as Linux binds them.

Two sockets cannot listen on the same port when their addresses overlap, not only
when they are equal: ``0.0.0.0`` takes every IPv4 address, so ``127.0.0.1`` on the
same port fails with "Address already in use"; ``::`` takes every IPv6 address and,
while ``net.ipv6.bindv6only`` is 0 (Linux's default), every IPv4 address as well, so
``["0.0.0.0", "::"]`` fails there too (``["::"]`` alone listens on both)::

    >>> clash_reason("127.0.0.1", "0.0.0.0", dual_stack=True)
    '0.0.0.0 is every IPv4 address'
    >>> clash_reason("0.0.0.0", "::", dual_stack=True)
    ':: is every IPv4 address too while net.ipv6.bindv6only is 0; list only "::"'
    >>> clash_reason("0.0.0.0", "::", dual_stack=False) is None
    True
    >>> clash_reason("::1", "0:0:0:0:0:0:0:1", dual_stack=False)
    'the same address'
"""

import ipaddress
from typing import Optional, Union

#: The kernel setting that says whether an IPv6 wildcard socket also takes IPv4.
BINDV6ONLY_PATH = "/proc/sys/net/ipv6/bindv6only"

_IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def ipv6_dual_stack() -> bool:
    """Whether a socket listening on ``::`` also takes IPv4 here: ``bindv6only`` is 0,
    or cannot be read (then assume it does, the safe answer for a clash check)."""
    try:
        with open(BINDV6ONLY_PATH, encoding="ascii") as f:
            return f.read().strip() == "0"
    except (OSError, UnicodeDecodeError):
        return True


def _parse(address: str) -> Optional[_IPAddress]:
    try:
        return ipaddress.ip_address(address)
    except ValueError:
        return None


def clash_reason(address: str, other: str, dual_stack: bool) -> Optional[str]:
    """Why listening on ``address`` and ``other`` at one port fails, or None.

    Args:
        address: one listen address (an IP literal; any other string only clashes
            with itself).
        other: the other.
        dual_stack: whether ``::`` also takes IPv4 (:func:`ipv6_dual_stack`).
    """
    if address == other:
        return "the same address"
    a, b = _parse(address), _parse(other)
    if a is None or b is None:
        return None
    if a == b:
        return "the same address"
    for wildcard, specific in ((a, b), (b, a)):
        if not wildcard.is_unspecified:
            continue
        if wildcard.version == specific.version:
            return "%s is every IPv%d address" % (wildcard, wildcard.version)
        if wildcard.version == 6 and dual_stack:
            if specific.is_unspecified:
                return ':: is every IPv4 address too while net.ipv6.bindv6only is 0; list only "::"'
            return ":: is every IPv4 address too while net.ipv6.bindv6only is 0"
    return None
