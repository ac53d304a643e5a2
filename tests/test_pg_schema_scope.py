"""Instances on two schemas of one PostgreSQL database share nothing through it: the
advisory lock keys and ``NOTIFY`` channels are the schema's own
(:mod:`keyring_module.storage.pg_scope`), while instances on one schema still share
flights, limits and news."""

from typing import Any, Optional

from twisted.internet import defer, task, threads
from twisted.trial.unittest import SynchronousTestCase, TestCase

from keyring_module.clock import global_reactor, now_ms
from keyring_module.storage.coordination import OUTCOME_OK, FlightOutcome, LimitState
from keyring_module.storage.errors import StorageError
from keyring_module.storage.pg_scope import (
    FLIGHT_LOCK_CLASS,
    FLIGHTS_CHANNEL,
    KEYS_CHANNEL,
    LIMITS_LOCK_CLASS,
    SERVER_LOCK_CLASS,
    SchemaScope,
)
from tests.storage_writer import make_response, postgres_test_schema

KEY_A = {"ed25519:a": b"a" * 32}


class SchemaScopeTests(SynchronousTestCase):
    """The lock classes and channels derived from a schema's name."""

    def test_two_schemas_share_no_lock_class_or_channel(self) -> None:
        a, b = SchemaScope.of("staging"), SchemaScope.of("production")
        classes_a = {a.server_lock_class, a.flight_lock_class, a.limits_lock_class}
        classes_b = {b.server_lock_class, b.flight_lock_class, b.limits_lock_class}
        self.assertEqual(len(classes_a), 3)  # the kinds of lock differ too
        self.assertEqual(classes_a & classes_b, set())
        self.assertEqual(set(a.channels) & set(b.channels), set())

    def test_the_scope_is_the_same_for_every_instance(self) -> None:
        """Instances started apart (other processes, other versions) must agree: the
        derivation is pinned."""
        scope = SchemaScope.of("staging")
        self.assertEqual(scope, SchemaScope.of("staging"))
        self.assertEqual(scope.flights_channel, "keyring_module_flights_e919a7536439")
        self.assertEqual(scope.keys_channel, "keyring_module_keys_e919a7536439")
        self.assertEqual(scope.flight_lock_class, 2_009_637_489)
        self.assertIn("pg_try_advisory_lock(2009637489, hashtext(?))", scope.try_flight_lock)
        self.assertEqual(
            scope.notify_keys, "SELECT pg_notify('keyring_module_keys_e919a7536439', ?)"
        )

    def test_the_public_schema_keeps_the_earlier_keys_and_channels(self) -> None:
        """Instances of earlier versions on the default schema still coordinate with
        upgraded ones during a rolling upgrade."""
        scope = SchemaScope.of("public")
        self.assertEqual(
            (scope.server_lock_class, scope.flight_lock_class, scope.limits_lock_class),
            (SERVER_LOCK_CLASS, FLIGHT_LOCK_CLASS, LIMITS_LOCK_CLASS),
        )
        self.assertEqual(scope.channels, (FLIGHTS_CHANNEL, KEYS_CHANNEL))
        self.assertEqual(
            scope.listen_statements(),
            ['LISTEN "keyring_module_flights"', 'LISTEN "keyring_module_keys"'],
        )

    def test_any_schema_name_makes_plain_short_channels(self) -> None:
        """Channel names are identifiers (at most 63 bytes): a long name, quotes,
        capitals or other scripts in the schema's name change nothing about that, and
        schemas differing only in case are apart."""
        names = ["x" * 63, 'We"ird; DROP', "Staging", "staging", "schéma_ключ", ""]
        scopes = [SchemaScope.of(name) for name in names]
        for scope in scopes:
            for channel in scope.channels:
                self.assertLessEqual(len(channel.encode()), 63)
                self.assertRegex(channel, r"^[a-z0-9_]+$")
        self.assertEqual(len({scope.flights_channel for scope in scopes}), len(names))
        self.assertEqual(len({scope.flight_lock_class for scope in scopes}), len(names))


def _take_lock(dsn: str, statement: str, arg: str) -> Any:
    """A connection holding a transaction lock (``?``: ``arg``) until it commits."""
    import psycopg2

    conn = psycopg2.connect(dsn)
    with conn.cursor() as cursor:
        cursor.execute(statement.replace("?", "%s"), (arg,))
    return conn


class PostgresSchemaScopeTests(TestCase):
    """Two instances on schema A and one on schema B of the test database."""

    timeout = 30

    def setUp(self) -> "defer.Deferred[None]":  # type: ignore[override]  # trial waits
        return defer.ensureDeferred(self.set_up())

    async def set_up(self) -> None:
        from keyring_module.storage.pg_coordination import PostgresCoordination
        from keyring_module.storage.postgres import PostgresKeyStore

        self.reactor = global_reactor()
        self.dsn_a, schema_a = postgres_test_schema(self)
        self.dsn_b, _ = postgres_test_schema(self)
        # The same name on both schemas (that is the point); this test's own, so that
        # tests running in parallel on the public schema's keys are not involved.
        self.name = "%s.example.org" % schema_a.replace("_", "-")
        self.stores: list[Any] = []
        coordinations: list[Any] = []
        for dsn in (self.dsn_a, self.dsn_a, self.dsn_b):
            store = PostgresKeyStore(dsn, self.reactor, pool_size=2)
            await store.migrate()
            self.addCleanup(store.close)
            coordination = PostgresCoordination(store, dsn, self.reactor, lease_ms=10_000)
            await coordination.start()
            self.addCleanup(coordination.close)
            self.stores.append(store)
            coordinations.append(coordination)
        self.a1, self.a2, self.b = coordinations

    async def within(self, deferred: "defer.Deferred[Any]", seconds: float) -> Any:
        timer = self.reactor.callLater(seconds, deferred.cancel)
        result = await deferred
        self.assertTrue(timer.active(), "not within %ss" % seconds)
        timer.cancel()
        return result

    async def still_waiting(self, deferred: "defer.Deferred[Any]") -> None:
        await task.deferLater(self.reactor, 0.3, lambda: None)  # type: ignore[arg-type]
        self.assertFalse(deferred.called, "did not wait for the lock")

    async def test_the_scopes_are_the_schemas(self) -> None:
        a1, a2, b = [await store.schema_scope() for store in self.stores]
        self.assertEqual(a1, a2)
        self.assertNotEqual(a1.flight_lock_class, b.flight_lock_class)
        self.assertNotEqual(a1.channels, b.channels)

    async def test_flights_on_two_schemas_do_not_block_each_other(self) -> None:
        self.assertTrue((await self.a1.try_acquire(self.name)).acquired)
        self.assertTrue((await self.b.try_acquire(self.name)).acquired)
        self.assertFalse((await self.a2.try_acquire(self.name)).acquired)
        await self.a1.finish(self.name, None)
        self.assertTrue((await self.a2.try_acquire(self.name)).acquired)

    async def test_flight_news_is_heard_on_its_own_schema_only(self) -> None:
        """A flight ending on A wakes A's other instance, not B's. B then hears news of
        its own schema: notifications reach a listener in commit order, so had B
        listened on A's channel, A's news would have come first."""
        heard_on_a = self.a2.watch(self.name)
        heard_on_b = self.b.watch(self.name)
        await self.a1.try_acquire(self.name)
        outcome = FlightOutcome(
            now_ms(self.reactor), self.a1.holder_id, OUTCOME_OK, "ok", "", b"{}"
        )
        await self.a1.finish(self.name, outcome)
        await self.within(heard_on_a, 2.0)
        marker = "marker." + self.name
        marker_heard = self.b.watch(marker)
        await self.b.try_acquire(marker)
        await self.b.finish(marker, outcome)
        await self.within(marker_heard, 2.0)
        self.assertFalse(heard_on_b.called)
        self.assertIsNone(await self.b.read_outcome(self.name))  # nor its rows, of course
        heard_on_b.cancel()

    async def test_key_news_is_heard_on_its_own_schema_only(self) -> None:
        told_a: list[Optional[str]] = []
        told_b: list[Optional[str]] = []
        self.a2.on_keys_changed = told_a.append
        self.b.on_keys_changed = told_b.append
        await self.stores[0].store_server_keys(make_response(self.name, 10**13, KEY_A), "origin", 1)
        marker = "marker." + self.name
        await self.stores[2].store_server_keys(make_response(marker, 10**13, KEY_A), "origin", 1)
        for _ in range(200):
            if self.name in told_a and marker in told_b:
                break
            await task.deferLater(self.reactor, 0.01, lambda: None)  # type: ignore[arg-type]
        self.assertIn(self.name, told_a)
        self.assertEqual(told_b, [marker])

    async def test_the_limits_lock_is_per_schema(self) -> None:
        """While a transaction on A holds the target's limits lock, B's instance updates
        its own limits at once and A's other instance waits for it."""
        scope = await self.stores[0].schema_scope()
        holder = _take_lock(self.dsn_a, scope.limits_lock, self.name)
        self.addCleanup(holder.close)

        def update(state: Optional[LimitState]) -> "tuple[Optional[LimitState], int]":
            return LimitState(1.0, 5), 7

        self.assertEqual(
            await self.within(defer.ensureDeferred(self.b.update_limits(self.name, update)), 5.0), 7
        )
        on_a = defer.ensureDeferred(self.a2.update_limits(self.name, update))
        await self.still_waiting(on_a)
        await threads.deferToThread(holder.commit)
        self.assertEqual(await self.within(on_a, 5.0), 7)

    async def test_the_write_lock_is_per_schema(self) -> None:
        """While a transaction on A holds a server's write lock, a store of its keys on
        B goes through at once and one on A waits for it."""
        scope = await self.stores[0].schema_scope()
        holder = _take_lock(self.dsn_a, scope.server_lock, self.name)
        self.addCleanup(holder.close)
        response = make_response(self.name, 10**13, KEY_A)
        await self.within(
            defer.ensureDeferred(self.stores[2].store_server_keys(response, "origin", 1)), 5.0
        )
        on_a = defer.ensureDeferred(self.stores[1].store_server_keys(response, "origin", 1))
        await self.still_waiting(on_a)
        await threads.deferToThread(holder.commit)
        await self.within(on_a, 5.0)
        self.assertEqual(set(await self.stores[0].get_server_keys(self.name)), set(KEY_A))


class NoSchemaTests(TestCase):
    """A ``search_path`` naming no schema that exists is refused with a message."""

    async def test_no_schema_is_refused(self) -> None:
        from psycopg2.extensions import make_dsn

        from keyring_module.storage.postgres import PostgresKeyStore

        dsn, schema = postgres_test_schema(self)
        missing = make_dsn(dsn, options="-c search_path=%s_missing" % schema)
        store = PostgresKeyStore(missing, global_reactor(), pool_size=1)
        self.addCleanup(store.close)
        error = await self.assertFailure(defer.ensureDeferred(store.migrate()), StorageError)
        self.assertIn("search_path", str(error))
