"""The bound on outcome rows (:func:`~keyring_module.storage.flight_rows.trim_outcomes_txn`):
each write drops at most ``TRIM_OUTCOMES_PER_WRITE`` rows past the newest
``MAX_OUTCOME_ROWS``, never one of those. On SQLite and PostgreSQL."""

import os
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from keyring_module.clock import global_reactor, now_ms
from keyring_module.storage import flight_rows
from keyring_module.storage.coordination import OUTCOME_OK, Coordination, FlightOutcome
from keyring_module.storage.sql import SqlKeyStore
from keyring_module.storage.sqlite import SqliteKeyStore
from keyring_module.storage.sqlite_coordination import SqliteCoordination
from tests.storage_writer import postgres_test_schema


class TrimMixin:
    """Needs ``clock`` and ``open()`` (a store and its coordination)."""

    clock: Clock

    async def open(self) -> tuple[SqlKeyStore, Coordination]:
        raise NotImplementedError

    async def finish(self, coordination: Coordination, name: str, lease: bool = True) -> None:
        if lease:  # (on SQLite, taking a lease trims too)
            await coordination.try_acquire(name)
        outcome = FlightOutcome(
            now_ms(self.clock), coordination.holder_id, OUTCOME_OK, "ok", "", b"{}"
        )
        await coordination.finish(name, outcome)
        self.clock.advance(1)

    async def names(self, store: SqlKeyStore) -> set[str]:
        def select(txn: Any) -> set[str]:
            txn.execute("SELECT server_name FROM origin_flights")
            return {str(row[0]) for row in txn.fetchall()}

        return await store.run("read rows", select)

    async def test_rows_past_the_bound_go_a_few_per_write(self) -> None:
        test: Any = self
        store, a = await self.open()
        names = ["n%02d.example" % i for i in range(10)]
        for name in names:
            await self.finish(a, name)
        test.assertEqual(await self.names(store), set(names))  # within the bound then
        test.patch(flight_rows, "MAX_OUTCOME_ROWS", 3)
        test.patch(flight_rows, "TRIM_OUTCOMES_PER_WRITE", 4)
        # 11 rows, 8 past the bound: 4 go, never the newest 3.
        await self.finish(a, "m0.example", lease=False)
        left = await self.names(store)
        test.assertEqual(len(left), 7)
        test.assertLessEqual({"m0.example", "n09.example", "n08.example"}, left)
        await self.finish(a, "m1.example", lease=False)  # 8 rows, 5 past: 4 go
        left = await self.names(store)
        test.assertEqual(len(left), 4)
        test.assertLessEqual({"m1.example", "m0.example", "n09.example"}, left)
        await self.finish(a, "m2.example", lease=False)  # 5 rows, 2 past: both go
        test.assertEqual(await self.names(store), {"m0.example", "m1.example", "m2.example"})


class SqliteTrimTests(TrimMixin, TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)

    async def open(self) -> tuple[SqlKeyStore, Coordination]:
        store = SqliteKeyStore(os.path.abspath(self.mktemp()) + ".db", global_reactor())
        self.addCleanup(store.close)
        await store.migrate()
        coordination = SqliteCoordination(store, self.clock, lease_ms=10_000, poll_interval_ms=100)
        self.addCleanup(coordination.close)
        return store, coordination


class PostgresTrimTests(TrimMixin, TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)

    async def open(self) -> tuple[SqlKeyStore, Coordination]:
        from keyring_module.storage.pg_coordination import PostgresCoordination
        from keyring_module.storage.postgres import PostgresKeyStore

        dsn, _ = postgres_test_schema(self)
        store = PostgresKeyStore(dsn, global_reactor(), pool_size=1)
        self.addCleanup(store.close)
        await store.migrate()
        coordination = PostgresCoordination(store, dsn, global_reactor(), lease_ms=10_000)
        self.addCleanup(coordination.close)
        return store, coordination
