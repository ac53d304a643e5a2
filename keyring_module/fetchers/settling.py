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
when every source asked about it has answered or timed out. The round returns as soon as
each server is settled (or, before the last stage, has heard from all its sources): it
never waits for a source it no longer needs.

* **N = 1** (``min_agreeing_sources``): the stages run in ``order``, and only servers
  still unanswered go on to the next. With ``("origin", "notaries")`` a server whose
  origin answered well is settled as soon as that answer is in; the others go to the
  notaries together once every origin of the round has answered or timed out. The
  notaries are asked in parallel and each server is settled by the **first** notary
  answer that satisfies it. With ``("notaries", "origin")`` each server is settled by
  the first notary answer that satisfies it; the others go on to their origins once all
  notaries are in, and each is settled when its origin answers.
* **N > 1**: the origins and the notaries are asked at once, and a server is settled as
  soon as N sources agree, whether or not the others have answered.

Answers that arrive after their server was settled (from a source still running when
the round returned) are still judged by the trust policy against the keys stored by
then, and stored if trusted; their conflicts are recorded and reported. That happens in
the background (:class:`~keyring_module.fetchers.background.BackgroundWork`), one write
at a time per server, and is recorded in the call's trace if it has one (a trace read
before then does not show it).
"""

import logging
from typing import Mapping, Optional, Sequence

import attr
from twisted.internet import defer
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
        clock: for the timeouts and the ``fetched_ts`` of late answers.
        timeout_s: how long each source is waited for (None: as long as it takes).
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

    async def run(self, fetch: FetchRound, names: Sequence[str]) -> None:
        """Fetch for ``names`` until each is settled (and reported)."""
        names = sorted(names)
        if self._min_agreeing > 1:
            calls = self._origin_calls(fetch, names) if ORIGIN in self._stages else []
            if NOTARIES in self._stages:
                calls += self._notary_calls(fetch, names)
            await self._run_stage(fetch, names, calls, final=True)
            return
        for i, stage in enumerate(self._stages):
            final = i == len(self._stages) - 1
            if stage == ORIGIN:
                calls = self._origin_calls(fetch, names)
            else:
                calls = self._notary_calls(fetch, names)
            names = await self._run_stage(fetch, names, calls, final)
            logger.debug("After %s: %d servers still unanswered", stage, len(names))
            if not names:
                return
        await self._run_stage(fetch, names, [], final=True)  # no source to ask at all

    def _origin_calls(self, fetch: FetchRound, names: Sequence[str]) -> list[SourceCall]:
        fetch.origin_asked.update(names)
        return [
            SourceCall("origin of " + name, self._origin, {name: fetch.wanted[name]})
            for name in names
        ]

    def _notary_calls(self, fetch: FetchRound, names: Sequence[str]) -> list[SourceCall]:
        asked = {
            name: notary_request(fetch.wanted[name], fetch.stored.get(name, {})) for name in names
        }
        return [
            SourceCall("notary source %d" % i, fetcher, asked, i)
            for i, fetcher in enumerate(self._notaries)
        ]

    async def _run_stage(
        self, fetch: FetchRound, names: Sequence[str], calls: Sequence[SourceCall], final: bool
    ) -> list[str]:
        """Start ``calls`` and settle each server as soon as its answers are enough.

        Returns once every server is settled or has heard from all its calls; a call
        still running then goes on in the background (its answers are late answers).

        Returns:
            The servers not settled (never any when ``final``): every call about them is
            in, and nothing was enough.

        Raises:
            Exception: the first error settling a server (e.g. the store failed), once
                the others are done.
        """
        waiting = dict.fromkeys(names, 0)
        for call in calls:
            for name in call.asked:
                waiting[name] += 1
        unresolved = set(names)
        gone_on: list[str] = []
        errors: list[Failure] = []
        done: "defer.Deferred[None]" = defer.Deferred()

        def resolved(server_names: Sequence[str]) -> None:
            unresolved.difference_update(server_names)
            if not unresolved and not done.called:
                done.callback(None)

        def settle(server_names: list[str]) -> None:
            for name in server_names:
                lock = fetch.writing[name] = defer.DeferredLock()
                lock.acquire()  # free: taken at once; late answers queue behind it

            def settled(outcome: Optional[Failure]) -> None:
                if isinstance(outcome, Failure):
                    errors.append(outcome)
                for name in server_names:
                    fetch.writing[name].release()
                resolved(server_names)

            defer.ensureDeferred(self._settle(fetch, server_names)).addBoth(settled)

        def exhausted(name: str, ready: list[str]) -> None:
            if final:
                ready.append(name)
            else:
                gone_on.append(name)
                resolved([name])

        def arrived(found: SourceAnswers, call: SourceCall) -> None:
            ready: list[str] = []
            for name in sorted(call.asked):
                results = found.results.get(name)
                if name in fetch.writing:
                    if results:
                        self._late_answer(fetch, name, results)
                    continue
                if name not in unresolved:
                    continue  # gone on after an earlier call failed unexpectedly
                if results:
                    if call.notary_index is None:
                        fetch.from_origin[name] = results
                    else:
                        fetch.from_notaries.setdefault(name, {})[call.notary_index] = results
                waiting[name] -= 1
                if waiting[name] == 0:
                    if final or (results and self._answered(fetch, name)):
                        ready.append(name)
                    else:
                        exhausted(name, ready)
                elif results and self._answered(fetch, name):
                    ready.append(name)  # enough already: no need to wait for the others
            if ready:
                settle(ready)

        def call_failed(failure: Failure, call: SourceCall) -> Failure:
            # A bug while handling an answer: end the stage for the servers it was
            # about (the error is raised), and let the background log it.
            if not done.called:
                errors.append(failure)
                resolved([name for name in call.asked if name not in fetch.writing])
            return failure

        ready: list[str] = []
        for name in names:
            if waiting[name] == 0:
                exhausted(name, ready)
        if ready:
            settle(ready)
        for call in calls:
            asking = defer.ensureDeferred(
                ask_source(
                    self._clock, self._timeout_s, fetch.trace, call.label, call.fetcher, call.asked
                )
            )
            asking.addCallback(arrived, call)
            asking.addErrback(call_failed, call)
            self._background.track(asking, "answers of " + call.label)
        if unresolved:
            await done
        if errors:
            errors[0].raiseException()
        return sorted(gone_on)

    def _answered(self, fetch: FetchRound, name: str) -> bool:
        """Whether the server's answers so far are trusted and answer its request."""
        stored = fetch.stored.get(name, {})
        decision = self._writer.decide(stored, fetch.answers(name), fetch.fetched_ts)
        projected = trust.project_keys(
            stored, decision.accepted, fetch.fetched_ts, self._store.limits
        )
        return bool(decision.accepted) and fetch.wanted[name].is_satisfied_by(projected)

    async def _settle(self, fetch: FetchRound, names: Sequence[str]) -> None:
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

    def _late_answer(self, fetch: FetchRound, name: str, results: list[FetchResult]) -> None:
        """Judge and store an answer about a settled server, after its earlier writes."""

        async def write() -> None:
            stored = await self._store.get_server_keys(name)
            await self._writer.apply(
                name, results, stored, now_ms(self._clock), fetch.server_trace(name)
            )

        writing = fetch.writing[name].run(lambda: defer.ensureDeferred(write()))
        self._background.track(writing, "late answer about " + name)


def notary_request(request: KeyRequest, stored: Mapping[str, StoredKey]) -> KeyRequest:
    """Name the stored current key ids in an "all keys" request, so notaries refresh.

    (Synapse's notary never fetches from the origin for empty criteria.)
    """
    if request.key_ids is not None:
        return request
    current = frozenset(key_id for key_id, key in stored.items() if key.expired_ts is None)
    return attr.evolve(request, key_ids=current) if current else request
