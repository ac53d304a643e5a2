"""Storage test helpers (responses, the real reactor, PostgreSQL test schemas), and a
writer process for the crash-safety test.

``python -m tests.storage_writer DB_PATH`` stores one response (one new key) per loop
iteration in the SQLite file and prints ``server_name key_id key_hex`` after each write
has returned, i.e. committed. The test kills it with SIGKILL and checks that every
printed key is in the database.
"""

import os
import sys
import uuid
from typing import Any, Mapping, Optional, Sequence

from canonicaljson import encode_canonical_json
from twisted.internet import task
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from unpaddedbase64 import encode_base64

from keyring_module.clock import ThreadedReactor
from keyring_module.model import OldVerifyKey, ServerKeysResponse

POSTGRES_DSN_ENV = "KEYRING_TEST_POSTGRES_DSN"
POSTGRES_HINT = "set %s=... (see .ci/start_postgres.sh) to run" % POSTGRES_DSN_ENV
POSTGRES_DRIVER_HINT = "psycopg2 is not installed: pip install -e '.[dev,postgres]' to run"


def make_response(
    server_name: str,
    valid_until_ts: int,
    verify_keys: Mapping[str, bytes],
    old_verify_keys: Optional[Mapping[str, tuple[bytes, int]]] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> ServerKeysResponse:
    """A ``ServerKeysResponse`` whose ``json_bytes`` is the matching canonical JSON.

    Args:
        server_name: the origin.
        valid_until_ts: the response's ``valid_until_ts``.
        verify_keys: key id -> 32 key bytes.
        old_verify_keys: key id -> (32 key bytes, expired_ts).
        extra: more top-level fields (unknown fields are kept by the store).
    """
    old = dict(old_verify_keys or {})
    body: dict[str, Any] = {
        "server_name": server_name,
        "valid_until_ts": valid_until_ts,
        "verify_keys": {k: {"key": encode_base64(v)} for k, v in verify_keys.items()},
        "old_verify_keys": {
            k: {"key": encode_base64(v), "expired_ts": ts} for k, (v, ts) in old.items()
        },
        "signatures": {server_name: {}},
    }
    body.update(extra or {})
    return ServerKeysResponse(
        server_name=server_name,
        valid_until_ts=valid_until_ts,
        verify_keys=dict(verify_keys),
        old_verify_keys={k: OldVerifyKey(v, ts) for k, (v, ts) in old.items()},
        json_bytes=encode_canonical_json(body),
    )


def postgres_driver_missing() -> Optional[str]:
    """Why the PostgreSQL driver cannot be used, or None when ``psycopg2`` imports.

    >>> postgres_driver_missing() in (None, POSTGRES_DRIVER_HINT)
    True
    """
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return POSTGRES_DRIVER_HINT
    return None


def postgres_driver_or_skip(test: SynchronousTestCase) -> None:
    """Skips the test when ``psycopg2`` is missing; fails it under ``CI=true``."""
    missing = postgres_driver_missing()
    if missing is not None:
        if os.environ.get("CI") == "true":
            test.fail("CI=true but the PostgreSQL tests cannot run: %s" % missing)
        raise SkipTest(missing)


def postgres_dsn_or_skip(test: SynchronousTestCase) -> str:
    """The test PostgreSQL DSN; skips the test without one or without the driver
    (saying what is missing), fails it under ``CI=true``."""
    dsn = os.environ.get(POSTGRES_DSN_ENV)
    problems = [] if dsn else ["%s is not set: %s" % (POSTGRES_DSN_ENV, POSTGRES_HINT)]
    missing = postgres_driver_missing()
    if missing is not None:
        problems.append(missing)
    if problems:
        if os.environ.get("CI") == "true":
            test.fail("CI=true but the PostgreSQL tests cannot run: %s" % "; ".join(problems))
        raise SkipTest("; ".join(problems))
    assert dsn is not None
    return dsn


def postgres_execute(dsn: str, statement: str, args: Sequence[Any] = ()) -> list[Any]:
    """Run one ``?``-placeholder statement on a new connection (autocommit)."""
    import psycopg2

    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(statement.replace("?", "%s"), tuple(args))
            return [tuple(row) for row in cursor.fetchall()] if cursor.description else []
    finally:
        conn.close()


def postgres_test_schema(test: SynchronousTestCase) -> tuple[str, str]:
    """A fresh PostgreSQL schema for one test, dropped when it ends (skips without a DSN).

    Returns:
        A DSN whose ``search_path`` (and ``application_name``) is the schema, and the
        schema's name.
    """
    base_dsn = postgres_dsn_or_skip(test)
    from psycopg2.extensions import make_dsn

    name = "keyring_test_%s" % uuid.uuid4().hex[:12]
    dsn = make_dsn(base_dsn, options="-c search_path=%s" % name, application_name=name)
    postgres_execute(dsn, "CREATE SCHEMA %s" % name)
    test.addCleanup(postgres_execute, dsn, "DROP SCHEMA %s CASCADE" % name)
    return dsn, name


async def _write_forever(reactor: ThreadedReactor, path: str) -> None:
    from keyring_module.storage.sqlite import SqliteKeyStore

    store = SqliteKeyStore(path, reactor)
    await store.migrate()
    i = 0
    while True:
        server_name = "server%d.example.org" % i
        key_bytes = os.urandom(32)
        response = make_response(server_name, 10_000 + i, {"ed25519:k%d" % i: key_bytes})
        await store.store_server_keys(response, "origin", 1000 + i)
        sys.stdout.write("%s ed25519:k%d %s\n" % (server_name, i, key_bytes.hex()))
        sys.stdout.flush()
        i += 1


def main() -> None:
    """Entry point: ``python -m tests.storage_writer DB_PATH``."""
    task.react(lambda reactor: _defer(_write_forever(reactor, sys.argv[1])))


def _defer(coro: Any) -> Any:
    from twisted.internet.defer import ensureDeferred

    return ensureDeferred(coro)


if __name__ == "__main__":
    main()
