"""Big batches without long reactor holds or unbounded memory: planning and answering a
slice at a time, co-signing misses in worker batches, big bodies parsed by the runner,
a cap on key ids per server, and a byte bound on the queries waiting for fetches."""

import json
from typing import Any, Callable, Collection, Iterable, Mapping, Optional, Sequence

from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.blocking import WorkerPoolBusyError
from keyring_module.clock import now_ms
from keyring_module.config import NotaryConfig
from keyring_module.model import SOURCE_ORIGIN, KeyRequest, StoredKey, StoredResponse
from keyring_module.notary.caches import INLINE_ROUND_BYTES, SIGNING_BATCH
from keyring_module.notary.query import ServerQuery
from keyring_module.notary.service import NotaryService
from keyring_module.pacing import COSTLY_ITEMS_PER_SLICE, ITEMS_PER_SLICE
from keyring_module.resources import key_query
from keyring_module.resources.key_query import (
    MAX_KEY_IDS_PER_SERVER,
    PARSE_IN_THREAD_BYTES,
    KeyQueryResource,
    parse_query_body,
)
from keyring_module.resources.tree import build_key_resource, build_root
from keyring_module.signing import OwnKeys, ServerKeyPublisher
from keyring_module.storage.memory import InMemoryKeyStore
from keyring_module.validation import parse_server_keys_response
from tests.fakes import DAY_MS, HangingResource
from tests.notary_site import RawNotarySite, request_bytes
from tests.utils import key_id, make_signed_server_keys, new_signing_key

NOTARY = "notary.test"
SERVER_KEY = new_signing_key("a_pacing")
SERVER_KEY_ID = key_id(SERVER_KEY)
QUERY_PATH = b"/_matrix/key/v2/query"


def server_name(i: int) -> str:
    return "s%05d.example.org" % i


def synapse_body(names: Sequence[str], minimum: int = 0) -> bytes:
    query = {n: {SERVER_KEY_ID: {"minimum_valid_until_ts": minimum}} for n in names}
    return json.dumps({"server_keys": query}, separators=(",", ":")).encode()


class NoFetches:
    """A fetcher chain that is never expected to fetch (every server is stored fresh)."""

    def __init__(self) -> None:
        self.requests: list[KeyRequest] = []

    async def get_keys(
        self, requests: Iterable[KeyRequest], *, use_cache: bool = True, on_server: Any = None
    ) -> Mapping[str, Mapping[str, StoredKey]]:
        self.requests.extend(requests)
        return {}


class CountingRunner:
    """A blocking runner that runs each job at once and records how many it was given."""

    def __init__(self) -> None:
        self.jobs = 0

    def __call__(self, work: Callable[[], Any]) -> "Deferred[Any]":
        self.jobs += 1
        return defer.maybeDeferred(work)


class SlowReadsStore(InMemoryKeyStore):
    """A store whose reads of stored responses (``hold``) and of one server's keys
    (``hold_keys``) answer only when the test releases them, with what is stored then."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[tuple["Deferred[None]", tuple[str, ...]]] = []
        self.hold = False
        self.hold_keys = False

    async def _wait(self, hold: bool, names: Collection[str]) -> None:
        if hold:
            gate: "Deferred[None]" = Deferred()
            self.held.append((gate, tuple(sorted(names))))
            await gate

    async def get_server_responses(self, server_name: str) -> list[StoredResponse]:
        await self._wait(self.hold, [server_name])
        return await super().get_server_responses(server_name)

    async def get_many_server_responses(
        self, server_names: Collection[str]
    ) -> dict[str, list[StoredResponse]]:
        await self._wait(self.hold, server_names)
        return await super().get_many_server_responses(server_names)

    async def get_server_keys(
        self, server_name: str, key_ids: Optional[Collection[str]] = None
    ) -> dict[str, StoredKey]:
        await self._wait(self.hold_keys, [server_name])
        return await super().get_server_keys(server_name, key_ids)

    def release_all(self) -> None:
        held, self.held = self.held, []
        for gate, _ in held:
            gate.callback(None)


class NotaryPacingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = SlowReadsStore()
        self.runner = CountingRunner()
        own_keys = OwnKeys(NOTARY, [new_signing_key("n1")])
        self.notary = NotaryService(
            own_keys,
            ServerKeyPublisher(own_keys, self.clock, DAY_MS),
            self.store,
            NoFetches(),
            self.clock,
            10_000,
            runner=self.runner,
        )

    def seed(self, count: int, valid_for_ms: int = DAY_MS) -> list[str]:
        names = [server_name(i) for i in range(count)]
        now = now_ms(self.clock)
        for name in names:
            obj = make_signed_server_keys(name, [SERVER_KEY], now + valid_for_ms)
            response = parse_server_keys_response(obj, name)
            self.successResultOf(
                ensureDeferred(self.store.store_server_keys(response, SOURCE_ORIGIN, now))
            )
            self.response_bytes = len(response.json_bytes)
        return names

    def worker_jobs_for(self, misses: int) -> int:
        """The runner jobs co-signing ``misses`` seeded responses take: what is left
        after INLINE_ROUND_BYTES' worth is signed on the reactor thread, in jobs of
        SIGNING_BATCH."""
        on_reactor = INLINE_ROUND_BYTES // self.response_bytes
        return -(-(misses - on_reactor) // SIGNING_BATCH)

    def queries(self, names: Sequence[str]) -> list[ServerQuery]:
        return [ServerQuery(n, {SERVER_KEY_ID: None}) for n in names]

    def test_small_batch_needs_no_reactor_turn(self) -> None:
        """A batch of one slice is answered without giving the reactor a turn."""
        names = self.seed(10)
        body = self.successResultOf(ensureDeferred(self.notary.query(self.queries(names))))
        self.assertEqual(len(json.loads(body)["server_keys"]), 10)

    def test_big_batch_lets_other_work_run_between_slices(self) -> None:
        """A batch of many slices gives the reactor turns while it is planned and answered:
        a call scheduled after it started runs before it is answered."""
        names = self.seed(2 * ITEMS_PER_SLICE + 1)
        answered = ensureDeferred(self.notary.query(self.queries(names)))
        self.assertNoResult(answered)
        seen_unanswered: list[bool] = []
        self.clock.callLater(0, lambda: seen_unanswered.append(not answered.called))
        self.clock.advance(0)
        self.assertEqual(seen_unanswered, [True])
        body = self.successResultOf(answered)
        self.assertEqual(
            sorted(e["server_name"] for e in json.loads(body)["server_keys"]), sorted(names)
        )

    def test_planning_asks_the_limiter_and_attempts_a_slice_at_a_time(self) -> None:
        """Planning a batch of servers needing a fetch asks the per-origin limiter and
        the fetch attempts about one slice, gives the reactor a turn, then the next:
        never about the whole batch in one go."""
        names = [server_name(i) for i in range(2 * ITEMS_PER_SLICE + 1)]
        limiter_asked: list[str] = []

        def retry_after_ms(name: str) -> int:
            limiter_asked.append(name)
            return 0

        own_keys = OwnKeys(NOTARY, [new_signing_key("n1")])
        notary = NotaryService(
            own_keys,
            ServerKeyPublisher(own_keys, self.clock, DAY_MS),
            InMemoryKeyStore(),
            NoFetches(),
            self.clock,
            10_000,
            origin_retry_after_ms=retry_after_ms,
        )
        attempts_asked: list[str] = []
        last_tried = notary.fetch_attempts.last_tried_ms

        def spied_last_tried(name: str) -> Optional[int]:
            attempts_asked.append(name)
            return last_tried(name)

        self.patch(notary.fetch_attempts, "last_tried_ms", spied_last_tried)
        planned = ensureDeferred(notary.plan_for(notary.normalise(self.queries(names))))
        self.assertNoResult(planned)
        self.assertEqual((len(limiter_asked), len(attempts_asked)), (ITEMS_PER_SLICE,) * 2)
        self.clock.advance(0)
        plan = self.successResultOf(planned)
        self.assertEqual(sorted(limiter_asked), sorted(names))
        self.assertEqual(sorted(attempts_asked), sorted(names))
        self.assertEqual(plan.fetch_count, 100)

    def test_many_cosigning_misses_are_signed_in_worker_batches(self) -> None:
        """A slice whose co-signed responses are all missing is signed INLINE_ROUND_BYTES'
        worth on the reactor thread and the rest in runner jobs of SIGNING_BATCH; the
        answers are co-signed."""
        names = self.seed(COSTLY_ITEMS_PER_SLICE)
        answered = ensureDeferred(self.notary.query(self.queries(names)))
        body = self.successResultOf(answered)
        self.assertEqual(self.runner.jobs, self.worker_jobs_for(COSTLY_ITEMS_PER_SLICE))
        entries = json.loads(body)["server_keys"]
        self.assertEqual(len(entries), COSTLY_ITEMS_PER_SLICE)
        self.assertTrue(all(NOTARY in e["signatures"] for e in entries))

    def test_few_cosigning_misses_are_signed_inline(self) -> None:
        """A few misses (SIGNING_BATCH normal responses, within INLINE_ROUND_BYTES) are
        signed at once, with no runner job."""
        names = self.seed(SIGNING_BATCH)
        self.successResultOf(ensureDeferred(self.notary.query(self.queries(names))))
        self.assertEqual(self.runner.jobs, 0)

    def test_slice_reads_its_stored_responses_at_once(self) -> None:
        """The stored responses of a slice's servers are read with one store call, and
        their misses are signed together once it answers."""
        names = self.seed(COSTLY_ITEMS_PER_SLICE)
        self.store.hold = True
        queries = [ServerQuery(n) for n in names]  # all keys: the responses are read
        answered = ensureDeferred(self.notary.query(queries))
        self.assertEqual([held for _, held in self.store.held], [tuple(sorted(names))])
        self.assertEqual(self.runner.jobs, 0)
        self.store.release_all()
        body = self.successResultOf(answered)
        self.assertEqual(self.runner.jobs, self.worker_jobs_for(COSTLY_ITEMS_PER_SLICE))
        self.assertEqual(len(json.loads(body)["server_keys"]), len(names))

    def test_misses_after_store_reads_are_still_signed_together(self) -> None:
        """Answers that first wait for another store read (their keys were rewritten
        after the plan read them) still sign together, once every one of them waits
        for its signing, even when the reads come back one by one."""
        names = self.seed(COSTLY_ITEMS_PER_SLICE)
        self.store.hold = True
        answered = ensureDeferred(self.notary.query(self.queries(names)))
        [(read, _)] = self.store.held
        self.store.held.clear()
        self.clock.advance(1)
        self.seed(COSTLY_ITEMS_PER_SLICE, DAY_MS + 1000)  # a newer copy of every key, served
        self.store.hold_keys = True
        read.callback(None)
        self.assertEqual(sorted(n for _, (n,) in self.store.held), names)  # keys re-read
        last = self.store.held.pop()
        self.store.release_all()
        self.assertEqual(self.runner.jobs, 0)  # one answer still reads: nothing signed yet
        last[0].callback(None)
        body = self.successResultOf(answered)
        self.assertEqual(self.runner.jobs, self.worker_jobs_for(COSTLY_ITEMS_PER_SLICE))
        entries = json.loads(body)["server_keys"]
        self.assertEqual(len(entries), len(names))
        self.assertEqual(
            {e["valid_until_ts"] for e in entries}, {now_ms(self.clock) + DAY_MS + 1000}
        )

    def test_cancelled_answer_does_not_stall_the_round(self) -> None:
        """A big batch cancelled while its answers read the store (the client left) fails
        with CancelledError, and a later query about the same servers is answered."""
        names = self.seed(COSTLY_ITEMS_PER_SLICE)
        self.store.hold = True
        answered = ensureDeferred(self.notary.query([ServerQuery(n) for n in names]))
        answered.cancel()
        self.failureResultOf(answered, defer.CancelledError)
        self.store.hold = False
        self.store.release_all()
        body = self.successResultOf(ensureDeferred(self.notary.query(self.queries(names))))
        self.assertEqual(len(json.loads(body)["server_keys"]), len(names))


class KeyIdCapTests(SynchronousTestCase):
    def test_too_many_key_ids_ask_for_all_keys(self) -> None:
        """A server naming more than MAX_KEY_IDS_PER_SERVER key ids is asked for all its
        keys, with the highest minimum given; at the cap its key ids are kept."""
        over = {"ed25519:k%d" % i: {"minimum_valid_until_ts": i} for i in range(33)}
        at_cap: dict[str, Any] = {"ed25519:k%d" % i: {} for i in range(MAX_KEY_IDS_PER_SERVER)}
        body = json.dumps({"server_keys": {"a.example": over, "b.example": at_cap}}).encode()
        first, second = parse_query_body(body, 10)
        self.assertEqual(first, ServerQuery("a.example", {}, all_keys_minimum=32))
        self.assertEqual(len(second.key_criteria), MAX_KEY_IDS_PER_SERVER)

    def test_many_key_ids_of_a_hanging_origin_hold_little(self) -> None:
        """A query naming 80,000 key ids of one origin (1.8 MB) is fetched as an all-keys
        request: no key id goes upstream."""
        site = RawNotarySite({"hang.test": HangingResource()})
        criteria: dict[str, Any] = {"ed25519:%08d" % i: {} for i in range(80_000)}
        body = json.dumps({"server_keys": {"hang.test": criteria}}).encode()
        pending = site.open(request_bytes(b"POST", QUERY_PATH, body))
        try:
            self.assertIsNone(pending.response())
            [request] = site.client.requests_to("hang.test")
            self.assertEqual(request.path, "/_matrix/key/v2/server")
        finally:
            pending.close()


class KeyQueryResourceLimitsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.site = RawNotarySite({"hang%d.test" % i: HangingResource() for i in range(3)})
        now = now_ms(self.site.reactor)
        obj = make_signed_server_keys("stored.test", [SERVER_KEY], now + DAY_MS)
        response = parse_server_keys_response(obj, "stored.test")
        self.successResultOf(
            ensureDeferred(self.site.store.store_server_keys(response, SOURCE_ORIGIN, now))
        )

    def stub(self, runner: Any) -> StubTreq:
        notary = self.site.services.notary
        assert notary is not None
        config = NotaryConfig(max_servers_per_request=10_000, max_request_body=2 * 1024 * 1024)
        resource = KeyQueryResource(notary, config, runner=runner)
        return StubTreq(build_root(build_key_resource(self.site.services.publisher, resource)))

    def post(self, http: StubTreq, body: bytes) -> tuple[int, Any]:
        posted = http.request(  # type: ignore[attr-defined]
            "POST", "https://notary.test/_matrix/key/v2/query", data=body
        )
        content: list[bytes] = []
        posted.addCallback(lambda r: r.content().addCallback(content.append) and r)
        for _ in range(60):  # unknown servers: their fetches fail as time passes
            if content:
                break
            self.site.reactor.advance(1)
            self.site.deliver()
            http.flush()
        response = self.successResultOf(posted)
        return response.code, json.loads(content[0])

    def test_big_bodies_are_parsed_by_the_runner(self) -> None:
        """A body over PARSE_IN_THREAD_BYTES is parsed by the runner; a small one is not."""
        runner = CountingRunner()
        http = self.stub(runner)
        code, _ = self.post(http, synapse_body(["stored.test"]))
        self.assertEqual((code, runner.jobs), (200, 0))
        names = ["stored.test"] + ["x%05d.example" % i for i in range(2000)]
        big = synapse_body(names)
        self.assertGreater(len(big), PARSE_IN_THREAD_BYTES)
        code, answer = self.post(http, big)
        self.assertEqual((code, runner.jobs), (200, 1))
        self.assertIn("stored.test", [e["server_name"] for e in answer["server_keys"]])

    def test_full_worker_pool_answers_429_not_500(self) -> None:
        """A big body arriving while the worker pool is full gets 429 M_LIMIT_EXCEEDED
        with retry_after_ms; a small body is still answered."""

        def full(work: Callable[[], Any]) -> "Deferred[Any]":
            return defer.fail(WorkerPoolBusyError("the worker pool already holds 64 jobs"))

        http = self.stub(full)
        big = synapse_body(["stored.test"] + ["x%05d.example" % i for i in range(2000)])
        code, error = self.post(http, big)
        self.assertEqual(code, 429)
        self.assertEqual(error["errcode"], "M_LIMIT_EXCEEDED")
        self.assertIn("retry_after_ms", error)
        code, _ = self.post(http, synapse_body(["stored.test"]))
        self.assertEqual(code, 200)

    def test_waiting_queries_are_bounded_in_bytes(self) -> None:
        """Once the queries waiting for fetches hold WAITING_QUERIES_MAX_BYTES, another
        query needing a fetch is answered from the store at once, without fetching; when
        the first one is done, queries wait for fetches again."""
        padding: dict[str, Any] = {"ed25519:p%d" % i: {} for i in range(20)}
        first_body = json.dumps({"server_keys": {"hang0.test": padding}}).encode()
        self.patch(key_query, "WAITING_QUERIES_MAX_BYTES", len(first_body) + 3000)
        first = self.site.open(request_bytes(b"POST", QUERY_PATH, first_body))
        self.assertIsNone(first.response())  # waiting for hang0.test
        second_body = json.dumps(
            {"server_keys": {"hang1.test": padding, "stored.test": {}}}
        ).encode()
        second = self.site.request(b"POST", QUERY_PATH, second_body, max_wait_seconds=0)
        assert second is not None
        self.assertEqual(second.code, 200)
        self.assertEqual([e["server_name"] for e in second.json()["server_keys"]], ["stored.test"])
        self.assertEqual(self.site.client.requests_to("hang1.test"), [])
        first.close()
        self.site.deliver()
        third = self.site.open(
            request_bytes(b"POST", QUERY_PATH, b'{"server_keys":{"hang2.test":{}}}')
        )
        try:
            self.assertIsNone(third.response())  # waits for its fetch
            self.assertEqual(len(self.site.client.requests_to("hang2.test")), 1)
        finally:
            third.close()

    def test_request_lets_go_of_its_body(self) -> None:
        """Once read, a POST body is no longer held by the request object."""
        held: list[Optional[bytes]] = []
        notary = self.site.services.notary
        assert notary is not None
        resource = KeyQueryResource(notary, NotaryConfig())

        class Request:
            content: Any

        from io import BytesIO

        request = Request()
        request.content = BytesIO(b'{"server_keys":{}}')
        held.append(resource._read_body(request))  # type: ignore[arg-type]
        self.assertEqual(held, [b'{"server_keys":{}}'])
        self.assertEqual(request.content.getvalue(), b"")
