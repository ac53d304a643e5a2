"""Turning stored rows into model objects, skipping the ones that are corrupt.

Both the SQL backends and :class:`~keyring_module.storage.memory.InMemoryKeyStore` keep
rows as plain tuples in the column order below and convert them here, so a damaged row
(wrong-length key, text where bytes belong, undecodable JSON, ...) is logged and skipped
the same way everywhere, never crashing a query.
"""

import hashlib
import json
import logging
from typing import Any, Collection, Mapping, Optional, Sequence, TypeVar

from keyring_module.model import KeyConflict, ServerKeysResponse, StoredKey, StoredResponse

logger = logging.getLogger(__name__)

T = TypeVar("T")

VERIFY_KEY_LENGTH = 32

#: Column order of a ``server_keys`` row.
KEY_COLUMNS = (
    "server_name",
    "key_id",
    "verify_key",
    "valid_until_ts",
    "expired_ts",
    "fetched_ts",
    "source",
    "response_id",
)
#: Column order of a ``server_key_responses`` row.
RESPONSE_COLUMNS = (
    "response_id",
    "server_name",
    "valid_until_ts",
    "fetched_ts",
    "source",
    "json",
)
#: Column order of a ``key_conflicts`` row.
CONFLICT_COLUMNS = (
    "server_name",
    "key_id",
    "kept_key",
    "kept_source",
    "rejected_key",
    "rejected_source",
    "seen_ts",
)


def to_bytes(value: object) -> bytes:
    """Bytes from a binary column (``bytes`` from sqlite3, ``memoryview`` from psycopg2).

    Raises:
        TypeError: the column holds something else (e.g. text written by hand).
    """
    if isinstance(value, bytes):
        return value
    if isinstance(value, (memoryview, bytearray)):
        return bytes(value)
    raise TypeError("expected binary data, got %s" % type(value).__name__)


def _int(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise TypeError("expected an integer, got %r" % (value,))


def _str(value: object) -> str:
    if isinstance(value, str):
        return value
    raise TypeError("expected text, got %r" % (value,))


def verify_key_from_column(value: object) -> bytes:
    """A 32-byte verify key from a binary column.

    Raises:
        TypeError, ValueError: the column is not binary or has the wrong length.
    """
    raw = to_bytes(value)
    if len(raw) != VERIFY_KEY_LENGTH:
        raise ValueError("verify key is %d bytes, expected %d" % (len(raw), VERIFY_KEY_LENGTH))
    return raw


def key_from_row(row: Sequence[Any]) -> Optional[StoredKey]:
    """A :class:`StoredKey` from a ``server_keys`` row, or None (logged) if it is corrupt."""
    try:
        server_name, key_id, verify_key, valid_until_ts, expired_ts, fetched_ts, source, rid = row
        return StoredKey(
            server_name=_str(server_name),
            key_id=_str(key_id),
            verify_key_bytes=verify_key_from_column(verify_key),
            valid_until_ts=_int(valid_until_ts),
            expired_ts=None if expired_ts is None else _int(expired_ts),
            fetched_ts=_int(fetched_ts),
            source=_str(source),
            response_id=_str(rid),
        )
    except (TypeError, ValueError) as e:
        logger.warning("Skipping corrupt stored key %r: %s", tuple(row[:2]), e)
        return None


def response_from_row(row: Sequence[Any]) -> Optional[StoredResponse]:
    """A :class:`StoredResponse` from a ``server_key_responses`` row, or None if corrupt.

    The JSON must decode to an object and hash to the row's ``response_id``, so what the
    notary re-serves is exactly what was stored.
    """
    try:
        response_id, server_name, valid_until_ts, fetched_ts, source, json_value = row
        json_bytes = to_bytes(json_value)
        if hashlib.sha256(json_bytes).hexdigest() != response_id:
            raise ValueError("json does not match its response_id")
        if not isinstance(json.loads(json_bytes), dict):
            raise ValueError("json is not an object")
        return StoredResponse(
            response_id=_str(response_id),
            server_name=_str(server_name),
            valid_until_ts=_int(valid_until_ts),
            fetched_ts=_int(fetched_ts),
            source=_str(source),
            json_bytes=json_bytes,
        )
    except (TypeError, ValueError) as e:  # json.JSONDecodeError and UnicodeError too
        logger.warning("Skipping corrupt stored response %r: %s", row[0] if row else None, e)
        return None


def conflict_from_row(row: Sequence[Any]) -> Optional[KeyConflict]:
    """A :class:`KeyConflict` from a ``key_conflicts`` row, or None if corrupt."""
    try:
        server_name, key_id, kept_key, kept_source, rejected_key, rejected_source, seen_ts = row
        return KeyConflict(
            server_name=_str(server_name),
            key_id=_str(key_id),
            kept_key_bytes=to_bytes(kept_key),
            kept_source=_str(kept_source),
            rejected_key_bytes=to_bytes(rejected_key),
            rejected_source=_str(rejected_source),
            seen_ts=_int(seen_ts),
        )
    except (TypeError, ValueError) as e:
        logger.warning("Skipping corrupt key conflict %r: %s", tuple(row[:2]), e)
        return None


def keys_from_rows(rows: Sequence[Sequence[Any]]) -> dict[str, dict[str, StoredKey]]:
    """Group ``server_keys`` rows per server and key id, skipping corrupt ones."""
    result: dict[str, dict[str, StoredKey]] = {}
    for row in rows:
        key = key_from_row(row)
        if key is not None:
            result.setdefault(key.server_name, {})[key.key_id] = key
    return result


def key_entries(response: ServerKeysResponse) -> dict[str, tuple[bytes, Optional[int]]]:
    """The keys of a response as ``{key_id: (key_bytes, expired_ts)}``.

    ``expired_ts`` is None for ``verify_keys``; a current key wins over an
    ``old_verify_keys`` entry with the same id.
    """
    entries: dict[str, tuple[bytes, Optional[int]]] = {
        key_id: (old.verify_key_bytes, old.expired_ts)
        for key_id, old in response.old_verify_keys.items()
    }
    for key_id, key_bytes in response.verify_keys.items():
        entries[key_id] = (key_bytes, None)
    return entries


def is_not_older(
    stored_valid_until_ts: int, stored_fetched_ts: int, valid_until_ts: int, fetched_ts: int
) -> bool:
    """Whether a key row may be re-pointed at a response with the given timestamps.

    Yes when the new ``valid_until_ts`` is not older than the stored one; on a tie, when
    it was not fetched earlier (so replaying an old fetch never moves ``fetched_ts`` back).
    """
    if valid_until_ts != stored_valid_until_ts:
        return valid_until_ts > stored_valid_until_ts
    return fetched_ts >= stored_fetched_ts


def store_conflict(
    server_name: str,
    key_id: str,
    stored: tuple[bytes, str],
    new: tuple[bytes, str],
    seen_ts: int,
    replace: bool,
) -> KeyConflict:
    """The conflict of storing ``new`` key bytes over differing ``stored`` ones.

    Args:
        server_name: the server of the key.
        key_id: the key id.
        stored: ``(key bytes, source)`` of the stored key row.
        new: ``(key bytes, source)`` of the key in the response being stored.
        seen_ts: when the conflict was seen (the response's ``fetched_ts``).
        replace: whether the new key overrides the stored one
            (``store_server_keys(replace=...)``); then the new key is the kept side.
    """
    kept, rejected = (new, stored) if replace else (stored, new)
    return KeyConflict(
        server_name=server_name,
        key_id=key_id,
        kept_key_bytes=kept[0],
        kept_source=kept[1],
        rejected_key_bytes=rejected[0],
        rejected_source=rejected[1],
        seen_ts=seen_ts,
    )


def select_keys(keys: Mapping[str, T], key_ids: Optional[Collection[str]]) -> dict[str, T]:
    """All of ``keys`` (``key_ids=None``) or those of the given ids that are present."""
    if key_ids is None:
        return dict(keys)
    return {key_id: keys[key_id] for key_id in key_ids if key_id in keys}
