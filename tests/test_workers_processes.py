"""``keyring-module serve`` with worker processes: a supervisor and its workers.

Real processes, real HTTP on 127.0.0.1, fake origins serving HTTPS from the test's
reactor, one SQLite file. To make a request land on one worker for sure, the test
pauses the other (SIGSTOP): a paused worker accepts nothing, so the one left takes
every new connection from the shared socket.
"""

import json
import os
import re
import signal
import time
from typing import Any, Callable, Optional

import trustme
from treq.client import HTTPClient
from twisted.internet import defer, task
from twisted.internet.ssl import Certificate
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS
from twisted.web.http_headers import Headers

from keyring_module.clock import global_reactor
from keyring_module.worker import WORKER_HEADER
from tests.serve_processes import (
    ServeInstance,
    ServeProcessesCase,
    instance_config,
    new_pool,
    served_key_ids,
)
from tests.storage_writer import postgres_test_schema
from tests.test_server import free_port
from tests.utils import key_id

#: Concurrent queries of the single-flight test.
QUERIES = 200
#: The flight lease of the kill test.
LEASE_S = 2


class _Workers(ServeProcessesCase):
    """Helpers: a fake origin, ``serve`` with workers on the test's database."""

    def database(self) -> dict[str, Any]:
        return {
            "backend": "sqlite",
            "path": os.path.join(self.directory, "keyring.db"),
            "flight_lease": "%ds" % LEASE_S,
            "poll_interval": "50ms",
        }

    def config(self, **more: Any) -> dict[str, Any]:
        return instance_config(self.origins.ca_file, self.database(), **more)

    async def serve(self, config: dict[str, Any], *args: str) -> ServeInstance:
        return await ServeInstance.start(
            self, self.reactor, os.path.join(self.directory, "serve"), config, args
        )

    def worker_pids(self, serve: ServeInstance) -> dict[int, int]:
        """The latest pid of each worker, from the supervisor's log."""
        return _pids(serve)

    def pause(self, pid: int) -> None:
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(self.resume, pid)

    def resume(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass

    async def request(
        self, port: int, path: str, body: Optional[dict[str, Any]] = None
    ) -> tuple[int, Optional[int], Any]:
        """GET (or POST ``body`` to) ``path``; (status, worker index, decoded body)."""
        client = HTTPClient(Agent(self.reactor, pool=self.pool))
        url = "http://127.0.0.1:%d%s" % (port, path)
        if body is None:
            response = await client.get(url, timeout=60)
        else:
            response = await client.post(
                url,
                data=json.dumps(body).encode(),
                headers=Headers({b"Content-Type": [b"application/json"]}),
                timeout=60,
            )
        content = await response.content()
        worker = response.headers.getRawHeaders(WORKER_HEADER)
        return response.code, int(worker[0]) if worker else None, json.loads(content)

    async def query(self, port: int, name: str) -> tuple[int, Optional[int], Any]:
        return await self.request(port, "/_matrix/key/v2/query", {"server_keys": {name: {}}})

    async def wait_until(self, what: str, check: Callable[[], bool], seconds: float) -> float:
        """Wait until ``check()`` holds (looking every 10 ms); returns how long it took."""
        started = time.monotonic()
        while not check():
            if time.monotonic() - started > seconds:
                self.fail("%s: not within %.1fs" % (what, seconds))
            await self.sleep(0.01)
        return time.monotonic() - started

    async def sleep(self, seconds: float) -> None:
        await task.deferLater(self.clock, seconds, lambda: None)

    async def health(self, port: int) -> tuple[int, Any]:
        code, _, body = await self.request(port, "/health")
        return code, body

    async def one_fetch_for_200_queries(self) -> None:
        """200 concurrent queries for one uncached origin, answered by both workers,
        reach the origin exactly once; every query gets the origin's key."""
        serve = await self.serve(self.config(workers=2))
        origin = self.origins.start()
        origin.hold = True
        name = origin.server_name
        queries = [defer.ensureDeferred(self.query(serve.port, name)) for _ in range(QUERIES)]
        await self.wait_until("the first fetch", lambda: origin.hits >= 1, 30)
        await self.sleep(1.5)  # every query is waiting by now
        self.assertEqual(origin.hits, 1)
        origin.release()
        answers = await defer.gatherResults(queries, consumeErrors=True)
        want = {key_id(origin.signing_keys[0])}
        workers = set()
        for code, worker, answer in answers:
            self.assertEqual(code, 200, answer)
            self.assertEqual(served_key_ids(answer, name), want)
            workers.add(worker)
        self.assertEqual(origin.hits, 1)
        self.assertEqual(workers, {0, 1})

    async def killed_worker_restarted(self) -> None:
        """SIGKILL of the worker fetching an origin: the other worker's waiting query
        takes the flight over within the lease and gets the key; the supervisor starts
        a new worker in its place, and /health is 200 again once it runs."""
        serve = await self.serve(self.config(workers=2))
        pids = self.worker_pids(serve)
        origin = self.origins.start()
        origin.hold = True
        name = origin.server_name
        self.pause(pids[1])  # the first query goes to worker 0
        first = defer.ensureDeferred(self.query(serve.port, name))
        first.addErrback(lambda f: None)  # its worker is killed: the query fails
        await self.wait_until("the first fetch", lambda: origin.hits == 1, 30)
        self.resume(pids[1])
        self.pause(pids[0])  # the second query goes to worker 1
        waiting = defer.ensureDeferred(self.query(serve.port, name))
        await self.sleep(1.0)
        self.assertEqual(origin.hits, 1)  # worker 1 waits for worker 0's flight
        os.kill(pids[0], signal.SIGKILL)
        took_s = await self.wait_until("the second fetch", lambda: origin.hits == 2, LEASE_S + 2)
        self.assertLess(took_s, LEASE_S + 2)
        origin.held.pop(0)  # the killed worker's request: its connection is gone
        origin.release()
        code, worker, answer = await waiting
        self.assertEqual((code, worker), (200, 1), answer)
        self.assertEqual(served_key_ids(answer, name), {key_id(origin.signing_keys[0])})
        await self.wait_until(
            "a new worker 0", lambda: self.worker_pids(serve).get(0, pids[0]) != pids[0], 10
        )
        ended = "Worker 0 (pid %d) ended" % pids[0]
        self.assertTrue(any(ended in line for line in serve.output))
        started = time.monotonic()
        while (await self.health(serve.port))[0] != 200:
            self.assertLess(time.monotonic() - started, 15, "health stayed 503")
            await self.sleep(0.1)
        self.pause(self.worker_pids(serve)[1])  # the new worker 0 answers
        code, worker, _ = await self.request(serve.port, "/_matrix/key/v2/server")
        self.assertEqual((code, worker), (200, 0))


class WorkersTests(_Workers):
    """``serve`` with two workers on one SQLite file."""

    async def test_one_fetch_for_200_queries_across_workers(self) -> None:
        """200 concurrent queries for one uncached origin, answered by both workers,
        reach the origin exactly once; every query gets the origin's key."""
        await self.one_fetch_for_200_queries()

    async def test_killed_worker_is_restarted_and_its_flight_released(self) -> None:
        """SIGKILL of the worker fetching an origin: its lease runs out and the other
        worker fetches within it; the supervisor starts a new worker in its place."""
        await self.killed_worker_restarted()

    async def test_both_workers_answer_on_one_listener(self) -> None:
        """``serve --workers 2`` starts two workers answering on the one listener: with
        either paused the other answers every request; /health turns 503 naming the
        paused (silent) worker, and 200 again once it runs."""
        serve = await self.serve(self.config(), "--workers", "2")
        pids = self.worker_pids(serve)
        self.assertEqual(sorted(pids), [0, 1])
        self.assertNotIn(serve.pid, pids.values())
        for paused, answering in ((1, 0), (0, 1)):
            self.pause(pids[paused])
            for _ in range(5):
                code, worker, body = await self.request(serve.port, "/_matrix/key/v2/server")
                self.assertEqual((code, worker), (200, answering), body)
            self.resume(pids[paused])
        self.pause(pids[1])
        started = time.monotonic()
        while True:
            code, body = await self.health(serve.port)
            if code == 503:
                break
            self.assertLess(time.monotonic() - started, 15, "health stayed %d" % code)
            await self.sleep(0.2)
        self.assertIn("worker 1 has not reported", body["error"])
        self.resume(pids[1])
        started = time.monotonic()
        while (await self.health(serve.port))[0] != 200:
            self.assertLess(time.monotonic() - started, 10, "health stayed 503")
            await self.sleep(0.1)

    async def test_sigterm_stops_every_process_with_status_0(self) -> None:
        """SIGTERM to the supervisor stops both workers and then itself, with exit
        status 0, leaving no worker process behind."""
        serve = await self.serve(self.config(workers=2))
        pids = list(self.worker_pids(serve).values())
        self.assertEqual(len(pids), 2)
        os.kill(serve.pid, signal.SIGTERM)
        timer = self.reactor.callLater(15, serve.kill)
        await serve.ended
        timer.cancel()
        self.assertEqual(serve.exit_code, 0, "\n".join(serve.output))
        await self.wait_until("workers gone", lambda: not any(_alive(p) for p in pids), 5)

    async def test_workers_stop_when_the_supervisor_is_killed(self) -> None:
        """SIGKILL of the supervisor (no chance to stop its workers): each worker
        notices its parent is gone and stops by itself within a few seconds."""
        serve = await self.serve(self.config(workers=2))
        pids = list(self.worker_pids(serve).values())
        serve.kill()
        await serve.ended
        await self.wait_until("workers gone", lambda: not any(_alive(p) for p in pids), 10)

    async def test_metrics_sum_over_workers(self) -> None:
        """The supervisor's metrics listener counts the notary queries of both workers:
        6 answered by each, 12 in ``keyring_notary_requests_total``."""
        metrics_port = free_port()
        config = self.config(workers=2, metrics={"enabled": True, "port": metrics_port})
        serve = await self.serve(config)
        pids = self.worker_pids(serve)
        for paused, answering in ((1, 0), (0, 1)):
            self.pause(pids[paused])
            for _ in range(6):
                code, worker, _ = await self.query(serve.port, "localhost:%d" % serve.port)
                self.assertEqual((code, worker), (200, answering))
            self.resume(pids[paused])
        client = HTTPClient(Agent(self.reactor, pool=self.pool))
        response = await client.get("http://127.0.0.1:%d/metrics" % metrics_port, timeout=30)
        text = (await response.content()).decode()
        counted = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("keyring_notary_requests_total{") and 'code="200"' in line
        )
        self.assertEqual(counted, 12, text)
        self.assertIn("keyring_fetches_in_flight 0.0", text)


class PostgresWorkersTests(_Workers):
    """``serve`` with two workers on one PostgreSQL database."""

    def database(self) -> dict[str, Any]:
        dsn, _ = postgres_test_schema(self)
        return {"backend": "postgres", "dsn": dsn}

    async def test_one_fetch_for_200_queries_across_workers(self) -> None:
        """200 concurrent queries for one uncached origin, answered by both workers,
        reach the origin exactly once (one advisory lock for the workers)."""
        await self.one_fetch_for_200_queries()

    async def test_killed_worker_is_restarted_and_its_flight_released(self) -> None:
        """SIGKILL of the worker fetching an origin ends its session and frees its
        advisory lock: the other worker fetches at once; a new worker takes its place."""
        await self.killed_worker_restarted()


class WorkersTLSTests(TestCase):
    """A TLS listener with two workers."""

    timeout = 60

    async def test_tls_listener_with_workers(self) -> None:
        """Both workers answer on a TLS listener (the supervisor binds it, each worker
        wraps the shared socket in TLS with the configured certificate)."""
        reactor = global_reactor()
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        ca = trustme.CA()
        cert = ca.issue_cert("localhost", "127.0.0.1")
        cert.private_key_pem.write_to_path(os.path.join(directory, "tls.key"))
        cert.cert_chain_pems[0].write_to_path(os.path.join(directory, "tls.crt"))
        port = free_port()
        config = {
            "workers": 2,
            "database": {"backend": "sqlite", "path": os.path.join(directory, "keyring.db")},
            "listeners": [
                {
                    "port": port,
                    "bind_addresses": ["127.0.0.1"],
                    "tls": True,
                    "tls_certificate_path": "tls.crt",
                    "tls_private_key_path": "tls.key",
                }
            ],
        }
        serve = await _start_tls(self, reactor, directory, config, port)
        policy = BrowserLikePolicyForHTTPS(trustRoot=Certificate.loadPEM(ca.cert_pem.bytes()))
        client = HTTPClient(Agent(reactor, contextFactory=policy, pool=new_pool(reactor, self)))
        workers = set()
        for pid_paused in _pids(serve).values():
            os.kill(pid_paused, signal.SIGSTOP)
            try:
                response = await client.get(
                    "https://localhost:%d/_matrix/key/v2/server" % port, timeout=30
                )
                self.assertEqual(response.code, 200)
                body = json.loads(await response.content())
                self.assertEqual(body["server_name"], "localhost:%d" % port)
                workers.add(response.headers.getRawHeaders(WORKER_HEADER)[0].decode())
            finally:
                os.kill(pid_paused, signal.SIGCONT)
        self.assertEqual(workers, {"0", "1"})


async def _start_tls(
    test: TestCase, reactor: Any, directory: str, config: dict[str, Any], port: int
) -> ServeInstance:
    """``serve`` on a TLS listener (ServeInstance writes a plain one otherwise)."""
    import sys

    import yaml

    from tests.serve_processes import REPO_ROOT, _Output

    config = dict(config, server_name="localhost:%d" % port, signing_key_path="signing.key")
    path = os.path.join(directory, "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    output = _Output("Listening on https://127.0.0.1:%d" % port)
    transport = reactor.spawnProcess(
        output,
        sys.executable,
        [sys.executable, "-m", "keyring_module", "serve", "--config", path],
        env=dict(os.environ, PYTHONPATH=REPO_ROOT),
        path=directory,
    )
    serve = ServeInstance(reactor, transport, output, port)
    test.addCleanup(serve.stop)
    timer = reactor.callLater(30, output.ready.cancel)
    await output.ready
    timer.cancel()
    return serve


def _pids(serve: ServeInstance) -> dict[int, int]:
    """The latest pid of each worker, from the supervisor's log."""
    pids: dict[int, int] = {}
    for line in serve.output:
        found = re.search(r"Worker (\d+) started \(pid (\d+)\)", line)
        if found:
            pids[int(found.group(1))] = int(found.group(2))
    return pids


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (not gone, not a zombie)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
