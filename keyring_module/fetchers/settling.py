"""One fetch round of the chain: ask the sources, settle each server as answers arrive.

A *round* is what one :meth:`~keyring_module.fetchers.chain.KeyFetcherChain.get_keys`
call fetches: the servers the store could not answer. The origin fetcher is asked about
each server on its own (one ``fetch_keys`` call per server), each notary fetcher about
all the round's servers at once (one call per notary fetcher, so one POST per notary per
round), each call bounded by the chain's timeout.

A server is **settled** (its trusted answers stored, its keys read again and reported
through ``on_server``) as soon as the answers in so far are enough: the trust policy
accepts them and the keys it would store answer the request
(:meth:`~keyring_module.model.KeyRequest.is_satisfied_by`). Otherwise it is settled
when every source asked about it has answered or timed out and no stage is left. The
round returns as soon as each server is settled: it never waits for a source it no
longer needs.

* **N = 1** (``min_agreeing_sources``): the stages run in ``order``, and only servers
  still unsettled go on to the next. A stage has a **head start** of half the source
  timeout (:data:`HEAD_START_SHARE`): the next stage is asked about the servers still
  unsettled once every server of the stage has heard from all its calls, or once the
  head start is over, whichever comes first. Calls still running then go on (each up
  to its own timeout), and the **first** trusted answer that satisfies a server settles
  it, whichever stage it comes from. With ``("origin", "notaries")`` a server whose
  origin answers well is settled by that answer; the others go to the notaries
  together (one query per notary), at the latest half a timeout after the round began,
  while a hanging origin is still waited for. The notaries are asked in parallel. With
  ``("notaries", "origin")`` the same holds with the roles swapped: the servers no
  notary has answered well go on to their origins once all notaries are in, or after
  the head start.
* **N > 1**: the origins and the notaries are asked at once, and a server is settled as
  soon as N sources agree, whether or not the others have answered.

Answers that arrive after their server was settled (from a source still running when
the server was settled, up to that source's timeout) are still judged by the trust
policy against the keys stored by then, and stored if trusted; their conflicts are
recorded and reported. That happens in the background
(:class:`~keyring_module.fetchers.background.BackgroundWork`), one write at a time per
server, and is recorded in the call's trace if it has one (a trace read before then
does not show it).
"""

import logging
from typing import Callable, Mapping, Optional, Sequence

import attr
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure

from keyring_module.clock import ReactorClock, now_ms
from keyring_module.fetchers import trust
from keyring_module.fetchers.asking import ask_source
from keyring_module.fetchers.background import BackgroundWork
from keyring_module.fetchers.base import (
    FetchResult,
    KeyFetcher,
    ServerKeysReport,
    SourceAnswers,
    SourceFailure,
)
from keyring_module.fetchers.store import StoreKeyFetcher
from keyring_module.fetchers.storing import TrustedAnswerWriter
from keyring_module.fetchers.trace import FetchTrace, ServerTrace
from keyring_module.model import KeyRequest, StoredKey
from keyring_module.storage import KeyStore

# The chain's lines share the chain's logger, which operators filter on.
logger = logging.getLogger("keyring_module.fetchers.chain")

ORIGIN = "origin"
NOTARIES = "notaries"

#: The share of the source timeout that a stage has to itself before the servers it
#: has not answered yet are sent to the next stage too. The notary service waits for a
#: fetch only ``federation.request_timeout``, the very timeout each source gets: a
#: stage given the whole of it would leave nothing for the next, so a server whose
#: origin hangs would never be answered through the notaries in time. Half leaves the
#: other half to the next stage (a notary with the keys at hand answers in well under a
#: second), while a live origin, which answers in about a round trip, rarely needs more
#: than a small part of its half.
HEAD_START_SHARE = 0.5


@attr.s(auto_attribs=True, slots=True)
class FetchRound:
    """One ``get_keys`` call: what is wanted, the answers so far, the servers reported.

    Attributes:
        wanted: the merged requests, by server name.
        stored: the servers' stored keys before the round (what ``trust.decide`` judges
            against).
        fetched_ts: the ``fetched_ts`` of everything the round itself stores.
        on_server: the caller's hook, if any.
        trace: where to record what happened, if anyone asked.
        from_origin: the origin's answers, by server name.
        from_notaries: the notaries' answers, by server name and notary index.
        origin_asked: the servers whose origin was asked in this round.
        failures: why sources gave nothing usable about each server, in the order the
            failures came (for the log line about servers left unanswered).
        writing: the servers settled (or being settled), each with a lock that orders
            the writes about it (its settling first, then late answers).
        keys: the final keys of each server reported so far (the call's result).
    """

    wanted: Mapping[str, KeyRequest]
    stored: Mapping[str, dict[str, StoredKey]]
    fetched_ts: int
    on_server: Optional[ServerKeysReport]
    trace: Optional[FetchTrace] = None
    from_origin: dict[str, list[FetchResult]] = attr.Factory(dict)
    from_notaries: dict[str, dict[int, list[FetchResult]]] = attr.Factory(dict)
    origin_asked: set[str] = attr.Factory(set)
    failures: dict[str, list[SourceFailure]] = attr.Factory(dict)
    writing: dict[str, defer.DeferredLock] = attr.Factory(dict)
    keys: dict[str, dict[str, StoredKey]] = attr.Factory(dict)

    def answers(self, server_name: str) -> list[FetchResult]:
        """The server's answers in deterministic order: origin first, then notaries in
        configuration order (whatever the order they arrived in)."""
        by_notary = self.from_notaries.get(server_name, {})
        from_notaries = [r for i in sorted(by_notary) for r in by_notary[i]]
        return self.from_origin.get(server_name, []) + from_notaries

    def origin_failed(self, server_name: str) -> bool:
        """Whether the server's origin was asked in this round and gave nothing usable."""
        return server_name in self.origin_asked and not self.from_origin.get(server_name)

    def server_trace(self, server_name: str) -> Optional[ServerTrace]:
        """The server's trace, if the call is traced."""
        return None if self.trace is None else self.trace.server(server_name)

    def report(self, server_name: str, keys: dict[str, StoredKey]) -> None:
        """Record a server's final keys and pass them to ``on_server`` (errors logged)."""
        self.keys[server_name] = keys
        if self.on_server is None:
            return
        try:
            self.on_server(server_name, keys)
        except Exception:
            logger.exception("The on_server hook failed for %s", server_name)


@attr.s(auto_attribs=True, frozen=True, slots=True)
class SourceCall:
    """One ``fetch_keys`` call of a round.

    Attributes:
        label: the source in log lines.
        fetcher: the source.
        asked: what it is asked, by server name.
        notary_index: the notary fetcher's index in configuration order; None for the
            origin fetcher.
    """

    label: str
    fetcher: KeyFetcher
    asked: Mapping[str, KeyRequest]
    notary_index: Optional[int] = None


class RoundRunner:
    """Runs the chain's rounds (see the module docstring).

    Args:
        clock: for the timeouts, the head start and the ``fetched_ts`` of late answers.
        timeout_s: how long each source is waited for (None: as long as it takes, and
            each stage waits for the one before it).
        origin_fetcher: fetches ``/key/v2/server`` from the servers themselves.
        notary_fetchers: one fetcher per notary (or one for all), in configuration order.
        stages: the sources to ask, in order (``"origin"``, ``"notaries"``).
        min_agreeing_sources: N of the trust policy.
        store: the key store (read for late answers, and its bounds for judging).
        writer: stores the trusted answers.
        background: where answers still running when a round returns are tracked.
    """

    def __init__(
        self,
        clock: ReactorClock,
        timeout_s: Optional[float],
        origin_fetcher: KeyFetcher,
        notary_fetchers: Sequence[KeyFetcher],
        stages: Sequence[str],
        min_agreeing_sources: int,
        store: KeyStore,
        writer: TrustedAnswerWriter,
        background: BackgroundWork,
    ) -> None:
        self._clock = clock
        self._timeout_s = timeout_s
        self._origin = origin_fetcher
        self._notaries = list(notary_fetchers)
        self._stages = list(stages)
        self._min_agreeing = min_agreeing_sources
        self._store = store
        self._store_fetcher = StoreKeyFetcher(store)
        self._writer = writer
        self._background = background

    @property
    def head_start_s(self) -> Optional[float]:
        """How long a stage has to itself before the next one is asked too (None: until
        every server of the stage has heard from all its calls)."""
        return None if self._timeout_s is None else self._timeout_s * HEAD_START_SHARE

    async def run(self, fetch: FetchRound, names: Sequence[str]) -> None:
        """Fetch for ``names`` until each is settled (and reported)."""
        if self._min_agreeing > 1:
            stages = [tuple(self._stages)]  # every source at once
        else:
            stages = [(stage,) for stage in self._stages]
        await StagedSettling(self, fetch, stages).run(sorted(names))

    def calls(
        self, fetch: FetchRound, stage: Sequence[str], names: Sequence[str]
    ) -> list[SourceCall]:
        """The calls asking ``stage``'s sources about ``names``."""
        calls: list[SourceCall] = []
        if ORIGIN in stage:
            fetch.origin_asked.update(names)
            calls += [
                SourceCall("origin of " + name, self._origin, {name: fetch.wanted[name]})
                for name in names
            ]
        if NOTARIES in stage and names:
            asked = {
                name: notary_request(fetch.wanted[name], fetch.stored.get(name, {}))
                for name in names
            }
            calls += [
                SourceCall("notary source %d" % i, fetcher, asked, i)
                for i, fetcher in enumerate(self._notaries)
            ]
        return calls

    def ask(
        self,
        fetch: FetchRound,
        call: SourceCall,
        arrived: Callable[[SourceAnswers, SourceCall], None],
        failed: Callable[[Failure, SourceCall], Failure],
    ) -> None:
        """Start one call, bounded by the source timeout, and pass its answers to
        ``arrived`` (or an error raised there to ``failed``); the call is tracked in the
        background until it ends, so it outlives the round if need be."""
        asking = defer.ensureDeferred(
            ask_source(
                self._clock, self._timeout_s, fetch.trace, call.label, call.fetcher, call.asked
            )
        )
        asking.addCallback(arrived, call)
        asking.addErrback(failed, call)
        self._background.track(asking, "answers of " + call.label)

    def call_later(self, delay_s: float, what: Callable[[], None]) -> IDelayedCall:
        """Schedule ``what`` on the clock."""
        return self._clock.callLater(delay_s, what)

    def answered(self, fetch: FetchRound, name: str) -> bool:
        """Whether the server's answers so far are trusted and answer its request."""
        stored = fetch.stored.get(name, {})
        decision = self._writer.decide(stored, fetch.answers(name), fetch.fetched_ts)
        projected = trust.project_keys(
            stored, decision.accepted, fetch.fetched_ts, self._store.limits
        )
        return bool(decision.accepted) and fetch.wanted[name].is_satisfied_by(projected)

    async def settle(self, fetch: FetchRound, names: Sequence[str]) -> None:
        """Store the servers' trusted answers, read their keys again and report them."""
        answered = sorted(name for name in names if fetch.answers(name))
        for name in answered:
            await self._writer.apply(
                name,
                fetch.answers(name),
                fetch.stored.get(name, {}),
                fetch.fetched_ts,
                fetch.server_trace(name),
            )
        fresh = await self._store_fetcher.get_stored_keys(answered)
        for name in names:
            fetch.report(name, fresh.get(name, fetch.stored.get(name, {})))

    def late_answer(self, fetch: FetchRound, name: str, results: list[FetchResult]) -> None:
        """Judge and store an answer about a settled server, after its earlier writes."""

        async def write() -> None:
            stored = await self._store.get_server_keys(name)
            await self._writer.apply(
                name, results, stored, now_ms(self._clock), fetch.server_trace(name)
            )

        writing = fetch.writing[name].run(lambda: defer.ensureDeferred(write()))
        self._background.track(writing, "late answer about " + name)


class StagedSettling:
    """One round's servers on their way to being settled, across the stages.

    Each stage asks its sources about every server still unsettled when it starts. The
    next stage starts when every such server has heard from all its calls, or when
    the head start is over (:attr:`RoundRunner.head_start_s`), whichever comes first;
    calls still running go on, and their answers count as long as their server is not
    settled. A server is settled as soon as its answers are enough
    (:meth:`RoundRunner.answered`), or once no call about it is out and no stage is
    left.

    Args:
        runner: the round runner (sources, trust policy, store).
        fetch: the round.
        stages: the source kinds each stage asks, in order (e.g. ``[("origin",),
            ("notaries",)]``, or ``[("origin", "notaries")]`` for all at once).
    """

    def __init__(
        self, runner: RoundRunner, fetch: FetchRound, stages: Sequence[Sequence[str]]
    ) -> None:
        self._runner = runner
        self._fetch = fetch
        self._stages = list(stages)
        self._started = 0  # how many stages have started
        self._unsettled: set[str] = set()  # not being settled yet (nor given up)
        self._unfinished: set[str] = set()  # not reported yet (nor given up)
        self._calls_out: dict[str, int] = {}  # per unsettled server, its calls not in yet
        self._waiting = 0  # unsettled servers with calls out
        self._errors: list[Failure] = []
        self._done: "defer.Deferred[None]" = defer.Deferred()
        self._head_start: Optional[IDelayedCall] = None

    async def run(self, names: Sequence[str]) -> None:
        """Ask the stages about ``names`` until each is settled.

        Raises:
            Exception: the first error settling a server (e.g. the store failed) or
                handling an answer, once the other servers are done.
        """
        self._unsettled.update(names)
        self._unfinished.update(names)
        self._calls_out = dict.fromkeys(names, 0)
        self._next_stage()
        try:
            if self._unfinished:
                await self._done
        finally:
            self._stop_head_start()
        if self._errors:
            self._errors[0].raiseException()

    @property
    def _on_last_stage(self) -> bool:
        return self._started >= len(self._stages)

    def _next_stage(self) -> None:
        """Ask the next stage about every unsettled server (settle them if none is left)."""
        self._stop_head_start()
        names = sorted(self._unsettled)
        if self._on_last_stage:
            self._settle(names)  # no source to ask at all
            return
        stage = self._stages[self._started]
        self._started += 1
        logger.debug("Asking %s about %d servers", " and ".join(stage), len(names))
        calls = self._runner.calls(self._fetch, stage, names)
        for call in calls:
            for name in call.asked:
                if self._calls_out[name] == 0:
                    self._waiting += 1
                self._calls_out[name] += 1
        head_start_s = self._runner.head_start_s
        if not self._on_last_stage and head_start_s is not None:
            self._head_start = self._runner.call_later(head_start_s, self._head_start_over)
        for call in calls:
            self._runner.ask(self._fetch, call, self._arrived, self._call_failed)
        self._go_on([])

    def _head_start_over(self) -> None:
        self._head_start = None
        if self._unsettled:
            logger.debug("%d servers unanswered after the head start", len(self._unsettled))
            self._next_stage()

    def _stop_head_start(self) -> None:
        if self._head_start is not None and self._head_start.active():
            self._head_start.cancel()
        self._head_start = None

    def _arrived(self, found: SourceAnswers, call: SourceCall) -> None:
        """Take in one call's answers; settle the servers they are enough for."""
        fetch = self._fetch
        ready: list[str] = []
        for name in sorted(call.asked):
            results = found.results.get(name)
            if name in fetch.writing:
                if results:
                    self._runner.late_answer(fetch, name, results)
                continue
            if name not in self._unsettled:
                continue  # given up after an earlier call failed unexpectedly
            failures = found.failures.get(name)
            if failures:
                fetch.failures.setdefault(name, []).extend(failures)
            if results:
                if call.notary_index is None:
                    fetch.from_origin[name] = results
                else:
                    fetch.from_notaries.setdefault(name, {})[call.notary_index] = results
            self._calls_out[name] -= 1
            if self._calls_out[name] == 0:
                self._waiting -= 1
            if results and self._runner.answered(fetch, name):
                ready.append(name)  # enough already: no need to wait for the others
            elif self._calls_out[name] == 0 and self._on_last_stage:
                ready.append(name)  # every source is in, and none is left to ask
        self._go_on(ready)

    def _go_on(self, ready: list[str]) -> None:
        """Settle ``ready``; go on to the next stage once no unsettled server waits."""
        self._settle(ready)
        if self._unsettled and self._waiting == 0:
            self._next_stage()

    def _settle(self, names: list[str]) -> None:
        """Settle the servers: store their trusted answers, then report their keys."""
        if not names:
            return
        fetch = self._fetch
        self._take_out(names)
        for name in names:
            lock = fetch.writing[name] = defer.DeferredLock()
            lock.acquire()  # free: taken at once; late answers queue behind it

        def settled(outcome: Optional[Failure]) -> None:
            if isinstance(outcome, Failure):
                self._errors.append(outcome)
            for name in names:
                fetch.writing[name].release()
            self._finished(names)

        defer.ensureDeferred(self._runner.settle(fetch, names)).addBoth(settled)

    def _take_out(self, names: Sequence[str]) -> None:
        """The servers are no longer waited for (settled, or given up)."""
        for name in names:
            self._unsettled.discard(name)
            if self._calls_out.pop(name, 0):
                self._waiting -= 1

    def _finished(self, names: Sequence[str]) -> None:
        self._unfinished.difference_update(names)
        if not self._unfinished and not self._done.called:
            self._done.callback(None)

    def _call_failed(self, failure: Failure, call: SourceCall) -> Failure:
        # A bug while handling an answer: give up on the servers it was about (the
        # error is raised), and let the background log it.
        if not self._done.called:
            self._errors.append(failure)
            given_up = [name for name in call.asked if name in self._unsettled]
            self._take_out(given_up)
            self._finished(given_up)
            self._go_on([])
        return failure


def notary_request(request: KeyRequest, stored: Mapping[str, StoredKey]) -> KeyRequest:
    """Name the stored current key ids in an "all keys" request, so notaries refresh.

    (Synapse's notary never fetches from the origin for empty criteria.)
    """
    if request.key_ids is not None:
        return request
    current = frozenset(key_id for key_id, key in stored.items() if key.expired_ts is None)
    return attr.evolve(request, key_ids=current) if current else request
