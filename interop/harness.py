"""Real Synapse homeservers and our standalone server on 127.0.0.1, for interop tests.

:class:`InteropTestCase` is a trial ``TestCase`` that starts processes and always stops
them (SIGTERM, then SIGKILL after :data:`STOP_GRACE_S`), in its cleanups, even when the
test fails. Every wait is bounded, and every request goes to 127.0.0.1:

* :meth:`InteropTestCase.start_synapse` writes a throwaway homeserver directory
  (``homeserver.yaml``, a log config, a signing key, a TLS certificate for ``localhost``
  and ``127.0.0.1``), runs ``<synapse python> -m synapse.app.homeserver`` and waits
  for ``/health``. The homeserver has a plain-HTTP listener (for the test's own
  requests) and a TLS listener (what other servers reach it on, since Synapse's
  outbound federation is HTTPS only), both with ``[federation, keys]``; its server
  name carries the TLS port (``127.0.0.1:<port>`` or ``localhost:<port>``), so no DNS,
  ``.well-known`` or SRV is involved. ``trusted_key_servers`` is always written
  (``[]`` by default: Synapse's default, matrix.org, must never be contacted).
* :meth:`InteropTestCase.start_keyring_server` writes a config for our standalone
  server with a TLS listener and runs ``python -m keyring_module serve``, waiting for
  its "Listening on" line.
* ``start_synapse(keyring_module={...})`` also loads ``keyring_module.KeyringModule``
  (signing with the homeserver's own key) and waits until its key store is ready.
* :func:`send_signed_request` sends an ``X-Matrix``-signed federation request, which
  makes a Synapse fetch (and check) the keys of the origin named in it.

Certificates come from one throwaway CA per test (:class:`LoopbackCA`); the test's
HTTP client and our own servers trust it, Synapse is told not to check certificates
(``federation_verify_certificates: false``).

The Synapse python comes from ``$KEYRING_SYNAPSE_PYTHON`` (made by
``.ci/install_synapse.sh``); without it the tests skip, or fail under ``CI=true``.

Example::

    class MyTests(InteropTestCase):
        @report_process_logs
        async def test_something(self) -> None:
            ours = await self.start_keyring_server()
            synapse = await self.start_synapse()
            result = await self.request_json(
                "POST", synapse.http_url + "/_matrix/key/v2/query", {"server_keys": {}}
            )
"""

import atexit
import functools
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Coroutine, Mapping, Optional, Sequence, TypeVar
from urllib.parse import urlsplit

import treq
import trustme
import yaml
from signedjson.key import (
    encode_verify_key_base64,
    generate_signing_key,
    get_verify_key,
    write_signing_keys,
)
from signedjson.sign import sign_json
from treq.client import HTTPClient
from twisted.internet import defer
from twisted.internet import reactor as _global_reactor
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IResolutionReceiver,
)
from twisted.internet.ssl import Certificate
from twisted.internet.task import deferLater
from twisted.trial.unittest import FailTest, SkipTest, TestCase
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.http_headers import Headers
from zope.interface import implementer

from keyring_module.http.ipfilter import FinishedResolution
from keyring_module.signing import key_id_of, write_new_signing_key

reactor: Any = _global_reactor

#: Environment variable naming the python of a virtualenv with matrix-synapse installed.
SYNAPSE_PYTHON_ENV = "KEYRING_SYNAPSE_PYTHON"
#: The only address the tests listen on and connect to.
LOOPBACK_HOST = "127.0.0.1"
#: Bound on a Synapse's start, until ``/health`` answers 200 (cold start is about 2 s).
SYNAPSE_HEALTH_TIMEOUT_S = 60.0
#: Bound on our standalone server's start, until it logs "Listening on".
KEYRING_READY_TIMEOUT_S = 30.0
#: Time a process gets to exit after SIGTERM before it is sent SIGKILL.
STOP_GRACE_S = 10.0
#: Time to wait for a process to disappear after SIGKILL.
KILL_WAIT_S = 5.0
#: Bound on any single HTTP request made by the tests.
REQUEST_TIMEOUT_S = 15.0
#: How often readiness is polled.
POLL_INTERVAL_S = 0.1
#: Lines of each log file shown when a test fails.
LOG_TAIL_LINES = 40

INSTALL_HINT = (
    "run .ci/install_synapse.sh and set "
    '%s="$(bash .ci/install_synapse.sh | tail -n 1)"' % SYNAPSE_PYTHON_ENV
)

_LOOPBACK_NAMES = frozenset({"localhost", LOOPBACK_HOST})

TC = TypeVar("TC", bound="InteropTestCase")


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


def sleep(seconds: float) -> "defer.Deferred[None]":
    """A Deferred that fires after ``seconds`` on the global reactor."""
    return deferLater(reactor, seconds, lambda: None)


def is_ci() -> bool:
    """True when running under CI (``CI=true``), where a missing Synapse is a failure."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def synapse_python(test: TestCase) -> str:
    """The Synapse virtualenv's python, from ``$KEYRING_SYNAPSE_PYTHON``.

    Raises:
        SkipTest: the variable is unset (outside CI).
        FailTest: the variable is unset under CI, or names no executable file.
    """
    path = os.environ.get(SYNAPSE_PYTHON_ENV, "").strip()
    if not path:
        if is_ci():
            test.fail(
                "%s is not set; under CI (CI=true) the interop tests must run: %s"
                % (SYNAPSE_PYTHON_ENV, INSTALL_HINT)
            )
        raise SkipTest("no Synapse to test against: " + INSTALL_HINT)
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        test.fail("%s=%r is not an executable file: %s" % (SYNAPSE_PYTHON_ENV, path, INSTALL_HINT))
    return path


def free_ports(count: int, exclude: Sequence[int] = ()) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that are free right now.

    The sockets are held open together while choosing, so the ports differ from each
    other; ``exclude`` lists ports already handed out (and maybe not yet bound).
    """
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(s)
            s.bind((LOOPBACK_HOST, 0))
            port = int(s.getsockname()[1])
            if port not in exclude:
                ports.append(port)
    finally:
        for s in held:
            s.close()
    return ports


def assert_loopback_url(url: str) -> None:
    """Refuse (``ValueError``) any URL whose host is not 127.0.0.1 or localhost."""
    host = urlsplit(url).hostname
    if host not in _LOOPBACK_NAMES:
        raise ValueError("interop tests only talk to loopback, not %r" % (url,))


def file_contains(path: str, needle: str) -> bool:
    """True when the file exists and contains ``needle``."""
    try:
        with open(path, "rb") as f:
            return needle.encode("utf-8") in f.read()
    except FileNotFoundError:
        return False


def tail_file(path: str, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a text file (or a note that it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            data = f.read()
    except FileNotFoundError:
        return "(no file %s)" % (path,)
    text = data.decode("utf-8", "replace").splitlines()[-lines:]
    return "\n".join(text)


# ---------------------------------------------------------------------------
# Certificates
# ---------------------------------------------------------------------------


class LoopbackCA:
    """A throwaway certificate authority issuing certificates for loopback servers.

    Args:
        directory: where ``ca.pem`` (the CA certificate) is written.

    Example::

        ca = LoopbackCA(tmpdir)
        cert_path, key_path = ca.issue(server_dir)   # valid for localhost and 127.0.0.1
    """

    def __init__(self, directory: str) -> None:
        self._ca = trustme.CA(organization_name="keyring_module interop tests")
        self.cert_path = os.path.join(directory, "ca.pem")
        self._ca.cert_pem.write_to_path(self.cert_path)

    def issue(self, directory: str) -> tuple[str, str]:
        """Write ``tls.crt`` (leaf + chain) and ``tls.key`` into ``directory``.

        The certificate is valid for ``localhost`` and ``127.0.0.1``.

        Returns:
            ``(certificate_path, private_key_path)``.
        """
        leaf = self._ca.issue_cert("localhost", LOOPBACK_HOST)
        cert_path = os.path.join(directory, "tls.crt")
        key_path = os.path.join(directory, "tls.key")
        with open(cert_path, "wb") as f:
            for blob in leaf.cert_chain_pems:
                f.write(blob.bytes())
        leaf.private_key_pem.write_to_path(key_path)
        return cert_path, key_path

    def trust_root(self) -> Certificate:
        """The CA certificate, as a Twisted trust root for HTTPS clients."""
        return Certificate.loadPEM(self._ca.cert_pem.bytes())


# ---------------------------------------------------------------------------
# Name resolution that can only ever yield 127.0.0.1
# ---------------------------------------------------------------------------


@implementer(IHostnameResolver)
class LoopbackOnlyResolver:
    """Resolves ``localhost`` and ``127.0.0.1`` to 127.0.0.1, and every other name to nothing.

    Give it to clients under test (e.g. ``MatrixFederationClient(..., resolver=...)``)
    so that no test can reach a non-loopback address, whatever name it is given.
    """

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Optional[Sequence[type[IAddress]]] = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        resolution = FinishedResolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        if hostName in _LOOPBACK_NAMES and (addressTypes is None or IPv4Address in addressTypes):
            resolutionReceiver.addressResolved(IPv4Address("TCP", LOOPBACK_HOST, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


def loopback_allowlist() -> tuple[ipaddress.IPv4Network, ...]:
    """``federation.ip_range_allowlist`` carving 127.0.0.1 (only) out of the denylist."""
    return (ipaddress.IPv4Network(LOOPBACK_HOST + "/32"),)


def loopback_federation_config(ca: "LoopbackCA") -> dict[str, Any]:
    """Our ``federation:`` config section for reaching the other test servers.

    Certificates are checked against ``ca``; only 127.0.0.1 is carved out of the
    default denylist, so nothing else (private or public) can be reached either way.
    """
    return {
        "verify_tls": True,
        "ca_file": ca.cert_path,
        "ip_range_allowlist": [str(n) for n in loopback_allowlist()],
        "request_timeout": "10s",
    }


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------

# Popen objects still running, killed at interpreter exit if a cleanup never ran
# (e.g. trial interrupted by Ctrl-C twice).
_RUNNING: dict[int, "subprocess.Popen[bytes]"] = {}


def _kill_leftovers() -> None:
    for popen in list(_RUNNING.values()):
        if popen.poll() is None:
            popen.kill()
            try:
                popen.wait(KILL_WAIT_S)
            except subprocess.TimeoutExpired:
                pass


atexit.register(_kill_leftovers)


class ManagedProcess:
    """A child process whose output goes to a file, stopped by its PID.

    Args:
        name: shown in failure messages, e.g. ``"synapse 127.0.0.1:8449"``.
        argv: the command.
        cwd: its working directory.
        output_path: file receiving its stdout and stderr.
        log_paths: other log files it writes (shown, with the output, on failure).
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        cwd: str,
        output_path: str,
        log_paths: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.output_path = output_path
        self.log_paths = [output_path, *log_paths]
        with open(output_path, "ab") as out:
            self._popen = subprocess.Popen(
                self.argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        _RUNNING[self._popen.pid] = self._popen

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self._popen.pid

    @property
    def returncode(self) -> Optional[int]:
        """The exit status once it has exited (negative: killed by that signal), else None."""
        return self._popen.poll()

    def running(self) -> bool:
        """True while the process has not exited."""
        return self._popen.poll() is None

    async def stop(self) -> Optional[int]:
        """SIGTERM, then SIGKILL after :data:`STOP_GRACE_S`; returns the exit status."""
        popen = self._popen
        try:
            if popen.poll() is None:
                popen.send_signal(signal.SIGTERM)
                await self._wait_exit(STOP_GRACE_S)
            if popen.poll() is None:
                popen.kill()
                await self._wait_exit(KILL_WAIT_S)
            return popen.poll()
        finally:
            if popen.poll() is not None:
                _RUNNING.pop(popen.pid, None)

    async def _wait_exit(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self._popen.poll() is None and time.monotonic() < deadline:
            await sleep(POLL_INTERVAL_S)

    def describe(self) -> str:
        """PID, status and the tail of each log file, for failure messages."""
        status = "running" if self.running() else "exited with %s" % (self.returncode,)
        parts = ["=== %s (pid %d, %s) ===" % (self.name, self.pid, status)]
        for path in self.log_paths:
            parts.append("--- last %d lines of %s ---" % (LOG_TAIL_LINES, path))
            parts.append(tail_file(path))
        return "\n".join(parts)


class ProcessStartFailure(FailTest):
    """A process did not become ready; the message already holds its log tail."""


# ---------------------------------------------------------------------------
# Server descriptions and config writers
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TrustedKeyServerSpec:
    """A ``trusted_key_servers`` entry: a notary and the keys its answers must carry.

    Attributes:
        server_name: the notary's server name (with port, e.g. ``localhost:8450``).
        verify_keys: key id -> unpadded base64 ed25519 public key.
    """

    server_name: str
    verify_keys: Mapping[str, str]

    def to_config(self) -> dict[str, Any]:
        """The entry as written in homeserver.yaml and in our config."""
        if not self.verify_keys:
            raise ValueError("a trusted key server needs verify_keys in these tests")
        return {"server_name": self.server_name, "verify_keys": dict(self.verify_keys)}


@dataclass(frozen=True)
class ModuleSpec:
    """A Synapse ``modules:`` entry, e.g. ``ModuleSpec("keyring_module.KeyringModule", {...})``."""

    module: str
    config: Mapping[str, Any] = field(default_factory=dict)


#: Dotted path of our Synapse module.
KEYRING_MODULE = "keyring_module.KeyringModule"
#: Logged by our module once its key store is open and ``/v2/query`` answers.
KEYRING_MODULE_READY_LINE = "keyring_module key store ready"


def keyring_module_spec(
    directory: str,
    ca: "LoopbackCA",
    trusted_key_servers: Sequence["TrustedKeyServerSpec"] = (),
    overrides: Optional[Mapping[str, Any]] = None,
) -> ModuleSpec:
    """Our module's entry for a homeserver in ``directory``, signing with its own key.

    Args:
        directory: the homeserver directory (its key is ``directory/signing.key``).
        ca: trusted for the module's outbound requests (only 127.0.0.1 is reachable).
        trusted_key_servers: the module's notaries.
        overrides: top-level module config keys replacing the defaults.
    """
    config: dict[str, Any] = {
        "signing_key_path": os.path.join(directory, "signing.key"),
        "database": {"backend": "sqlite", "path": os.path.join(directory, "keyring.db")},
        "trusted_key_servers": [t.to_config() for t in trusted_key_servers],
        "federation": loopback_federation_config(ca),
    }
    config.update(overrides or {})
    return ModuleSpec(KEYRING_MODULE, config)


@dataclass(kw_only=True)
class _Server:
    """What both kinds of server share: a directory, a name and a signing key."""

    directory: str
    server_name: str
    signing_key: Any  # signedjson SigningKey
    config_path: str
    process: Optional[ManagedProcess] = None

    @property
    def key_id(self) -> str:
        """Our signing key's id, e.g. ``ed25519:a_AbCd``."""
        return key_id_of(self.signing_key)

    @property
    def verify_key(self) -> Any:
        """The public half of the signing key (a signedjson VerifyKey)."""
        return get_verify_key(self.signing_key)

    @property
    def verify_key_base64(self) -> str:
        """The public key as unpadded base64, as published in ``verify_keys``."""
        return str(encode_verify_key_base64(self.verify_key))

    def as_trusted_key_server(self) -> TrustedKeyServerSpec:
        """This server as a notary entry for another server's ``trusted_key_servers``."""
        return TrustedKeyServerSpec(self.server_name, {self.key_id: self.verify_key_base64})


@dataclass(kw_only=True)
class SynapseHomeserver(_Server):
    """A Synapse homeserver directory (and, once started, its process)."""

    http_port: int
    tls_port: int
    metrics_port: Optional[int] = None

    @property
    def metrics_url(self) -> str:
        """URL of its Prometheus metrics (only when started with ``metrics=True``)."""
        if self.metrics_port is None:
            raise ValueError("this homeserver has no metrics listener")
        return "http://%s:%d/_synapse/metrics" % (LOOPBACK_HOST, self.metrics_port)

    @property
    def http_url(self) -> str:
        """Base URL of the plain-HTTP ``[federation, keys]`` listener."""
        return "http://%s:%d" % (LOOPBACK_HOST, self.http_port)

    @property
    def tls_url(self) -> str:
        """Base URL of the TLS ``[federation, keys]`` listener (the server name's port)."""
        return "https://%s:%d" % (LOOPBACK_HOST, self.tls_port)

    @property
    def log_path(self) -> str:
        """Synapse's own log file."""
        return os.path.join(self.directory, "homeserver.log")


@dataclass(kw_only=True)
class KeyringServer(_Server):
    """Our standalone server's directory (and, once started, its process)."""

    port: int

    @property
    def url(self) -> str:
        """Base URL of its TLS listener."""
        return "https://%s:%d" % (LOOPBACK_HOST, self.port)


def _synapse_log_config(log_path: str, level: str) -> dict[str, Any]:
    return {
        "version": 1,
        "formatters": {
            "precise": {
                "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - "
                "%(request)s - %(message)s"
            }
        },
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "formatter": "precise",
                "filename": log_path,
                "encoding": "utf8",
            }
        },
        "loggers": {"synapse.storage.SQL": {"level": "WARNING"}},
        "root": {"level": level, "handlers": ["file"]},
        "disable_existing_loggers": False,
    }


def write_synapse_config(
    directory: str,
    *,
    ca: LoopbackCA,
    http_port: int,
    tls_port: int,
    server_host: str = LOOPBACK_HOST,
    trusted_key_servers: Sequence[TrustedKeyServerSpec] = (),
    modules: Sequence[ModuleSpec] = (),
    log_level: str = "INFO",
    metrics_port: Optional[int] = None,
) -> SynapseHomeserver:
    """Write a throwaway, loopback-only homeserver directory.

    Args:
        directory: an existing, empty directory.
        ca: issues the TLS listener's certificate.
        http_port: the plain-HTTP listener (for the tests' own requests).
        tls_port: the TLS listener; the server name is ``<server_host>:<tls_port>``.
        server_host: ``127.0.0.1`` or ``localhost``.
        trusted_key_servers: the notaries it asks (none by default; never matrix.org).
        modules: ``modules:`` entries (the module must be importable by Synapse's python).
        log_level: root log level of ``homeserver.log``.
        metrics_port: when given, a Prometheus ``metrics`` listener on this port.

    Returns:
        The homeserver, not started.
    """
    if server_host not in _LOOPBACK_NAMES:
        raise ValueError("server_host must be a loopback name, not %r" % (server_host,))
    server_name = "%s:%d" % (server_host, tls_port)
    key = generate_signing_key("a_" + os.urandom(3).hex())
    key_path = os.path.join(directory, "signing.key")
    with open(key_path, "w") as f:
        write_signing_keys(f, [key])
    cert_path, tls_key_path = ca.issue(directory)
    log_path = os.path.join(directory, "homeserver.log")
    log_config_path = os.path.join(directory, "log.config")
    with open(log_config_path, "w") as f:
        yaml.safe_dump(_synapse_log_config(log_path, log_level), f)

    def listener(port: int, tls: bool) -> dict[str, Any]:
        return {
            "port": port,
            "bind_addresses": [LOOPBACK_HOST],
            "type": "http",
            "tls": tls,
            "x_forwarded": False,
            "resources": [{"names": ["federation", "keys"], "compress": False}],
        }

    config: dict[str, Any] = {
        "server_name": server_name,
        "pid_file": os.path.join(directory, "homeserver.pid"),
        "listeners": [listener(http_port, False), listener(tls_port, True)],
        "tls_certificate_path": cert_path,
        "tls_private_key_path": tls_key_path,
        "database": {
            "name": "sqlite3",
            "args": {"database": os.path.join(directory, "homeserver.db")},
        },
        "log_config": log_config_path,
        "media_store_path": os.path.join(directory, "media_store"),
        "signing_key_path": key_path,
        "report_stats": False,
        "enable_metrics": False,
        "registration_shared_secret": os.urandom(16).hex(),
        "macaroon_secret_key": os.urandom(16).hex(),
        "form_secret": os.urandom(16).hex(),
        # Always explicit: the default (matrix.org) must never be contacted.
        "trusted_key_servers": [t.to_config() for t in trusted_key_servers],
        "suppress_key_server_warning": True,
        # Loopback federation between test servers (never do this in production):
        # accept the throwaway certificates, and allow connecting to 127.0.0.1.
        "federation_verify_certificates": False,
        "ip_range_blacklist": [],
    }
    if modules:
        config["modules"] = [{"module": m.module, "config": dict(m.config)} for m in modules]
    if metrics_port is not None:
        config["enable_metrics"] = True
        config["listeners"].append(
            {"port": metrics_port, "bind_addresses": [LOOPBACK_HOST], "type": "metrics"}
        )
    config_path = os.path.join(directory, "homeserver.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return SynapseHomeserver(
        directory=directory,
        server_name=server_name,
        signing_key=key,
        config_path=config_path,
        http_port=http_port,
        tls_port=tls_port,
        metrics_port=metrics_port,
    )


def write_keyring_config(
    directory: str,
    *,
    ca: LoopbackCA,
    port: int,
    server_host: str = "localhost",
    trusted_key_servers: Sequence[TrustedKeyServerSpec] = (),
    overrides: Optional[Mapping[str, Any]] = None,
) -> KeyringServer:
    """Write a config (and signing key) for our standalone server with one TLS listener.

    Its outbound federation trusts ``ca`` and may connect to 127.0.0.1 only (carved out
    of the default denylist), so it can fetch from the other test servers.

    Args:
        directory: an existing, empty directory.
        ca: issues the listener's certificate, and is trusted for outbound requests.
        port: the TLS listener's port; the server name is ``<server_host>:<port>``.
        server_host: ``localhost`` or ``127.0.0.1``.
        trusted_key_servers: notaries it asks.
        overrides: top-level config keys replacing the defaults written here.

    Returns:
        The server, not started.
    """
    if server_host not in _LOOPBACK_NAMES:
        raise ValueError("server_host must be a loopback name, not %r" % (server_host,))
    key_path = os.path.join(directory, "signing.key")
    key = write_new_signing_key(key_path)
    cert_path, tls_key_path = ca.issue(directory)
    config: dict[str, Any] = {
        "server_name": "%s:%d" % (server_host, port),
        "signing_key_path": key_path,
        "listeners": [
            {
                "port": port,
                "bind_addresses": [LOOPBACK_HOST],
                "tls": True,
                "tls_certificate_path": cert_path,
                "tls_private_key_path": tls_key_path,
            }
        ],
        "database": {"backend": "sqlite", "path": os.path.join(directory, "keyring.db")},
        "trusted_key_servers": [t.to_config() for t in trusted_key_servers],
        "federation": loopback_federation_config(ca),
        "logging": {"level": "INFO"},
    }
    config.update(overrides or {})
    config_path = os.path.join(directory, "config.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return KeyringServer(
        directory=directory,
        server_name=config["server_name"],
        signing_key=key,
        config_path=config_path,
        port=port,
    )


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpResult:
    """A response: status code and body bytes."""

    code: int
    body: bytes

    def json(self) -> Any:
        """The body decoded as JSON (``ValueError`` if it is not)."""
        return json.loads(self.body)


async def http_request(
    client: HTTPClient,
    method: str,
    url: str,
    body: Optional[bytes] = None,
    headers: Optional[Mapping[str, str]] = None,
    timeout: float = REQUEST_TIMEOUT_S,
) -> HttpResult:
    """One request to a loopback URL, reading the whole body, all within ``timeout`` seconds.

    Raises:
        twisted.internet.defer.TimeoutError: the exchange took longer.
    """
    assert_loopback_url(url)

    async def exchange() -> HttpResult:
        response = await client.request(
            method,
            url,
            data=body,
            headers=Headers({k: [v] for k, v in (headers or {}).items()}),
        )
        content = await treq.content(response)
        return HttpResult(int(response.code), bytes(content))

    d = defer.ensureDeferred(exchange())
    d.addTimeout(timeout, reactor)
    return await d


def x_matrix_authorization(
    *,
    origin: str,
    signing_key: Any,
    destination: str,
    method: str,
    uri: str,
    content: Optional[object] = None,
) -> str:
    """The ``Authorization: X-Matrix ...`` header value for a federation request.

    Args:
        origin: the sending server's name.
        signing_key: its signedjson SigningKey.
        destination: the receiving server's name.
        method: ``GET``, ``POST``...
        uri: path and query string, exactly as sent.
        content: the JSON body, if any.
    """
    request: dict[str, Any] = {
        "method": method,
        "uri": uri,
        "origin": origin,
        "destination": destination,
    }
    if content is not None:
        request["content"] = content
    signed = sign_json(request, origin, signing_key)
    key_id = key_id_of(signing_key)
    sig = signed["signatures"][origin][key_id]
    return 'X-Matrix origin="%s",destination="%s",key="%s",sig="%s"' % (
        origin,
        destination,
        key_id,
        sig,
    )


async def send_signed_request(
    client: HTTPClient,
    *,
    origin: str,
    signing_key: Any,
    destination: "SynapseHomeserver",
    path: Optional[str] = None,
    method: str = "GET",
    content: Optional[object] = None,
) -> HttpResult:
    """Send an X-Matrix-signed federation request to a Synapse's plain-HTTP listener.

    Verifying it makes the Synapse fetch ``origin``'s keys (store, then its
    ``trusted_key_servers``, then the origin directly). A 401 means the signature could
    not be verified; anything else means it was.

    Args:
        client: the HTTP client to send with.
        origin: the server the request claims to come from.
        signing_key: the key to sign with (the origin's, or a wrong one).
        destination: the receiving homeserver.
        path: defaults to a profile query for a user that does not exist on
            ``destination`` (404 once authenticated).
        method: the HTTP method.
        content: JSON body, if any.
    """
    if path is None:
        path = "/_matrix/federation/v1/query/profile?user_id=@nobody:%s" % (
            destination.server_name,
        )
    headers = {
        "Authorization": x_matrix_authorization(
            origin=origin,
            signing_key=signing_key,
            destination=destination.server_name,
            method=method,
            uri=path,
            content=content,
        )
    }
    body = None
    if content is not None:
        body = json.dumps(content).encode("utf-8")
        headers["Content-Type"] = "application/json"
    return await http_request(client, method, destination.http_url + path, body, headers)


# ---------------------------------------------------------------------------
# The test case
# ---------------------------------------------------------------------------


class InteropTestCase(TestCase):
    """Base class: starts real servers on 127.0.0.1 and stops them all in cleanup.

    Attributes:
        synapse_python: the Synapse virtualenv's python.
        ca: this test's certificate authority.
        http: an HTTP client trusting ``ca`` (for requests to 127.0.0.1 only).
        processes: every process started by this test, in start order.
    """

    #: trial's per-test bound (seconds); each test normally takes a few seconds.
    timeout = 120

    def setUp(self) -> None:
        self.synapse_python = synapse_python(self)
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        self.ca = LoopbackCA(self.workdir)
        self.processes: list[ManagedProcess] = []
        self._ports: list[int] = []
        self._directories = 0
        # Registered first, so it runs last: stops every process, all at once.
        self.addCleanup(self._stop_all_processes)
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        self.http = HTTPClient(
            Agent(
                reactor,
                contextFactory=BrowserLikePolicyForHTTPS(trustRoot=self.ca.trust_root()),
                pool=pool,
            )
        )

    def _stop_all_processes(self) -> "defer.Deferred[Any]":
        return defer.gatherResults(
            [defer.ensureDeferred(p.stop()) for p in self.processes], consumeErrors=True
        )

    # -- resources ----------------------------------------------------------

    def allocate_ports(self, count: int) -> list[int]:
        """``count`` free loopback ports, distinct from those this test already got."""
        ports = free_ports(count, exclude=self._ports)
        self._ports.extend(ports)
        return ports

    def new_directory(self, prefix: str) -> str:
        """A new empty directory under this test's temporary directory."""
        self._directories += 1
        path = os.path.join(self.workdir, "%s%d" % (prefix, self._directories))
        os.makedirs(path)
        return path

    def spawn(
        self, name: str, argv: Sequence[str], cwd: str, log_paths: Sequence[str] = ()
    ) -> ManagedProcess:
        """Start a process (output to ``cwd/output.log``) that cleanup will stop."""
        process = ManagedProcess(name, argv, cwd, os.path.join(cwd, "output.log"), log_paths)
        self.processes.append(process)
        return process

    def process_logs(self) -> str:
        """Status and log tails of every process this test started."""
        return "\n".join(p.describe() for p in self.processes) or "(no processes started)"

    # -- servers --------------------------------------------------------------

    async def start_synapse(
        self,
        *,
        server_host: str = LOOPBACK_HOST,
        trusted_key_servers: Sequence[TrustedKeyServerSpec] = (),
        modules: Sequence[ModuleSpec] = (),
        keyring_module: Optional[Mapping[str, Any]] = None,
        log_level: str = "INFO",
        metrics: bool = False,
    ) -> SynapseHomeserver:
        """Write a homeserver directory, start Synapse, wait until ``/health`` says 200.

        Fails the test (with Synapse's log tail) if it is not healthy within
        :data:`SYNAPSE_HEALTH_TIMEOUT_S` or exits first. Arguments as in
        :func:`write_synapse_config`, plus:

        Args:
            keyring_module: when given (even ``{}``), load our module with these config
                overrides (see :func:`keyring_module_spec`) and also wait for its
                store to be ready.
            metrics: also serve Prometheus metrics (see ``SynapseHomeserver.metrics_url``).
        """
        http_port, tls_port = self.allocate_ports(2)
        metrics_port = self.allocate_ports(1)[0] if metrics else None
        directory = self.new_directory("synapse")
        if keyring_module is not None:
            modules = [*modules, keyring_module_spec(directory, self.ca, overrides=keyring_module)]
        homeserver = write_synapse_config(
            directory,
            ca=self.ca,
            http_port=http_port,
            tls_port=tls_port,
            server_host=server_host,
            trusted_key_servers=trusted_key_servers,
            modules=modules,
            log_level=log_level,
            metrics_port=metrics_port,
        )
        homeserver.process = self.spawn(
            "synapse %s" % homeserver.server_name,
            [self.synapse_python, "-m", "synapse.app.homeserver", "-c", homeserver.config_path],
            cwd=directory,
            log_paths=[homeserver.log_path],
        )
        await self._wait_ready(
            homeserver.process,
            SYNAPSE_HEALTH_TIMEOUT_S,
            "GET %s/health -> 200" % homeserver.http_url,
            lambda: self._is_healthy(homeserver.http_url + "/health"),
        )
        if keyring_module is not None:
            await self._wait_for_line(
                homeserver.process,
                homeserver.log_path,
                KEYRING_MODULE_READY_LINE,
                SYNAPSE_HEALTH_TIMEOUT_S,
            )
        return homeserver

    async def start_keyring_server(
        self,
        *,
        server_host: str = "localhost",
        trusted_key_servers: Sequence[TrustedKeyServerSpec] = (),
        overrides: Optional[Mapping[str, Any]] = None,
    ) -> KeyringServer:
        """Write a config, start ``python -m keyring_module serve``, wait for "Listening on".

        Fails the test (with the server's output) if the line does not appear within
        :data:`KEYRING_READY_TIMEOUT_S` or the process exits first. Arguments as in
        :func:`write_keyring_config`.
        """
        (port,) = self.allocate_ports(1)
        directory = self.new_directory("keyring")
        server = write_keyring_config(
            directory,
            ca=self.ca,
            port=port,
            server_host=server_host,
            trusted_key_servers=trusted_key_servers,
            overrides=overrides,
        )
        process = server.process = self.spawn(
            "keyring_module %s" % server.server_name,
            [sys.executable, "-m", "keyring_module", "serve", "--config", server.config_path],
            cwd=directory,
        )
        await self._wait_for_line(
            process,
            process.output_path,
            "Listening on https://%s:%d" % (LOOPBACK_HOST, port),
            KEYRING_READY_TIMEOUT_S,
        )
        return server

    async def _is_healthy(self, url: str) -> bool:
        try:
            result = await http_request(self.http, "GET", url, timeout=2.0)
        except Exception:
            return False
        return result.code == 200

    async def _wait_for_line(
        self, process: ManagedProcess, path: str, needle: str, timeout: float
    ) -> None:
        """Wait until the file at ``path`` (a log of ``process``) contains ``needle``."""

        async def logged() -> bool:
            return file_contains(path, needle)

        await self._wait_ready(process, timeout, repr(needle), logged)

    async def _wait_ready(
        self,
        process: ManagedProcess,
        timeout: float,
        what: str,
        ready: Callable[[], Coroutine[Any, Any, bool]],
    ) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if await ready():
                return
            if not process.running():
                raise ProcessStartFailure(
                    "%s exited before %s\n%s" % (process.name, what, process.describe())
                )
            if time.monotonic() >= deadline:
                raise ProcessStartFailure(
                    "%s: no %s within %.0f s\n%s"
                    % (process.name, what, timeout, process.describe())
                )
            await sleep(POLL_INTERVAL_S)

    # -- requests -------------------------------------------------------------

    async def request_json(
        self, method: str, url: str, content: Optional[object] = None
    ) -> HttpResult:
        """A JSON request to a loopback URL with the test's client (HTTPS trusts ``ca``)."""
        body = None if content is None else json.dumps(content).encode("utf-8")
        headers = {"Content-Type": "application/json"} if body is not None else {}
        return await http_request(self.http, method, url, body, headers)

    async def get_json_ok(self, url: str) -> Any:
        """GET ``url``, fail unless 200, return the decoded JSON body."""
        result = await self.request_json("GET", url)
        self.assertEqual(result.code, 200, "GET %s: %r" % (url, result.body[:500]))
        return result.json()


def report_process_logs(
    test_method: Callable[[TC], Coroutine[Any, Any, None]],
) -> Callable[[TC], Coroutine[Any, Any, None]]:
    """Decorate an async test so that any failure also shows every process's log tail.

    Failures of a process start already carry the log tail and pass through unchanged;
    skips pass through.
    """

    @functools.wraps(test_method)
    async def wrapper(self: TC) -> None:
        try:
            await test_method(self)
        except (SkipTest, ProcessStartFailure):
            raise
        except FailTest as e:
            raise FailTest("%s\n\n%s" % (e, self.process_logs())) from e
        except Exception as e:
            raise FailTest(
                "%s\n%s" % ("".join(traceback.format_exception(e)), self.process_logs())
            ) from e

    return wrapper
