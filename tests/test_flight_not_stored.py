"""An answer too big for its flight outcome that never reaches the store
(:mod:`keyring_module.shared_flights`): the fetching process says so after its store
attempt (``not_stored``), and waiters stop waiting for it after ``STORED_GRACE_MS``
and take the lease, so that one of them fetches; on SQLite, taking and giving back
leases keeps the outcome rows within their bound."""

from typing import Any, Iterable

from prometheus_client import CollectorRegistry
from twisted.internet import defer, task
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from keyring_module.blocking import run_inline
from keyring_module.clock import global_reactor, now_ms
from keyring_module.config import parse_config
from keyring_module.fetchers.base import FetchResult
from keyring_module.fetchers.conflict_log import ConflictLog
from keyring_module.fetchers.storing import TrustedAnswerWriter
from keyring_module.metrics import Metrics
from keyring_module.model import SOURCE_ORIGIN
from keyring_module.shared_flights import STORED_GRACE_MS, STORED_RETRY_MS, SharedFlights
from keyring_module.storage import flight_rows
from keyring_module.storage.coordination import (
    OUTCOME_NOT_STORED,
    OUTCOME_STORED,
    FlightOutcome,
)
from keyring_module.storage.memory import InMemoryKeyStore
from keyring_module.wiring import Fetching
from tests.fake_reactors import FakeReactor
from tests.fakes import FakeFederationClient
from tests.storage_writer import make_response
from tests.test_flight_outcome_bounds import (
    KEY_A,
    BytesCodec,
    TwoPostgresCoordinations,
    TwoSqliteCoordinations,
    big_response,
    ok,
)
from tests.test_shared_flights import LEASE_MS, FakeCoordination, TextCodec


async def turn() -> None:
    """Let the store's threads answer."""
    await task.deferLater(global_reactor(), 0.01, lambda: None)  # type: ignore[arg-type]


class MarkNotStoredMixin:
    """``mark_not_stored`` on both SQL backends (``self.a``/``self.b`` on one database)."""

    a: Any
    b: Any
    store_a: Any
    clock: Any
    name: str

    async def write_big(self) -> Any:
        response = big_response(self.name)
        await self.a.try_acquire(self.name)
        await self.a.finish(self.name, ok(self.a, self.clock, response.json_bytes))
        return response

    async def test_an_answer_not_in_the_store_is_marked(self) -> None:
        test: Any = self
        response = await self.write_big()
        test.assertTrue(await self.a.mark_not_stored(self.name, response.response_id))
        found = await self.b.read_outcome(self.name)
        test.assertEqual((found.outcome, found.body), (OUTCOME_NOT_STORED, None))
        test.assertTrue(found.shares_nothing)
        test.assertFalse(found.awaits_store)

    async def test_a_stored_answer_is_left_alone(self) -> None:
        test: Any = self
        response = await self.write_big()
        await self.store_a.store_server_keys(response, "origin", 1)
        test.assertFalse(await self.a.mark_not_stored(self.name, response.response_id))
        found = await self.b.read_outcome(self.name)
        test.assertEqual((found.outcome, found.body), (OUTCOME_STORED, response.json_bytes))

    async def test_only_its_own_outcome_of_that_answer_is_marked(self) -> None:
        """Another process's outcome, or a later one, is not this process's to mark."""
        test: Any = self
        response = await self.write_big()
        test.assertFalse(await self.b.mark_not_stored(self.name, response.response_id))
        test.assertFalse(await self.a.mark_not_stored(self.name, "another-id"))
        test.assertTrue((await self.b.read_outcome(self.name)).awaits_store)


class SqliteNotStoredTests(MarkNotStoredMixin, TwoSqliteCoordinations):
    """Two SQLite coordinations on one file, and their shared flights."""

    server_name = "big.example"

    async def rows(self) -> int:
        def count(txn: Any) -> int:
            txn.execute("SELECT COUNT(*) FROM origin_flights")
            return int(txn.fetchone()[0])

        counted: int = await self.store_a.run("count", count)
        return counted

    async def test_a_waiter_fetches_at_once_when_the_answer_was_not_stored(self) -> None:
        """The review's case: a copy valid for longer is stored, so A's store attempt
        of the older answer it fetched writes nothing. A says so; B, waiting for the
        store, takes the lease and fetches at its next poll, long before the grace
        (and twice the lease) ran out."""
        pad = {"padding": "x" * (flight_rows.MAX_OUTCOME_BODY_BYTES + 10)}
        newer = make_response(self.name, 2 * 10**13, KEY_A, extra=pad)
        older = make_response(self.name, 10**13, KEY_A, extra=pad)
        await self.store_a.store_server_keys(newer, "origin", 1)
        await self.b.poll()
        flights_a = SharedFlights(self.a, self.clock)
        flights_b = SharedFlights(self.b, self.clock)

        async def fetch_a() -> bytes:
            return older.json_bytes

        fetched_by_b: list[bool] = []

        async def fetch_b() -> bytes:
            fetched_by_b.append(True)
            return b"B's own fetch"

        self.assertEqual(await flights_a.run(self.name, fetch_a, BytesCodec()), older.json_bytes)
        await self.store_a.store_server_keys(older, "origin", 2)  # plans nothing to write
        waiting = defer.ensureDeferred(flights_b.run(self.name, fetch_b, BytesCodec()))
        for _ in range(500):  # until B has read the outcome and waits for news
            if len(self.b._watchers):
                break
            await turn()
        self.assertNoResult(waiting)
        await flights_a.settled(self.name, [newer.json_bytes])  # not the flight's answer
        self.assertTrue((await self.b.read_outcome(self.name)).awaits_store)
        await flights_a.settled(self.name, [older.json_bytes])
        self.assertEqual((await self.b.read_outcome(self.name)).outcome, OUTCOME_NOT_STORED)
        await self.b.poll()
        timer = global_reactor().callLater(5, waiting.cancel)
        self.assertEqual(await waiting, b"B's own fetch")
        timer.cancel()
        self.assertEqual(fetched_by_b, [True])
        self.assertEqual((flights_b.fetched, flights_b.shared), (1, 0))
        self.assertLess(now_ms(self.clock) - 1_000_000_000, STORED_GRACE_MS)
        # B fetched holding the lease, and shared its outcome.
        self.assertEqual((await self.a.read_outcome(self.name)).finished_by, self.b.holder_id)

    async def test_a_stored_answer_is_not_marked_by_settled(self) -> None:
        response = big_response(self.name)
        flights_a = SharedFlights(self.a, self.clock)

        async def fetch_a() -> bytes:
            return response.json_bytes

        await flights_a.run(self.name, fetch_a, BytesCodec())
        await self.store_a.store_server_keys(response, "origin", 1)
        await flights_a.settled(self.name, [response.json_bytes])
        found = await self.b.read_outcome(self.name)
        self.assertEqual((found.outcome, found.body), (OUTCOME_STORED, response.json_bytes))

    async def test_leases_given_back_keep_the_rows_within_the_bound(self) -> None:
        """Flights that end with nothing to share (a lease taken, then given back with
        no outcome) leave no more rows than the bound allows."""
        self.patch(flight_rows, "MAX_OUTCOME_ROWS", 3)
        for i in range(12):
            name = "n%d.example" % i
            self.assertTrue((await self.a.try_acquire(name)).acquired)
            await self.a.finish(name, None)
            self.clock.advance(1)
        self.assertLessEqual(await self.rows(), 3)

    async def test_leases_taken_keep_the_rows_within_the_bound(self) -> None:
        """Leases that ran out (a holder that died) leave no more rows than the bound
        allows once more are taken; a lease still held is kept."""
        self.patch(flight_rows, "MAX_OUTCOME_ROWS", 3)
        self.assertTrue((await self.b.try_acquire("held.example")).acquired)
        for i in range(12):
            self.clock.advance(LEASE_MS / 1000 + 1)  # the last lease ran out
            await self.b.renew("held.example")
            self.assertTrue((await self.a.try_acquire("n%d.example" % i)).acquired)
        self.assertLessEqual(await self.rows(), 3)
        self.assertFalse((await self.a.try_acquire("held.example")).acquired)
        self.assertFalse((await self.b.try_acquire("n11.example")).acquired)


class PostgresNotStoredTests(MarkNotStoredMixin, TwoPostgresCoordinations):
    """Two PostgreSQL coordinations on one schema: the mark wakes the waiters."""

    async def test_marking_wakes_the_waiting_flights(self) -> None:
        response = await self.write_big()
        woken = self.b.watch(self.name)
        self.assertTrue(await self.a.mark_not_stored(self.name, response.response_id))
        timer = self.reactor.callLater(2, woken.cancel)
        await woken
        self.assertTrue(timer.active(), "not woken within 2 s")
        timer.cancel()


def pending(clock: Clock) -> FlightOutcome:
    return FlightOutcome(now_ms(clock), "other", OUTCOME_STORED, "ok", "id")


class GraceTests(SynchronousTestCase):
    """Waiters past the grace go through the lease: at most one of them fetches."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        # Two processes seeing one database.
        self.db_a = FakeCoordination("a")
        self.db_b = FakeCoordination("b")
        self.db_b.holders = self.db_a.holders
        self.db_b.outcomes = self.db_a.outcomes
        self.db_b.watchers = self.db_a.watchers
        self.fetches: list[str] = []
        self.answer: "defer.Deferred[str]" = defer.Deferred()

    def flight(self, db: FakeCoordination) -> "defer.Deferred[str]":
        async def fetch() -> str:
            self.fetches.append(db.holder_id)
            return await self.answer

        flights = SharedFlights(db, self.clock)
        return defer.ensureDeferred(flights.run("example.org", fetch, TextCodec()))

    def test_one_waiter_fetches_after_the_grace(self) -> None:
        self.db_a.outcomes["example.org"] = pending(self.clock)
        first, second = self.flight(self.db_a), self.flight(self.db_b)
        self.clock.pump([STORED_RETRY_MS / 1000] * (STORED_GRACE_MS // STORED_RETRY_MS - 1))
        self.assertEqual(self.fetches, [])
        self.clock.advance(STORED_RETRY_MS / 1000)
        self.assertEqual(self.fetches, ["a"])  # holding the lease: b waits for it
        self.assertEqual(self.db_a.holders, {"example.org": "a"})
        self.clock.pump([STORED_RETRY_MS / 1000] * 4)
        self.assertEqual(self.fetches, ["a"])
        self.answer.callback("fetched")
        self.assertEqual(self.successResultOf(first), "fetched")
        self.assertEqual(self.successResultOf(second), "fetched")  # a's outcome
        self.assertEqual(self.fetches, ["a"])

    def test_settled_marks_only_the_awaited_answer(self) -> None:
        """The fetching process's ``settled`` (after its store attempt) marks its own
        big answer when it is not stored, and wakes the waiter, which fetches."""
        body = b'{"padding": "%s"}' % (b"x" * flight_rows.MAX_OUTCOME_BODY_BYTES)
        flights_a = SharedFlights(self.db_a, self.clock)

        async def fetch_a() -> str:
            return body.decode()

        self.successResultOf(
            defer.ensureDeferred(flights_a.run("example.org", fetch_a, TextCodec()))
        )
        waiting = self.flight(self.db_b)
        self.assertEqual(self.fetches, [])
        self.successResultOf(defer.ensureDeferred(flights_a.settled("other.org", [body])))
        self.successResultOf(defer.ensureDeferred(flights_a.settled("example.org", [b"{}"])))
        self.assertEqual(self.fetches, [])
        self.successResultOf(defer.ensureDeferred(flights_a.settled("example.org", [body])))
        self.assertEqual(self.fetches, ["b"])
        self.answer.callback("b's")
        self.assertEqual(self.successResultOf(waiting), "b's")


class SettledHookTests(TestCase):
    """The writer tells the shared flights once it tried to store a server's answers."""

    async def test_on_settled_runs_after_the_store_attempt(self) -> None:
        store = InMemoryKeyStore()
        writer = TrustedAnswerWriter(store, ConflictLog(Clock()), min_agreeing_sources=1)
        response = make_response("example.org", 10**13, KEY_A)
        seen: list[tuple[str, list[bytes], bool]] = []

        async def settled(server_name: str, answers: Iterable[bytes]) -> None:
            stored = await store.get_server_keys(server_name)
            seen.append((server_name, list(answers), bool(stored)))

        writer.on_settled = settled
        await writer.apply(
            "example.org", [FetchResult(response, SOURCE_ORIGIN)], {}, now_ms(Clock())
        )
        self.assertEqual(seen, [("example.org", [response.json_bytes], True)])


class SharedStore(InMemoryKeyStore):
    """A store that says it is shared with other processes."""

    def __init__(self) -> None:
        super().__init__()
        self.coordination = FakeCoordination()


class WiredSettledTests(SynchronousTestCase):
    """With a shared store, both chains tell the origin fetcher's shared flights."""

    def test_both_chains_tell_the_shared_flights(self) -> None:
        config = parse_config({"signing_key_path": "unused"}, standalone=False)
        reactor = FakeReactor()
        fetching = Fetching.build(
            reactor,
            config,
            SharedStore(),
            client=FakeFederationClient({}),
            metrics=Metrics(CollectorRegistry()),
            run_blocking=run_inline,
        )
        flights = fetching.origin_fetcher._shared
        assert flights is not None
        self.assertIsNot(fetching.chain, fetching.request_auth_chain)
        self.assertEqual(fetching.chain.on_settled, flights.settled)
        self.assertEqual(fetching.request_auth_chain.on_settled, flights.settled)

    def test_an_unshared_store_has_no_hook(self) -> None:
        config = parse_config({"signing_key_path": "unused"}, standalone=False)
        fetching = Fetching.build(
            FakeReactor(),
            config,
            InMemoryKeyStore(),
            client=FakeFederationClient({}),
            metrics=Metrics(CollectorRegistry()),
            run_blocking=run_inline,
        )
        self.assertIsNone(fetching.chain.on_settled)
