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
   every :data:`STORED_RETRY_MS`, for at most :data:`STORED_GRACE_MS` after that
   flight ended; past it (the answer never reached the store: the other process died
   before storing it), the flight goes on as if there were no outcome. An answer the
   other process did not store after all (:meth:`SharedFlights.settled`: its trust
   policy or the store refused it) counts as no outcome at once;
2. otherwise tries to take the lease; holding it, it looks at the outcome once more
   (a flight may have ended just before): an answer to use is used, and one still
   within :data:`STORED_GRACE_MS` of being stored is waited for, the lease given back,
   as in 1. Otherwise it fetches, renewing the lease meanwhile, and writes the outcome
   for the others (what :class:`OutcomeCodec` makes of the answer or the error; None
   shares nothing);
3. otherwise waits, until the name's flight ends elsewhere (news), or its holder's
   lease may have run out (the wait the lease attempt named), then starts over;
4. after waiting for twice ``lease_ms`` in all (a holder alive but stuck), or when the
   database cannot be used for this, fetches without the lease: a fetch too many is
   better than none.

The process that fetched an answer too big for its outcome calls :meth:`settled` once
it tried to store it (the fetcher chain does, after its trust policy's decision): if
the answer is not in the store then, the outcome says so and the waiters are woken, so
that one of them takes the lease and fetches.

A failure elsewhere is raised here as :meth:`OutcomeCodec.error` rebuilds it (an
unreachable origin is unreachable for every process, and is backed off as such).
"""

import logging
from collections import OrderedDict
from typing import Awaitable, Callable, Iterable, Optional, Protocol, TypeVar, cast

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime

from keyring_module.clock import ReactorClock, now_ms
from keyring_module.model import response_id_for
from keyring_module.storage.coordination import Coordination, FlightOutcome, LeaseAttempt
from keyring_module.storage.errors import StorageError
from keyring_module.storage.flight_rows import MAX_OUTCOME_BODY_BYTES, bounded_outcome

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: How old an outcome written by another process may be (before this flight began) and
#: still be used instead of fetching (ms).
REUSE_ELSEWHERE_MS = 2000
#: How often a flight looks for an answer another process is storing, without news (ms).
STORED_RETRY_MS = 500
#: How long after another process's flight ended its answer is waited for in the store
#: (ms): it stores what it fetched right away, within moments. Past it the waiters
#: take the lease (one of them fetches), instead of waiting for an answer that may
#: never be stored.
STORED_GRACE_MS = 2000
#: The most answers this process remembers it has yet to store (:meth:`SharedFlights.settled`).
MAX_UNSETTLED = 1024


class _StoreAwaited(Exception):
    """Holding the lease, the flight found an answer being stored: it gave the lease
    back and waits for the store as the other waiters do."""


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
        # By server name: the response id of this process's answer written as
        # awaiting the store, until settled() is told of its store attempt.
        self._unsettled: "OrderedDict[str, str]" = OrderedDict()
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
                waiting_ms = self._store_wait_ms(outcome, began_ts)
                if outcome is not None and waiting_ms is None:
                    news.cancel()
                    return await self._use(server_name, outcome, codec)
                if waiting_ms is not None and waiting_ms > 0:
                    # Its answer is not in the store yet: wait for that write.
                    attempt, waited_for = (
                        LeaseAttempt(False, min(STORED_RETRY_MS, waiting_ms)),
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
                try:
                    result = await self._hold(server_name, fetch, codec, began_ts)
                except _StoreAwaited:
                    attempt, waited_for = (
                        LeaseAttempt(False, STORED_RETRY_MS),
                        "another process to store its answer",
                    )
                else:
                    news.cancel()
                    return result
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

    async def settled(self, server_name: str, answers: Iterable[bytes]) -> None:
        """This process tried to store its answers about ``server_name`` (their bytes,
        stored or not): if one of them is an answer it shared as too big for its
        outcome, and it is not in the store, tell the waiters (the outcome becomes
        :data:`~keyring_module.storage.coordination.OUTCOME_NOT_STORED`), so that one
        of them fetches at once instead of after :data:`STORED_GRACE_MS`.

        Never raises (a database failure is logged; the waiters' grace still holds).

        Example::

            await flights.settled("example.org", [response.json_bytes])
        """
        awaited = self._unsettled.get(server_name)
        if awaited is None:
            return
        # Only an answer too big for its outcome can be the awaited one: only those
        # are hashed, and none after it is found.
        if not any(
            len(body) > MAX_OUTCOME_BODY_BYTES and response_id_for(body) == awaited
            for body in answers
        ):
            return
        del self._unsettled[server_name]
        try:
            if await self._coordination.mark_not_stored(server_name, awaited):
                logger.info(
                    "The answer of %s was not stored: another process waiting for it fetches it",
                    server_name,
                )
        except Exception as e:
            logger.warning(
                "Could not tell that the answer of %s was not stored: %s", server_name, e
            )

    def _store_wait_ms(self, outcome: Optional[FlightOutcome], began_ts: int) -> Optional[int]:
        """None: ``outcome`` is there to use. Otherwise how long its answer may still
        be waited for in the store (0 or less: not at all, there is nothing to use)."""
        if outcome is None or not self._usable(outcome, began_ts) or outcome.shares_nothing:
            return 0
        if not outcome.awaits_store:
            return None
        return outcome.finished_ts + STORED_GRACE_MS - now_ms(self._clock)

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
        """Holding the lease: fetch (unless an outcome just came), share the outcome.

        Raises:
            _StoreAwaited: an answer just came that is being stored: the lease is
                given back, to wait for it.
        """
        coordination = self._coordination
        outcome: Optional[FlightOutcome] = None
        try:
            try:
                found = await coordination.read_outcome(server_name)
            except StorageError:
                found = None  # fetch: the lease is held, the outcome will be written
            waiting_ms = self._store_wait_ms(found, began_ts)
            if found is not None and waiting_ms is None:
                return await self._use(server_name, found, codec)
            if waiting_ms is not None and waiting_ms > 0:
                raise _StoreAwaited()
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
            # Bounded once, here (a big answer's SHA-256 is its response id): the
            # store writes it as it is, and it tells what is awaited.
            written = None if outcome is None else bounded_outcome(outcome)
            try:
                await coordination.finish(server_name, written)
            except Exception as e:
                logger.warning("Could not share the outcome of fetching %s: %s", server_name, e)
            else:
                self._remember_unsettled(server_name, written)

    def _remember_unsettled(self, server_name: str, written: Optional[FlightOutcome]) -> None:
        """Note an answer written as awaiting the store (see :meth:`settled`);
        ``written`` is the outcome as written (bounded)."""
        if written is None:
            return  # nothing written: the last outcome stands
        self._unsettled.pop(server_name, None)
        if not written.awaits_store:
            return
        self._unsettled[server_name] = written.detail
        while len(self._unsettled) > MAX_UNSETTLED:
            self._unsettled.popitem(last=False)

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
