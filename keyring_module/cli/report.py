"""How ``keyring-module query`` shows keys: readable text at a glance, or JSON.

Text output::

    Keys of example.org, fetched from the origin
      ed25519:a_AbCd  current  valid 23h 59m more (valid_until_ts 1700086400000)
          key: 5kh0akPnzYiMstL2i3pWzq6G7FeLsNdLXUFPCgi2tS0
          source: origin (fetched now)
          self-signature: verified
    Key conflicts: none

The JSON output (``--json``) holds the same fields for scripts.
"""

from typing import Any, Optional, TextIO

from unpaddedbase64 import encode_base64

from keyring_module.model import SOURCE_ORIGIN, KeyConflict, StoredKey
from keyring_module.verify import capped_valid_until_ts


def key_report(
    key: StoredKey,
    now: int,
    fresh: bool,
    self_signature: str,
    notary_signature: Optional[str],
) -> dict[str, Any]:
    """One key of the report, as a JSON-ready dict.

    Args:
        key: the stored key.
        now: the current time (ms).
        fresh: whether it was fetched by this query.
        self_signature: ``"verified"``, ``"invalid"``, ``"not_applicable"`` or
            ``"unknown"`` (see :data:`SIGNATURE_TEXT`).
        notary_signature: the same for the notary's signature, or None without one.

    Returns:
        The fields shown per key; ``valid_for_ms`` counts from ``now`` to the capped
        ``valid_until_ts`` (current keys) or to ``expired_ts`` (old keys).
    """
    if key.expired_ts is None:
        until = capped_valid_until_ts(key.valid_until_ts, now)
        left = until - now
        validity = (
            "valid %s more" % format_duration(left)
            if left >= 0
            else "expired %s ago" % format_duration(-left)
        )
        if until < key.valid_until_ts:
            validity += " (capped at 7 days)"
        validity += " (valid_until_ts %d)" % key.valid_until_ts
    else:
        left = key.expired_ts - now
        validity = "old key, %s (expired_ts %d)" % (
            "expires in %s" % format_duration(left)
            if left >= 0
            else "expired %s ago" % format_duration(-left),
            key.expired_ts,
        )
    return {
        "key_id": key.key_id,
        "kind": "current" if key.expired_ts is None else "old",
        "key": encode_base64(key.verify_key_bytes),
        "valid_until_ts": key.valid_until_ts if key.expired_ts is None else None,
        "expired_ts": key.expired_ts,
        "valid_for_ms": left,
        "validity": validity,
        "source": key.source,
        "fetched_ts": key.fetched_ts,
        "fetched_now": fresh,
        "self_signature": self_signature,
        "notary_signature": notary_signature,
    }


def conflict_report(conflict: KeyConflict) -> dict[str, Any]:
    """A recorded key conflict, as a JSON-ready dict (keys in unpadded base64)."""
    return {
        "key_id": conflict.key_id,
        "kept_key": encode_base64(conflict.kept_key_bytes),
        "kept_source": conflict.kept_source,
        "rejected_key": encode_base64(conflict.rejected_key_bytes),
        "rejected_source": conflict.rejected_source,
        "seen_ts": conflict.seen_ts,
    }


SIGNATURE_TEXT = {
    "verified": "verified",
    "invalid": "DOES NOT VERIFY",
    "not_applicable": "n/a (old keys carry no signature of their own)",
    "unknown": "unknown (response not stored)",
}


def print_report(report: dict[str, Any], out: TextIO) -> None:
    """Write ``report`` (from ``run_query``) as the text shown above."""
    via = report["via"]
    source = "the origin" if via == SOURCE_ORIGIN else via.replace("notary:", "notary ", 1)
    print("Keys of %s, fetched from %s" % (report["server_name"], source), file=out)
    if not report["keys"]:
        print("  (no keys)", file=out)
    for key in report["keys"]:
        print("  %s  %-7s  %s" % (key["key_id"], key["kind"], key["validity"]), file=out)
        print("      key: %s" % (key["key"],), file=out)
        print(
            "      source: %s (%s)"
            % (key["source"], "fetched now" if key["fetched_now"] else "stored earlier"),
            file=out,
        )
        print("      self-signature: %s" % (SIGNATURE_TEXT[key["self_signature"]],), file=out)
        if key["notary_signature"] is not None:
            print(
                "      notary signature: %s" % (SIGNATURE_TEXT[key["notary_signature"]],),
                file=out,
            )
    if report["conflicts"]:
        print("Key conflicts:", file=out)
        for c in report["conflicts"]:
            print(
                "  %s: kept %s from %s, rejected %s from %s (seen_ts %d)"
                % (
                    c["key_id"],
                    c["kept_key"],
                    c["kept_source"],
                    c["rejected_key"],
                    c["rejected_source"],
                    c["seen_ts"],
                ),
                file=out,
            )
    else:
        print("Key conflicts: none", file=out)


def format_duration(ms: int) -> str:
    """``"2d 3h"``, ``"23h 59m"``, ``"5m 3s"`` or ``"12s"``.

    Example:
        >>> format_duration(86_399_000)
        '23h 59m'
    """
    seconds = ms // 1000
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return "%dd %dh" % (days, hours)
    if hours:
        return "%dh %dm" % (hours, minutes)
    if minutes:
        return "%dm %ds" % (minutes, secs)
    return "%ds" % (secs,)
