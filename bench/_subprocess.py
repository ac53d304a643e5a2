"""Benchmark servers in their own processes, driven over stdin/stdout lines.

A server subprocess prints ``READY {json}`` once it listens, answers a line command
(e.g. ``stats``) with ``<TAG> {json}``, and stops when its stdin closes. Every server
started here is stopped at exit, whatever happens::

    server = ServerProcess("ours", [script, "--role", "ours"], "/tmp/ours.log")
    server.port                       # from its READY line
    server.ask("stats", "STATS")      # {"outbound_fetches": 0, ...}
    server.stop()
"""

import atexit
import json
import os
import select
import subprocess
import sys
import time
from typing import Any, Sequence

READY_TIMEOUT_S = 60.0


class ServerProcess:
    """One server subprocess (``python COMMAND...``) and its line-based control channel."""

    _all: "list[ServerProcess]" = []

    def __init__(self, label: str, command: Sequence[str], log_path: str, cwd: str = ".") -> None:
        self.label = label
        self._log_path = log_path
        self._log = open(log_path, "wb")
        self._buffer = b""
        self.proc = subprocess.Popen(
            [sys.executable, *command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=cwd,
        )
        ServerProcess._all.append(self)
        self.ready: dict[str, Any] = self.expect("READY", READY_TIMEOUT_S)
        self.port: int = int(self.ready.get("port", 0))

    def expect(self, tag: str, timeout: float) -> dict[str, Any]:
        """The JSON of the next ``<tag> {json}`` line the server prints."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                if line.startswith(tag.encode() + b" "):
                    result: dict[str, Any] = json.loads(line[len(tag) + 1 :])
                    return result
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.proc.poll() is not None:
                break
            readable, _, _ = select.select([fd], [], [], remaining)
            if readable:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                self._buffer += chunk
        raise RuntimeError(
            "%s server: no %s line (exit status %s); its log:\n%s"
            % (self.label, tag, self.proc.poll(), self.log_tail())
        )

    def ask(self, command: str, tag: str, timeout: float = 10.0) -> dict[str, Any]:
        """Send one command line and return the JSON of its ``<tag>`` answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        return self.expect(tag, timeout)

    def log_tail(self) -> str:
        """The end of the server's stderr log."""
        self._log.flush()
        with open(self._log_path, "rb") as f:
            return f.read()[-4000:].decode("utf-8", "replace")

    def stop(self) -> None:
        """Close its stdin (it stops its reactor), then terminate it if it lingers."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        self._log.close()
        if self in ServerProcess._all:
            ServerProcess._all.remove(self)

    @classmethod
    def stop_all(cls) -> None:
        """Stop every server still running."""
        for server in list(cls._all):
            server.stop()


atexit.register(ServerProcess.stop_all)
