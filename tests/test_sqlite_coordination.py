"""SQLite coordination (:mod:`keyring_module.storage.sqlite_coordination`): two stores
on one file stand for two processes; lease times come from a fake clock."""

import os

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from keyring_module.clock import global_reactor, now_ms
from keyring_module.storage.coordination import OUTCOME_OK, FlightOutcome
from keyring_module.storage.sqlite import KEPT_CHANGES, SqliteKeyStore
from keyring_module.storage.sqlite_coordination import SqliteCoordination
from tests.storage_writer import make_response

LEASE_MS = 5000


class SqliteCoordinationTests(TestCase):
    """Leases, outcomes and the change feed between two processes on one file."""

    def setUp(self) -> "defer.Deferred[None]":  # type: ignore[override]  # trial waits
        return defer.ensureDeferred(self.set_up())

    async def set_up(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        path = os.path.join(os.path.abspath(self.mktemp()) + ".db")
        self.store_a, self.a = await self.process(path)
        self.store_b, self.b = await self.process(path)

    async def process(self, path: str) -> tuple[SqliteKeyStore, SqliteCoordination]:
        store = SqliteKeyStore(path, global_reactor())
        await store.migrate()
        coordination = SqliteCoordination(
            store, self.clock, lease_ms=LEASE_MS, poll_interval_ms=100
        )
        self.addCleanup(store.close)
        self.addCleanup(coordination.close)
        return store, coordination

    async def test_one_holder_at_a_time_until_the_lease_runs_out(self) -> None:
        """The second process is refused while the first's lease runs (told how long
        it has left), and takes the flight once the lease ran out unrenewed."""
        self.assertTrue((await self.a.try_acquire("example.org")).acquired)
        self.clock.advance(1)
        refused = await self.b.try_acquire("example.org")
        self.assertEqual((refused.acquired, refused.retry_ms), (False, 1000))  # at most 1 s
        self.clock.advance(3)
        refused = await self.b.try_acquire("example.org")
        self.assertEqual((refused.acquired, refused.retry_ms), (False, LEASE_MS - 4000))
        self.clock.advance(LEASE_MS / 1000 - 4)
        self.assertTrue((await self.b.try_acquire("example.org")).acquired)
        self.assertFalse((await self.a.try_acquire("example.org")).acquired)

    async def test_renewing_keeps_the_lease(self) -> None:
        """A renewed lease holds the other process back for another lease from then."""
        await self.a.try_acquire("example.org")
        self.clock.advance(LEASE_MS / 1000 - 1)
        await self.a.renew("example.org")
        self.clock.advance(2)
        self.assertFalse((await self.b.try_acquire("example.org")).acquired)

    async def test_finishing_shares_the_outcome_and_frees_the_flight(self) -> None:
        """The outcome is readable by the other process, and the flight is free."""
        await self.a.try_acquire("example.org")
        outcome = FlightOutcome(now_ms(self.clock), self.a.holder_id, OUTCOME_OK, "ok", "", b"{}")
        await self.a.finish("example.org", outcome)
        self.assertEqual(await self.b.read_outcome("example.org"), outcome)
        self.assertTrue((await self.b.try_acquire("example.org")).acquired)

    async def test_outcomes_long_over_go_as_new_ones_are_written(self) -> None:
        """An outcome (with the origin's answer in it) is kept OUTCOME_KEEP_MS, then
        dropped by a later flight's write: the table holds minutes of flights, not
        every name ever fetched."""
        from keyring_module.storage.flight_rows import OUTCOME_KEEP_MS

        async def finish(name: str) -> FlightOutcome:
            await self.a.try_acquire(name)
            outcome = FlightOutcome(
                now_ms(self.clock), self.a.holder_id, OUTCOME_OK, "ok", "", b"{}"
            )
            await self.a.finish(name, outcome)
            return outcome

        await finish("old.example")
        self.clock.advance(OUTCOME_KEEP_MS / 1000 - 1)
        recent = await finish("recent.example")
        self.assertIsNotNone(await self.b.read_outcome("old.example"))
        self.clock.advance(2)
        await finish("new.example")
        self.assertIsNone(await self.b.read_outcome("old.example"))
        self.assertEqual(await self.b.read_outcome("recent.example"), recent)

    async def test_a_late_holder_does_not_free_the_next_holders_lease(self) -> None:
        """A holder whose lease ran out writes its outcome, but the lease the other
        process took meanwhile stays held."""
        await self.a.try_acquire("example.org")
        self.clock.advance(LEASE_MS / 1000)
        await self.b.try_acquire("example.org")
        await self.a.finish(
            "example.org", FlightOutcome(now_ms(self.clock), self.a.holder_id, OUTCOME_OK, "ok", "")
        )
        self.assertFalse((await self.a.try_acquire("example.org")).acquired)

    async def test_a_write_elsewhere_is_told_at_the_next_poll(self) -> None:
        """A store of a server's keys by the other process drops that server at the
        next poll, and wakes the flights waiting meanwhile; this process's own writes,
        and polls with nothing new, tell nothing."""
        changed: list[object] = []
        self.b.on_keys_changed = changed.append
        await self.b.poll()  # where the feed is
        response = make_response("example.org", now_ms(self.clock) + 1000, {"ed25519:a": b"k" * 32})
        await self.store_b.store_server_keys(response, "origin", now_ms(self.clock))
        await self.b.poll()
        self.assertEqual(changed, [])
        woken = self.b.watch("example.org")
        await self.store_a.store_server_keys(response, "origin", now_ms(self.clock))
        self.assertFalse(woken.called)
        await self.b.poll()
        self.assertEqual(changed, ["example.org"])
        self.assertTrue(woken.called)
        await self.b.poll()
        self.assertEqual(changed, ["example.org"])

    async def test_a_forget_elsewhere_is_told_at_the_next_poll(self) -> None:
        """``keyring-module keys forget`` in another process drops the server from a
        running one's cache at its next poll; a forget that removed nothing tells nothing."""
        changed: list[object] = []
        self.b.on_keys_changed = changed.append
        response = make_response("example.org", now_ms(self.clock) + 1000, {"ed25519:a": b"k" * 32})
        await self.store_b.store_server_keys(response, "origin", now_ms(self.clock))
        await self.b.poll()
        await self.store_a.forget_server_keys("unknown.example")
        await self.b.poll()
        self.assertEqual(changed, [])
        await self.store_a.forget_server_keys("example.org")
        await self.b.poll()
        self.assertEqual(changed, ["example.org"])

    async def test_too_many_writes_between_polls_drop_everything(self) -> None:
        """When the feed moved on by more than the kept rows between two polls, every
        cached server is dropped (None)."""
        changed: list[object] = []
        self.b.on_keys_changed = changed.append
        await self.b.poll()

        def flood(txn: object) -> None:
            for _ in range(KEPT_CHANGES + 5):
                txn.execute("INSERT INTO key_changes (server_name) VALUES ('x')")  # type: ignore[attr-defined]
            txn.execute(  # type: ignore[attr-defined]
                "DELETE FROM key_changes WHERE seq <= (SELECT MAX(seq) FROM key_changes) - %d"
                % KEPT_CHANGES
            )

        await self.store_a.run("flood", flood)
        await self.b.poll()
        self.assertEqual(changed, [None])

    async def test_closing_gives_every_lease_back(self) -> None:
        """A process stopping cleanly frees its flights at once."""
        await self.a.try_acquire("example.org")
        await self.a.close()
        self.assertTrue((await self.b.try_acquire("example.org")).acquired)
