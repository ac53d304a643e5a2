"""A cap on concurrent work with a bounded first-in, first-out queue behind it.

The limiters use one :class:`FetchSlots` for all outbound fetches together
(``federation.max_concurrent_fetches``) and one per upstream notary
(``ratelimit.notary_max_concurrent``)::

    slots = FetchSlots(limit=256)
    if not slots.has_room():
        ...                       # refuse at once: the queue is full too
    await slots.acquire()         # at once while a slot is free, else in FIFO order
    try:
        ...                       # the fetch
    finally:
        slots.release()

A caller that stops waiting (its Deferred is cancelled) leaves the queue and takes no
slot. The queue holds at most :data:`QUEUE_PER_SLOT` times as many waiters as there
are slots unless told otherwise: with every slot held by a fetch that times out, a
longer queue would only hold callers that give up before their turn.
"""

from collections import deque

from twisted.internet import defer

#: The queue bound of a :class:`FetchSlots`, per slot, unless one is given.
QUEUE_PER_SLOT = 4


class NoFetchSlotError(Exception):
    """Every slot is taken and the queue is full."""


class FetchSlots:
    """At most ``limit`` holders at once; up to ``max_waiting`` more wait in order.

    Args:
        limit: how many may hold a slot at once (at least 1).
        max_waiting: how many may wait; ``QUEUE_PER_SLOT * limit`` by default.

    Example:
        >>> slots = FetchSlots(limit=1, max_waiting=1)
        >>> first, second = slots.acquire(), slots.acquire()
        >>> first.called, second.called, slots.has_room()
        (True, False, False)
        >>> slots.release()
        >>> second.called, slots.in_use, slots.waiting
        (True, 1, 0)
    """

    def __init__(self, limit: int, max_waiting: "int | None" = None) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1, got %d" % limit)
        self.limit = limit
        self.max_waiting = QUEUE_PER_SLOT * limit if max_waiting is None else max_waiting
        self.in_use = 0
        self._queue: "deque[defer.Deferred[None]]" = deque()
        # Releases not handed on yet: a waiter whose work ends at once releases from
        # inside release(); a loop, not recursion, hands those on.
        self._releases = 0
        self._releasing = False

    @property
    def waiting(self) -> int:
        """How many callers wait for a slot."""
        return len(self._queue)

    def has_room(self) -> bool:
        """Whether :meth:`acquire` would give a slot or a place in the queue."""
        return self.in_use < self.limit or len(self._queue) < self.max_waiting

    def acquire(self) -> "defer.Deferred[None]":
        """A slot: fires at once while one is free, otherwise when it is this caller's
        turn. Cancelling the Deferred leaves the queue.

        Raises:
            NoFetchSlotError: every slot is taken and the queue is full.
        """
        if self.in_use < self.limit:
            self.in_use += 1
            return defer.succeed(None)
        if len(self._queue) >= self.max_waiting:
            raise NoFetchSlotError(
                "all %d slots are taken and %d callers wait" % (self.limit, len(self._queue))
            )
        waiter: "defer.Deferred[None]" = defer.Deferred(self._leave_queue)
        self._queue.append(waiter)
        return waiter

    def release(self) -> None:
        """Give a held slot back: to the first waiter, if any."""
        self._releases += 1
        if self._releasing:
            return
        self._releasing = True
        try:
            while self._releases:
                self._releases -= 1
                if self._queue:
                    self._queue.popleft().callback(None)  # the slot passes on
                else:
                    self.in_use = max(0, self.in_use - 1)
        finally:
            self._releasing = False

    def _leave_queue(self, waiter: "defer.Deferred[None]") -> None:
        try:
            self._queue.remove(waiter)
        except ValueError:
            pass
