"""The policy for upstream notaries: a concurrency cap and backoff, no token bucket.

A trusted notary is one configured server answering for many others, so the per-origin
token bucket (a few fetches, then one a minute) would starve every lookup that needs it
after a handful of queries. Instead each query to a notary goes through one
:class:`NotaryLimiter` shared by the notary fetchers::

    answers = await limiter.run("notary.example.org", query, flight_key=requests)

``run`` applies, in this order:

1. **Single flight.** Identical concurrent queries (same notary, same ``flight_key``)
   share one query; joining needs no slot.
2. **Backoff.** While the notary is backed off, ``run`` raises
   :class:`~keyring_module.ratelimit.BackedOffError` at once. A notary is backed off
   when it could not be reached, answered 5xx, or answered something that is no key
   query answer (not JSON, too large, no ``server_keys`` array): ``failure_backoff_initial``
   doubling up to ``failure_backoff_max`` (:mod:`~keyring_module.backoff`). A 429 is
   honoured: the backoff lasts its ``retry_after_ms`` (the body's, else the
   ``Retry-After`` header's), at most ``failure_backoff_max``; a 429 without either is a
   failure like 5xx. Any other 4xx (it refused that query, not every query) backs
   nothing off. A successful query ends the backoff.
3. **Concurrency cap.** At most ``ratelimit.notary_max_concurrent`` queries to one
   notary at once, then a slot of the global cap (``federation.max_concurrent_fetches``);
   beyond them new queries wait in bounded FIFO queues
   (:mod:`~keyring_module.fetch_slots`), and beyond the queues ``run`` raises
   :class:`~keyring_module.ratelimit.BusyError` at once, which backs nothing off. A
   query that waited for its notary's slot and then finds the global queue full is
   refused the same way.

The notary limiter's state is its own: a notary and an origin with the same name share
nothing (the origin's bucket and backoff live in the
:class:`~keyring_module.ratelimit.OriginRateLimiter`). There is one state per notary
a query was sent to (a refused one leaves none), and notaries come from the
configuration, so states are never pruned.
"""

import logging
import random as _random
from typing import Awaitable, Callable, Hashable, Optional, TypeVar, Union

import attr
from twisted.python.failure import Failure

from keyring_module.backoff import BackoffSchedule
from keyring_module.clock import ReactorClock, now_ms
from keyring_module.config import RateLimitConfig
from keyring_module.fetch_slots import FetchSlots
from keyring_module.flights import Flight
from keyring_module.http import FederationRequestError, HttpStatusError, InvalidServerNameError
from keyring_module.json_codec import loads_strict
from keyring_module.ratelimit import BackedOffError, refuse_if_busy, start_flight
from keyring_module.validation import InvalidKeyResponseError

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: What counts as a failure of the notary: any failed request (unreachable, 5xx, a body
#: that is not JSON or too large; 4xx other than 429 excepted) or an answer that is no
#: key query answer.
FAILURE_ERRORS = (FederationRequestError, InvalidKeyResponseError)

#: Told ``(notary, delay_ms)`` each time a notary is backed off, e.g. to count it.
BackoffHook = Callable[[str, int], None]


def retry_after_hint_ms(error: HttpStatusError) -> Optional[int]:
    """How long a 429 asked us to wait: the body's ``retry_after_ms``, else the
    ``Retry-After`` header's; None when neither is given.

    Example:
        >>> retry_after_hint_ms(HttpStatusError(429, b'{"retry_after_ms": 2000}'))
        2000
        >>> retry_after_hint_ms(HttpStatusError(429, b"<html>slow down</html>")) is None
        True
        >>> retry_after_hint_ms(HttpStatusError(429, b"[" * 1000)) is None
        True
    """
    try:
        body = loads_strict(error.body)
    except ValueError:  # not JSON, or nested too deep (a hostile 429 body)
        body = None
    hinted = body.get("retry_after_ms") if isinstance(body, dict) else None
    if isinstance(hinted, int) and not isinstance(hinted, bool) and hinted >= 0:
        return hinted
    return error.retry_after_ms


@attr.s(auto_attribs=True, slots=True)
class _NotaryState:
    """What the limiter remembers about one notary."""

    slots: FetchSlots
    failures: int = 0
    backoff_until_ts: int = 0
    flights: dict[Hashable, Flight] = attr.Factory(dict)


class NotaryLimiter:
    """Single flight, a concurrency cap and backoff per upstream notary.

    Args:
        clock: where time is read from.
        config: ``notary_max_concurrent`` and the backoff bounds.
        random: returns a float in [0, 1); used for the backoff jitter.
        fetch_slots: the slots every outbound fetch shares (no global cap when None).
        on_backoff: told ``(notary, delay_ms)`` each time a notary is backed off.

    Example:
        >>> from twisted.internet import defer
        >>> from twisted.internet.task import Clock
        >>> limiter = NotaryLimiter(Clock(), RateLimitConfig())
        >>> async def query() -> str:
        ...     return "answers"
        >>> [defer.ensureDeferred(limiter.run("n.org", query)).result for _ in range(20)][-1]
        'answers'
    """

    def __init__(
        self,
        clock: ReactorClock,
        config: RateLimitConfig,
        random: Callable[[], float] = _random.random,
        fetch_slots: Optional[FetchSlots] = None,
        on_backoff: Optional[BackoffHook] = None,
    ) -> None:
        self._clock = clock
        self._config = config
        self._backoff = BackoffSchedule(config, random)
        self._global_slots = () if fetch_slots is None else (fetch_slots,)
        self._on_backoff = on_backoff
        self._notaries: dict[str, _NotaryState] = {}

    async def run(
        self, notary: str, fetch: Callable[[], Awaitable[T]], *, flight_key: Hashable = None
    ) -> T:
        """Run ``fetch`` (a query to ``notary``) unless the limiter refuses.

        Args:
            notary: the notary's configured server name.
            fetch: sends the query; called at most once per flight.
            flight_key: concurrent runs with equal keys share one query.

        Returns:
            The (possibly shared) result of ``fetch``.

        Raises:
            BackedOffError: the notary failed recently or asked us to wait.
            BusyError: its slots (or the global ones) are taken and the queues full.
            Exception: whatever the (shared) fetch raised.
        """
        now = now_ms(self._clock)
        state = self._notaries.get(notary)
        if state is not None:
            flight = state.flights.get(flight_key)
            if flight is not None:
                result: T = await flight.join()  # type: ignore[assignment]
                return result
            if state.backoff_until_ts > now:
                raise BackedOffError(notary, state.backoff_until_ts - now)
        else:
            # Stored only once a query starts: a refused name leaves no state behind.
            state = _NotaryState(FetchSlots(self._config.notary_max_concurrent))
        slots = (state.slots, *self._global_slots)
        refuse_if_busy(notary, slots)
        self._notaries[notary] = state
        flight_state = state
        waiter = start_flight(
            state.flights,
            flight_key,
            notary,
            fetch,
            slots,
            lambda outcome, flight: self._finish(outcome, notary, flight_state, flight),
        )
        result = await waiter  # type: ignore[assignment]
        return result

    def is_backed_off(self, notary: str) -> bool:
        """Whether ``run`` would refuse ``notary`` now because of its backoff."""
        state = self._notaries.get(notary)
        return state is not None and state.backoff_until_ts > now_ms(self._clock)

    def tracked_notaries(self) -> int:
        """How many notaries the limiter holds state for (those a query was sent to)."""
        return len(self._notaries)

    def backed_off_notaries(self) -> int:
        """How many notaries are backed off now."""
        now = now_ms(self._clock)
        return sum(1 for s in self._notaries.values() if s.backoff_until_ts > now)

    def _back_off(self, state: _NotaryState, error: Optional[BaseException], now: int) -> int:
        """Back the notary off as ``error`` calls for; returns the delay (0: none)."""
        if isinstance(error, HttpStatusError):
            if error.code == 429:
                hinted = retry_after_hint_ms(error)
                if hinted is not None:
                    delay = min(hinted, self._backoff.max_ms)
                    state.backoff_until_ts = max(state.backoff_until_ts, now + delay)
                    return delay
            elif error.code < 500:
                return 0  # it refused this query, not every query
        elif not isinstance(error, FAILURE_ERRORS) or isinstance(error, InvalidServerNameError):
            return 0  # not the notary's failure (a bug, our full worker pool)
        return self._backoff.record_failure(state, now)

    def _finish(
        self, outcome: Union[object, Failure], notary: str, state: _NotaryState, flight: Flight
    ) -> None:
        """Update the notary's state once a query is over (it has left the flights)."""
        if not isinstance(outcome, Failure):
            if state.failures or state.backoff_until_ts:
                logger.info("Notary %s answers again; backoff reset", notary)
            state.failures = 0
            state.backoff_until_ts = 0
        elif flight.started:
            delay = self._back_off(state, outcome.value, now_ms(self._clock))
            if delay:
                logger.info(
                    "Backing off notary %s for %d ms: %s", notary, delay, outcome.getErrorMessage()
                )
                if self._on_backoff is not None:
                    self._on_backoff(notary, delay)
