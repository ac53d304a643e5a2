"""How long shared limit rows are kept (:func:`~keyring_module.storage.flight_rows.limits_keep_ms`):
until their bucket has refilled and their longest backoff passed, as configured; the
wiring gives the store's coordination the configured time."""

import os

from prometheus_client import CollectorRegistry
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from keyring_module.blocking import run_inline
from keyring_module.clock import global_reactor
from keyring_module.config import RateLimitConfig, parse_config
from keyring_module.metrics import Metrics
from keyring_module.shared_limits import SharedOriginLimits
from keyring_module.storage.flight_rows import LIMITS_KEEP_MS, keep_limits_for, limits_keep_ms
from keyring_module.storage.sqlite import SqliteKeyStore
from keyring_module.storage.sqlite_coordination import SqliteCoordination
from keyring_module.wiring import Fetching
from tests.fake_reactors import FakeReactor
from tests.fakes import FakeFederationClient

#: Refills in 2 x 1 s, backs off at most 5 s: rows carry nothing 7 s after their use.
CONFIG = RateLimitConfig(
    origin_burst=2,
    origin_interval_ms=1000,
    failure_backoff_initial_ms=1000,
    failure_backoff_max_ms=5000,
)


class LimitRowsKeepTests(TestCase):
    def setUp(self) -> "defer.Deferred[None]":  # type: ignore[override]  # trial waits
        return defer.ensureDeferred(self.set_up())

    async def set_up(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.store = SqliteKeyStore(os.path.abspath(self.mktemp()) + ".db", global_reactor())
        self.addCleanup(self.store.close)
        await self.store.migrate()
        self.coordination = SqliteCoordination(
            self.store, self.clock, lease_ms=10_000, poll_interval_ms=100
        )
        self.addCleanup(self.coordination.close)

    async def targets(self) -> set[str]:
        rows = await self.store.run(
            "read", lambda txn: txn.execute("SELECT target FROM origin_limits").fetchall()
        )
        return {row[0] for row in rows}

    def test_the_keep_is_the_refill_plus_the_longest_backoff(self) -> None:
        self.assertEqual(limits_keep_ms(CONFIG), 2 * 1000 + 5000)
        self.assertEqual(LIMITS_KEEP_MS, limits_keep_ms(RateLimitConfig()))

    async def test_a_row_goes_once_the_configured_keep_passed(self) -> None:
        """Kept 7 s (not the default's 70 minutes): a row used just under 7 s ago
        stays, one used over 7 s ago goes with the next write."""
        keep_limits_for(self.coordination, CONFIG)
        limits = SharedOriginLimits(self.coordination, self.clock, CONFIG, lambda: 0.5)
        await limits.take("once.example")
        self.clock.advance(limits_keep_ms(CONFIG) / 1000 - 1)
        await limits.take("recent.example")
        self.assertEqual(await self.targets(), {"once.example", "recent.example"})
        self.clock.advance(2)
        await limits.take("later.example")
        self.assertEqual(await self.targets(), {"recent.example", "later.example"})

    def test_the_wiring_gives_the_coordination_the_configured_keep(self) -> None:
        config = parse_config(
            {
                "signing_key_path": "unused",
                "ratelimit": {"origin_burst": 3, "origin_interval": "2s"},
            },
            standalone=False,
        )
        self.store.coordination = self.coordination  # type: ignore[attr-defined]
        Fetching.build(
            FakeReactor(),
            config,
            self.store,
            client=FakeFederationClient({}),
            metrics=Metrics(CollectorRegistry()),
            run_blocking=run_inline,
        )
        self.assertEqual(
            self.coordination.limits_keep_ms, 3 * 2000 + config.ratelimit.failure_backoff_max_ms
        )
