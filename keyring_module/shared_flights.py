"""One flight per server name across the processes sharing one database.

The in-process single flight (:mod:`~keyring_module.flights`, run by the per-origin
limiter) is the first level: one fetch per name in each process. Its fetch goes through
:meth:`SharedFlights.run`, the second level: of the processes sharing the database,
the one holding the name's lease (:class:`~keyring_module.storage.coordination.Coordination`)
fetches and writes the outcome; the others wait for that outcome (woken by the
database's news, or looking again on a timer) and use it as if they had fetched::

    flights = SharedFlights(coordination, reactor)
    response = await flights.run("example.org", fetch, codec)  # codec: OutcomeCodec

In order, a flight:

1. uses an outcome **another** process wrote for the name at most
   :data:`REUSE_ELSEWHERE_MS` before this flight began (its answer is as fresh as a
   fetch now would be: the caller's store lookup may have missed it by moments). Its
   own process's outcomes are never reused, so one process asking an origin again
   (a refresh, a higher minimum) fetches again, as it would alone. An answer too big
   for its outcome is read from the store once the other process has stored it:
   until then the flight waits for news (the store's write), looking again at least
   every :data:`STORED_RETRY_MS`;
2. otherwise tries to take the lease; holding it, it looks at the outcome once more
   (a flight may have ended just before), then fetches, renewing the lease meanwhile,
   and writes the outcome for the others (what :class:`OutcomeCodec` makes of the
   answer or the error; None shares nothing);
3. otherwise waits, until the name's flight ends elsewhere (news), or its holder's
   lease may have run out (the wait the lease attempt named), then starts over;
4. after waiting for twice ``lease_ms`` in all (a holder alive but stuck, or an answer
   that never reached the store), or when the database cannot be used for this,
   fetches without the lease: a fetch too many is better than none.

A failure elsewhere is raised here as :meth:`OutcomeCodec.error` rebuilds it (an
unreachable origin is unreachable for every process, and is backed off as such).
"""

import logging
from typing import Awaitable, Callable, Optional, Protocol, TypeVar, cast

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime

from keyring_module.clock import ReactorClock, now_ms
from keyring_module.storage.coordination import Coordination, FlightOutcome, LeaseAttempt
from keyring_module.storage.errors import StorageError

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: How old an outcome written by another process may be (before this flight began) and
#: still be used instead of fetching (ms).
REUSE_ELSEWHERE_MS = 2000
#: How often a flight looks for an answer another process is storing, without news (ms).
STORED_RETRY_MS = 500


class OutcomeCodec(Protocol[T]):
    """How a flight's answer and errors are written for, and read by, other processes."""

    def encode(self, result: T, finished_ts: int, holder_id: str) -> FlightOutcome:
        """The outcome of a successful fetch."""
        ...

    def encode_error(
        self, error: BaseException, finished_ts: int, holder_id: str
    ) -> Optional[FlightOutcome]:
        """The outcome of a failed fetch (None: not worth sharing, e.g. a bug here)."""
        ...

    async def decode(self, outcome: FlightOutcome) -> T:
        """The answer a successful outcome holds.

        Raises:
            Exception: the outcome's error, rebuilt (for a failed outcome), or why the
                stored answer is not usable.
        """
        ...


class SharedFlights:
    """Runs fetches so that one process of those sharing the database fetches a name
    at a time, and the others use its outcome.

    Args:
        coordination: the store's coordination (its ``shared`` must be True).
        clock: for the lease renewals, the waits and the outcomes' times.
        reuse_elsewhere_ms: see :data:`REUSE_ELSEWHERE_MS`.

    Attributes:
        fetched: flights this process fetched for (holding the lease, or without it).
        shared: flights answered by another process's outcome.
    """

    def __init__(
        self,
        coordination: Coordination,
        clock: ReactorClock,
        *,
        reuse_elsewhere_ms: int = REUSE_ELSEWHERE_MS,
    ) -> None:
        self._coordination = coordination
        self._clock = clock
        self._reuse_ms = reuse_elsewhere_ms
        self.fetched = 0
        self.shared = 0

    async def run(
        self, server_name: str, fetch: Callable[[], Awaitable[T]], codec: OutcomeCodec[T]
    ) -> T:
        """Fetch ``server_name`` once for all processes sharing the database.

        Args:
            server_name: the flight's name (the lease's and the outcome's key).
            fetch: the fetch itself, called at most once.
            codec: how its outcome is written for the others and theirs read here.

        Returns:
            The answer: this process's fetch, or another process's outcome.

        Raises:
            Exception: what the fetch raised, or the other process's failure.
        """
        coordination = self._coordination
        began_ts = now_ms(self._clock)
        give_up_ts = began_ts + 2 * coordination.lease_ms
        while True:
            news = coordination.watch(server_name)  # before looking: no news is missed
            try:
                outcome = await coordination.read_outcome(server_name)
                if self._usable(outcome, began_ts):
                    assert outcome is not None
                    if not outcome.awaits_store:
                        news.cancel()
                        return await self._use(server_name, outcome, codec)
                    # Its answer is not in the store yet: wait for that write.
                    attempt, waited_for = (
                        LeaseAttempt(False, STORED_RETRY_MS),
                        "another process to store its answer",
                    )
                else:
                    attempt, waited_for = (
                        await coordination.try_acquire(server_name),
                        "another process's flight",
                    )
            except StorageError as e:
                news.cancel()
                logger.warning(
                    "Fetching %s without a shared flight (the database failed: %s)",
                    server_name,
                    e,
                )
                return await self._fetch(fetch)
            if attempt.acquired:
                news.cancel()
                return await self._hold(server_name, fetch, codec, began_ts)
            now = now_ms(self._clock)
            if now >= give_up_ts:
                news.cancel()
                logger.warning(
                    "Fetching %s without a shared flight: waited %d ms for %s",
                    server_name,
                    now - began_ts,
                    waited_for,
                )
                return await self._fetch(fetch)
            await _first_of(news, self._clock, min(attempt.retry_ms, give_up_ts - now))

    def _usable(self, outcome: Optional[FlightOutcome], began_ts: int) -> bool:
        return (
            outcome is not None
            and outcome.finished_by != self._coordination.holder_id
            and outcome.finished_ts >= began_ts - self._reuse_ms
        )

    async def _use(self, server_name: str, outcome: FlightOutcome, codec: OutcomeCodec[T]) -> T:
        self.shared += 1
        logger.debug("Using another process's %s fetch of %s", outcome.outcome, server_name)
        return await codec.decode(outcome)

    async def _fetch(self, fetch: Callable[[], Awaitable[T]]) -> T:
        self.fetched += 1
        return await fetch()

    async def _hold(
        self,
        server_name: str,
        fetch: Callable[[], Awaitable[T]],
        codec: OutcomeCodec[T],
        began_ts: int,
    ) -> T:
        """Holding the lease: fetch (unless an outcome just came), share the outcome."""
        coordination = self._coordination
        outcome: Optional[FlightOutcome] = None
        try:
            try:
                found = await coordination.read_outcome(server_name)
            except StorageError:
                found = None  # fetch: the lease is held, the outcome will be written
            if self._usable(found, began_ts):
                assert found is not None
                if not found.awaits_store:
                    return await self._use(server_name, found, codec)
            renewals = task.LoopingCall(self._renew, server_name)
            renewals.clock = cast(IReactorTime, self._clock)  # Clock and the reactor provide it
            renewals.start(max(coordination.lease_ms / 3000, 0.1), now=False)
            try:
                result = await self._fetch(fetch)
            except Exception as e:
                outcome = codec.encode_error(e, now_ms(self._clock), coordination.holder_id)
                raise
            finally:
                renewals.stop()
            outcome = codec.encode(result, now_ms(self._clock), coordination.holder_id)
            return result
        finally:
            try:
                await coordination.finish(server_name, outcome)
            except Exception as e:
                logger.warning("Could not share the outcome of fetching %s: %s", server_name, e)

    def _renew(self, server_name: str) -> "defer.Deferred[None]":
        renewing = defer.ensureDeferred(self._coordination.renew(server_name))
        renewing.addErrback(
            lambda f: logger.warning(
                "Could not renew the flight lease of %s: %s", server_name, f.getErrorMessage()
            )
        )
        return renewing


async def _first_of(news: "defer.Deferred[None]", clock: ReactorClock, wait_ms: int) -> None:
    """Wait for ``news`` or ``wait_ms``, whichever comes first (``news`` is cancelled
    if the time comes first, and then fires with None)."""
    timer = clock.callLater(max(wait_ms, 1) / 1000, news.cancel)
    try:
        await news
    finally:
        if timer.active():
            timer.cancel()
