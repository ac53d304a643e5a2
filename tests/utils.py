"""Test factories: signed key responses and notary configs, built at test time.

No key files live in the tree; every signing key is made with
:func:`signedjson.key.generate_signing_key` while the test runs.
"""

import socket
from typing import Any, Mapping, Optional, Sequence

from signedjson.key import generate_signing_key
from signedjson.sign import sign_json
from signedjson.types import SigningKey
from unpaddedbase64 import encode_base64

from keyring_module.config import TrustedKeyServer


def new_signing_key(version: str = "a_1") -> SigningKey:
    """A fresh ed25519 signing key with key id ``ed25519:<version>``."""
    key: SigningKey = generate_signing_key(version)
    return key


def key_id(signing_key: SigningKey) -> str:
    """The key id of a signing key, e.g. ``ed25519:a_1``."""
    return "%s:%s" % (signing_key.alg, signing_key.version)


def verify_key_bytes(signing_key: SigningKey) -> bytes:
    """The 32 raw bytes of a signing key's public half."""
    raw: bytes = signing_key.verify_key.encode()
    return raw


def verify_key_base64(signing_key: SigningKey) -> str:
    """The unpadded base64 of a signing key's public half, as published."""
    return encode_base64(verify_key_bytes(signing_key))


def sign_as(obj: dict[str, Any], signer: str, signing_key: SigningKey) -> dict[str, Any]:
    """Add ``signer``'s signature with ``signing_key`` to a copy of ``obj``."""
    copy = dict(obj)
    signatures: Any = obj.get("signatures", {})
    copy["signatures"] = {name: dict(sigs) for name, sigs in signatures.items()}
    signed: dict[str, Any] = sign_json(copy, signer, signing_key)
    return signed


def make_signed_server_keys(
    server_name: str,
    signing_keys: Sequence[SigningKey],
    valid_until_ts: int,
    old_keys: Optional[Mapping[str, tuple[bytes, int]]] = None,
    extra: Optional[Mapping[str, object]] = None,
) -> dict[str, Any]:
    """A ``/_matrix/key/v2/server`` object signed by every one of ``signing_keys``.

    Args:
        server_name: the origin.
        signing_keys: its current keys, each published and each signing.
        valid_until_ts: the response's ``valid_until_ts``.
        old_keys: ``old_verify_keys`` as ``{key_id: (key bytes, expired_ts)}``.
        extra: more top-level fields (e.g. unknown ones), covered by the signatures.
    """
    obj: dict[str, Any] = {
        "server_name": server_name,
        "valid_until_ts": valid_until_ts,
        "verify_keys": {key_id(k): {"key": verify_key_base64(k)} for k in signing_keys},
        "old_verify_keys": {
            kid: {"key": encode_base64(raw), "expired_ts": expired_ts}
            for kid, (raw, expired_ts) in (old_keys or {}).items()
        },
    }
    obj.update(extra or {})
    for signing_key in signing_keys:
        obj = sign_as(obj, server_name, signing_key)
    return obj


def make_trusted_key_server(server_name: str, *signing_keys: SigningKey) -> TrustedKeyServer:
    """A ``trusted_key_servers`` entry trusting the given keys of a notary."""
    return TrustedKeyServer(
        server_name=server_name,
        verify_keys={key_id(k): verify_key_bytes(k) for k in signing_keys},
    )


def closed_loopback_port() -> int:
    """A loopback TCP port with nothing listening on it (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port
