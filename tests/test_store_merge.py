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
import logging
import os
import sqlite3
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
from keyring_module.storage import sql as sql_module
from keyring_module.storage.bounds import (
    DEFAULT_STORE_LIMITS,
    StoredServer,
    StoreLimits,
    StoreOutcome,
    record_within_cap,
    store_response,
)
from keyring_module.storage.memory import InMemoryKeyStore
from keyring_module.storage.merge import merge_server_keys
from keyring_module.storage.sql import SqlKeyStore
from keyring_module.storage.sqlite import SqliteKeyStore
from tests.storage_writer import make_response, postgres_execute, postgres_test_schema

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
MAX_EXAMPLES = 80
#: Examples of the batch read property (each stores to up to four servers).
BATCH_EXAMPLES = 30


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

    def test_first_seen_copy(self) -> None:
        """A new key's first-seen copy is its response; a newer copy of the same bytes
        keeps it; replaced bytes are first seen in the replacing response."""
        r1 = make_response(SERVER, 1000, {KID: A})
        r2 = make_response(SERVER, 2000, {KID: A})
        r3 = make_response(SERVER, 3000, {KID: B})
        first = merge_server_keys({}, r1, NOTARY, 10)
        self.assertEqual(first.first_seen, {KID: r1.response_id})
        newer = merge_server_keys(first.keys, r2, "origin", 20, first_seen=first.first_seen)
        self.assertEqual(newer.keys[KID].response_id, r2.response_id)
        self.assertEqual(newer.first_seen, {KID: r1.response_id})
        replaced = merge_server_keys(
            newer.keys, r3, "origin", 30, (KID,), first_seen=newer.first_seen
        )
        self.assertEqual(replaced.first_seen, {KID: r3.response_id})
        legacy = merge_server_keys(first.keys, r2, "origin", 20)  # no first_seen known
        self.assertEqual(legacy.first_seen, {KID: r1.response_id})

    def test_new_key_room(self) -> None:
        """Without room, new key ids are refused in key id order while stored ids still
        follow their newest copy; replacing an unreadable row needs no room."""
        response = make_response(SERVER, 2000, {KID: A, "ed25519:n1": B, "ed25519:n2": C})
        merged = merge_server_keys(
            {KID: stored(A, 1000, 10, NOTARY)}, response, "origin", 20, new_key_room=1
        )
        self.assertEqual(merged.written, (KID, "ed25519:n1"))
        self.assertEqual(merged.refused, ("ed25519:n2",))
        self.assertEqual(sorted(merged.keys), [KID, "ed25519:n1"])
        corrupt = merge_server_keys(
            {}, response, "origin", 20, unreadable={"ed25519:n1"}, new_key_room=0
        )
        self.assertEqual(corrupt.written, ("ed25519:n1",))
        self.assertEqual(corrupt.refused, (KID, "ed25519:n2"))


def stored_server(outcome: StoreOutcome) -> StoredServer:
    """The server's state after a bounded store, as the next store reads it."""
    return StoredServer(outcome.merged.keys, outcome.merged.first_seen, {}, outcome.responses)


class StoreBoundsTests(SynchronousTestCase):
    """The per-server bounds on top of the rule (``store_response``)."""

    def test_new_key_id_every_fetch_is_bounded(self) -> None:
        """An origin using a new key id on every fetch ends at the bounds: its stored
        responses stay within ``max_responses`` (older copies give way to the newest),
        later ids are refused at ``max_keys``, and every stored key keeps its bytes."""
        limits = StoreLimits(max_keys=5, max_responses=4, max_conflicts=10)
        state = StoredServer()
        for i in range(50):
            response = make_response(SERVER, 1000 + i, {"ed25519:k%02d" % i: bytes([i]) * 32})
            outcome = store_response(state, response, "origin", i, limits=limits)
            self.assertLessEqual(len(outcome.copies), 4)
            self.assertLessEqual(len(outcome.merged.keys), 5)
            if i >= 5:
                self.assertEqual(outcome.merged.refused, ("ed25519:k%02d" % i,))
                self.assertNotIn(response.response_id, outcome.copies)
            else:
                self.assertIn(response.response_id, outcome.copies)
            state = stored_server(outcome)
        self.assertEqual(sorted(state.keys), ["ed25519:k%02d" % i for i in range(5)])
        self.assertEqual(state.keys["ed25519:k03"].verify_key_bytes, bytes([3]) * 32)
        self.assertIn(state.keys["ed25519:k04"].response_id, state.copies())

    def test_key_cap_alone(self) -> None:
        """With room for responses, new key ids stop at ``max_keys`` (in key id order)."""
        limits = StoreLimits(max_keys=3, max_responses=10, max_conflicts=10)
        keys = {"ed25519:%d" % i: bytes([i]) * 32 for i in range(5)}
        outcome = store_response(
            StoredServer(), make_response(SERVER, 1000, keys), "origin", 1, limits=limits
        )
        self.assertEqual(sorted(outcome.merged.keys), ["ed25519:0", "ed25519:1", "ed25519:2"])
        self.assertEqual(outcome.merged.refused, ("ed25519:3", "ed25519:4"))

    def test_newest_copies_win_over_first_seen_ones(self) -> None:
        """Rotations without old_verify_keys never stop: at ``max_responses`` first-seen
        copies go first, then the oldest newest copies; every key stays stored and the
        response just stored is always kept."""
        limits = StoreLimits(max_keys=100, max_responses=5, max_conflicts=10)
        state = StoredServer()
        for i in range(20):
            # Each key is listed in two fetches: first seen in one, newest in the next.
            key_id = "ed25519:k%02d" % (i // 2)
            response = make_response(SERVER, 1000 + i, {key_id: bytes([i // 2]) * 32})
            outcome = store_response(state, response, "origin", i, limits=limits)
            self.assertLessEqual(len(outcome.copies), 5)
            self.assertFalse(outcome.response_refused)
            self.assertIn(response.response_id, outcome.copies)
            if i == 5:  # the first time over the bound: only a first-seen copy goes
                [evicted] = outcome.evicted
                self.assertEqual(evicted, state.first_seen["ed25519:k00"])
            state = stored_server(outcome)
        self.assertEqual(sorted(state.keys), ["ed25519:k%02d" % i for i in range(10)])
        # The newest copies of the five latest keys are what is left.
        self.assertEqual(
            state.copies(), {state.keys["ed25519:k%02d" % i].response_id for i in range(5, 10)}
        )

    def test_whole_response_refused_when_it_cannot_fit(self) -> None:
        """A response that cannot fit even after what its source may drop (a notary's
        when the origin's copies fill the bound; any that alone is over the byte bound) is
        not stored: no row changes, no override, and its conflicts name the stored key."""
        limits = StoreLimits(max_keys=100, max_responses=2, max_conflicts=10)
        first = store_response(
            StoredServer(),
            make_response(SERVER, 1000, {KID: A, OLD: B}),
            "origin",
            1,
            limits=limits,
        )
        newer = store_response(
            stored_server(first), make_response(SERVER, 2000, {KID: A}), "origin", 2, limits=limits
        )
        self.assertEqual(len(newer.copies), 2)  # KID's newest copy, and OLD's
        subset = make_response(SERVER, 3000, {KID: C, "ed25519:new": A})
        outcome = store_response(stored_server(newer), subset, NOTARY, 3, limits=limits)
        self.assertTrue(outcome.response_refused)
        self.assertEqual(outcome.merged.written, ())
        self.assertEqual(outcome.merged.refused, ("ed25519:new",))
        self.assertEqual(outcome.merged.keys, newer.merged.keys)
        self.assertEqual(outcome.copies, newer.copies)
        [conflict] = outcome.merged.conflicts
        self.assertEqual(
            (conflict.kept_key_bytes, conflict.kept_source, conflict.rejected_key_bytes),
            (A, "origin", C),
        )
        # An override too big for the byte bound on its own: the stored key is kept.
        tight = StoreLimits(max_keys=100, max_responses=2, max_conflicts=10, max_response_bytes=500)
        provisional = store_response(
            StoredServer(), make_response(SERVER, 1000, {KID: A}), NOTARY, 1, limits=tight
        )
        padded = make_response(SERVER, 2000, {KID: C}, extra={"padding": "x" * 500})
        outcome = store_response(
            stored_server(provisional), padded, "origin", 2, replace=(KID,), limits=tight
        )
        self.assertTrue(outcome.response_refused)
        self.assertEqual(outcome.merged.keys, provisional.merged.keys)
        [conflict] = outcome.merged.conflicts
        self.assertEqual(
            (conflict.kept_key_bytes, conflict.kept_source, conflict.rejected_key_bytes),
            (A, NOTARY, C),
        )

    def test_past_a_lowered_bound_keys_are_kept(self) -> None:
        """A server already past a lowered bound keeps all its keys, while its stored
        responses are brought back within the bound, oldest first."""
        state = StoredServer()
        for response in (
            make_response(SERVER, 1000, {"ed25519:a": A, "ed25519:b": B}),
            make_response(SERVER, 2000, {"ed25519:a": A, "ed25519:b": B}),
            make_response(SERVER, 3000, {"ed25519:c": C, "ed25519:d": C}),
        ):
            state = stored_server(store_response(state, response, "origin", 1))
        self.assertEqual(len(state.copies()), 3)
        lowered = StoreLimits(max_keys=2, max_responses=2, max_conflicts=0)
        moved = make_response(SERVER, 4000, {"ed25519:a": A, "ed25519:b": B})
        outcome = store_response(state, moved, "origin", 2, limits=lowered)
        self.assertEqual(outcome.merged.written, ("ed25519:a", "ed25519:b"))
        self.assertEqual(len(outcome.copies), 2)  # the first-seen copy of a and b goes
        state = stored_server(outcome)
        split = make_response(SERVER, 5000, {"ed25519:c": C})
        outcome = store_response(state, split, "origin", 3, limits=lowered)
        self.assertFalse(outcome.response_refused)
        self.assertEqual(outcome.copies, {moved.response_id, split.response_id})
        self.assertEqual(
            sorted(outcome.merged.keys), ["ed25519:a", "ed25519:b", "ed25519:c", "ed25519:d"]
        )
        self.assertEqual(outcome.merged.keys["ed25519:d"].verify_key_bytes, C)

    def test_notary_fills_its_share_then_the_origins_new_key_is_stored(self) -> None:
        """A lying notary inventing a new self-signed key id on every answer fills only
        half of the key and response bounds: the origin's own new key id is then stored
        and served, and so are the origin's refreshes."""
        state = StoredServer()
        for i in range(DEFAULT_STORE_LIMITS.max_keys):
            response = make_response(SERVER, 10_000 + i, {"ed25519:fake%04d" % i: A})
            state = stored_server(store_response(state, response, NOTARY, i))
        self.assertEqual(len(state.keys), DEFAULT_STORE_LIMITS.notary_keys)
        self.assertEqual(len(state.copies()), DEFAULT_STORE_LIMITS.notary_responses)
        for refresh in range(3):
            real = make_response(SERVER, 99_000 + refresh, {"ed25519:real": B})
            outcome = store_response(state, real, "origin", 5000 + refresh)
            self.assertEqual(outcome.merged.written, ("ed25519:real",))
            self.assertIn(real.response_id, outcome.copies)
            state = stored_server(outcome)
        self.assertEqual(state.keys["ed25519:real"].verify_key_bytes, B)
        # The origin overriding a provisional key it does list is stored too.
        override = make_response(SERVER, 99_999, {"ed25519:real": B, "ed25519:fake0000": C})
        outcome = store_response(state, override, "origin", 6000, replace={"ed25519:fake0000"})
        self.assertEqual(outcome.merged.keys["ed25519:fake0000"].verify_key_bytes, C)
        self.assertIn(override.response_id, outcome.copies)

    def test_rotating_40_times_keeps_the_latest_key_served(self) -> None:
        """A server regenerating its key on every restart (listing its old keys or not),
        refreshed three times per restart, has its latest key stored and its newest copy
        kept after 40 restarts, and every earlier key still stored."""
        for list_old in (False, True):
            state, ts = StoredServer(), 0
            old: dict[str, tuple[bytes, int]] = {}
            for restart in range(40):
                key_id = "ed25519:r%03d" % restart
                for _ in range(3):
                    ts += 1
                    response = make_response(
                        SERVER, 1000 + ts, {key_id: bytes([restart]) * 32}, old if list_old else {}
                    )
                    outcome = store_response(state, response, "origin", ts)
                    self.assertEqual(outcome.merged.refused, ())
                    self.assertIn(response.response_id, outcome.copies)
                    self.assertLessEqual(len(outcome.copies), DEFAULT_STORE_LIMITS.max_responses)
                    state = stored_server(outcome)
                old[key_id] = (bytes([restart]) * 32, 1000 + ts)
            self.assertEqual(len(state.keys), 40)
            self.assertEqual(state.keys["ed25519:r039"].verify_key_bytes, bytes([39]) * 32)
            self.assertIn(state.keys["ed25519:r039"].response_id, state.copies())

    def test_byte_bound(self) -> None:
        """Stored responses stay within ``max_response_bytes`` (notaries' within half),
        the newest copy always kept: a notary's answers push out its older ones, the
        origin's push out the notary's and then its own older ones."""
        limits = StoreLimits(
            max_keys=100, max_responses=100, max_conflicts=0, max_response_bytes=5000
        )
        state = StoredServer()
        for i in range(20):
            response = make_response(
                SERVER, 1000 + i, {"ed25519:k%02d" % i: A}, extra={"padding": "x" * 1000}
            )
            self.assertGreater(len(response.json_bytes), 1000)
            source = NOTARY if i < 10 else "origin"
            outcome = store_response(state, response, source, i, limits=limits)
            self.assertIn(response.response_id, outcome.copies)
            sizes = outcome.responses.values()
            self.assertLessEqual(sum(c.size for c in sizes), 5000)
            self.assertLessEqual(sum(c.size for c in sizes if c.source == NOTARY), 2500)
            state = stored_server(outcome)
        self.assertEqual(len(state.keys), 20)
        self.assertEqual({c.source for c in state.responses.values()}, {"origin"})

    def test_record_within_cap(self) -> None:
        """Conflicts are recorded in order until the bound; repeats take no room."""
        recorded: list[str] = []

        def insert(name: str) -> bool:
            if name in recorded:
                return False
            recorded.append(name)
            return True

        made = record_within_cap(["a", "a", "b", "c", "d"], 1, 3, insert)
        self.assertEqual((made, recorded), (2, ["a", "b"]))
        self.assertEqual(record_within_cap(["x"], 3, 3, insert), 0)
        self.assertEqual(recorded, ["a", "b"])


ResponseSpec = tuple[dict[str, bytes], dict[str, tuple[bytes, int]], int, int]
#: ("store", response index, source, fetched_ts, replace) or
#: ("record", key id, kept bytes, rejected bytes, rejected source, seen_ts).
StoreCall = tuple[Any, ...]

#: The bounds the property runs under: the defaults, and tight ones that the small
#: pools of key ids and responses reach.
LIMIT_CHOICES = (
    DEFAULT_STORE_LIMITS,
    StoreLimits(max_keys=1, max_responses=2, max_conflicts=0),
    StoreLimits(max_keys=2, max_responses=3, max_conflicts=1),
    StoreLimits(max_keys=3, max_responses=2, max_conflicts=2),
    # A byte bound that two or three of these responses reach (a notary's share: one).
    StoreLimits(max_keys=3, max_responses=4, max_conflicts=1, max_response_bytes=800),
)


def key_bytes_for(key_id: str) -> st.SearchStrategy[bytes]:
    """Mostly the key id's usual bytes (so that copies agree), sometimes any (conflicts)."""
    usual = KEY_BYTES[KEY_IDS.index(key_id)]
    return st.one_of(st.just(usual), st.just(usual), st.sampled_from(KEY_BYTES))


@st.composite
def response_specs(draw: Callable[[Any], Any]) -> ResponseSpec:
    """A response without its server name: verify keys, old keys, valid_until_ts, variant.

    The variant changes the JSON bytes only, so that two different responses can hold
    the same keys with the same ``valid_until_ts``.
    """
    verify_ids = draw(st.lists(st.sampled_from(KEY_IDS), max_size=3, unique=True))
    verify_keys = {key_id: draw(key_bytes_for(key_id)) for key_id in verify_ids}
    old_ids = draw(
        st.lists(
            st.sampled_from(KEY_IDS), min_size=0 if verify_keys else 1, max_size=2, unique=True
        )
    )
    old_keys = {
        key_id: (draw(key_bytes_for(key_id)), draw(st.sampled_from(EXPIRED_TS)))
        for key_id in old_ids
    }
    return verify_keys, old_keys, draw(st.sampled_from(VALID_UNTIL_TS)), draw(st.integers(0, 1))


@st.composite
def store_call_sequences(
    draw: Callable[[Any], Any],
) -> tuple[int, list[ResponseSpec], list[StoreCall]]:
    """Bounds (an index into LIMIT_CHOICES), a few responses, and calls storing them
    (each possibly several times) or recording conflicts found elsewhere."""
    limits = draw(st.integers(0, len(LIMIT_CHOICES) - 1))
    specs = draw(st.lists(response_specs(), min_size=1, max_size=4))
    store = st.tuples(
        st.just("store"),
        st.integers(0, len(specs) - 1),
        st.sampled_from(SOURCES),
        st.sampled_from(FETCHED_TS),
        st.one_of(st.just(frozenset()), st.frozensets(st.sampled_from(KEY_IDS))),
    )
    record = st.tuples(
        st.just("record"),
        st.sampled_from(KEY_IDS),
        st.sampled_from(KEY_BYTES),
        st.sampled_from(KEY_BYTES),
        st.sampled_from(SOURCES),
        st.sampled_from(FETCHED_TS),
    )
    calls = draw(st.lists(st.one_of(store, store, record), min_size=1, max_size=8))
    return limits, specs, calls


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

    def open_sql_store(self, limits: StoreLimits) -> SqlKeyStore:
        """A new (not yet migrated) SQL store with these bounds on this test's database."""
        raise NotImplementedError

    def raw_select(self, statement: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        """Rows of a ``?``-placeholder query, read on a connection of the test's own."""
        raise NotImplementedError

    async def test_sql_store_follows_the_merge_rule(self) -> None:
        """Random sequences of stores leave the SQL store with the keys, first-seen copies,
        stored and served responses and conflicts of the in-memory store, within the
        bounds, and return the same conflicts on each call."""
        # The refusals at tight bounds are logged: keep them out of the test output.
        writes_logger = logging.getLogger("keyring_module.storage.writes")
        self.addCleanup(writes_logger.setLevel, writes_logger.level)
        writes_logger.setLevel(logging.ERROR)
        stores = []
        for limits in LIMIT_CHOICES:  # all on one database
            store = self.open_sql_store(limits)
            self.addCleanup(store.close)
            await store.migrate()
            stores.append(store)
        server_numbers = itertools.count()

        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(store_call_sequences())
        def same_state(example: tuple[int, list[ResponseSpec], list[StoreCall]]) -> None:
            # A new server name per example: a fresh state in the shared database.
            server_name = "s%d.example" % next(server_numbers)
            limits, specs, calls = example
            on_reactor(
                self.compare_stores,
                stores[limits],
                LIMIT_CHOICES[limits],
                server_name,
                specs,
                calls,
            )

        await deferToThread(same_state)

    async def test_batch_read_equals_per_server_reads(self) -> None:
        """After random stores to several servers, ``get_many_server_responses`` of the
        SQL store equals its per-server reads and the in-memory store's batch read,
        across ``IN (...)`` chunks and with a server that has nothing stored."""
        self.patch(sql_module, "MANY_SERVERS_CHUNK", 2)
        writes_logger = logging.getLogger("keyring_module.storage.writes")
        self.addCleanup(writes_logger.setLevel, writes_logger.level)
        writes_logger.setLevel(logging.ERROR)
        stores = []
        for limits in LIMIT_CHOICES:
            store = self.open_sql_store(limits)
            self.addCleanup(store.close)
            await store.migrate()
            stores.append(store)
        batch_numbers = itertools.count()

        @settings(
            max_examples=BATCH_EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(
            st.integers(0, len(LIMIT_CHOICES) - 1),
            st.lists(store_call_sequences(), min_size=1, max_size=4),
        )
        def same_batch(
            limits: int, servers: list[tuple[int, list[ResponseSpec], list[StoreCall]]]
        ) -> None:
            prefix = "b%d-" % next(batch_numbers)  # new server names: a fresh state
            on_reactor(
                self.compare_batch_reads,
                stores[limits],
                LIMIT_CHOICES[limits],
                [
                    (prefix + "s%d.example" % i, specs, calls)
                    for i, (_, specs, calls) in enumerate(servers)
                ],
                prefix + "nobody.example",
            )

        await deferToThread(same_batch)

    async def compare_batch_reads(
        self,
        sql: KeyStore,
        limits: StoreLimits,
        servers: list[tuple[str, list[ResponseSpec], list[StoreCall]]],
        unknown: str,
    ) -> None:
        """Make each server's store calls on the SQL store and on a new in-memory store,
        then compare their batch reads with each other and with the per-server reads."""
        memory = InMemoryKeyStore(limits)
        for server_name, specs, calls in servers:
            responses = [build_response(server_name, spec) for spec in specs]
            for call in calls:
                if call[0] == "store":
                    _, index, source, fetched_ts, replace = call
                    args = (responses[index], source, fetched_ts)
                    await memory.store_server_keys(*args, replace=replace)
                    await sql.store_server_keys(*args, replace=replace)
        names = [server_name for server_name, _, _ in servers] + [unknown]
        example = "in the example limits=%r servers=%r" % (limits, servers)
        found = await sql.get_many_server_responses(names)
        one_by_one = {name: await sql.get_server_responses(name) for name in names}
        self.assertEqual(found, {n: r for n, r in one_by_one.items() if r}, example)
        self.assertEqual(found, await memory.get_many_server_responses(names), example)

    async def compare_stores(
        self,
        sql: KeyStore,
        limits: StoreLimits,
        server_name: str,
        specs: list[ResponseSpec],
        calls: list[StoreCall],
    ) -> None:
        """Make the calls on the SQL store and on a new in-memory store; compare them."""
        memory = InMemoryKeyStore(limits)
        responses = [build_response(server_name, spec) for spec in specs]
        example = "in the example limits=%r responses=%r calls=%r" % (limits, specs, calls)
        for call in calls:
            if call[0] == "store":
                _, index, source, fetched_ts, replace = call
                args = (responses[index], source, fetched_ts)
                expected = await memory.store_server_keys(*args, replace=replace)
                found = await sql.store_server_keys(*args, replace=replace)
                self.assertEqual(found, expected, "returned conflicts " + example)
            else:
                _, key_id, kept, rejected, source, seen_ts = call
                conflict = KeyConflict(
                    server_name, key_id, kept, "origin", rejected, source, seen_ts
                )
                await memory.record_conflicts([conflict])
                await sql.record_conflicts([conflict])
            self.assert_within_bounds(memory, server_name, limits, example)
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
        self.assertEqual(
            sorted(
                self.raw_select(
                    "SELECT key_id, first_response_id FROM server_keys WHERE server_name = ?",
                    (server_name,),
                )
            ),
            sorted((row[1], row[8]) for row in memory.keys.get(server_name, {}).values()),
            "first-seen copies " + example,
        )
        self.assertEqual(
            sorted(
                self.raw_select(
                    "SELECT response_id FROM server_key_responses WHERE server_name = ?",
                    (server_name,),
                )
            ),
            sorted((rid,) for rid, row in memory.responses.items() if row[1] == server_name),
            "stored responses " + example,
        )

    def assert_within_bounds(
        self, memory: InMemoryKeyStore, server_name: str, limits: StoreLimits, example: str
    ) -> None:
        """The server's keys, stored responses (in number and bytes, notaries' in half)
        and conflict records are within the bounds, every stored response is a copy some
        row points at, and below the bounds the newest and the first-seen copy of every
        key are stored."""
        rows = memory.keys.get(server_name, {}).values()
        stored = {rid: row for rid, row in memory.responses.items() if row[1] == server_name}
        self.assertLessEqual(len(rows), limits.max_keys, "keys " + example)
        self.assertLessEqual(len(stored), limits.max_responses, "responses " + example)
        sizes = [(len(row[5]), row[4] != "origin") for row in stored.values()]
        self.assertLessEqual(sum(size for size, _ in sizes), limits.max_response_bytes)
        notary = [size for size, from_notary in sizes if from_notary]
        self.assertLessEqual(len(notary), limits.notary_responses, "notaries " + example)
        self.assertLessEqual(sum(notary), limits.notary_response_bytes, "notaries " + example)
        conflicts = [key for key in memory.conflicts if key[0] == server_name]
        self.assertLessEqual(len(conflicts), limits.max_conflicts, "conflicts " + example)
        pointed = {row[7] for row in rows} | {row[8] for row in rows}
        self.assertLessEqual(set(stored), pointed, "unused responses " + example)
        if limits == DEFAULT_STORE_LIMITS:  # never reached by these small examples
            for row in rows:
                self.assertIn(row[7], stored, "newest copy of %s %s" % (row[1], example))
                self.assertIn(row[8], stored, "first-seen copy of %s %s" % (row[1], example))


class SqliteStoreMergeTests(StoreMergePropertyMixin, TestCase):
    """The property on ``SqliteKeyStore`` (a file, so that the test can read it too)."""

    def setUp(self) -> None:
        self.path = os.path.abspath(self.mktemp())

    def open_sql_store(self, limits: StoreLimits) -> SqlKeyStore:
        return SqliteKeyStore(self.path, global_reactor(), limits=limits)

    def raw_select(self, statement: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(self.path)
        try:
            return [tuple(row) for row in conn.execute(statement, tuple(args))]
        finally:
            conn.close()


class PostgresStoreMergeTests(StoreMergePropertyMixin, TestCase):
    """The property on ``PostgresKeyStore``, in a schema of its own."""

    def setUp(self) -> None:
        self.dsn, _ = postgres_test_schema(self)

    def open_sql_store(self, limits: StoreLimits) -> SqlKeyStore:
        from keyring_module.storage.postgres import PostgresKeyStore

        return PostgresKeyStore(self.dsn, global_reactor(), pool_size=1, limits=limits)

    def raw_select(self, statement: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        return postgres_execute(self.dsn, statement, args)
