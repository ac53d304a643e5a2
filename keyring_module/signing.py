"""Our own signing keys and the signed ``/_matrix/key/v2/server`` response.

Key files use signedjson's format, one key per line: ``ed25519 a_AbCd <base64 seed>``.
A missing file is created with one fresh key (mode 0600). Retired keys are configured
as ``old_signing_keys: {"ed25519:old": {key: <base64 public key>, expired_ts: <ms>}}``.

The published response looks like::

    {"old_verify_keys": {"ed25519:old": {"expired_ts": 1700000000000, "key": "..."}},
     "server_name": "notary.example.org",
     "signatures": {"notary.example.org": {"ed25519:a_AbCd": "..."}},
     "valid_until_ts": 1700086400000,
     "verify_keys": {"ed25519:a_AbCd": {"key": "..."}}}

It is signed by every current key and kept as canonical bytes, so serving it costs no
signing and no encoding; it is re-signed every half ``key_refresh_interval``
(:class:`ServerKeyPublisher`).
"""

import logging
import os
import secrets
from typing import Any, Iterable, Mapping

from canonicaljson import encode_canonical_json
from signedjson.key import (
    decode_verify_key_bytes,
    encode_verify_key_base64,
    generate_signing_key,
    get_verify_key,
    read_signing_keys,
    write_signing_keys,
)
from signedjson.sign import sign_json
from signedjson.types import SigningKey, VerifyKey
from unpaddedbase64 import encode_base64

from keyring_module.clock import ReactorClock, now_ms
from keyring_module.config import HOUR_MS, OldSigningKey
from keyring_module.errors import ConfigError
from keyring_module.file_checks import dangling_symlink_problem
from keyring_module.json_codec import encode_canonical, json_values_upper_bound, loads_strict

logger = logging.getLogger(__name__)

JsonDict = dict[str, Any]


def key_id_of(key: "SigningKey | VerifyKey") -> str:
    """``"ed25519:a_AbCd"`` for a signedjson key."""
    return "%s:%s" % (key.alg, key.version)


def new_key_version() -> str:
    """A fresh key version such as ``a_Xy3Q`` (the style Synapse uses)."""
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return "a_" + "".join(secrets.choice(alphabet) for _ in range(4))


def write_new_signing_key(path: str) -> SigningKey:
    """Create ``path`` (mode 0600, never overwriting) holding one new ed25519 key.

    Raises:
        FileExistsError: when ``path`` already exists.
    """
    key = generate_signing_key(new_key_version())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        write_signing_keys(f, [key])
    return key


def load_signing_keys(path: str) -> list[SigningKey]:
    """Read the signing keys in ``path`` (signedjson format, one per line).

    Raises:
        ConfigError: the file is missing, unreadable or holds no usable key.
    """
    try:
        with open(path, encoding="ascii") as f:
            keys = list(read_signing_keys(f))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ConfigError(
            "cannot read signing key file %s: %s (expected lines like "
            '"ed25519 a_AbCd <base64 seed>")' % (path, e),
            ("signing_key_path",),
        ) from None
    if not keys:
        raise ConfigError("signing key file %s holds no key" % (path,), ("signing_key_path",))
    ids = [key_id_of(k) for k in keys]
    if len(set(ids)) != len(ids):
        raise ConfigError("signing key file %s repeats a key id" % (path,), ("signing_key_path",))
    return keys


def load_or_create_signing_keys(path: str) -> list[SigningKey]:
    """Like :func:`load_signing_keys`, but create the file with a new key if missing.

    Raises:
        ConfigError: (naming ``signing_key_path``) the file cannot be read or created,
            or ``path`` is a symbolic link to nothing (never followed to create a file).
    """
    where = ("signing_key_path",)
    if os.path.islink(path) and not os.path.exists(path):
        raise ConfigError(dangling_symlink_problem(path), where)
    if not os.path.exists(path):
        try:
            key = write_new_signing_key(path)
        except OSError as e:
            raise ConfigError(
                "cannot create signing key file %s: %s" % (path, e.strerror), where
            ) from None
        logger.info("Generated a new signing key %s in %s", key_id_of(key), path)
        return [key]
    return load_signing_keys(path)


class OwnKeys:
    """This server's keys: the current signing keys and the retired ones.

    Args:
        server_name: our Matrix server name.
        signing_keys: current keys; all are published and all sign ``/server``.
        old_keys: retired keys, published in ``old_verify_keys``.
    """

    def __init__(
        self,
        server_name: str,
        signing_keys: Iterable[SigningKey],
        old_keys: Iterable[OldSigningKey] = (),
    ) -> None:
        self.server_name = server_name
        self.signing_keys = list(signing_keys)
        if not self.signing_keys:
            raise ValueError("at least one signing key is needed")
        self.old_keys: Mapping[str, OldSigningKey] = {k.key_id: k for k in old_keys}
        clash = set(self.old_keys) & {key_id_of(k) for k in self.signing_keys}
        if clash:
            raise ConfigError(
                "%s is both a current signing key and an old signing key" % sorted(clash)[0],
                ("old_signing_keys",),
            )

    @property
    def primary_key(self) -> SigningKey:
        """The key used when one signature is enough (notary co-signing)."""
        return self.signing_keys[0]

    def verify_keys(self) -> dict[str, bytes]:
        """Current key id -> raw public key bytes."""
        return {key_id_of(k): k.verify_key.encode() for k in self.signing_keys}

    def old_verify_keys(self) -> dict[str, OldSigningKey]:
        """Retired key id -> its public key bytes and ``expired_ts``."""
        return dict(self.old_keys)

    def cosign_canonical(self, json_bytes: bytes) -> bytes:
        """``json_bytes`` (a JSON object) with one signature of ours added, as canonical
        JSON: what signedjson's ``sign_json`` with our primary key and then
        ``encode_canonical_json`` give, through the codec that never holds the GIL long
        (:mod:`keyring_module.json_codec`), so that a big stored answer can be co-signed
        in a worker thread.

        Raises:
            ValueError: ``json_bytes`` is not a JSON object with an object of
                ``signatures`` (or none).
        """
        obj = loads_strict(json_bytes, in_worker_thread=True)
        if not isinstance(obj, dict) or not isinstance(obj.get("signatures", {}), dict):
            raise ValueError("not a signable JSON object")
        value_count = json_values_upper_bound(json_bytes)
        signatures = obj.pop("signatures", {})
        unsigned = obj.pop("unsigned", None)
        signed = self.primary_key.sign(encode_canonical(obj, value_count))
        signatures.setdefault(self.server_name, {})[key_id_of(self.primary_key)] = encode_base64(
            signed.signature
        )
        obj["signatures"] = signatures
        if unsigned is not None:
            obj["unsigned"] = unsigned
        return encode_canonical(obj, value_count)

    def build_server_keys(self, valid_until_ts: int) -> JsonDict:
        """The ``/server`` object, signed by every current key."""
        obj: JsonDict = {
            "server_name": self.server_name,
            "valid_until_ts": valid_until_ts,
            "verify_keys": {
                key_id_of(k): {"key": encode_verify_key_base64(get_verify_key(k))}
                for k in self.signing_keys
            },
            "old_verify_keys": {
                key_id: {
                    "key": encode_verify_key_base64(
                        decode_verify_key_bytes(key_id, old.verify_key_bytes)
                    ),
                    "expired_ts": old.expired_ts,
                }
                for key_id, old in self.old_keys.items()
            },
        }
        for key in self.signing_keys:
            obj = sign_json(obj, self.server_name, key)
        return obj


class ServerKeyPublisher:
    """Keeps our signed ``/server`` response ready as canonical bytes.

    The response is signed on a schedule: once, then again every half
    ``key_refresh_interval`` (:func:`publishing_schedule`), and the same bytes are served
    in between, whatever the interval. ``valid_until_ts`` is ``signed + interval``,
    stretched when needed so that every served response is valid for at least another
    hour (the spec's SHOULD): with the smallest interval, ``1h``, the response is
    re-signed every 30 minutes and valid for 90.

    Example::

        publisher = ServerKeyPublisher(own_keys, reactor, 24 * 3600 * 1000)
        body = publisher.response_bytes()   # b'{"old_verify_keys":{},...}'
    """

    def __init__(
        self, own_keys: OwnKeys, clock: ReactorClock, key_refresh_interval_ms: int
    ) -> None:
        self.own_keys = own_keys
        self._clock = clock
        self._resign_every_ms, self._valid_for_ms = publishing_schedule(key_refresh_interval_ms)
        self._bytes = b""
        self._refresh_at_ms = -1

    def response_bytes(self) -> bytes:
        """The canonical JSON body of ``GET /_matrix/key/v2/server``."""
        now = now_ms(self._clock)
        if now >= self._refresh_at_ms:
            self._rebuild(now)
        return self._bytes

    @property
    def refresh_at_ms(self) -> int:
        """When the current response will be re-signed (ms since the epoch)."""
        self.response_bytes()
        return self._refresh_at_ms

    def _rebuild(self, now: int) -> None:
        valid_until_ts = now + self._valid_for_ms
        self._bytes = encode_canonical_json(self.own_keys.build_server_keys(valid_until_ts))
        self._refresh_at_ms = now + self._resign_every_ms
        logger.debug(
            "Signed our /server response, valid until %d, re-signed from %d",
            valid_until_ts,
            self._refresh_at_ms,
        )


def publishing_schedule(key_refresh_interval_ms: int) -> tuple[int, int]:
    """How often our ``/server`` response is re-signed, and for how long each is valid.

    Re-signed every half interval (as Synapse does: once less than half of the
    validity remains); each response valid for the interval, or longer when that is
    needed to stay valid for at least an hour until the next signing. Intervals under
    an hour count as an hour (the config refuses them).

    Returns:
        ``(resign_every_ms, valid_for_ms)``, with ``valid_for_ms - resign_every_ms``
        at least one hour.

    Example:
        >>> publishing_schedule(24 * HOUR_MS) == (12 * HOUR_MS, 24 * HOUR_MS)
        True
        >>> publishing_schedule(HOUR_MS) == (HOUR_MS // 2, 3 * HOUR_MS // 2)
        True
    """
    interval_ms = max(key_refresh_interval_ms, HOUR_MS)
    resign_every_ms = interval_ms // 2
    return resign_every_ms, max(interval_ms, resign_every_ms + HOUR_MS)
