"""Ports that need privilege to listen on, and what to say when listening fails.

On Linux a port below ``net.ipv4.ip_unprivileged_port_start`` (1024 by default) needs
root or the ``CAP_NET_BIND_SERVICE`` capability (systemd:
``AmbientCapabilities=CAP_NET_BIND_SERVICE``). ``check-config`` warns about such a port
when the user running it lacks both, without failing: the service may be given the
capability by its unit, which ``sudo -u`` does not show. ``serve`` explains a listen
failure by its cause::

    >>> import errno
    >>> listen_failure_hint(errno.EADDRINUSE, 8448, 1024)
    ' (is another server running?)'
    >>> listen_failure_hint(errno.EACCES, 443, 1024)
    ' (ports below 1024 need root or CAP_NET_BIND_SERVICE)'
    >>> listen_failure_hint(errno.EADDRNOTAVAIL, 8448, 1024)
    ''
"""

import errno
import os
from typing import Optional

#: Where Linux says which ports anyone may listen on.
UNPRIVILEGED_PORT_START_PATH = "/proc/sys/net/ipv4/ip_unprivileged_port_start"
#: The capability bit that allows listening on any port (``CAP_NET_BIND_SERVICE``).
CAP_NET_BIND_SERVICE = 10


def unprivileged_port_start() -> int:
    """The lowest port anyone may listen on here (1024 when the system does not say)."""
    try:
        with open(UNPRIVILEGED_PORT_START_PATH, encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return 1024


def may_bind_privileged_ports() -> bool:
    """Whether this process may listen on ports below :func:`unprivileged_port_start`:
    it holds ``CAP_NET_BIND_SERVICE`` (root does), or, where capabilities cannot be
    read, it runs as root."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_BIND_SERVICE & 1)
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        pass
    return os.geteuid() == 0


def privileged_port_warning(port: int, start: int, may_bind: bool) -> Optional[str]:
    """The warning for listening on ``port``, or None.

    Example:
        >>> privileged_port_warning(443, 1024, may_bind=False)
        'port 443 is below 1024: serve needs root or CAP_NET_BIND_SERVICE to listen on it'
        >>> privileged_port_warning(443, 1024, may_bind=True) is None
        True
        >>> privileged_port_warning(0, 1024, may_bind=False) is None
        True
    """
    if port == 0 or port >= start or may_bind:
        return None
    return "port %d is below %d: serve needs root or CAP_NET_BIND_SERVICE to listen on it" % (
        port,
        start,
    )


def listen_failure_hint(error_number: Optional[int], port: int, start: int) -> str:
    """What to add after a listen failure's reason: its likely cause, or nothing."""
    if error_number == errno.EADDRINUSE:
        return " (is another server running?)"
    if error_number == errno.EACCES and 0 < port < start:
        return " (ports below %d need root or CAP_NET_BIND_SERVICE)" % (start,)
    return ""
