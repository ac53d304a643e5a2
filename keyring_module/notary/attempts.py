"""When the notary last tried to fetch each network target, so that dead origins take
their turn behind the others.

A query may fetch at most ``notary.max_fetches_per_request`` servers
(:mod:`~keyring_module.notary.plan`). Were the servers needing a fetch taken in the
query's order alone, a batch repeated an hour later (after the per-origin limiter has
forgotten their failures) would spend its budget on the same dead origins every time,
and live servers sorting after them would never be fetched. So the plan takes servers
never tried first, then the least recently tried.

:class:`FetchAttempts` remembers the last :data:`MAX_REMEMBERED_TARGETS` network
targets (:func:`~keyring_module.servername.network_target`: one entry per host and
port, whatever the spelling) in a least-recently-*tried* order of fixed size. An entry
is a hash of the target and a time (about 150 bytes in all), so a peer naming
millions of servers moves old entries out and holds no more::

    >>> attempts = FetchAttempts(max_entries=2)
    >>> attempts.tried(["a.example", "B.example."], now_ms=1000)
    >>> attempts.last_tried_ms("b.example"), attempts.last_tried_ms("c.example")
    (1000, None)
    >>> attempts.tried(["c.example"], now_ms=2000)  # "a.example", tried first, goes
    >>> attempts.last_tried_ms("a.example"), len(attempts)
    (None, 2)
"""

import re
from collections import OrderedDict
from typing import Iterable, Optional

from keyring_module.servername import network_target

__all__ = ["MAX_REMEMBERED_TARGETS", "FetchAttempts", "target_key"]

#: How many network targets :class:`FetchAttempts` remembers by default: ten times the
#: servers of one of Synapse's biggest batches, in about 15 MB.
MAX_REMEMBERED_TARGETS = 100_000
#: Names that are their own network target: a lower-case hostname (its last label not
#: all digits, so not an IPv4 address) with no trailing dot, and an optional port
#: without leading zeros. Checking this costs a tenth of :func:`network_target`, and
#: it holds for nearly every name of a batch.
_OWN_TARGET_RE = re.compile(r"(?:[a-z0-9-]+\.)*[a-z0-9-]*[a-z-][a-z0-9-]*(?::[1-9][0-9]{0,4})?")


def target_key(server_name: str) -> int:
    """What :class:`FetchAttempts` remembers ``server_name`` under: a hash of its
    network target (one per host and port, whatever the spelling).

    Example:
        >>> target_key("Matrix.Example.org.") == target_key("matrix.example.org")
        True
        >>> target_key("matrix.example.org") == target_key("matrix.example.org:8448")
        False
    """
    if _OWN_TARGET_RE.fullmatch(server_name):
        return hash(server_name)
    return hash(network_target(server_name))


class FetchAttempts:
    """The last time each recently tried network target was fetched for a query.

    Args:
        max_entries: how many targets are remembered; trying one more forgets the one
            tried longest ago.
    """

    def __init__(self, max_entries: int = MAX_REMEMBERED_TARGETS) -> None:
        self._max_entries = max(1, max_entries)
        # hash(network target) -> when it was last tried (ms); oldest first.
        self._last_tried: OrderedDict[int, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._last_tried)

    def last_tried_ms(self, server_name: str) -> Optional[int]:
        """When ``server_name``'s network target was last tried; None if not lately."""
        return self._last_tried.get(target_key(server_name))

    def tried(self, server_names: Iterable[str], now_ms: int) -> None:
        """Remember that ``server_names`` are being fetched now."""
        last_tried = self._last_tried
        for server_name in server_names:
            key = target_key(server_name)
            last_tried[key] = now_ms
            last_tried.move_to_end(key)
        while len(last_tried) > self._max_entries:
            last_tried.popitem(last=False)
