"""How ``keyring-module keys`` shows what the store holds: JSON objects and text tables.

Every row is first turned into a JSON-ready dict (``--json`` prints those); the text
output is an aligned table of the same fields, times as ISO 8601 UTC.

Example:
    >>> from keyring_module.model import StoredKey
    >>> key = StoredKey("a.example", "ed25519:a", b"\\x01" * 32, 1767225600000, None,
    ...                 1767139200000, "origin", "r1")
    >>> print(format_table(KEY_COLUMNS, [key_json(key)]))
    SERVER     KEY ID     VALID UNTIL           EXPIRED  SOURCE  FETCHED
    a.example  ed25519:a  2026-01-01T00:00:00Z  -        origin  2025-12-31T00:00:00Z
"""

import datetime
from typing import Any, Mapping, Optional, Sequence

from unpaddedbase64 import encode_base64

from keyring_module.model import KeyConflict, StoredKey, StoredResponse
from keyring_module.storage.forget import ForgottenKeys

JsonDict = dict[str, Any]

#: (heading, field) of the ``keys list`` table.
KEY_COLUMNS = (
    ("SERVER", "server_name"),
    ("KEY ID", "key_id"),
    ("VALID UNTIL", "valid_until_ts"),
    ("EXPIRED", "expired_ts"),
    ("SOURCE", "source"),
    ("FETCHED", "fetched_ts"),
)
#: The keys table of ``keys show`` (one server, so its name is left out).
SHOW_KEY_COLUMNS = (("KEY ID", "key_id"), ("VERIFY KEY", "verify_key")) + KEY_COLUMNS[2:]
#: The stored responses table of ``keys show``.
RESPONSE_COLUMNS = (
    ("RESPONSE ID", "response_id"),
    ("VALID UNTIL", "valid_until_ts"),
    ("FETCHED", "fetched_ts"),
    ("AGE", "age_ms"),
    ("SOURCE", "source"),
    ("BYTES", "size_bytes"),
)
#: The ``keys conflicts`` table.
CONFLICT_COLUMNS = (
    ("SERVER", "server_name"),
    ("KEY ID", "key_id"),
    ("KEPT KEY", "kept_key"),
    ("KEPT FROM", "kept_source"),
    ("REJECTED KEY", "rejected_key"),
    ("REJECTED FROM", "rejected_source"),
    ("SEEN", "seen_ts"),
)


def iso_time(ts_ms: Optional[int]) -> str:
    """A millisecond timestamp as ISO 8601 UTC to the second; ``-`` for None.

    Example:
        >>> iso_time(1767225600000), iso_time(None), iso_time(10**20)
        ('2026-01-01T00:00:00Z', '-', '100000000000000000000ms')
    """
    if ts_ms is None:
        return "-"
    try:
        when = datetime.datetime.fromtimestamp(ts_ms / 1000, tz=datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return "%dms" % ts_ms
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def age_text(age_ms: int) -> str:
    """A duration in the two largest units, e.g. for how old a stored response is.

    Example:
        >>> age_text(45_000), age_text(3 * 3600_000 + 5 * 60_000), age_text(-1)
        ('45s', '3h 5m', '0s')
        >>> age_text(2 * 86400_000 + 4 * 3600_000)
        '2d 4h'
    """
    seconds = max(0, age_ms) // 1000
    units = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
    parts: list[str] = []
    for name, size in units:
        if seconds >= size or (name == "s" and not parts):
            parts.append("%d%s" % (seconds // size, name))
            seconds %= size
        if len(parts) == 2:
            break
        if parts and seconds == 0:
            break
    return " ".join(parts)


def key_json(key: StoredKey) -> JsonDict:
    """One stored key (``verify_key`` in unpadded base64, as in ``/server``)."""
    return {
        "server_name": key.server_name,
        "key_id": key.key_id,
        "verify_key": encode_base64(key.verify_key_bytes),
        "valid_until_ts": key.valid_until_ts,
        "expired_ts": key.expired_ts,
        "source": key.source,
        "fetched_ts": key.fetched_ts,
        "response_id": key.response_id,
    }


def response_json(response: StoredResponse, now_ms: int) -> JsonDict:
    """One stored response (what the notary re-serves), without its bytes."""
    return {
        "response_id": response.response_id,
        "valid_until_ts": response.valid_until_ts,
        "fetched_ts": response.fetched_ts,
        "age_ms": now_ms - response.fetched_ts,
        "source": response.source,
        "size_bytes": len(response.json_bytes),
    }


def conflict_json(conflict: KeyConflict) -> JsonDict:
    """One recorded conflict: the kept and the rejected key bytes and their sources."""
    return {
        "server_name": conflict.server_name,
        "key_id": conflict.key_id,
        "kept_key": encode_base64(conflict.kept_key_bytes),
        "kept_source": conflict.kept_source,
        "rejected_key": encode_base64(conflict.rejected_key_bytes),
        "rejected_source": conflict.rejected_source,
        "seen_ts": conflict.seen_ts,
    }


def forgotten_json(forgotten: ForgottenKeys) -> JsonDict:
    """What a forget removed."""
    return {
        "server_name": forgotten.server_name,
        "key_ids": list(forgotten.key_ids),
        "response_ids": list(forgotten.response_ids),
    }


def _cell(field: str, value: Any, now_ms: Optional[int]) -> str:
    if field.endswith("_ts"):
        text = iso_time(value)
        if field == "valid_until_ts" and now_ms is not None and value < now_ms:
            text += " (past)"
        return text
    if field == "age_ms":
        return age_text(int(value))
    return "-" if value is None else str(value)


def format_table(
    columns: Sequence[tuple[str, str]],
    rows: Sequence[Mapping[str, Any]],
    now_ms: Optional[int] = None,
) -> str:
    """Rows (dicts from the ``*_json`` functions) as an aligned text table.

    Args:
        columns: (heading, field) pairs.
        rows: the rows.
        now_ms: when given, a ``valid_until_ts`` before it is marked ``(past)``.
    """
    cells = [[heading for heading, _ in columns]]
    cells += [[_cell(field, row.get(field), now_ms) for _, field in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip()
        for line in cells
    )
