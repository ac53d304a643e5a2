"""Benchmark: events per second through ``Keyring.verify_events`` with a warm cache.

Run from the repository root::

    python -m bench.verify                 # 10,000 events from 100 origins, room v10
    python -m bench.verify --events 2000 --repeat 3

The events (about 1 KB each) are generated and signed at start-up by 100 origins. They
are state events whose content survives redaction (``m.room.member`` joins with long
``prev_events``/``auth_events`` lists, ``m.room.power_levels`` with a ``users`` map),
plus an ``unsigned`` section: the bytes the keyring verifies after redaction are then
exactly the bytes the raw loop verifies, so the two are comparable.

Printed, best of ``--repeat`` runs each:

* the **raw loop**: per event, drop ``signatures``/``unsigned``, canonical JSON (by
  ``canonicaljson``, as signedjson and Synapse write it), decode the signature, PyNaCl
  verify (cached ``VerifyKey`` per origin), then the spec's content hash (drop
  ``hashes`` too, canonical JSON, SHA-256, compare): the least a signedjson-based
  implementation of "check the signatures and hashes" does. Every ratio is to it;
* the same raw loop with the keyring's fast encoder for plain events (orjson, see
  :mod:`keyring_module.canonical_json`), to show how much of the keyring's lead over
  the raw loop is the encoder;
* :func:`~keyring_module.verify.verify_event_signatures` called in a plain loop with
  the keys at hand: the signature rules alone, without the keyring's batching;
* ``verify_events`` on the reactor thread, with keys already in the cache
  (target: at least 0.85x the raw loop);
* ``verify_events_in_threads`` with 1..N worker threads (target on 2 cores: more than
  1.5x the single-threaded raw loop), next to the raw loop split over the same threads
  (the ceiling for any thread-based path on this machine);
* ``verify_events_in_processes`` with a pool of 1..N worker processes (target on 2
  cores: at least 1.6x the single-core raw loop), next to the raw loop split over the
  same processes and sent the same way (the ceiling for the process path on this
  machine), and what one chunk sends (marshalled events, signers, keys) and gets back.
  Worker processes start once, before the timed runs. For both, the **parent CPU per
  event** (this process's CPU time for the batch, least of the runs): what the reactor
  thread and the pool's threads spend beside the workers' checks, on the cores the
  workers need.

Each is timed twice: with Python's automatic cyclic GC, and with the GC paused during
the timed batch (collected between batches), which is how a homeserver runs: Synapse's
GC manager disables automatic collection and collects between reactor ticks. The
difference matters for the threaded path: the batch's result Deferreds exist while
the checks run, and a full collection that starts then (it walks every object,
including the 10,000 events) holds the GIL for tens of milliseconds.
"""

import argparse
import gc
import hashlib
import os
import pickle
import random
import string
import sys
import time
from typing import Any, Callable, Iterable, Optional, Sequence

from canonicaljson import encode_canonical_json
from nacl.signing import VerifyKey
from signedjson.key import generate_signing_key
from signedjson.sign import sign_json
from signedjson.types import SigningKey
from twisted.internet import defer, task, threads
from twisted.python.threadpool import ThreadPool
from unpaddedbase64 import decode_base64, encode_base64

from keyring_module.canonical_json import encode_plain, fast_encoder_available
from keyring_module.event_chunks import (
    EncodedEvents,
    check_event_chunk,
    chunk_keys,
    decode_events,
    encode_events,
    gc_paused,
)
from keyring_module.keyring.api import Keyring
from keyring_module.keyring.processes import DEFAULT_MAX_CHUNK_SIZE, WorkerProcessPool
from keyring_module.redaction import redact_event
from keyring_module.roomversions import get_room_version
from keyring_module.signing import OwnKeys
from keyring_module.storage.cache import CachedKeyStore
from keyring_module.storage.memory import InMemoryKeyStore
from keyring_module.validation import parse_server_keys_response
from keyring_module.verify import verify_event_signatures

ROOM_VERSION = "10"
#: How the cyclic GC runs during a timed batch (see the end of :func:`bench`).
GC_MODES = ("automatic", "paused")
NOW_MS = 1_700_000_000_000
DAY_MS = 24 * 60 * 60 * 1000


class _NoFetchChain:
    """A chain that must never be asked: the cache is warm."""

    async def get_keys(
        self, requests: Iterable[Any], *, use_cache: bool = True, on_server: Any = None
    ) -> Any:
        raise AssertionError("the benchmark's cache should be warm, got a fetch")


def _event_id(rng: random.Random) -> str:
    return "$" + "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(43))


def make_event(rng: random.Random, origin: str, i: int) -> dict[str, Any]:
    """One ~1 KB state event from ``origin`` that redaction leaves unchanged."""
    sender = "@user%d:%s" % (i % 50, origin)
    event: dict[str, Any] = {
        "room_id": "!benchroom:hub.example.org",
        "sender": sender,
        "origin": origin,
        "origin_server_ts": NOW_MS - rng.randrange(DAY_MS),
        "depth": 1000 + i,
        "auth_events": [_event_id(rng) for _ in range(4)],
        "unsigned": {"age": rng.randrange(10_000), "txn_id": "m%d" % i},
    }
    if i % 2:
        event.update(
            type="m.room.member",
            state_key=sender,
            content={"membership": "join"},
            prev_events=[_event_id(rng) for _ in range(9)],
        )
    else:
        users = {"@admin%d:%s" % (n, origin): 50 + n for n in range(10)}
        event.update(
            type="m.room.power_levels",
            state_key="",
            content={"users": users, "users_default": 0, "events_default": 0, "ban": 50},
            prev_events=[_event_id(rng) for _ in range(2)],
        )
    return event


def make_workload(
    n_events: int, n_origins: int, seed: int = 1
) -> tuple[list[dict[str, Any]], dict[str, SigningKey]]:
    """Signed events spread round-robin over ``n_origins`` origins, and their keys."""
    rng = random.Random(seed)
    keys = {"origin%03d.example.org" % o: generate_signing_key("k%d" % o) for o in range(n_origins)}
    origins = list(keys)
    events = []
    for i in range(n_events):
        origin = origins[i % n_origins]
        event = make_event(rng, origin, i)
        unsigned = event.pop("unsigned")
        event["hashes"] = {"sha256": encode_base64(_content_hash(event))}
        signed: dict[str, Any] = sign_json(event, origin, keys[origin])
        signed["unsigned"] = unsigned
        events.append(signed)
    # The comparison is only fair if redaction removes nothing that is signed.
    for event in events[:50]:
        redacted = redact_event(event, ROOM_VERSION)
        redacted.pop("signatures", None)
        stripped = {k: v for k, v in event.items() if k not in ("signatures", "unsigned")}
        assert redacted == stripped, "bench events must survive redaction unchanged"
    return events, keys


def raw_loop(
    events: Sequence[dict[str, Any]],
    verify_keys: dict[str, VerifyKey],
    encode: Callable[[Any], bytes] = encode_canonical_json,
) -> None:
    """The floor: strip, canonical JSON, decode and verify, content hash, nothing else
    (canonical JSON by ``canonicaljson``, as signedjson writes it, unless told)."""
    for event in events:
        stripped = {k: v for k, v in event.items() if k not in ("signatures", "unsigned")}
        message = encode(stripped)
        origin = event["origin"]
        ((key_id, signature),) = event["signatures"][origin].items()
        verify_keys[origin].verify(message, decode_base64(signature))
        if _content_hash(stripped, encode) != decode_base64(event["hashes"]["sha256"]):
            raise AssertionError("bench events carry their content hash")


def _content_hash(
    event: dict[str, Any], encode: Callable[[Any], bytes] = encode_canonical_json
) -> bytes:
    unhashed = ("signatures", "unsigned", "hashes")
    return hashlib.sha256(encode({k: v for k, v in event.items() if k not in unhashed})).digest()


def raw_chunk(encoded: EncodedEvents, keys: dict[str, bytes]) -> None:
    """The raw loop on a chunk, in a worker process, with the keyring's transport: the
    events as one blob (:func:`~keyring_module.event_chunks.encode_events`, decoded
    with the GC paused), the keys as bytes."""
    with gc_paused():
        raw_loop(decode_events(encoded), {o: VerifyKey(raw) for o, raw in keys.items()})


def _print_chunk_sizes(events: Sequence[dict[str, Any]], keys: Any, chunk: int) -> None:
    """What one chunk of ``chunk`` events sends to a worker process, and gets back."""
    part = events[:chunk]
    servers = {e["origin"] for e in part}
    encoded = encode_events(part)
    assert encoded is not None
    sent_events = len(pickle.dumps(encoded, pickle.HIGHEST_PROTOCOL))
    signers = [(e["origin"],) for e in part]
    held = chunk_keys(keys, servers)
    sent_keys = len(pickle.dumps(held, pickle.HIGHEST_PROTOCOL))
    sent_signers = len(pickle.dumps(signers, pickle.HIGHEST_PROTOCOL))
    back = check_event_chunk(ROOM_VERSION, encoded, signers, held, NOW_MS)
    received = len(pickle.dumps(back, pickle.HIGHEST_PROTOCOL))
    print(
        "One chunk of %d events sends %d bytes of events (%.0f per event), %d of signers, "
        "%d of keys (%d servers); gets back %d bytes"
        % (chunk, sent_events, sent_events / chunk, sent_signers, sent_keys, len(servers), received)
    )


async def warm_store(keys: dict[str, SigningKey], clock: Any) -> CachedKeyStore:
    """A cached in-memory store holding every origin's current key."""
    store = CachedKeyStore(InMemoryKeyStore(), clock, 100_000, 3_600_000)
    for origin, signing_key in keys.items():
        key_id = "ed25519:%s" % signing_key.version
        body = sign_json(
            {
                "server_name": origin,
                "valid_until_ts": NOW_MS + DAY_MS,
                "verify_keys": {key_id: {"key": encode_base64(signing_key.verify_key.encode())}},
                "old_verify_keys": {},
            },
            origin,
            signing_key,
        )
        await store.store_server_keys(parse_server_keys_response(body, origin), "origin", NOW_MS)
    return store


async def bench(reactor: Any, args: argparse.Namespace) -> None:
    """Generate the workload, then time the raw loop and the keyring paths."""
    print(
        "Generating %d events (~1 KB) signed by %d origins ..." % (args.events, args.origins),
        flush=True,
    )
    events, keys = make_workload(args.events, args.origins)
    size = sum(len(encode_canonical_json(e)) for e in events) / len(events)
    verify_keys = {origin: VerifyKey(k.verify_key.encode()) for origin, k in keys.items()}

    class FixedClock:
        def seconds(self) -> float:
            return NOW_MS / 1000

        def callLater(
            self, delay: float, callable: Callable[..., object], *args: object, **kw: object
        ) -> Any:
            return reactor.callLater(delay, callable, *args, **kw)

    clock = FixedClock()
    store = await warm_store(keys, clock)
    keyring = Keyring(
        OwnKeys("bench.example.org", [generate_signing_key("own")]),
        store,
        _NoFetchChain(),
        clock,
    )

    def check_all(results: list["defer.Deferred[None]"]) -> "defer.Deferred[Any]":
        gathered = defer.gatherResults(results, consumeErrors=True)
        return gathered

    # Warm up: fill the store cache, PyNaCl's key objects, and prove every event verifies.
    await check_all(keyring.verify_events(events, ROOM_VERSION))
    raw_loop(events[:100], verify_keys)

    n = len(events)
    print("Events: %d, mean canonical size %.0f bytes, room version %s" % (n, size, ROOM_VERSION))
    print("CPUs available: %d" % (len(os.sched_getaffinity(0)),))
    print(
        "Canonical JSON of plain events: %s"
        % ("orjson" if fast_encoder_available() else "canonicaljson (orjson not installed)")
    )

    def run_raw() -> "defer.Deferred[Any]":
        raw_loop(events, verify_keys)
        return defer.succeed(None)

    def run_raw_fast() -> "defer.Deferred[Any]":
        raw_loop(events, verify_keys, encode_plain)
        return defer.succeed(None)

    held_keys = await store.get_many_server_keys(set(keys))
    version = get_room_version(ROOM_VERSION)

    def run_rules() -> "defer.Deferred[Any]":
        now = int(clock.seconds() * 1000)
        for event in events:
            verify_event_signatures(event, version, held_keys, now)
        return defer.succeed(None)

    def run_sync() -> "defer.Deferred[Any]":
        results = keyring.verify_events(events, ROOM_VERSION)
        assert all(d.called for d in results), "a warm batch should be answered at once"
        return check_all(results)

    pools = []
    runs: list[tuple[str, Callable[[], "defer.Deferred[Any]"]]] = [
        ("raw loop (1 thread)", run_raw),
        ("raw loop, fast encoder (1 thread)", run_raw_fast),
        ("verify_event_signatures (loop)", run_rules),
        ("verify_events (reactor thread)", run_sync),
    ]
    for workers in args.workers:
        pool = ThreadPool(minthreads=workers, maxthreads=workers, name="bench-verify")
        pool.start()
        pools.append(pool)
        chunk = args.chunk or max(50, n // (workers * 4))

        def run_threaded(pool: ThreadPool = pool, chunk: int = chunk) -> "defer.Deferred[Any]":
            return check_all(
                keyring.verify_events_in_threads(
                    events, ROOM_VERSION, pool, reactor, chunk_size=chunk
                )
            )

        def run_raw_threaded(pool: ThreadPool = pool, chunk: int = chunk) -> "defer.Deferred[Any]":
            # The same raw loop split over the pool: the ceiling for any threaded path.
            return defer.gatherResults(
                [
                    threads.deferToThreadPool(
                        reactor, pool, raw_loop, events[i : i + chunk], verify_keys
                    )
                    for i in range(0, n, chunk)
                ]
            )

        runs.append(("raw loop in threads (%d)" % workers, run_raw_threaded))
        runs.append(("verify_events_in_threads (%d)" % workers, run_threaded))

    # Worker processes import functions by module name, and this one may be __main__.
    from bench import verify as in_workers

    raw_keys = {origin: k.verify_key.encode() for origin, k in keys.items()}
    process_pools = []
    for workers in args.processes:
        # The pool an operator builds: its default largest chunk, unless --chunk says.
        ppool = WorkerProcessPool(
            reactor, max_workers=workers, max_chunk_size=args.chunk or DEFAULT_MAX_CHUNK_SIZE
        )
        await ppool.start()
        process_pools.append(ppool)

        def run_processes(
            ppool: WorkerProcessPool = ppool, chunk: Optional[int] = args.chunk or None
        ) -> "defer.Deferred[Any]":
            return check_all(
                keyring.verify_events_in_processes(events, ROOM_VERSION, ppool, chunk_size=chunk)
            )

        def run_raw_processes(ppool: WorkerProcessPool = ppool) -> "defer.Deferred[Any]":
            # The raw loop split over the processes, sent as the keyring sends its
            # chunks: the ceiling for the process path.
            chunk = min(-(-n // (2 * ppool.max_in_flight)), ppool.max_chunk_size)
            return defer.gatherResults(
                [
                    ppool.run(in_workers.raw_chunk, encode_events(events[i : i + chunk]), raw_keys)
                    for i in range(0, n, chunk)
                ]
            )

        runs.append(("raw loop in processes (%d)" % workers, run_raw_processes))
        runs.append(("verify_events_in_processes (%d)" % workers, run_processes))
    if args.processes:
        _print_chunk_sizes(events, held_keys, args.chunk or -(-n // (4 * args.processes[-1])))

    # Interleave the runs, so that load from other processes hits them all alike, and
    # keep the best time of each, once with Python's automatic cyclic GC and once with it
    # paused during the timed batch and run between batches (what Synapse's GC manager
    # does: it disables automatic collection and collects between reactor ticks).
    best = {(name, mode): float("inf") for name, _ in runs for mode in GC_MODES}
    # CPU time of this (the parent) process per run: with worker processes, what the
    # reactor thread spends beside the workers' checks, on cores it shares with them.
    parent_cpu = {(name, mode): float("inf") for name, _ in runs for mode in GC_MODES}
    try:
        for _ in range(args.repeat):
            for name, run in runs:
                for mode in GC_MODES:
                    gc.collect()
                    if mode == "paused":
                        gc.disable()
                    try:
                        start = time.perf_counter()
                        cpu_start = time.process_time()
                        await run()
                        elapsed = time.perf_counter() - start
                        cpu = time.process_time() - cpu_start
                    finally:
                        gc.enable()
                    best[name, mode] = min(best[name, mode], elapsed)
                    parent_cpu[name, mode] = min(parent_cpu[name, mode], cpu)
    finally:
        for pool in pools:
            pool.stop()
        for ppool in process_pools:
            ppool.stop()

    print("%-36s  %-26s  %-26s" % ("", "automatic GC", "GC paused during the batch"))
    for name, _ in runs:
        cells = []
        for mode in GC_MODES:
            rate = n / best[name, mode]
            raw_rate = n / best["raw loop (1 thread)", mode]
            cells.append("%8.0f ev/s = %.2fx raw" % (rate, rate / raw_rate))
        note = ""
        if name.startswith(("verify_events (", "verify_event_signatures")):
            note = "  (target >= 0.85x)"
        elif name == "verify_events_in_threads (2)":
            note = "  (target > 1.5x)"
        elif name == "verify_events_in_processes (2)":
            note = "  (target >= 1.6x)"
        print("%-36s: %-26s  %-26s%s" % (name, cells[0], cells[1], note))
    process_runs = [name for name, _ in runs if "processes" in name]
    if process_runs:
        print("Parent CPU per event (this process's CPU time, least of the runs):")
    for name in process_runs:
        cpu_cells = ["%8.1f us/event" % (parent_cpu[name, mode] / n * 1e6) for mode in GC_MODES]
        print("  %-34s: %-26s  %-26s" % (name, *cpu_cells))


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parse arguments and run the benchmark on the real reactor."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--origins", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=0, help="events per thread job")
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2, 4], help="threads")
    parser.add_argument("--processes", type=int, nargs="*", default=[1, 2], help="worker processes")
    args = parser.parse_args(argv)
    task.react(lambda reactor: defer.ensureDeferred(bench(reactor, args)))


if __name__ == "__main__":
    main(sys.argv[1:])
