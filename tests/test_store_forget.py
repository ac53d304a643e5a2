"""Tests for forgetting stored keys (``list_server_names`` and ``forget_server_keys``),
run on every backend: in-memory, in-memory behind the cache, SQLite and PostgreSQL
(``KEYRING_TEST_POSTGRES_DSN``; skipped without it, as in ``tests/test_storage.py``).
"""

import os
import sqlite3
from typing import TYPE_CHECKING, Any, Sequence

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from keyring_module.blocking import run_inline
from keyring_module.clock import global_reactor
from keyring_module.config import parse_config
from keyring_module.model import KeyConflict, KeyRequest
from keyring_module.storage import KeyStore, StorageUnavailableError
from keyring_module.storage.cache import CachedKeyStore
from keyring_module.storage.forget import ForgottenKeys, listed_key_ids, plan_forget
from keyring_module.storage.memory import InMemoryKeyStore
from keyring_module.storage.sql import SqlKeyStore
from keyring_module.storage.sqlite import SqliteKeyStore
from keyring_module.wiring import Fetching
from tests.fake_reactors import FakeReactor
from tests.fakes import FakeFederationClient, FakeOriginResource
from tests.storage_writer import make_response, postgres_execute, postgres_test_schema
from tests.utils import new_signing_key

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

K1, K2, K3 = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32


class ForgetTestsMixin(_Base):
    """Forget semantics every backend shares."""

    async def make_store(self) -> KeyStore:
        raise NotImplementedError

    def stored_response_ids(self, server_name: str) -> set[str]:
        """The ids of every response stored for a server (served or not)."""
        raise NotImplementedError

    async def two_responses(self, store: KeyStore) -> tuple[str, str]:
        """Store a.example's keys a and b (r1), then b alone, newer (r2); and b.example."""
        r1 = make_response("a.example", 1000, {"ed25519:a": K1, "ed25519:b": K2})
        r2 = make_response("a.example", 2000, {"ed25519:b": K2})
        await store.store_server_keys(r1, "origin", 10)
        await store.store_server_keys(r2, "origin", 20)
        await store.store_server_keys(make_response("b.example", 1000, {"ed25519:k": K1}), "o", 5)
        self.assertEqual(self.stored_response_ids("a.example"), {r1.response_id, r2.response_id})
        return r1.response_id, r2.response_id

    async def test_forget_whole_server(self) -> None:
        """Forgetting a server removes all its keys and stored responses, leaves other
        servers and its conflict records alone, and says what it removed."""
        store = await self.make_store()
        r1, r2 = await self.two_responses(store)
        conflict = KeyConflict("a.example", "ed25519:a", K1, "origin", K3, "notary:n", 7)
        await store.record_conflicts([conflict])
        with self.assertLogs("keyring_module.storage.forget", "INFO") as logs:
            forgotten = await store.forget_server_keys("a.example")
        self.assertEqual(
            forgotten,
            ForgottenKeys("a.example", ("ed25519:a", "ed25519:b"), tuple(sorted([r1, r2]))),
        )
        self.assertIn("Forgot a.example", logs.output[0])
        self.assertIn(r1, logs.output[0])
        self.assertEqual(await store.get_server_keys("a.example"), {})
        self.assertEqual(await store.get_server_responses("a.example"), [])
        self.assertEqual(self.stored_response_ids("a.example"), set())
        self.assertEqual(await store.get_conflicts("a.example"), [conflict])
        self.assertEqual(list(await store.get_server_keys("b.example")), ["ed25519:k"])
        self.assertEqual(await store.list_server_names(), ["a.example", "b.example"])

    async def test_forget_one_key(self) -> None:
        """Forgetting one key id removes its row and every stored response listing it;
        the other key stays, with the newer response that does not list the key."""
        store = await self.make_store()
        r1, r2 = await self.two_responses(store)
        forgotten = await store.forget_server_keys("a.example", ["ed25519:a", "ed25519:zz"])
        self.assertEqual(forgotten, ForgottenKeys("a.example", ("ed25519:a",), (r1,)))
        self.assertEqual(list(await store.get_server_keys("a.example")), ["ed25519:b"])
        self.assertEqual(self.stored_response_ids("a.example"), {r2})
        served = await store.get_server_responses("a.example")
        self.assertEqual([r.response_id for r in served], [r2])
        self.assertNotIn(b"ed25519:a", served[0].json_bytes)

    async def test_forget_key_of_shared_response(self) -> None:
        """A response listing the forgotten key goes even when another key still points
        at it (that key keeps its row, with no served copy until the next fetch)."""
        store = await self.make_store()
        r = make_response("a.example", 1000, {"ed25519:a": K1, "ed25519:b": K2})
        await store.store_server_keys(r, "origin", 10)
        forgotten = await store.forget_server_keys("a.example", ["ed25519:b"])
        self.assertEqual(forgotten.response_ids, (r.response_id,))
        self.assertEqual(list(await store.get_server_keys("a.example")), ["ed25519:a"])
        self.assertEqual(await store.get_server_responses("a.example"), [])

    async def test_forget_nothing_held(self) -> None:
        """Forgetting an unknown server or key id removes nothing and returns an empty
        (false) result."""
        store = await self.make_store()
        r1, r2 = await self.two_responses(store)
        nothing = await store.forget_server_keys("a.example", ["ed25519:zz"])
        self.assertFalse(nothing)
        self.assertEqual(nothing, ForgottenKeys("a.example"))
        self.assertFalse(await store.forget_server_keys("nobody.example"))
        self.assertEqual(self.stored_response_ids("a.example"), {r1, r2})
        self.assertEqual(len(await store.get_server_keys("a.example")), 2)

    async def test_forgotten_key_is_learned_again(self) -> None:
        """After a forget the same key id with other bytes is stored without a conflict
        (the refetch replaces it), where before it was refused as a conflict."""
        store = await self.make_store()
        await store.store_server_keys(make_response("a.example", 1000, {"ed25519:a": K1}), "o", 1)
        changed = make_response("a.example", 2000, {"ed25519:a": K3})
        self.assertEqual(len(await store.store_server_keys(changed, "origin", 2)), 1)
        self.assertEqual(
            (await store.get_server_keys("a.example"))["ed25519:a"].verify_key_bytes, K1
        )
        await store.forget_server_keys("a.example", ["ed25519:a"])
        self.assertEqual(await store.store_server_keys(changed, "origin", 3), [])
        self.assertEqual(
            (await store.get_server_keys("a.example"))["ed25519:a"].verify_key_bytes, K3
        )

    async def test_list_server_names(self) -> None:
        """Servers with keys or conflict records are listed once each, sorted."""
        store = await self.make_store()
        self.assertEqual(await store.list_server_names(), [])
        await store.store_server_keys(make_response("z.example", 1000, {"ed25519:a": K1}), "o", 1)
        await store.store_server_keys(make_response("a.example", 1000, {"ed25519:a": K1}), "o", 1)
        await store.record_conflicts(
            [
                KeyConflict("m.example", "ed25519:a", K1, "o", K2, "n", 1),
                KeyConflict("a.example", "ed25519:a", K1, "o", K2, "n", 1),
            ]
        )
        self.assertEqual(await store.list_server_names(), ["a.example", "m.example", "z.example"])
        self.assertEqual(
            await store.list_server_names(conflicts_only=True), ["a.example", "m.example"]
        )


class InMemoryForgetTests(ForgetTestsMixin, TestCase):
    """Forgetting on ``InMemoryKeyStore``."""

    async def make_store(self) -> KeyStore:
        self.memory = InMemoryKeyStore()
        return self.memory

    def stored_response_ids(self, server_name: str) -> set[str]:
        return {rid for rid, row in self.memory.responses.items() if row[1] == server_name}


class CachedInMemoryForgetTests(InMemoryForgetTests):
    """Forgetting through ``CachedKeyStore`` (reads cached before the forget included)."""

    async def make_store(self) -> KeyStore:
        await super().make_store()
        self.cached = CachedKeyStore(self.memory, Clock(), max_entries=100, ttl_ms=10_000)
        return self.cached

    async def two_responses(self, store: KeyStore) -> tuple[str, str]:
        found = await super().two_responses(store)
        # Cache both reads, so a forget that left the entry would be seen.
        await store.get_server_keys("a.example")
        await store.get_server_responses("a.example")
        return found


class CachedForgetTests(SynchronousTestCase):
    """What the cache in front does on a forget."""

    def test_forgotten_keys_are_not_a_last_resort(self) -> None:
        """After a forget, a failing backend does not make the cache serve the
        forgotten keys as a stale answer: the error is raised instead."""
        memory = InMemoryKeyStore()
        cached = CachedKeyStore(memory, Clock(), max_entries=100, ttl_ms=10_000)

        async def run() -> None:
            await cached.store_server_keys(
                make_response("a.example", 1000, {"ed25519:a": K1}), "o", 1
            )
            self.assertEqual(list(await cached.get_server_keys("a.example")), ["ed25519:a"])
            await cached.forget_server_keys("a.example")

            async def down(*args: Any) -> Any:
                raise StorageUnavailableError("down")

            self.patch(memory, "get_server_keys", down)
            await cached.get_server_keys("a.example")

        self.failureResultOf(defer.ensureDeferred(run()), StorageUnavailableError)


class SqlForgetTestsMixin(ForgetTestsMixin):
    """The shared forget tests on an SQL backend."""

    def open_sql_store(self) -> SqlKeyStore:
        raise NotImplementedError

    def raw_execute(self, statement: str, args: Sequence[Any] = ()) -> list[Any]:
        raise NotImplementedError

    async def make_store(self) -> KeyStore:
        store = self.open_sql_store()
        self.addCleanup(store.close)
        await store.migrate()
        return store

    def stored_response_ids(self, server_name: str) -> set[str]:
        rows = self.raw_execute(
            "SELECT response_id FROM server_key_responses WHERE server_name = ?", (server_name,)
        )
        return {row[0] for row in rows}


class SqliteForgetTests(SqlForgetTestsMixin, TestCase):
    """Forgetting on ``SqliteKeyStore``."""

    def setUp(self) -> None:
        self.path = os.path.abspath(self.mktemp())

    def open_sql_store(self) -> SqlKeyStore:
        return SqliteKeyStore(self.path, global_reactor())

    def raw_execute(self, statement: str, args: Sequence[Any] = ()) -> list[Any]:
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            return conn.execute(statement, tuple(args)).fetchall()
        finally:
            conn.close()


class PostgresForgetTests(SqlForgetTestsMixin, TestCase):
    """Forgetting on ``PostgresKeyStore``."""

    def setUp(self) -> None:
        self.dsn, _ = postgres_test_schema(self)

    def open_sql_store(self) -> SqlKeyStore:
        from keyring_module.storage.postgres import PostgresKeyStore

        return PostgresKeyStore(self.dsn, global_reactor(), pool_size=2)

    def raw_execute(self, statement: str, args: Sequence[Any] = ()) -> list[Any]:
        return postgres_execute(self.dsn, statement, args)


class PlanForgetTests(SynchronousTestCase):
    """The pure rule."""

    def test_unreadable_response_goes_only_when_unreferenced(self) -> None:
        """A stored response whose JSON cannot be read is removed when no remaining key
        points at it, and kept otherwise."""
        keys = [
            ("s", "ed25519:a", b"", 0, None, 0, "o", "r1", "r1"),
            ("s", "ed25519:b", b"", 0, None, 0, "o", "r2", None),
        ]
        responses = [("r1", b"{bad"), ("r2", b"{bad"), ("r3", memoryview(b"{}"))]
        plan = plan_forget("s", keys, responses, ["ed25519:a"])
        self.assertEqual(plan.response_ids, ("r1", "r3"))

    def test_listed_key_ids_ignores_odd_shapes(self) -> None:
        """Non-object JSON, non-object key sections and non-bytes are read as listing
        nothing."""
        self.assertEqual(listed_key_ids(b"[1]"), frozenset())
        self.assertEqual(listed_key_ids(b'{"verify_keys": []}'), frozenset())
        self.assertEqual(listed_key_ids("text"), frozenset())
        self.assertEqual(
            listed_key_ids(memoryview(b'{"old_verify_keys": {"ed25519:o": 1}}')),
            frozenset({"ed25519:o"}),
        )


class ForgetThroughWiringTests(SynchronousTestCase):
    """A forget through the store a running server reads makes its keyring fetch again."""

    def test_forgotten_server_is_fetched_again(self) -> None:
        """An origin that re-created its key under the same key id: the stored
        (first-seen) key keeps winning until it is forgotten; after the forget the next
        lookup asks the origin and stores the new key."""
        reactor = FakeReactor()
        reactor.advance(1_700_000_000)
        first, recreated = new_signing_key("a_1"), new_signing_key("a_1")
        origin = FakeOriginResource(first, "origin.test", reactor)
        store = CachedKeyStore(InMemoryKeyStore(), reactor, max_entries=100, ttl_ms=60_000)
        config = parse_config({"signing_key_path": "unused"}, standalone=False)
        fetching = Fetching.build(
            reactor,
            config,
            store,
            client=FakeFederationClient({"origin.test": origin}),
            run_blocking=run_inline,
        )
        self.addCleanup(lambda: defer.ensureDeferred(fetching.close()))

        def lookup() -> bytes:
            keys = self.successResultOf(
                defer.ensureDeferred(fetching.chain.get_keys([KeyRequest("origin.test")]))
            )
            return bytes(keys["origin.test"]["ed25519:a_1"].verify_key_bytes)

        self.assertEqual(lookup(), first.verify_key.encode())
        origin.signing_keys = [recreated]
        self.assertEqual(lookup(), first.verify_key.encode())
        self.assertEqual(origin.hits, 1, "the stored key answered")
        self.successResultOf(defer.ensureDeferred(store.forget_server_keys("origin.test")))
        self.assertEqual(lookup(), recreated.verify_key.encode())
        self.assertEqual(origin.hits, 2)
