"""Turning stored rows into model objects, skipping the ones that are corrupt.

Both the SQL backends and :class:`~keyring_module.storage.memory.InMemoryKeyStore` keep
rows as plain tuples in the column order below and convert them here, so a damaged row
(wrong-length key, text where bytes belong, undecodable JSON, ...) is logged and skipped
the same way everywhere, never crashing a query.
"""

import hashlib
import logging
from typing import Any, Collection, Mapping, Optional, Sequence, TypeVar

from keyring_module.model import KeyConflict, StoredKey, StoredResponse
from keyring_module.storage.bounds import StoredServer
from keyring_module.storage.copies import StoredCopy

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
    "first_response_id",
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
#: Column order of what a store reads of a server's stored responses (no JSON bytes).
COPY_COLUMNS = (
    "response_id",
    "valid_until_ts",
    "fetched_ts",
    "source",
    "length(json)",
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


def parse_key_row(row: Sequence[Any]) -> StoredKey:
    """A :class:`StoredKey` from a ``server_keys`` row (its first eight columns).

    Raises:
        TypeError, ValueError: the row is corrupt (too short, wrong column types, a
            verify key that is not 32 bytes).
    """
    server_name, key_id, verify_key, valid_until_ts, expired_ts, fetched_ts, source, rid = row[:8]
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


def key_from_row(row: Sequence[Any]) -> Optional[StoredKey]:
    """A :class:`StoredKey` from a ``server_keys`` row, or None (logged) if it is corrupt."""
    try:
        return parse_key_row(row)
    except (TypeError, ValueError) as e:
        logger.warning("Skipping corrupt stored key %r: %s", tuple(row[:2]), e)
        return None


def key_row(key: StoredKey, first_response_id: str) -> tuple[Any, ...]:
    """The ``server_keys`` row of a key, in :data:`KEY_COLUMNS` order.

    Args:
        key: the key.
        first_response_id: the id of its first-seen copy.
    """
    return (
        key.server_name,
        key.key_id,
        key.verify_key_bytes,
        key.valid_until_ts,
        key.expired_ts,
        key.fetched_ts,
        key.source,
        key.response_id,
        first_response_id,
    )


def copies_from_rows(rows: Sequence[Sequence[Any]]) -> dict[str, StoredCopy]:
    """A server's stored responses as the bounds see them, by response id.

    Args:
        rows: rows in :data:`COPY_COLUMNS` order. A damaged column counts as 0 (or an
            empty source), so that the response is among the first dropped at a bound
            rather than kept for ever.

    Example:
        >>> copies_from_rows([("r1", 1000, 10, "origin", 250), ("r2", None, 5, 7, "x")])
        {'r1': StoredCopy(valid_until_ts=1000, fetched_ts=10, source='origin', size=250), \
'r2': StoredCopy(valid_until_ts=0, fetched_ts=5, source='', size=0)}
    """
    copies: dict[str, StoredCopy] = {}
    for response_id, valid_until_ts, fetched_ts, source, size in rows:
        copies[str(response_id)] = StoredCopy(
            valid_until_ts=_int_or_zero(valid_until_ts),
            fetched_ts=_int_or_zero(fetched_ts),
            source=source if isinstance(source, str) else "",
            size=_int_or_zero(size),
        )
    return copies


def _int_or_zero(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def stored_server_from_rows(
    rows: Sequence[Sequence[Any]], copy_rows: Sequence[Sequence[Any]] = ()
) -> tuple[StoredServer, dict[str, str]]:
    """One server's state before a write, from all its ``server_keys`` rows.

    Args:
        rows: rows in :data:`KEY_COLUMNS` order; a NULL ``first_response_id`` (a row
            written before first-seen copies were kept) counts the newest copy as the
            first-seen one.
        copy_rows: the server's stored responses, in :data:`COPY_COLUMNS` order.

    Returns:
        The state, and why each unreadable row cannot be read back, by key id.
    """
    keys: dict[str, StoredKey] = {}
    first_seen: dict[str, str] = {}
    unreadable: dict[str, frozenset[str]] = {}
    problems: dict[str, str] = {}
    for row in rows:
        first_response_id = row[8] if len(row) > 8 else None
        try:
            key = parse_key_row(row)
        except (TypeError, ValueError) as e:
            key_id = str(row[1]) if len(row) > 1 else ""
            unreadable[key_id] = frozenset(r for r in row[7:9] if isinstance(r, str))
            problems[key_id] = str(e)
            continue
        keys[key.key_id] = key
        if isinstance(first_response_id, str):
            first_seen[key.key_id] = first_response_id
    return StoredServer(keys, first_seen, unreadable, copies_from_rows(copy_rows)), problems


def response_from_row(row: Sequence[Any]) -> Optional[StoredResponse]:
    """A :class:`StoredResponse` from a ``server_key_responses`` row, or None if corrupt.

    The bytes must hash to the row's ``response_id``, so what the notary re-serves is
    exactly what was stored (after validation), and look like a JSON object. They are
    not decoded here: a stored answer may be a hostile megabyte of tiny values (the
    co-signer decodes it, off the reactor thread). The SQL stores call this in their
    pool threads, so the hashing stays off the reactor thread too.
    """
    try:
        response_id, server_name, valid_until_ts, fetched_ts, source, json_value = row
        json_bytes = to_bytes(json_value)
        if hashlib.sha256(json_bytes).hexdigest() != response_id:
            raise ValueError("json does not match its response_id")
        if not (json_bytes.startswith(b"{") and json_bytes.endswith(b"}")):
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


def select_keys(keys: Mapping[str, T], key_ids: Optional[Collection[str]]) -> dict[str, T]:
    """All of ``keys`` (``key_ids=None``) or those of the given ids that are present."""
    if key_ids is None:
        return dict(keys)
    return {key_id: keys[key_id] for key_id in key_ids if key_id in keys}
