"""Cache coherence between processes on one database: the cache drops what another
process changed (:meth:`CachedKeyStore.forget`), and PostgreSQL's coordination tells it
through ``NOTIFY`` (with the advisory-lock flights on the same connections)."""

from typing import Any

from twisted.internet import defer, task
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from keyring_module.clock import global_reactor, now_ms
from keyring_module.storage.cache import CachedKeyStore
from keyring_module.storage.coordination import OUTCOME_OK, FlightOutcome
from keyring_module.storage.memory import InMemoryKeyStore
from tests.storage_writer import make_response, postgres_test_schema

KEY_A = {"ed25519:a": b"a" * 32}
KEY_B = {"ed25519:b": b"b" * 32}


class ForgetTests(SynchronousTestCase):
    """A cached server is read again once another writer changed it."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.backend = InMemoryKeyStore()
        self.cache = CachedKeyStore(self.backend, self.clock, 100, ttl_ms=3_600_000)

    def store_behind_the_cache(self, keys: dict[str, bytes]) -> None:
        """Another process writes: the backend changes, the cache is not told."""
        response = make_response("example.org", 10**13, keys)
        self.successResultOf(
            defer.ensureDeferred(self.backend.store_server_keys(response, "origin", 1))
        )

    def keys(self, name: str = "example.org") -> set[str]:
        return set(self.successResultOf(defer.ensureDeferred(self.cache.get_server_keys(name))))

    def test_forget_one_server(self) -> None:
        """Before ``forget`` the cached keys are served for the whole TTL; after it the
        backend's are, and the write generation moved (answers built before are not
        reused)."""
        self.store_behind_the_cache(KEY_A)
        self.assertEqual(self.keys(), {"ed25519:a"})
        self.store_behind_the_cache(KEY_B)
        self.assertEqual(self.keys(), {"ed25519:a"})
        generation = self.cache.write_generation
        self.cache.forget("example.org")
        self.assertEqual(self.keys(), {"ed25519:a", "ed25519:b"})
        self.assertEqual(self.cache.write_generation, generation + 1)

    def test_forget_everything(self) -> None:
        """``forget(None)`` drops every server, those known to have no keys too."""
        self.assertEqual(self.keys("unknown.example"), set())
        self.store_behind_the_cache(KEY_A)
        self.assertEqual(self.keys(), {"ed25519:a"})
        response = make_response("unknown.example", 10**13, KEY_B)
        self.successResultOf(
            defer.ensureDeferred(self.backend.store_server_keys(response, "origin", 1))
        )
        self.store_behind_the_cache(KEY_B)
        self.cache.forget(None)
        self.assertEqual(self.keys(), {"ed25519:a", "ed25519:b"})
        self.assertEqual(self.keys("unknown.example"), {"ed25519:b"})


class PostgresCoordinationTests(TestCase):
    """Two PostgreSQL coordinations on one schema stand for two processes."""

    timeout = 30

    def setUp(self) -> "defer.Deferred[None]":  # type: ignore[override]  # trial waits
        return defer.ensureDeferred(self.set_up())

    async def set_up(self) -> None:
        from keyring_module.storage.pg_coordination import PostgresCoordination
        from keyring_module.storage.postgres import PostgresKeyStore

        self.dsn, schema = postgres_test_schema(self)
        # Advisory locks and NOTIFY channels belong to the database, which tests running
        # in parallel share: a name of this test's own keeps theirs apart.
        self.name = "%s.example.org" % schema.replace("_", "-")
        self.reactor = global_reactor()
        self.stores: list[Any] = []
        self.coordinations: list[Any] = []
        for _ in range(2):
            store = PostgresKeyStore(self.dsn, self.reactor)
            await store.migrate()
            self.addCleanup(store.close)
            coordination = PostgresCoordination(store, self.dsn, self.reactor, lease_ms=10_000)
            await coordination.start()
            self.addCleanup(coordination.close)
            self.stores.append(store)
            self.coordinations.append(coordination)

    async def within(self, deferred: "defer.Deferred[Any]", seconds: float) -> None:
        timer = self.reactor.callLater(seconds, deferred.cancel)
        await deferred
        self.assertTrue(timer.active(), "not within %ss" % seconds)
        timer.cancel()

    async def test_the_lock_is_held_by_one_and_news_wakes_the_other(self) -> None:
        """The second process cannot take the first's lock; when the first writes its
        outcome, the second is woken by the NOTIFY, reads it, and may take the lock."""
        a, b = self.coordinations
        self.assertTrue((await a.try_acquire(self.name)).acquired)
        self.assertFalse((await b.try_acquire(self.name)).acquired)
        woken = b.watch(self.name)
        outcome = FlightOutcome(now_ms(self.reactor), a.holder_id, OUTCOME_OK, "ok", "", b"{}")
        await a.finish(self.name, outcome)
        await self.within(woken, 2.0)
        self.assertEqual(await b.read_outcome(self.name), outcome)
        self.assertTrue((await b.try_acquire(self.name)).acquired)

    def told_about(self, coordination: Any, name: str) -> "defer.Deferred[None]":
        """Fires when ``coordination`` is told that ``name``'s keys changed (news about
        other names, from tests sharing the database, is let pass)."""
        told: "defer.Deferred[None]" = defer.Deferred()

        def on_keys_changed(changed: object) -> None:
            if changed == name and not told.called:
                told.callback(None)

        coordination.on_keys_changed = on_keys_changed
        return told

    async def test_a_key_write_is_told_to_the_other_process(self) -> None:
        """A store of a server's keys in one process reaches the other's
        ``on_keys_changed`` through NOTIFY."""
        told = self.told_about(self.coordinations[1], self.name)
        response = make_response(self.name, 10**13, KEY_A)
        await self.stores[0].store_server_keys(response, "origin", 1)
        await self.within(told, 2.0)

    async def test_a_forget_is_told_to_the_other_process(self) -> None:
        """``keys forget`` in one process reaches the other's ``on_keys_changed``."""
        stored = self.told_about(self.coordinations[1], self.name)
        response = make_response(self.name, 10**13, KEY_A)
        await self.stores[0].store_server_keys(response, "origin", 1)
        await self.within(stored, 2.0)  # the store's own news has arrived
        told = self.told_about(self.coordinations[1], self.name)
        await self.stores[0].forget_server_keys(self.name)
        await self.within(told, 2.0)

    async def test_closing_gives_the_locks_back(self) -> None:
        """A process stopping cleanly frees its flights at once."""
        a, b = self.coordinations
        await a.try_acquire(self.name)
        await a.close()
        self.assertTrue((await b.try_acquire(self.name)).acquired)
        await task.deferLater(self.reactor, 0, lambda: None)  # type: ignore[arg-type]


class PostgresNewsConnectionTests(TestCase):
    """The news connection is opened again when it is lost."""

    timeout = 30

    async def test_a_lost_news_connection_drops_everything_and_comes_back(self) -> None:
        """When the server ends the LISTEN session, every cached server is dropped at
        once (news may have been missed), and after the connection is opened again the
        next write is told as before."""
        from keyring_module.storage.pg_coordination import PostgresCoordination
        from keyring_module.storage.postgres import PostgresKeyStore
        from tests.storage_writer import postgres_execute

        dsn, schema = postgres_test_schema(self)
        self.name = "%s.example.org" % schema.replace("_", "-")
        reactor = global_reactor()
        store = PostgresKeyStore(dsn, reactor)
        await store.migrate()
        self.addCleanup(store.close)
        coordination = PostgresCoordination(store, dsn, reactor, lease_ms=10_000)
        await coordination.start()
        self.addCleanup(coordination.close)
        told: list[object] = []
        coordination.on_keys_changed = told.append
        listener = coordination._listener
        assert listener is not None
        pid = listener._conn.get_backend_pid()
        postgres_execute(dsn, "SELECT pg_terminate_backend(?)", (pid,))
        for _ in range(300):
            if None in told and coordination._listener is not None:
                break
            await task.deferLater(reactor, 0.01, lambda: None)  # type: ignore[arg-type]
        self.assertIn(None, told)  # everything dropped
        self.assertIsNot(coordination._listener, listener)
        response = make_response(self.name, 10**13, KEY_A)
        await store.store_server_keys(response, "origin", 1)
        for _ in range(200):
            if self.name in told:
                break
            await task.deferLater(reactor, 0.01, lambda: None)  # type: ignore[arg-type]
        self.assertIn(self.name, told)
