"""Tests for :mod:`keyring_module.gc_policy`: collection driven by the reactor."""

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.gc_policy import ReactorGarbageCollector


class FakeGc:
    """Records what the policy asks of the ``gc`` module; counts are set by the test."""

    def __init__(self) -> None:
        self.counts = (0, 0, 0)
        self.thresholds = (700, 10, 10)
        self.calls: list[Any] = []

    def get_count(self) -> tuple[int, int, int]:
        return self.counts

    def get_threshold(self) -> tuple[int, int, int]:
        return self.thresholds

    def collect(self, generation: int) -> int:
        self.calls.append(("collect", generation))
        return 0

    def freeze(self) -> None:
        self.calls.append("freeze")

    def disable(self) -> None:
        self.calls.append("disable")

    def enable(self) -> None:
        self.calls.append("enable")


class ReactorGarbageCollectorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.gc = FakeGc()
        self.collector = ReactorGarbageCollector(self.clock, 0.1, gc_module=self.gc)

    def test_start_freezes_and_disables_stop_enables(self) -> None:
        """Start-up objects are frozen and automatic collection is off until stop."""
        self.collector.start()
        self.assertEqual(self.gc.calls, ["freeze", "disable"])
        self.collector.stop()
        self.assertEqual(self.gc.calls[-1], "enable")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_collects_the_oldest_generation_due_on_the_reactor(self) -> None:
        """Each tick collects the oldest generation over its threshold, and nothing when
        none is."""
        self.collector.start()
        self.clock.advance(0.1)
        self.assertEqual(self.gc.calls, ["freeze", "disable"])
        self.gc.counts = (701, 11, 3)
        self.clock.advance(0.1)
        self.assertEqual(self.gc.calls[-1], ("collect", 1))
        self.gc.counts = (701, 11, 11)
        self.clock.advance(0.1)
        self.assertEqual(self.gc.calls[-1], ("collect", 2))
        self.gc.counts = (701, 0, 0)
        self.clock.advance(0.1)
        self.assertEqual(self.gc.calls[-1], ("collect", 0))
        self.assertEqual(sum(1 for c in self.gc.calls if c[0] == "collect"), 3)

    def test_each_generation_waits_its_minimum_interval(self) -> None:
        """A generation over its threshold is collected again only once 1 s, 10 s or 30 s
        (generations 0, 1, 2) have passed since its last collection, as in Synapse."""
        self.collector.start()
        for generation, interval_s in ((0, 1.0), (1, 10.0), (2, 30.0)):
            counts = [0, 0, 0]
            counts[generation] = 10_000
            self.gc.counts = (counts[0], counts[1], counts[2])
            self.gc.calls.clear()
            self.clock.advance(0.1)
            self.assertEqual(self.gc.calls, [("collect", generation)])
            # Still over its threshold: ticks until just before the interval collect nothing.
            for _ in range(round(interval_s / 0.1) - 1):
                self.clock.advance(0.1)
            self.assertEqual(self.gc.calls, [("collect", generation)])
            self.clock.advance(0.1)
            self.assertEqual(self.gc.calls, [("collect", generation)] * 2)

    def test_younger_generation_is_collected_while_an_older_one_waits(self) -> None:
        """While generation 2 waits out its interval, a due generation 1 is collected instead."""
        self.collector.start()
        self.gc.counts = (0, 0, 11)
        self.clock.advance(0.1)
        self.assertEqual(self.gc.calls[-1], ("collect", 2))
        self.gc.counts = (0, 11, 11)
        self.clock.advance(0.1)
        self.assertEqual(self.gc.calls[-1], ("collect", 1))

    def test_minimum_intervals_are_configurable(self) -> None:
        """Given intervals replace Synapse's: with 0.5 s for generation 0 it runs twice a second."""
        collector = ReactorGarbageCollector(
            self.clock, 0.1, gc_module=self.gc, min_seconds_between=(0.5, 10.0, 30.0)
        )
        collector.start()
        self.gc.counts = (701, 0, 0)
        self.clock.pump([0.1] * 10)
        self.assertEqual(self.gc.calls.count(("collect", 0)), 2)
        collector.stop()
