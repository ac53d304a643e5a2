"""Long loops on the reactor thread that let the reactor run every so many items.

A notary answer may name 10,000 servers; reading, planning and answering each takes
microseconds, but all of them in one go hold the reactor for a tenth of a second or
more, and every other request and timer waits. So such loops work through their items
in slices of :data:`ITEMS_PER_SLICE` and, between two slices, give the reactor one turn
(:func:`pause`: a zero-delay call, after which the loop goes on). A loop of at most one
slice never pauses, so small answers cost no extra reactor turn.

On a fake clock (``Clock``, ``MemoryReactorClock``) a pause ends at the next
``advance(0)``, which also runs every pause scheduled while it runs, so one
``advance(0)`` finishes a whole paced loop::

    for first, last in slices(len(servers)):
        if first:
            await pause(clock)
        for server in servers[first:last]:
            ...
"""

from typing import Iterator, cast

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime

from keyring_module.clock import ReactorClock

__all__ = ["COSTLY_ITEMS_PER_SLICE", "ITEMS_PER_SLICE", "pause", "slices"]

#: Items handled between two reactor turns: a few milliseconds of work for the loops
#: that use it (reading, planning or answering a server takes 5 to 20 µs; of a slice's
#: co-signing, at most :data:`~keyring_module.notary.caches.INLINE_ROUND_BYTES` of small
#: responses is signed on the reactor thread, the rest in worker jobs).
ITEMS_PER_SLICE = 256
#: Items handled between two reactor turns by loops whose items may each start a
#: database read or a co-signing (a few hundred microseconds each on the reactor
#: thread, with what their results cost when they come back).
COSTLY_ITEMS_PER_SLICE = 64


def slices(count: int, size: int = ITEMS_PER_SLICE) -> Iterator[tuple[int, int]]:
    """The ``(first, last)`` index ranges that split ``count`` items into slices.

    Example:
        >>> list(slices(5, size=2))
        [(0, 2), (2, 4), (4, 5)]
        >>> list(slices(0))
        []
    """
    for first in range(0, count, size):
        yield first, min(first + size, count)


def pause(clock: ReactorClock) -> "defer.Deferred[None]":
    """A Deferred that fires on the reactor's next turn, after what is due now has run.

    Example::

        await pause(reactor)  # other requests and timers run here
    """
    return task.deferLater(cast(IReactorTime, clock), 0, lambda: None)
