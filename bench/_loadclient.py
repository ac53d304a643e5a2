"""A bounded, closed-loop HTTP/1.1 keep-alive load client (stdlib asyncio only).

The fallback of ``bench/notary.py`` when ``wrk`` is not installed; it runs in its own
process so it does not share the server's interpreter. Each of ``--connections``
workers keeps one persistent connection and sends the same POST back to back for
``--duration`` seconds. Every reply is checked: status 200, exactly ``--expect-length``
body bytes (when given) and ``--expect-substring`` present (when given).

Loopback only: any host that is not ``localhost``, 127.0.0.0/8 or ::1 is refused.

Prints one JSON line: ``{"requests", "ok", "bad", "errors", "seconds", "rps",
"p50_ms", "p99_ms"}``::

    .venv/bin/python bench/_loadclient.py --port 8080 --path /_matrix/key/v2/query \\
        --body-file body.json --connections 8 --duration 5 --expect-length 723
"""

import argparse
import asyncio
import ipaddress
import json
import sys
import time
from typing import Optional


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback interface."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Stats:
    def __init__(self) -> None:
        self.ok = 0
        self.bad = 0
        self.errors = 0
        self.latencies: list[float] = []


async def _read_reply(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """One response: (status, body, server closes the connection)."""
    status_line = await reader.readuntil(b"\r\n")
    status = int(status_line.split(b" ", 2)[1])
    length: Optional[int] = None
    close = False
    while True:
        line = await reader.readuntil(b"\r\n")
        if line == b"\r\n":
            break
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True
        elif name == b"transfer-encoding":
            raise ValueError("chunked replies are not expected here")
    if length is None:
        return status, await reader.read(), True
    return status, await reader.readexactly(length), close


async def _worker(
    host: str,
    port: int,
    request: bytes,
    deadline: float,
    expect_length: Optional[int],
    expect_substring: Optional[bytes],
    stats: _Stats,
) -> None:
    writer: Optional[asyncio.StreamWriter] = None
    reader: Optional[asyncio.StreamReader] = None
    clock = time.perf_counter
    while clock() < deadline:
        if writer is None or reader is None:
            reader, writer = await asyncio.open_connection(host, port)
        started = clock()
        writer.write(request)
        try:
            status, body, close = await _read_reply(reader)
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            stats.errors += 1
            writer.close()
            reader = writer = None
            continue
        stats.latencies.append(clock() - started)
        good = (
            status == 200
            and (expect_length is None or len(body) == expect_length)
            and (expect_substring is None or expect_substring in body)
        )
        if good:
            stats.ok += 1
        else:
            stats.bad += 1
        if close:
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


async def run_load(
    host: str,
    port: int,
    path: str,
    body: bytes,
    connections: int,
    duration: float,
    expect_length: Optional[int] = None,
    expect_substring: Optional[bytes] = None,
) -> dict[str, float]:
    """Run the load and return the summary (see the module docstring)."""
    if not is_loopback(host):
        raise ValueError("refusing non-loopback host %r" % (host,))
    request = (
        b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n"
        % (path.encode("ascii"), host.encode("ascii"), port, len(body))
    ) + body
    stats = _Stats()
    started = time.perf_counter()
    deadline = started + duration
    await asyncio.gather(
        *(
            _worker(host, port, request, deadline, expect_length, expect_substring, stats)
            for _ in range(connections)
        )
    )
    seconds = time.perf_counter() - started
    latencies = sorted(stats.latencies)
    total = stats.ok + stats.bad

    def percentile(p: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

    return {
        "requests": total,
        "ok": stats.ok,
        "bad": stats.bad,
        "errors": stats.errors,
        "seconds": seconds,
        "rps": total / seconds if seconds > 0 else 0.0,
        "p50_ms": percentile(0.50),
        "p99_ms": percentile(0.99),
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/_matrix/key/v2/query")
    parser.add_argument("--body-file", required=True)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--expect-length", type=int)
    parser.add_argument("--expect-substring")
    args = parser.parse_args(argv)
    if not is_loopback(args.host):
        print("refusing non-loopback host %r" % (args.host,), file=sys.stderr)
        return 2
    if not 1 <= args.connections <= 256 or not 0 < args.duration <= 120:
        print("connections must be 1..256 and duration 0..120 s", file=sys.stderr)
        return 2
    with open(args.body_file, "rb") as f:
        body = f.read()
    substring = args.expect_substring.encode("utf-8") if args.expect_substring else None
    result = asyncio.run(
        run_load(
            args.host,
            args.port,
            args.path,
            body,
            args.connections,
            args.duration,
            args.expect_length,
            substring,
        )
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
