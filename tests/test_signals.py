"""SIGTERM/SIGINT stop ``serve`` once: a second signal while shutting down is only
logged (Twisted's own handlers would log a ReactorNotRunning traceback)."""

import os
import signal

from twisted.trial.unittest import SynchronousTestCase

from keyring_module.signals import stop_handler
from tests.test_server import ServeProcessCase, free_port, write_sample_config


class _Reactor:
    def __init__(self) -> None:
        self.scheduled: list[object] = []

    def stop(self) -> None:
        raise AssertionError("stop is called from the reactor thread, not the handler")

    def callFromThread(self, f: object) -> None:
        self.scheduled.append(f)


class StopHandlerTests(SynchronousTestCase):
    def test_only_the_first_signal_stops(self) -> None:
        reactor = _Reactor()
        handler = stop_handler(reactor)
        with self.assertLogs("keyring_module.signals", "INFO") as logs:
            handler(signal.SIGTERM, None)
            handler(signal.SIGINT, None)
        self.assertEqual(reactor.scheduled, [reactor.stop])
        self.assertEqual(
            [r.getMessage() for r in logs.records],
            ["Received SIGTERM, shutting down", "Received SIGINT again; already shutting down"],
        )


class TwoSignalsTests(ServeProcessCase):
    """The real process, signalled twice at once."""

    def test_two_sigterms_stop_cleanly(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        port = free_port()
        proc = self.start(write_sample_config(directory, port))
        self.wait_for_line(proc, "Listening on http://127.0.0.1:%d" % port)
        proc.send_signal(signal.SIGTERM)
        self.wait_for_line(proc, "shutting down")  # the first one is being handled
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(15), 0)
        assert proc.stdout is not None
        output = proc.stdout.read()
        self.assertNotIn("ReactorNotRunning", output)
        self.assertNotIn("Traceback", output)
