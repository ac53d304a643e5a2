"""Every check ``keyring-module verify-event`` made on an event, in the order the
keyring makes them, for people and for ``--json``.

The outcome of an event comes from the keyring's own check
(:func:`~keyring_module.verify.verify_event_signatures`, or
:meth:`~keyring_module.keyring.Keyring.check_events` with ``--config``). The report
re-runs the same pure steps with the same keys to say what each one found: who must
sign, the value rules of the room version, each signer's signature and the key used,
the ids derived from the reference hash, and the content hash. Each step's result is
what that step itself found when it ran here; the steps stop at the first failure, as
the keyring does, so a check that was not reached is not listed.

Example:
    >>> from keyring_module.roomversions import ROOM_VERSIONS
    >>> checks = event_checks({"sender": "@a:a.org"}, ROOM_VERSIONS["10"], {}, 0)
    >>> [(c["check"], c["result"]) for c in checks]
    [('signers', 'failed')]
"""

from collections.abc import Iterator, Mapping
from typing import Any, Optional, TextIO

from unpaddedbase64 import encode_base64

from keyring_module.errors import KeyVerificationError, VerificationFailure
from keyring_module.eventhashes import (
    claimed_content_hash,
    content_hash,
    encode_hash,
    event_breaks_value_rules,
    event_id_of,
    hashes_problem,
    is_create_event,
    signed_form,
)
from keyring_module.model import StoredKey
from keyring_module.quoting import quote_untrusted
from keyring_module.redaction import REDACTION_RULES, redact_with_rules
from keyring_module.roomversions import RoomVersion
from keyring_module.verify import (
    required_signers,
    signing_key_ids,
    usable_key,
    verify_signed_json_with_keys,
)

#: One check of the report: ``check`` (its name), ``result`` (``passed``, ``failed``,
#: ``not_applicable``, ``computed`` or ``not_checked``), and what it looked at.
Check = dict[str, Any]

PASSED = "passed"
FAILED = "failed"
NOT_APPLICABLE = "not_applicable"
#: A value worked out for the reader, with nothing in the event to compare it with.
COMPUTED = "computed"
#: A check the command cannot make without more input (e.g. the room's state).
NOT_CHECKED = "not_checked"


def event_checks(
    event: Mapping[str, Any],
    room_version: RoomVersion,
    keys_by_server: Mapping[str, Mapping[str, StoredKey]],
    now_ms: int,
    *,
    compromised: frozenset[bytes] = frozenset(),
) -> list[Check]:
    """Run the event's checks one by one and say what each found.

    Args:
        event: the event as received.
        room_version: its room's version.
        keys_by_server: the keys the outcome was decided with, by server then key id.
        now_ms: the time the outcome was decided at.
        compromised: decoded bytes of keys never to trust.

    Returns:
        The checks made, in order, up to and including the first that failed.
    """
    checks: list[Check] = []
    for step in _steps(event, room_version, keys_by_server, now_ms, compromised):
        checks.append(step)
        if is_rejection(step):
            break
    return checks


def is_rejection(check: Check) -> bool:
    """Whether a failed check rejects the event: every one does but the content hash,
    whose mismatch means "use the redacted copy" (checked on, for its own signers)."""
    return bool(check["result"] == FAILED and check["check"] != "content_hash")


def signers_to_look_up(event: Mapping[str, Any], room_version: RoomVersion) -> set[str]:
    """The servers whose keys the checks may need: the event's required signers, and
    its redacted copy's (redaction can drop what spared the sender's server).

    Example:
        >>> from keyring_module.roomversions import ROOM_VERSIONS
        >>> invite = {"type": "m.room.member", "sender": "@a:a.org", "content":
        ...     {"membership": "invite", "third_party_invite": {}}}
        >>> sorted(signers_to_look_up(invite, ROOM_VERSIONS["10"]))
        ['a.org']
    """
    servers: set[str] = set()
    for copy in (event, _redacted_copy(event, room_version)):
        try:
            servers |= required_signers(copy, room_version)
        except ValueError:
            pass
    return servers


def _redacted_copy(event: Mapping[str, Any], room_version: RoomVersion) -> dict[str, Any]:
    return redact_with_rules(event, REDACTION_RULES[room_version.redaction_rules])


def _steps(
    event: Mapping[str, Any],
    room_version: RoomVersion,
    keys_by_server: Mapping[str, Mapping[str, StoredKey]],
    now_ms: int,
    compromised: frozenset[bytes],
) -> Iterator[Check]:
    """The checks as a generator: the caller stops at the first failure."""
    origin_server_ts = event.get("origin_server_ts")
    try:
        if not isinstance(origin_server_ts, int) or isinstance(origin_server_ts, bool):
            raise ValueError("event has no integer origin_server_ts")
        signers = sorted(required_signers(event, room_version))
    except ValueError as e:
        yield _failed("signers", VerificationFailure.MALFORMED_EVENT, str(e))
        return
    yield {"check": "signers", "result": PASSED, "servers": signers}

    if not room_version.strict_canonical_json:
        yield {
            "check": "value_rules",
            "result": NOT_APPLICABLE,
            "detail": "room version %s predates the canonical-JSON value rules (v6)"
            % (room_version.identifier,),
        }
    elif event_breaks_value_rules(event):
        yield _failed(
            "value_rules",
            VerificationFailure.NOT_CANONICAL_JSON,
            "a float or an integer outside +-(2^53-1) in the event",
        )
        return
    else:
        yield {
            "check": "value_rules",
            "result": PASSED,
            "detail": "no float, every integer within +-(2^53-1) (unsigned aside)",
        }

    problem = hashes_problem(event)
    if problem is not None:
        yield _failed("hashes", VerificationFailure.MALFORMED_EVENT, problem)
        return

    signed = signed_form(event, room_version)
    redacted = redact_with_rules(signed, REDACTION_RULES[room_version.redaction_rules])
    for server_name in signers:
        keys = keys_by_server.get(server_name, {})
        step = _signature_check(
            redacted, server_name, keys, origin_server_ts, now_ms, room_version, compromised
        )
        yield step
        if step["result"] == FAILED:
            return

    try:
        yield from _derived_id_checks(event, room_version)
        hash_check = _content_hash_check(signed)
    except ValueError as e:
        yield _failed("canonical_json", VerificationFailure.NOT_CANONICAL_JSON, str(e))
        return
    yield hash_check
    if hash_check["result"] == FAILED:
        yield from _redacted_copy_checks(
            event, room_version, set(signers), redacted, keys_by_server, now_ms, compromised
        )


def _redacted_copy_checks(
    event: Mapping[str, Any],
    room_version: RoomVersion,
    signers: set[str],
    redacted: Mapping[str, Any],
    keys_by_server: Mapping[str, Mapping[str, StoredKey]],
    now_ms: int,
    compromised: frozenset[bytes],
) -> Iterator[Check]:
    """The redacted copy must carry the signatures it needs itself."""
    try:
        needed = sorted(required_signers(_redacted_copy(event, room_version), room_version))
    except ValueError as e:
        yield _failed("redacted_copy_signers", VerificationFailure.MALFORMED_EVENT, str(e))
        return
    yield {"check": "redacted_copy_signers", "result": PASSED, "servers": needed}
    for server_name in needed:
        if server_name not in signers:
            yield _signature_check(
                redacted,
                server_name,
                keys_by_server.get(server_name, {}),
                event["origin_server_ts"],
                now_ms,
                room_version,
                compromised,
            )


def _signature_check(
    redacted: Mapping[str, Any],
    server_name: str,
    keys: Mapping[str, StoredKey],
    origin_server_ts: int,
    now_ms: int,
    room_version: RoomVersion,
    compromised: frozenset[bytes],
) -> Check:
    """One signer's signatures over the redacted event, and the keys that checked them."""
    used = [
        {"key_id": key_id, "verify_key": encode_base64(keys[key_id].verify_key_bytes)}
        for key_id in sorted(signing_key_ids(redacted, server_name))
        if key_id in keys
        and usable_key(
            keys[key_id],
            origin_server_ts,
            now_ms,
            purpose="event",
            enforce_validity=room_version.enforce_key_validity,
            compromised=compromised,
        )
    ]
    check: Check = {"check": "signature", "server": server_name, "keys": used}
    try:
        verify_signed_json_with_keys(
            redacted,
            server_name,
            keys,
            origin_server_ts,
            now_ms,
            enforce_validity=room_version.enforce_key_validity,
            compromised=compromised,
        )
    except KeyVerificationError as e:
        check.update(result=FAILED, reason=e.reason.value, detail=e.detail)
        return check
    check["result"] = PASSED
    return check


def _derived_id_checks(event: Mapping[str, Any], room_version: RoomVersion) -> Iterator[Check]:
    """The event id (v3+) and a v12 create event's room id against the reference hash."""
    if room_version.event_id_format is None:
        yield {
            "check": "event_id",
            "result": NOT_APPLICABLE,
            "detail": "room version %s has no hash event ids" % (room_version.identifier,),
        }
        return
    expected = event_id_of(event, room_version)
    yield _compare("event_id", event, expected, VerificationFailure.EVENT_ID_MISMATCH)
    if room_version.room_id_is_create_event_hash and is_create_event(event):
        expected_room_id = "!" + expected[1:]  # the same reference hash
        yield _compare("room_id", event, expected_room_id, VerificationFailure.ROOM_ID_MISMATCH)


def _compare(
    field: str, event: Mapping[str, Any], expected: str, failure: VerificationFailure
) -> Check:
    check: Check = {"check": field, "expected": expected}
    if field not in event:
        check.update(result=COMPUTED, detail="the event carries no %s" % (field,))
    elif event[field] == expected:
        check["result"] = PASSED
    else:
        check.update(
            result=FAILED,
            reason=failure.value,
            got=event[field],
            detail="%s is not the event's reference hash" % (field,),
        )
    return check


def _content_hash_check(signed: Mapping[str, Any]) -> Check:
    """``hashes.sha256`` against the content hash; a mismatch means "use the redacted copy"."""
    expected = encode_hash(content_hash(signed), "standard")
    claimed = claimed_content_hash(signed)
    check: Check = {"check": "content_hash", "expected": expected}
    if claimed is None:
        check.update(result=FAILED, detail="hashes.sha256 is not base64")
    elif encode_hash(claimed, "standard") != expected:
        check.update(result=FAILED, got=encode_hash(claimed, "standard"))
        check["detail"] = "content changed after signing: the redacted copy is the event"
    else:
        check["result"] = PASSED
    return check


def _failed(name: str, reason: VerificationFailure, detail: str) -> Check:
    return {"check": name, "result": FAILED, "reason": reason.value, "detail": detail}


def print_checks(result: str, reason: Optional[str], checks: list[Check], out: TextIO) -> None:
    """Print the outcome and the checks for people.

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> print_checks("ok", None, [{"check": "signers", "result": "passed",
        ...     "servers": ["a.org"]}], out)
        >>> print(out.getvalue(), end="")
        result: ok
          signers: passed (a.org)
    """
    print("result: %s" % (result,) + (" (%s)" % (reason,) if reason else ""), file=out)
    for check in checks:
        print("  %s: %s" % (_title(check), check["result"]) + _details(check), file=out)


def _title(check: Check) -> str:
    if check["check"] == "signature":
        return "signature of %s" % (check["server"],)
    return str(check["check"])


def _details(check: Check) -> str:
    parts: list[str] = []
    if "servers" in check:
        parts.append(", ".join(check["servers"]) or "none")
    if "keys" in check:
        keys = ["%s %s" % (k["key_id"], k["verify_key"]) for k in check["keys"]]
        parts.append("key " + ", ".join(keys) if keys else "no usable key")
    if "got" in check:
        parts.append("got %s" % (quote_untrusted(check["got"]),))
    if "expected" in check:
        parts.append("expected %s" % (check["expected"],))
    if "reason" in check:
        parts.append(str(check["reason"]))
    if "detail" in check:
        parts.append(str(check["detail"]))
    return " (%s)" % ("; ".join(parts),) if parts else ""
