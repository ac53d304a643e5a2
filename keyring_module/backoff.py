"""The failure backoff schedule shared by the origin and notary limiters.

After the ``n``-th failure in a row a server is backed off for
``failure_backoff_initial * 2**(n-1)``, at most ``failure_backoff_max``, each delay
jittered by up to ±:data:`BACKOFF_JITTER`. A failure streak ends once the backoff has
been over for as long as the *next* delay would be (the unjittered delay of one more
failure); a failure after that counts as a first one again. So a server that keeps
failing while it is asked, even only once per backoff, backs off exponentially up to
the maximum, and one that failed once is forgotten soon (after the first 30 s backoff
and 60 s more, with the defaults).
"""

import random as _random
from typing import Callable, Protocol

from keyring_module.config import RateLimitConfig

#: The fraction by which each backoff delay is randomly lengthened or shortened.
BACKOFF_JITTER = 0.2


class BackoffState(Protocol):
    """What a limiter remembers about one server's failures."""

    #: The failures in the current streak.
    failures: int
    #: Until when the server is backed off (ms).
    backoff_until_ts: int


class BackoffSchedule:
    """How long to back off after a number of failures in a row.

    Args:
        config: ``failure_backoff_initial`` and ``failure_backoff_max``.
        random: returns a float in [0, 1); used for the jitter.

    Example:
        >>> schedule = BackoffSchedule(RateLimitConfig(), random=lambda: 0.5)
        >>> [schedule.delay_ms(n) for n in (1, 2, 3)]
        [30000, 60000, 120000]
        >>> schedule.streak_end_ts(failures=1, backoff_until_ts=30_000)
        90000

        A limiter records each failure in its state for the server:

        >>> import attr
        >>> state = attr.make_class("State", {"failures": attr.ib(0), "backoff_until_ts": attr.ib(0)})()
        >>> schedule.record_failure(state, now_ms=0), schedule.record_failure(state, now_ms=30_000)
        (30000, 60000)
        >>> state.failures, state.backoff_until_ts
        (2, 90000)
    """

    def __init__(
        self, config: RateLimitConfig, random: Callable[[], float] = _random.random
    ) -> None:
        self.initial_ms = config.failure_backoff_initial_ms
        self.max_ms = config.failure_backoff_max_ms
        self._random = random

    def base_delay_ms(self, failures: int) -> int:
        """The delay after ``failures`` failures in a row, without jitter."""
        return min(self.max_ms, self.initial_ms << min(max(failures, 1) - 1, 62))

    def delay_ms(self, failures: int) -> int:
        """The jittered delay after ``failures`` failures in a row (at most the maximum)."""
        factor = 1 + BACKOFF_JITTER * (2 * self._random() - 1)
        return max(0, min(self.max_ms, round(self.base_delay_ms(failures) * factor)))

    def streak_end_ts(self, failures: int, backoff_until_ts: int) -> int:
        """When a failure streak ends: the backoff's end plus the next (unjittered) delay.

        Waiting for the *next* delay, not the last one, is what lets the backoff grow for
        a server asked about once per backoff period: each failure lands inside the
        streak, so the delays double (30 s, 60 s, 2 min, ... up to the maximum).
        """
        if not failures:
            return backoff_until_ts
        return backoff_until_ts + self.base_delay_ms(failures + 1)

    def record_failure(self, state: BackoffState, now_ms: int) -> int:
        """Count a failure in ``state``'s streak (a new streak once the last one is over)
        and back it off for the streak's delay from ``now_ms`` (never shortening a
        longer backoff).

        Returns:
            The delay in ms.
        """
        if now_ms >= self.streak_end_ts(state.failures, state.backoff_until_ts):
            state.failures = 0
        state.failures += 1
        delay = self.delay_ms(state.failures)
        state.backoff_until_ts = max(state.backoff_until_ts, now_ms + delay)
        return delay
