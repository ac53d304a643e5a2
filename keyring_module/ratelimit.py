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

Memory stays bounded: when the table grows past ``max_entries``, origins that are idle
(full bucket, not backed off, nothing in flight) are dropped, since a fresh entry would
behave the same. An expired backoff is forgotten once a further ``failure_backoff_max``
has passed without another failure.
"""

import logging
import math
import random as _random
from typing import Awaitable, Callable, Hashable, TypeVar, Union

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
    tokens: float
    tokens_ts: int
    failures: int = 0
    backoff_until_ts: int = 0
    flights: dict[Hashable, _Flight] = attr.Factory(dict)


class OriginRateLimiter:
    """Single flight, a lazy token bucket and failure backoff, per origin.

    Args:
        clock: where time is read from.
        config: burst, interval and backoff bounds.
        random: returns a float in [0, 1); used for the backoff jitter.
        max_entries: how many origins to track before idle ones are pruned.
    """

    def __init__(
        self,
        clock: ReactorClock,
        config: RateLimitConfig,
        random: Callable[[], float] = _random.random,
        max_entries: int = 10_000,
    ) -> None:
        self._clock = clock
        self._config = config
        self._random = random
        self._max_entries = max_entries
        self._prune_at = max_entries
        self._origins: dict[str, _OriginState] = {}

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
        state = self._origins.get(origin)
        if state is None:
            self._maybe_prune(now)
            state = _OriginState(tokens=float(self._config.origin_burst), tokens_ts=now)
            self._origins[origin] = state

        flight = state.flights.get(flight_key)
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

    def _backoff_delay_ms(self, failures: int) -> int:
        initial = self._config.failure_backoff_initial_ms
        maximum = self._config.failure_backoff_max_ms
        base = min(maximum, initial << min(failures - 1, 62))
        factor = 1 + BACKOFF_JITTER * (2 * self._random() - 1)
        return max(0, min(maximum, round(base * factor)))

    def _finish(
        self,
        result: Union[object, Failure],
        origin: str,
        state: _OriginState,
        flight_key: Hashable,
        flight: _Flight,
    ) -> None:
        if state.flights.get(flight_key) is flight:
            del state.flights[flight_key]
        now = now_ms(self._clock)
        if not isinstance(result, Failure):
            if state.failures:
                logger.info("Fetches from %s succeed again; backoff reset", origin)
            state.failures = 0
            state.backoff_until_ts = 0
        elif isinstance(result.value, FAILURE_EXCEPTIONS) and not isinstance(
            result.value, OriginLimitedError
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
        flight.deliver(result)

    def _streak_expired(self, state: _OriginState, now: int) -> bool:
        """Whether the last failure is so long ago that the next one counts as a first."""
        return now >= state.backoff_until_ts + self._config.failure_backoff_max_ms

    def _is_idle(self, state: _OriginState, now: int) -> bool:
        if state.flights or state.backoff_until_ts > now:
            return False
        if state.failures and not self._streak_expired(state, now):
            return False
        return self._tokens(state, now) >= self._config.origin_burst

    def _maybe_prune(self, now: int) -> None:
        if len(self._origins) < self._prune_at:
            return
        before = len(self._origins)
        self._origins = {o: s for o, s in self._origins.items() if not self._is_idle(s, now)}
        # Amortise: scan again only once the table has doubled from what is left.
        self._prune_at = max(self._max_entries, 2 * len(self._origins))
        logger.debug("Pruned %d idle origins from the rate limiter", before - len(self._origins))
