"""The per-origin limiter: no load on us turns into a flood of fetches on another server.

Every outbound key fetch goes through one :class:`OriginRateLimiter` shared by the
notary service and the keyring, keyed by the server being contacted (the origin for
``/key/v2/server``, the notary for ``/key/v2/query``)::

    response = await limiter.run("example.org", fetch)

``run`` applies, in this order:

1. **Single flight.** If a fetch for the same origin (and ``flight_key``) is already in
   flight, the caller waits for it and shares its result or failure; no token is spent.
   Each caller gets its own Deferred, so cancelling one caller never cancels the shared
   fetch.
2. **Backoff.** After a failed fetch the origin is backed off: ``failure_backoff_initial``
   after the first failure, doubling with each further failure up to
   ``failure_backoff_max``, each delay jittered by up to ±20%. While backed off, ``run``
   raises :class:`BackedOffError` at once without calling ``fetch`` (a negative cache).
   A successful fetch resets the backoff.
3. **Token bucket.** Each origin has ``origin_burst`` tokens and regains one every
   ``origin_interval``, computed lazily from the clock (there is no timer per origin).
   A fetch with ``consume_token=True`` and no token left raises :class:`RateLimitedError`.

Only :class:`~keyring_module.http.FederationRequestError` (unreachable, timeout, TLS,
HTTP status, bad body) and :class:`~keyring_module.errors.KeyLookupError` (for example an
invalid key response) count as failures of the origin. Any other exception (a bug, a
cancellation) is passed on to the callers without touching the backoff.

A failure streak ends once the backoff has been over for as long as the *next* delay
would be (the unjittered delay of one more failure); a failure after that counts as a
first one again. So an origin that keeps failing while it is asked, even only once per
backoff, backs off exponentially up to ``failure_backoff_max``, and one that failed once
is forgotten soon (after the first 30 s backoff and 60 s more, with the defaults).

**State is pruned by age.** An origin's state is dropped once it is *idle*: nothing in
flight, its bucket full again, its backoff and failure streak over, since a fresh state
would behave the same. Each state's idle time is known when its last fetch finishes, so
the states wait in a heap ordered by idle time, and every ``run`` drops up to
:data:`PRUNE_PER_CALL` states that have come due (amortised: the heap drains faster
than calls fill it). A name that failed once costs memory for about 90 seconds with the
defaults, not an hour, however many such names there are.
"""

import heapq
import logging
import math
import random as _random
from typing import Awaitable, Callable, Hashable, Optional, TypeVar, Union

import attr
from twisted.internet import defer
from twisted.python.failure import Failure

from keyring_module.clock import ReactorClock, now_ms
from keyring_module.config import RateLimitConfig
from keyring_module.errors import KeyLookupError
from keyring_module.http import FederationRequestError

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The fraction by which each backoff delay is randomly lengthened or shortened.
BACKOFF_JITTER = 0.2

#: How many due states one ``run`` call looks at (and drops if idle).
PRUNE_PER_CALL = 16

#: The exceptions that count as a failure of the origin and start or extend a backoff.
FAILURE_EXCEPTIONS: tuple[type[BaseException], ...] = (FederationRequestError, KeyLookupError)


class OriginLimitedError(KeyLookupError):
    """A fetch was refused by the limiter; ``retry_after_ms`` says when to try again."""

    reason = "limited"

    def __init__(self, origin: str, retry_after_ms: int) -> None:
        super().__init__(
            "fetches from %s are %s for %d ms more" % (origin, self.reason, retry_after_ms)
        )
        self.origin = origin
        self.retry_after_ms = retry_after_ms


class RateLimitedError(OriginLimitedError):
    """The origin's token bucket is empty."""

    reason = "rate_limited"


class BackedOffError(OriginLimitedError):
    """The origin failed recently and is backed off."""

    reason = "backed_off"


class _Flight:
    """One fetch in flight, and the Deferreds of everyone waiting for it."""

    def __init__(self) -> None:
        self.waiters: list["defer.Deferred[object]"] = []

    def join(self) -> "defer.Deferred[object]":
        waiter: "defer.Deferred[object]" = defer.Deferred(self._cancel_waiter)
        self.waiters.append(waiter)
        return waiter

    def _cancel_waiter(self, waiter: "defer.Deferred[object]") -> None:
        # Only this caller stops waiting; the shared fetch goes on for the others.
        if waiter in self.waiters:
            self.waiters.remove(waiter)

    def deliver(self, result: Union[object, Failure]) -> None:
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)


@attr.s(auto_attribs=True, slots=True)
class _OriginState:
    """What the limiter remembers about one origin (a fixed, small size).

    Attributes:
        tokens: the bucket's tokens at ``tokens_ts``.
        tokens_ts: when ``tokens`` was computed.
        failures: the failures in the current streak.
        backoff_until_ts: until when fetches are refused.
        flights: the fetches in flight by flight key (None when there are none).
        idle_ts: when the state becomes idle, as of its last fetch (its heap entry).
    """

    tokens: float
    tokens_ts: int
    failures: int = 0
    backoff_until_ts: int = 0
    flights: Optional[dict[Hashable, _Flight]] = None
    idle_ts: int = 0


class OriginRateLimiter:
    """Single flight, a lazy token bucket and failure backoff, per origin.

    Args:
        clock: where time is read from.
        config: burst, interval and backoff bounds.
        random: returns a float in [0, 1); used for the backoff jitter.
    """

    def __init__(
        self,
        clock: ReactorClock,
        config: RateLimitConfig,
        random: Callable[[], float] = _random.random,
    ) -> None:
        self._clock = clock
        self._config = config
        self._random = random
        self._origins: dict[str, _OriginState] = {}
        # (idle_ts, origin) for the states with nothing in flight; an entry whose
        # idle_ts is not its state's any more is stale and skipped.
        self._idle_heap: list[tuple[int, str]] = []

    async def run(
        self,
        origin: str,
        fetch: Callable[[], Awaitable[T]],
        *,
        consume_token: bool = True,
        flight_key: Hashable = None,
    ) -> T:
        """Run ``fetch`` for ``origin`` unless the limiter refuses, sharing concurrent runs.

        Args:
            origin: the server name being contacted.
            fetch: starts the fetch; called at most once per flight.
            consume_token: whether starting a new fetch needs a token from the bucket.
            flight_key: concurrent runs share a flight only when ``origin`` and
                ``flight_key`` are equal (e.g. two different notary batches must not).

        Returns:
            The (possibly shared) result of ``fetch``.

        Raises:
            BackedOffError: the origin failed recently; ``fetch`` was not called.
            RateLimitedError: no token left; ``fetch`` was not called.
            Exception: whatever the (shared) fetch raised.
        """
        now = now_ms(self._clock)
        self._prune(now, PRUNE_PER_CALL)
        state = self._origins.get(origin)
        if state is None:
            state = _OriginState(tokens=float(self._config.origin_burst), tokens_ts=now)
            self._origins[origin] = state

        flight = state.flights.get(flight_key) if state.flights else None
        if flight is not None:
            result: T = await flight.join()  # type: ignore[assignment]
            return result

        if state.backoff_until_ts > now:
            raise BackedOffError(origin, state.backoff_until_ts - now)
        if consume_token:
            tokens = self._tokens(state, now)
            if tokens < 1:
                interval = max(self._config.origin_interval_ms, 1)
                raise RateLimitedError(origin, max(1, math.ceil((1 - tokens) * interval)))
            state.tokens = tokens - 1
            state.tokens_ts = now

        flight = _Flight()
        if state.flights is None:
            state.flights = {}
        state.flights[flight_key] = flight
        waiter = flight.join()

        async def call() -> T:
            return await fetch()

        fetching = defer.ensureDeferred(call())
        fetching.addBoth(self._finish, origin, state, flight_key, flight)
        result = await waiter  # type: ignore[assignment]
        return result

    def is_backed_off(self, origin: str) -> bool:
        """Whether ``run`` would refuse ``origin`` now because of recent failures."""
        state = self._origins.get(origin)
        return state is not None and state.backoff_until_ts > now_ms(self._clock)

    def retry_after_ms(self, origin: str) -> int:
        """How long until ``run`` would start a new fetch for ``origin`` (0: now).

        That is the rest of its backoff, or the time until its bucket holds a token
        again, whichever is later.

        Example:
            >>> from twisted.internet.task import Clock
            >>> limiter = OriginRateLimiter(Clock(), RateLimitConfig())
            >>> limiter.retry_after_ms("example.org")
            0
        """
        state = self._origins.get(origin)
        if state is None:
            return 0
        now = now_ms(self._clock)
        wait = max(0, state.backoff_until_ts - now)
        tokens = self._tokens(state, now)
        if tokens < 1:
            interval = max(self._config.origin_interval_ms, 1)
            wait = max(wait, math.ceil((1 - tokens) * interval))
        return wait

    def backed_off_origins(self) -> int:
        """How many origins are backed off now (for a metrics gauge)."""
        now = now_ms(self._clock)
        return sum(1 for s in self._origins.values() if s.backoff_until_ts > now)

    def tracked_origins(self) -> int:
        """How many origins the limiter holds state for (bounded by pruning)."""
        return len(self._origins)

    def _tokens(self, state: _OriginState, now: int) -> float:
        burst = float(self._config.origin_burst)
        interval = self._config.origin_interval_ms
        if interval <= 0:
            return burst
        elapsed = max(0, now - state.tokens_ts)
        return min(burst, state.tokens + elapsed / interval)

    def _base_delay_ms(self, failures: int) -> int:
        """The backoff delay after ``failures`` failures in a row, without jitter."""
        initial = self._config.failure_backoff_initial_ms
        maximum = self._config.failure_backoff_max_ms
        return min(maximum, initial << min(max(failures, 1) - 1, 62))

    def _backoff_delay_ms(self, failures: int) -> int:
        factor = 1 + BACKOFF_JITTER * (2 * self._random() - 1)
        return max(
            0,
            min(self._config.failure_backoff_max_ms, round(self._base_delay_ms(failures) * factor)),
        )

    def _finish(
        self,
        result: Union[object, Failure],
        origin: str,
        state: _OriginState,
        flight_key: Hashable,
        flight: _Flight,
    ) -> None:
        if state.flights and state.flights.get(flight_key) is flight:
            del state.flights[flight_key]
            if not state.flights:
                state.flights = None
        now = now_ms(self._clock)
        if not isinstance(result, Failure):
            if state.failures:
                logger.info("Fetches from %s succeed again; backoff reset", origin)
            state.failures = 0
            state.backoff_until_ts = 0
        elif (
            isinstance(result.value, FAILURE_EXCEPTIONS)
            and not isinstance(result.value, OriginLimitedError)
            and getattr(result.value, "blames_server", True)  # not our own full pool
        ):
            if self._streak_expired(state, now):
                state.failures = 0
            state.failures += 1
            delay = self._backoff_delay_ms(state.failures)
            state.backoff_until_ts = max(state.backoff_until_ts, now + delay)
            logger.info(
                "Backing off %s for %d ms after %d failure(s): %s",
                origin,
                delay,
                state.failures,
                result.getErrorMessage(),
            )
        if state.flights is None and self._origins.get(origin) is state:
            self._wait_for_idle(origin, state)
        flight.deliver(result)

    def _streak_expired(self, state: _OriginState, now: int) -> bool:
        """Whether the last failure is so long ago that the next one counts as a first.

        That is once the backoff has been over for as long as the next delay would be.
        """
        return now >= self._streak_end_ts(state)

    def _streak_end_ts(self, state: _OriginState) -> int:
        """When the failure streak ends: the backoff's end plus the next (unjittered) delay.

        Waiting for the *next* delay, not the last one, is what lets the backoff grow for
        an origin asked about once per backoff period: each failure lands inside the
        streak, so the delays double (30 s, 60 s, 2 min, ... up to the maximum).
        """
        if not state.failures:
            return state.backoff_until_ts
        return state.backoff_until_ts + self._base_delay_ms(state.failures + 1)

    def _idle_ts(self, state: _OriginState) -> int:
        """When the state becomes idle if nothing happens: full bucket, streak over."""
        full_ts = state.tokens_ts
        interval = self._config.origin_interval_ms
        missing = self._config.origin_burst - state.tokens
        if interval > 0 and missing > 0:
            full_ts += math.ceil(missing * interval)
        return max(full_ts, self._streak_end_ts(state))

    def _wait_for_idle(self, origin: str, state: _OriginState) -> None:
        """Queue a state with nothing in flight to be dropped once it is idle."""
        state.idle_ts = self._idle_ts(state)
        heapq.heappush(self._idle_heap, (state.idle_ts, origin))
        if len(self._idle_heap) > 2 * len(self._origins) + 64:
            # Mostly stale entries (states that were busy again): rebuild.
            self._idle_heap = [
                (s.idle_ts, o) for o, s in self._origins.items() if s.flights is None
            ]
            heapq.heapify(self._idle_heap)

    def _prune(self, now: int, budget: Optional[int]) -> None:
        """Drop idle states whose heap entries have come due (at most ``budget`` entries)."""
        heap = self._idle_heap
        looked = 0
        while heap and heap[0][0] <= now and (budget is None or looked < budget):
            idle_ts, origin = heapq.heappop(heap)
            looked += 1
            state = self._origins.get(origin)
            if state is not None and state.flights is None and state.idle_ts == idle_ts:
                del self._origins[origin]
