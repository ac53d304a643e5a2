"""Tests for the key stores: one set of store tests run on every backend, plus
backend-specific tests (schema versions, restarts, crashes, lost databases) and the
in-memory cache in front.

PostgreSQL tests need ``KEYRING_TEST_POSTGRES_DSN`` (``.ci/start_postgres.sh`` prints
one); without it they are skipped, or fail when ``CI=true``.
"""

import gc
import os
import select
import sqlite3
import subprocess
import sys
import time
import tracemalloc
from typing import TYPE_CHECKING, Any, Optional, Sequence

from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.protocols import portforward
from twisted.python import threadable
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from keyring_module.clock import global_reactor
from keyring_module.config import DatabaseConfig
from keyring_module.model import KeyConflict, StoredKey
from keyring_module.storage import (
    KeyStore,
    SchemaTooNewError,
    StorageError,
    StorageUnavailableError,
    open_key_store,
)
from keyring_module.storage import sql as sql_module
from keyring_module.storage.bounds import DEFAULT_STORE_LIMITS, StoreLimits
from keyring_module.storage.cache import CachedKeyStore
from keyring_module.storage.memory import InMemoryKeyStore
from keyring_module.storage.schema import (
    CREATE_SCHEMA_VERSION,
    INSERT_SCHEMA_VERSION,
    MIGRATIONS,
    SCHEMA_VERSION,
)
from keyring_module.storage.sql import SqlKeyStore
from keyring_module.storage.sqlite import SqliteKeyStore
from tests.storage_writer import (
    make_response,
    postgres_driver_or_skip,
    postgres_execute,
    postgres_test_schema,
)
from tests.utils import closed_loopback_port

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

K1, K2, K3 = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32


class KeyStoreTestsMixin(_Base):
    """Store semantics every backend shares (run by one class per backend)."""

    store: KeyStore

    async def make_store(self, limits: StoreLimits = DEFAULT_STORE_LIMITS) -> KeyStore:
        raise NotImplementedError

    def stored_response_ids(self, server_name: str) -> set[str]:
        """The ids of every response stored for a server (served or not)."""
        raise NotImplementedError

    async def corrupt_key(self, server_name: str, key_id: str) -> None:
        """Damage one stored key (wrong length)."""
        raise NotImplementedError

    async def corrupt_response_json(self, server_name: str) -> None:
        """Damage the stored JSON of every response of a server."""
        raise NotImplementedError

    def expire_caches(self) -> None:
        """Let cached answers expire (stores with a cache in front)."""

    async def test_store_and_get(self) -> None:
        """Stored keys come back with every field, filtered by key id when asked."""
        store = await self.make_store()
        r = make_response("a.example", 5000, {"ed25519:a": K1, "ed25519:b": K2})
        self.assertEqual(await store.store_server_keys(r, "origin", 100), [])
        keys = await store.get_server_keys("a.example")
        self.assertEqual(
            keys["ed25519:a"],
            StoredKey("a.example", "ed25519:a", K1, 5000, None, 100, "origin", r.response_id),
        )
        self.assertEqual(sorted(keys), ["ed25519:a", "ed25519:b"])
        only_b = await store.get_server_keys("a.example", ["ed25519:b", "ed25519:zz"])
        self.assertEqual(list(only_b), ["ed25519:b"])
        self.assertEqual(await store.get_server_keys("unknown.example"), {})
        await store.check_health()

    async def test_write_generation_counts_finished_writes(self) -> None:
        """Each write moves ``write_generation`` on once it is done (failed or not), never
        before: a reader that saw the old count cannot miss the write's data."""
        store = await self.make_store()
        before = store.write_generation
        write = defer.ensureDeferred(
            store.store_server_keys(make_response("g.example", 5000, {"ed25519:a": K1}), "o", 1)
        )
        if not write.called:  # a backend that writes in another thread
            self.assertEqual(store.write_generation, before)
        await write
        self.assertEqual(store.write_generation, before + 1)
        await store.get_server_keys("g.example")
        self.assertEqual(store.write_generation, before + 1, "reads do not count")

    async def test_many_servers(self) -> None:
        """``get_many_server_keys`` returns each known server's keys and leaves out others."""
        store = await self.make_store()
        keys = {}
        for i in range(20):
            keys[i] = os.urandom(32)
            r = make_response("s%d.example" % i, 5000 + i, {"ed25519:k": keys[i]})
            await store.store_server_keys(r, "origin", 100)
        wanted = ["s%d.example" % i for i in range(0, 20, 2)] + ["nobody.example"]
        found = await store.get_many_server_keys(wanted)
        self.assertEqual(sorted(found), sorted(wanted[:-1]))
        for i in range(0, 20, 2):
            self.assertEqual(found["s%d.example" % i]["ed25519:k"].verify_key_bytes, keys[i])
        self.assertEqual(await store.get_many_server_keys([]), {})

    async def test_many_server_responses_equal_the_per_server_reads(self) -> None:
        """``get_many_server_responses`` answers for each server what
        ``get_server_responses`` does (newest first, first-seen copies not served,
        unreadable ones skipped) across ``IN (...)`` chunks, and leaves out servers with
        nothing served."""
        store = await self.make_store()
        rotated = [make_response("rot.example", ts, {"ed25519:k%d" % ts: K1}) for ts in (3, 1, 2)]
        copies = [make_response("copy.example", ts, {"ed25519:k": K2}) for ts in (1, 2, 3)]
        for fetched_ts, response in enumerate(rotated + copies):
            await store.store_server_keys(response, "origin", fetched_ts)
        plain = ["s%d.example" % i for i in range(9)]  # more than one chunk of names
        for i, name in enumerate(plain):
            await store.store_server_keys(make_response(name, 100 + i, {"ed25519:k": K3}), "o", 1)
        await store.store_server_keys(make_response("bad.example", 5, {"ed25519:k": K1}), "o", 1)
        await self.corrupt_response_json("bad.example")
        names = ["rot.example", "copy.example", "bad.example", "nobody.example"] + plain
        with self.assertLogs("keyring_module.storage.rows", "WARNING"):
            found = await store.get_many_server_responses(names + ["rot.example"])
        with self.assertLogs("keyring_module.storage.rows", "WARNING"):
            one_by_one = {name: await store.get_server_responses(name) for name in names}
        self.assertEqual(found, {name: r for name, r in one_by_one.items() if r})
        self.assertEqual(sorted(found), sorted(["rot.example", "copy.example"] + plain))
        self.assertEqual(
            [r.response_id for r in found["rot.example"]],
            [rotated[0].response_id, rotated[2].response_id, rotated[1].response_id],
        )
        self.assertEqual([r.response_id for r in found["copy.example"]], [copies[2].response_id])
        self.assertEqual(found["s4.example"][0].json_bytes, one_by_one["s4.example"][0].json_bytes)
        self.assertEqual(await store.get_many_server_responses([]), {})

    async def test_dropped_key_never_forgotten(self) -> None:
        """A key that a later response no longer lists stays, with its own response."""
        store = await self.make_store()
        r1 = make_response("a.example", 1000, {"ed25519:old": K1, "ed25519:cur": K2})
        r2 = make_response("a.example", 2000, {"ed25519:cur": K2})
        await store.store_server_keys(r1, "origin", 10)
        await store.store_server_keys(r2, "origin", 20)
        keys = await store.get_server_keys("a.example")
        self.assertEqual(keys["ed25519:old"].verify_key_bytes, K1)
        self.assertEqual(keys["ed25519:old"].response_id, r1.response_id)
        self.assertEqual(keys["ed25519:cur"].response_id, r2.response_id)
        responses = await store.get_server_responses("a.example")
        self.assertEqual([r.json_bytes for r in responses], [r2.json_bytes, r1.json_bytes])

    async def test_newer_wins_older_does_not_overwrite(self) -> None:
        """A key follows the newest response; replaying an older one changes nothing."""
        store = await self.make_store()
        r1 = make_response("a.example", 1000, {"ed25519:k": K1})
        r2 = make_response("a.example", 2000, {"ed25519:k": K1})
        r3 = make_response("a.example", 3000, {"ed25519:k": K1})
        await store.store_server_keys(r2, "origin", 20)
        await store.store_server_keys(r1, "notary:n.example", 30)
        key = (await store.get_server_keys("a.example"))["ed25519:k"]
        self.assertEqual((key.valid_until_ts, key.fetched_ts, key.source), (2000, 20, "origin"))
        responses = await store.get_server_responses("a.example")
        self.assertEqual([r.response_id for r in responses], [r2.response_id])
        await store.store_server_keys(r3, "notary:n.example", 40)
        key = (await store.get_server_keys("a.example"))["ed25519:k"]
        self.assertEqual((key.valid_until_ts, key.source), (3000, "notary:n.example"))
        self.assertEqual(key.response_id, r3.response_id)

    async def test_same_bytes_stored_once(self) -> None:
        """Storing the same bytes again keeps one response and only moves fetched_ts forward."""
        store = await self.make_store()
        r = make_response("a.example", 1000, {"ed25519:k": K1})
        await store.store_server_keys(r, "origin", 10)
        await store.store_server_keys(r, "notary:n.example", 30)
        await store.store_server_keys(r, "origin", 20)
        responses = await store.get_server_responses("a.example")
        self.assertEqual(len(responses), 1)
        self.assertEqual((responses[0].fetched_ts, responses[0].source), (30, "notary:n.example"))
        key = (await store.get_server_keys("a.example"))["ed25519:k"]
        self.assertEqual((key.fetched_ts, key.source), (30, "notary:n.example"))

    async def test_conflict_recorded_once_first_seen_kept(self) -> None:
        """Different bytes for a known key id are rejected, returned and recorded once."""
        store = await self.make_store()
        first = make_response("a.example", 1000, {"ed25519:k": K1})
        evil = make_response("a.example", 9000, {"ed25519:k": K2, "ed25519:new": K3})
        await store.store_server_keys(first, "origin", 10)
        for fetched_ts in (20, 30):
            conflicts = await store.store_server_keys(evil, "notary:evil.example", fetched_ts)
            self.assertEqual(len(conflicts), 1)
            c = conflicts[0]
            self.assertEqual(
                (c.key_id, c.kept_key_bytes, c.kept_source), ("ed25519:k", K1, "origin")
            )
            self.assertEqual((c.rejected_key_bytes, c.rejected_source), (K2, "notary:evil.example"))
        keys = await store.get_server_keys("a.example")
        self.assertEqual(keys["ed25519:k"].verify_key_bytes, K1)
        self.assertEqual(keys["ed25519:k"].valid_until_ts, 1000)
        self.assertEqual(keys["ed25519:new"].verify_key_bytes, K3)
        recorded = await store.get_conflicts("a.example")
        self.assertEqual(
            [(c.key_id, c.rejected_key_bytes, c.seen_ts) for c in recorded], [("ed25519:k", K2, 20)]
        )
        other = make_response("a.example", 9500, {"ed25519:k": K3})
        await store.store_server_keys(other, "notary:other.example", 40)
        recorded = await store.get_conflicts("a.example")
        self.assertEqual([c.rejected_key_bytes for c in recorded], [K2, K3])
        self.assertEqual(await store.get_conflicts("b.example"), [])

    async def test_replace_and_record_conflicts(self) -> None:
        """``replace`` lets a response overwrite named differing keys; ``record_conflicts`` dedupes."""
        store = await self.make_store()
        provisional = make_response("a.example", 1000, {"ed25519:k": K1, "ed25519:o": K3})
        direct = make_response("a.example", 2000, {"ed25519:k": K2, "ed25519:o": K1})
        await store.store_server_keys(provisional, "notary:n.example", 10)
        conflicts = await store.store_server_keys(direct, "origin", 20, replace=["ed25519:k"])
        self.assertEqual(
            [(c.key_id, c.kept_key_bytes, c.kept_source) for c in conflicts],
            [("ed25519:k", K2, "origin"), ("ed25519:o", K3, "notary:n.example")],
        )
        self.assertEqual(
            [(c.rejected_key_bytes, c.rejected_source) for c in conflicts],
            [(K1, "notary:n.example"), (K1, "origin")],
        )
        keys = await store.get_server_keys("a.example")
        self.assertEqual(
            (keys["ed25519:k"].verify_key_bytes, keys["ed25519:k"].source), (K2, "origin")
        )
        self.assertEqual(keys["ed25519:k"].response_id, direct.response_id)
        self.assertEqual(keys["ed25519:o"].verify_key_bytes, K3)
        await store.record_conflicts(
            [KeyConflict("a.example", "ed25519:x", K1, "origin", K2, "notary:b", 30)]
        )
        await store.record_conflicts(
            [
                KeyConflict("a.example", "ed25519:x", K1, "origin", K2, "notary:c", 40),
                KeyConflict("a.example", "ed25519:x", K1, "origin", K2, "notary:d", 40),
            ]
        )
        await store.record_conflicts([])
        recorded = await store.get_conflicts("a.example")
        self.assertEqual(
            [(c.key_id, c.rejected_source) for c in recorded],
            [("ed25519:k", "notary:n.example"), ("ed25519:o", "origin"), ("ed25519:x", "notary:b")],
        )

    async def test_corrupt_rows_skipped(self) -> None:
        """Unreadable key or response rows are skipped; the rest is still answered."""
        store = await self.make_store()
        await store.store_server_keys(
            make_response("a.example", 1000, {"ed25519:bad": K1, "ed25519:good": K2}), "origin", 1
        )
        b = make_response("b.example", 1000, {"ed25519:k": K3})
        await store.store_server_keys(b, "origin", 1)
        await self.corrupt_key("a.example", "ed25519:bad")
        await self.corrupt_response_json("a.example")
        with self.assertLogs("keyring_module.storage.rows", "WARNING"):
            self.assertEqual(list(await store.get_server_keys("a.example")), ["ed25519:good"])
        self.expire_caches()
        with self.assertLogs("keyring_module.storage.rows", "WARNING"):
            found = await store.get_many_server_keys(["a.example", "b.example"])
        self.assertEqual(
            {s: list(k) for s, k in found.items()},
            {"a.example": ["ed25519:good"], "b.example": ["ed25519:k"]},
        )
        with self.assertLogs("keyring_module.storage.rows", "WARNING"):
            self.assertEqual(await store.get_server_responses("a.example"), [])
        self.assertEqual(len(await store.get_server_responses("b.example")), 1)
        # A fresh, valid response for the damaged key id replaces the corrupt row.
        with self.assertLogs("keyring_module.storage", "WARNING") as logs:
            await store.store_server_keys(
                make_response("a.example", 2000, {"ed25519:bad": K3}), "origin", 2
            )
        self.assertIn("Replacing corrupt stored key", logs.output[0])
        keys = await store.get_server_keys("a.example")
        self.assertEqual(keys["ed25519:bad"].verify_key_bytes, K3)

    async def test_responses_exact_bytes(self) -> None:
        """Responses come back byte for byte, unknown fields and non-ASCII included."""
        store = await self.make_store()
        r = make_response(
            "a.example", 1000, {"ed25519:k": K1}, extra={"x_unknown": {"é": [1, "\u2603"]}}
        )
        await store.store_server_keys(r, "origin", 5)
        (stored,) = await store.get_server_responses("a.example")
        self.assertEqual(stored.json_bytes, r.json_bytes)
        self.assertEqual(
            (stored.response_id, stored.server_name, stored.valid_until_ts, stored.fetched_ts),
            (r.response_id, "a.example", 1000, 5),
        )
        self.assertEqual(await store.get_server_responses("other.example"), [])

    async def test_old_keys_have_expired_ts(self) -> None:
        """old_verify_keys are stored with expired_ts; a key retired later gets one too."""
        store = await self.make_store()
        r1 = make_response("a.example", 1000, {"ed25519:b": K2}, {"ed25519:a": (K1, 500)})
        await store.store_server_keys(r1, "origin", 10)
        keys = await store.get_server_keys("a.example")
        self.assertEqual(
            (keys["ed25519:a"].expired_ts, keys["ed25519:a"].valid_until_ts), (500, 1000)
        )
        self.assertIsNone(keys["ed25519:b"].expired_ts)
        r2 = make_response("a.example", 2000, {"ed25519:c": K3}, {"ed25519:b": (K2, 1500)})
        await store.store_server_keys(r2, "origin", 20)
        # Replaying the older response must not un-expire ed25519:b.
        await store.store_server_keys(r1, "origin", 30)
        keys = await store.get_server_keys("a.example")
        self.assertEqual(keys["ed25519:b"].expired_ts, 1500)
        self.assertEqual(keys["ed25519:b"].valid_until_ts, 2000)
        self.assertEqual(keys["ed25519:a"].expired_ts, 500)
        self.assertEqual(sorted(keys), ["ed25519:a", "ed25519:b", "ed25519:c"])

    async def test_first_seen_copy_kept_not_served(self) -> None:
        """A key's first-seen copy stays stored next to its newest one, but only the
        newest is served; copies in between are deleted."""
        store = await self.make_store()
        r1, r2, r3 = (make_response("a.example", ts, {"ed25519:k": K1}) for ts in (1, 2, 3))
        for fetched_ts, response in enumerate((r1, r2, r3)):
            await store.store_server_keys(response, "origin", fetched_ts)
        self.assertEqual(self.stored_response_ids("a.example"), {r1.response_id, r3.response_id})
        served = await store.get_server_responses("a.example")
        self.assertEqual([r.response_id for r in served], [r3.response_id])
        # Replaced bytes are first seen in the replacing response.
        r4 = make_response("a.example", 4, {"ed25519:k": K2})
        await store.store_server_keys(r4, "origin", 4, replace=["ed25519:k"])
        self.assertEqual(self.stored_response_ids("a.example"), {r4.response_id})

    async def test_new_key_id_on_every_fetch_is_bounded(self) -> None:
        """An origin using a new key id on every fetch stops growing at the bounds: its
        older responses give way to the newest (logged), later key ids are refused at the
        key bound (logged), and the stored keys keep their bytes; one answer with many
        keys stops at the key bound."""
        store = await self.make_store(StoreLimits(max_keys=5, max_responses=3, max_conflicts=5))
        for i in range(12):
            response = make_response("a.example", 1000 + i, {"ed25519:k%02d" % i: bytes([i]) * 32})
            if i < 3:
                await store.store_server_keys(response, "origin", i)
                continue
            if i < 5:
                with self.assertLogs("keyring_module.storage", "INFO") as logs:
                    await store.store_server_keys(response, "origin", i)
                self.assertIn("Dropped 1 stored responses of a.example", logs.output[-1])
                continue
            with self.assertLogs("keyring_module.storage", "WARNING") as logs:
                self.assertEqual(await store.store_server_keys(response, "origin", i), [])
            self.assertIn("Not storing 1 new key ids of a.example from origin", logs.output[0])
            self.expire_caches()
        keys = await store.get_server_keys("a.example")
        self.assertEqual(sorted(keys), ["ed25519:k%02d" % i for i in range(5)])
        self.assertEqual(keys["ed25519:k02"].verify_key_bytes, bytes([2]) * 32)
        self.assertEqual(len(self.stored_response_ids("a.example")), 3)
        served = await store.get_server_responses("a.example")
        self.assertEqual(len(served), 3)
        self.assertEqual(served[0].response_id, keys["ed25519:k04"].response_id)
        many = make_response("b.example", 1000, {"ed25519:k%d" % i: K1 for i in range(8)})
        with self.assertLogs("keyring_module.storage", "WARNING"):
            await store.store_server_keys(many, "origin", 1)
        keys = await store.get_server_keys("b.example")
        self.assertEqual(sorted(keys), ["ed25519:k%d" % i for i in range(5)])

    async def test_notary_filling_the_bounds_leaves_room_for_the_origin(self) -> None:
        """A lying notary answering with a new self-signed key id each time fills at most
        half of the bounds; the origin's new key is then still stored and served."""
        limits = StoreLimits(max_keys=20, max_responses=8, max_conflicts=5)
        store = await self.make_store(limits)
        with self.assertLogs("keyring_module.storage", "WARNING"):  # its later ids refused
            for i in range(30):
                fake = make_response("v.example", 10_000 + i, {"ed25519:fake%02d" % i: K1})
                await store.store_server_keys(fake, "notary:evil.example", i)
        self.assertEqual(len(await store.get_server_keys("v.example")), 10)
        self.assertEqual(len(self.stored_response_ids("v.example")), 4)
        for refresh in range(3):
            real = make_response("v.example", 99_000 + refresh, {"ed25519:real": K2})
            await store.store_server_keys(real, "origin", 100 + refresh)
            self.expire_caches()
            keys = await store.get_server_keys("v.example")
            self.assertEqual(keys["ed25519:real"].verify_key_bytes, K2)
            self.assertEqual(keys["ed25519:real"].source, "origin")
            served = await store.get_server_responses("v.example")
            self.assertEqual(served[0].json_bytes, real.json_bytes)

    async def test_key_rotated_40_times_is_stored_and_served(self) -> None:
        """A server that regenerates its key on every restart (40 of them, refreshed
        twice each) still has its latest key stored and served, and all earlier ones
        stored, within the response bound."""
        store = await self.make_store()
        ts = 0
        for restart in range(40):
            for _ in range(2):
                ts += 1
                key = {"ed25519:r%02d" % restart: bytes([restart]) * 32}
                await store.store_server_keys(
                    make_response("r.example", 1000 + ts, key), "origin", ts
                )
        keys = await store.get_server_keys("r.example")
        self.assertEqual(len(keys), 40)
        self.assertEqual(keys["ed25519:r39"].verify_key_bytes, bytes([39]) * 32)
        served = await store.get_server_responses("r.example")
        self.assertEqual(served[0].response_id, keys["ed25519:r39"].response_id)
        stored = self.stored_response_ids("r.example")
        self.assertEqual(len(stored), DEFAULT_STORE_LIMITS.max_responses)

    async def test_stored_response_bytes_bounded(self) -> None:
        """A server's stored responses hold at most ``max_response_bytes`` in all; one
        response bigger than that alone is refused (logged)."""
        limits = StoreLimits(
            max_keys=100, max_responses=100, max_conflicts=0, max_response_bytes=10_000
        )
        store = await self.make_store(limits)
        for i in range(20):
            response = make_response(
                "b.example", 1000 + i, {"ed25519:k%02d" % i: K1}, extra={"p": "x" * 2000}
            )
            await store.store_server_keys(response, "origin", i)
        served = await store.get_server_responses("b.example")
        self.assertEqual(len(served), 4)  # 4 of about 2,200 bytes fit in 10,000
        self.assertEqual(len(self.stored_response_ids("b.example")), 4)
        self.assertEqual(len(await store.get_server_keys("b.example")), 20)
        huge = make_response("b.example", 5000, {"ed25519:huge": K2}, extra={"p": "x" * 10_000})
        with self.assertLogs("keyring_module.storage", "WARNING") as logs:
            await store.store_server_keys(huge, "origin", 50)
        self.assertIn("Not storing a response of b.example from origin", logs.output[0])
        self.assertNotIn("ed25519:huge", await store.get_server_keys("b.example"))

    async def test_conflict_records_bounded(self) -> None:
        """An origin re-keying many old keys on every refetch leaves at most
        ``max_conflicts`` records (the oldest), while every conflict is still returned."""
        store = await self.make_store(StoreLimits(max_keys=100, max_responses=4, max_conflicts=7))
        key_ids = ["ed25519:old%02d" % i for i in range(20)]
        first = make_response("a.example", 1000, {}, dict.fromkeys(key_ids, (K1, 500)))
        await store.store_server_keys(first, "origin", 1)
        for fetched_ts, key_bytes in ((2, K2), (3, K3)):
            rekeyed = make_response(
                "a.example", 1000 + fetched_ts, {}, dict.fromkeys(key_ids, (key_bytes, 500))
            )
            conflicts = await store.store_server_keys(rekeyed, "origin", fetched_ts)
            self.assertEqual([c.key_id for c in conflicts], key_ids)
        await store.record_conflicts(
            [KeyConflict("a.example", "ed25519:x", K1, "origin", K2, "notary:n", 4)]
        )
        recorded = await store.get_conflicts("a.example")
        self.assertEqual(
            [(c.key_id, c.rejected_key_bytes) for c in recorded], [(k, K2) for k in key_ids[:7]]
        )
        await store.record_conflicts(
            [KeyConflict("b.example", "ed25519:x", K1, "origin", K2, "notary:n", 4)]
        )
        self.assertEqual(len(await store.get_conflicts("b.example")), 1)


class InMemoryKeyStoreTests(KeyStoreTestsMixin, TestCase):
    """The shared store tests on ``InMemoryKeyStore``."""

    async def make_store(self, limits: StoreLimits = DEFAULT_STORE_LIMITS) -> KeyStore:
        self.memory = InMemoryKeyStore(limits)
        return self.memory

    def stored_response_ids(self, server_name: str) -> set[str]:
        return {rid for rid, row in self.memory.responses.items() if row[1] == server_name}

    async def corrupt_key(self, server_name: str, key_id: str) -> None:
        row = self.memory.keys[server_name][key_id]
        self.memory.keys[server_name][key_id] = row[:2] + (b"short",) + row[3:]

    async def corrupt_response_json(self, server_name: str) -> None:
        for rid, row in list(self.memory.responses.items()):
            if row[1] == server_name:
                self.memory.responses[rid] = row[:5] + (b"{not json",)


class CachedInMemoryKeyStoreTests(InMemoryKeyStoreTests):
    """The shared store tests through ``CachedKeyStore`` (its writes invalidate its reads)."""

    async def make_store(self, limits: StoreLimits = DEFAULT_STORE_LIMITS) -> KeyStore:
        await super().make_store(limits)
        self.clock = Clock()
        return CachedKeyStore(self.memory, self.clock, max_entries=100, ttl_ms=10_000)

    def expire_caches(self) -> None:
        self.clock.advance(11)

    async def corrupt_key(self, server_name: str, key_id: str) -> None:
        await super().corrupt_key(server_name, key_id)
        self.expire_caches()  # written behind the cache's back: wait out the TTL

    async def corrupt_response_json(self, server_name: str) -> None:
        await super().corrupt_response_json(server_name)
        self.expire_caches()


class SqlKeyStoreTestsMixin(KeyStoreTestsMixin):
    """The shared tests plus schema tests, for the SQL backends."""

    def open_sql_store(self, limits: StoreLimits = DEFAULT_STORE_LIMITS) -> SqlKeyStore:
        """A new (not yet migrated) store on this test's database."""
        raise NotImplementedError

    def raw_execute(self, statement: str, args: Sequence[Any] = ()) -> list[Any]:
        """Run one ``?``-placeholder statement on a separate connection (autocommit)."""
        raise NotImplementedError

    async def make_store(self, limits: StoreLimits = DEFAULT_STORE_LIMITS) -> KeyStore:
        # Small IN (...) chunks, so that the many-servers test crosses chunk boundaries.
        self.patch(sql_module, "MANY_SERVERS_CHUNK", 7)
        store = self.open_sql_store(limits)
        self.addCleanup(store.close)
        self.assertEqual(await store.migrate(), SCHEMA_VERSION)
        return store

    def stored_response_ids(self, server_name: str) -> set[str]:
        rows = self.raw_execute(
            "SELECT response_id FROM server_key_responses WHERE server_name = ?", (server_name,)
        )
        return {row[0] for row in rows}

    async def corrupt_key(self, server_name: str, key_id: str) -> None:
        self.raw_execute(
            "UPDATE server_keys SET verify_key = ? WHERE server_name = ? AND key_id = ?",
            (b"short", server_name, key_id),
        )

    async def corrupt_response_json(self, server_name: str) -> None:
        self.raw_execute(
            "UPDATE server_key_responses SET json = ? WHERE server_name = ?",
            (b"{not json", server_name),
        )

    async def test_rows_are_converted_in_the_pool_threads(self) -> None:
        """Rows become keys, responses and conflicts in the pool's threads, never on the
        reactor thread (a big read hashes every stored response it returns)."""
        store = await self.make_store()
        r = make_response("a.example", 1000, {"ed25519:k": K1})
        await store.store_server_keys(r, "origin", 10)
        await store.store_server_keys(make_response("b.example", 1000, {"ed25519:k": K2}), "o", 1)
        await store.record_conflicts(
            [KeyConflict("a.example", "ed25519:k", K1, "origin", K2, "notary:n", 11)]
        )
        on_reactor_thread: list[bool] = []

        def spy(convert: Any) -> Any:
            def converting(*args: Any) -> Any:
                on_reactor_thread.append(threadable.isInIOThread())
                return convert(*args)

            return converting

        for name in ("keys_from_rows", "response_from_row", "conflict_from_row"):
            self.patch(sql_module, name, spy(getattr(sql_module, name)))
        self.assertEqual(list(await store.get_server_keys("a.example")), ["ed25519:k"])
        self.assertEqual(
            sorted(await store.get_many_server_keys(["a.example", "b.example"])),
            ["a.example", "b.example"],
        )
        [served] = await store.get_server_responses("a.example")
        self.assertEqual(served.json_bytes, r.json_bytes)
        many = await store.get_many_server_responses(["a.example", "b.example"])
        self.assertEqual(sorted(many), ["a.example", "b.example"])
        self.assertEqual(len(await store.get_conflicts("a.example")), 1)
        # keys_from_rows twice, response_from_row three times, conflict_from_row once.
        self.assertEqual(on_reactor_thread, [False] * 6)

    async def test_reopen_keeps_keys_and_migrations_are_idempotent(self) -> None:
        """Keys survive closing and reopening; migrating again changes nothing."""
        store = await self.make_store()
        r = make_response("a.example", 1000, {"ed25519:k": K1})
        await store.store_server_keys(r, "origin", 10)
        await store.close()
        for _ in range(2):
            reopened = self.open_sql_store()
            self.addCleanup(reopened.close)
            self.assertEqual(await reopened.migrate(), SCHEMA_VERSION)
            keys = await reopened.get_server_keys("a.example")
            self.assertEqual(keys["ed25519:k"].verify_key_bytes, K1)
            self.assertEqual(
                self.raw_execute("SELECT version FROM schema_version"), [(SCHEMA_VERSION,)]
            )
            await reopened.close()

    async def test_bounds_hold_across_processes(self) -> None:
        """Two stores on one database writing one server at once stay within its bounds."""
        limits = StoreLimits(max_keys=3, max_responses=3, max_conflicts=2)
        first = await self.make_store(limits)
        second = self.open_sql_store(limits)
        self.addCleanup(second.close)
        writes: list["Deferred[Any]"] = []
        for i in range(12):
            store = first if i % 2 else second
            response = make_response("a.example", 1000 + i, {"ed25519:k%02d" % i: bytes([i]) * 32})
            writes.append(ensureDeferred(store.store_server_keys(response, "origin", i)))
            conflict = KeyConflict("a.example", "ed25519:c%d" % i, K1, "origin", K2, "n", i)
            writes.append(ensureDeferred(store.record_conflicts([conflict])))
        with self.assertLogs("keyring_module.storage.writes", "WARNING"):  # refusals
            await defer.gatherResults(writes)
        self.assertEqual(len(await first.get_server_keys("a.example")), 3)
        self.assertEqual(len(self.stored_response_ids("a.example")), 3)
        self.assertEqual(len(await first.get_conflicts("a.example")), 2)

    async def test_upgrade_from_schema_1(self) -> None:
        """A version 1 database is upgraded in place without rewriting its rows: its keys
        and responses stay, each key's stored copy counts as its first-seen copy (NULL),
        and later stores keep that copy (also for rows an older process writes without
        one)."""
        store = self.open_sql_store()
        self.addCleanup(store.close)
        self.raw_execute(CREATE_SCHEMA_VERSION)
        self.raw_execute(INSERT_SCHEMA_VERSION, (1,))
        [(version, statements)] = MIGRATIONS[:1]
        self.assertEqual(version, 1)
        for statement in statements:
            self.raw_execute(store.dialect.ddl(statement))
        r1 = make_response("a.example", 1000, {"ed25519:k": K1})
        self.raw_execute(
            "INSERT INTO server_key_responses VALUES (?, ?, ?, ?, ?, ?)",
            (r1.response_id, "a.example", 1000, 10, "origin", r1.json_bytes),
        )
        self.raw_execute(
            "INSERT INTO server_keys VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            ("a.example", "ed25519:k", K1, 1000, None, 10, "origin", r1.response_id),
        )
        self.assertEqual(await store.migrate(), SCHEMA_VERSION)
        self.assertEqual(self.raw_execute("SELECT first_response_id FROM server_keys"), [(None,)])
        self.assertEqual(
            (await store.get_server_keys("a.example"))["ed25519:k"].verify_key_bytes, K1
        )
        r2 = make_response("a.example", 2000, {"ed25519:k": K1})
        await store.store_server_keys(r2, "origin", 20)
        self.assertEqual(self.stored_response_ids("a.example"), {r1.response_id, r2.response_id})
        self.assertEqual(
            self.raw_execute("SELECT first_response_id FROM server_keys"), [(r1.response_id,)]
        )
        served = await store.get_server_responses("a.example")
        self.assertEqual([r.response_id for r in served], [r2.response_id])
        # A row without a first-seen copy counts its newest copy as the first-seen one.
        self.raw_execute("UPDATE server_keys SET first_response_id = NULL")
        r3 = make_response("a.example", 3000, {"ed25519:k": K1})
        await store.store_server_keys(r3, "origin", 30)
        self.assertEqual(self.stored_response_ids("a.example"), {r2.response_id, r3.response_id})
        self.assertEqual(
            self.raw_execute("SELECT first_response_id FROM server_keys"), [(r2.response_id,)]
        )

    async def test_newer_schema_refused(self) -> None:
        """A database written by a newer version is refused with a clear message."""
        store = await self.make_store()
        await store.close()
        self.raw_execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
        newer = self.open_sql_store()
        self.addCleanup(newer.close)
        with self.assertRaisesRegex(
            SchemaTooNewError,
            r"^database schema version %d is newer than this keyring_module supports \(%d\); "
            r"upgrade keyring_module$" % (SCHEMA_VERSION + 1, SCHEMA_VERSION),
        ):
            await newer.migrate()
        self.assertEqual(
            self.raw_execute("SELECT version FROM schema_version"), [(SCHEMA_VERSION + 1,)]
        )


class SqliteKeyStoreTests(SqlKeyStoreTestsMixin, TestCase):
    """The shared store tests, restarts and crash safety on ``SqliteKeyStore``."""

    def setUp(self) -> None:
        self.path = os.path.abspath(self.mktemp())

    def open_sql_store(self, limits: StoreLimits = DEFAULT_STORE_LIMITS) -> SqlKeyStore:
        return SqliteKeyStore(self.path, global_reactor(), limits=limits)

    def raw_execute(self, statement: str, args: Sequence[Any] = ()) -> list[Any]:
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            return conn.execute(statement, tuple(args)).fetchall()
        finally:
            conn.close()

    async def test_killed_writer_loses_no_committed_key(self) -> None:
        """Every write a process reported done is in the file after it is killed -9."""
        env = dict(os.environ, PYTHONPATH=REPO_ROOT)
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.storage_writer", self.path],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.addCleanup(proc.wait)
        self.addCleanup(proc.kill)
        output = b""
        deadline = time.monotonic() + 8
        assert proc.stdout is not None
        while output.count(b"\n") < 25 and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.1)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                output += chunk
        proc.kill()  # SIGKILL, in the middle of its writes
        proc.wait()
        assert proc.stderr is not None
        output += proc.stdout.read()
        stderr = proc.stderr.read().decode(errors="replace")
        lines = output.split(b"\n")[:-1]  # a last line cut short is not a report
        self.assertGreaterEqual(len(lines), 25, "writer reported too few writes: %s" % stderr)
        store = SqliteKeyStore(self.path, global_reactor())
        self.addCleanup(store.close)
        await store.migrate()
        reported = [line.decode().split() for line in lines]
        found = await store.get_many_server_keys([server for server, _, _ in reported])
        for server_name, key_id, key_hex in reported:
            self.assertEqual(found[server_name][key_id].verify_key_bytes, bytes.fromhex(key_hex))
        self.assertEqual(self.raw_execute("PRAGMA integrity_check"), [("ok",)])

    async def test_unreachable_file_is_unavailable(self) -> None:
        """A database file that cannot be opened raises StorageUnavailableError."""
        store = SqliteKeyStore(os.path.join(self.path, "missing-dir", "keys.db"), global_reactor())
        self.addCleanup(store.close)
        with self.assertRaisesRegex(StorageUnavailableError, "unable to open database file"):
            await store.migrate()


class _TrackedProxyServer(portforward.ProxyServer):
    factory: "_ProxyFactory"

    def connectionMade(self) -> None:
        self.factory.servers.append(self)
        super().connectionMade()


class _ProxyFactory(portforward.ProxyFactory):
    """A loopback TCP proxy to PostgreSQL that a test can cut, like a server going down."""

    protocol = _TrackedProxyServer

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.servers: list[_TrackedProxyServer] = []

    async def cut(self) -> None:
        """Close every proxied connection and wait until they are gone."""
        transports: list[Any] = [s.transport for s in self.servers]
        transports += [s.peer.transport for s in self.servers if s.peer is not None]
        for transport in transports:
            transport.abortConnection()
        for _ in range(100):
            if not any(transport.connected for transport in transports):
                return
            await _sleep(0.02)


def _sleep(seconds: float) -> "Deferred[None]":
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)  # type: ignore[arg-type]


class PostgresKeyStoreTests(SqlKeyStoreTestsMixin, TestCase):
    """The shared store tests, reconnects and outages on ``PostgresKeyStore``."""

    def setUp(self) -> None:
        self.dsn, self.application_name = postgres_test_schema(self)

    def open_sql_store(self, limits: StoreLimits = DEFAULT_STORE_LIMITS) -> SqlKeyStore:
        from keyring_module.storage.postgres import PostgresKeyStore

        return PostgresKeyStore(self.dsn, global_reactor(), pool_size=3, limits=limits)

    def raw_execute(self, statement: str, args: Sequence[Any] = ()) -> list[Any]:
        return postgres_execute(self.dsn, statement, args)

    async def test_reconnects_after_connections_terminated(self) -> None:
        """After the server drops every pooled connection, the next queries succeed."""
        store = await self.make_store()
        await store.store_server_keys(make_response("a.example", 1000, {"ed25519:k": K1}), "o", 1)
        # Use several pooled connections at once, so that several are open.
        await defer.gatherResults(
            [ensureDeferred(store.get_server_keys("a.example")) for _ in range(6)]
        )
        killed = self.raw_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND application_name = ?",
            (self.application_name,),
        )
        self.assertTrue(killed and all(ok for (ok,) in killed), killed)
        with self.assertLogs("keyring_module.storage.sql", "WARNING"):
            for _ in range(6):
                keys = await store.get_server_keys("a.example")
                self.assertEqual(keys["ed25519:k"].verify_key_bytes, K1)
        await store.store_server_keys(make_response("b.example", 1000, {"ed25519:k": K2}), "o", 2)
        self.assertEqual(list(await store.get_server_keys("b.example")), ["ed25519:k"])

    async def test_transactions_are_read_committed(self) -> None:
        """Every pooled connection runs at READ COMMITTED (what the per-server lock then
        read needs), even when the server's default isolation is SERIALIZABLE."""
        from psycopg2.extensions import make_dsn, parse_dsn

        from keyring_module.storage.postgres import PostgresKeyStore

        options = parse_dsn(self.dsn).get("options", "")
        dsn = make_dsn(self.dsn, options=options + " -c default_transaction_isolation=serializable")
        self.assertEqual(postgres_execute(dsn, "SHOW transaction_isolation"), [("serializable",)])
        store = PostgresKeyStore(dsn, global_reactor(), pool_size=3)
        self.addCleanup(store.close)
        await store.migrate()
        levels = await defer.gatherResults(
            [
                ensureDeferred(store._run("test", store._select, "SHOW transaction_isolation", ()))
                for _ in range(6)
            ]
        )
        self.assertEqual(levels, [[("read committed",)]] * 6)

    async def test_outage_raises_unavailable_and_cache_serves_stale(self) -> None:
        """When PostgreSQL goes away, reads raise StorageUnavailableError unless cached."""
        from psycopg2.extensions import make_dsn, parse_dsn

        from keyring_module.storage.postgres import PostgresKeyStore

        params = parse_dsn(self.dsn)
        if params.get("host", "") not in ("127.0.0.1", "localhost"):
            raise SkipTest("needs PostgreSQL on TCP loopback to put a proxy in front")
        proxy = _ProxyFactory("127.0.0.1", int(params.get("port", 5432)))
        port: Any = reactor.listenTCP(0, proxy, interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]
        self.addCleanup(proxy.cut)
        listening = True

        async def stop_listening() -> None:
            if listening:
                await port.stopListening()

        self.addCleanup(stop_listening)
        dsn = make_dsn(self.dsn, host="127.0.0.1", port=port.getHost().port, connect_timeout=2)
        backend = PostgresKeyStore(dsn, global_reactor(), pool_size=2)
        self.addCleanup(backend.close)
        clock = Clock()
        cache = CachedKeyStore(backend, clock, max_entries=10, ttl_ms=10_000)
        await backend.migrate()
        await cache.store_server_keys(make_response("a.example", 1000, {"ed25519:k": K1}), "o", 1)
        self.assertEqual(list(await cache.get_server_keys("a.example")), ["ed25519:k"])
        clock.advance(60)  # the cached entry is now expired

        await port.stopListening()
        listening = False
        await proxy.cut()

        with self.assertLogs("keyring_module.storage.sql", "WARNING") as lost:
            with self.assertRaises(StorageUnavailableError):
                await backend.check_health()
        self.assertIn("Database connection lost", lost.output[0])
        with self.assertLogs("keyring_module.storage.cache", "WARNING") as logs:
            keys = await cache.get_server_keys("a.example")
        self.assertEqual(keys["ed25519:k"].verify_key_bytes, K1)
        self.assertIn("stale in-memory answer", logs.output[0])
        with self.assertRaises(StorageUnavailableError):
            await cache.get_server_keys("b.example")


class PostgresUnavailableTests(TestCase):
    """A PostgreSQL store whose server cannot be reached (no server needed)."""

    async def test_closed_port_raises_unavailable(self) -> None:
        """Connecting to a closed port raises StorageUnavailableError, not a crash."""
        postgres_driver_or_skip(self)
        from keyring_module.storage.postgres import PostgresKeyStore

        store = PostgresKeyStore(
            "host=127.0.0.1 port=%d dbname=nothing user=nobody connect_timeout=2"
            % closed_loopback_port(),
            global_reactor(),
        )
        self.addCleanup(store.close)
        with self.assertRaisesRegex(StorageUnavailableError, "PostgreSQL database unavailable"):
            await store.migrate()
        with self.assertRaises(StorageUnavailableError):
            await store.get_server_keys("a.example")


class _ControlledStore(InMemoryKeyStore):
    """An in-memory backend that counts reads, can fail, and can hold reads open."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, tuple[str, ...]]] = []
        self.fail = False
        self.gate: Optional["Deferred[None]"] = None

    async def _read(self, what: str, names: Sequence[str]) -> None:
        self.reads.append((what, tuple(sorted(names))))
        if self.fail:
            raise StorageUnavailableError("database down")

    async def _hold(self) -> None:
        if self.gate is not None:
            await self.gate

    async def get_server_keys(self, server_name, key_ids=None):  # type: ignore[no-untyped-def]
        await self._read("keys", [server_name])
        result = await super().get_server_keys(server_name, key_ids)
        await self._hold()  # answer from before the hold, like a slow query
        return result

    async def get_many_server_keys(self, server_names):  # type: ignore[no-untyped-def]
        await self._read("many", list(server_names))
        result = await super().get_many_server_keys(server_names)
        await self._hold()
        return result

    async def get_server_responses(self, server_name):  # type: ignore[no-untyped-def]
        await self._read("responses", [server_name])
        result = await super().get_server_responses(server_name)
        await self._hold()
        return result

    async def get_many_server_responses(self, server_names):  # type: ignore[no-untyped-def]
        await self._read("many responses", list(server_names))
        result = await super().get_many_server_responses(server_names)
        await self._hold()
        return result


class CachedKeyStoreTests(SynchronousTestCase):
    """``CachedKeyStore``: TTL, LRU bound, invalidation and stale answers."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.backend = _ControlledStore()

    def cache(
        self, max_entries: int = 100, ttl_ms: int = 10_000, max_bytes: Optional[int] = None
    ) -> CachedKeyStore:
        return CachedKeyStore(
            self.backend, self.clock, max_entries=max_entries, ttl_ms=ttl_ms, max_bytes=max_bytes
        )

    def result(self, coro: Any) -> Any:
        return self.successResultOf(ensureDeferred(coro))

    def put(self, server_name: str, valid_until_ts: int, keys: dict[str, bytes]) -> None:
        """Store straight into the backend, as another process would."""
        self.result(
            self.backend.store_server_keys(
                make_response(server_name, valid_until_ts, keys), "origin", valid_until_ts
            )
        )

    def test_entries_expire_after_ttl(self) -> None:
        """Another process's write is seen once the entry is older than the TTL."""
        cache = self.cache(ttl_ms=10_000)
        self.put("a.example", 1000, {"ed25519:a": K1})
        self.assertEqual(list(self.result(cache.get_server_keys("a.example"))), ["ed25519:a"])
        self.put("a.example", 2000, {"ed25519:b": K2})
        self.clock.advance(9.9)
        self.assertEqual(list(self.result(cache.get_server_keys("a.example"))), ["ed25519:a"])
        self.assertEqual(len(self.backend.reads), 1)
        self.clock.advance(0.2)
        keys = self.result(cache.get_server_keys("a.example"))
        self.assertEqual(sorted(keys), ["ed25519:a", "ed25519:b"])
        self.assertEqual(len(self.backend.reads), 2)

    def test_answers_are_copies(self) -> None:
        """Changing a returned dict or list does not change the cached entry."""
        cache = self.cache()
        self.put("a.example", 1000, {"ed25519:a": K1})
        self.result(cache.get_server_keys("a.example")).clear()
        self.result(cache.get_many_server_keys(["a.example"]))["a.example"].clear()
        self.result(cache.get_server_responses("a.example")).clear()
        self.result(cache.get_many_server_responses(["a.example"]))["a.example"].clear()
        self.assertEqual(list(self.result(cache.get_server_keys("a.example"))), ["ed25519:a"])
        self.assertEqual(len(self.result(cache.get_server_responses("a.example"))), 1)

    def test_lru_bound(self) -> None:
        """At most max_entries servers are kept, the least recently used dropped first."""
        cache = self.cache(max_entries=2)
        for name in ("a", "b", "a", "c"):
            self.result(cache.get_server_keys(name))
        self.assertEqual(len(cache), 2)
        self.assertEqual(self.backend.reads, [("keys", ("a",)), ("keys", ("b",)), ("keys", ("c",))])
        self.result(cache.get_server_keys("a"))
        self.assertEqual(len(self.backend.reads), 3)
        self.result(cache.get_server_keys("b"))
        self.assertEqual(self.backend.reads[-1], ("keys", ("b",)))

    def put_padded(self, server_name: str, padding: int) -> None:
        """Store a response of about ``padding`` bytes for ``server_name``."""
        response = make_response(server_name, 1000, {"ed25519:a": K1}, extra={"p": "x" * padding})
        self.result(self.backend.store_server_keys(response, "origin", 1))

    def test_bounded_in_bytes(self) -> None:
        """The servers kept hold at most max_bytes, the least recently used dropped first."""
        cache = self.cache(max_bytes=35_000)
        for name in ("a", "b", "c", "d"):
            self.put_padded(name, 10_000)
            self.result(cache.get_server_keys(name))
            self.result(cache.get_server_responses(name))
            self.assertLessEqual(cache.total_bytes, 35_000)
        self.assertEqual(len(cache), 3)
        self.assertGreater(cache.total_bytes, 30_000)
        reads = len(self.backend.reads)
        self.result(cache.get_server_responses("b"))
        self.assertEqual(len(self.backend.reads), reads, "b is still kept")
        self.result(cache.get_server_responses("a"))
        self.assertEqual(self.backend.reads[-1], ("responses", ("a",)), "a was dropped")

    def test_counted_bytes_cover_the_memory_held(self) -> None:
        """What the cache counts is at least what its entries really hold (measured with
        tracemalloc), so that ``database.cache_size`` bounds the memory used."""

        class FreshRows:
            """A backend answering with new objects each time, as a database does."""

            async def get_many_server_keys(self, names: Any) -> Any:
                return {
                    name: {
                        key_id: StoredKey(
                            name,
                            key_id,
                            os.urandom(32),
                            10**12,
                            None,
                            10**12,
                            "origin",
                            os.urandom(32).hex(),
                        )
                        for key_id in ("ed25519:a", "ed25519:b")
                    }
                    for name in names
                }

        cache = CachedKeyStore(FreshRows(), self.clock, max_entries=10_000, ttl_ms=10_000)  # type: ignore[arg-type]
        names = ["server%d.example.org" % i for i in range(2000)]
        gc.collect()
        tracemalloc.start()
        try:
            self.result(cache.get_many_server_keys(names))
            gc.collect()
            held, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertEqual(len(cache), 2000)
        self.assertGreaterEqual(cache.total_bytes, held)

    def test_server_over_the_budget_is_not_kept(self) -> None:
        """A server whose data alone is over max_bytes is read from the backend each time."""
        cache = self.cache(max_bytes=5_000)
        self.put_padded("a", 10_000)
        for _ in range(3):
            self.assertEqual(len(self.result(cache.get_server_responses("a"))), 1)
        self.assertEqual(len(self.backend.reads), 3)
        self.assertEqual((len(cache), cache.total_bytes), (0, 0))

    def test_write_through_cache_is_read_back_at_once(self) -> None:
        """A write through the cache expires that server's keys and responses."""
        cache = self.cache()
        self.put("a.example", 1000, {"ed25519:a": K1})
        self.result(cache.get_server_keys("a.example"))
        self.assertEqual(len(self.result(cache.get_server_responses("a.example"))), 1)
        r2 = make_response("a.example", 2000, {"ed25519:b": K2})
        self.result(cache.store_server_keys(r2, "origin", 5))
        self.assertEqual(
            sorted(self.result(cache.get_server_keys("a.example"))), ["ed25519:a", "ed25519:b"]
        )
        self.assertEqual(len(self.result(cache.get_server_responses("a.example"))), 2)

    def test_read_overlapping_a_write_is_not_cached(self) -> None:
        """A read that started before a write finished is answered but not remembered."""
        cache = self.cache()
        self.put("a.example", 1000, {"ed25519:a": K1})
        gate: Deferred[None] = Deferred()
        self.backend.gate = gate
        slow_read: Deferred[Any] = ensureDeferred(cache.get_server_keys("a.example"))
        self.backend.gate = None
        r2 = make_response("a.example", 2000, {"ed25519:b": K2})
        self.result(cache.store_server_keys(r2, "origin", 5))
        gate.callback(None)
        self.assertEqual(list(self.successResultOf(slow_read)), ["ed25519:a"])
        self.assertEqual(
            sorted(self.result(cache.get_server_keys("a.example"))), ["ed25519:a", "ed25519:b"]
        )

    def test_many_uses_and_fills_the_cache(self) -> None:
        """get_many_server_keys asks the backend only for servers not freshly cached."""
        cache = self.cache()
        self.put("a.example", 1000, {"ed25519:a": K1})
        self.put("b.example", 1000, {"ed25519:b": K2})
        self.result(cache.get_server_keys("a.example"))
        found = self.result(cache.get_many_server_keys(["a.example", "b.example", "c.example"]))
        self.assertEqual(sorted(found), ["a.example", "b.example"])
        self.assertEqual(self.backend.reads[-1], ("many", ("b.example", "c.example")))
        reads = len(self.backend.reads)
        self.result(cache.get_many_server_keys(["a.example", "b.example", "c.example"]))
        self.result(cache.get_server_keys("c.example"))
        self.assertEqual(len(self.backend.reads), reads)

    def test_many_responses_use_and_fill_the_cache(self) -> None:
        """get_many_server_responses asks the backend once, only for the servers whose
        responses are not freshly cached, and what it reads answers later reads."""
        cache = self.cache()
        for name, key in (("a.example", K1), ("b.example", K2), ("c.example", K3)):
            self.put(name, 1000, {"ed25519:k": key})
        self.result(cache.get_server_responses("a.example"))
        found = self.result(
            cache.get_many_server_responses(["c.example", "a.example", "b.example", "u.example"])
        )
        self.assertEqual(sorted(found), ["a.example", "b.example", "c.example"])
        self.assertEqual(
            self.backend.reads[-1], ("many responses", ("b.example", "c.example", "u.example"))
        )
        self.assertEqual(
            [r.json_bytes for r in found["b.example"]],
            [r.json_bytes for r in self.result(self.backend.get_server_responses("b.example"))],
        )
        reads = len(self.backend.reads)
        self.result(cache.get_many_server_responses(["a.example", "b.example", "c.example"]))
        self.assertEqual(len(self.result(cache.get_server_responses("c.example"))), 1)
        self.assertEqual(len(self.backend.reads), reads, "answered from the cache")
        self.clock.advance(11)
        self.result(cache.get_many_server_responses(["a.example", "b.example"]))
        self.assertEqual(self.backend.reads[-1], ("many responses", ("a.example", "b.example")))

    def test_many_responses_overlapping_a_write_are_not_cached(self) -> None:
        """A batch read that started before a write of one of its servers finished is
        answered, but only the other servers' responses are remembered."""
        cache = self.cache()
        self.put("a.example", 1000, {"ed25519:a": K1})
        self.put("b.example", 1000, {"ed25519:b": K2})
        gate: Deferred[None] = Deferred()
        self.backend.gate = gate
        slow_read = ensureDeferred(cache.get_many_server_responses(["a.example", "b.example"]))
        self.backend.gate = None
        r2 = make_response("a.example", 2000, {"ed25519:c": K3})
        self.result(cache.store_server_keys(r2, "origin", 5))
        gate.callback(None)
        self.assertEqual(
            {name: len(r) for name, r in self.successResultOf(slow_read).items()},
            {"a.example": 1, "b.example": 1},
        )
        found = self.result(cache.get_many_server_responses(["a.example", "b.example"]))
        self.assertEqual(len(found["a.example"]), 2)
        self.assertEqual(self.backend.reads[-1], ("responses", ("a.example",)))

    def test_many_responses_failure_serves_stale_entries(self) -> None:
        """If the backend fails, a batch read serves the expired entries it has (with a
        warning), and raises when a server has none."""
        cache = self.cache()
        self.put("a.example", 1000, {"ed25519:a": K1})
        self.put("b.example", 1000, {"ed25519:b": K2})
        self.result(cache.get_many_server_responses(["a.example", "b.example"]))
        self.clock.advance(3600)
        self.backend.fail = True
        with self.assertLogs("keyring_module.storage.cache", "WARNING") as logs:
            found = self.result(cache.get_many_server_responses(["a.example", "b.example"]))
        self.assertEqual(sorted(found), ["a.example", "b.example"])
        self.assertIn("stale in-memory answer", logs.output[0])
        self.assertEqual(self.backend.reads[-1], ("many responses", ("a.example", "b.example")))
        with self.assertLogs("keyring_module.storage.cache", "WARNING"):
            self.failureResultOf(
                ensureDeferred(cache.get_many_server_responses(["a.example", "c.example"])),
                StorageUnavailableError,
            )

    def test_failure_serves_stale_entry(self) -> None:
        """If the backend fails, an expired entry is served with a warning."""
        cache = self.cache()
        self.put("a.example", 1000, {"ed25519:a": K1})
        self.result(cache.get_server_keys("a.example"))
        self.result(cache.get_server_responses("a.example"))
        self.clock.advance(3600)
        self.backend.fail = True
        with self.assertLogs("keyring_module.storage.cache", "WARNING") as logs:
            self.assertEqual(list(self.result(cache.get_server_keys("a.example"))), ["ed25519:a"])
            self.assertEqual(len(self.result(cache.get_server_responses("a.example"))), 1)
            found = self.result(cache.get_many_server_keys(["a.example"]))
        self.assertEqual(list(found), ["a.example"])
        self.assertIn("stale in-memory answer", logs.output[0])
        self.assertEqual(len(self.backend.reads), 5)  # the backend was asked each time

    def test_failure_without_entry_raises(self) -> None:
        """If the backend fails and nothing is cached, the error is raised."""
        cache = self.cache()
        self.put("a.example", 1000, {"ed25519:a": K1})
        self.result(cache.get_server_keys("a.example"))
        self.backend.fail = True
        for coro in (
            cache.get_server_keys("b.example"),
            cache.get_server_responses("a.example"),
            cache.get_many_server_keys(["a.example", "b.example"]),
            cache.get_many_server_responses(["a.example", "b.example"]),
        ):
            self.failureResultOf(ensureDeferred(coro), StorageUnavailableError)

    def test_unknown_servers_do_not_push_out_cached_keys(self) -> None:
        """A batch of servers the store has no keys for leaves the cached servers with
        keys in place; the unknown names are remembered apart, a bounded number of them."""
        cache = self.cache(max_entries=10)
        self.put("a.example", 1000, {"ed25519:a": K1})
        self.result(cache.get_server_keys("a.example"))
        unknown = ["u%d.example" % i for i in range(100)]
        self.assertEqual(self.result(cache.get_many_server_keys(unknown)), {})
        self.assertEqual(len(cache), 11)  # a.example and the 10 most recent unknown names
        reads = len(self.backend.reads)
        self.assertEqual(list(self.result(cache.get_server_keys("a.example"))), ["ed25519:a"])
        self.assertEqual(self.result(cache.get_many_server_keys(unknown[-10:])), {})
        self.assertEqual(len(self.backend.reads), reads, "answered from the cache")
        # A write makes a server known at once.
        r = make_response("u99.example", 1000, {"ed25519:u": K2})
        self.result(cache.store_server_keys(r, "origin", 1))
        self.assertEqual(list(self.result(cache.get_server_keys("u99.example"))), ["ed25519:u"])

    def test_disabled_cache_always_asks(self) -> None:
        """With max_entries=0 every read goes to the backend."""
        cache = self.cache(max_entries=0)
        for _ in range(3):
            self.result(cache.get_server_keys("a.example"))
        self.assertEqual(len(self.backend.reads), 3)
        self.assertEqual(len(cache), 0)


class OpenKeyStoreTests(TestCase):
    """``open_key_store`` builds, migrates and wraps the configured backend."""

    async def test_sqlite(self) -> None:
        """The default backend opens a migrated SQLite file behind a cache."""
        path = self.mktemp()
        store = await open_key_store(DatabaseConfig(path=path), Clock(), global_reactor())
        self.addCleanup(store.close)
        self.assertIsInstance(store, CachedKeyStore)
        self.assertIsInstance(store.store, SqliteKeyStore)
        await store.store_server_keys(make_response("a.example", 1000, {"ed25519:k": K1}), "o", 1)
        self.assertEqual(list(await store.get_server_keys("a.example")), ["ed25519:k"])
        await store.check_health()

    async def test_cache_size_reaches_the_cache(self) -> None:
        """database.cache_size bounds the in-memory cache in front of the backend."""
        for cache_size, kept in ((0, 0), (1 << 20, 1)):
            config = DatabaseConfig(path=self.mktemp(), cache_size=cache_size)
            store = await open_key_store(config, Clock(), global_reactor())
            self.addCleanup(store.close)
            await store.store_server_keys(
                make_response("a.example", 1000, {"ed25519:k": K1}), "o", 1
            )
            await store.get_server_keys("a.example")
            self.assertEqual(len(store), kept)

    async def test_schema_too_new(self) -> None:
        """A too-new database is refused at open time."""
        path = self.mktemp()
        store = await open_key_store(DatabaseConfig(path=path), Clock(), global_reactor())
        await store.close()
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("UPDATE schema_version SET version = 99")
        conn.close()
        with self.assertRaisesRegex(SchemaTooNewError, "version 99 is newer"):
            await open_key_store(DatabaseConfig(path=path), Clock(), global_reactor())

    async def test_bad_backend(self) -> None:
        """An unknown backend, or postgres without a dsn, is a StorageError."""
        with self.assertRaisesRegex(StorageError, "unknown database backend 'mysql'"):
            await open_key_store(DatabaseConfig(backend="mysql"), Clock(), global_reactor())
        with self.assertRaisesRegex(StorageError, "needs a dsn"):
            await open_key_store(DatabaseConfig(backend="postgres"), Clock(), global_reactor())
