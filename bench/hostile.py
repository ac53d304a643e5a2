"""Resource benchmark: the notary under hostile origins and hostile clients.

Run from the repository root (about a minute)::

    .venv/bin/python -m bench.hostile
    .venv/bin/python -m bench.hostile --junk-requests 300 --idle-clients 50

Three processes, on 127.0.0.1 only:

* **origins**: fake Matrix origins over HTTPS (a test CA made for the run), each on its
  own port and so its own server name ``127.0.0.1:<port>``: benign ones (one key), one
  publishing 2,000 validly self-signed keys, one publishing ``federation``'s key cap, and
  ten whose answers are padded to about 900 KB each with an unknown field (kept and
  re-served), so that one 300-byte POST about all ten has a ~9 MB answer, and one whose
  unknown field is 300,000 empty arrays (the most objects per byte to decode and check).
* **ours**: the standalone server (``KeyServer`` with the real federation client trusting
  the test CA, ``127.0.0.1/32`` allow-listed, SQLite, default limits otherwise, garbage
  collection driven by the reactor as ``keyring-module serve`` runs it) plus a
  **stall monitor**: a reactor timer every 5 ms that records how late it fires, i.e. how
  long something held the reactor thread. ``stats`` on its stdin answers the longest
  stall and the resident memory (``VmRSS``) since the last ``reset``.
* the parent, which runs the phases below with blocking sockets, while a **probe**
  thread asks ours for a cached benign server every 20 ms and records the slowest
  answer (how much one phase delays everyone else).

Phases (printed as one table, each next to the benign baseline):

1. benign fetches: ours fetches each benign origin once;
2. benign cached GETs: ``--junk-requests`` GETs of a cached benign server;
3. the 2,000-key answer, the answer at the key cap, the 900 KB answer and the one of
   300,000 empty arrays: one fetch each;
4. non-reading clients: ``--idle-clients`` connections each POST a query for the ten
   padded servers (a ~9 MB answer) and never read it; held for 2 s, then closed;
5. junk URIs: ``--junk-requests`` GETs of the 900 KB server with a different
   ``?junk=N`` each, every answer read in full.

Exit status: 0 when every phase ran (the figures are for people to judge), 1 when a
server could not start or a phase failed.
"""

import argparse
import http.client
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Optional, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUERY_PATH = "/_matrix/key/v2/query"
DAY_MS = 24 * 3600 * 1000
BENIGN_ORIGINS = 5
MANY_KEYS = 2000
PADDING_BYTES = 900 * 1024
#: Empty arrays in the ~900 KB answer made of tiny containers.
TINY_CONTAINERS = 300_000
#: Padded origins; a query about all of them has a ~9 MB answer.
PADDED_ORIGINS = 10
STALL_TICK_S = 0.005
PROBE_EVERY_S = 0.02


def _add_repo_root_to_path() -> None:
    """Make ``tests`` and ``bench`` importable when this file is run as a script."""
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)


# ---------------------------------------------------------------------------
# Subprocess roles
# ---------------------------------------------------------------------------


def rss_bytes(pid: str = "self") -> int:
    """A process's resident memory (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/%s/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def key_cap() -> int:
    """The default cap on keys per origin answer (if this version has one)."""
    from keyring_module.config import FederationConfig

    cap = getattr(FederationConfig(), "max_keys_per_response", None)
    return int(cap) if cap else 256


def serve_origins(workdir: str) -> int:
    """Subprocess: serve the fake origins over TLS; print ``READY {"origins": {...}}``."""
    _add_repo_root_to_path()
    from twisted.internet import reactor, ssl, stdio
    from twisted.protocols.basic import LineReceiver
    from twisted.web.server import Site

    from bench.validation import FixedAnswer
    from tests.utils import make_signed_server_keys, new_signing_key

    with open(os.path.join(workdir, "origin.pem"), "rb") as f:
        options = ssl.PrivateCertificate.loadPEM(f.read()).options()

    kinds = ["benign%d" % i for i in range(BENIGN_ORIGINS)] + ["many", "cap", "tiny"]
    kinds += ["padded%d" % i for i in range(PADDED_ORIGINS)]
    names: dict[str, str] = {}
    now_ms = int(time.time() * 1000)
    for kind in kinds:
        resource = FixedAnswer()
        port = reactor.listenSSL(0, Site(resource), options, interface="127.0.0.1")  # type: ignore[attr-defined]
        name = "127.0.0.1:%d" % port.getHost().port
        names[kind] = name
        if kind == "many":
            keys = [new_signing_key("k%d" % i) for i in range(MANY_KEYS)]
        elif kind == "cap":
            keys = [new_signing_key("k%d" % i) for i in range(key_cap())]
        else:
            keys = [new_signing_key("k0")]
        extra: Optional[dict[str, object]] = None
        if kind.startswith("padded"):
            extra = {"padding": "x" * PADDING_BYTES}
        elif kind == "tiny":  # as many containers as fit: the most work per byte
            extra = {"padding": [[] for _ in range(TINY_CONTAINERS)]}
        obj = make_signed_server_keys(name, keys, now_ms + DAY_MS, extra=extra)
        resource.body = json.dumps(obj, separators=(",", ":")).encode()

    class Control(LineReceiver):
        delimiter = b"\n"

        def connectionLost(self, reason: object = None) -> None:
            if reactor.running:  # type: ignore[attr-defined]
                reactor.stop()  # type: ignore[attr-defined]

    control = Control()
    stdio.StandardIO(control)
    reactor.callWhenRunning(  # type: ignore[attr-defined]
        lambda: control.sendLine(b"READY " + json.dumps({"origins": names}).encode())
    )
    reactor.run()  # type: ignore[attr-defined]
    return 0


class StallMonitor:
    """A timer every ``tick_s`` on the reactor; records how late each tick fires."""

    def __init__(self, reactor: Any, tick_s: float = STALL_TICK_S) -> None:
        from twisted.internet.task import LoopingCall

        self._tick_s = tick_s
        self._last = time.perf_counter()
        self.longest_s = 0.0
        self._call = LoopingCall(self._tick)
        self._call.clock = reactor

    def start(self) -> None:
        self._last = time.perf_counter()
        self._call.start(self._tick_s, now=False)

    def reset(self) -> None:
        self.longest_s = 0.0

    def _tick(self) -> None:
        now = time.perf_counter()
        self.longest_s = max(self.longest_s, now - self._last - self._tick_s)
        self._last = now


def serve_ours(workdir: str) -> int:
    """Subprocess: our standalone server with the stall monitor; ``reset``/``stats``."""
    _add_repo_root_to_path()
    from twisted.internet import defer, stdio
    from twisted.protocols.basic import LineReceiver

    from keyring_module.clock import global_reactor
    from keyring_module.config import LoggingConfig, parse_config
    from keyring_module.gc_policy import ReactorGarbageCollector
    from keyring_module.logconfig import setup_logging
    from keyring_module.server import KeyServer

    setup_logging(LoggingConfig(level="ERROR"))
    reactor = global_reactor()
    config = parse_config(
        {
            "server_name": "notary.bench",
            "signing_key_path": os.path.join(workdir, "signing.key"),
            "listeners": [{"port": 0, "bind_addresses": ["127.0.0.1"]}],
            "database": {"path": os.path.join(workdir, "keys.db")},
            "federation": {
                "ca_file": os.path.join(workdir, "ca.pem"),
                "ip_range_allowlist": ["127.0.0.1/32"],
            },
        }
    )
    server = KeyServer(reactor, config)
    monitor = StallMonitor(reactor)
    baseline = {"rss": rss_bytes()}

    class Control(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            command = line.strip()
            if command == b"reset":
                monitor.reset()
                baseline["rss"] = rss_bytes()
                self.sendLine(b"RESET " + json.dumps({"rss_bytes": baseline["rss"]}).encode())
            elif command == b"stats":
                stats = {
                    "longest_stall_ms": monitor.longest_s * 1000,
                    "rss_growth_mb": (rss_bytes() - baseline["rss"]) / 2**20,
                    "rss_mb": rss_bytes() / 2**20,
                }
                self.sendLine(b"STATS " + json.dumps(stats).encode())

        def connectionLost(self, reason: object = None) -> None:
            reactor.stop()

    control = Control()
    stdio.StandardIO(control)

    async def start() -> None:
        ports = await server.start()
        ReactorGarbageCollector(reactor).start()  # as ``keyring-module serve`` does
        monitor.start()
        port = getattr(ports[0].getHost(), "port", 0)
        control.sendLine(b"READY " + json.dumps({"port": port}).encode())

    def failed(failure: Any) -> None:
        print("bench server failed to start:\n%s" % failure.getTraceback(), file=sys.stderr)
        reactor.stop()

    reactor.callWhenRunning(lambda: defer.ensureDeferred(start()).addErrback(failed))
    reactor.addSystemEventTrigger("before", "shutdown", lambda: defer.ensureDeferred(server.stop()))
    reactor.run()
    return 0


# ---------------------------------------------------------------------------
# Parent: clients and phases
# ---------------------------------------------------------------------------


def get(port: int, path: str, timeout: float = 30.0) -> tuple[int, bytes]:
    """One GET on a fresh connection; the whole body is read."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def query_path(server_name: str, junk: Optional[int] = None) -> str:
    path = "%s/%s" % (QUERY_PATH, server_name)
    return path if junk is None else "%s?junk=%d" % (path, junk)


class Probe:
    """A thread asking for a cached server every 20 ms; remembers the slowest answer, and
    the most resident memory the server process had meanwhile."""

    def __init__(self, port: int, server_name: str, server_pid: int) -> None:
        self._port = port
        self._pid = str(server_pid)
        self.peak_rss_bytes = 0
        self._path = query_path(server_name)
        self._stop = threading.Event()
        self.slowest_s = 0.0
        self.failures = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Probe":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=35)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                status, _ = get(self._port, self._path)
                if status != 200:
                    self.failures += 1
            except OSError:
                self.failures += 1
            self.slowest_s = max(self.slowest_s, time.perf_counter() - started)
            self.peak_rss_bytes = max(self.peak_rss_bytes, rss_bytes(self._pid))
            self._stop.wait(PROBE_EVERY_S)


def hold_idle_clients(port: int, server_names: Sequence[str], count: int, hold_s: float) -> int:
    """``count`` connections POST a query and never read; returns how many were sent."""
    body = json.dumps({"server_keys": {name: {} for name in server_names}}).encode()
    request = (
        b"POST %s HTTP/1.1\r\nHost: notary.bench\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (QUERY_PATH.encode(), len(body), body)
    )
    sockets = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(request)
            sockets.append(s)
        time.sleep(hold_s)
    finally:
        for s in sockets:
            s.close()
    return len(sockets)


def run_phases(args: argparse.Namespace, workdir: str) -> int:
    _add_repo_root_to_path()
    import trustme

    from bench._subprocess import ServerProcess

    ca = trustme.CA()
    ca.cert_pem.write_to_path(os.path.join(workdir, "ca.pem"))
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        os.path.join(workdir, "origin.pem")
    )
    script = os.path.abspath(__file__)
    origins_proc = ServerProcess(
        "origins",
        [script, "--role", "origins", "--workdir", workdir],
        os.path.join(workdir, "origins.log"),
        cwd=REPO_ROOT,
    )
    origins: dict[str, str] = origins_proc.ready["origins"]
    ours = ServerProcess(
        "ours",
        [script, "--role", "ours", "--workdir", workdir],
        os.path.join(workdir, "ours.log"),
        cwd=REPO_ROOT,
    )
    port = ours.port
    rows: list[dict[str, Any]] = []

    def phase(name: str, requests: int, work: Callable[[], None]) -> None:
        rss_before = ours.ask("reset", "RESET")["rss_bytes"]
        with Probe(port, origins["benign0"], ours.proc.pid) as probe:
            started = time.perf_counter()
            work()
            elapsed = time.perf_counter() - started
            time.sleep(0.1)  # let the probe run once more
        stats = ours.ask("stats", "STATS")
        rows.append(
            {
                "phase": name,
                "requests": requests,
                "seconds": elapsed,
                "stall_ms": stats["longest_stall_ms"],
                "probe_ms": probe.slowest_s * 1000,
                "probe_failures": probe.failures,
                "rss_growth_mb": stats["rss_growth_mb"],
                "peak_rss_growth_mb": max(0, probe.peak_rss_bytes - rss_before) / 2**20,
                "rss_mb": stats["rss_mb"],
            }
        )

    def fetch(kind: str) -> Callable[[], None]:
        def work() -> None:
            status, body = get(port, query_path(origins[kind]))
            if status != 200:
                raise RuntimeError("query for %s answered %d" % (kind, status))

        return work

    def repeat(kinds: Sequence[str]) -> Callable[[], None]:
        def work() -> None:
            for kind in kinds:
                fetch(kind)()

        return work

    # The probe's server must be cached before anything is measured.
    fetch("benign0")()
    benign = ["benign%d" % i for i in range(1, BENIGN_ORIGINS)]
    phase("benign fetches", len(benign), repeat(benign))
    phase("benign cached GETs", args.junk_requests, repeat(["benign1"] * args.junk_requests))
    phase("answer with %d keys" % MANY_KEYS, 1, fetch("many"))
    phase("answer at the key cap (%d keys)" % key_cap(), 1, fetch("cap"))
    phase("answer padded to 900 KB", 1, fetch("padded0"))
    phase("answer of 300,000 empty arrays (900 KB)", 1, fetch("tiny"))
    padded = ["padded%d" % i for i in range(PADDED_ORIGINS)]
    repeat(padded[1:])()  # stored, for the 9 MB answers below

    def idle_clients() -> None:
        hold_idle_clients(port, [origins[kind] for kind in padded], args.idle_clients, 2.0)

    phase("non-reading clients (9 MB answers)", args.idle_clients, idle_clients)

    def junk() -> None:
        for i in range(args.junk_requests):
            status, body = get(port, query_path(origins["padded0"], junk=i))
            if status != 200 or len(body) < PADDING_BYTES:
                raise RuntimeError("junk GET %d answered %d (%d bytes)" % (i, status, len(body)))

    phase("junk URIs for the 900 KB answer", args.junk_requests, junk)

    print_table(rows)
    return 0 if all(r["probe_failures"] == 0 for r in rows) else 1


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    benign = rows[0]
    print()
    print("Notary under hostile origins and clients (127.0.0.1; default limits)")
    header = (
        "| phase | requests | seconds | longest reactor stall ms | x benign "
        "| slowest other request ms | peak RSS growth MB | RSS growth after MB | RSS MB |"
    )
    print(header)
    print("|" + "---|" * header.count(" | ") + "---|")
    for r in rows:
        ratio = r["stall_ms"] / benign["stall_ms"] if benign["stall_ms"] > 0 else float("nan")
        print(
            "| %s | %d | %.1f | %.1f | %.1f | %.0f | %+.1f | %+.1f | %.0f |"
            % (
                r["phase"],
                r["requests"],
                r["seconds"],
                r["stall_ms"],
                ratio,
                r["probe_ms"],
                r["peak_rss_growth_mb"],
                r["rss_growth_mb"],
                r["rss_mb"],
            )
        )
    failures = sum(r["probe_failures"] for r in rows)
    print("probe requests that failed: %d" % (failures,))


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--junk-requests", type=int, default=300)
    parser.add_argument("--idle-clients", type=int, default=50)
    parser.add_argument("--role", choices=("origins", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.role and not (1 <= args.junk_requests <= 5000 and 1 <= args.idle_clients <= 500):
        parser.error("--junk-requests must be 1..5000 and --idle-clients 1..500")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.role == "origins":
        return serve_origins(args.workdir)
    if args.role == "ours":
        return serve_ours(args.workdir)
    _add_repo_root_to_path()
    from bench._subprocess import ServerProcess

    workdir = tempfile.mkdtemp(prefix="bench_hostile_")
    started = time.monotonic()
    try:
        return run_phases(args, workdir)
    except RuntimeError as e:
        print("bench failed: %s" % (e,), file=sys.stderr)
        return 1
    finally:
        ServerProcess.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
        print("total time %.0fs" % (time.monotonic() - started))


if __name__ == "__main__":
    sys.exit(main())
