"""How long flight outcomes are kept (:func:`~keyring_module.storage.flight_rows.outcome_keep_ms`):
a minute, or, with a lease so long that a waiter may read an outcome later than that,
longer than it may. On SQLite and PostgreSQL."""

import os
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from keyring_module.clock import global_reactor, now_ms
from keyring_module.storage.coordination import OUTCOME_OK, Coordination, FlightOutcome
from keyring_module.storage.flight_rows import OUTCOME_KEEP_MS, outcome_keep_ms
from keyring_module.storage.sqlite import SqliteKeyStore
from keyring_module.storage.sqlite_coordination import SqliteCoordination
from tests.storage_writer import postgres_test_schema

#: A lease whose waiters wait (twice it) longer than OUTCOME_KEEP_MS.
LONG_LEASE_MS = 60_000


class KeepMixin:
    """Needs ``clock`` and ``coordination()`` (a coordination with the given lease)."""

    clock: Clock

    async def coordination(self, lease_ms: int) -> Coordination:
        raise NotImplementedError

    async def finish(self, coordination: Coordination, name: str) -> None:
        await coordination.try_acquire(name)
        outcome = FlightOutcome(
            now_ms(self.clock), coordination.holder_id, OUTCOME_OK, "ok", "", b"{}"
        )
        await coordination.finish(name, outcome)

    async def test_a_long_lease_keeps_outcomes_as_long_as_its_waiters_may_read_them(
        self,
    ) -> None:
        """With a 60 s lease a waiter may read an outcome up to 2 x 60 s (+ 2 s) after
        it was written: it is kept past OUTCOME_KEEP_MS, and goes once that passed."""
        test: Any = self
        keep_ms = outcome_keep_ms(LONG_LEASE_MS)
        test.assertGreater(keep_ms, 2 * LONG_LEASE_MS + 2000)
        a = await self.coordination(LONG_LEASE_MS)
        await self.finish(a, "old.example")
        self.clock.advance(keep_ms / 1000 - 1)
        await self.finish(a, "recent.example")
        test.assertIsNotNone(await a.read_outcome("old.example"))  # past OUTCOME_KEEP_MS
        self.clock.advance(2)
        await self.finish(a, "new.example")
        test.assertIsNone(await a.read_outcome("old.example"))
        test.assertIsNotNone(await a.read_outcome("recent.example"))

    async def test_the_default_lease_keeps_outcomes_a_minute(self) -> None:
        test: Any = self
        test.assertEqual(outcome_keep_ms(10_000), OUTCOME_KEEP_MS)
        test.assertEqual(OUTCOME_KEEP_MS, 60_000)
        a = await self.coordination(10_000)
        await self.finish(a, "old.example")
        self.clock.advance(OUTCOME_KEEP_MS / 1000 + 1)
        await self.finish(a, "new.example")
        test.assertIsNone(await a.read_outcome("old.example"))


class SqliteKeepTests(KeepMixin, TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.path = os.path.abspath(self.mktemp()) + ".db"

    async def coordination(self, lease_ms: int) -> Coordination:
        store = SqliteKeyStore(self.path, global_reactor())
        self.addCleanup(store.close)
        await store.migrate()
        coordination = SqliteCoordination(
            store, self.clock, lease_ms=lease_ms, poll_interval_ms=100
        )
        self.addCleanup(coordination.close)
        return coordination


class PostgresKeepTests(KeepMixin, TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.dsn, _ = postgres_test_schema(self)

    async def coordination(self, lease_ms: int) -> Coordination:
        from keyring_module.storage.pg_coordination import PostgresCoordination
        from keyring_module.storage.postgres import PostgresKeyStore

        store = PostgresKeyStore(self.dsn, global_reactor(), pool_size=1)
        self.addCleanup(store.close)
        await store.migrate()
        coordination = PostgresCoordination(store, self.dsn, global_reactor(), lease_ms=lease_ms)
        self.addCleanup(coordination.close)
        return coordination
