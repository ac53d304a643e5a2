"""The per-origin token bucket and backoff shared by processes on one database
(:mod:`keyring_module.shared_limits`): the rules on a fake clock, then two processes
on one SQLite file."""

import os

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from keyring_module.clock import global_reactor
from keyring_module.config import RateLimitConfig
from keyring_module.http import ConnectError, HttpStatusError
from keyring_module.ratelimit import BackedOffError, RateLimitedError
from keyring_module.shared_limits import LimitRules, SharedOriginLimits
from keyring_module.storage.coordination import LimitState
from keyring_module.storage.sqlite import SqliteKeyStore
from keyring_module.storage.sqlite_coordination import SqliteCoordination

CONFIG = RateLimitConfig(
    origin_burst=2,
    origin_interval_ms=60_000,
    failure_backoff_initial_ms=30_000,
    failure_backoff_max_ms=3_600_000,
)


class LimitRulesTests(SynchronousTestCase):
    """The updates applied to an origin's shared row."""

    def setUp(self) -> None:
        self.rules = LimitRules(CONFIG, random=lambda: 0.5)  # no jitter

    def test_tokens_are_spent_then_refused_then_regained(self) -> None:
        """Burst tokens, then the wait for the next one, which comes back with time."""
        state, answer = self.rules.take(0)(None)
        self.assertEqual(answer, 0)
        state, answer = self.rules.take(0)(state)
        self.assertEqual(answer, 0)
        assert state is not None
        self.assertEqual(self.rules.take(0)(state)[1], 60_000)
        self.assertEqual(self.rules.take(45_000)(state)[1], 15_000)
        self.assertEqual(self.rules.take(60_000)(state)[1], 0)

    def test_an_unreachable_origin_is_backed_off_and_a_success_ends_it(self) -> None:
        """Failures back off exponentially; while backed off, take answers minus the
        rest of the backoff; a success ends the streak, and a state that behaves as a
        fresh one is dropped (None)."""
        state, delay = self.rules.record(0, unreachable=True)(None)
        self.assertEqual(delay, 30_000)
        self.assertEqual(self.rules.take(10_000)(state)[1], -20_000)
        state, delay = self.rules.record(30_000, unreachable=True)(state)
        self.assertEqual(delay, 60_000)
        assert state is not None
        self.assertEqual((state.failures, state.backoff_until_ts), (2, 90_000))
        self.assertIsNone(self.rules.record(100_000, unreachable=False)(state)[0])

    def test_a_partly_spent_bucket_is_kept(self) -> None:
        """A success with tokens still missing keeps the row (the bucket matters)."""
        spent = LimitState(tokens=1.0, tokens_ts=0)
        state, _ = self.rules.record(1000, unreachable=False)(spent)
        self.assertEqual(state, spent)


class SharedAcrossProcessesTests(TestCase):
    """Two processes on one SQLite file spend one bucket and share one backoff."""

    def setUp(self) -> "defer.Deferred[None]":  # type: ignore[override]  # trial waits
        return defer.ensureDeferred(self.set_up())

    async def set_up(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        path = os.path.abspath(self.mktemp()) + ".db"
        self.limits = []
        for _ in range(2):
            store = SqliteKeyStore(path, global_reactor())
            await store.migrate()
            self.addCleanup(store.close)
            coordination = SqliteCoordination(
                store, self.clock, lease_ms=10_000, poll_interval_ms=100
            )
            self.limits.append(SharedOriginLimits(coordination, self.clock, CONFIG, lambda: 0.5))

    async def test_the_processes_spend_one_bucket(self) -> None:
        """Burst 2: one token each, then both are refused, whatever the spelling."""
        a, b = self.limits
        await a.take("example.org")
        await b.take("Example.ORG.")
        with self.assertRaises(RateLimitedError):
            await a.take("example.org")
        with self.assertRaises(RateLimitedError):
            await b.take("example.org")

    async def test_one_process_finding_an_origin_unreachable_backs_it_off_for_all(
        self,
    ) -> None:
        """An unreachable origin recorded by one process is refused by the other; an
        origin that answered badly is not backed off."""
        a, b = self.limits
        await a.take("down.example")
        await a.record("down.example", ConnectError("refused"))
        with self.assertRaises(BackedOffError) as raised:
            await b.take("down.example")
        self.assertEqual(raised.exception.retry_after_ms, 30_000)
        await a.take("up.example")
        await a.record("up.example", HttpStatusError(500))
        await b.take("up.example")

    async def test_rows_untouched_for_long_go(self) -> None:
        """A token taken from an origin never fetched again leaves a row; once
        ``LIMITS_KEEP_MS`` has passed, the next write elsewhere drops it (the table
        stays bounded by what that time of fetches can leave), while a recent row
        stays."""
        from keyring_module.storage.flight_rows import LIMITS_KEEP_MS

        a, _ = self.limits
        store = a._coordination._store  # type: ignore[attr-defined]

        async def targets() -> set[str]:
            rows = await store.run(
                "read", lambda txn: txn.execute("SELECT target FROM origin_limits").fetchall()
            )
            return {row[0] for row in rows}

        await a.take("once.example")
        self.clock.advance(LIMITS_KEEP_MS / 1000 - 1)
        await a.take("recent.example")
        self.assertEqual(await targets(), {"once.example", "recent.example"})
        self.clock.advance(2)
        await a.take("later.example")
        self.assertEqual(await targets(), {"recent.example", "later.example"})
