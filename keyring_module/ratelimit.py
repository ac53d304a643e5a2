"""The per-origin limiter: no load on us turns into a flood of fetches on another server.

Every outbound fetch from an origin (``/key/v2/server``) goes through one
:class:`OriginRateLimiter` shared by the notary service and the keyring::

    response = await limiter.run("example.org", fetch, flight_key="example.org")

The limiter keeps its state per *network target* of the name
(:func:`~keyring_module.servername.network_target`: lower-cased host, no trailing dot,
numeric port, canonical IP literals), so ``Example.ORG``, ``example.org.`` and
``example.org`` are one origin with one token bucket and one backoff. Callers pass the
exact name as ``flight_key``: concurrent askers of the same exact name share a flight,
while another spelling of the host gets its own flight (and so its own answer,
validated against its own name), which spends a token of the same bucket.

``run`` applies, in this order:

1. **Single flight.** If a fetch for the same target and ``flight_key`` is already in
   flight, the caller waits for it and shares its result or failure; no token and no
   slot is needed. Each caller gets its own Deferred, so cancelling one caller never
   cancels the shared fetch.
2. **Backoff.** After an origin could not be reached (a connection or DNS failure, a
   timeout, a TLS failure, an address the IP guard denies) it is backed off:
   ``failure_backoff_initial`` after the first failure, doubling with each further
   failure up to ``failure_backoff_max``, jittered by up to ±20%
   (:mod:`~keyring_module.backoff`). While backed off, ``run`` raises
   :class:`BackedOffError` at once without calling ``fetch`` (a negative cache). A
   successful fetch resets the backoff.
3. **Token bucket.** Each origin has ``origin_burst`` tokens and regains one every
   ``origin_interval``, computed lazily from the clock (there is no timer per origin).
   A new fetch with no token left raises :class:`RateLimitedError`. The last
   :func:`reserved_tokens` of each bucket are a **reserve** for our own keyring: a run
   for our own verification (:attr:`~keyring_module.model.FetchPurpose.OWN`) may spend
   the whole bucket, a run with ``may_use_reserve=False`` (the notary's fetches for
   other servers; the fetchers pass it from each request's purpose) only the tokens
   above the reserve. So
   however many queries other servers send our notary, the homeserver's own lookups of
   an origin's new key still get through, and the two together never exceed the one
   bucket.
4. **Global cap.** A new flight needs one of the ``federation.max_concurrent_fetches``
   slots shared by every outbound fetch (origins and notaries,
   :mod:`~keyring_module.fetch_slots`); beyond them it waits in a bounded FIFO queue,
   and beyond the queue ``run`` raises :class:`BusyError` at once, which backs nothing
   off. A queued flight whose callers all stop waiting leaves the queue and gets its
   token back.

The token buckets also serve without ``run``: :meth:`OriginRateLimiter.take_token`
spends a token for a request the caller sends itself (the notary fetchers count their
queries about each server in a limiter of their own that way).

**A live origin is not backed off.** An origin that answered (an HTTP error status, a
body that is not JSON or too large, an invalid key response) neither starts, extends
nor ends a backoff: it is up, and the token bucket alone bounds how often it is asked
(``origin_burst`` at once, then one per ``origin_interval``). That is what Synapse does
for key fetches too, and what lets SyTest ask an origin again right after it answered
400. Any other exception (a bug, a cancellation, our own full worker pool) is passed on
to the callers without touching the backoff.

**State is pruned by age.** A name gets state only when a token is spent for it, so
a refused name leaves nothing behind. An origin's state is dropped once it is *idle*:
nothing in flight, its bucket full again, its backoff and failure streak over, since a
fresh state would behave the same. Each state's idle time is known when its last fetch
finishes, so the states wait in a heap ordered by idle time, and every ``run`` drops up
to :data:`PRUNE_PER_CALL` states that have come due (amortised: the heap drains faster
than calls fill it). A name that failed once costs memory for about 90 seconds with the
defaults, not an hour, however many such names there are.

**Processes sharing one database** (several instances on one PostgreSQL database or
SQLite file) each keep this limiter as their first level, answered from memory. The
fetch it starts then goes through the store's shared flight
(:mod:`~keyring_module.shared_flights`: one process fetches a name at a time, the
others use its outcome) and, for the process that fetches, the shared bucket and
backoff (:mod:`~keyring_module.shared_limits`), so together they never reach an
origin more often than one process may.

Upstream notaries have a policy of their own
(:class:`~keyring_module.notary_limiter.NotaryLimiter`).
"""

import heapq
import logging
import math
import random as _random
from typing import Awaitable, Callable, Hashable, Optional, Sequence, TypeVar, Union

import attr
from twisted.internet import defer
from twisted.python.failure import Failure

from keyring_module.backoff import BackoffSchedule
from keyring_module.clock import ReactorClock, now_ms
from keyring_module.config import RateLimitConfig
from keyring_module.errors import KeyLookupError
from keyring_module.fetch_slots import FetchSlots, NoFetchSlotError
from keyring_module.flights import Flight
from keyring_module.http import (
    FederationRequestError,
    HttpStatusError,
    InvalidResponseError,
    InvalidServerNameError,
    ResponseTooLargeError,
)
from keyring_module.servername import network_target

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: How many due states one ``run`` call looks at (and drops if idle).
PRUNE_PER_CALL = 16

#: Tokens of each origin's bucket kept for our own keyring's fetches (see
#: :func:`reserved_tokens`).
OWN_RESERVE_TOKENS = 2


def reserved_tokens(origin_burst: int) -> int:
    """How many tokens of a bucket of ``origin_burst`` only our own fetches may spend:
    :data:`OWN_RESERVE_TOKENS`, but never more than ``origin_burst - 1``, so that other
    fetches always get at least one token per burst.

    Example:
        >>> reserved_tokens(10), reserved_tokens(2), reserved_tokens(1)
        (2, 1, 0)
    """
    return max(0, min(OWN_RESERVE_TOKENS, origin_burst - 1))


def bucket_tokens(config: RateLimitConfig, tokens: float, tokens_ts: int, now: int) -> float:
    """The tokens an origin's bucket holds at ``now``: ``tokens`` at ``tokens_ts``, one
    more per ``origin_interval_ms`` since, at most ``origin_burst``. Shared by the
    in-process limiter and the limits shared through the database.

    Example:
        >>> config = RateLimitConfig(origin_burst=3, origin_interval_ms=1000)
        >>> bucket_tokens(config, 0.0, 0, 1500), bucket_tokens(config, 2.0, 0, 10_000)
        (1.5, 3.0)
    """
    burst = float(config.origin_burst)
    interval = config.origin_interval_ms
    if interval <= 0:
        return burst
    return min(burst, tokens + max(0, now - tokens_ts) / interval)


def token_wait_ms(config: RateLimitConfig, tokens: float, reserve: int) -> int:
    """How long until a bucket holding ``tokens`` has one above ``reserve`` (0: now).

    Example:
        >>> config = RateLimitConfig(origin_burst=3, origin_interval_ms=1000)
        >>> token_wait_ms(config, 0.5, 0), token_wait_ms(config, 2.0, 2), token_wait_ms(config, 3.0, 2)
        (500, 1000, 0)
    """
    available = tokens - reserve
    if available >= 1:
        return 0
    return max(1, math.ceil((1 - available) * max(config.origin_interval_ms, 1)))


#: What a :class:`BusyError` tells callers to wait: slots free up as fetches finish.
BUSY_RETRY_AFTER_MS = 1000

#: Request errors that show the server answered (or was never contacted): no backoff.
ANSWERED_ERRORS: tuple[type[FederationRequestError], ...] = (
    HttpStatusError,
    InvalidResponseError,
    ResponseTooLargeError,
    InvalidServerNameError,
)


def is_unreachable(error: Optional[BaseException]) -> bool:
    """Whether a failed fetch shows the server could not be reached (so: back off).

    Connection and DNS failures, timeouts, TLS failures and denied addresses do; an
    HTTP error status, a bad body or an invalid key response (the server answered) and
    anything that is no request error do not.

    Example:
        >>> from keyring_module.http import ConnectError, HttpStatusError
        >>> is_unreachable(ConnectError("refused")), is_unreachable(HttpStatusError(400))
        (True, False)
    """
    return isinstance(error, FederationRequestError) and not isinstance(error, ANSWERED_ERRORS)


class OriginLimitedError(KeyLookupError):
    """A fetch was refused by a limiter; ``retry_after_ms`` says when to try again."""

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
    """The server failed recently and is backed off."""

    reason = "backed_off"


class BusyError(OriginLimitedError):
    """Too many fetches are in flight and queued already (ours, not the server's fault)."""

    reason = "busy"


#: Told a flight's outcome once it is over, before its callers get it.
FlightFinish = Callable[[Union[object, Failure], Flight], None]


def refuse_if_busy(target: str, slots: Sequence[FetchSlots]) -> None:
    """Refuse a new flight when one of the slot groups it needs has no room left.

    Raises:
        BusyError: a group's slots are all taken and its queue is full.
    """
    if not all(group.has_room() for group in slots):
        raise BusyError(target, BUSY_RETRY_AFTER_MS)


def start_flight(
    flights: dict[Hashable, Flight],
    flight_key: Hashable,
    target: str,
    fetch: Callable[[], Awaitable[T]],
    slots: Sequence[FetchSlots],
    finish: FlightFinish,
) -> "defer.Deferred[object]":
    """Start a new flight of ``fetch`` under ``flight_key`` and join it: the part of
    ``run`` both limiters share, once their own checks (and :func:`refuse_if_busy`)
    passed.

    The flight takes a slot of each group in ``slots`` in order, then fetches. Once it
    is over it leaves ``flights``, ``finish(outcome, flight)`` updates the limiter's
    state, and then every caller gets the outcome. A flight that found no room in a
    later group's queue after waiting in an earlier one (it filled meanwhile) sent
    nothing and fails with :class:`BusyError`, a refusal like any other.

    Returns:
        The first caller's Deferred (others :meth:`~Flight.join` the flight).
    """
    flight = Flight()
    flights[flight_key] = flight
    waiter = flight.join()

    def land(outcome: Union[object, Failure]) -> None:
        if flights.get(flight_key) is flight:
            del flights[flight_key]
        if isinstance(outcome, Failure) and not flight.started:
            if outcome.check(NoFetchSlotError):
                outcome = Failure(BusyError(target, BUSY_RETRY_AFTER_MS))
        try:
            finish(outcome, flight)
        finally:  # the callers get their answer whatever bookkeeping does
            flight.deliver(outcome)

    flight.start(fetch, slots).addBoth(land)
    return waiter


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
    flights: Optional[dict[Hashable, Flight]] = None
    idle_ts: int = 0


class OriginRateLimiter:
    """Single flight, a lazy token bucket and backoff per origin, under a global cap.

    Args:
        clock: where time is read from.
        config: burst, interval and backoff bounds.
        random: returns a float in [0, 1); used for the backoff jitter.
        fetch_slots: the slots every outbound fetch shares (no cap when None).

    Example:
        >>> from twisted.internet.task import Clock
        >>> limiter = OriginRateLimiter(Clock(), RateLimitConfig(origin_burst=1))
        >>> async def fetch() -> str:
        ...     return "keys"
        >>> from twisted.internet import defer
        >>> defer.ensureDeferred(limiter.run("Example.org", fetch)).result
        'keys'
        >>> limiter.retry_after_ms("example.org.")  # the same target: bucket empty
        60000
    """

    def __init__(
        self,
        clock: ReactorClock,
        config: RateLimitConfig,
        random: Callable[[], float] = _random.random,
        fetch_slots: Optional[FetchSlots] = None,
    ) -> None:
        self._clock = clock
        self._config = config
        self._backoff = BackoffSchedule(config, random)
        self._slots = () if fetch_slots is None else (fetch_slots,)
        self._origins: dict[str, _OriginState] = {}
        # (idle_ts, target) for the states with nothing in flight; an entry whose
        # idle_ts is not its state's any more is stale and skipped.
        self._idle_heap: list[tuple[int, str]] = []

    async def run(
        self,
        origin: str,
        fetch: Callable[[], Awaitable[T]],
        *,
        flight_key: Hashable = None,
        may_use_reserve: bool = True,
    ) -> T:
        """Run ``fetch`` for ``origin`` unless the limiter refuses, sharing concurrent runs.

        Args:
            origin: the server name being contacted; its network target is the key.
            fetch: starts the fetch; called at most once per flight.
            flight_key: concurrent runs share a flight only when their targets and
                ``flight_key`` are equal (the origin fetcher passes the exact name).
            may_use_reserve: False for a fetch on behalf of other servers (the
                notary's): it leaves the bucket's reserve (:func:`reserved_tokens`) to
                our own keyring's fetches.

        Returns:
            The (possibly shared) result of ``fetch``.

        Raises:
            BackedOffError: the origin was unreachable recently; ``fetch`` was not called.
            RateLimitedError: no token left; ``fetch`` was not called.
            BusyError: every fetch slot is taken and the queue is full.
            Exception: whatever the (shared) fetch raised.
        """
        now = now_ms(self._clock)
        self._prune(now, PRUNE_PER_CALL)
        target = network_target(origin)
        state = self._origins.get(target)
        if state is not None and state.flights:
            flight = state.flights.get(flight_key)
            if flight is not None:
                result: T = await flight.join()  # type: ignore[assignment]
                return result
        if state is None:
            # Stored only once a token is spent: a refused name leaves no state behind.
            state = _OriginState(tokens=float(self._config.origin_burst), tokens_ts=now)

        if state.backoff_until_ts > now:
            raise BackedOffError(target, state.backoff_until_ts - now)
        wait = self._token_wait_ms(state, now, self._reserve(may_use_reserve))
        if wait:
            raise RateLimitedError(target, wait)
        refuse_if_busy(target, self._slots)
        self._spend_token(target, state, now)
        if state.flights is None:
            state.flights = {}
        flight_state = state
        waiter = start_flight(
            state.flights,
            flight_key,
            target,
            fetch,
            self._slots,
            lambda outcome, flight: self._finish(outcome, target, flight_state, flight),
        )
        result = await waiter  # type: ignore[assignment]
        return result

    def keeping_reserve(self) -> "ReserveKeepingLimiter":
        """This limiter as fetches for other servers see it: :meth:`run` with
        ``may_use_reserve=False`` (same state, same buckets)."""
        return ReserveKeepingLimiter(self)

    def take_token(self, origin: str, *, may_use_reserve: bool = True) -> int:
        """Spend one of ``origin``'s tokens for a request sent without :meth:`run`.

        For a limiter used only as a set of token buckets: the notary fetchers count
        their queries about each server in a limiter of their own.

        Args:
            origin: the server name.
            may_use_reserve: as for :meth:`run`.

        Returns:
            0 when a token was spent; otherwise how long until ``origin`` could have one
            (nothing is spent, and a name with no state yet gets none).

        Example:
            >>> from twisted.internet.task import Clock
            >>> limiter = OriginRateLimiter(Clock(), RateLimitConfig(origin_burst=3))
            >>> [limiter.take_token("example.org", may_use_reserve=False) for _ in range(2)]
            [0, 60000]
            >>> [limiter.take_token("example.org") for _ in range(3)]  # the 2 reserved
            [0, 0, 60000]
        """
        now = now_ms(self._clock)
        self._prune(now, PRUNE_PER_CALL)
        target = network_target(origin)
        state = self._origins.get(target)
        if state is None:
            state = _OriginState(tokens=float(self._config.origin_burst), tokens_ts=now)
        wait = self._wait_ms(state, now, self._reserve(may_use_reserve))
        if wait:
            return wait
        self._spend_token(target, state, now)
        if state.flights is None:
            self._wait_for_idle(target, state)
        return 0

    def is_backed_off(self, origin: str) -> bool:
        """Whether ``run`` would refuse ``origin`` now because it was unreachable."""
        state = self._origins.get(network_target(origin))
        return state is not None and state.backoff_until_ts > now_ms(self._clock)

    def retry_after_ms(self, origin: str, *, may_use_reserve: bool = True) -> int:
        """How long until ``run`` would start a new fetch for ``origin`` (0: now).

        That is the rest of its backoff, or the time until its bucket holds a token
        again (above the reserve unless ``may_use_reserve``), whichever is later.

        Example:
            >>> from twisted.internet.task import Clock
            >>> limiter = OriginRateLimiter(Clock(), RateLimitConfig())
            >>> limiter.retry_after_ms("example.org")
            0
        """
        if not self._origins:
            return 0  # nothing tracked: no name needs its network target worked out
        state = self._origins.get(network_target(origin))
        if state is None:
            return 0
        return self._wait_ms(state, now_ms(self._clock), self._reserve(may_use_reserve))

    def backed_off_origins(self) -> int:
        """How many origins are backed off now (for a metrics gauge)."""
        now = now_ms(self._clock)
        return sum(1 for s in self._origins.values() if s.backoff_until_ts > now)

    def tracked_origins(self) -> int:
        """How many origins the limiter holds state for (bounded by pruning)."""
        return len(self._origins)

    def _tokens(self, state: _OriginState, now: int) -> float:
        return bucket_tokens(self._config, state.tokens, state.tokens_ts, now)

    def _reserve(self, may_use_reserve: bool) -> int:
        return 0 if may_use_reserve else reserved_tokens(self._config.origin_burst)

    def _token_wait_ms(self, state: _OriginState, now: int, reserve: int) -> int:
        """How long until the state's bucket holds a token above ``reserve`` (0: now)."""
        return token_wait_ms(self._config, self._tokens(state, now), reserve)

    def _wait_ms(self, state: _OriginState, now: int, reserve: int) -> int:
        """How long until a new fetch may start: the rest of the backoff or the wait for
        a token above ``reserve``, whichever is later."""
        return max(state.backoff_until_ts - now, self._token_wait_ms(state, now, reserve), 0)

    def _spend_token(self, target: str, state: _OriginState, now: int) -> None:
        state.tokens = self._tokens(state, now) - 1
        state.tokens_ts = now
        self._origins[target] = state

    def _finish(
        self,
        outcome: Union[object, Failure],
        target: str,
        state: _OriginState,
        flight: Flight,
    ) -> None:
        """Update the origin's state once a flight is over (it has left the flights)."""
        if state.flights is not None and not state.flights:
            state.flights = None
        now = now_ms(self._clock)
        if not isinstance(outcome, Failure):
            if state.failures:
                logger.info("Fetches from %s succeed again; backoff reset", target)
            state.failures = 0
            state.backoff_until_ts = 0
        elif not flight.started:
            # Everyone stopped waiting before a slot was free, or no queue had room:
            # nothing was sent, so the token comes back.
            state.tokens = min(float(self._config.origin_burst), self._tokens(state, now) + 1)
            state.tokens_ts = now
        elif is_unreachable(outcome.value):
            delay = self._backoff.record_failure(state, now)
            logger.info(
                "Backing off %s for %d ms after %d failure(s): %s",
                target,
                delay,
                state.failures,
                outcome.getErrorMessage(),
            )
        if state.flights is None and self._origins.get(target) is state:
            self._wait_for_idle(target, state)

    def _idle_ts(self, state: _OriginState) -> int:
        """When the state becomes idle if nothing happens: full bucket, streak over."""
        full_ts = state.tokens_ts
        interval = self._config.origin_interval_ms
        missing = self._config.origin_burst - state.tokens
        if interval > 0 and missing > 0:
            full_ts += math.ceil(missing * interval)
        return max(full_ts, self._backoff.streak_end_ts(state.failures, state.backoff_until_ts))

    def _wait_for_idle(self, target: str, state: _OriginState) -> None:
        """Queue a state with nothing in flight to be dropped once it is idle."""
        state.idle_ts = self._idle_ts(state)
        heapq.heappush(self._idle_heap, (state.idle_ts, target))
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
            idle_ts, target = heapq.heappop(heap)
            looked += 1
            state = self._origins.get(target)
            if state is not None and state.flights is None and state.idle_ts == idle_ts:
                del self._origins[target]


class ReserveKeepingLimiter:
    """An :class:`OriginRateLimiter` whose runs leave the reserve (see
    :meth:`OriginRateLimiter.keeping_reserve`); it holds no state of its own."""

    def __init__(self, limiter: OriginRateLimiter) -> None:
        self._limiter = limiter

    async def run(
        self, origin: str, fetch: Callable[[], Awaitable[T]], *, flight_key: Hashable = None
    ) -> T:
        """:meth:`OriginRateLimiter.run` with ``may_use_reserve=False``."""
        return await self._limiter.run(origin, fetch, flight_key=flight_key, may_use_reserve=False)

    def retry_after_ms(self, origin: str) -> int:
        """:meth:`OriginRateLimiter.retry_after_ms` with ``may_use_reserve=False``."""
        return self._limiter.retry_after_ms(origin, may_use_reserve=False)
