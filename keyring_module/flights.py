"""Single flight: one fetch in flight per key, shared by everyone who asks meanwhile.

A :class:`Flight` runs its fetch once it holds a slot of each :class:`FetchSlots` it
needs (a global cap, a per-server cap), and hands its result or failure to every
caller that joined it. Each caller gets its own Deferred, so cancelling one caller
never cancels the shared fetch for the others; once every caller of a flight still
waiting for a slot has gone, the flight leaves the queue without fetching::

    flight = Flight()
    waiter = flight.join()
    flight.start(fetch, [global_slots]).addBoth(finish)   # finish calls flight.deliver
    result = await waiter

Both limiters start their flights through
:func:`~keyring_module.ratelimit.start_flight`, which does this for them.

This is the first level, within one process. Processes sharing one database add a
second for origin fetches: the one flight of each process that fetches goes through
the store's shared flight (:mod:`~keyring_module.shared_flights`).
"""

from typing import Awaitable, Callable, Sequence, TypeVar, Union

from twisted.internet import defer
from twisted.python.failure import Failure

from keyring_module.fetch_slots import FetchSlots

T = TypeVar("T")


class Flight:
    """One fetch in flight, and the Deferreds of everyone waiting for it.

    Attributes:
        started: whether the fetch itself was called (it held every slot).
    """

    def __init__(self) -> None:
        self.waiters: list["defer.Deferred[object]"] = []
        self.started = False
        self._running: "defer.Deferred[object] | None" = None

    def join(self) -> "defer.Deferred[object]":
        """A Deferred for this caller: fires with the shared result or failure."""
        waiter: "defer.Deferred[object]" = defer.Deferred(self._cancel_waiter)
        self.waiters.append(waiter)
        return waiter

    def start(
        self, fetch: Callable[[], Awaitable[T]], slots: Sequence[FetchSlots] = ()
    ) -> "defer.Deferred[T]":
        """Take a slot of each of ``slots`` in order (waiting in their queues), then
        call ``fetch``; the slots are given back when it is done.

        Returns:
            The fetch's outcome (cancelled if everyone stopped waiting before it began).
        """

        held: list[FetchSlots] = []

        async def run() -> T:
            for group in slots:
                await group.acquire()
                held.append(group)
            self.started = True
            return await fetch()

        def release(outcome: object) -> object:
            # A callback, not a ``finally``: a coroutine closed by the garbage collector
            # must not hand slots on (that would resume other collected coroutines).
            for group in reversed(held):
                group.release()
            return outcome

        running: "defer.Deferred[T]" = defer.ensureDeferred(run())
        running.addBoth(release)
        if not running.called:
            self._running = running  # type: ignore[assignment]
        return running

    def _cancel_waiter(self, waiter: "defer.Deferred[object]") -> None:
        # Only this caller stops waiting; the shared fetch goes on for the others, and
        # for nobody only if it has not begun.
        if waiter in self.waiters:
            self.waiters.remove(waiter)
        if not self.waiters and not self.started and self._running is not None:
            self._running.cancel()

    def deliver(self, result: Union[object, Failure]) -> None:
        """Hand the outcome to everyone waiting."""
        self._running = None
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
