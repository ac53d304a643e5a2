"""The notary's fetches of servers' keys: those a query waits for, and background refreshes.

The servers a query must fetch first (:attr:`~keyring_module.notary.plan.Step.FETCH`)
are fetched with one call of the shared chain, so each trusted notary is asked once
about them all, and each is answered as soon as the chain reports its keys; those not
reported within the request timeout (or when the fetch fails) are answered from the
store, and the fetch goes on and stores what it finds. A caller holding the fetches to
a client's share gives a :class:`~keyring_module.notary.client_budget.FetchLease`,
which gets a unit back as each server is settled, and the rest when the fetch ends.

Servers to refresh (:attr:`~keyring_module.notary.plan.Step.REFRESH`) are refreshed in
the background with one call of the chain, once per server at a time, at most
:func:`background_refresh_cap` servers at once (a quarter of
``federation.max_concurrent_fetches``, so that refreshes, which nobody waits for, never
hold the whole global cap; beyond it a refresh is skipped and counted as
``refresh_cap``). Refreshes count against their client's share too: a lease given for
them gets a unit back as each refreshed server is settled (at once for a server already
being refreshed, or skipped), and the rest when the refresh ends. Every server fetched
or refreshed is recorded in
:class:`~keyring_module.notary.attempts.FetchAttempts`, so the next plans take the
servers tried least recently first::

    fetches = ServerFetches(store, chain, reactor, 10_000, answerer)
    skipped = fetches.refresh_in_background(plan.servers, plan.now_ms, refresh_lease)
    answers = await fetches.fetch_then_answer(
        [s for s in plan.servers if s.step is Step.FETCH], plan.now_ms, lease
    )
"""

import logging
from typing import Any, Callable, Mapping, Optional, Sequence

from twisted.internet import defer
from twisted.python.failure import Failure

from keyring_module.clock import ReactorClock, now_ms
from keyring_module.config import FederationConfig
from keyring_module.fetchers.base import KeySource
from keyring_module.metrics import AnswerResult, Metrics, SkippedFetch
from keyring_module.model import KeyRequest, StoredKey
from keyring_module.notary.attempts import FetchAttempts
from keyring_module.notary.client_budget import FetchLease
from keyring_module.notary.freshness import Verdict, judge_query
from keyring_module.notary.plan import ServerPlan, Step
from keyring_module.notary.query import ServerQuery
from keyring_module.notary.stored_answers import ServerAnswer, StoredAnswerer, gather_answers
from keyring_module.storage import KeyStore

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAX_BACKGROUND_REFRESHES", "ServerFetches", "background_refresh_cap"]

#: The share of ``federation.max_concurrent_fetches`` background refreshes may hold.
BACKGROUND_REFRESH_SHARE = 4


def background_refresh_cap(max_concurrent_fetches: int) -> int:
    """How many servers may be refreshed in the background at once: a quarter of the
    global fetch cap (at least one), so that refreshes never take the whole cap from
    the fetches queries wait for.

    Example:
        >>> background_refresh_cap(256), background_refresh_cap(3)
        (64, 1)
    """
    return max(1, max_concurrent_fetches // BACKGROUND_REFRESH_SHARE)


#: Servers refreshed in the background at once, by default.
DEFAULT_MAX_BACKGROUND_REFRESHES = background_refresh_cap(FederationConfig().max_concurrent_fetches)


class ServerFetches:
    """Fetches servers' keys through the chain for the notary, and answers the
    servers a query waits for.

    Args:
        store: the key store (with its in-memory cache in front).
        refresher: the shared fetcher chain; fetches go through the per-origin limiter.
        clock: the reactor (time, and the request timeout).
        request_timeout_ms: how long a query waits for a needed fetch before answering
            from the store anyway.
        answerer: answers each fetched server from its keys.
        metrics: where to count the fetches skipped (optional).
        max_background_refreshes: how many servers may be refreshed in the background
            at once (see :func:`background_refresh_cap`).
    """

    def __init__(
        self,
        store: KeyStore,
        refresher: KeySource,
        clock: ReactorClock,
        request_timeout_ms: int,
        answerer: StoredAnswerer,
        metrics: Optional[Metrics] = None,
        max_background_refreshes: int = DEFAULT_MAX_BACKGROUND_REFRESHES,
    ) -> None:
        self._store = store
        self._refresher = refresher
        self._clock = clock
        self._timeout_s = request_timeout_ms / 1000
        self._answerer = answerer
        self._metrics = metrics
        self._max_refreshes = max_background_refreshes
        self._refreshing: set[str] = set()  # servers refreshed in the background now
        self._attempts = FetchAttempts()

    @property
    def attempts(self) -> FetchAttempts:
        """When the servers fetched or refreshed lately were last tried."""
        return self._attempts

    @property
    def refreshing(self) -> frozenset[str]:
        """The servers being refreshed in the background now."""
        return frozenset(self._refreshing)

    def is_refreshing(self, server_name: str) -> bool:
        """Whether ``server_name`` is being refreshed in the background now."""
        return server_name in self._refreshing

    def count_skipped(self, reason: SkippedFetch, count: int) -> None:
        """Count ``count`` fetches of one query not made, for ``reason``."""
        logger.debug("Skipped %d fetches of one key query (%s)", count, reason.value)
        if self._metrics is not None:
            self._metrics.notary_fetches_skipped.labels(reason.value).inc(count)

    async def fetch_then_answer(
        self, servers: Sequence[ServerPlan], now: int, lease: Optional[FetchLease] = None
    ) -> list[ServerAnswer]:
        """Fetch ``servers`` with one call of the chain (each trusted notary is asked
        once about them all), and answer each from its keys as soon as the chain reports
        them: stale if the fetch did not satisfy the query. Those not reported within the
        request timeout (or when the fetch fails) are answered from the store; the fetch
        goes on and stores what it finds. ``lease`` gets a unit back for each server the
        chain reports, and the rest when the fetch call ends."""
        reported: dict[str, "defer.Deferred[Optional[Mapping[str, StoredKey]]]"] = {
            s.query.server_name: defer.Deferred() for s in servers
        }
        unsettled = set(reported)
        self._attempts.tried(reported, now)

        def report(server_name: str, keys: Optional[Mapping[str, StoredKey]]) -> None:
            waiting = reported.get(server_name)
            if waiting is not None and not waiting.called:
                waiting.callback(keys)

        def settled(server_name: str, keys: Optional[Mapping[str, StoredKey]]) -> None:
            if lease is not None and server_name in unsettled:
                unsettled.discard(server_name)
                lease.release()
            report(server_name, keys)

        def give_up() -> None:
            for server_name in reported:
                report(server_name, None)

        def fetch_ended() -> None:
            if lease is not None:
                lease.release_all()
            give_up()

        def expire() -> None:
            waiting = [name for name, d in reported.items() if not d.called]
            if waiting:
                logger.info(
                    "Key fetch for %d servers (e.g. %s) still running after %.1fs;"
                    " answering from the store",
                    len(waiting),
                    waiting[0],
                    self._timeout_s,
                )
            give_up()

        def failed(f: Failure) -> None:
            logger.warning(
                "Key fetch for %d servers (e.g. %s) failed: %s",
                len(servers),
                servers[0].query.server_name,
                f.getErrorMessage(),
            )

        requests = [_refresh_request(s.query, now) for s in servers]
        fetch = defer.ensureDeferred(
            self._refresher.get_keys(requests, use_cache=False, on_server=settled)
        )
        _when_done(fetch, failed, fetch_ended)
        timer = self._clock.callLater(self._timeout_s, expire)
        try:
            return await gather_answers(
                [
                    defer.ensureDeferred(
                        self._answer_reported(s.query, reported[s.query.server_name])
                    )
                    for s in servers
                ]
            )
        finally:
            if timer.active():
                timer.cancel()

    async def _answer_reported(
        self,
        query: ServerQuery,
        reported: "defer.Deferred[Optional[Mapping[str, StoredKey]]]",
    ) -> ServerAnswer:
        """One fetched server's answer, from the keys the chain reports (None: not in
        time; empty: a name the chain refused or knows nothing of), else from the store."""
        keys = await reported
        if not keys:
            keys = await self._store.get_server_keys(query.server_name)
        now = now_ms(self._clock)
        fetched = judge_query(query, keys, now) is not Verdict.FETCH
        result = AnswerResult.FETCHED if fetched else AnswerResult.STALE
        return await self._answerer.answer_with(query, keys, now, result)

    def refresh_in_background(
        self, servers: Sequence[ServerPlan], now: int, lease: Optional[FetchLease] = None
    ) -> frozenset[str]:
        """Refresh ``servers`` (those whose step is REFRESH) in the background, with one
        call of the chain; returns the names not refreshed for lack of room.

        A server already being refreshed is not refreshed again (it counts as
        refreshed). At most ``max_background_refreshes`` servers are refreshed at once;
        the others are skipped and counted as ``refresh_cap``. A server leaves the
        refreshing set as soon as the chain reports its keys.

        Args:
            servers: the servers of a plan (only those whose step is REFRESH count).
            now: when the plan was made.
            lease: the client's share the refreshes hold (a unit per refresh): a unit
                goes back as each refreshed server is settled, the rest when the
                refresh ends; the units of servers not started go back at once.
        """
        wanted = [
            s.query
            for s in servers
            if s.step is Step.REFRESH and s.query.server_name not in self._refreshing
        ]
        room = max(0, self._max_refreshes - len(self._refreshing))
        started, skipped = wanted[:room], wanted[room:]
        if lease is not None:
            started_lease = lease.split(len(started))
            lease.release_all()  # servers already being refreshed, or skipped
            lease = started_lease
        if skipped:
            self.count_skipped(SkippedFetch.REFRESH_CAP, len(skipped))
        if started:
            self._start_refresh(started, now, lease)
        return frozenset(q.server_name for q in skipped)

    def _start_refresh(
        self, queries: Sequence[ServerQuery], now: int, lease: Optional[FetchLease]
    ) -> None:
        running = {q.server_name for q in queries}
        self._refreshing.update(running)
        self._attempts.tried(running, now)

        def settled(server_name: str, keys: Mapping[str, StoredKey]) -> None:
            if server_name in running:
                running.discard(server_name)
                self._refreshing.discard(server_name)
                if lease is not None:
                    lease.release()

        def failed(f: Failure) -> None:
            logger.warning(
                "Background key refresh of %d servers (e.g. %s) failed: %s",
                len(queries),
                queries[0].server_name,
                f.getErrorMessage(),
            )

        def finished() -> None:
            self._refreshing.difference_update(running)
            running.clear()
            if lease is not None:
                lease.release_all()

        requests = [_refresh_request(q, now) for q in queries]
        d = defer.ensureDeferred(
            self._refresher.get_keys(requests, use_cache=False, on_server=settled)
        )
        _when_done(d, failed, finished)


def _when_done(
    fetch: "defer.Deferred[Any]",
    failed: Callable[[Failure], None],
    ended: Callable[[], None],
) -> None:
    """When ``fetch`` ends: ``failed`` if it failed, then ``ended`` whatever happened
    (even if ``failed`` raised), so what the fetch holds is always handed back; an
    error of either is logged."""

    def end(result: object) -> object:
        ended()
        return result

    fetch.addErrback(failed)
    fetch.addBoth(end)
    fetch.addErrback(lambda f: logger.error("Ending a key fetch went wrong: %s", f.getTraceback()))


def _refresh_request(query: ServerQuery, now: int) -> KeyRequest:
    """The chain's request for what ``query`` asks (its highest minimum, else now)."""
    minimum = query.highest_minimum()
    return KeyRequest(
        server_name=query.server_name,
        key_ids=frozenset(query.key_criteria) if query.key_criteria else None,
        minimum_valid_until_ts=now if minimum is None else minimum,
    )
