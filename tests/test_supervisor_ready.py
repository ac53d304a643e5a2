"""The supervisor's wait for its workers' first heartbeats, on a fake reactor."""

import os
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.error import ProcessTerminated
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from keyring_module.config import KeyringConfig, ListenerConfig
from keyring_module.server import StartupError
from keyring_module.supervisor import READY_TIMEOUT_S, Supervisor
from keyring_module.worker_health import Heartbeats, metrics_dir
from tests.test_supervisor_restarts import _SpawningReactor


class WaitReadyTests(TestCase):
    def setUp(self) -> None:
        self.reactor = _SpawningReactor()
        config = KeyringConfig(
            signing_key_path="k.key",
            server_name="example.org",
            listeners=(ListenerConfig(port=8448),),
        )
        self.supervisor = Supervisor(
            cast(Any, self.reactor), config, "/etc/keyring.yaml", workers=2
        )
        run_dir = self.mktemp()
        self.heartbeats = Heartbeats.of_run_dir(run_dir, 2)
        os.makedirs(self.heartbeats.directory)
        os.makedirs(metrics_dir(run_dir))
        self.supervisor.run_dir = run_dir
        self.supervisor.heartbeats = self.heartbeats
        for index in range(2):
            self.supervisor._spawn(index)
        self.waiting = defer.ensureDeferred(self.supervisor._wait_ready())

    def beat(self, index: int) -> None:
        pid = self.supervisor.worker_pids()[index]
        self.heartbeats.write(index, pid, None, self.reactor.seconds())

    def test_ready_once_every_worker_has_beaten(self) -> None:
        """It returns once both workers' heartbeats name their own pids."""
        self.beat(0)
        self.reactor.advance(0.05)
        self.assertNoResult(self.waiting)
        self.heartbeats.write(1, 4242, None, self.reactor.seconds())  # an older worker's
        self.reactor.advance(0.05)
        self.assertNoResult(self.waiting)
        self.beat(1)
        self.reactor.advance(0.05)
        self.successResultOf(self.waiting)

    def test_the_timeout_counts_the_clock_not_the_polls(self) -> None:
        """The timeout is READY_TIMEOUT_S of the reactor's time, however late each
        poll runs (here one poll per second of time, not every 50 ms)."""
        for _ in range(int(READY_TIMEOUT_S) - 1):
            self.reactor.advance(1.0)
        self.assertNoResult(self.waiting)
        self.reactor.advance(2.0)
        failure = self.failureResultOf(self.waiting, StartupError)
        self.assertEqual(str(failure.value), "workers not ready within %ds" % READY_TIMEOUT_S)

    def test_a_worker_that_ends_while_starting_is_named(self) -> None:
        """A worker ending before it is ready fails the start at the next poll, and
        its heartbeat file is removed."""
        self.beat(1)
        (_, _, _), (protocol, _, _) = self.reactor.spawned
        protocol.processEnded(Failure(ProcessTerminated(exitCode=1)))
        self.assertIsNone(self.heartbeats.read(1))
        self.reactor.advance(0.05)
        failure = self.failureResultOf(self.waiting, StartupError)
        self.assertIn("worker 1 ended while starting", str(failure.value))
