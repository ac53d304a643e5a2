"""``keyring-module serve`` in a subprocess on 127.0.0.1: the federation version and the
configured ``.well-known`` answer, and its INFO log has no access lines for ``/health``
or ``/metrics`` and none of Twisted's start/stop chatter."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

from twisted.trial.unittest import SynchronousTestCase

import keyring_module
from tests.test_server import REPO_ROOT, free_port, write_sample_config

TIMEOUT_S = 20.0


class ServeFederationBasicsProcessTests(SynchronousTestCase):
    """The sample config with ``well_known`` and metrics on, run as the README runs it."""

    def test_version_well_known_and_quiet_log(self) -> None:
        """Version and well-known answer over HTTP; /health and /metrics requests leave
        no line in the INFO log, nor do listening ports starting and stopping."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        port, metrics_port = free_port(), free_port()
        config = write_sample_config(
            directory,
            port,
            well_known={"m.server": "notary.example.org:443"},
            metrics={"enabled": True, "port": metrics_port, "bind_addresses": ["127.0.0.1"]},
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "keyring_module", "serve", "--config", config],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=directory,
            env=dict(os.environ, PYTHONPATH=REPO_ROOT),
        )
        self.addCleanup(self._stop, proc)
        lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if "Serving metrics on" in line:
                    ready.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        self.assertTrue(ready.wait(TIMEOUT_S), "not ready:\n" + "".join(lines))

        base = "http://127.0.0.1:%d" % port
        with urllib.request.urlopen(base + "/_matrix/federation/v1/version", timeout=10) as r:
            self.assertEqual(r.headers["Content-Type"], "application/json")
            self.assertEqual(
                json.loads(r.read()),
                {"server": {"name": "keyring_module", "version": keyring_module.__version__}},
            )
        with urllib.request.urlopen(base + "/.well-known/matrix/server", timeout=10) as r:
            self.assertEqual(r.headers["Content-Type"], "application/json")
            self.assertEqual(json.loads(r.read()), {"m.server": "notary.example.org:443"})
        for _ in range(3):
            with urllib.request.urlopen(base + "/health", timeout=10) as r:
                self.assertEqual(r.status, 200)
            url = "http://127.0.0.1:%d/metrics" % metrics_port
            with urllib.request.urlopen(url, timeout=10) as r:
                self.assertIn(b"keyring_", r.read())

        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(15), 0)
        reader.join(10)
        output = "".join(lines)
        self.assertIn("Shutting down", output)
        for chatter in (
            "/metrics HTTP",
            "GET /health",
            "GET /_matrix",
            "Starting factory",
            "Stopping factory",
            "starting on",
            "Port %d Closed" % port,
        ):
            self.assertNotIn(chatter, output)

    def _stop(self, proc: "subprocess.Popen[str]") -> None:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
        deadline = time.monotonic() + 5
        while proc.stdout is not None and not proc.stdout.closed and time.monotonic() < deadline:
            try:
                proc.stdout.close()
            except (OSError, ValueError):
                time.sleep(0.05)
