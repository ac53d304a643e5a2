"""One worker process of ``keyring-module serve`` with ``workers: N`` (N > 1).

The supervisor (:mod:`keyring_module.supervisor`) starts each worker as a fresh
interpreter::

    python -m keyring_module.worker --config /etc/keyring/keyring.yaml \\
        --index 0 --workers 2 --supervisor 4242 --run-dir /tmp/keyring-workers-x \\
        --socket 3:0:0.0.0.0 --socket 4:1:::

Each ``--socket FD:LISTENER:ADDRESS`` is a listening socket the supervisor bound
(``listeners.LISTENER``, on ``ADDRESS``) and passed down as file descriptor ``FD``.
The worker adopts it (``adoptStreamPort``; TLS listeners get their TLS wrapper
here) instead of binding a port, so every worker accepts connections from the same
socket and the kernel hands each new connection to one of them.

Otherwise a worker is the single-process server: it opens the store (and so shares
flights, per-origin limits and news with the other workers through the database),
serves the same resources, and stops cleanly on SIGTERM/SIGINT. In addition it:

* writes a heartbeat every second (:mod:`keyring_module.worker_health`), and answers
  ``/health`` for all the workers;
* copies its callback gauges into the shared metrics files every second (the
  supervisor serves ``/metrics``; :meth:`Metrics.refresh_watched`);
* marks each response with ``X-Keyring-Worker: <index>``, to tell which worker
  answered;
* stops when the supervisor is gone (its parent process changed).
"""

import argparse
import logging
import os
import socket
import sys
from typing import Any, Awaitable, Callable, Optional, Sequence, cast

import attr
from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort, IReactorSocket, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from keyring_module.clock import KeyringReactor, global_reactor
from keyring_module.config import KeyringConfig, ListenerConfig
from keyring_module.resources.site import KeyServerSite, SizeLimitedRequest
from keyring_module.server import (
    KeyServer,
    StartupError,
    report_startup_failure,
    run_reactor,
    tls_context_of,
)
from keyring_module.wiring import KeyringServices
from keyring_module.worker_health import HEARTBEAT_INTERVAL_S, Heartbeats

logger = logging.getLogger(__name__)

#: The response header naming the worker that answered.
WORKER_HEADER = b"X-Keyring-Worker"


@attr.s(auto_attribs=True, frozen=True, slots=True)
class InheritedSocket:
    """A listening socket from the supervisor: file descriptor ``fd`` listens for
    ``listeners.<listener>`` on ``address``.

    Example:
        >>> InheritedSocket.parse("3:0:::")
        InheritedSocket(fd=3, listener=0, address='::')
        >>> InheritedSocket(3, 0, "::").argument()
        '3:0:::'
    """

    fd: int
    listener: int
    address: str

    @classmethod
    def parse(cls, text: str) -> "InheritedSocket":
        """Read a ``FD:LISTENER:ADDRESS`` argument (the address may hold colons)."""
        fd, listener, address = text.split(":", 2)
        return cls(int(fd), int(listener), address)

    def argument(self) -> str:
        """The ``--socket`` argument that :meth:`parse` reads back."""
        return "%d:%d:%s" % (self.fd, self.listener, self.address)


@attr.s(auto_attribs=True, frozen=True, slots=True)
class WorkerSetup:
    """What the supervisor tells a worker (its command line)."""

    index: int
    workers: int
    supervisor_pid: int
    run_dir: str
    sockets: tuple[InheritedSocket, ...]

    @property
    def heartbeats(self) -> Heartbeats:
        """The workers' heartbeat files."""
        return Heartbeats.of_run_dir(self.run_dir, self.workers)


def _worker_request(index: int) -> type[SizeLimitedRequest]:
    value = str(index).encode("ascii")

    class WorkerRequest(SizeLimitedRequest):
        def process(self) -> None:
            self.setHeader(WORKER_HEADER, value)
            super().process()

    return WorkerRequest


def _accept_one_at_a_time(port: object) -> None:
    """Make ``port`` accept one connection per readiness event.

    Twisted accepts up to 100 (and more) pending connections each time a listening
    socket is readable. On a socket shared by the workers that lets the first worker to
    wake take a whole burst of new connections (a load balancer's or a client's pool
    opening 16 at once all land on one worker). Accepting one at a time leaves the
    rest for the others, which are woken by the same event.
    """
    read = port.doRead  # type: ignore[attr-defined]

    def do_read() -> object:
        port.numberAccepts = 1  # type: ignore[attr-defined]
        return read()

    port.doRead = do_read  # type: ignore[attr-defined]


class WorkerKeyServer(KeyServer):
    """The key server of one worker: listens on inherited sockets, leaves the
    metrics listener to the supervisor, and answers ``/health`` for every worker."""

    def __init__(self, reactor: KeyringReactor, config: KeyringConfig, setup: WorkerSetup):
        super().__init__(reactor, config)
        self.setup = setup

    def health_check(self, services: KeyringServices) -> Callable[[], Awaitable[None]]:
        store_check = super().health_check(services)
        heartbeats = self.setup.heartbeats

        async def check() -> None:
            await store_check()
            heartbeats.check(self._reactor.seconds())

        return check

    def build_site(self, services: KeyringServices) -> KeyServerSite:
        site = super().build_site(services)
        site.requestFactory = _worker_request(self.setup.index)
        return site

    def _listen(
        self, index: int, listener: ListenerConfig, address: str, site: KeyServerSite
    ) -> IListeningPort:
        inherited = [s for s in self.setup.sockets if (s.listener, s.address) == (index, address)]
        if not inherited:
            raise StartupError(
                "listeners.%d: no socket for %s from the supervisor" % (index, address)
            )
        fd = inherited[0].fd
        factory: object = site
        if listener.tls:
            factory = TLSMemoryBIOFactory(tls_context_of(index, listener), False, site)
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        port = cast(IReactorSocket, self._reactor).adoptStreamPort(fd, family, factory)  # type: ignore[arg-type]
        os.close(fd)  # the port holds its own copy
        _accept_one_at_a_time(port)
        return port

    def _listen_metrics(self, services: KeyringServices) -> None:
        """Nothing: the supervisor serves every worker's metrics."""


def start_logged_loop(
    clock: IReactorTime,
    call: Callable[[], object],
    what: str,
    interval_s: float = HEARTBEAT_INTERVAL_S,
) -> LoopingCall:
    """Run ``call`` now and every ``interval_s`` on ``clock``; if it fails, the loop
    stops and the failure is logged as an error (with its traceback), naming ``what``.

    Example::

        >>> from twisted.internet.task import Clock
        >>> loop = start_logged_loop(Clock(), lambda: None, "Worker 0: heartbeat")
        >>> loop.running
        True
    """
    loop = LoopingCall(call)
    loop.clock = clock

    def failed(failure: Failure) -> None:
        logger.error("%s failed and stopped:\n%s", what, failure.getTraceback())

    loop.start(interval_s).addErrback(failed)
    return loop


def run_worker(config: KeyringConfig, setup: WorkerSetup) -> int:
    """Run one worker on the real reactor until SIGTERM/SIGINT or the supervisor's end.

    Returns the process exit status: 0 after a clean stop, 1 when startup failed.
    """
    from keyring_module.gc_policy import ReactorGarbageCollector

    reactor = global_reactor()
    status = {"code": 0}
    server = WorkerKeyServer(reactor, config, setup)
    heartbeats = setup.heartbeats
    collector = ReactorGarbageCollector(reactor)
    loops: list[LoopingCall] = []

    async def beat() -> None:
        if os.getppid() != setup.supervisor_pid:
            print(
                "keyring-module: worker %d: the supervisor is gone" % setup.index, file=sys.stderr
            )
            if cast(Any, reactor).running:  # not after it began to stop
                reactor.stop()
            return
        services = server.services
        if services is None:
            return
        error: Optional[str] = None
        try:
            await services.store.check_health()
        except Exception as e:
            error = str(e) or type(e).__name__
        try:
            heartbeats.write(setup.index, os.getpid(), error, reactor.seconds())
        except OSError as e:  # the others' /health will say this worker is silent
            logger.warning("Worker %d: cannot write its heartbeat: %s", setup.index, e)

    def started(_: object) -> None:
        collector.start()
        services = server.services
        assert services is not None
        clock = cast(IReactorTime, reactor)
        what = "Worker %d: " % (setup.index,)
        loops.append(
            start_logged_loop(clock, services.metrics.refresh_watched, what + "metrics refresh")
        )
        loops.append(
            start_logged_loop(clock, lambda: defer.ensureDeferred(beat()), what + "heartbeat")
        )

    def start_failed(failure: Failure) -> None:
        status["code"] = 1
        report_startup_failure(failure, "keyring-module: worker %d" % (setup.index,))
        reactor.stop()

    def start() -> None:
        d = defer.ensureDeferred(server.start())
        d.addCallback(started)
        d.addErrback(start_failed)

    def shutdown() -> "defer.Deferred[None]":
        for loop in loops:
            if loop.running:
                loop.stop()
        collector.stop()
        return defer.ensureDeferred(server.stop())

    run_reactor(reactor, start, shutdown)
    return status["code"]


def build_parser() -> argparse.ArgumentParser:
    """The worker's command line (written by the supervisor, not by hand)."""
    parser = argparse.ArgumentParser(prog="python -m keyring_module.worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--supervisor", type=int, required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--socket", action="append", default=[], type=InheritedSocket.parse)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of a worker process; returns its exit status."""
    from keyring_module.config_file import load_config_file
    from keyring_module.errors import ConfigError
    from keyring_module.logconfig import setup_logging

    args = build_parser().parse_args(argv)
    try:
        config = load_config_file(args.config, standalone=True)
    except ConfigError as e:
        print("keyring-module: worker %d: %s" % (args.index, e), file=sys.stderr)
        return 1
    setup_logging(config.logging)
    setup = WorkerSetup(
        index=args.index,
        workers=args.workers,
        supervisor_pid=args.supervisor,
        run_dir=args.run_dir,
        sockets=tuple(args.socket),
    )
    return run_worker(config, setup)


if __name__ == "__main__":
    sys.exit(main())
