"""Tests for the store-merge rule: the pure function, and the SQL stores against it.

The property tests drive random sequences of ``store_server_keys`` calls (overlapping key
ids, conflicting bytes, old keys, ``valid_until_ts``/``fetched_ts`` ties and reorderings,
``replace`` sets, re-stores of one response) through ``InMemoryKeyStore`` (which stores
with :func:`~keyring_module.storage.merge.merge_server_keys`) and through a SQL store, and
compare what the two hold. PostgreSQL runs when ``KEYRING_TEST_POSTGRES_DSN`` is set (and
must, under ``CI=true``).

Hypothesis runs in a worker thread; each example runs its store calls on the reactor
(which trial's ``TestCase`` keeps running) with ``blockingCallFromThread``, because the SQL
stores answer through the reactor from their connection pool's threads.
"""

import itertools
from typing import TYPE_CHECKING, Any, Callable, Coroutine, Sequence, TypeVar

import attr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import ensureDeferred
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from keyring_module.clock import global_reactor
from keyring_module.model import KeyConflict, ServerKeysResponse, StoredKey
from keyring_module.storage import KeyStore
from keyring_module.storage.memory import InMemoryKeyStore
from keyring_module.storage.merge import merge_server_keys
from keyring_module.storage.sql import SqlKeyStore
from keyring_module.storage.sqlite import SqliteKeyStore
from tests.storage_writer import make_response, postgres_test_schema

T = TypeVar("T")

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

SERVER = "a.example"
A, B, C = b"\x0a" * 32, b"\x0b" * 32, b"\x0c" * 32
KID, OLD = "ed25519:k", "ed25519:old"
NOTARY = "notary:n.example"

#: Small pools, so that random calls often overlap, conflict and tie.
KEY_IDS = ("ed25519:a", "ed25519:b", "ed25519:c")
KEY_BYTES = (A, B, C)
SOURCES = ("origin", "notary:n1.example", "notary:n2.example")
VALID_UNTIL_TS = (1000, 2000, 3000)
FETCHED_TS = (10, 20, 30)
EXPIRED_TS = (500, 1500)
#: Examples per property test; each SQL example costs a few transactions.
MAX_EXAMPLES = 40


def stored(key_bytes: bytes, valid_until_ts: int, fetched_ts: int, source: str) -> StoredKey:
    """A stored row for KID of SERVER."""
    return StoredKey(SERVER, KID, key_bytes, valid_until_ts, None, fetched_ts, source, "r0")


class MergeServerKeysTests(SynchronousTestCase):
    """The pure rule, one case per branch."""

    def test_rule_table(self) -> None:
        """New ids are inserted, differing bytes conflict unless replaced, same bytes follow
        the newest copy (a tie on ``valid_until_ts`` goes to the later or equal fetch)."""
        # (name, stored row, response key, valid_until_ts, fetched_ts, replace,
        #  (bytes, valid_until_ts, source) of the row after, written, conflict (kept, rejected))
        table: list[Any] = [
            ("new key id", None, A, 1000, 10, (), (A, 1000, "origin"), True, None),
            ("other bytes: first seen kept", stored(A, 1000, 10, NOTARY), B, 2000, 20, (),
             (A, 1000, NOTARY), False, ((A, NOTARY), (B, "origin"))),
            ("other bytes replaced", stored(A, 1000, 10, NOTARY), B, 500, 20, (KID,),
             (B, 500, "origin"), True, ((B, "origin"), (A, NOTARY))),
            ("replace of same bytes is no conflict", stored(A, 1000, 10, NOTARY), A, 2000, 20,
             (KID,), (A, 2000, "origin"), True, None),
            ("same bytes, newer", stored(A, 1000, 10, NOTARY), A, 2000, 5, (),
             (A, 2000, "origin"), True, None),
            ("same bytes, older", stored(A, 2000, 10, NOTARY), A, 1000, 20, (),
             (A, 2000, NOTARY), False, None),
            ("same bytes, tie, same fetch", stored(A, 1000, 10, NOTARY), A, 1000, 10, (),
             (A, 1000, "origin"), True, None),
            ("same bytes, tie, earlier fetch", stored(A, 1000, 10, NOTARY), A, 1000, 5, (),
             (A, 1000, NOTARY), False, None),
        ]  # fmt: skip
        for (
            name,
            row,
            key_bytes,
            valid_until_ts,
            fetched_ts,
            replace,
            after,
            written,
            conflict,
        ) in table:
            before = {} if row is None else {KID: row}
            response = make_response(SERVER, valid_until_ts, {KID: key_bytes})
            merged = merge_server_keys(before, response, "origin", fetched_ts, replace)
            key = merged.keys[KID]
            self.assertEqual((key.verify_key_bytes, key.valid_until_ts, key.source), after, name)
            self.assertEqual(merged.written, (KID,) if written else (), name)
            if written:
                self.assertEqual(
                    (key.fetched_ts, key.response_id), (fetched_ts, response.response_id)
                )
            found = [
                ((c.kept_key_bytes, c.kept_source), (c.rejected_key_bytes, c.rejected_source))
                for c in merged.conflicts
            ]
            self.assertEqual(found, [] if conflict is None else [conflict], name)
            self.assertTrue(all(c.seen_ts == fetched_ts for c in merged.conflicts), name)
            self.assertEqual(before, {} if row is None else {KID: row}, "input unchanged")

    def test_unlisted_and_old_keys(self) -> None:
        """Keys the response does not list stay as they were; a current key wins over an
        old key with the same id, and old keys keep their ``expired_ts``."""
        other = StoredKey(SERVER, "ed25519:other", C, 9000, None, 1, NOTARY, "r0")
        response = make_response(SERVER, 1000, {KID: A}, {KID: (B, 400), OLD: (B, 500)})
        merged = merge_server_keys({"ed25519:other": other}, response, "origin", 10)
        self.assertEqual(merged.keys["ed25519:other"], other)
        self.assertEqual(
            (merged.keys[KID].verify_key_bytes, merged.keys[KID].expired_ts), (A, None)
        )
        self.assertEqual((merged.keys[OLD].verify_key_bytes, merged.keys[OLD].expired_ts), (B, 500))
        self.assertEqual(merged.written, (KID, OLD))
        self.assertEqual(merged.conflicts, ())


ResponseSpec = tuple[dict[str, bytes], dict[str, tuple[bytes, int]], int, int]
StoreCall = tuple[int, str, int, frozenset[str]]


@st.composite
def response_specs(draw: Callable[[Any], Any]) -> ResponseSpec:
    """A response without its server name: verify keys, old keys, valid_until_ts, variant.

    The variant changes the JSON bytes only, so that two different responses can hold
    the same keys with the same ``valid_until_ts``.
    """
    verify_keys = draw(
        st.dictionaries(st.sampled_from(KEY_IDS), st.sampled_from(KEY_BYTES), max_size=3)
    )
    old_keys = draw(
        st.dictionaries(
            st.sampled_from(KEY_IDS),
            st.tuples(st.sampled_from(KEY_BYTES), st.sampled_from(EXPIRED_TS)),
            min_size=0 if verify_keys else 1,
            max_size=2,
        )
    )
    return verify_keys, old_keys, draw(st.sampled_from(VALID_UNTIL_TS)), draw(st.integers(0, 1))


@st.composite
def store_call_sequences(draw: Callable[[Any], Any]) -> tuple[list[ResponseSpec], list[StoreCall]]:
    """A few responses, and calls storing them (each possibly several times)."""
    specs = draw(st.lists(response_specs(), min_size=1, max_size=4))
    calls = draw(
        st.lists(
            st.tuples(
                st.integers(0, len(specs) - 1),
                st.sampled_from(SOURCES),
                st.sampled_from(FETCHED_TS),
                st.one_of(st.just(frozenset()), st.frozensets(st.sampled_from(KEY_IDS))),
            ),
            min_size=1,
            max_size=6,
        )
    )
    return specs, calls


def build_response(server_name: str, spec: ResponseSpec) -> ServerKeysResponse:
    """The response a spec describes, for the given server."""
    verify_keys, old_keys, valid_until_ts, variant = spec
    return make_response(server_name, valid_until_ts, verify_keys, old_keys, {"variant": variant})


def sorted_conflicts(conflicts: Sequence[KeyConflict]) -> list[tuple[Any, ...]]:
    """Conflicts in a total order (the stores order them only by time, key id and source)."""
    return sorted(attr.astuple(c) for c in conflicts)


def on_reactor(work: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
    """Run a coroutine function on the reactor thread and wait for it (from another thread)."""
    reactor: Any = global_reactor()  # the real reactor provides IReactorFromThreads too

    def start() -> Any:  # a Deferred of T, which blockingCallFromThread waits for
        return ensureDeferred(work(*args))

    result: T = blockingCallFromThread(reactor, start)
    return result


class StoreMergePropertyMixin(_Base):
    """Random store calls give the same state in a SQL store as under the pure rule."""

    def open_sql_store(self) -> SqlKeyStore:
        """A new (not yet migrated) SQL store on this test's database."""
        raise NotImplementedError

    async def test_sql_store_follows_the_merge_rule(self) -> None:
        """Random sequences of stores leave the SQL store with the keys, served responses
        and conflicts of the in-memory store, and return the same conflicts on each call."""
        store = self.open_sql_store()
        self.addCleanup(store.close)
        await store.migrate()
        server_numbers = itertools.count()

        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(store_call_sequences())
        def same_state(example: tuple[list[ResponseSpec], list[StoreCall]]) -> None:
            # A new server name per example: a fresh state in the shared database.
            server_name = "s%d.example" % next(server_numbers)
            on_reactor(self.compare_stores, store, server_name, *example)

        await deferToThread(same_state)

    async def compare_stores(
        self, sql: KeyStore, server_name: str, specs: list[ResponseSpec], calls: list[StoreCall]
    ) -> None:
        """Make the calls on the SQL store and on a new in-memory store; compare them."""
        memory = InMemoryKeyStore()
        responses = [build_response(server_name, spec) for spec in specs]
        example = "in the example responses=%r calls=%r" % (specs, calls)
        for index, source, fetched_ts, replace in calls:
            args = (responses[index], source, fetched_ts)
            expected = await memory.store_server_keys(*args, replace=replace)
            found = await sql.store_server_keys(*args, replace=replace)
            self.assertEqual(found, expected, "returned conflicts " + example)
        self.assertEqual(
            await sql.get_server_keys(server_name),
            await memory.get_server_keys(server_name),
            "keys " + example,
        )
        self.assertEqual(
            await sql.get_server_responses(server_name),
            await memory.get_server_responses(server_name),
            "served responses " + example,
        )
        self.assertEqual(
            sorted_conflicts(await sql.get_conflicts(server_name)),
            sorted_conflicts(await memory.get_conflicts(server_name)),
            "recorded conflicts " + example,
        )


class SqliteStoreMergeTests(StoreMergePropertyMixin, TestCase):
    """The property on ``SqliteKeyStore`` (in memory)."""

    def open_sql_store(self) -> SqlKeyStore:
        return SqliteKeyStore(":memory:", global_reactor())


class PostgresStoreMergeTests(StoreMergePropertyMixin, TestCase):
    """The property on ``PostgresKeyStore``, in a schema of its own."""

    def setUp(self) -> None:
        self.dsn, _ = postgres_test_schema(self)

    def open_sql_store(self) -> SqlKeyStore:
        from keyring_module.storage.postgres import PostgresKeyStore

        return PostgresKeyStore(self.dsn, global_reactor(), pool_size=2)
