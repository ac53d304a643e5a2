"""Twisted's own log events for the standard ``logging`` module, its chatter at DEBUG.

Twisted logs at INFO whenever a port or a factory starts or stops: with every outbound
connection's factory (made quiet at the source in
:mod:`keyring_module.http.pool`), with every DNS query (each one opens and closes a
UDP port: ``DNSDatagramProtocol starting on 4623``, ``Starting protocol ...``,
``(UDP Port 4623 Closed)``, ``Stopping protocol ...``; and, when the resolver reads
``/etc/resolv.conf``, ``Resolver added ('192.0.2.53', 53) to server list``), with our
listeners, which we announce ourselves, and when a command's reactor stops
(``Main loop terminated.``). Those lines say nothing an operator can act on, so
:class:`ChatterDemotingObserver` passes them on at DEBUG; every other event keeps its
level.

Example::

    from twisted.logger import STDLibLogObserver, globalLogBeginner

    globalLogBeginner.beginLoggingTo([ChatterDemotingObserver(STDLibLogObserver())])
"""

import re
from typing import Callable

from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent
from zope.interface import implementer

#: Twisted's start/stop lines for factories, protocols and ports (a port's name may
#: hold spaces: ``KeyServerSite (TLS) starting on 8448``), the DNS resolver's notes on
#: reading ``/etc/resolv.conf``, and the reactor's ``Main loop terminated.`` when a
#: command ends.
CHATTER_RE = re.compile(
    r"(?:Starting|Stopping) (?:factory|protocol) "
    r"|.+? starting on \d+\Z"
    r"|\((?:UDP|TCP|TLS|SSL) Port \d+ Closed\)\Z"
    r"|Resolver added .+ to server list\Z"
    r"|.+ changed, reparsing\Z"
    r"|Main loop terminated\.\Z"
)


def is_chatter(event: LogEvent) -> bool:
    """Whether a Twisted log event is start/stop chatter (see the module docstring).

    Only events at INFO or below count: a warning or an error is never chatter.

    Example:
        >>> from twisted.logger import LogLevel
        >>> is_chatter({"log_format": "(UDP Port 4623 Closed)", "log_level": LogLevel.info})
        True
        >>> is_chatter({"log_format": "Fetched keys", "log_level": LogLevel.info})
        False
    """
    level = event.get("log_level", LogLevel.info)
    if level not in (LogLevel.debug, LogLevel.info):
        return False
    text = formatEvent(event)
    return CHATTER_RE.match(text) is not None


@implementer(ILogObserver)
class ChatterDemotingObserver:
    """Passes every event to ``observer``, chatter (:func:`is_chatter`) at DEBUG.

    Args:
        observer: where the events go, e.g. ``STDLibLogObserver()``.
    """

    def __init__(self, observer: Callable[[LogEvent], None]) -> None:
        self._observer = observer

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_level") is not LogLevel.debug and is_chatter(event):
            event = dict(event, log_level=LogLevel.debug)
        self._observer(event)
