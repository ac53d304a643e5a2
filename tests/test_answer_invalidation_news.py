"""News of another process's key write drops only the cached whole answers naming that
server: through PostgreSQL's ``NOTIFY`` and SQLite's change feed, as the processes
sharing one database hear it (two stores on one database stand for two processes, as in
``tests/test_cache_coherence.py``); news that may have been missed drops them all."""

import os
from typing import Any, Optional

from twisted.internet import defer, task
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from keyring_module.clock import global_reactor
from keyring_module.metrics import AnswerResult
from keyring_module.notary.caches import AnswerCache, CachedAnswer
from keyring_module.notary.query import NormalisedQuery, ServerQuery, normalise_queries
from keyring_module.storage.cache import CachedKeyStore
from keyring_module.storage.sqlite import KEPT_CHANGES, SqliteKeyStore
from keyring_module.storage.sqlite_coordination import SqliteCoordination
from tests.storage_writer import make_response, postgres_test_schema

RESULTS = ((AnswerResult.FRESH, 1),)


class AnswersOfOneProcess:
    """The whole-answer cache of the process hearing the news, on its in-memory store
    (the notary registers its answer cache as that store's write listener)."""

    def __init__(self, store: CachedKeyStore, names: tuple[str, str]) -> None:
        self.store = store
        self.cache = AnswerCache(1 << 20)
        store.add_write_listener(self.cache.changed)
        a, b = names
        self.questions = {
            "a": self._asked(a),
            "b": self._asked(b),
            "ab": self._asked(a, b),
        }
        self.kept: dict[str, CachedAnswer] = {}

    @staticmethod
    def _asked(*names: str) -> NormalisedQuery:
        return normalise_queries([ServerQuery(name) for name in names])

    def put_all(self) -> None:
        """Keep an answer to each question, built on the store's generation now."""
        generation = self.store.write_generation
        for name, question in self.questions.items():
            entry = CachedAnswer(b"{}", 10**15, generation, RESULTS, (0,) * len(question.key))
            self.kept[name] = entry
            self.cache.put(question.key, entry, 0, generation)

    def served(self) -> set[str]:
        """The questions answered from the cache now (each by the very answer kept)."""
        found = set()
        for name, question in self.questions.items():
            hit = self.cache.get(question, 1, self.store.write_generation)
            if hit is not None:
                assert hit is self.kept[name]
                found.add(name)
        return found


class SqliteNewsTests(TestCase):
    """Two processes on one SQLite file; the hearing one polls the change feed."""

    def setUp(self) -> "defer.Deferred[None]":  # type: ignore[override]  # trial waits
        return defer.ensureDeferred(self.set_up())

    async def set_up(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        path = os.path.join(os.path.abspath(self.mktemp()) + ".db")
        self.writer = await self.open(path)
        backend = await self.open(path)
        self.coordination = SqliteCoordination(
            backend, self.clock, lease_ms=5000, poll_interval_ms=100
        )
        self.addCleanup(self.coordination.close)
        store = CachedKeyStore(
            backend, self.clock, 100, ttl_ms=3_600_000, coordination=self.coordination
        )
        self.hearing = AnswersOfOneProcess(store, ("a.example", "b.example"))
        await self.coordination.poll()  # where the feed is
        self.hearing.put_all()

    async def open(self, path: str) -> SqliteKeyStore:
        store = SqliteKeyStore(path, global_reactor())
        await store.migrate()
        self.addCleanup(store.close)
        return store

    async def test_a_write_elsewhere_drops_only_the_answers_naming_it(self) -> None:
        """A store of a.example's keys by the other process drops, at the next poll, the
        answers naming a.example (alone and with b.example); the answer about b.example
        alone stays; then a ``keys forget`` of b.example elsewhere drops it."""
        response = make_response("a.example", 10**13, {"ed25519:a": b"a" * 32})
        await self.writer.store_server_keys(response, "origin", 1)
        self.assertEqual(self.hearing.served(), {"a", "b", "ab"}, "not polled yet")
        await self.coordination.poll()
        self.assertEqual(self.hearing.served(), {"b"})
        other = make_response("b.example", 10**13, {"ed25519:b": b"b" * 32})
        await self.writer.store_server_keys(other, "origin", 1)
        await self.coordination.poll()
        self.hearing.put_all()
        await self.writer.forget_server_keys("b.example")
        await self.coordination.poll()
        self.assertEqual(self.hearing.served(), {"a"})

    async def test_a_gap_in_the_feed_drops_every_answer(self) -> None:
        """When the feed moved on further than one poll reads (which servers changed
        is unknown), every answer is dropped."""

        def flood(txn: Any) -> None:
            for _ in range(KEPT_CHANGES + 5):
                txn.execute("INSERT INTO key_changes (server_name) VALUES ('x.example')")
            txn.execute(
                "DELETE FROM key_changes WHERE seq <= (SELECT MAX(seq) FROM key_changes) - %d"
                % KEPT_CHANGES
            )

        await self.writer.run("flood", flood)
        await self.coordination.poll()
        self.assertEqual(self.hearing.served(), set())


class PostgresNewsTests(TestCase):
    """Two processes on one PostgreSQL schema; the hearing one LISTENs."""

    timeout = 30

    def setUp(self) -> "defer.Deferred[None]":  # type: ignore[override]  # trial waits
        return defer.ensureDeferred(self.set_up())

    async def set_up(self) -> None:
        from keyring_module.storage.pg_coordination import PostgresCoordination
        from keyring_module.storage.postgres import PostgresKeyStore

        self.dsn, schema = postgres_test_schema(self)
        # NOTIFY channels belong to the database, which tests running in parallel
        # share: names of this test's own keep theirs apart.
        suffix = "%s.example.org" % schema.replace("_", "-")
        self.name_a, self.name_b = "a-" + suffix, "b-" + suffix
        self.reactor = global_reactor()
        stores: list[Any] = []
        coordinations: list[Any] = []
        for _ in range(2):
            store = PostgresKeyStore(self.dsn, self.reactor)
            await store.migrate()
            self.addCleanup(store.close)
            coordination = PostgresCoordination(store, self.dsn, self.reactor, lease_ms=10_000)
            self.addCleanup(coordination.close)
            stores.append(store)
            coordinations.append(coordination)
        self.writer = stores[0]
        self.coordination = coordinations[1]
        cached = CachedKeyStore(
            stores[1], self.reactor, 100, ttl_ms=3_600_000, coordination=self.coordination
        )
        for coordination in coordinations:
            await coordination.start()
        self.hearing = AnswersOfOneProcess(cached, (self.name_a, self.name_b))
        self.hearing.put_all()

    async def until(self, served: set[str], seconds: float = 2.0) -> None:
        """Wait (at most ``seconds``) until the hearing process serves ``served``."""
        for _ in range(int(seconds / 0.01)):
            if self.hearing.served() == served:
                return
            await task.deferLater(self.reactor, 0.01, lambda: None)  # type: ignore[arg-type]
        self.assertEqual(self.hearing.served(), served)

    async def write(self, name: str, key: bytes) -> None:
        response = make_response(name, 10**13, {"ed25519:k": key})
        await self.writer.store_server_keys(response, "origin", 1)

    async def test_a_write_elsewhere_drops_only_the_answers_naming_it(self) -> None:
        """A store of a's keys by the other process drops, once its NOTIFY arrives, the
        answers naming a; the answer about b alone stays (the very object kept); then
        a ``keys forget`` of b elsewhere drops it."""
        await self.write(self.name_a, b"a" * 32)
        await self.until({"b"})
        await self.write(self.name_b, b"b" * 32)
        await self.until(set())
        self.hearing.put_all()
        await self.writer.forget_server_keys(self.name_b)
        await self.until({"a"})

    async def test_a_lost_news_connection_drops_every_answer(self) -> None:
        """When the LISTEN session ends (news may have been missed), every answer goes."""
        from tests.storage_writer import postgres_execute

        listener: Optional[Any] = self.coordination._listener
        assert listener is not None
        pid = listener._conn.get_backend_pid()
        postgres_execute(self.dsn, "SELECT pg_terminate_backend(?)", (pid,))
        await self.until(set())
        for _ in range(300):  # let it listen again before the cleanups close it
            if self.coordination._listener not in (None, listener):
                break
            await task.deferLater(self.reactor, 0.01, lambda: None)  # type: ignore[arg-type]

    async def test_a_notify_without_a_server_name_drops_every_answer(self) -> None:
        """A keys ``NOTIFY`` with no payload (not one of ours: which server is unknown)
        drops every answer; one naming a server drops the answers naming it."""
        scope = await self.coordination._store.schema_scope()
        self.coordination._notified(scope, scope.keys_channel, self.name_a)
        self.assertEqual(self.hearing.served(), {"b"})
        self.coordination._notified(scope, scope.keys_channel, "")
        self.assertEqual(self.hearing.served(), set())
