"""Telling what is built on a store's reads which servers' keys a write changed.

A store counts its writes (``write_generation``); something built on its reads (the
notary's whole answers) compares that count to know whether it may be out of date. A
store that also tells *which* server each write was about lets it drop only what
involved that server: :class:`WriteNews` calls its listeners once per counted write,
with the server's name and the new count, or with None when any server's keys may have
changed (news from other processes may have been missed).

Example:
    >>> news = WriteNews()
    >>> told = []
    >>> news.add(lambda name, generation: told.append((name, generation)))
    >>> news.tell("example.org", 1); news.tell(None, 2)
    >>> told
    [('example.org', 1), (None, 2)]
"""

import logging
from typing import Callable, Optional, Protocol, runtime_checkable

logger = logging.getLogger(__name__)

#: Told of one write: the server whose keys changed (None: maybe any server's), and
#: the store's ``write_generation`` counting it (one more than the write before).
WriteListener = Callable[[Optional[str], int], None]


@runtime_checkable
class TellsWrites(Protocol):
    """A store that tells listeners which server each of its writes was about."""

    def add_write_listener(self, listener: WriteListener) -> None:
        """Call ``listener`` at each write, once the write is counted."""
        ...


class WriteNews:
    """The listeners of one store's writes.

    A listener that raises is logged and the others are still told; it then sees the
    next write's generation jump by more than one, which tells it that a write went
    unheard (it should then assume that anything changed).
    """

    def __init__(self) -> None:
        self._listeners: list[WriteListener] = []

    def add(self, listener: WriteListener) -> None:
        """Tell ``listener`` of every write from now on."""
        self._listeners.append(listener)

    def tell(self, server_name: Optional[str], generation: int) -> None:
        """Tell every listener that ``server_name``'s keys changed (None: any server's)
        in the write counted as ``generation``."""
        for listener in self._listeners:
            try:
                listener(server_name, generation)
            except Exception:
                logger.exception("A listener of key writes failed (write of %s)", server_name)
