"""Benchmark: looking up one server's keys with 1k, 10k and 100k servers stored.

Run from the repository root::

    python -m bench.store                       # SQLite only
    python -m bench.store --postgres-dsn "host=127.0.0.1 port=5433 dbname=keyring_test user=postgres"

(``KEYRING_TEST_POSTGRES_DSN`` works too; ``.ci/start_postgres.sh`` prints one.)

For each backend and size it prints the time of ``get_server_keys`` straight on the
backend (one pooled-thread round trip plus an indexed query) and through
``CachedKeyStore`` with the entry cached, then the ratio lookup(largest)/lookup(smallest)
(target: at most 1.5, i.e. lookups do not grow with the number of servers), and the
memory the cache uses per cached key (tracemalloc).

Servers are bulk-loaded with ``executemany``/``execute_values`` in big transactions on a
separate connection, each with one current and one old key, like real origins.
"""

import argparse
import gc
import hashlib
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import tracemalloc
import uuid
from typing import Any, Callable, Optional, Sequence

from canonicaljson import encode_canonical_json
from twisted.internet import task
from twisted.internet.defer import ensureDeferred
from unpaddedbase64 import encode_base64

from keyring_module.storage.cache import CachedKeyStore
from keyring_module.storage.rows import keys_from_rows
from keyring_module.storage.sql import SELECT_SERVER_KEYS, SqlKeyStore
from keyring_module.storage.sqlite import SqliteKeyStore

SIZES = (1_000, 10_000, 100_000)
NOW_MS = 1_700_000_000_000

Rows = tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]


def server_name(i: int) -> str:
    """The name of the i-th generated server."""
    return "server%06d.example.org" % i


def make_rows(start: int, stop: int) -> Rows:
    """Response rows and key rows for servers ``start..stop-1``."""
    rng = random.Random(start)
    responses: list[tuple[Any, ...]] = []
    keys: list[tuple[Any, ...]] = []
    for i in range(start, stop):
        name = server_name(i)
        key, old_key = rng.randbytes(32), rng.randbytes(32)
        valid_until_ts = NOW_MS + 86_400_000 + i
        body = {
            "server_name": name,
            "valid_until_ts": valid_until_ts,
            "verify_keys": {"ed25519:a1": {"key": encode_base64(key)}},
            "old_verify_keys": {
                "ed25519:old": {"key": encode_base64(old_key), "expired_ts": NOW_MS - 1}
            },
            "signatures": {name: {"ed25519:a1": encode_base64(rng.randbytes(64))}},
        }
        json_bytes = encode_canonical_json(body)
        rid = hashlib.sha256(json_bytes).hexdigest()
        responses.append((rid, name, valid_until_ts, NOW_MS, "origin", json_bytes))
        keys.append((name, "ed25519:a1", key, valid_until_ts, None, NOW_MS, "origin", rid))
        keys.append(
            (name, "ed25519:old", old_key, valid_until_ts, NOW_MS - 1, NOW_MS, "origin", rid)
        )
    return responses, keys


INSERT_RESPONSES = (
    "INSERT INTO server_key_responses"
    " (response_id, server_name, valid_until_ts, fetched_ts, source, json) VALUES "
)
INSERT_KEYS = (
    "INSERT INTO server_keys (server_name, key_id, verify_key, valid_until_ts, expired_ts,"
    " fetched_ts, source, response_id) VALUES "
)


def load_sqlite(path: str, rows: Rows) -> None:
    """Bulk-load rows into the SQLite file in one transaction."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(INSERT_RESPONSES + "(?, ?, ?, ?, ?, ?)", rows[0])
        conn.executemany(INSERT_KEYS + "(?, ?, ?, ?, ?, ?, ?, ?)", rows[1])
        conn.execute("COMMIT")
        conn.execute("ANALYZE")
    finally:
        conn.close()


def load_postgres(dsn: str, rows: Rows) -> None:
    """Bulk-load rows into PostgreSQL in one transaction."""
    import psycopg2
    from psycopg2.extras import execute_values

    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cursor:
            execute_values(cursor, INSERT_RESPONSES + "%s", rows[0], page_size=5000)
            execute_values(cursor, INSERT_KEYS + "%s", rows[1], page_size=5000)
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute("ANALYZE")
    finally:
        conn.close()


async def time_lookups(
    get: Callable[[str], Any], names: Sequence[str], rounds: int = 3, expect_keys: int = 2
) -> float:
    """Microseconds per ``await get(name)``: the best of ``rounds`` medians over ``names``.

    The best round is reported because the figure includes a hop to a pool thread and
    back, which background load on the machine easily disturbs.
    """
    medians = []
    for _ in range(rounds):
        samples = []
        for name in names:
            start = time.perf_counter()
            keys = await get(name)
            samples.append(time.perf_counter() - start)
            if len(keys) != expect_keys:
                raise AssertionError("%s: expected %d keys, got %r" % (name, expect_keys, keys))
        medians.append(statistics.median(samples))
    return min(medians) * 1e6


def query_lookup(connect: Callable[[], Any], placeholder: str) -> Callable[[str], Any]:
    """An async ``get(name)`` running the store's query and row parsing inline.

    No pool thread is involved, so this shows the database's own lookup cost.
    """
    conn = connect()
    statement = SELECT_SERVER_KEYS.replace("?", placeholder)

    async def get(name: str) -> dict[str, Any]:
        cursor = conn.cursor()
        cursor.execute(statement, (name,))
        rows = cursor.fetchall()
        cursor.close()
        return keys_from_rows(rows).get(name, {})

    return get


Result = tuple[str, int, float, float, float]


async def bench_backend(
    label: str,
    store: SqlKeyStore,
    load: Callable[[Rows], None],
    connect: Callable[[], Any],
    lookups: int,
) -> list[Result]:
    """Figures for one backend at each size: (label, size, direct, query, cached µs)."""
    await store.migrate()
    results = []
    loaded = 0
    for size in SIZES:
        started = time.perf_counter()
        load(make_rows(loaded, size))
        loaded = size
        print(
            "  %s: loaded %d servers in %.1f s" % (label, size, time.perf_counter() - started),
            file=sys.stderr,
        )
        rng = random.Random(size)
        names = [server_name(rng.randrange(size)) for _ in range(lookups)]
        await time_lookups(store.get_server_keys, names[: lookups // 4])  # warm up
        direct = await time_lookups(store.get_server_keys, names)
        query = await time_lookups(query_lookup(connect, store.dialect.placeholder), names)
        cache = CachedKeyStore(store, task.Clock(), max_entries=len(names), ttl_ms=3_600_000)
        await time_lookups(cache.get_server_keys, names)  # fill
        cached = await time_lookups(cache.get_server_keys, names)
        results.append((label, size, direct, query, cached))
    return results


async def cache_memory_per_key(store: SqlKeyStore, servers: int) -> float:
    """Bytes of Python memory the cache holds per cached key (2 keys per server)."""
    names = [server_name(i) for i in range(servers)]
    cache = CachedKeyStore(store, task.Clock(), max_entries=servers, ttl_ms=3_600_000)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for name in names:
        await cache.get_server_keys(name)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    if len(cache) != servers:
        raise AssertionError("cache holds %d servers, expected %d" % (len(cache), servers))
    return (after - before) / (2 * servers)


def print_table(results: list[Result]) -> None:
    """The figures, then the growth ratios per backend."""
    print("median microseconds per get_server_keys (best of 3 rounds)")
    header = ("backend", "servers", "direct (backend)", "SQL only", "cached hit")
    print("%-10s %8s %18s %16s %12s" % header)
    for label, size, direct, query, cached in results:
        print("%-10s %8d %18.1f %16.1f %12.2f" % (label, size, direct, query, cached))
    for label in dict.fromkeys(r[0] for r in results):
        rows = [r for r in results if r[0] == label]
        ratios = (("direct", rows[-1][2] / rows[0][2]), ("SQL only", rows[-1][3] / rows[0][3]))
        for what, ratio in ratios:
            verdict = "OK" if ratio <= 1.5 else "ABOVE TARGET"
            print(
                "%s %s: lookup(%d)/lookup(%d) = %.2f (target <= 1.5: %s)"
                % (label, what, rows[-1][1], rows[0][1], ratio, verdict)
            )


async def main(reactor: Any, argv: Optional[Sequence[str]] = None) -> None:
    """Run the benchmark (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--postgres-dsn", default=os.environ.get("KEYRING_TEST_POSTGRES_DSN"), help="libpq DSN"
    )
    parser.add_argument("--lookups", type=int, default=2000, help="lookups per size")
    args = parser.parse_args(argv)

    results = []
    tmpdir = tempfile.mkdtemp(prefix="keyring-bench-")
    try:
        path = os.path.join(tmpdir, "bench.db")
        sqlite_store = SqliteKeyStore(path, reactor=reactor)
        try:
            results += await bench_backend(
                "sqlite",
                sqlite_store,
                lambda rows: load_sqlite(path, rows),
                lambda: sqlite3.connect(path),
                args.lookups,
            )
            per_key = await cache_memory_per_key(sqlite_store, 10_000)
        finally:
            await sqlite_store.close()
    finally:
        shutil.rmtree(tmpdir)

    if args.postgres_dsn:
        results += await bench_postgres(reactor, args.postgres_dsn, args.lookups)
    else:
        print("  (PostgreSQL skipped: give --postgres-dsn or KEYRING_TEST_POSTGRES_DSN)")

    print_table(results)
    print("cache memory: %.0f bytes per cached key (10,000 servers, 2 keys each)" % per_key)


async def bench_postgres(reactor: Any, base_dsn: str, lookups: int) -> list[Any]:
    """Run the lookups on PostgreSQL, in a throw-away schema."""
    import psycopg2
    from psycopg2.extensions import make_dsn

    from keyring_module.storage.postgres import PostgresKeyStore

    schema = "keyring_bench_%s" % uuid.uuid4().hex[:12]
    admin = psycopg2.connect(base_dsn)
    admin.autocommit = True
    admin.cursor().execute("CREATE SCHEMA %s" % schema)
    dsn = make_dsn(base_dsn, options="-c search_path=%s" % schema)
    store = PostgresKeyStore(dsn, pool_size=5, reactor=reactor)
    try:
        return await bench_backend(
            "postgres",
            store,
            lambda rows: load_postgres(dsn, rows),
            lambda: psycopg2.connect(dsn),
            lookups,
        )
    finally:
        await store.close()
        admin.cursor().execute("DROP SCHEMA %s CASCADE" % schema)
        admin.close()


if __name__ == "__main__":
    task.react(lambda reactor: ensureDeferred(main(reactor)))
