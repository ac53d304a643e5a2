"""How ``keyring-module query`` shows what it found: readable text, or JSON.

Text output::

    Keys of example.org, fetched from the origin, then notary notary.example.org
    Sources:
      origin: could not reach example.org: timeout (no answer within 10s)
      notary:notary.example.org: answered; used
    Keys:
      ed25519:a_AbCd  current  valid 23h 59m more (valid_until_ts 1700086400000)
          key: l8Hft5qXKn1vfHrg3p4+W8gELQVo8N13JkluMfmn2sQ
          source: notary:notary.example.org (fetched now)
          answered by: notary:notary.example.org
          self-signature: verified
          notary signature: verified
    Key conflicts: none

The JSON output (``--json``) holds the same fields for scripts. Signatures are checked
when an answer is received (the origin's self-signature on every current key, and a
trusted notary's signature on its answers); an answer failing either is reported as a
failed source, never stored, so the report says when each key's signatures were
checked rather than checking them again.
"""

import enum
from typing import Any, Mapping, Optional, Sequence, TextIO

from unpaddedbase64 import encode_base64

from keyring_module.config import KeyTrustConfig
from keyring_module.fetchers.base import FailureKind, SourceFailure
from keyring_module.fetchers.trace import ServerTrace
from keyring_module.fetchers.trust import is_provisional
from keyring_module.model import SOURCE_ORIGIN, KeyConflict, StoredKey, notary_of
from keyring_module.verify import capped_valid_until_ts


class SignatureCheck(str, enum.Enum):
    """When a key's signature was checked (the JSON value is the member's value)."""

    VERIFIED = "verified"  # on an answer received by this query
    VERIFIED_WHEN_STORED = "verified_when_stored"  # on the answer it was stored from
    NOT_APPLICABLE = "not_applicable"  # old_verify_keys carry no signature of their own


#: ``key_trust`` as if not configured: nothing compromised, nothing to confirm.
_NO_TRUST_OPTIONS = KeyTrustConfig()

SIGNATURE_TEXT = {
    SignatureCheck.VERIFIED: "verified",
    SignatureCheck.VERIFIED_WHEN_STORED: "verified when it was stored",
    SignatureCheck.NOT_APPLICABLE: "n/a (old keys carry no signature of their own)",
}


def build_report(
    server_name: str,
    keys: Mapping[str, StoredKey],
    trace: ServerTrace,
    conflicts: Sequence[KeyConflict],
    start_ms: int,
    now_ms: int,
    trust: KeyTrustConfig = _NO_TRUST_OPTIONS,
) -> dict[str, Any]:
    """The whole report, as a JSON-ready dict.

    Args:
        server_name: the server queried.
        keys: its stored keys after the query.
        trace: what the chain did for it.
        conflicts: its recorded key conflicts.
        start_ms: when the query started (keys stored since were fetched now).
        now_ms: the current time.
        trust: the ``key_trust`` policy the query ran under (compromised keys, direct
            confirmation).

    Returns:
        ``ok`` is true when an answer was trusted (stored) by this query and holds a
        current key that is not compromised and that the store holds (the store keeps a
        later copy of a key it has, and refuses new key ids at the server's bounds);
        ``error`` says why not otherwise.
    """
    compromised = frozenset(trust.compromised_keys)
    ordered = sorted(keys.values(), key=lambda k: (k.expired_ts is not None, k.key_id))
    key_reports = [
        key_report(
            key,
            now_ms,
            key.fetched_ts >= start_ms,
            answered_by(trace, key),
            compromised=key.verify_key_bytes in compromised,
            provisional=trust.confirm_notary_keys_directly and is_provisional(key),
        )
        for key in ordered
    ]
    answered_now = {
        (key_id, key_bytes)
        for result in trace.used
        for key_id, key_bytes in result.response.verify_keys.items()
        if key_bytes not in compromised
    }
    held = {(k.key_id, k.verify_key_bytes) for k in keys.values()}
    usable = answered_now & held
    ok = bool(usable)
    error = None
    if not trace.used:
        error = failure_reason(server_name, trace, bool(keys))
    elif not answered_now:
        error = "every current key answered is compromised (key_trust.compromised_keys)"
    elif not usable:
        error = (
            "the answers were trusted, but the store holds none of their current keys "
            "(the server is at its bounds: database.max_keys_per_server or "
            "max_responses_per_server)"
        )
    return {
        "server_name": server_name,
        "asked": list(dict.fromkeys(trace.asked)),
        "sources": source_reports(server_name, trace),
        "queried_ts": now_ms,
        "ok": ok,
        "error": error,
        "keys": key_reports,
        "conflicts": [conflict_report(c) for c in conflicts],
    }


def answered_by(trace: ServerTrace, key: StoredKey) -> list[str]:
    """The sources whose answers in this query held ``key`` (same id, same bytes)."""
    sources = []
    for result in trace.answers:
        response = result.response
        published = response.verify_keys.get(key.key_id)
        if published is None and key.key_id in response.old_verify_keys:
            published = response.old_verify_keys[key.key_id].verify_key_bytes
        if published == key.verify_key_bytes and result.source not in sources:
            sources.append(result.source)
    return sources


def key_report(
    key: StoredKey,
    now: int,
    fetched_now: bool,
    answered: Sequence[str] = (),
    *,
    compromised: bool = False,
    provisional: bool = False,
) -> dict[str, Any]:
    """One key of the report, as a JSON-ready dict.

    Args:
        key: the stored key.
        now: the current time (ms).
        fetched_now: whether it was stored by this query.
        answered: the sources whose answers in this query held it.
        compromised: whether its bytes are in ``key_trust.compromised_keys``.
        provisional: whether it waits for the origin's direct confirmation.

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
    checked = SignatureCheck.VERIFIED if fetched_now else SignatureCheck.VERIFIED_WHEN_STORED
    self_signature = SignatureCheck.NOT_APPLICABLE if key.expired_ts is not None else checked
    notary_signature = checked if notary_of(key.source) is not None else None
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
        "fetched_now": fetched_now,
        "answered_by": list(answered),
        "compromised": compromised,
        "provisional": provisional,
        "self_signature": self_signature.value,
        "notary_signature": None if notary_signature is None else notary_signature.value,
    }


def source_reports(server_name: str, trace: ServerTrace) -> list[dict[str, Any]]:
    """One entry per source asked: ``used``, ``not_used`` (with the policy's reason) or
    ``failed`` (with why), in the order asked."""
    reports: list[dict[str, Any]] = []
    used = {r.source for r in trace.used}
    unused = {u.result.source: u.reason for u in trace.unused}
    for source in dict.fromkeys(trace.asked):
        if source in used:
            reports.append({"source": source, "outcome": "used", "detail": "answered; used"})
        elif source in unused:
            reports.append(
                {
                    "source": source,
                    "outcome": "not_used",
                    "detail": "answered; not used (%s)" % (unused[source],),
                }
            )
        for failure in trace.failures:
            if failure.source == source:
                reports.append(
                    {
                        "source": source,
                        "outcome": "failed",
                        "detail": describe_failure(server_name, failure),
                    }
                )
    return reports


def describe_failure(server_name: str, failure: SourceFailure) -> str:
    """One source's failure in words, e.g. ``could not reach a.org: timeout (...)``."""
    is_origin = failure.source == SOURCE_ORIGIN
    target = server_name if is_origin else _describe_source(failure.source)
    kind = failure.kind
    if kind in (FailureKind.UNREACHABLE, FailureKind.TIMED_OUT):
        return "could not reach %s: %s" % (target, failure.detail)
    if kind is FailureKind.INVALID_RESPONSE:
        if is_origin:
            return "invalid key response from %s: %s" % (server_name, failure.detail)
        return "%s returned no valid keys for %s: %s" % (target, server_name, failure.detail)
    if kind is FailureKind.NOT_IN_ANSWER:
        return "%s returned no valid keys for %s" % (target, server_name)
    if kind is FailureKind.REFUSED:
        return "no request was made to %s (refused: %s)" % (target, failure.detail)
    return "asking %s failed: %s" % (target, failure.detail)


def failure_reason(server_name: str, trace: ServerTrace, have_stored: bool) -> str:
    """Why no answer was trusted, for the exit message."""
    stale = "; only keys stored earlier are shown" if have_stored else ""
    if trace.unused:
        reasons = "; ".join("%s: %s" % (u.result.source, u.reason) for u in trace.unused)
        return "no answer was used (%s)%s" % (reasons, stale)
    if trace.failures:
        return "; ".join(describe_failure(server_name, f) for f in trace.failures) + stale
    return "no source was asked%s" % (stale,)


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


def print_report(report: Mapping[str, Any], out: TextIO) -> None:
    """Write ``report`` (from :func:`build_report`) as the text shown above."""
    asked = [_describe_source(s) for s in report["asked"]]
    print(
        "Keys of %s, fetched from %s" % (report["server_name"], ", then ".join(asked) or "nowhere"),
        file=out,
    )
    if report["sources"]:
        print("Sources:", file=out)
    for source in report["sources"]:
        print("  %s: %s" % (source["source"], source["detail"]), file=out)
    print("Keys:", file=out)
    if not report["keys"]:
        print("  (no keys)", file=out)
    for key in report["keys"]:
        _print_key(key, out)
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


def _print_key(key: Mapping[str, Any], out: TextIO) -> None:
    print("  %s  %-7s  %s" % (key["key_id"], key["kind"], key["validity"]), file=out)
    print("      key: %s" % (key["key"],), file=out)
    when = "fetched now" if key["fetched_now"] else "stored earlier"
    if key["provisional"]:
        when += "; provisional until the origin confirms it"
    print("      source: %s (%s)" % (key["source"], when), file=out)
    if key["compromised"]:
        print("      COMPROMISED: listed in key_trust.compromised_keys, never trusted", file=out)
    if key["answered_by"]:
        print("      answered by: %s" % (", ".join(key["answered_by"]),), file=out)
    print(
        "      self-signature: %s" % (SIGNATURE_TEXT[SignatureCheck(key["self_signature"])],),
        file=out,
    )
    notary_signature: Optional[str] = key["notary_signature"]
    if notary_signature is not None:
        print(
            "      notary signature: %s" % (SIGNATURE_TEXT[SignatureCheck(notary_signature)],),
            file=out,
        )


def _describe_source(source: str) -> str:
    notary = notary_of(source)
    if notary is not None:
        return "notary %s" % (notary,)
    return "the origin" if source == SOURCE_ORIGIN else source


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
