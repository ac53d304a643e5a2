"""``keyring-module serve`` with ``workers: N`` (N > 1): a supervisor and N workers.

The supervisor does what must happen once, then starts the workers:

1. creates the signing key if there is none (so that workers never race to create
   it), and brings the database schema up to date (opening the store once);
2. binds every listener's sockets itself: pre-forked shared sockets. Each worker
   (:mod:`keyring_module.worker`, a fresh interpreter, not a fork of a running
   reactor) inherits them as file descriptors and accepts from them; the kernel hands
   each new connection to one worker. No port is ever bound twice, a restarted
   worker takes up the same sockets, and connections waiting in the backlog of a
   dying worker's socket are not lost (unlike ``SO_REUSEPORT``, where each process
   has its own backlog, and which not every platform balances);
3. serves the metrics listener, summing every worker's metrics
   (prometheus_client's multiprocess mode: the workers write their values into
   files of a folder the supervisor owns);
4. logs one line per listener once every worker is ready, as ``serve`` does.

It restarts a worker that ends, after a delay that doubles with each quick failure
(:data:`FIRST_RESTART_DELAY_S` up to :data:`MAX_RESTART_DELAY_S`; a worker that ran
:data:`STABLE_AFTER_S` starts again from the first delay), so that a crash loop does
not spin. On SIGTERM/SIGINT it stops every worker (SIGTERM, then SIGKILL after
:data:`STOP_TIMEOUT_S`), removes its run folder and exits with status 0.

Example::

    supervisor = Supervisor(reactor, config, "/etc/keyring/keyring.yaml", workers=4)
    await supervisor.start()      # listening, four workers ready
    await supervisor.stop()
"""

import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
from typing import Any, Optional

from twisted.internet import defer, protocol
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.python.failure import Failure

from keyring_module.clock import KeyringReactor, global_reactor
from keyring_module.config import KeyringConfig
from keyring_module.privileged_ports import listen_failure_hint, unprivileged_port_start
from keyring_module.server import (
    StartupError,
    listen_metrics,
    log_listening,
    report_startup_failure,
    run_reactor,
)
from keyring_module.signing import OwnKeys, load_or_create_signing_keys
from keyring_module.worker import InheritedSocket
from keyring_module.worker_health import Heartbeats, metrics_dir

logger = logging.getLogger(__name__)

#: The delay before the first restart of a worker that ended.
FIRST_RESTART_DELAY_S = 0.5
#: The longest delay between restarts of a worker that keeps failing.
MAX_RESTART_DELAY_S = 30.0
#: A worker that ran this long before it ended is restarted after the first delay.
STABLE_AFTER_S = 30.0
#: How long workers may take to become ready when the server starts.
READY_TIMEOUT_S = 60.0
#: How long workers may take to stop on SIGTERM before they are killed.
STOP_TIMEOUT_S = 20.0
#: The listening sockets' backlog (Twisted's ``listenTCP`` default is 50; the
#: workers share each socket, so it holds a little more).
BACKLOG = 128
#: The run folders' names: ``keyring-workers-<supervisor pid>-<random>``, in the
#: temporary folder (heartbeats and the metrics files).
RUN_DIR_PREFIX = "keyring-workers-"
#: The first file descriptor number the workers' inherited sockets get.
FIRST_FD = 3


class _WorkerProcess(protocol.ProcessProtocol):
    """Tells the supervisor when worker ``index`` ends."""

    def __init__(self, supervisor: "Supervisor", index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.pid = 0
        self.started_at = 0.0
        self.ended: "defer.Deferred[None]" = defer.Deferred()

    def processEnded(self, reason: Failure) -> None:
        self.supervisor._ended(self, reason)
        self.ended.callback(None)


class Supervisor:
    """Starts, watches and stops ``workers`` worker processes on shared sockets.

    Args:
        reactor: the real reactor (the supervisor spawns processes).
        config: the parsed configuration (for the listeners, the signing key, the
            database and the metrics listener).
        config_path: the config file the workers load (an absolute path).
        workers: how many workers (2 or more).
        python: the interpreter that runs the workers.
    """

    def __init__(
        self,
        reactor: KeyringReactor,
        config: KeyringConfig,
        config_path: str,
        workers: int,
        python: str = sys.executable,
    ) -> None:
        assert config.server_name is not None, "standalone config has a server_name"
        self._reactor: Any = reactor
        self.config = config
        self.config_path = os.path.abspath(config_path)
        self.workers = workers
        self._python = python
        self._sockets: list[tuple[InheritedSocket, socket.socket]] = []
        self._processes: dict[int, _WorkerProcess] = {}
        self._failures = [0] * workers
        self._restarts: dict[int, IDelayedCall] = {}
        self._metric_ports: list[IListeningPort] = []
        self._stopping = False
        self._ready = False
        self.run_dir: Optional[str] = None
        #: The workers' heartbeat files (in the run folder, once started).
        self.heartbeats: Optional[Heartbeats] = None
        self.own_keys: Optional[OwnKeys] = None

    def worker_pids(self) -> dict[int, int]:
        """The running workers' pids, by index."""
        return {index: p.pid for index, p in self._processes.items()}

    async def start(self) -> None:
        """Create the signing key and the schema, bind the listeners, start the
        workers and the metrics listener; returns once every worker is ready.

        Raises:
            StartupError: the database, the run folder, a listener or a worker could
                not start.
        """
        config = self.config
        assert config.server_name is not None
        keys = load_or_create_signing_keys(config.signing_key_path)
        self.own_keys = OwnKeys(config.server_name, keys, config.old_signing_keys)
        await self._migrate()
        remove_stale_run_dirs(tempfile.gettempdir())
        self.run_dir = self._make_run_dir()
        self.heartbeats = Heartbeats.of_run_dir(self.run_dir, self.workers)
        try:
            self._bind()
            if config.metrics.enabled:
                self._listen_metrics()
            for index in range(self.workers):
                self._spawn(index)
            await self._wait_ready()
            self._ready = True
        except BaseException:
            await self.stop()
            raise
        for inherited, sock in self._sockets:
            host, port = sock.getsockname()[:2]
            listener = config.listeners[inherited.listener]
            log_listening(listener.tls, host, port, self.own_keys)
        logger.info("Serving with %d workers (pids %s)", self.workers, self._pids_text())

    def _make_run_dir(self) -> str:
        """A new run folder with its ``metrics`` and ``health`` folders.

        Raises:
            StartupError: the temporary folder is not writable (full, read-only...).
        """
        try:
            run_dir = tempfile.mkdtemp(prefix="%s%d-" % (RUN_DIR_PREFIX, os.getpid()))
        except OSError as e:
            raise StartupError("cannot create the workers' run folder: %s" % (e,)) from None
        try:
            os.mkdir(metrics_dir(run_dir))
            os.mkdir(Heartbeats.of_run_dir(run_dir, self.workers).directory)
        except OSError as e:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise StartupError("cannot create the workers' run folder: %s" % (e,)) from None
        return run_dir

    async def _migrate(self) -> None:
        from keyring_module.storage import open_key_store
        from keyring_module.storage.errors import StorageError

        try:
            store = await open_key_store(self.config.database, self._reactor, self._reactor)
        except StorageError as e:
            raise StartupError("database: %s" % (e,)) from None
        await store.close()

    def _bind(self) -> None:
        fd = FIRST_FD
        for index, listener in enumerate(self.config.listeners):
            for address in listener.bind_addresses:
                family = socket.AF_INET6 if ":" in address else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_STREAM)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind((address, listener.port))
                    sock.listen(BACKLOG)
                except OSError as e:
                    sock.close()
                    hint = listen_failure_hint(e.errno, listener.port, unprivileged_port_start())
                    raise StartupError(
                        "listeners.%d: cannot listen on %s port %d: %s%s"
                        % (index, address, listener.port, e.strerror or e, hint)
                    ) from None
                sock.setblocking(False)
                self._sockets.append((InheritedSocket(fd, index, address), sock))
                fd += 1

    def _listen_metrics(self) -> None:
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        assert self.run_dir is not None
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=metrics_dir(self.run_dir))
        self._metric_ports = listen_metrics(self._reactor, self.config.metrics, registry)

    def _spawn(self, index: int) -> None:
        assert self.run_dir is not None
        self._restarts.pop(index, None)
        args = [
            self._python,
            "-m",
            "keyring_module.worker",
            "--config",
            self.config_path,
            "--index",
            str(index),
            "--workers",
            str(self.workers),
            "--supervisor",
            str(os.getpid()),
            "--run-dir",
            self.run_dir,
        ]
        child_fds: dict[int, Any] = {0: "w", 1: 1, 2: 2}
        for inherited, sock in self._sockets:
            args += ["--socket", inherited.argument()]
            child_fds[inherited.fd] = sock.fileno()
        env = dict(os.environ)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if self.config.metrics.enabled:
            # The workers write their metrics into files there; we serve their sum.
            env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir(self.run_dir)
        process = _WorkerProcess(self, index)
        transport = self._reactor.spawnProcess(
            process, self._python, args, env=env, path=os.getcwd(), childFDs=child_fds
        )
        process.pid = transport.pid
        process.started_at = self._reactor.seconds()
        self._processes[index] = process
        logger.info("Worker %d started (pid %d)", index, process.pid)

    async def _wait_ready(self) -> None:
        from twisted.internet import task

        heartbeats = self.heartbeats
        assert heartbeats is not None
        deadline = self._reactor.seconds() + READY_TIMEOUT_S
        while True:
            ready = {
                index
                for index, process in self._processes.items()
                if (heartbeats.read(index) or {}).get("pid") == process.pid
            }
            if len(ready) == self.workers:
                return
            missing = set(range(self.workers)) - set(self._processes)
            if missing:
                raise StartupError(
                    "worker %d ended while starting (see its output above)" % min(missing)
                )
            if self._reactor.seconds() > deadline:
                raise StartupError("workers not ready within %ds" % READY_TIMEOUT_S)
            await task.deferLater(self._reactor, 0.05, lambda: None)

    def _ended(self, process: _WorkerProcess, reason: Failure) -> None:
        index = process.index
        if self._processes.get(index) is process:
            del self._processes[index]
        if self.heartbeats is not None:
            self.heartbeats.clear(index)
        if self.run_dir is not None:
            try:
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(process.pid, metrics_dir(self.run_dir))
            except OSError:
                pass
        how = "exited cleanly" if reason.check(ProcessDone) else str(reason.value)
        if self._stopping:
            logger.info("Worker %d (pid %d) %s", index, process.pid, how)
            return
        if not self._ready:
            return  # still starting: _wait_ready reports it
        ran_s = self._reactor.seconds() - process.started_at
        if ran_s >= STABLE_AFTER_S:
            self._failures[index] = 0
        delay_s = min(MAX_RESTART_DELAY_S, FIRST_RESTART_DELAY_S * 2 ** self._failures[index])
        self._failures[index] += 1
        logger.warning(
            "Worker %d (pid %d) ended after %.1fs: %s; restarting it in %.1fs",
            index,
            process.pid,
            ran_s,
            how,
            delay_s,
        )
        self._restarts[index] = self._reactor.callLater(delay_s, self._spawn, index)

    def _pids_text(self) -> str:
        return ", ".join(str(pid) for _, pid in sorted(self.worker_pids().items()))

    async def stop(self) -> None:
        """Stop every worker (SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT_S`), the
        metrics listener and the sockets, and remove the run folder."""
        self._stopping = True
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        processes = list(self._processes.values())
        for process in processes:
            _signal(process.pid, signal.SIGTERM)
        if processes:
            kill = self._reactor.callLater(STOP_TIMEOUT_S, self._kill_all)
            await defer.gatherResults([p.ended for p in processes], consumeErrors=True)
            if kill.active():
                kill.cancel()
        ports, self._metric_ports = self._metric_ports, []
        await defer.gatherResults(
            [defer.maybeDeferred(p.stopListening) for p in ports], consumeErrors=True
        )
        for _, sock in self._sockets:
            sock.close()
        self._sockets = []
        run_dir, self.run_dir = self.run_dir, None
        self.heartbeats = None
        if run_dir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)

    def _kill_all(self) -> None:
        for process in list(self._processes.values()):
            logger.warning(
                "Worker %d (pid %d) did not stop: killing it", process.index, process.pid
            )
            _signal(process.pid, signal.SIGKILL)


def remove_stale_run_dirs(parent: str) -> list[str]:
    """Remove the run folders in ``parent`` that belong to us and whose supervisor is
    gone (it was killed and could not remove its own); returns their paths.

    Example::

        >>> import tempfile
        >>> parent = tempfile.mkdtemp()
        >>> os.mkdir(os.path.join(parent, "keyring-workers-999999999-x"))
        >>> [os.path.basename(p) for p in remove_stale_run_dirs(parent)]
        ['keyring-workers-999999999-x']
    """
    removed: list[str] = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        found = re.match(re.escape(RUN_DIR_PREFIX) + r"(\d+)-", name)
        if not found or _alive(int(found.group(1))):
            continue
        path = os.path.join(parent, name)
        try:
            if os.lstat(path).st_uid != os.getuid():
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    except OverflowError:
        return False
    return True


def _signal(pid: int, number: int) -> None:
    try:
        os.kill(pid, number)
    except ProcessLookupError:
        pass


def run_supervisor(config: KeyringConfig, config_path: str, workers: int) -> int:
    """Run the supervisor and ``workers`` workers on the real reactor until
    SIGTERM/SIGINT.

    Returns the process exit status: 0 after a clean stop, 1 when startup failed.
    """
    reactor = global_reactor()
    status = {"code": 0}
    supervisor = Supervisor(reactor, config, config_path, workers)

    def start_failed(failure: Failure) -> None:
        status["code"] = 1
        report_startup_failure(failure)
        reactor.stop()

    def start() -> None:
        defer.ensureDeferred(supervisor.start()).addErrback(start_failed)

    def shutdown() -> "defer.Deferred[None]":
        logger.info("Shutting down")
        return defer.ensureDeferred(supervisor.stop())

    run_reactor(reactor, start, shutdown)
    return status["code"]
