"""The standalone server: real processes and real listeners on 127.0.0.1 only."""

import contextlib
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Optional

import trustme
import yaml
from signedjson.key import decode_verify_key_bytes
from signedjson.sign import verify_signed_json
from treq.client import HTTPClient
from twisted.internet import reactor as global_reactor
from twisted.internet.ssl import Certificate
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS
from unpaddedbase64 import decode_base64

from keyring_module.cli import main as cli_main
from keyring_module.clock import global_reactor as typed_global_reactor
from keyring_module.config_file import load_config_file
from keyring_module.server import KeyServer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_CONFIG = os.path.join(REPO_ROOT, "sample_config.yaml")
STARTUP_TIMEOUT_S = 20.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_sample_config(directory: str, port: int, **overrides: Any) -> str:
    """Copy sample_config.yaml into ``directory`` with the listener on ``port``."""
    with open(SAMPLE_CONFIG) as f:
        raw = yaml.safe_load(f)
    raw["listeners"][0]["port"] = port
    raw.update(overrides)
    path = os.path.join(directory, "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    return path


def verify_server_response(
    test: SynchronousTestCase, body: bytes, server_name: str
) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(body)
    test.assertEqual(obj["server_name"], server_name)
    for key_id, entry in obj["verify_keys"].items():
        verify_key = decode_verify_key_bytes(key_id, decode_base64(entry["key"]))
        verify_signed_json(obj, server_name, verify_key)
    return obj


class ServeProcessCase(SynchronousTestCase):
    """Runs ``python -m keyring_module serve`` as the README does, in a subprocess."""

    def start(self, config_path: str) -> "subprocess.Popen[str]":
        proc = subprocess.Popen(
            [sys.executable, "-m", "keyring_module", "serve", "--config", config_path],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=os.path.dirname(config_path),
            env=dict(os.environ, PYTHONPATH=REPO_ROOT),  # this tree's code, not an installed one
        )

        def cleanup() -> None:
            if proc.poll() is None:
                proc.kill()
            proc.wait(5)
            assert proc.stdout is not None
            proc.stdout.close()

        self.addCleanup(cleanup)
        return proc

    def wait_for_line(self, proc: "subprocess.Popen[str]", needle: str) -> list[str]:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if needle in line:
                return lines
        self.fail("no %r in output within %ss:\n%s" % (needle, STARTUP_TIMEOUT_S, "".join(lines)))


class ServeProcessTests(ServeProcessCase):
    """``python -m keyring_module serve`` as the README runs it, in a subprocess."""

    def test_serve_answers_and_stops_on_sigterm(self) -> None:
        """The sample config serves a verifiable /server on loopback and exits 0 on SIGTERM."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        port = free_port()
        proc = self.start(write_sample_config(directory, port))
        lines = self.wait_for_line(proc, "Listening on http://127.0.0.1:%d" % port)
        self.assertTrue(any("Generated a new signing key" in line for line in lines))
        with urllib.request.urlopen(
            "http://127.0.0.1:%d/_matrix/key/v2/server" % port, timeout=10
        ) as r:
            self.assertEqual(r.headers["Content-Type"], "application/json")
            verify_server_response(self, r.read(), "localhost:8080")
        self.assertEqual(
            os.stat(os.path.join(directory, "notary.signing.key")).st_mode & 0o777, 0o600
        )
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(15), 0)

    def test_port_in_use_is_a_clear_error(self) -> None:
        """A port already taken gives a message naming it and a non-zero exit."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            proc = self.start(write_sample_config(directory, port))
            self.assertEqual(proc.wait(STARTUP_TIMEOUT_S), 1)
            assert proc.stdout is not None
            output = proc.stdout.read()
        self.assertIn("listeners.0: cannot listen on 127.0.0.1 port %d" % port, output)

    def test_bad_config_exits_with_path(self) -> None:
        """A bad config prints ``path: problem`` and exits 1 without starting."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = write_sample_config(directory, free_port(), federation={"request_timeout": "soon"})
        proc = self.start(path)
        self.assertEqual(proc.wait(STARTUP_TIMEOUT_S), 1)
        assert proc.stdout is not None
        self.assertIn(
            "federation.request_timeout: expected a duration like \"10s\", got 'soon'",
            proc.stdout.read(),
        )


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """Run the CLI in-process, returning (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(argv)
    return code, out.getvalue(), err.getvalue()


class CliTests(SynchronousTestCase):
    def test_generate_key(self) -> None:
        """generate-key writes a 0600 key file and refuses to overwrite it."""
        path = self.mktemp()
        code, out, _ = run_cli(["generate-key", "--output", path])
        self.assertEqual(code, 0)
        self.assertIn("Wrote ed25519:a_", out)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        with open(path) as f:
            content = f.read()
        self.assertRegex(content, r"^ed25519 a_\w+ \S+\n$")
        code, _, err = run_cli(["generate-key", "--output", path])
        self.assertEqual(code, 1)
        self.assertIn("refusing to overwrite", err)
        with open(path) as f:
            self.assertEqual(f.read(), content)

    def test_check_config(self) -> None:
        """check-config exits 0 for the sample and 1 with ``path: problem`` for a bad file."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        code, out, _ = run_cli(["check-config", "--config", write_sample_config(directory, 8080)])
        self.assertEqual(code, 0)
        self.assertIn("OK (server_name localhost:8080)", out)
        bad = write_sample_config(directory, 8080, notary={"max_request_body": "huge"})
        code, _, err = run_cli(["check-config", "--config", bad])
        self.assertEqual(code, 1)
        self.assertIn(
            'notary.max_request_body: expected a size like "64K" or "1M", got \'huge\'', err
        )


class ListenerTests(TestCase):
    """KeyServer listeners on the real reactor, on 127.0.0.1 port 0."""

    def make_server(
        self,
        directory: Optional[str] = None,
        inbound: Optional[dict[str, Any]] = None,
        **listener: Any,
    ) -> KeyServer:
        """A KeyServer from a config file in ``directory`` (relative paths are under it)."""
        if directory is None:
            directory = os.path.abspath(self.mktemp())
            os.makedirs(directory)
        raw: dict[str, Any] = {
            "server_name": "localhost:8448",
            "signing_key_path": "signing.key",
            "listeners": [dict({"port": 0, "bind_addresses": ["127.0.0.1"]}, **listener)],
            "notary": {"max_request_body": "1K"},
        }
        if inbound is not None:
            raw["inbound"] = inbound
        config_path = os.path.join(directory, "config.yaml")
        with open(config_path, "w") as f:
            yaml.safe_dump(raw, f)
        server = KeyServer(typed_global_reactor(), load_config_file(config_path))
        self.addCleanup(server.stop)
        return server

    async def test_tls_listener(self) -> None:
        """tls: true serves /server over TLS with the certificate chain named relative to the
        config file's folder."""
        ca = trustme.CA()
        cert = ca.issue_cert("localhost", "127.0.0.1")
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        cert_path, key_path = os.path.join(directory, "tls.crt"), os.path.join(directory, "tls.key")
        cert.private_key_pem.write_to_path(key_path)
        cert.cert_chain_pems[0].write_to_path(cert_path)
        for extra in cert.cert_chain_pems[1:]:
            with open(cert_path, "ab") as f:
                f.write(extra.bytes())
        server = self.make_server(
            directory, tls=True, tls_certificate_path="tls.crt", tls_private_key_path="tls.key"
        )
        self.assertTrue(os.path.exists(os.path.join(directory, "signing.key")))
        ports = await server.start()
        self.assertTrue(os.path.exists(os.path.join(directory, "keyring.db")))
        port = ports[0].getHost().port  # type: ignore[attr-defined]
        policy = BrowserLikePolicyForHTTPS(trustRoot=Certificate.loadPEM(ca.cert_pem.bytes()))
        client = HTTPClient(Agent(global_reactor, contextFactory=policy))
        response = await client.get("https://localhost:%d/_matrix/key/v2/server" % port)
        self.assertEqual(response.code, 200)
        verify_server_response(self, await response.content(), "localhost:8448")

    async def test_request_body_cap(self) -> None:
        """A body over notary.max_request_body gets 413 M_TOO_LARGE and the connection closes."""
        server = self.make_server()
        ports = await server.start()
        port = ports[0].getHost().port  # type: ignore[attr-defined]
        body = b"x" * 4096
        response = await _raw_request(
            port,
            b"POST /_matrix/key/v2/server HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
        )
        head, _, payload = response.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 413"), head)
        self.assertEqual(json.loads(payload)["errcode"], "M_TOO_LARGE")
        # Chunked bodies (no Content-Length) are cut off the same way.
        chunk = b"%x\r\n%s\r\n" % (len(body), body)
        response = await _raw_request(
            port,
            b"POST /_matrix/key/v2/server HTTP/1.1\r\nHost: localhost\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunk + b"0\r\n\r\n",
        )
        self.assertTrue(response.startswith(b"HTTP/1.1 413"), response[:80])
        # A small body still reaches the resource (which answers 405 for POST).
        response = await _raw_request(
            port,
            b"POST /_matrix/key/v2/server HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
        )
        self.assertTrue(response.startswith(b"HTTP/1.1 405"), response[:80])

    async def test_inbound_limits_and_stop(self) -> None:
        """The listeners apply inbound.max_connections_per_address, and stop() drops the
        connections still open."""
        server = self.make_server(inbound={"max_connections_per_address": 1})
        ports = await server.start()
        port = ports[0].getHost().port  # type: ignore[attr-defined]
        kept = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.addCleanup(kept.close)
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"200 OK", await deferToThread(kept.recv, 65536))
        with self.assertLogs("keyring_module.resources.per_address", logging.WARNING):
            refused = await _raw_request(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(refused, b"")
        await server.stop()
        self.assertEqual(await deferToThread(_read_until_closed, kept), b"")


def _read_until_closed(sock: socket.socket) -> bytes:
    """What ``sock`` receives until the server closes it (reset counts as closed)."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


async def _raw_request(port: int, data: bytes, timeout_s: float = 10.0) -> bytes:
    """Send raw bytes to 127.0.0.1:port from a thread and read until the server closes."""

    def exchange() -> bytes:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
        except (ConnectionResetError, ConnectionAbortedError):
            # A server dropping the connection at once can reset it before the client
            # has seen the handshake finish (on a loaded machine): nothing was received.
            return b""
        with s:
            try:
                s.sendall(data)
            except OSError:
                pass
            return _read_until_closed(s)

    result: Optional[bytes] = await deferToThread(exchange)
    assert result is not None
    return result


class SampleConfigLoadsTests(SynchronousTestCase):
    def test_sample_is_loadable_by_server(self) -> None:
        """The sample config is a valid standalone config."""
        self.assertEqual(load_config_file(SAMPLE_CONFIG).server_name, "localhost:8080")
