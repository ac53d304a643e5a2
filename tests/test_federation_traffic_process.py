"""Acceptance test: a Synapse-sized key query batch to ``keyring-module serve`` in its
own process, over real HTTP on 127.0.0.1, at the default notary settings, with a few
origins (allow-listed local sockets) that accept connections and never answer."""

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import yaml
from twisted.trial.unittest import TestCase

from keyring_module.clock import global_reactor
from keyring_module.storage.sqlite import SqliteKeyStore
from tests.federation_traffic import DAY_MS, SynapseBatch, synapse_body, verify_keys_by_server
from tests.test_server import REPO_ROOT, STARTUP_TIMEOUT_S, free_port
from tests.utils import key_id, verify_key_base64

#: How long the test waits for the server to stop on SIGTERM before killing it.
STOP_TIMEOUT_S = 15.0
#: ``federation.request_timeout`` in this test: short, so that waiting for the origins
#: that never answer stays quick.
REQUEST_TIMEOUT_S = 3
#: How many origins in the batch accept connections and never answer.
HANGING_ORIGINS = 3


class BigBatchProcessTests(TestCase):
    """``keyring-module serve`` with a store already holding 3,000 servers' keys."""

    timeout = 120

    async def test_a_3000_server_synapse_batch_over_real_http(self) -> None:
        """A POST of 3,000 stored servers plus 3 whose origins accept connections and
        never answer, about 270 KB, built as Synapse builds it, is answered 200 within
        request_timeout + 3 s of wall time by ``serve`` at the default notary settings,
        with every stored server in the answer and the hanging ones left out."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        database = os.path.join(directory, "keyring.db")
        now = int(time.time() * 1000)
        batch = SynapseBatch.build(3000, now)
        store = SqliteKeyStore(database, global_reactor())
        try:
            await store.migrate()
            for response in batch.signed_responses(batch.server_names, now + DAY_MS):
                await store.store_server_keys(response, "origin", now)
        finally:
            await store.close()
        hanging = [self.silent_socket() for _ in range(HANGING_ORIGINS)]
        hanging_names = ["127.0.0.1:%d" % s.getsockname()[1] for s in hanging]
        port = free_port()
        config = {
            "server_name": "localhost:%d" % port,
            "signing_key_path": "notary.signing.key",
            "listeners": [{"port": port, "bind_addresses": ["127.0.0.1"]}],
            "database": {"backend": "sqlite", "path": database},
            "federation": {
                "request_timeout": "%ds" % REQUEST_TIMEOUT_S,
                "ip_range_allowlist": ["127.0.0.1/32"],
            },
        }
        self.serve(directory, config, "Listening on http://127.0.0.1:%d" % port)
        key_ids = {name: key_id(key) for name, key in batch.signing_keys.items()}
        key_ids.update(dict.fromkeys(hanging_names, "ed25519:a"))
        body = synapse_body(list(batch.server_names) + hanging_names, now, key_ids)
        self.assertTrue(250_000 <= len(body) <= 300_000, len(body))

        started = time.monotonic()
        code, answer = post(
            "http://127.0.0.1:%d/_matrix/key/v2/query" % port, body, REQUEST_TIMEOUT_S + 10
        )
        elapsed_s = time.monotonic() - started

        self.assertEqual(code, 200, answer[:300])
        self.assertLessEqual(elapsed_s, REQUEST_TIMEOUT_S + 3)
        for silent in hanging:
            silent.accept()[0].close()  # the notary did connect to each (and waited)
        served = verify_keys_by_server(json.loads(answer)["server_keys"])
        self.assertEqual(
            served,
            {
                name: {key_id(key): verify_key_base64(key)}
                for name, key in batch.signing_keys.items()
            },
        )

    def silent_socket(self) -> socket.socket:
        """A listening socket on 127.0.0.1 that never answers: connections complete (the
        kernel accepts them into its backlog) and no byte is ever sent back. It is
        closed when the test ends."""
        silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(silent.close)
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        silent.settimeout(0)  # accept() only what is already there
        return silent

    def serve(self, directory: str, config: dict[str, Any], ready_line: str) -> None:
        """Start ``serve`` with ``config`` and wait for ``ready_line``; it is stopped
        (SIGTERM, then killed if need be) when the test ends."""
        path = os.path.join(directory, "config.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(config, f)
        proc = subprocess.Popen(
            [sys.executable, "-m", "keyring_module", "serve", "--config", path],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=directory,
            env=dict(os.environ, PYTHONPATH=REPO_ROOT),  # this tree's code
        )

        # Output is read by a thread, so that waiting for the ready line is bounded.
        stdout = proc.stdout
        assert stdout is not None
        output: "queue.Queue[str]" = queue.Queue()

        def read_lines() -> None:
            for line in stdout:
                output.put(line)

        reader = threading.Thread(target=read_lines, daemon=True)
        reader.start()

        def stop() -> None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            reader.join(5)
            stdout.close()

        self.addCleanup(stop)
        lines: list[str] = []
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                line = output.get(timeout=deadline - time.monotonic())
            except queue.Empty:
                break
            lines.append(line)
            if ready_line in line:
                return
        self.fail("no %r within %ss:\n%s" % (ready_line, STARTUP_TIMEOUT_S, "".join(lines)))


def post(url: str, body: bytes, timeout_s: float) -> tuple[int, bytes]:
    """POST a JSON body; the status and the answer's body (errors included)."""
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
