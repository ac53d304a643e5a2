"""Benchmark: how long one hostile key answer holds the reactor thread.

Run from the repository root (under a minute with the defaults, most of it spent
signing the answers)::

    .venv/bin/python -m bench.validation
    .venv/bin/python -m bench.validation --repeat 1 --notary-entries 10

On the real reactor, a local HTTP server on 127.0.0.1 serves prepared answers and the
fetchers, wired as ``serve`` wires them (the federation client decoding big bodies and
the fetchers validating in a worker pool like the server's, ``federation.max_keys_per_response``
at its default), fetch them through the real federation client. Meanwhile a probe
re-schedules itself every millisecond with ``callLater`` and records the longest gap
between two of its runs: the longest time anything held the reactor thread (serving,
receiving, decoding, validating, or the GIL held by a worker thread).

Answers, each fetched ``--repeat`` times:

* origin answers with 1 (the benign baseline), 100, the cap and 2,000 validly
  self-signed keys (2,000 is over the cap, so it is refused before any signature check),
  and 2,000 keys again with the cap raised to 2,000 (all checked, in the thread pool);
* ~1 MB answers of one key: padded with one long string, with half a million tiny
  values, with ninety thousand empty objects (the worst cases for JSON decoding and
  encoding, and for the garbage collector), and with a 400 KB key holding two hundred
  thousand empty arrays (checking must not rebuild that key for each of them);
* one notary answer of 100 entries (one per server asked in a batch) at the cap. It is
  about 4 MB, over the default ``federation.max_response_size``, which is raised for it.

Printed per answer, each over the repeats:

* its size and the outcome;
* the longest reactor hold, and its ratio to the 1-key baseline. A control row comes
  first: the probe alone for one second, showing how much the machine itself delays
  the reactor (the load average is printed too);
* "of it CPU": the most CPU time the reactor thread itself used within one gap; the
  rest of a gap is waiting, for the GIL or for a CPU on a busy machine;
* the longest garbage-collector pause during the fetches, in any thread: a full
  collection holds the GIL while it walks every object of the process, and decoding
  a document of many small containers allocates enough to start one;
* the median time the whole fetch took (most of it in the thread pool).

Target: every hold under 50 ms.

By default garbage collection runs as ``keyring-module serve`` runs it: driven by the
reactor (:class:`~keyring_module.gc_policy.ReactorGarbageCollector`, as Synapse's GC
manager does for a homeserver). ``--gc automatic`` leaves Python's automatic collection
on (the collector may then start in the worker thread, mid-fetch); ``--gc paused`` turns
collection off during each fetch: the holds then show the work alone.
"""

import argparse
import gc
import os
import statistics
import sys
import threading
import time
from typing import Any, Callable, Optional, Sequence

import attr
from canonicaljson import encode_canonical_json
from nacl.signing import SigningKey as NaclSigningKey
from twisted.internet import defer
from twisted.web.resource import Resource
from twisted.web.server import Site
from unpaddedbase64 import encode_base64

from keyring_module.blocking import WorkerPool
from keyring_module.clock import KeyringReactor, global_reactor
from keyring_module.config import DEFAULT_MAX_KEYS_PER_RESPONSE, parse_config
from keyring_module.fetchers.base import SourceAnswers
from keyring_module.gc_policy import ReactorGarbageCollector
from keyring_module.http.client import MatrixFederationClient
from keyring_module.model import KeyRequest
from keyring_module.storage.memory import InMemoryKeyStore
from keyring_module.wiring import Fetching

NOW_MS = int(time.time() * 1000)
DAY_MS = 24 * 60 * 60 * 1000
PROBE_INTERVAL_S = 0.001
TARGET_MS = 50.0
ONE_MB = 1_000_000


class Signer:
    """Signs prepared objects fast: encode once, then one nacl signature per key."""

    def __init__(self, key_count: int) -> None:
        self.keys = [NaclSigningKey.generate() for _ in range(key_count)]

    def key_id(self, index: int) -> str:
        return "ed25519:k%d" % index

    def key_object(
        self, server_name: str, key_count: int, extra: Optional[dict[str, Any]] = None
    ) -> dict[str, Any]:
        """A ``/_matrix/key/v2/server`` object with ``key_count`` keys, each self-signing."""
        obj: dict[str, Any] = {
            "server_name": server_name,
            "valid_until_ts": NOW_MS + DAY_MS,
            "verify_keys": {
                self.key_id(i): {"key": encode_base64(self.keys[i].verify_key.encode())}
                for i in range(key_count)
            },
            "old_verify_keys": {},
            **(extra or {}),
        }
        signed = encode_canonical_json(obj)
        obj["signatures"] = {
            server_name: {
                self.key_id(i): encode_base64(self.keys[i].sign(signed).signature)
                for i in range(key_count)
            }
        }
        return obj

    def cosign(self, obj: dict[str, Any], notary: str, notary_key: NaclSigningKey) -> None:
        """Add a notary's signature to ``obj`` in place."""
        unsigned = {k: v for k, v in obj.items() if k not in ("signatures", "unsigned")}
        signature = notary_key.sign(encode_canonical_json(unsigned)).signature
        obj["signatures"][notary] = {"ed25519:n": encode_base64(signature)}


class FixedAnswer(Resource):
    """Serves one prepared body to any GET or POST."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.body = b"{}"

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return self.body

    render_POST = render_GET


class GcPauses:
    """Records the longest garbage-collector pause (any thread) since :meth:`reset`."""

    def __init__(self) -> None:
        self._started: dict[int, float] = {}
        self.longest_s = 0.0

    def install(self) -> None:
        gc.callbacks.append(self._on_gc)

    def uninstall(self) -> None:
        gc.callbacks.remove(self._on_gc)

    def reset(self) -> None:
        self.longest_s = 0.0

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        thread = threading.get_ident()
        if phase == "start":
            self._started[thread] = time.perf_counter()
        elif thread in self._started:
            pause = time.perf_counter() - self._started.pop(thread)
            self.longest_s = max(self.longest_s, pause)


class StallProbe:
    """Runs every millisecond on the reactor and remembers the longest gap between two
    runs (wall clock), and the most CPU time the reactor thread itself used within one
    gap (the rest of a gap is waiting: for the GIL, or for a CPU on a busy machine)."""

    def __init__(self, reactor: KeyringReactor) -> None:
        self._reactor = reactor
        self._last = time.perf_counter()
        self._last_cpu = time.thread_time()
        self.longest_s = 0.0
        self.longest_cpu_s = 0.0
        self._call: Any = None

    def start(self) -> None:
        self.reset()
        self._call = self._reactor.callLater(PROBE_INTERVAL_S, self._tick)

    def reset(self) -> None:
        self._last = time.perf_counter()
        self._last_cpu = time.thread_time()
        self.longest_s = 0.0
        self.longest_cpu_s = 0.0

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()

    def _tick(self) -> None:
        now, now_cpu = time.perf_counter(), time.thread_time()
        self.longest_s = max(self.longest_s, now - self._last - PROBE_INTERVAL_S)
        self.longest_cpu_s = max(self.longest_cpu_s, now_cpu - self._last_cpu)
        self._last, self._last_cpu = now, now_cpu
        self._call = self._reactor.callLater(PROBE_INTERVAL_S, self._tick)


@attr.s(auto_attribs=True, frozen=True, slots=True)
class Scenario:
    """One answer to fetch: what the server serves and how the fetcher asks for it."""

    name: str
    body: bytes
    fetch: Callable[[], "defer.Deferred[SourceAnswers]"]


@attr.s(auto_attribs=True, frozen=True, slots=True)
class Result:
    name: str
    size: int
    outcome: str
    hold_ms: float
    reactor_cpu_ms: float
    gc_pause_ms: float
    fetch_ms: float


def _idle(reactor: KeyringReactor) -> "defer.Deferred[SourceAnswers]":
    """The control: no fetch at all, for one second."""
    return _sleep(reactor, 1.0).addCallback(lambda _: SourceAnswers())


def _outcome(answers: SourceAnswers) -> str:
    if not answers.results and not answers.failures:
        return "-"
    if answers.results and not answers.failures:
        return "ok (%d)" % len(answers.results)
    details = sorted({f.detail.split(":")[0] for fs in answers.failures.values() for f in fs})
    return "%d ok, failed: %s" % (len(answers.results), ", ".join(details))


async def _measure(
    reactor: KeyringReactor,
    probe: StallProbe,
    served: FixedAnswer,
    scenario: Scenario,
    args: argparse.Namespace,
) -> Result:
    served.body = scenario.body
    gc_pauses = GcPauses()
    gc_pauses.install()
    holds, cpu, pauses, durations, outcome = [], [], [], [], ""
    try:
        for _ in range(args.repeat):
            gc.collect()
            await _sleep(reactor, 0.05)
            if args.gc == "paused":
                gc.disable()
            probe.reset()
            gc_pauses.reset()
            start = time.perf_counter()
            answers = await scenario.fetch()
            durations.append((time.perf_counter() - start) * 1000)
            await _sleep(reactor, 0.01)  # let the probe see the end of the work
            holds.append(probe.longest_s * 1000)
            cpu.append(probe.longest_cpu_s * 1000)
            pauses.append(gc_pauses.longest_s * 1000)
            if args.gc == "paused":
                gc.enable()
            outcome = _outcome(answers)
    finally:
        if args.gc == "paused":
            gc.enable()
        gc_pauses.uninstall()
    return Result(
        scenario.name,
        len(scenario.body),
        outcome,
        max(holds),
        max(cpu),
        max(pauses),
        statistics.median(durations),
    )


def _sleep(reactor: KeyringReactor, seconds: float) -> "defer.Deferred[None]":
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


def _padded(signer: Signer, server: str, padding: object) -> bytes:
    return encode_canonical_json(signer.key_object(server, 1, {"padding": padding}))


def _build_scenarios(
    reactor: KeyringReactor,
    port: int,
    signer: Signer,
    args: argparse.Namespace,
    run_blocking: WorkerPool,
) -> list[Scenario]:
    server = "127.0.0.1:%d" % port
    notary_key = NaclSigningKey.generate()

    def fetching(max_keys: int = DEFAULT_MAX_KEYS_PER_RESPONSE, max_response_size: int = 0) -> Any:
        """The fetch layer as the server builds it (through the wiring), speaking plain
        HTTP to 127.0.0.1, with no per-origin limit in the way of repeated fetches."""
        config = parse_config(
            {
                "signing_key_path": "unused",
                "trusted_key_servers": [
                    {
                        "server_name": server,
                        "verify_keys": {"ed25519:n": encode_base64(notary_key.verify_key.encode())},
                    }
                ],
                "federation": {
                    "ip_range_allowlist": ["127.0.0.1/32"],
                    "max_keys_per_response": max_keys,
                    # The default (1 MiB) unless a bigger answer is measured.
                    "max_response_size": max_response_size or None,
                },
                "ratelimit": {"origin_burst": 1000},
            },
            standalone=False,
        )
        client = MatrixFederationClient(
            reactor, config.federation, allow_plain_http_for_tests=True, run_blocking=run_blocking
        )
        return Fetching.build(
            reactor, config, InMemoryKeyStore(), client=client, run_blocking=run_blocking
        )

    def origin_fetch(max_keys: int = DEFAULT_MAX_KEYS_PER_RESPONSE) -> Callable[[], Any]:
        def fetch() -> "defer.Deferred[SourceAnswers]":
            # A fresh fetch layer per fetch: a refused answer must not back the next off.
            fetcher = fetching(max_keys).origin_fetcher
            return defer.ensureDeferred(fetcher.fetch_keys({server: KeyRequest(server)}))

        return fetch

    cap = DEFAULT_MAX_KEYS_PER_RESPONSE
    print("signing the answers ...", file=sys.stderr)
    scenarios = [Scenario("idle: no fetch, for 1 s", b"", lambda: _idle(reactor))]
    scenarios += [
        Scenario(
            "origin, %d key%s" % (n, "" if n == 1 else "s") + (" (the cap)" if n == cap else ""),
            encode_canonical_json(signer.key_object(server, n)),
            origin_fetch(),
        )
        for n in (1, 100, cap, 2000)
    ]
    scenarios.append(
        Scenario(
            "origin, 2000 keys, cap raised to 2000",
            scenarios[-1].body,
            origin_fetch(max_keys=2000),
        )
    )
    one_key = len(scenarios[1].body)
    scenarios.append(
        Scenario(
            "origin, ~1 MB: one long string",
            _padded(signer, server, "x" * (ONE_MB - one_key - 15)),
            origin_fetch(),
        )
    )
    scenarios.append(
        Scenario(
            "origin, ~1 MB: tiny values",
            _padded(signer, server, [0] * ((ONE_MB - one_key - 15) // 2)),
            origin_fetch(),
        )
    )
    scenarios.append(
        Scenario(
            "origin, ~1 MB: tiny objects",
            _padded(signer, server, {"%05x" % i: {} for i in range((ONE_MB - one_key) // 11)}),
            origin_fetch(),
        )
    )

    long_key = "k" * 400_000
    scenarios.append(
        Scenario(
            "origin, ~1 MB: long key, tiny arrays",
            _padded(signer, server, {long_key: [[]] * ((ONE_MB - one_key - len(long_key)) // 3)}),
            origin_fetch(),
        )
    )

    names = ["s%d.example" % i for i in range(args.notary_entries)]
    entries = []
    for name in names:
        entry = signer.key_object(name, cap)
        signer.cosign(entry, server, notary_key)
        entries.append(entry)
    notary_body = encode_canonical_json({"server_keys": entries})

    def notary_fetch() -> "defer.Deferred[SourceAnswers]":
        (fetcher,) = fetching(max_response_size=len(notary_body) + 1024).notary_fetchers
        return defer.ensureDeferred(fetcher.fetch_keys({n: KeyRequest(n) for n in names}))

    scenarios.append(
        Scenario("notary, %d entries at the cap" % args.notary_entries, notary_body, notary_fetch)
    )
    return scenarios


def _print(results: Sequence[Result], gc_mode: str) -> bool:
    baseline = max(results[1].hold_ms, PROBE_INTERVAL_S * 1000)  # one key
    print()
    print(
        "garbage collection: %s during the fetches; load average %.2f"
        % (gc_mode, os.getloadavg()[0])
    )
    print(
        "%-38s %9s  %-28s %12s %7s %12s %11s %9s"
        % ("answer", "bytes", "outcome", "reactor hold", "ratio", "of it CPU", "GC pause", "fetch")
    )
    for r in results:
        print(
            "%-38s %9d  %-28s %9.1f ms %6.1fx %9.1f ms %8.1f ms %6.0f ms"
            % (
                r.name,
                r.size,
                r.outcome,
                r.hold_ms,
                r.hold_ms / baseline,
                r.reactor_cpu_ms,
                r.gc_pause_ms,
                r.fetch_ms,
            )
        )
    worst = max(results, key=lambda r: r.hold_ms)
    ok = worst.hold_ms < TARGET_MS
    print()
    print(
        "longest hold: %.1f ms (%s); target < %.0f ms: %s"
        % (worst.hold_ms, worst.name, TARGET_MS, "met" if ok else "NOT met")
    )
    return ok


async def _run(reactor: KeyringReactor, args: argparse.Namespace) -> bool:
    served = FixedAnswer()
    listening = reactor.listenTCP(0, Site(served), interface="127.0.0.1")
    probe = StallProbe(reactor)
    workers = WorkerPool(reactor)  # one for the run, as the server has one
    try:
        signer = Signer(max(2000, DEFAULT_MAX_KEYS_PER_RESPONSE))
        port = listening.getHost().port
        scenarios = _build_scenarios(reactor, port, signer, args, workers)
        probe.start()
        results = []
        for scenario in scenarios:
            print("fetching: %s ..." % scenario.name, file=sys.stderr)
            results.append(await _measure(reactor, probe, served, scenario, args))
        return _print(results, args.gc)
    finally:
        probe.stop()
        workers.stop()
        await listening.stopListening()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="fetches per answer")
    parser.add_argument(
        "--notary-entries", type=int, default=100, help="entries in the notary answer"
    )
    parser.add_argument(
        "--gc",
        choices=("reactor", "automatic", "paused"),
        default="reactor",
        help="garbage collection: driven by the reactor (as the server runs), Python's "
        "automatic collection, or paused during each fetch",
    )
    args = parser.parse_args(argv)
    reactor = global_reactor()
    if args.gc == "reactor":
        ReactorGarbageCollector(reactor).start()
    outcome: list[bool] = []

    def run() -> None:
        d = defer.ensureDeferred(_run(reactor, args))
        d.addCallbacks(outcome.append, lambda f: f.printTraceback())
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()
    return 0 if outcome == [True] else 2


if __name__ == "__main__":
    sys.exit(main())
