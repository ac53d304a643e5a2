"""``keyring-module serve`` instances in their own processes, driven from a test's reactor.

Each instance gets its own folder, port and signing key; the test's fake origins serve
HTTPS on 127.0.0.1 from the same reactor (certificates from a test CA that the
instances trust through ``federation.ca_file``). Everything listens on 127.0.0.1 only,
and every instance is stopped (SIGTERM, then SIGKILL) when the test ends::

    first = await ServeInstance.start(test, reactor, config_for(...))
    code, body = await query(reactor, first.port, origin_name)
"""

import json
import os
import signal
import sys
from typing import Any, Optional, cast

import yaml
from treq.client import HTTPClient
from twisted.internet import defer, protocol
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IReactorTime
from twisted.python import log
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from keyring_module.clock import KeyringReactor, global_reactor
from tests.fakes import FakeOriginResource
from tests.test_server import STARTUP_TIMEOUT_S, free_port
from tests.tls_helpers import listen_tls, make_ca, write_ca_pem
from tests.utils import new_signing_key

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: How long an instance may take to stop on SIGTERM before it is killed.
STOP_TIMEOUT_S = 15.0


class _Output(protocol.ProcessProtocol):
    """Collects an instance's output; fires ``ready`` at the ready line."""

    def __init__(self, ready_line: str) -> None:
        self.ready_line = ready_line
        self.lines: list[str] = []
        self.ready: "defer.Deferred[None]" = defer.Deferred()
        self.ended: "defer.Deferred[None]" = defer.Deferred()
        self.reason: Optional[Failure] = None
        self._partial = ""

    def outReceived(self, data: bytes) -> None:
        text = self._partial + data.decode("utf-8", "replace")
        *lines, self._partial = text.split("\n")
        self.lines.extend(lines)
        if not self.ready.called and any(self.ready_line in line for line in lines):
            self.ready.callback(None)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.reason = reason
        if not self.ready.called:
            self.ready.errback(RuntimeError("serve ended:\n" + "\n".join(self.lines[-40:])))
        self.ended.callback(None)


class ServeInstance:
    """One running ``serve`` process.

    Attributes:
        port: its HTTP listener on 127.0.0.1.
        output: its log lines so far.
    """

    def __init__(self, reactor: KeyringReactor, transport: Any, output: _Output, port: int):
        self._reactor = reactor
        self._transport = transport
        self._output = output
        self.port = port

    @property
    def output(self) -> list[str]:
        """Its log lines so far."""
        return self._output.lines

    @classmethod
    async def start(
        cls,
        test: TestCase,
        reactor: KeyringReactor,
        directory: str,
        config: dict[str, Any],
        args: tuple[str, ...] = (),
    ) -> "ServeInstance":
        """Write ``config`` (listener and signing key filled in) into ``directory`` and
        start ``serve`` there (with ``args`` after ``--config``); returns once it
        listens. Stopped when ``test`` ends."""
        os.makedirs(directory, exist_ok=True)
        port = free_port()
        config = dict(config)
        config.setdefault("server_name", "localhost:%d" % port)
        config.setdefault("signing_key_path", "signing.key")
        config["listeners"] = [{"port": port, "bind_addresses": ["127.0.0.1"]}]
        path = os.path.join(directory, "config.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(config, f)
        output = _Output("Listening on http://127.0.0.1:%d" % port)
        transport = reactor.spawnProcess(  # type: ignore[attr-defined]
            output,
            sys.executable,
            [sys.executable, "-m", "keyring_module", "serve", "--config", path, *args],
            env=dict(os.environ, PYTHONPATH=REPO_ROOT),
            path=directory,
        )
        instance = cls(reactor, transport, output, port)
        test.addCleanup(instance.stop)
        timer = reactor.callLater(STARTUP_TIMEOUT_S, output.ready.cancel)
        try:
            await output.ready
        except defer.CancelledError:
            test.fail("serve did not start within %ss:\n%s" % (STARTUP_TIMEOUT_S, output.lines))
        finally:
            if timer.active():
                timer.cancel()
        return instance

    @property
    def pid(self) -> int:
        """Its process id."""
        return int(self._transport.pid)

    @property
    def ended(self) -> "defer.Deferred[None]":
        """Fires when the process has ended."""
        return self._output.ended

    @property
    def exit_code(self) -> Optional[int]:
        """Its exit status once it ended (None before, or when a signal ended it)."""
        reason = self._output.reason
        code = getattr(reason.value, "exitCode", None) if reason is not None else None
        return code if isinstance(code, int) else None

    def kill(self) -> None:
        """SIGKILL: the process ends at once, holding whatever it held."""
        if not self._output.ended.called:
            self._transport.signalProcess("KILL")

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT_S`; waits for the end (its
        output goes to the test log)."""
        self._output.ended.addBoth(self._log_output)
        ended = self._output.ended
        if ended.called:
            return
        self._transport.signalProcess(signal.SIGTERM)
        timer = self._reactor.callLater(STOP_TIMEOUT_S, self.kill)
        await ended
        if timer.active():
            timer.cancel()

    def _log_output(self, result: object) -> object:
        log.msg("serve on port %d said:\n%s" % (self.port, "\n".join(self.output)))
        return result


class Origins:
    """Fake origins serving HTTPS on 127.0.0.1, trusted through a CA file.

    Args:
        test: the test (ports are closed when it ends).
        reactor: the reactor the origins run on.
        directory: where the CA file is written.
    """

    def __init__(self, test: TestCase, reactor: KeyringReactor, directory: str) -> None:
        self._test = test
        self._reactor = reactor
        self._ca = make_ca()
        os.makedirs(directory, exist_ok=True)
        self.ca_file = write_ca_pem(self._ca, os.path.join(directory, "ca.pem"))

    def start(self, version: str = "k1") -> FakeOriginResource:
        """A new origin with one signing key; its ``server_name`` is ``127.0.0.1:<port>``."""
        origin = FakeOriginResource(new_signing_key(version), "", self._reactor)
        port = listen_tls(self._reactor, self._ca, origin, ["127.0.0.1"])
        self._test.addCleanup(port.stopListening)
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        origin.server_name = "127.0.0.1:%d" % address.port
        return origin


def instance_config(ca_file: str, database: dict[str, Any], **more: Any) -> dict[str, Any]:
    """An instance's config: the given database, the origins' CA trusted, 127.0.0.1
    allowed, and room for a few hundred concurrent queries from one address."""
    config: dict[str, Any] = {
        "database": database,
        "federation": {
            "ca_file": ca_file,
            "ip_range_allowlist": ["127.0.0.1/32"],
            "request_timeout": "20s",
        },
        "notary": {"max_fetches_per_request": 1000, "max_concurrent_requests": 1000},
        "inbound": {"max_connections_per_address": 1000},
    }
    config.update(more)
    return config


def new_pool(reactor: KeyringReactor, test: TestCase) -> HTTPConnectionPool:
    """A connection pool for queries, closed when the test ends."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    test.addCleanup(pool.closeCachedConnections)
    return pool


async def query(
    reactor: KeyringReactor,
    pool: HTTPConnectionPool,
    port: int,
    server_name: str,
    key_ids: Optional[list[str]] = None,
) -> tuple[int, dict[str, Any]]:
    """POST ``/_matrix/key/v2/query`` for one server to the instance on ``port``;
    (status, decoded body)."""
    criteria: dict[str, dict[str, int]] = {key: {} for key in key_ids or ()}
    body = json.dumps({"server_keys": {server_name: criteria}}).encode()
    client = HTTPClient(Agent(reactor, pool=pool))
    response = await client.post(
        "http://127.0.0.1:%d/_matrix/key/v2/query" % port,
        data=body,
        headers=Headers({b"Content-Type": [b"application/json"]}),
        timeout=60,
    )
    content = await response.content()
    return response.code, json.loads(content)


def served_key_ids(answer: dict[str, Any], server_name: str) -> set[str]:
    """The key ids of ``server_name`` in a query answer."""
    return {
        key_id
        for entry in answer.get("server_keys", [])
        if entry.get("server_name") == server_name
        for key_id in entry.get("verify_keys", {})
    }


class ServeProcessesCase(TestCase):
    """A test with real ``serve`` processes: a fake origin (``self.origins``), a client
    pool (``self.pool``) and a folder of its own (``self.directory``)."""

    timeout = 120

    def setUp(self) -> None:
        self.reactor = global_reactor()
        self.clock = cast(IReactorTime, self.reactor)
        self.directory = os.path.abspath(self.mktemp())
        self.origins = Origins(self, self.reactor, self.directory)
        self.pool = new_pool(self.reactor, self)
