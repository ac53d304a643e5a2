"""Flight outcomes are bounded in bytes (:mod:`keyring_module.storage.flight_rows`): an
answer over ``MAX_OUTCOME_BODY_BYTES`` is written without its body and the waiters read
it from the store once the fetching process stored it; the table keeps at most
``MAX_OUTCOME_ROWS`` rows. On SQLite and PostgreSQL, and through the shared flights."""

import os
from typing import Any, Optional

import attr
from twisted.internet import defer, task
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from keyring_module.clock import global_reactor, now_ms
from keyring_module.model import ServerKeysResponse
from keyring_module.shared_flights import STORED_GRACE_MS, STORED_RETRY_MS, SharedFlights
from keyring_module.storage import flight_rows
from keyring_module.storage.coordination import (
    OUTCOME_OK,
    OUTCOME_STORED,
    Coordination,
    FlightOutcome,
    LeaseAttempt,
)
from keyring_module.storage.flight_rows import MAX_OUTCOME_BODY_BYTES
from keyring_module.storage.sqlite import SqliteKeyStore
from keyring_module.storage.sqlite_coordination import SqliteCoordination
from tests.storage_writer import make_response, postgres_test_schema
from tests.test_shared_flights import LEASE_MS, FakeCoordination, TextCodec

KEY_A = {"ed25519:a": b"a" * 32}


def big_response(name: str) -> ServerKeysResponse:
    """An answer just over the cap (a padding field the store keeps)."""
    response = make_response(
        name, 10**13, KEY_A, extra={"padding": "x" * (MAX_OUTCOME_BODY_BYTES + 10)}
    )
    assert len(response.json_bytes) > MAX_OUTCOME_BODY_BYTES
    return response


def ok(coordination: Coordination, clock: Any, body: bytes) -> FlightOutcome:
    return FlightOutcome(now_ms(clock), coordination.holder_id, OUTCOME_OK, "ok", "", body)


class BytesCodec:
    """Answers are the origin's bytes (as the origin fetcher shares them)."""

    def encode(self, result: bytes, finished_ts: int, holder_id: str) -> FlightOutcome:
        return FlightOutcome(finished_ts, holder_id, OUTCOME_OK, "ok", "", result)

    def encode_error(
        self, error: BaseException, finished_ts: int, holder_id: str
    ) -> Optional[FlightOutcome]:
        return None

    async def decode(self, outcome: FlightOutcome) -> bytes:
        assert outcome.ok and outcome.body is not None, outcome
        return outcome.body


class OutcomeRowsMixin:
    """The same checks on both SQL backends: ``self.a``/``self.b`` coordinate through
    one database, ``self.store_a`` is ``a``'s store, ``self.clock`` their time."""

    a: Any
    b: Any
    store_a: Any
    clock: Any
    name: str

    def row(self, name: str) -> Any:
        raise NotImplementedError

    async def test_a_small_answer_is_kept_in_the_outcome(self) -> None:
        test: Any = self
        response = make_response(self.name, 10**13, KEY_A)
        outcome = ok(self.a, self.clock, response.json_bytes)
        await self.a.try_acquire(self.name)
        await self.a.finish(self.name, outcome)
        test.assertEqual(await self.b.read_outcome(self.name), outcome)

    async def test_a_big_answer_is_read_from_the_store(self) -> None:
        """The row holds no body, only the response id; the outcome read back has no
        body until the answer is stored, then the stored bytes."""
        test: Any = self
        response = big_response(self.name)
        await self.a.try_acquire(self.name)
        await self.a.finish(self.name, ok(self.a, self.clock, response.json_bytes))
        outcome_column, detail, body = await self.row(self.name)
        test.assertEqual(
            (outcome_column, detail, body), (OUTCOME_STORED, response.response_id, None)
        )
        pending = await self.b.read_outcome(self.name)
        test.assertEqual((pending.outcome, pending.body), (OUTCOME_STORED, None))
        test.assertTrue(pending.awaits_store)
        test.assertFalse(pending.ok)
        await self.store_a.store_server_keys(response, "origin", 1)
        found = await self.b.read_outcome(self.name)
        test.assertTrue(found.ok)
        test.assertEqual(found.body, response.json_bytes)
        test.assertEqual(found.finished_by, self.a.holder_id)

    async def test_another_servers_response_is_not_an_answer(self) -> None:
        """The stored response must be the named server's: the same bytes stored for
        another name (impossible for a valid answer, but the id is only a hash) do not
        count."""
        test: Any = self
        response = big_response(self.name)
        await self.a.try_acquire(self.name)
        await self.a.finish(self.name, ok(self.a, self.clock, response.json_bytes))
        other = ServerKeysResponse(
            server_name="other." + self.name,
            valid_until_ts=response.valid_until_ts,
            verify_keys=response.verify_keys,
            old_verify_keys={},
            json_bytes=response.json_bytes,
        )
        await self.store_a.store_server_keys(other, "origin", 1)
        test.assertTrue((await self.b.read_outcome(self.name)).awaits_store)

    async def test_the_table_keeps_the_newest_rows_up_to_its_bound(self) -> None:
        """Beyond ``MAX_OUTCOME_ROWS``, the rows of flights that ended longest ago go
        as new ones are written."""
        test: Any = self
        test.patch(flight_rows, "MAX_OUTCOME_ROWS", 3)
        names = ["n%d.%s" % (i, self.name) for i in range(6)]
        for name in names:
            await self.a.try_acquire(name)
            await self.a.finish(name, ok(self.a, self.clock, b"{}"))
            self.clock.advance(1)
        kept = [name for name in names if await self.b.read_outcome(name) is not None]
        test.assertEqual(kept, names[-3:])


class TwoSqliteCoordinations(TestCase):
    """Two SQLite stores and coordinations on one file (``store_a``/``a``,
    ``store_b``/``b``; :meth:`process` makes another); ``name`` is a server name."""

    server_name = "example.org"

    def setUp(self) -> "defer.Deferred[None]":  # type: ignore[override]  # trial waits
        return defer.ensureDeferred(self.set_up())

    async def set_up(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.name = self.server_name
        self.path = os.path.abspath(self.mktemp()) + ".db"
        self.store_a, self.a = await self.process()
        self.store_b, self.b = await self.process()

    async def process(self) -> tuple[SqliteKeyStore, SqliteCoordination]:
        store = SqliteKeyStore(self.path, global_reactor())
        await store.migrate()
        coordination = SqliteCoordination(
            store, self.clock, lease_ms=LEASE_MS, poll_interval_ms=100
        )
        self.addCleanup(store.close)
        self.addCleanup(coordination.close)
        return store, coordination


class SqliteOutcomeRowsTests(OutcomeRowsMixin, TwoSqliteCoordinations):
    """Two SQLite coordinations on one file."""

    async def row(self, name: str) -> Any:
        def select(txn: Any) -> Any:
            txn.execute(
                "SELECT outcome, detail, body FROM origin_flights WHERE server_name = ?", (name,)
            )
            return tuple(txn.fetchone())

        return await self.store_a.run("read", select)

    async def test_a_held_lease_outlives_the_bound(self) -> None:
        """A lease being held is never dropped for the bound (its flight is running)."""
        self.patch(flight_rows, "MAX_OUTCOME_ROWS", 2)
        self.assertTrue((await self.b.try_acquire("held.example")).acquired)
        for i in range(4):
            self.clock.advance(1)
            name = "n%d.example" % i
            await self.a.try_acquire(name)
            await self.a.finish(name, ok(self.a, self.clock, b"{}"))
        self.assertFalse((await self.a.try_acquire("held.example")).acquired)

    async def test_a_waiting_flight_gets_the_big_answer_from_the_store(self) -> None:
        """End to end: A fetches a big answer through its shared flight; B's flight for
        the name waits (no fetch of its own) until A stores the answer, and is woken by
        its next poll to use the stored bytes."""
        response = big_response(self.name)
        flights_a = SharedFlights(self.a, self.clock)
        flights_b = SharedFlights(self.b, self.clock)
        await self.b.poll()  # where the change feed is

        async def fetch_a() -> bytes:
            return response.json_bytes

        fetched_by_b: list[bool] = []

        async def fetch_b() -> bytes:
            fetched_by_b.append(True)
            return b"B's own fetch"

        self.assertEqual(await flights_a.run(self.name, fetch_a, BytesCodec()), response.json_bytes)
        waiting = defer.ensureDeferred(flights_b.run(self.name, fetch_b, BytesCodec()))
        for _ in range(500):  # until B has read the outcome and waits for news
            if len(self.b._watchers):
                break
            await task.deferLater(global_reactor(), 0.01, lambda: None)  # type: ignore[arg-type]
        self.assertEqual(len(self.b._watchers), 1)
        self.assertFalse(waiting.called)
        await self.store_a.store_server_keys(response, "origin", 1)
        await self.b.poll()
        timer = global_reactor().callLater(5, waiting.cancel)
        self.assertEqual(await waiting, response.json_bytes)
        timer.cancel()
        self.assertEqual(fetched_by_b, [])
        self.assertEqual((flights_b.fetched, flights_b.shared), (0, 1))


class TwoPostgresCoordinations(TestCase):
    """Two PostgreSQL stores and coordinations on one test schema: ``store_a``/``a`` and
    ``store_b``/``b``; ``name`` is a server name of this test's own."""

    timeout = 30

    def setUp(self) -> "defer.Deferred[None]":  # type: ignore[override]  # trial waits
        return defer.ensureDeferred(self.set_up())

    async def set_up(self) -> None:
        from keyring_module.storage.pg_coordination import PostgresCoordination
        from keyring_module.storage.postgres import PostgresKeyStore

        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.reactor = global_reactor()
        dsn, schema = postgres_test_schema(self)
        self.name = "%s.example.org" % schema.replace("_", "-")
        pairs = []
        for _ in range(2):
            store = PostgresKeyStore(dsn, self.reactor, pool_size=2)
            await store.migrate()
            self.addCleanup(store.close)
            coordination = PostgresCoordination(store, dsn, self.reactor, lease_ms=LEASE_MS)
            await coordination.start()
            self.addCleanup(coordination.close)
            pairs.append((store, coordination))
        (self.store_a, self.a), (self.store_b, self.b) = pairs


class PostgresOutcomeRowsTests(OutcomeRowsMixin, TwoPostgresCoordinations):
    """Two PostgreSQL coordinations on one schema; key news wakes a waiting flight."""

    async def row(self, name: str) -> Any:
        def select(txn: Any) -> Any:
            txn.execute(
                "SELECT outcome, detail, body FROM origin_flights WHERE server_name = %s", (name,)
            )
            outcome, detail, body = txn.fetchone()
            return outcome, detail, None if body is None else bytes(body)

        return await self.store_a.run("read", select)

    async def test_storing_the_keys_wakes_the_waiting_flights(self) -> None:
        """The key write's NOTIFY wakes the name's waiting flights, which then find the
        big answer in the store."""
        response = big_response(self.name)
        await self.a.try_acquire(self.name)
        await self.a.finish(self.name, ok(self.a, self.clock, response.json_bytes))
        woken = self.b.watch(self.name)
        await self.store_a.store_server_keys(response, "origin", 1)
        timer = self.reactor.callLater(2, woken.cancel)
        await woken
        self.assertTrue(timer.active(), "not woken within 2 s")
        timer.cancel()
        self.assertEqual((await self.b.read_outcome(self.name)).body, response.json_bytes)


class WaitingForTheStoreTests(SynchronousTestCase):
    """The shared-flight protocol with an answer that is in the store, or not yet."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.db = FakeCoordination()
        self.flights = SharedFlights(self.db, self.clock)
        self.calls = 0

    async def fetch(self) -> str:
        self.calls += 1
        return "mine"

    def pending(self) -> FlightOutcome:
        return FlightOutcome(now_ms(self.clock), "other", OUTCOME_STORED, "ok", "id")

    def test_a_waiter_takes_the_answer_once_it_is_stored(self) -> None:
        """Told of the store's write, it uses the answer: no fetch, no lease taken."""
        self.db.outcomes["example.org"] = self.pending()
        running = defer.ensureDeferred(self.flights.run("example.org", self.fetch, TextCodec()))
        self.clock.advance(STORED_RETRY_MS / 1000)  # looked again: still not stored
        self.assertNoResult(running)
        self.assertEqual(self.db.holders, {})
        stored = attr.evolve(self.db.outcomes["example.org"], body=b"theirs")
        self.db.other_finishes("example.org", stored)  # stands for the key write's news
        self.assertEqual(self.successResultOf(running), "theirs")
        self.assertEqual((self.calls, self.flights.shared), (0, 1))

    def test_an_answer_never_stored_is_fetched_holding_the_lease_after_the_grace(self) -> None:
        """The other process did not store it (it died before): past
        ``STORED_GRACE_MS`` after that flight ended, this process takes the lease and
        fetches, once; not twice ``lease_ms`` later, nor without the lease."""
        self.db.outcomes["example.org"] = self.pending()
        running = defer.ensureDeferred(self.flights.run("example.org", self.fetch, TextCodec()))
        self.clock.pump([STORED_RETRY_MS / 1000] * (STORED_GRACE_MS // STORED_RETRY_MS - 1))
        self.assertNoResult(running)
        self.assertEqual(self.calls, 0)
        self.clock.advance(STORED_RETRY_MS / 1000)
        self.assertEqual(self.successResultOf(running), "mine")
        self.assertEqual(self.calls, 1)
        # It fetched holding the lease, and shared its own answer.
        self.assertEqual(self.db.holders, {})
        self.assertEqual(self.db.outcomes["example.org"].finished_by, "me")

    def test_the_holder_does_not_use_a_pending_answer(self) -> None:
        """A flight that ended elsewhere just before this one took the lease, with its
        answer not stored yet: this one gives the lease back and waits for the store,
        as the other waiters do (no fetch of its own)."""
        db = self.db
        taken = db.try_acquire

        async def try_acquire(server_name: str) -> LeaseAttempt:
            attempt = await taken(server_name)
            if server_name not in db.outcomes:
                db.outcomes[server_name] = self.pending()  # ended just now
            return attempt

        db.try_acquire = try_acquire  # type: ignore[method-assign]
        running = defer.ensureDeferred(self.flights.run("example.org", self.fetch, TextCodec()))
        self.assertNoResult(running)
        self.assertEqual(db.holders, {})  # given back
        self.clock.advance(STORED_RETRY_MS / 1000)
        self.assertNoResult(running)
        stored = attr.evolve(db.outcomes["example.org"], body=b"theirs")
        db.other_finishes("example.org", stored)  # stands for the key write's news
        self.assertEqual(self.successResultOf(running), "theirs")
        self.assertEqual((self.calls, self.flights.shared), (0, 1))
