"""Benchmark: cached ``POST /_matrix/key/v2/query`` against a bare Twisted resource.

Run from the repository root (about 2.5 minutes with the defaults)::

    .venv/bin/python bench/notary.py                    # load test, then profile
    .venv/bin/python bench/notary.py --duration 3 --runs 1 --no-profile
    .venv/bin/python bench/notary.py --profile-only
    .venv/bin/python bench/notary.py --big-batch-only --big-batch-requests 3
    .venv/bin/python -m bench.notary                    # same thing, as a module
    .venv/bin/python bench/notary.py --workers 1,2      # serve with 1 and 2 workers
                                                        # (bench/notary_workers.py)

What it does:

1. Starts **ours** as a subprocess with its own reactor: ``KeyServer`` (own signing
   key) + ``KeyringServices.create`` on a SQLite store in a temp dir + the standalone
   ``KeyServerSite``, on 127.0.0.1 with a free port, logging at WARNING. The store is
   pre-seeded through ``KeyStore.store_server_keys`` with valid signed responses (one
   day) of ``origin1.test`` ... ``origin20.test``, with keys generated now. Its
   federation client counts calls and raises, and the bench checks (before and after
   the load) that no query caused an outbound fetch.
2. Starts two **bare** subprocesses: the same ``KeyServerSite``/HTTP stack with a leaf
   ``Resource`` at the same path whose ``render_POST`` reads the body and returns fixed
   bytes, namely ours' actual reply for the 1-server and the 20-server query.
3. Loads each with ``wrk`` (``apt-get install -y wrk``; a generated Lua script posts the
   body and checks every reply: status 200, exact body length, the last requested key
   id present) or, without wrk, with the stdlib asyncio client ``bench/_loadclient.py``
   in its own process. 1 and 8 keep-alive connections, ``--runs`` runs of
   ``--duration`` seconds each (ours and bare interleaved), median reported.
4. Prints: case, connections, req/s ours, req/s bare, ratio, p50 latencies, bad replies.
   Target: ratio >= 0.75 at 8 connections.
5. The big-batch case (``bench/notary_big_batch.py``, in a process of its own): one
   Synapse-shaped POST naming 5,000 stored servers, its p50 and p90 latency when cold,
   for a new question and for a repeated one. Target: new question p50 well under 1 s.
6. Profiles ours in-process (cProfile): ``NotaryService.query`` in a loop, and a full
   request through the Site/``HTTPChannel`` on a ``StringTransport`` (ours and bare),
   and prints the top costs.

Loopback only (``--host`` must be a loopback address). Subprocesses are always stopped
(try/finally and atexit). Exit status: 0 when done with no bad reply and no outbound
fetch, 2 otherwise, 1 when a server could not start.
"""

import argparse
import cProfile
import functools
import io
import json
import logging
import os
import pstats
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import attr

if TYPE_CHECKING:
    pass

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOADCLIENT = os.path.join(REPO_ROOT, "bench", "_loadclient.py")
QUERY_PATH = "/_matrix/key/v2/query"
NOTARY_NAME = "notary.bench"
ORIGINS = 20
DAY_MS = 24 * 3600 * 1000
CONNECTIONS = (1, 8)
TARGET_RATIO = 0.75


def _add_repo_root_to_path() -> None:
    """Make ``tests`` and ``bench`` importable when this file is run as a script."""
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)


def origin_name(i: int) -> str:
    """The i-th (1-based) fake origin."""
    return "origin%d.test" % i


# ---------------------------------------------------------------------------
# Server subprocesses (``--role ours`` / ``--role bare``)
# ---------------------------------------------------------------------------


class CountingFederationClient:
    """A federation client that must never be used: counts calls and raises."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def get_json(
        self, server_name: str, path: str, timeout_ms: Optional[int] = None
    ) -> object:
        from keyring_module.http import ConnectError

        self.calls.append("GET %s%s" % (server_name, path))
        raise ConnectError("bench: outbound fetch of %s%s" % (server_name, path))

    async def post_json(
        self, server_name: str, path: str, body: object, timeout_ms: Optional[int] = None
    ) -> object:
        from keyring_module.http import ConnectError

        self.calls.append("POST %s%s" % (server_name, path))
        raise ConnectError("bench: outbound fetch of %s%s" % (server_name, path))


async def seed_store(store: Any, now_ms: int) -> dict[str, str]:
    """Store a signed one-day response for each fake origin; returns name -> key id."""
    _add_repo_root_to_path()
    from keyring_module.model import SOURCE_ORIGIN
    from keyring_module.validation import parse_server_keys_response
    from tests.utils import key_id, make_signed_server_keys, new_signing_key

    key_ids: dict[str, str] = {}
    for i in range(1, ORIGINS + 1):
        name = origin_name(i)
        signing_key = new_signing_key("bench_%d_%s" % (i, os.urandom(3).hex()))
        obj = make_signed_server_keys(name, [signing_key], now_ms + DAY_MS)
        response = parse_server_keys_response(obj, name)
        conflicts = await store.store_server_keys(response, SOURCE_ORIGIN, now_ms)
        assert not conflicts, conflicts
        key_ids[name] = key_id(signing_key)
    return key_ids


@attr.s(auto_attribs=True)
class OursParts:
    """What a built "ours" server consists of (for the subprocess and the profile)."""

    server: Any  # KeyServer
    services: Any  # KeyringServices
    site: Any  # KeyServerSite
    client: CountingFederationClient
    key_ids: dict[str, str]


def bench_config(workdir: str, cache_ttl_ms: Optional[int] = None) -> Any:
    """The standalone config: defaults, SQLite in ``workdir``, our name, WARNING logs
    (and ``database.cache_ttl`` when given)."""
    from keyring_module.config import DatabaseConfig, KeyringConfig, ListenerConfig, LoggingConfig

    database = DatabaseConfig(backend="sqlite", path=os.path.join(workdir, "keys.db"))
    if cache_ttl_ms is not None:
        database = attr.evolve(database, cache_ttl_ms=cache_ttl_ms)
    return KeyringConfig(
        signing_key_path=os.path.join(workdir, "signing.key"),
        server_name=NOTARY_NAME,
        listeners=(ListenerConfig(port=0, bind_addresses=("127.0.0.1",)),),
        database=database,
        logging=LoggingConfig(level="WARNING"),
    )


async def build_ours(reactor: Any, workdir: str, cache_ttl_ms: Optional[int] = None) -> OursParts:
    """KeyServer + KeyringServices (counting client) + seeded SQLite store + our Site
    (``cache_ttl_ms``: the store cache's TTL, when not the default)."""
    from keyring_module.clock import now_ms
    from keyring_module.server import KeyServer
    from keyring_module.wiring import KeyringServices

    config = bench_config(workdir, cache_ttl_ms)
    server = KeyServer(reactor, config)
    client = CountingFederationClient()
    services = await KeyringServices.create(reactor, config, server.own_keys, client=client)
    server.services = services
    key_ids = await seed_store(services.store, now_ms(reactor))
    site = server.build_site(services)
    return OursParts(server, services, site, client, key_ids)


class _NoServices:
    """Just enough of ``KeyringServices`` for ``KeyServer.build_site``."""

    class store:  # noqa: N801 - mimics an attribute
        @staticmethod
        async def check_health() -> None:
            return None

    def key_resource(self) -> Any:
        from twisted.web.resource import Resource

        return Resource()


def build_bare_site(body: bytes, server: Any) -> Any:
    """``server.build_site``'s Site (same class and options as ours), whose resource
    tree is only a leaf at the query path: ``render_POST`` reads the body and returns
    ``body``."""
    from twisted.web.resource import Resource
    from twisted.web.server import Request

    class BareResource(Resource):
        isLeaf = True

        def render_POST(self, request: Request) -> bytes:
            assert request.content is not None
            request.content.read()
            request.setHeader(b"Content-Type", b"application/json")
            return body

    root = Resource()
    node = root
    for segment in QUERY_PATH.strip("/").split("/")[:-1]:
        child = Resource()
        node.putChild(segment.encode("ascii"), child)
        node = child
    node.putChild(QUERY_PATH.rsplit("/", 1)[1].encode("ascii"), BareResource())
    site = server.build_site(_NoServices())
    site.resource = root
    return site


def serve(role: str, workdir: str, body_file: Optional[str]) -> int:
    """Subprocess entry: listen on 127.0.0.1:0, print ``READY {json}``, obey stdin.

    stdin lines: ``stats`` answers ``STATS {"outbound_fetches": n, ...}``; end of file
    stops the server.
    """
    from twisted.internet import defer, reactor, stdio
    from twisted.protocols.basic import LineReceiver

    from keyring_module.config import LoggingConfig
    from keyring_module.logconfig import setup_logging

    setup_logging(LoggingConfig(level="WARNING"))
    parts: list[OursParts] = []

    class Control(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            if line.strip() == b"stats":
                calls = parts[0].client.calls if parts else []
                info = {"outbound_fetches": len(calls), "first": calls[:5]}
                self.sendLine(b"STATS " + json.dumps(info).encode())

        def connectionLost(self, reason: object = None) -> None:
            if reactor.running:  # type: ignore[attr-defined]
                reactor.stop()  # type: ignore[attr-defined]

    control = Control()
    stdio.StandardIO(control)
    status = {"code": 0}

    async def start() -> None:
        if role == "ours":
            built = await build_ours(reactor, workdir)
            parts.append(built)
            site = built.site
            extra: dict[str, Any] = {"key_ids": built.key_ids}
        else:
            assert body_file is not None
            from keyring_module.clock import global_reactor
            from keyring_module.server import KeyServer

            with open(body_file, "rb") as f:
                body = f.read()
            server = KeyServer(global_reactor(), bench_config(workdir))
            site = build_bare_site(body, server)
            extra = {}
        port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
        if parts:
            parts[0].server.ports.append(port)
        ready = {"port": getattr(port.getHost(), "port", 0), "pid": os.getpid(), **extra}
        control.sendLine(b"READY " + json.dumps(ready).encode())

    def failed(failure: Any) -> None:
        status["code"] = 1
        print("bench server failed to start:\n%s" % failure.getTraceback(), file=sys.stderr)
        reactor.stop()  # type: ignore[attr-defined]

    def shutdown() -> "defer.Deferred[None]":
        if parts:
            return defer.ensureDeferred(parts[0].server.stop())
        return defer.succeed(None)

    reactor.callWhenRunning(  # type: ignore[attr-defined]
        lambda: defer.ensureDeferred(start()).addErrback(failed)
    )
    reactor.addSystemEventTrigger("before", "shutdown", shutdown)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return status["code"]


# ---------------------------------------------------------------------------
# Parent: process management
# ---------------------------------------------------------------------------


def http_post(port: int, body: bytes, count: int = 1) -> list[tuple[int, bytes]]:
    """``count`` POSTs on one keep-alive connection (warm-up and checks)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    replies = []
    try:
        for _ in range(count):
            conn.request("POST", QUERY_PATH, body, {"Content-Type": "application/json"})
            reply = conn.getresponse()
            replies.append((reply.status, reply.read()))
    finally:
        conn.close()
    return replies


# ---------------------------------------------------------------------------
# Parent: load generation
# ---------------------------------------------------------------------------


@attr.s(auto_attribs=True, frozen=True)
class Case:
    """One query shape: its request body and how to check a reply."""

    name: str
    servers: int
    body: bytes
    check_substring: str  # the last requested key id
    reply: bytes = b""


@attr.s(auto_attribs=True, frozen=True)
class LoadResult:
    rps: float
    p50_ms: float
    requests: int
    bad: int


def lua_long_string(text: str) -> str:
    """``text`` as a Lua long-bracket literal that cannot be closed early."""
    level = 1
    while "]%s]" % ("=" * level) in text:
        level += 1
    eq = "=" * level
    return "[%s[%s]%s]" % (eq, text, eq)


def write_wrk_script(path: str, case: Case) -> None:
    """A wrk script posting ``case.body`` and counting good/bad replies."""
    script = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = %(body)s
local expect_len = %(length)d
local expect_sub = %(sub)s
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) ok = 0; bad = 0 end
function response(status, headers, body)
  if status == 200 and #body == expect_len and string.find(body, expect_sub, 1, true) then
    ok = ok + 1
  else
    bad = bad + 1
  end
end
function done(summary, latency, requests)
  local o, b = 0, 0
  for _, t in ipairs(threads) do o = o + t:get("ok"); b = b + t:get("bad") end
  io.write(string.format("CHECK ok=%%d bad=%%d\\n", o, b))
  io.write(string.format("LAT p50_us=%%d\\n", latency:percentile(50)))
end
""" % {
        "body": lua_long_string(case.body.decode("utf-8")),
        "length": len(case.reply),
        "sub": lua_long_string(case.check_substring),
    }
    with open(path, "w", encoding="utf-8") as f:
        f.write(script)


def run_wrk(
    wrk: str, port: int, script: str, connections: int, duration: float, threads: int
) -> LoadResult:
    command = [
        wrk,
        "-t%d" % min(threads, connections),
        "-c%d" % connections,
        "-d%ds" % max(1, round(duration)),
        "-s",
        script,
        "http://127.0.0.1:%d%s" % (port, QUERY_PATH),
    ]
    out = subprocess.run(
        command, capture_output=True, text=True, timeout=duration + 60, check=False
    )
    text = out.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    check = re.search(r"CHECK ok=(\d+) bad=(\d+)", text)
    lat = re.search(r"LAT p50_us=(\d+)", text)
    total = re.search(r"(\d+) requests in", text)
    if out.returncode != 0 or not (rps and check and lat and total):
        raise RuntimeError("wrk failed (%d):\n%s\n%s" % (out.returncode, text, out.stderr))
    ok, bad = int(check.group(1)), int(check.group(2))
    requests = int(total.group(1))
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    socket_errors = sum(int(g) for g in errors.groups()) if errors else 0
    # Requests wrk counted without a checked reply are bad too.
    bad += max(0, requests - ok - bad) + socket_errors
    return LoadResult(float(rps.group(1)), int(lat.group(1)) / 1000, requests, bad)


def run_python_client(
    port: int, body_file: str, case: Case, connections: int, duration: float
) -> LoadResult:
    command = [
        sys.executable,
        LOADCLIENT,
        "--port",
        str(port),
        "--path",
        QUERY_PATH,
        "--body-file",
        body_file,
        "--connections",
        str(connections),
        "--duration",
        str(duration),
        "--expect-length",
        str(len(case.reply)),
        "--expect-substring",
        case.check_substring,
    ]
    out = subprocess.run(
        command, capture_output=True, text=True, timeout=duration + 60, check=False
    )
    if out.returncode != 0:
        raise RuntimeError("load client failed (%d):\n%s" % (out.returncode, out.stderr))
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return LoadResult(
        float(result["rps"]),
        float(result["p50_ms"]),
        int(result["requests"]),
        int(result["bad"]) + int(result["errors"]),
    )


# ---------------------------------------------------------------------------
# Parent: the load benchmark
# ---------------------------------------------------------------------------


def make_cases(key_ids: dict[str, str]) -> list[Case]:
    def body(names: Sequence[str]) -> bytes:
        query = {n: {key_ids[n]: {"minimum_valid_until_ts": 0}} for n in names}
        return json.dumps({"server_keys": query}, separators=(",", ":")).encode()

    one = [origin_name(1)]
    many = [origin_name(i) for i in range(1, ORIGINS + 1)]
    return [
        Case("1 server", 1, body(one), key_ids[one[-1]]),
        Case("%d servers" % ORIGINS, ORIGINS, body(many), key_ids[many[-1]]),
    ]


def check_reply(case: Case, status: int, reply: bytes, key_ids: dict[str, str]) -> None:
    """A reply is 200, lists every asked server once, with its key and our signature."""
    if status != 200:
        raise RuntimeError("%s: status %d: %r" % (case.name, status, reply[:300]))
    entries = json.loads(reply)["server_keys"]
    names = sorted(e["server_name"] for e in entries)
    expected = sorted(json.loads(case.body)["server_keys"])
    if names != expected:
        raise RuntimeError("%s: answered %s, expected %s" % (case.name, names, expected))
    for entry in entries:
        if key_ids[entry["server_name"]] not in entry["verify_keys"]:
            raise RuntimeError("%s: key missing for %s" % (case.name, entry["server_name"]))
        if NOTARY_NAME not in entry["signatures"]:
            raise RuntimeError("%s: not co-signed: %s" % (case.name, entry["server_name"]))


def run_load_bench(args: argparse.Namespace, workdir: str) -> int:
    from bench._subprocess import ServerProcess

    wrk = None if args.loader == "python" else shutil.which("wrk")
    if wrk is None and args.loader == "wrk":
        print("wrk is not installed: apt-get install -y wrk", file=sys.stderr)
        return 1
    if wrk is None:
        print(
            "wrk not found (apt-get install -y wrk); using the stdlib client "
            "bench/_loadclient.py, which competes with the server for CPU."
        )
    loader = "wrk -t%d" % args.wrk_threads if wrk else "bench/_loadclient.py"
    status = 0

    ours_dir = os.path.join(workdir, "ours")
    os.makedirs(ours_dir)
    t0 = time.monotonic()
    ours = ServerProcess(
        "ours",
        [os.path.abspath(__file__), "--role", "ours", "--workdir", ours_dir],
        os.path.join(workdir, "ours.log"),
        cwd=REPO_ROOT,
    )
    key_ids: dict[str, str] = ours.ready["key_ids"]
    print(
        "ours: pid %d, port %d (started in %.1fs)"
        % (ours.proc.pid, ours.port, time.monotonic() - t0)
    )

    # Warm up, check the replies and keep ours' exact bytes for the bare servers.
    cases = []
    for case in make_cases(key_ids):
        replies = http_post(ours.port, case.body, count=50)
        for code, reply in replies:
            check_reply(case, code, reply, key_ids)
        if len({reply for _, reply in replies}) != 1:
            raise RuntimeError("%s: replies differ between requests" % case.name)
        cases.append(attr.evolve(case, reply=replies[0][1]))
    fetches = ours.ask("stats", "STATS")["outbound_fetches"]
    if fetches:
        print("FAIL: the warm-up queries caused %d outbound fetches" % fetches, file=sys.stderr)
        return 2
    print("warm-up: replies valid and identical, 0 outbound fetches (cache hits)")

    bares: dict[str, ServerProcess] = {}
    for i, case in enumerate(cases):
        reply_file = os.path.join(workdir, "reply%d.json" % i)
        with open(reply_file, "wb") as f:
            f.write(case.reply)
        bare_dir = os.path.join(workdir, "bare%d" % i)
        os.makedirs(bare_dir)
        bares[case.name] = bare = ServerProcess(
            "bare " + case.name,
            [
                os.path.abspath(__file__),
                *("--role", "bare", "--workdir", bare_dir, "--body-file", reply_file),
            ],
            os.path.join(workdir, "bare%d.log" % i),
            cwd=REPO_ROOT,
        )
        code, reply = http_post(bare.port, case.body)[0]
        if code != 200 or reply != case.reply:
            raise RuntimeError("bare server for %s answers wrongly" % case.name)

    print(
        "load: %s, %d run(s) x %gs per point, ours and bare interleaved"
        % (loader, args.runs, args.duration)
    )
    table = []
    for i, case in enumerate(cases):
        body_file = os.path.join(workdir, "body%d.json" % i)
        script = os.path.join(workdir, "post%d.lua" % i)
        with open(body_file, "wb") as f:
            f.write(case.body)
        write_wrk_script(script, case)

        def load(port: int, connections: int, case: Case = case) -> LoadResult:
            if wrk is not None:
                script = os.path.join(workdir, "post%d.lua" % cases.index(case))
                return run_wrk(wrk, port, script, connections, args.duration, args.wrk_threads)
            body_file = os.path.join(workdir, "body%d.json" % cases.index(case))
            return run_python_client(port, body_file, case, connections, args.duration)

        for connections in args.connections:
            results: dict[str, list[LoadResult]] = {"ours": [], "bare": []}
            for _ in range(args.runs):
                results["ours"].append(load(ours.port, connections))
                results["bare"].append(load(bares[case.name].port, connections))
            row = summarize(case, connections, results)
            print(
                "  %-10s c=%d  ours %s  bare %s"
                % (case.name, connections, row["ours_runs"], row["bare_runs"])
            )
            table.append(row)

    fetches = ours.ask("stats", "STATS")["outbound_fetches"]
    print_table(table, loader, args)
    bad = sum(int(r["bad"]) for r in table)
    print("bad replies: %d; outbound fetches by ours during the whole run: %d" % (bad, fetches))
    for row in table:
        if row["connections"] == 8:
            verdict = "meets" if row["ratio"] >= TARGET_RATIO else "BELOW"
            print(
                "target %.2fx at 8 connections, %s: %.2fx (%s)"
                % (TARGET_RATIO, row["case"], row["ratio"], verdict)
            )
    if bad or fetches:
        status = 2
    return status


def summarize(case: Case, connections: int, results: dict[str, list[LoadResult]]) -> dict[str, Any]:
    ours_rps = statistics.median(r.rps for r in results["ours"])
    bare_rps = statistics.median(r.rps for r in results["bare"])
    return {
        "case": case.name,
        "connections": connections,
        "reply_bytes": len(case.reply),
        "ours": ours_rps,
        "bare": bare_rps,
        "ratio": ours_rps / bare_rps if bare_rps else float("nan"),
        "ours_p50": statistics.median(r.p50_ms for r in results["ours"]),
        "bare_p50": statistics.median(r.p50_ms for r in results["bare"]),
        "bad": sum(r.bad for rs in results.values() for r in rs),
        "requests": sum(r.requests for rs in results.values() for r in rs),
        "ours_runs": "/".join("%.0f" % r.rps for r in results["ours"]),
        "bare_runs": "/".join("%.0f" % r.rps for r in results["bare"]),
    }


def print_table(table: list[dict[str, Any]], loader: str, args: argparse.Namespace) -> None:
    print()
    print(
        "POST %s, cached, keep-alive, %s, median of %d x %gs"
        % (QUERY_PATH, loader, args.runs, args.duration)
    )
    header = (
        "| case | reply bytes | connections | req/s ours | req/s bare | ratio ours/bare "
        "| p50 ours ms | p50 bare ms | bad replies / requests |"
    )
    print(header)
    print("|" + "---|" * header.count(" | ") + "---|")
    for r in table:
        print(
            "| %s | %d | %d | %.0f | %.0f | %.2f | %.2f | %.2f | %d / %d |"
            % (
                r["case"],
                r["reply_bytes"],
                r["connections"],
                r["ours"],
                r["bare"],
                r["ratio"],
                r["ours_p50"],
                r["bare_p50"],
                r["bad"],
                r["requests"],
            )
        )
    print()


# ---------------------------------------------------------------------------
# Profile (in-process)
# ---------------------------------------------------------------------------


def raw_request(body: bytes) -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (QUERY_PATH.encode(), len(body))
    ) + body


class InProcessClient:
    """Feeds raw requests to a Site's ``HTTPChannel`` on a ``StringTransport``."""

    def __init__(self, site: Any, expected_length: int) -> None:
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        self.transport = StringTransport()
        self.channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.channel.makeConnection(self.transport)
        self.expected_length = expected_length
        self.async_replies = 0

    async def request(self, data: bytes) -> None:
        from twisted.internet import reactor, task

        self.channel.dataReceived(data)
        while not self.transport.value().endswith(b"}"):  # answered later (cache refill)
            self.async_replies += 1
            await task.deferLater(reactor, 0.001, lambda: None)
        reply = self.transport.value()
        self.transport.clear()
        head, _, body = reply.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200") or len(body) != self.expected_length:
            raise RuntimeError("in-process reply wrong: %r" % reply[:300])

    def close(self) -> None:
        self.channel.connectionLost(None)


async def timed_loop(step: Callable[[], Any], seconds: float, is_async: bool) -> tuple[int, float]:
    """Run ``step`` for about ``seconds``; returns (iterations, microseconds each)."""
    n = 0
    started = time.perf_counter()
    deadline = started + seconds
    while True:
        for _ in range(100):
            if is_async:
                await step()
            else:
                step()
        n += 100
        now = time.perf_counter()
        if now >= deadline:
            return n, (now - started) / n * 1e6


def notary_step(notary: Any, queries: Sequence[Any], counter: list[int]) -> Callable[[], Any]:
    from twisted.internet import defer

    async def step() -> None:
        d = defer.ensureDeferred(notary.query(queries))
        if not d.called:
            counter[0] += 1
        await d

    return step


def print_stats(profile: cProfile.Profile, title: str, limit: int) -> None:
    stream = io.StringIO()
    stats = pstats.Stats(profile, stream=stream)
    stats.strip_dirs().sort_stats("tottime").print_stats(limit)
    text = stream.getvalue()
    start = text.find("   ncalls")
    print("--- %s: top %d by own time (tottime) ---" % (title, limit))
    print(text[start:].rstrip() if start >= 0 else text)
    stream = io.StringIO()
    ours = pstats.Stats(profile, stream=stream).sort_stats("cumulative")
    ours.print_stats(r"keyring_module[/\\]", limit)
    text = stream.getvalue().replace(REPO_ROOT + os.sep, "")
    start = text.find("   ncalls")
    print("--- %s: keyring_module functions by cumulative time ---" % title)
    print(text[start:].rstrip() if start >= 0 else text)
    # Where the own time goes, by package.
    raw: dict[Any, Any] = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    groups: dict[str, float] = {}
    total = 0.0
    for (filename, _, _), (_, _, tottime, _, _) in raw.items():
        total += tottime
        groups[_group_of(filename)] = groups.get(_group_of(filename), 0.0) + tottime
    shares = sorted(groups.items(), key=lambda kv: -kv[1])
    print(
        "own time by package: "
        + ", ".join(
            "%s %.0f%%" % (name, 100 * t / total) for name, t in shares if t / total >= 0.01
        )
    )
    print()


def _group_of(filename: str) -> str:
    path = filename.replace(os.sep, "/")
    for marker, name in (
        ("keyring_module/", "keyring_module"),
        ("twisted/web/", "twisted.web"),
        ("twisted/internet/defer", "twisted defer"),
        ("twisted/", "twisted (other)"),
        ("json/", "json"),
        ("canonicaljson", "canonicaljson"),
        ("attr/", "attrs"),
        ("/bench/", "bench harness"),
    ):
        if marker in path:
            return name
    return "builtins/other"


async def profile_main(args: argparse.Namespace, workdir: str) -> None:
    from twisted.internet import reactor

    from keyring_module.notary.service import ServerQuery

    parts = await build_ours(reactor, workdir)
    try:
        notary = parts.services.notary
        key_ids = parts.key_ids
        cases = make_cases(key_ids)
        seconds = args.profile_seconds
        print(
            "PROFILE (in-process, this interpreter; %.1fs per timing loop, then cProfile)" % seconds
        )
        slow = [0]
        for case in cases:
            queries = [
                ServerQuery(name, dict.fromkeys(criteria, 0))
                for name, criteria in json.loads(case.body)["server_keys"].items()
            ]
            step = notary_step(notary, queries, slow)
            await step()
            n, us = await timed_loop(step, seconds, True)
            print("NotaryService.query, %-10s: %7.1f us/call (%d calls)" % (case.name, us, n))
        # Full requests through HTTPChannel + Site: ours and bare.
        full: dict[str, float] = {}
        clients: dict[tuple[str, str], InProcessClient] = {}
        for case in cases:
            reply = http_reply_body(parts.site, case)
            bare_site = build_bare_site(reply, parts.server)
            for label, site in (("ours", parts.site), ("bare", bare_site)):
                client = clients[(label, case.name)] = InProcessClient(site, len(reply))
                data = raw_request(case.body)
                await client.request(data)
                n, us = await timed_loop(functools.partial(client.request, data), seconds, True)
                full[label + case.name] = us
            print(
                "full HTTP request in-process, %-10s: ours %6.1f us, bare %6.1f us "
                "(bare/ours %.2f; ours' own share %.1f us)"
                % (
                    case.name,
                    full["ours" + case.name],
                    full["bare" + case.name],
                    full["bare" + case.name] / full["ours" + case.name],
                    full["ours" + case.name] - full["bare" + case.name],
                )
            )
        print(
            "(queries not answered synchronously, i.e. cache refills: %d notary, %d HTTP)"
            % (slow[0], sum(c.async_replies for c in clients.values()))
        )
        print()
        for case in cases:
            client = clients[("ours", case.name)]
            data = raw_request(case.body)
            profile = cProfile.Profile()
            profile.enable()
            await timed_loop(functools.partial(client.request, data), seconds, True)
            profile.disable()
            print_stats(profile, "ours, full request, " + case.name, args.profile_top)
        if parts.client.calls:
            print("WARNING: outbound fetches during the profile: %s" % parts.client.calls[:5])
        for client in clients.values():
            client.close()
    finally:
        await parts.services.close()


def http_reply_body(site: Any, case: Case) -> bytes:
    """Ours' reply body for ``case``, through a throwaway in-process channel."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    transport = StringTransport()
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40001))
    channel.makeConnection(transport)
    channel.dataReceived(raw_request(case.body))
    reply: bytes = transport.value()
    head, _, body = reply.partition(b"\r\n\r\n")
    channel.connectionLost(None)
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError("profile: ours answered %r" % head[:200])
    return body


def run_profile(args: argparse.Namespace, workdir: str) -> int:
    from bench._reactor import run_on_reactor
    from keyring_module.config import LoggingConfig
    from keyring_module.logconfig import setup_logging

    setup_logging(LoggingConfig(level="WARNING"))
    profile_dir = os.path.join(workdir, "profile")
    os.makedirs(profile_dir)
    result = run_on_reactor(lambda: profile_main(args, profile_dir))
    if result is not None and hasattr(result, "getTraceback"):
        print("profile failed:\n%s" % result.getTraceback(), file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Cached notary POST /query req/s vs a bare Twisted resource, then a profile."
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run (default 5)")
    parser.add_argument("--runs", type=int, default=3, help="runs per point; median (default 3)")
    parser.add_argument(
        "--connections",
        type=lambda s: tuple(int(x) for x in s.split(",")),
        default=CONNECTIONS,
        help="comma-separated connection counts (default 1,8)",
    )
    parser.add_argument("--loader", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk -t (default 1)")
    parser.add_argument("--host", default="127.0.0.1", help="loopback only")
    parser.add_argument("--no-profile", action="store_true", help="skip the profile")
    parser.add_argument("--profile-only", action="store_true", help="only the profile")
    parser.add_argument("--no-big-batch", action="store_true", help="skip the big-batch case")
    parser.add_argument(
        "--big-batch-only", action="store_true", help="only the big-batch case (5,000 servers)"
    )
    parser.add_argument(
        "--big-batch-requests", type=int, default=5, help="big-batch requests per kind (default 5)"
    )
    parser.add_argument("--profile-seconds", type=float, default=2.0)
    parser.add_argument("--profile-top", type=int, default=25)
    parser.add_argument(
        "--workers",
        type=lambda s: tuple(int(x) for x in s.split(",")),
        help="only load `serve --workers N` for each N (e.g. 1,2; bench/notary_workers.py); "
        "default connections 16",
    )
    parser.add_argument("--role", choices=("ours", "bare"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--body-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.role:
        _add_repo_root_to_path()
        from bench._loadclient import is_loopback

        if not is_loopback(args.host):
            parser.error("refusing non-loopback host %r" % args.host)
        if not 0 < args.duration <= 60 or not 1 <= args.runs <= 10:
            parser.error("--duration must be in (0, 60] and --runs in 1..10")
        if not args.connections or not all(1 <= c <= 256 for c in args.connections):
            parser.error("--connections must be 1..256 each")
        if not 1 <= args.big_batch_requests <= 50:
            parser.error("--big-batch-requests must be 1..50")
        if args.workers is not None:
            if not args.workers or not all(1 <= n <= 8 for n in args.workers):
                parser.error("--workers must be 1..8 each")
            if args.connections == CONNECTIONS:
                args.connections = (16,)
    return args


def run_big_batch_process(requests: int) -> int:
    """Run the big-batch case (``bench/notary_big_batch.py``) in a process of its own
    (each runs the global reactor once); its exit status."""
    command = [sys.executable, "-m", "bench.notary_big_batch", "--requests", str(requests)]
    return subprocess.run(command, cwd=REPO_ROOT, check=False, timeout=1800).returncode


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.role:
        return serve(args.role, args.workdir, args.body_file)
    _add_repo_root_to_path()
    from bench._subprocess import ServerProcess

    def on_sigterm(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    logging.basicConfig(level=logging.WARNING)
    workdir = tempfile.mkdtemp(prefix="bench_notary_")
    status = 0
    started = time.monotonic()
    try:
        if args.workers:
            from bench.notary_workers import run_workers_bench

            return run_workers_bench(args, workdir)
        if not (args.profile_only or args.big_batch_only):
            try:
                status = run_load_bench(args, workdir)
            finally:
                ServerProcess.stop_all()
        if args.big_batch_only or not (args.no_big_batch or args.profile_only):
            status = max(status, run_big_batch_process(args.big_batch_requests))
        if not (args.no_profile or args.big_batch_only):
            status = max(status, run_profile(args, workdir))
    except RuntimeError as e:
        print("bench failed: %s" % (e,), file=sys.stderr)
        status = 1
    finally:
        ServerProcess.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    print("total time %.0fs" % (time.monotonic() - started))
    return status


if __name__ == "__main__":
    sys.exit(main())
