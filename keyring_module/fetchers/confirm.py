"""Direct confirmation of provisional keys, on the origin limiter's schedule.

With ``key_trust.confirm_notary_keys_directly``, keys learned from notaries are
*provisional* until the origin itself confirms them. After a fetch call returns such
keys, the chain asks :class:`DirectConfirmations` to confirm the server: one direct fetch
from the origin (through the per-origin limiter), in the background, at once if the
limiter would let it through, else when it would (and, when the call's own fetch from
that origin has just failed, as after a failed attempt). When the origin
answers, its keys replace the provisional ones (the trust policy lets the origin's
answer override a provisional key). When it does not, the next attempt is scheduled on
a reactor timer, with no new request needed:

* the delay is ``retry_after_ms(server_name)``, the time until the per-origin limiter
  lets a fetch through again (the rest of the origin's backoff, or the wait for a
  token); when that is 0 right after a failure (an origin answering an HTTP error need
  not be backed off), ``retry_ms`` (``ratelimit.failure_backoff_initial``) is used, so a
  provisional key is replaced within one backoff interval after its origin comes back;
* when the timer fires, the server's stored keys are read first: if none is
  provisional any more (e.g. another fetch stored the origin's answer), the series ends;
  if the limiter would still refuse (another fetch failed or took the last token
  meanwhile), the attempt is put off until it would not, without counting;
* after ``max_attempts`` failed attempts in a row the series ends (logged); so does a
  series whose attempt reached the origin. A later call that returns provisional keys
  starts a new series, but not within ``retry_ms`` of the end of the last one.

At most ``max_tracked`` servers are tracked (series running or scheduled, and the
recently ended ones): beyond that the oldest is dropped (its timer cancelled).
:meth:`DirectConfirmations.close` cancels every timer; :meth:`DirectConfirmations.wait`
waits for the attempts running now::

    confirmations = DirectConfirmations(
        reactor, confirm_once, still_provisional, retry_after_ms=limiter.retry_after_ms
    )
    confirmations.request("example.org", trace=None, origin_failed=False)
"""

import logging
from collections import OrderedDict
from typing import Awaitable, Callable, Optional

import attr
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall

from keyring_module.clock import ReactorClock, now_ms
from keyring_module.fetchers.background import BackgroundWork
from keyring_module.fetchers.trace import FetchTrace

# The chain's lines share the chain's logger, which operators filter on.
logger = logging.getLogger("keyring_module.fetchers.chain")

#: The delay before retrying a failed confirmation when the limiter would let a fetch
#: through at once (the default ``ratelimit.failure_backoff_initial``).
CONFIRM_RETRY_MS = 30_000
#: How many failed attempts in a row end a series of confirmations.
MAX_CONFIRM_ATTEMPTS = 10
#: How many servers are tracked.
MAX_CONFIRM_ENTRIES = 10_000

#: ``confirm(server_name, trace)``: one direct fetch; True when the origin answered
#: (and its answer was judged and stored), False when it gave nothing usable.
ConfirmOnce = Callable[[str, Optional[FetchTrace]], Awaitable[bool]]
#: ``still_provisional(server_name)``: whether the server has provisional keys stored.
StillProvisional = Callable[[str], Awaitable[bool]]


@attr.s(auto_attribs=True, slots=True)
class _Series:
    """One server's confirmations: failed attempts so far and the next timer.

    ``ended_ts`` is set once the series is over (kept to pace the next one).
    """

    failures: int = 0
    timer: Optional[IDelayedCall] = None
    ended_ts: Optional[int] = None


class DirectConfirmations:
    """Confirms servers' provisional keys directly, retrying on the limiter's schedule.

    Args:
        clock: where the timers are scheduled.
        confirm: makes one direct fetch for a server (see :data:`ConfirmOnce`).
        still_provisional: reads whether a server still has provisional keys.
        retry_after_ms: how long until the per-origin limiter lets a fetch for a
            server through (``OriginRateLimiter.retry_after_ms``); None: always 0.
        retry_ms: the delay after a failure when ``retry_after_ms`` says 0, and the
            least time between two series for one server.
        max_attempts: failed attempts in a row that end a series.
        max_tracked: how many servers are tracked at most.
    """

    def __init__(
        self,
        clock: ReactorClock,
        confirm: ConfirmOnce,
        still_provisional: StillProvisional,
        *,
        retry_after_ms: Optional[Callable[[str], int]] = None,
        retry_ms: int = CONFIRM_RETRY_MS,
        max_attempts: int = MAX_CONFIRM_ATTEMPTS,
        max_tracked: int = MAX_CONFIRM_ENTRIES,
    ) -> None:
        self._clock = clock
        self._confirm = confirm
        self._still_provisional = still_provisional
        self._retry_after_ms = retry_after_ms
        self._retry_ms = max(1, retry_ms)
        self._max_attempts = max(1, max_attempts)
        self._max_tracked = max(1, max_tracked)
        self._series: OrderedDict[str, _Series] = OrderedDict()
        self._attempts = BackgroundWork()
        self._closed = False

    @property
    def scheduled(self) -> int:
        """How many servers have a retry scheduled."""
        return sum(1 for s in self._series.values() if s.timer is not None)

    def request(self, server_name: str, trace: Optional[FetchTrace], origin_failed: bool) -> None:
        """Start confirming a server whose stored keys include provisional ones.

        Nothing happens while a series for it runs (or is scheduled), or within
        ``retry_ms`` of the end of the last one.

        Args:
            server_name: the server.
            trace: where the first attempt is recorded, if anyone asked.
            origin_failed: whether the origin was just asked and gave nothing usable;
                the first attempt then waits as after a failed one.
        """
        if self._closed:
            return
        series = self._series.get(server_name)
        if series is not None:
            if series.ended_ts is None:
                return
            if now_ms(self._clock) < series.ended_ts + self._retry_ms:
                return
        series = _Series()
        self._series[server_name] = series
        self._series.move_to_end(server_name)
        self._bound()
        if origin_failed:
            self._schedule(server_name, series, self._delay_after_failure(server_name))
            return
        wait_ms = self._limiter_wait_ms(server_name)
        if wait_ms > 0:
            self._schedule(server_name, series, wait_ms)
        else:
            self._due(server_name, series, trace)

    async def wait(self) -> None:
        """Wait until the attempts running now have finished (not for scheduled ones)."""
        await self._attempts.wait()

    def close(self) -> None:
        """Cancel every scheduled attempt, and start no more."""
        self._closed = True
        for series in self._series.values():
            if series.timer is not None and series.timer.active():
                series.timer.cancel()
            series.timer = None
        self._series.clear()

    def _bound(self) -> None:
        while len(self._series) > self._max_tracked:
            _, dropped = self._series.popitem(last=False)
            if dropped.timer is not None and dropped.timer.active():
                dropped.timer.cancel()
            dropped.timer = None

    def _limiter_wait_ms(self, server_name: str) -> int:
        return 0 if self._retry_after_ms is None else max(0, self._retry_after_ms(server_name))

    def _delay_after_failure(self, server_name: str) -> int:
        wait_ms = self._limiter_wait_ms(server_name)
        return wait_ms if wait_ms > 0 else self._retry_ms

    def _schedule(self, server_name: str, series: _Series, delay_ms: int) -> None:
        series.timer = self._clock.callLater(delay_ms / 1000, self._fired, server_name, series)

    def _fired(self, server_name: str, series: _Series) -> None:
        series.timer = None
        if self._series.get(server_name) is not series:
            return  # dropped meanwhile
        wait_ms = self._limiter_wait_ms(server_name)
        if wait_ms > 0:
            self._schedule(server_name, series, wait_ms)  # not let through yet: put off
            return
        self._due(server_name, series, None, check_first=True)

    def _due(
        self,
        server_name: str,
        series: _Series,
        trace: Optional[FetchTrace],
        check_first: bool = False,
    ) -> None:
        attempt = defer.ensureDeferred(self._attempt(server_name, series, trace, check_first))
        self._attempts.track(attempt, "confirming the keys of " + server_name)

    async def _attempt(
        self, server_name: str, series: _Series, trace: Optional[FetchTrace], check_first: bool
    ) -> None:
        try:
            if check_first and not await self._still_provisional(server_name):
                self._end(server_name, series)
                return
            answered = await self._confirm(server_name, trace)
        except Exception:
            self._end(server_name, series)
            raise
        if answered:
            self._end(server_name, series)
            return
        series.failures += 1
        if series.failures >= self._max_attempts:
            logger.info(
                "Could not confirm the notary-provided keys of %s directly after %d "
                "attempts; giving up until they are asked for again",
                server_name,
                series.failures,
            )
            self._end(server_name, series)
            return
        if self._closed or self._series.get(server_name) is not series:
            return
        delay_ms = self._delay_after_failure(server_name)
        logger.info(
            "Could not confirm the notary-provided keys of %s directly; retrying in %d ms",
            server_name,
            delay_ms,
        )
        self._schedule(server_name, series, delay_ms)

    def _end(self, server_name: str, series: _Series) -> None:
        series.ended_ts = now_ms(self._clock)
        if self._series.get(server_name) is series:
            self._series.move_to_end(server_name)
