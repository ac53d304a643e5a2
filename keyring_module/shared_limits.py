"""The per-origin token bucket and backoff, shared by the processes on one database.

Each process keeps its own :class:`~keyring_module.ratelimit.OriginRateLimiter`: the
fast path, which refuses at once from memory. A fetch it lets through, and which
holds the origin's shared flight (:mod:`~keyring_module.shared_flights`), then asks
the shared state in the database (``origin_limits``, one row per network target,
updated atomically by :meth:`~keyring_module.storage.coordination.Coordination.update_limits`)
before it sends anything, with the same rules and the same ``ratelimit:`` settings:

* a backed-off origin is refused (:class:`~keyring_module.ratelimit.BackedOffError`);
* otherwise one token of the shared bucket is spent, or the fetch is refused
  (:class:`~keyring_module.ratelimit.RateLimitedError`); as in the in-process limiter,
  the last :func:`~keyring_module.ratelimit.reserved_tokens` are for fetches our own
  keyring needs (``may_use_reserve``), so the notary of one process cannot use up
  what the keyring of another needs;

and records its outcome: a success ends the failure streak, an unreachable origin
extends it and backs the origin off for every process
(:class:`~keyring_module.backoff.BackoffSchedule`), an origin that answered badly
changes nothing. So N processes together never reach an origin more often than one
process may. Only fetches that really go out touch the database; a row whose bucket is
full and whose streak is over is deleted, so the table holds only origins fetched
lately::

    limits = SharedOriginLimits(coordination, reactor, config.ratelimit)
    await limits.take("example.org")          # raises when the shared state refuses
    ...                                       # the fetch
    await limits.record("example.org", None)  # or the error it raised
"""

import random as _random
from typing import Callable, Optional

import attr

from keyring_module.backoff import BackoffSchedule
from keyring_module.clock import SecondsClock, now_ms
from keyring_module.config import RateLimitConfig
from keyring_module.ratelimit import (
    BackedOffError,
    RateLimitedError,
    bucket_tokens,
    is_unreachable,
    reserved_tokens,
    token_wait_ms,
)
from keyring_module.servername import network_target
from keyring_module.storage.coordination import Coordination, LimitState, LimitUpdate


@attr.s(auto_attribs=True, slots=True)
class _Streak:
    """A mutable copy of a state's failure streak, for :class:`BackoffSchedule`."""

    failures: int
    backoff_until_ts: int


class LimitRules:
    """The shared state's updates: the limiter's rules on a :class:`LimitState`.

    Args:
        config: burst, interval and backoff bounds.
        random: the backoff jitter's source.

    Example:
        >>> rules = LimitRules(RateLimitConfig(origin_burst=1, origin_interval_ms=1000))
        >>> state, answer = rules.take(0)(None)
        >>> answer, state.tokens
        (0, 0.0)
        >>> rules.take(500)(state)[1]  # half a token: 500 ms to wait
        500
        >>> rules = LimitRules(RateLimitConfig(origin_burst=3, origin_interval_ms=1000))
        >>> state, answer = rules.take(0)(None)  # 3 tokens, 2 of them reserved
        >>> rules.take(0, may_use_reserve=False)(state)[1], rules.take(0)(state)[1]
        (1000, 0)
    """

    def __init__(
        self, config: RateLimitConfig, random: Callable[[], float] = _random.random
    ) -> None:
        self._config = config
        self._backoff = BackoffSchedule(config, random)

    def _fresh(self, now: int) -> LimitState:
        return LimitState(tokens=float(self._config.origin_burst), tokens_ts=now)

    def _tokens(self, state: LimitState, now: int) -> float:
        return bucket_tokens(self._config, state.tokens, state.tokens_ts, now)

    def _idle(self, state: LimitState, now: int) -> bool:
        """Whether the state behaves as a fresh one would (nothing worth keeping)."""
        streak_end = self._backoff.streak_end_ts(state.failures, state.backoff_until_ts)
        return self._tokens(state, now) >= self._config.origin_burst and streak_end <= now

    def take(self, now: int, *, may_use_reserve: bool = True) -> LimitUpdate:
        """Spend a token unless backed off or empty (with ``may_use_reserve`` False:
        unless only the reserve is left).

        The update answers 0 when a token was spent, the ms until a token when the
        bucket is empty, or minus the ms left of the backoff.
        """
        reserve = 0 if may_use_reserve else reserved_tokens(self._config.origin_burst)

        def update(state: Optional[LimitState]) -> tuple[Optional[LimitState], int]:
            if state is None:
                state = self._fresh(now)
            if state.backoff_until_ts > now:
                return state, -(state.backoff_until_ts - now)
            tokens = self._tokens(state, now)
            wait = token_wait_ms(self._config, tokens, reserve)
            if wait:
                return state, wait
            return attr.evolve(state, tokens=tokens - 1, tokens_ts=now), 0

        return update

    def record(self, now: int, unreachable: bool) -> LimitUpdate:
        """A fetch's outcome: ``unreachable`` backs off; otherwise (a success) the
        streak ends. The update answers the backoff's delay (0: none)."""

        def update(state: Optional[LimitState]) -> tuple[Optional[LimitState], int]:
            if state is None:
                state = self._fresh(now)
            delay = 0
            if unreachable:
                streak = _Streak(state.failures, state.backoff_until_ts)
                delay = self._backoff.record_failure(streak, now)
                state = attr.evolve(
                    state, failures=streak.failures, backoff_until_ts=streak.backoff_until_ts
                )
            else:
                state = attr.evolve(state, failures=0, backoff_until_ts=0)
            return (None if self._idle(state, now) else state), delay

        return update


class SharedOriginLimits:
    """The shared token bucket and backoff of each origin (see the module docstring).

    Args:
        coordination: the store's coordination (its ``shared`` must be True).
        clock: where time is read from.
        config: the ``ratelimit:`` settings every process shares.
        random: the backoff jitter's source.
    """

    def __init__(
        self,
        coordination: Coordination,
        clock: SecondsClock,
        config: RateLimitConfig,
        random: Callable[[], float] = _random.random,
    ) -> None:
        self._coordination = coordination
        self._clock = clock
        self._rules = LimitRules(config, random)

    async def take(self, origin: str, *, may_use_reserve: bool = True) -> None:
        """Spend one of the origin's shared tokens (not the reserve if
        ``may_use_reserve`` is False: a fetch on behalf of other servers).

        Raises:
            BackedOffError: another process (or this one) found it unreachable lately.
            RateLimitedError: the processes together spent its tokens.
            StorageError: the database failed.
        """
        target = network_target(origin)
        answer = await self._coordination.update_limits(
            target, self._rules.take(now_ms(self._clock), may_use_reserve=may_use_reserve)
        )
        if answer < 0:
            raise BackedOffError(target, -answer)
        if answer > 0:
            raise RateLimitedError(target, answer)

    async def record(self, origin: str, error: Optional[BaseException]) -> None:
        """Record a fetch's outcome (``error`` None: it succeeded). An origin that
        answered, but badly, changes nothing (as in the in-process limiter).

        Raises:
            StorageError: the database failed.
        """
        unreachable = isinstance(error, Exception) and is_unreachable(error)
        if error is not None and not unreachable:
            return
        await self._coordination.update_limits(
            network_target(origin), self._rules.record(now_ms(self._clock), unreachable)
        )
