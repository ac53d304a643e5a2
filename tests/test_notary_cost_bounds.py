"""What one notary answer may cost: where co-signing runs (reactor thread or worker
jobs, by the bytes of the responses), what a full worker pool leaves out, the byte cap
on one answer, and the fetch lease handed back whatever the failure hook does."""

import json
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from prometheus_client import CollectorRegistry
from twisted.internet import defer
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.blocking import WorkerPoolBusyError
from keyring_module.clock import now_ms
from keyring_module.metrics import Metrics
from keyring_module.model import (
    SOURCE_ORIGIN,
    KeyRequest,
    StoredKey,
    StoredResponse,
    response_id_for,
)
from keyring_module.notary import server_fetches, service
from keyring_module.notary.caches import (
    INLINE_ROUND_BYTES,
    INLINE_SIGN_BYTES,
    SIGNING_BATCH,
    CoSigner,
)
from keyring_module.notary.client_budget import FetchLease
from keyring_module.notary.plan import ServerPlan, Step
from keyring_module.notary.query import ServerQuery
from keyring_module.notary.server_fetches import ServerFetches
from keyring_module.notary.service import NotaryService
from keyring_module.notary.stored_answers import StoredAnswerer
from keyring_module.pacing import COSTLY_ITEMS_PER_SLICE
from keyring_module.signing import OwnKeys, ServerKeyPublisher
from keyring_module.storage.memory import InMemoryKeyStore
from keyring_module.validation import parse_server_keys_response
from tests.fakes import DAY_MS
from tests.utils import key_id, make_signed_server_keys, new_signing_key

NOTARY = "notary.test"
SERVER_KEY = new_signing_key("a_cost")


def response_of(size: int, index: int = 0) -> StoredResponse:
    """A stored response of exactly ``size`` bytes (a padded string)."""
    head = b'{"server_name":"s%d.example","pad":"' % index
    json_bytes = head + b"x" * (size - len(head) - 2) + b'"}'
    assert len(json_bytes) == size
    return StoredResponse(
        response_id_for(json_bytes), "s%d.example" % index, 1, 0, "origin", json_bytes
    )


class CountingOwnKeys(OwnKeys):
    """Our keys, counting the responses co-signed."""

    signed = 0

    def cosign_canonical(self, json_bytes: bytes) -> bytes:
        self.signed += 1
        return super().cosign_canonical(json_bytes)


class HeldRunner:
    """A blocking runner holding each job until the test runs it."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[[], Any], "Deferred[Any]"]] = []

    def __call__(self, work: Callable[[], Any]) -> "Deferred[Any]":
        d: "Deferred[Any]" = Deferred()
        self.jobs.append((work, d))
        return d

    def finish(self, index: int) -> int:
        """Run job ``index``, deliver its result; how many responses it signed."""
        work, d = self.jobs[index]
        signed = work()
        d.callback(signed)
        return len(signed) if isinstance(signed, list) else 1


def refusing_runner(work: Callable[[], Any]) -> "Deferred[Any]":
    """A full worker pool: every job is refused."""
    return defer.fail(WorkerPoolBusyError("the worker pool already holds 64 jobs"))


class SteppingClock(Clock):
    """A Clock that can run one reactor turn: the calls due when it starts."""

    def turn(self) -> None:
        due = [c for c in self.calls if c.getTime() <= self.seconds()]
        for call in due:
            self.calls.remove(call)
            call.called = 1
            call.func(*call.args, **call.kw)


class CoSigningPlacementTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.own_keys = CountingOwnKeys(NOTARY, [new_signing_key("n1")])

    def round_of(
        self, cosigner: CoSigner, responses: Sequence[StoredResponse]
    ) -> list["Deferred[Optional[bytes]]"]:
        """Co-sign ``responses`` together, as the answers of one slice do."""
        return cosigner.cosign_together(
            lambda: [ensureDeferred(cosigner.cosign(r)) for r in responses]
        )

    def test_normal_responses_are_signed_on_the_reactor_thread(self) -> None:
        """A round of normal-sized misses within INLINE_ROUND_BYTES is signed at once,
        with no worker job."""
        runner = HeldRunner()
        cosigner = CoSigner(self.own_keys, 10**7, runner)
        responses = [response_of(400, i) for i in range(INLINE_ROUND_BYTES // 400)]
        answers = self.round_of(cosigner, responses)
        self.assertTrue(all(self.successResultOf(d) for d in answers))
        self.assertEqual(runner.jobs, [])

    def test_padded_responses_are_never_signed_on_the_reactor_thread(self) -> None:
        """Responses over INLINE_SIGN_BYTES (yet under SIGN_ALONE_BYTES) are all signed in
        worker jobs of SIGNING_BATCH, one after another; nothing is signed meanwhile."""
        runner = HeldRunner()
        cosigner = CoSigner(self.own_keys, 10**8, runner)
        responses = [response_of(INLINE_SIGN_BYTES + 1, i) for i in range(SIGNING_BATCH + 8)]
        answers = self.round_of(cosigner, responses)
        self.assertEqual((self.own_keys.signed, len(runner.jobs)), (0, 1))
        self.assertEqual(runner.finish(0), SIGNING_BATCH)
        self.assertEqual(sum(d.called for d in answers), SIGNING_BATCH)
        self.assertEqual(runner.finish(1), 8)
        self.assertTrue(all(self.successResultOf(d) for d in answers))

    def test_reactor_share_of_a_round_is_bounded_in_bytes(self) -> None:
        """Of a round of small misses, only INLINE_ROUND_BYTES' worth is signed on the
        reactor thread; the rest goes to worker jobs."""
        runner = HeldRunner()
        cosigner = CoSigner(self.own_keys, 10**8, runner)
        responses = [response_of(1000, i) for i in range(64)]
        answers = self.round_of(cosigner, responses)
        on_reactor = INLINE_ROUND_BYTES // 1000
        self.assertEqual(self.own_keys.signed, on_reactor)
        self.assertEqual(sum(d.called for d in answers), on_reactor)
        self.assertEqual(runner.finish(0), SIGNING_BATCH)
        self.assertEqual(runner.finish(1), 64 - on_reactor - SIGNING_BATCH)
        self.assertTrue(all(self.successResultOf(d) for d in answers))

    def test_a_lone_costly_response_goes_to_the_runner(self) -> None:
        """Outside a round, a response of INLINE_SIGN_BYTES is signed at once, one byte
        more by the runner."""
        runner = HeldRunner()
        cosigner = CoSigner(self.own_keys, 10**7, runner)
        self.assertIsNotNone(
            self.successResultOf(ensureDeferred(cosigner.cosign(response_of(INLINE_SIGN_BYTES))))
        )
        costly = ensureDeferred(cosigner.cosign(response_of(INLINE_SIGN_BYTES + 1, 1)))
        self.assertNoResult(costly)
        self.assertEqual(runner.finish(0), 1)
        self.assertIsNotNone(self.successResultOf(costly))

    def test_full_pool_leaves_costly_out_and_paces_small_ones(self) -> None:
        """When the pool refuses a batch, its costly responses are left out (None, no
        error) and its small ones are signed on the reactor thread INLINE_ROUND_BYTES
        at a time, one reactor turn each."""
        clock = SteppingClock()
        cosigner = CoSigner(self.own_keys, 10**8, refusing_runner, clock)
        costly = [response_of(20_000, i) for i in range(2)]
        small = [response_of(1000, i) for i in range(2, 52)]
        answers = self.round_of(cosigner, costly + small)
        per_turn = [self.own_keys.signed]
        while clock.calls:
            before = self.own_keys.signed
            clock.turn()
            per_turn.append(self.own_keys.signed - before)
        part = INLINE_ROUND_BYTES // 1000
        self.assertEqual(per_turn, [part, part, 30 - part, 4])
        results = [self.successResultOf(d) for d in answers]
        self.assertEqual(results[:2], [None, None])
        self.assertTrue(all(results[2:]))
        self.assertGreater(cosigner.total_bytes, 0)
        self.assertFalse(any(cosigner.is_cached(r.response_id) for r in costly))


class NoFetches:
    """A fetcher chain never expected to fetch (every server is stored fresh)."""

    async def get_keys(
        self, requests: Iterable[KeyRequest], *, use_cache: bool = True, on_server: Any = None
    ) -> Mapping[str, Mapping[str, StoredKey]]:
        return {}


class AnswerByteCapTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = InMemoryKeyStore()
        self.metrics = Metrics(CollectorRegistry())
        own_keys = OwnKeys(NOTARY, [new_signing_key("n1")])
        self.notary = NotaryService(
            own_keys,
            ServerKeyPublisher(own_keys, self.clock, DAY_MS),
            self.store,
            NoFetches(),
            self.clock,
            10_000,
            self.metrics,
        )
        self.names = ["s%05d.example.org" % i for i in range(3 * COSTLY_ITEMS_PER_SLICE)]
        now = now_ms(self.clock)
        for name in self.names:
            obj = make_signed_server_keys(name, [SERVER_KEY], now + DAY_MS)
            response = parse_server_keys_response(obj, name)
            self.successResultOf(
                ensureDeferred(self.store.store_server_keys(response, SOURCE_ORIGIN, now))
            )

    def queries(self) -> list[ServerQuery]:
        return [ServerQuery(n, {key_id(SERVER_KEY): None}) for n in self.names]

    def answer(self) -> bytes:
        """The answer to a query about every seeded server (its slices paced)."""
        answered = ensureDeferred(self.notary.query(self.queries()))
        self.clock.advance(0)
        return self.successResultOf(answered)

    def response_ids(self, name: str) -> list[str]:
        stored = self.successResultOf(ensureDeferred(self.store.get_server_responses(name)))
        return [r.response_id for r in stored]

    def test_answer_stops_at_the_cap(self) -> None:
        """Once an answer's entries reach MAX_ANSWER_BYTES the remaining servers are left
        out, not signed, the answer is counted, logged and not kept whole."""
        cap = 40_000  # about 1.5 slices of ~450-byte entries
        self.patch(service, "MAX_ANSWER_BYTES", cap)
        with self.assertLogs("keyring_module.notary.service", "WARNING") as logs:
            body = self.answer()
        entries = json.loads(body)["server_keys"]
        self.assertLessEqual(len(body), cap + len(b'{"server_keys":[]}'))
        self.assertGreater(len(entries), COSTLY_ITEMS_PER_SLICE)
        self.assertEqual([e["server_name"] for e in entries], self.names[: len(entries)])
        last_slice = self.names[2 * COSTLY_ITEMS_PER_SLICE :]
        cosigner = self.notary.cosigned_cache
        self.assertFalse(
            any(cosigner.is_cached(r) for name in last_slice for r in self.response_ids(name))
        )
        self.assertEqual(
            self.metrics.registry.get_sample_value("keyring_notary_truncated_answers_total"), 1
        )
        [line] = logs.output
        self.assertIn("left out the last %d" % (len(self.names) - len(entries)), line)
        self.assertIsNone(self.notary.cached_answer(self.queries()))

    def test_answer_under_the_cap_is_whole(self) -> None:
        """An answer below the cap holds every server and counts no truncation."""
        body = self.answer()
        self.assertEqual(len(json.loads(body)["server_keys"]), len(self.names))
        self.assertEqual(
            self.metrics.registry.get_sample_value("keyring_notary_truncated_answers_total"), 0
        )


class FailingChain:
    """A fetcher chain whose every fetch fails."""

    async def get_keys(
        self, requests: Iterable[KeyRequest], *, use_cache: bool = True, on_server: Any = None
    ) -> Mapping[str, Mapping[str, StoredKey]]:
        raise RuntimeError("chain broke")


class FetchHandBackTests(SynchronousTestCase):
    def test_lease_is_handed_back_when_the_failure_hook_raises(self) -> None:
        """A failed fetch whose failure hook itself raises still hands the whole lease
        back and answers its servers (from the store) without waiting for the timeout."""
        clock = Clock()
        store = InMemoryKeyStore()
        own_keys = OwnKeys(NOTARY, [new_signing_key("n1")])
        answerer = StoredAnswerer(
            store, CoSigner(own_keys, 0), ServerKeyPublisher(own_keys, clock, DAY_MS)
        )
        fetches = ServerFetches(store, FailingChain(), clock, 10_000, answerer)

        def broken_warning(*args: object) -> None:
            raise ValueError("log handler broke")

        self.patch(server_fetches.logger, "warning", broken_warning)
        given_back: list[int] = []
        lease = FetchLease(2, given_back.append)
        servers = [ServerPlan(ServerQuery(n), {}, Step.FETCH) for n in ("a.example", "b.example")]
        with self.assertLogs("keyring_module.notary.server_fetches", "ERROR"):
            answers = self.successResultOf(
                ensureDeferred(fetches.fetch_then_answer(servers, now_ms(clock), lease))
            )
        self.assertEqual([a.blobs for a in answers], [[], []])
        self.assertEqual((lease.held, sum(given_back)), (0, 2))
        self.assertEqual(clock.getDelayedCalls(), [])
