"""Benchmark: cached ``POST /_matrix/key/v2/query`` through ``serve`` with 1, 2, ... workers.

Run from the repository root (``bench/notary.py --workers 1,2`` runs this)::

    .venv/bin/python bench/notary.py --workers 1,2
    .venv/bin/python bench/notary.py --workers 1,2 --connections 16 --duration 5 --runs 3

What it does:

1. Seeds one SQLite store (in a temp dir) with valid signed responses (one day) of
   ``origin1.test`` ... ``origin20.test``, in a process of its own.
2. Starts one real ``keyring-module serve --workers N`` per worker count, each on a
   copy of that store, on 127.0.0.1 with a free port, and the metrics listener on
   another. It waits for the supervisor's "Listening on" line (every worker ready).
3. Warms each up with the 1-server query, checks the replies (status 200, the key,
   our signature), then loads them with ``wrk`` (or ``bench/_loadclient.py``) at each
   ``--connections``, ``--runs`` runs of ``--duration`` seconds, the worker counts
   interleaved; the median is reported.
4. Prints req/s and p50 per worker count and connection count, the ratio to one
   worker, and checks through the metrics (summed over the workers) that no query
   caused an origin fetch. Target: 2 workers >= 1.3x one worker at 16 connections.

The load generator runs on the same machine and takes its share of the cores. Loopback
only; every server is stopped (SIGTERM, then SIGKILL) at the end.
"""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from typing import Any, Optional, Sequence

import attr
import yaml

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: The target: this many times one worker's req/s with two, at TARGET_CONNECTIONS.
TARGET_RATIO = 1.3
TARGET_CONNECTIONS = 16
#: How long a server may take to start.
START_TIMEOUT_S = 60.0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def seed(database: str) -> int:
    """Process entry (``--seed``): store the origins' responses in ``database``; print
    ``{server_name: key_id}`` as JSON."""
    from twisted.internet import defer, task

    from bench.notary import seed_store

    async def run(reactor: Any) -> None:
        from keyring_module.clock import now_ms
        from keyring_module.storage.sqlite import SqliteKeyStore

        store = SqliteKeyStore(database, reactor)
        try:
            await store.migrate()
            print(json.dumps(await seed_store(store, now_ms(reactor))))
        finally:
            await store.close()

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))  # exits the process
    return 0


class Serve:
    """One ``keyring-module serve --workers N`` process on 127.0.0.1."""

    def __init__(self, workdir: str, workers: int, database: str, notary_name: str) -> None:
        self.workers = workers
        self.port = _free_port()
        self.metrics_port = _free_port()
        directory = os.path.join(workdir, "serve%d" % workers)
        os.makedirs(directory)
        shutil.copy(database, os.path.join(directory, "keys.db"))
        config = {
            "server_name": notary_name,
            "signing_key_path": "signing.key",
            "listeners": [{"port": self.port, "bind_addresses": ["127.0.0.1"]}],
            "database": {"backend": "sqlite", "path": "keys.db"},
            "inbound": {"max_connections_per_address": 0},
            "metrics": {"enabled": True, "port": self.metrics_port},
            "logging": {"level": "INFO"},
        }
        path = os.path.join(directory, "config.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(config, f)
        self.log_path = os.path.join(directory, "serve.log")
        command = [sys.executable, "-m", "keyring_module", "serve", "--config", path]
        command += ["--workers", str(workers)]
        with open(self.log_path, "w") as log:
            # This checkout's code, whatever is installed.
            env = dict(os.environ, PYTHONPATH=REPO_ROOT)
            self.proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=directory, env=env
            )
        ready = "Listening on http://127.0.0.1:%d" % self.port
        started = time.monotonic()
        while ready not in self.log():
            if self.proc.poll() is not None or time.monotonic() - started > START_TIMEOUT_S:
                raise RuntimeError("serve --workers %d did not start:\n%s" % (workers, self.log()))
            time.sleep(0.1)

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def metric(self, name: str) -> float:
        """The sum of every sample of ``name`` on the metrics listener."""
        url = "http://127.0.0.1:%d/metrics" % self.metrics_port
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if re.match(r"%s(\{| )" % re.escape(name), line)
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_workers_bench(args: argparse.Namespace, workdir: str) -> int:
    """Load ``serve`` with each of ``args.workers`` worker counts; the exit status."""
    from bench.notary import (
        NOTARY_NAME,
        LoadResult,
        check_reply,
        http_post,
        make_cases,
        run_python_client,
        run_wrk,
        write_wrk_script,
    )

    database = os.path.join(workdir, "seed.db")
    out = subprocess.run(
        [sys.executable, "-m", "bench.notary_workers", "--seed", database],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    key_ids: dict[str, str] = json.loads(out.stdout.strip().splitlines()[-1])
    case = make_cases(key_ids)[0]  # the 1-server query
    wrk = None if args.loader == "python" else shutil.which("wrk")
    loader = "wrk -t%d" % args.wrk_threads if wrk else "bench/_loadclient.py"
    servers: list[Serve] = []
    try:
        for workers in args.workers:
            started = time.monotonic()
            servers.append(Serve(workdir, workers, database, NOTARY_NAME))
            print(
                "serve --workers %d: port %d (ready in %.1fs)"
                % (workers, servers[-1].port, time.monotonic() - started)
            )
        body_file = os.path.join(workdir, "body.json")
        with open(body_file, "wb") as f:
            f.write(case.body)
        # Each server has its own signing key: its own reply, the same from each worker.
        cases: dict[int, Any] = {}
        for server in servers:
            replies = set()
            for code, reply in http_post(server.port, case.body, count=50 * server.workers):
                check_reply(case, code, reply, key_ids)
                replies.add(reply)
            if len(replies) != 1:
                raise RuntimeError("--workers %d: replies differ" % server.workers)
            cases[server.workers] = attr.evolve(case, reply=replies.pop())
            write_wrk_script(
                os.path.join(workdir, "post%d.lua" % server.workers), cases[server.workers]
            )

        def load(server: Serve, connections: int) -> LoadResult:
            if wrk is not None:
                script = os.path.join(workdir, "post%d.lua" % server.workers)
                return run_wrk(
                    wrk, server.port, script, connections, args.duration, args.wrk_threads
                )
            return run_python_client(
                server.port, body_file, cases[server.workers], connections, args.duration
            )

        print(
            "load: %s, %s, %d run(s) x %gs per point, worker counts interleaved"
            % (loader, case.name, args.runs, args.duration)
        )
        rows = []
        for connections in args.connections:
            results: dict[int, list[LoadResult]] = {s.workers: [] for s in servers}
            for _ in range(args.runs):
                for server in servers:
                    results[server.workers].append(load(server, connections))
            for workers, runs in results.items():
                rows.append(
                    {
                        "workers": workers,
                        "connections": connections,
                        "rps": statistics.median(r.rps for r in runs),
                        "p50_ms": statistics.median(r.p50_ms for r in runs),
                        "bad": sum(r.bad for r in runs),
                        "runs": [round(r.rps) for r in runs],
                    }
                )
        fetches = sum(s.metric("keyring_origin_fetches_total") for s in servers)
    finally:
        for server in servers:
            server.stop()
    return report(rows, fetches, loader)


def report(rows: list[dict[str, Any]], fetches: float, loader: str) -> int:
    """Print the table and the verdict; 0 if no bad reply and no fetch, else 2."""
    print()
    print(
        "cached POST /_matrix/key/v2/query, 1 server, %s, %d cores" % (loader, os.cpu_count() or 0)
    )
    print("%-8s %-6s %10s %9s %7s  %s" % ("workers", "conns", "req/s", "p50 ms", "x 1w", "runs"))
    single = {r["connections"]: r["rps"] for r in rows if r["workers"] == 1}
    for row in rows:
        base = single.get(row["connections"])
        ratio = "%.2fx" % (row["rps"] / base) if base else "-"
        print(
            "%-8d %-6d %10.0f %9.2f %7s  %s"
            % (row["workers"], row["connections"], row["rps"], row["p50_ms"], ratio, row["runs"])
        )
    bad = sum(int(r["bad"]) for r in rows)
    print("bad replies: %d; origin fetches (all workers): %d" % (bad, fetches))
    for row in rows:
        base = single.get(row["connections"])
        if row["workers"] == 2 and row["connections"] == TARGET_CONNECTIONS and base:
            ratio = row["rps"] / base
            verdict = "meets" if ratio >= TARGET_RATIO else "BELOW"
            print(
                "target %.1fx with 2 workers at %d connections: %.2fx (%s)"
                % (TARGET_RATIO, TARGET_CONNECTIONS, ratio, verdict)
            )
    return 2 if bad or fetches else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=argparse.SUPPRESS)
    parser.add_argument("--seed", required=True)
    return seed(parser.parse_args(argv).seed)


if __name__ == "__main__":
    sys.exit(main())
