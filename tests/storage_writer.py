"""Storage test helpers, and a writer process for the crash-safety test.

``python -m tests.storage_writer DB_PATH`` stores one response (one new key) per loop
iteration in the SQLite file and prints ``server_name key_id key_hex`` after each write
has returned, i.e. committed. The test kills it with SIGKILL and checks that every
printed key is in the database.
"""

import os
import sys
from typing import Any, Mapping, Optional

from canonicaljson import encode_canonical_json
from twisted.internet import task
from twisted.internet.interfaces import IReactorCore
from unpaddedbase64 import encode_base64

from keyring_module.model import OldVerifyKey, ServerKeysResponse


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


async def _write_forever(reactor: IReactorCore, path: str) -> None:
    from keyring_module.storage.sqlite import SqliteKeyStore

    store = SqliteKeyStore(path, reactor=reactor)
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
