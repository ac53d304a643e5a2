"""The SQL coordinations' shared rows (:class:`~keyring_module.storage.flight_rows.StoredFlightRows`)
use the store's dialect as it is when they run, and each backend's hooks: PostgreSQL's
flight ``NOTIFY`` and limits lock come from the store's schema, SQLite has neither."""

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from keyring_module.clock import global_reactor
from keyring_module.storage.sqlite import SqliteKeyStore
from keyring_module.storage.sqlite_coordination import SqliteCoordination
from tests.storage_writer import postgres_test_schema


class PostgresHooksTests(TestCase):
    timeout = 30

    async def test_a_coordination_made_before_migrate_uses_the_schemas_dialect(self) -> None:
        """Made before ``migrate()`` (which scopes the store's dialect to its schema),
        the coordination still runs with the scoped dialect, and its hooks give the
        schema's ``NOTIFY`` and limits lock."""
        from keyring_module.storage.pg_coordination import PostgresCoordination
        from keyring_module.storage.postgres import PostgresKeyStore

        dsn, _ = postgres_test_schema(self)
        store = PostgresKeyStore(dsn, global_reactor(), pool_size=1)
        self.addCleanup(store.close)
        coordination = PostgresCoordination(store, dsn, global_reactor(), lease_ms=10_000)
        self.addCleanup(coordination.close)
        unscoped = store.dialect
        await store.migrate()
        scope = await store.schema_scope()
        self.assertIsNot(store.dialect, unscoped)  # migrate() scoped it
        self.assertIs(coordination._dialect, store.dialect)
        self.assertEqual(coordination._dialect.server_lock, scope.server_lock)
        self.assertEqual(await coordination._flight_notices(), (scope.notify_flight,))
        self.assertEqual(await coordination._limits_lock(), scope.limits_lock)


class SqliteHooksTests(TestCase):
    async def test_sqlite_needs_no_notices_nor_limits_lock(self) -> None:
        """The waiters poll (no notices); ``BEGIN IMMEDIATE`` locks the limits."""
        store = SqliteKeyStore(os.path.abspath(self.mktemp()) + ".db", global_reactor())
        self.addCleanup(store.close)
        await store.migrate()
        coordination = SqliteCoordination(store, Clock(), lease_ms=10_000, poll_interval_ms=100)
        self.addCleanup(coordination.close)
        self.assertIs(coordination._dialect, store.dialect)
        self.assertEqual(tuple(await coordination._flight_notices()), ())
        self.assertIsNone(await coordination._limits_lock())
