"""Benchmark case of ``bench/notary.py``: one Synapse-shaped POST naming 5,000 stored servers.

Synapse's perspectives client sends every server it has queued in one POST (thousands
when it joins a big room). This case builds **ours** in-process, as ``bench/notary.py``
does (``KeyServer`` + ``KeyringServices.create`` on SQLite with its in-memory cache in
front, the standalone ``KeyServerSite``, a federation client that must never be used),
seeds 5,000 + a few servers with fresh one-day responses, then sends whole HTTP requests
through the Site's ``HTTPChannel`` on a ``StringTransport`` with the real reactor, one at
a time, and times each from the first byte in to the last byte out:

* **cold**: the first request (no answer cached, nothing co-signed yet);
* **new question**: each request names a different window of 5,000 servers (the whole
  answer is not cached; the co-signed responses are);
* **repeated question**: the same body again (the whole answer is cached).

It prints p50 and p90 latency for each (target: new question p50 well under 1 s on one
core) and checks every reply: 200, every asked server answered once and co-signed, and
no outbound fetch. Only a few requests (``--big-batch-requests``): other work may share
the CPU::

    .venv/bin/python bench/notary.py --big-batch-only --big-batch-requests 5
    .venv/bin/python -m bench.notary_big_batch --requests 5     # the same
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Sequence

from twisted.python.failure import Failure

BIG_BATCH_SERVERS = 5000
NOTARY_NAME = "notary.bench"
TARGET_P50_S = 1.0
DAY_MS = 24 * 3600 * 1000
QUERY_PATH = "/_matrix/key/v2/query"


def batch_server_name(i: int) -> str:
    """The i-th seeded server, as long as real names tend to be."""
    return "server%05d.example.org" % i


def synapse_body(names: Sequence[str], key_id: str, minimum_ms: int) -> bytes:
    """A POST body as Synapse's perspectives client builds it (compact JSON, one key id
    and one ``minimum_valid_until_ts`` per server)."""
    query = {name: {key_id: {"minimum_valid_until_ts": minimum_ms}} for name in names}
    return json.dumps({"server_keys": query}, separators=(",", ":")).encode()


def percentile(samples: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of ``samples`` (``fraction`` in 0..1)."""
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank]


async def seed_batch(store: Any, count: int, now_ms: int) -> str:
    """Store a signed one-day response for ``count`` servers; returns their key id."""
    from keyring_module.model import SOURCE_ORIGIN
    from keyring_module.validation import parse_server_keys_response
    from tests.utils import key_id, make_signed_server_keys, new_signing_key

    signing_key = new_signing_key("bench_%s" % os.urandom(3).hex())
    for i in range(count):
        name = batch_server_name(i)
        obj = make_signed_server_keys(name, [signing_key], now_ms + DAY_MS)
        response = parse_server_keys_response(obj, name)
        await store.store_server_keys(response, SOURCE_ORIGIN, now_ms)
    return key_id(signing_key)


class ChannelClient:
    """Sends one whole request through a Site's ``HTTPChannel`` and waits for the answer."""

    def __init__(self, site: Any) -> None:
        self.site = site

    async def post(self, body: bytes) -> tuple[int, bytes]:
        """POST ``body`` to the query path; (status, answer body)."""
        from twisted.internet import reactor, task
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        transport = StringTransport()
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40002))
        channel.makeConnection(transport)
        try:
            channel.dataReceived(
                b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (QUERY_PATH.encode(), len(body), body)
            )
            while True:
                answer = _complete_answer(transport.value())
                if answer is not None:
                    return answer
                producer = transport.producer
                if producer is not None and not transport.streaming:
                    producer.resumeProducing()
                await task.deferLater(reactor, 0.0005, lambda: None)
        finally:
            channel.connectionLost(None)


def _complete_answer(data: bytes) -> "tuple[int, bytes] | None":
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    length = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length is None or len(rest) < length:
        return None
    return int(head.split(b" ")[1]), rest[:length]


def check_answer(status: int, reply: bytes, names: Sequence[str], key_id: str) -> None:
    """200, every asked server answered once with its key and our signature."""
    if status != 200:
        raise RuntimeError("big batch: status %d: %r" % (status, reply[:300]))
    entries = json.loads(reply)["server_keys"]
    answered = [e["server_name"] for e in entries]
    if sorted(answered) != sorted(names):
        raise RuntimeError(
            "big batch: answered %d servers, %d asked" % (len(set(answered)), len(names))
        )
    for entry in entries:
        if key_id not in entry["verify_keys"] or NOTARY_NAME not in entry["signatures"]:
            raise RuntimeError("big batch: bad entry for %s" % entry["server_name"])


#: The two setups measured: the store's in-memory cache as configured by default, and
#: with a TTL of 0, so that every read goes to SQLite (a batch naming servers whose cache
#: entries have expired, as they do between batches more than ``database.cache_ttl`` apart).
SETUPS = (("store cache warm", None), ("store cache expired", 0))


async def measure(parts: Any, key_id: str, requests: int) -> dict[str, list[float]]:
    """Time the three kinds of request against a built "ours"; seconds per kind."""
    from twisted.internet import reactor

    from keyring_module.clock import now_ms

    client = ChannelClient(parts.site)
    timings: dict[str, list[float]] = {"cold": [], "new question": [], "repeated question": []}
    minimum = now_ms(reactor)
    windows = [
        [batch_server_name(i) for i in range(shift, shift + BIG_BATCH_SERVERS)]
        for shift in range(requests + 1)
    ]
    plan = (
        [("cold", windows[0])]
        + [("new question", window) for window in windows[1:]]
        + [("repeated question", windows[-1])] * requests
    )
    for kind, names in plan:
        body = synapse_body(names, key_id, minimum)
        started = time.perf_counter()
        status, reply = await client.post(body)
        timings[kind].append(time.perf_counter() - started)
        check_answer(status, reply, names, key_id)
    if parts.client.calls:
        raise RuntimeError("big batch: outbound fetches: %s" % parts.client.calls[:5])
    print(
        "body %d bytes, answer %d bytes"
        % (len(synapse_body(windows[0], key_id, minimum)), len(reply))
    )
    return timings


async def big_batch_main(requests: int, workdir: str) -> dict[str, dict[str, list[float]]]:
    """Seed one SQLite store, then measure each of :data:`SETUPS` on it."""
    from twisted.internet import reactor

    from bench.notary import build_ours
    from keyring_module.clock import now_ms

    results: dict[str, dict[str, list[float]]] = {}
    key_id = ""
    for label, cache_ttl_ms in SETUPS:
        parts = await build_ours(reactor, workdir, cache_ttl_ms)
        try:
            if not key_id:
                started = time.perf_counter()
                count = BIG_BATCH_SERVERS + requests
                key_id = await seed_batch(parts.services.store, count, now_ms(reactor))
                print("seeded %d servers in %.1fs" % (count, time.perf_counter() - started))
            results[label] = await measure(parts, key_id, requests)
        finally:
            await parts.services.close()
    return results


def print_big_batch(results: dict[str, dict[str, list[float]]]) -> int:
    """The table, and whether every new-question p50 meets the target (0) or not (2)."""
    print()
    print("POST %s, %d stored servers in one Synapse-shaped body" % (QUERY_PATH, BIG_BATCH_SERVERS))
    print("| setup | request | n | p50 ms | p90 ms |")
    print("|---|---|---|---|---|")
    status = 0
    for label, timings in results.items():
        for kind, samples in timings.items():
            print(
                "| %s | %s | %d | %.0f | %.0f |"
                % (
                    label,
                    kind,
                    len(samples),
                    1000 * statistics.median(samples),
                    1000 * percentile(samples, 0.9),
                )
            )
    for label, timings in results.items():
        p50 = statistics.median(timings["new question"])
        verdict = "meets" if p50 < TARGET_P50_S else "ABOVE"
        print(
            "target: new question p50 < %.0f ms, %s: %.0f ms (%s)"
            % (1000 * TARGET_P50_S, label, 1000 * p50, verdict)
        )
        if p50 >= TARGET_P50_S:
            status = 2
    print()
    return status


def run_big_batch(requests: int, workdir: str) -> int:
    """Run the big-batch case on the global reactor (once per process); the exit status."""
    from twisted.internet import defer, reactor

    from keyring_module.config import LoggingConfig
    from keyring_module.logconfig import setup_logging

    setup_logging(LoggingConfig(level="WARNING"))
    batch_dir = os.path.join(workdir, "big_batch")
    os.makedirs(batch_dir)
    outcome: dict[str, Any] = {}

    def start() -> None:
        d = defer.ensureDeferred(big_batch_main(requests, batch_dir))

        def done(result: Any) -> None:
            outcome["result"] = result
            reactor.stop()  # type: ignore[attr-defined]

        d.addBoth(done)

    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    result = outcome.get("result")
    if isinstance(result, dict):
        return print_big_batch(result)
    failure = result if isinstance(result, Failure) else None
    print(
        "big batch failed:\n%s" % (failure.getTraceback() if failure else result,),
        file=sys.stderr,
    )
    return 1


def main(argv: "Sequence[str] | None" = None) -> int:
    """Entry point (``python -m bench.notary_big_batch``; ``bench/notary.py`` runs it so)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5, help="requests per kind (1..50)")
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= 50:
        parser.error("--requests must be 1..50")
    workdir = tempfile.mkdtemp(prefix="bench_big_batch_")
    try:
        return run_big_batch(args.requests, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
