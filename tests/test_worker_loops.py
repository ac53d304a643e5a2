"""A worker's every-second loops (metrics refresh, heartbeat) log their failures."""

import logging

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from keyring_module.worker import start_logged_loop


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class LoggedLoopTests(TestCase):
    def setUp(self) -> None:
        handler = _Records()
        self.records = handler.records
        worker_logger = logging.getLogger("keyring_module.worker")
        worker_logger.addHandler(handler)
        self.addCleanup(worker_logger.removeHandler, handler)
        self.clock = Clock()

    def test_a_failing_refresh_is_logged_with_its_traceback(self) -> None:
        """A call that raises on its third run is logged once, as an error naming the
        loop, the exception and where it was raised; the loop stops."""
        runs: list[float] = []

        def refresh() -> None:
            runs.append(self.clock.seconds())
            if len(runs) == 3:
                raise RuntimeError("gauge callback broke")

        loop = start_logged_loop(self.clock, refresh, "Worker 1: metrics refresh")
        self.clock.advance(1.0)
        self.assertEqual(self.records, [])
        self.clock.advance(1.0)
        self.assertEqual(runs, [0.0, 1.0, 2.0])
        (record,) = self.records
        self.assertEqual(record.levelno, logging.ERROR)
        message = record.getMessage()
        self.assertTrue(message.startswith("Worker 1: metrics refresh failed"), message)
        self.assertIn("RuntimeError: gauge callback broke", message)
        self.assertIn("Traceback", message)
        self.assertIn("in refresh", message)
        self.assertFalse(loop.running)
        self.clock.advance(5.0)
        self.assertEqual(len(runs), 3)
        self.assertEqual(len(self.records), 1)

    def test_a_failing_asynchronous_beat_is_logged(self) -> None:
        """A beat whose Deferred fails (an async beat raising) is logged too."""

        async def beat() -> None:
            raise ValueError("heartbeat folder vanished")

        start_logged_loop(self.clock, lambda: defer.ensureDeferred(beat()), "Worker 0: heartbeat")
        (record,) = self.records
        self.assertEqual(record.levelno, logging.ERROR)
        self.assertIn("Worker 0: heartbeat failed", record.getMessage())
        self.assertIn("ValueError: heartbeat folder vanished", record.getMessage())

    def test_a_working_loop_logs_nothing_and_runs_every_interval(self) -> None:
        """Without failures the call runs at once and then every interval, silently."""
        runs: list[float] = []
        loop = start_logged_loop(self.clock, lambda: runs.append(self.clock.seconds()), "x")
        self.clock.pump([1.0] * 3)
        self.assertEqual(runs, [0.0, 1.0, 2.0, 3.0])
        self.assertTrue(loop.running)
        self.assertEqual(self.records, [])
        loop.stop()
