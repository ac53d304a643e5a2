"""The supervisor's restarts of ended workers, on a fake reactor (no real processes)."""

import os
import socket
from typing import Any, cast

from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from keyring_module.config import KeyringConfig, ListenerConfig, MetricsConfig
from keyring_module.supervisor import (
    FIRST_RESTART_DELAY_S,
    MAX_RESTART_DELAY_S,
    STABLE_AFTER_S,
    Supervisor,
)
from keyring_module.worker import InheritedSocket
from keyring_module.worker_health import Heartbeats


class _Transport:
    def __init__(self, pid: int) -> None:
        self.pid = pid


class _SpawningReactor(MemoryReactorClock):
    """Records ``spawnProcess`` calls; each gets the next fake pid."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, list[str], dict[str, str]]] = []
        self.child_fds: list[dict[int, Any]] = []

    def spawnProcess(
        self, protocol: Any, executable: Any, args: Any, env: Any = None, **kw: Any
    ) -> Any:  # type: ignore[override]
        self.spawned.append((protocol, list(args), dict(env or {})))
        self.child_fds.append(dict(kw["childFDs"]))
        return _Transport(1000 + len(self.spawned))


class SupervisorRestartTests(TestCase):
    """How soon an ended worker is started again."""

    def setUp(self) -> None:
        self.reactor = _SpawningReactor()
        self.supervisor = self.make_supervisor(metrics_enabled=False)

    def make_supervisor(self, metrics_enabled: bool) -> Supervisor:
        """A supervisor whose two workers were spawned on the fake reactor."""
        config = KeyringConfig(
            signing_key_path="k.key",
            server_name="example.org",
            listeners=(ListenerConfig(port=8448),),
            metrics=MetricsConfig(enabled=metrics_enabled),
        )
        supervisor = Supervisor(cast(Any, self.reactor), config, "/etc/keyring.yaml", workers=2)
        run_dir = self.mktemp()
        os.makedirs(os.path.join(run_dir, "health"))
        os.makedirs(os.path.join(run_dir, "metrics"))
        supervisor.run_dir = run_dir
        supervisor.heartbeats = Heartbeats.of_run_dir(run_dir, 2)
        for index in range(2):
            supervisor._spawn(index)
        supervisor._ready = True
        return supervisor

    def end_latest(self, index: int, reason: Failure) -> None:
        protocol = [
            p
            for p, args, _ in self.reactor.spawned
            if args[args.index("--index") + 1] == str(index)
        ][-1]
        protocol.processEnded(reason)

    def test_quick_failures_double_the_delay_up_to_the_most(self) -> None:
        """A worker that keeps failing at once is restarted after 0.5 s, then 1 s, 2 s,
        ... never sooner, and never later than MAX_RESTART_DELAY_S."""
        crash = Failure(ProcessTerminated(exitCode=1))
        delays = []
        for _ in range(9):
            spawned = len(self.reactor.spawned)
            self.end_latest(0, crash)
            (call,) = self.reactor.getDelayedCalls()
            delay = call.getTime() - self.reactor.seconds()
            delays.append(round(delay, 6))
            self.reactor.advance(delay - 0.01)
            self.assertEqual(len(self.reactor.spawned), spawned)  # not yet
            self.reactor.advance(0.02)
            self.assertEqual(len(self.reactor.spawned), spawned + 1)
        expected = [min(MAX_RESTART_DELAY_S, FIRST_RESTART_DELAY_S * 2**n) for n in range(9)]
        self.assertEqual(delays, expected)
        self.assertEqual(delays[-1], MAX_RESTART_DELAY_S)
        self.assertEqual(self.supervisor.worker_pids()[1], 1002)  # the other one untouched

    def test_a_worker_that_ran_long_starts_again_from_the_first_delay(self) -> None:
        """After STABLE_AFTER_S of running, an ended worker gets the first delay again."""
        crash = Failure(ProcessTerminated(exitCode=1))
        for _ in range(3):
            self.end_latest(0, crash)
            self.reactor.advance(MAX_RESTART_DELAY_S)
        self.reactor.advance(STABLE_AFTER_S)
        self.end_latest(0, Failure(ProcessDone(0)))
        (call,) = self.reactor.getDelayedCalls()
        self.assertAlmostEqual(call.getTime() - self.reactor.seconds(), FIRST_RESTART_DELAY_S)

    def test_no_restart_while_stopping(self) -> None:
        """Workers that end while the supervisor stops are not started again."""
        self.supervisor._stopping = True
        self.end_latest(0, Failure(ProcessDone(0)))
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_workers_get_the_socket_arguments_and_metrics_folder_only_with_metrics(self) -> None:
        """The worker's command line names its index, the count, the supervisor and
        the run folder; without the metrics listener no multiprocess folder is set.
        Each bound socket is named by a ``--socket`` argument and handed down as that
        file descriptor."""
        _, args, env = self.reactor.spawned[1]
        self.assertEqual(args[args.index("--index") + 1], "1")
        self.assertEqual(args[args.index("--workers") + 1], "2")
        self.assertEqual(args[args.index("--supervisor") + 1], str(os.getpid()))
        self.assertEqual(args[args.index("--run-dir") + 1], self.supervisor.run_dir)
        self.assertNotIn("PROMETHEUS_MULTIPROC_DIR", env)

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        self.supervisor._sockets.append((InheritedSocket(3, 0, "127.0.0.1"), sock))
        self.supervisor._spawn(1)
        _, args, env = self.reactor.spawned[-1]
        self.assertEqual(args[args.index("--socket") + 1], "3:0:127.0.0.1")
        self.assertEqual(args.count("--socket"), 1)
        child_fds = self.reactor.child_fds[-1]
        self.assertEqual(child_fds[3], sock.fileno())
        self.assertEqual(sorted(child_fds), [0, 1, 2, 3])
        self.assertNotIn("PROMETHEUS_MULTIPROC_DIR", env)

    def test_with_metrics_workers_write_into_the_run_folders_metrics(self) -> None:
        """With the metrics listener, each worker's multiprocess folder is the run
        folder's ``metrics`` folder (which the supervisor sums and serves)."""
        supervisor = self.make_supervisor(metrics_enabled=True)
        assert supervisor.run_dir is not None
        for _, _, env in self.reactor.spawned[-2:]:
            self.assertEqual(
                env["PROMETHEUS_MULTIPROC_DIR"], os.path.join(supervisor.run_dir, "metrics")
            )
