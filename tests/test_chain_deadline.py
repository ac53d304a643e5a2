"""A caller of a key source stops waiting at the chain's deadline, down to the limiter.

:func:`~keyring_module.fetchers.asking.ask_source` cancels its wait when the source
timeout passes. A fetch still queued for a slot that nobody else waits for then leaves
the queue unsent (and gives its token back); a fetch already sent goes on for whoever
shares it, and still teaches the limiter when it fails. So fetches nobody waits for
never fill the global cap.
"""

from typing import Optional

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from keyring_module.clock import now_ms
from keyring_module.config import RateLimitConfig, TrustedKeyServer
from keyring_module.fetch_slots import FetchSlots
from keyring_module.fetchers.asking import ask_source
from keyring_module.fetchers.base import FailureKind, SourceAnswers
from keyring_module.fetchers.notary_client import NotaryKeyFetcher
from keyring_module.fetchers.origin import OriginKeyFetcher
from keyring_module.http import RequestTimeoutError
from keyring_module.model import SOURCE_ORIGIN, KeyRequest
from keyring_module.notary_limiter import NotaryLimiter
from keyring_module.ratelimit import OriginRateLimiter
from tests.chain_fakes import ScriptedFetcher
from tests.fakes import FakeOriginResource, HangingResource
from tests.federation_traffic import synapse_body
from tests.notary_site import RawNotarySite, request_bytes
from tests.test_notary_big_batches import (
    QUERY_PATH,
    REQUEST_TIMEOUT_S,
    SERVER_KEY,
    SERVER_KEY_ID,
    BigBatchTestCase,
)
from tests.utils import make_signed_server_keys

NOW_S = 1_700_000_000
TIMEOUT_S = 10.0
HANG, QUEUED = "hang.example", "queued.example"


class HeldClient:
    """A federation client whose every request waits until the test fires it.

    Attributes:
        asked: each request's server name and the Deferred that answers it.
    """

    def __init__(self) -> None:
        self.asked: list[tuple[str, "defer.Deferred[object]"]] = []

    async def get_json(
        self, server_name: str, path: str, timeout_ms: Optional[int] = None
    ) -> object:
        answer: "defer.Deferred[object]" = defer.Deferred()
        self.asked.append((server_name, answer))
        return await answer

    async def post_json(
        self, server_name: str, path: str, body: object, timeout_ms: Optional[int] = None
    ) -> object:
        return await self.get_json(server_name, path, timeout_ms)

    def names(self) -> list[str]:
        """The servers asked, in order."""
        return [name for name, _ in self.asked]


class AskSourceDeadlineTests(SynchronousTestCase):
    """One origin fetcher behind a limiter whose global cap has a single slot."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW_S)
        self.slots = FetchSlots(limit=1)
        self.limiter = OriginRateLimiter(
            self.clock, RateLimitConfig(origin_burst=1), fetch_slots=self.slots
        )
        self.client = HeldClient()
        self.origin = OriginKeyFetcher(self.client, self.limiter, self.clock)  # type: ignore[arg-type]

    def ask(
        self, server_name: str, timeout_s: float = TIMEOUT_S
    ) -> "defer.Deferred[SourceAnswers]":
        return defer.ensureDeferred(
            ask_source(
                self.clock,
                timeout_s,
                None,
                "origin of " + server_name,
                self.origin,
                {server_name: KeyRequest(server_name)},
            )
        )

    def assertTimedOut(self, asking: "defer.Deferred[SourceAnswers]", server_name: str) -> None:
        found = self.successResultOf(asking)
        self.assertEqual([f.kind for f in found.failures[server_name]], [FailureKind.TIMED_OUT])

    def test_queued_fetch_leaves_the_queue_at_its_callers_deadline(self) -> None:
        """A fetch queued behind a hanging one leaves the queue when its caller's deadline
        passes: it is never sent, not even once the slot frees, and its token is back."""
        hanging = self.ask(HANG)
        queued = self.ask(QUEUED)
        self.assertEqual((self.client.names(), self.slots.waiting), ([HANG], 1))
        self.clock.advance(TIMEOUT_S)
        self.assertTimedOut(hanging, HANG)
        self.assertTimedOut(queued, QUEUED)
        self.assertEqual(self.slots.waiting, 0)
        self.assertEqual(self.limiter.retry_after_ms(QUEUED), 0)  # burst 1: token given back
        self.client.asked[0][1].errback(RequestTimeoutError("no answer"))
        self.assertEqual(self.client.names(), [HANG])
        self.assertEqual(self.slots.in_use, 0)

    def test_sent_fetch_goes_on_for_the_caller_still_waiting(self) -> None:
        """When one of two callers sharing a sent fetch gives up, the fetch is not
        cancelled, and the other caller gets its answer."""
        impatient = self.ask(HANG, timeout_s=TIMEOUT_S / 2)
        patient = self.ask(HANG)
        self.clock.advance(TIMEOUT_S / 2)
        self.assertTimedOut(impatient, HANG)
        ((_, answer),) = self.client.asked
        self.assertFalse(answer.called)  # not cancelled
        answer.callback(make_signed_server_keys(HANG, [SERVER_KEY], (NOW_S + 3600) * 1000))
        found = self.successResultOf(patient)
        self.assertEqual([r.response.server_name for r in found.results[HANG]], [HANG])

    def test_sent_fetch_nobody_waits_for_still_backs_off_a_dead_origin(self) -> None:
        """A sent fetch whose only caller gave up goes on, and its timeout still backs the
        origin off."""
        asking = self.ask(HANG)
        self.clock.advance(TIMEOUT_S)
        self.assertTimedOut(asking, HANG)
        self.assertFalse(self.limiter.is_backed_off(HANG))
        self.client.asked[0][1].errback(RequestTimeoutError("no answer"))
        self.assertTrue(self.limiter.is_backed_off(HANG))

    def test_giving_up_logs_no_error(self) -> None:
        """Leaving a queued fetch and a shared sent one at the deadline logs no error
        (the timeout is reported as TIMED_OUT, once, at INFO)."""
        self.ask(HANG)
        self.ask(QUEUED)
        with self.assertNoLogs("keyring_module", "ERROR"):
            self.clock.advance(TIMEOUT_S)
            self.client.asked[0][1].errback(RequestTimeoutError("no answer"))


class HangingSourceTests(SynchronousTestCase):
    def test_hanging_source_cancelled_quietly_at_the_deadline(self) -> None:
        """A source that never answers has its call cancelled at the deadline, which is
        reported as a timeout and logged as no error."""
        clock = Clock()
        source = ScriptedFetcher(SOURCE_ORIGIN, clock, delay_s=None)
        asked = {HANG: KeyRequest(HANG)}
        asking = defer.ensureDeferred(ask_source(clock, TIMEOUT_S, None, "origin", source, asked))
        [(_, call)] = source.pending
        with self.assertNoLogs("keyring_module", "ERROR"):
            clock.advance(TIMEOUT_S)
        self.assertTrue(call.called)  # cancelled, not answered
        found = self.successResultOf(asking)
        self.assertEqual([f.kind for f in found.failures[HANG]], [FailureKind.TIMED_OUT])


class NotaryQueryDeadlineTests(SynchronousTestCase):
    def test_queued_notary_query_leaves_the_notarys_queue(self) -> None:
        """A query queued behind a hanging one on a notary's only slot leaves the queue
        when its caller's deadline passes: it is never sent, and the notary is not
        backed off for it."""
        clock = Clock()
        clock.advance(NOW_S)
        limiter = NotaryLimiter(clock, RateLimitConfig(notary_max_concurrent=1))
        client = HeldClient()
        notary = TrustedKeyServer("notary.example", {})
        fetcher = NotaryKeyFetcher(client, [notary], limiter, clock)  # type: ignore[arg-type]

        def ask(server_name: str) -> "defer.Deferred[SourceAnswers]":
            asked = {server_name: KeyRequest(server_name)}
            return defer.ensureDeferred(
                ask_source(clock, TIMEOUT_S, None, "notary", fetcher, asked)
            )

        first, queued = ask(HANG), ask(QUEUED)
        self.assertEqual(client.names(), ["notary.example"])
        clock.advance(TIMEOUT_S)
        self.successResultOf(first)
        self.successResultOf(queued)
        self.assertFalse(limiter.is_backed_off("notary.example"))
        client.asked[0][1].callback({"server_keys": []})
        self.assertEqual(client.names(), ["notary.example"])


class GlobalCapAfterTheDeadlineTests(BigBatchTestCase):
    def test_fetches_nobody_waits_for_do_not_hold_the_cap(self) -> None:
        """13 POSTs from 13 clients naming 100 hanging origins each fill the 256 fetch
        slots and the 1,024 queue places; once the queries' deadline passes, the queued
        fetches are dropped unsent, and a live origin asked afterwards is answered within
        its own deadline."""
        hanging = ["h%04d.attacker.example" % i for i in range(1300)]
        origins: dict[str, Resource] = {name: HangingResource() for name in hanging}
        live = FakeOriginResource(SERVER_KEY, "live.example", Clock())
        origins["live.example"] = live
        site = RawNotarySite(origins, request_timeouts=True)
        live.clock = site.reactor
        now = now_ms(site.reactor)
        held = []
        for i in range(13):
            body = synapse_body(hanging[i * 100 : (i + 1) * 100], now, SERVER_KEY_ID)
            held.append(site.open(request_bytes(b"POST", QUERY_PATH, body), "192.0.2.%d" % i))
        slots = site.services.fetching.fetch_slots
        assert slots is not None
        self.assertEqual((slots.in_use, slots.waiting), (256, 1024))

        site.reactor.advance(REQUEST_TIMEOUT_S)
        site.deliver()
        self.assertEqual([r.response() is not None for r in held], [True] * 13)
        self.assertEqual(slots.waiting, 0)
        # The first 256 were sent; the next 256 got their slots in the very instant the
        # first timed out (their callers' deadline had not passed yet); none after them.
        self.assertEqual(len(site.client.requests), 512)

        asking = defer.ensureDeferred(
            site.services.fetching.chain.get_keys(
                [KeyRequest("live.example", None, now_ms(site.reactor))]
            )
        )
        for _ in range(REQUEST_TIMEOUT_S):
            site.reactor.advance(1)
            site.deliver()
        self.assertEqual(live.hits, 1)
        self.assertTrue(self.successResultOf(asking)["live.example"])
        self.assertEqual(len(site.client.requests), 513)
        for request in held:
            request.close()
