"""``keyring-module verify-event``: check one event's signatures and hashes as the
keyring would, and show every check made.

::

    keyring-module verify-event event.json --room-version 10 \\
        --key example.org ed25519:abc 3tGeWQ/yIwY8bPqJ1Hgm3fOUS5uSRv6KqOq+bSArmM8
    keyring-module verify-event - --room-version 12 --config notary.yaml --json < event.json

With ``--key SERVER KEY_ID BASE64`` (repeatable) the check is offline: no config, no
network, only the keys given, each taken as a current key of its server (valid for the
usual 7 days from now, so any event sent before then counts). Without ``--key`` the
keys are fetched through the configured keyring (the fetch layer ``query`` uses:
:class:`~keyring_module.wiring.Fetching`), or with the defaults when there is no
``--config``: an in-memory store, no notaries.

Exit status: 0 accepted, 3 accepted but redacted (the content hash differs: the
redacted copy is the event), 1 rejected, 2 usage errors (an unknown room version, a bad
``--key``, an unreadable file or one that holds no JSON object). The outcome and each
check are printed (see :mod:`keyring_module.cli.event_report`), or with ``--json`` one
object ``{"result": "ok"|"redacted"|"rejected", "reason": ..., "checks": [...]}``.
"""

import argparse
import json
import sys
import time
from collections.abc import Mapping
from typing import Any, Callable, Optional, TextIO, cast

import attr
from signedjson.key import generate_signing_key
from twisted.internet import task

from keyring_module.cli.event_report import (
    FAILED,
    NOT_APPLICABLE,
    NOT_CHECKED,
    PASSED,
    event_checks,
    is_rejection,
    print_checks,
    signers_to_look_up,
)
from keyring_module.cli.query import DEFAULT_QUERY_CONFIG, load_query_config
from keyring_module.clock import KeyringReactor, now_ms
from keyring_module.config import KeyringConfig, parse_config
from keyring_module.encoding import decode_base64_tolerant
from keyring_module.errors import KeyVerificationError
from keyring_module.http import FederationHttpClient, TLSError
from keyring_module.json_codec import loads_strict
from keyring_module.keyids import is_ed25519_key_id
from keyring_module.keyring import Keyring
from keyring_module.keyring.outcomes import ACCEPTED, EventCheck, EventOutcome
from keyring_module.model import StoredKey
from keyring_module.roomversions import RoomVersion, get_room_version
from keyring_module.servername import is_valid_server_name
from keyring_module.signing import OwnKeys
from keyring_module.storage import KeyStore
from keyring_module.storage.errors import StorageError
from keyring_module.third_party_invite import check_third_party_invite
from keyring_module.verify import MAX_KEY_VALIDITY_MS, verify_event_signatures
from keyring_module.wiring import Fetching

EXIT_OK = 0
EXIT_REJECTED = 1
EXIT_USAGE = 2
EXIT_REDACTED = 3

_EXIT_STATUS = {
    EventOutcome.ACCEPTED: EXIT_OK,
    EventOutcome.REDACTED: EXIT_REDACTED,
    EventOutcome.REJECTED: EXIT_REJECTED,
}

#: Bytes of an ed25519 verify key.
_VERIFY_KEY_LENGTH = 32

#: Where keys given with ``--key`` come from, as a :class:`StoredKey` source says.
KEY_ARGUMENT_SOURCE = "command line"

#: The keyring's own server name in the config mode: the command signs nothing, and a
#: reserved name no event can come from keeps its throwaway key out of every check.
_NO_OWN_SERVER = "verify-event.invalid"

#: Keys by server name, then key id: decoded verify key bytes.
GivenKeys = Mapping[str, Mapping[str, bytes]]


class VerifyEventUsageError(Exception):
    """The arguments or the event file cannot be used (exit status 2)."""


@attr.s(auto_attribs=True, frozen=True, slots=True)
class VerifyEventOptions:
    """What to check and how.

    Attributes:
        event: the event, as a JSON object.
        room_version: its room's version.
        keys: the keys given with ``--key``; empty to fetch through the keyring.
        config: the parsed ``--config``, or None for the defaults.
        as_json: print one JSON object instead of text.
        invite_event: the room's ``m.room.third_party_invite`` event (``--invite-event``)
            that a third-party invite's ``signed`` block is checked against, if given.
    """

    event: dict[str, Any]
    room_version: RoomVersion
    keys: GivenKeys = attr.Factory(dict)
    config: Optional[KeyringConfig] = None
    as_json: bool = False
    invite_event: Optional[dict[str, Any]] = None


def add_verify_event_parser(sub: Any, cmd: Callable[[argparse.Namespace], int]) -> None:
    """Register the ``verify-event`` sub-command on ``sub`` (argparse sub-parsers).

    Args:
        sub: the object ``add_subparsers()`` returned.
        cmd: the function to run for it (:func:`cmd_verify_event`).
    """
    parser = sub.add_parser(
        "verify-event",
        help="check one event's signatures and hashes, offline or with the keyring",
    )
    parser.add_argument("file", metavar="FILE", help="the event as JSON; - reads standard input")
    parser.add_argument("--room-version", required=True, metavar="V", help="e.g. 10")
    parser.add_argument(
        "--key",
        nargs=3,
        action="append",
        default=[],
        metavar=("SERVER", "KEY_ID", "BASE64"),
        help="a verify key to check with (repeatable); offline, no config",
    )
    parser.add_argument("--config", "-c", help="YAML config whose keyring fetches the keys")
    parser.add_argument(
        "--invite-event",
        metavar="FILE",
        help="the room's m.room.third_party_invite event (JSON) to check a third-party "
        "invite's signed block against",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=cmd)


def options_from_args(
    args: argparse.Namespace, stdin: Optional[TextIO] = None
) -> VerifyEventOptions:
    """Check the arguments, read the event (``-``: from ``stdin``, standard input by
    default) and load the config.

    Raises:
        VerifyEventUsageError: an unknown room version, a bad ``--key``, ``--key``
            together with ``--config``, or an event that cannot be read or is no JSON
            object.
        ConfigError: the config file is invalid.
    """
    try:
        room_version = get_room_version(args.room_version)
    except ValueError as e:
        raise VerifyEventUsageError(str(e))
    keys = parse_keys(args.key)
    if keys and args.config:
        raise VerifyEventUsageError("--key checks offline and cannot be used with --config")
    if args.file == "-" and args.invite_event == "-":
        raise VerifyEventUsageError("only one of FILE and --invite-event can be -")
    event = read_event(args.file, stdin or sys.stdin)
    invite_event = None
    if args.invite_event is not None:
        invite_event = read_event(args.invite_event, stdin or sys.stdin)
    config = load_query_config(args.config) if args.config else None
    return VerifyEventOptions(event, room_version, keys, config, bool(args.json), invite_event)


def parse_keys(triples: list[list[str]]) -> dict[str, dict[str, bytes]]:
    """The ``--key SERVER KEY_ID BASE64`` arguments as keys by server and key id.

    Raises:
        VerifyEventUsageError: a bad server name, key id or key.

    Example:
        >>> parse_keys([["a.org", "ed25519:1", "A" * 43]])["a.org"]["ed25519:1"][:2]
        b'\\x00\\x00'
    """
    keys: dict[str, dict[str, bytes]] = {}
    for server_name, key_id, encoded in triples:
        if not is_valid_server_name(server_name):
            raise VerifyEventUsageError("--key: %r is not a valid server name" % (server_name,))
        if not is_ed25519_key_id(key_id):
            raise VerifyEventUsageError("--key: %r is not an ed25519: key id" % (key_id,))
        raw = decode_base64_tolerant(encoded)
        if raw is None or len(raw) != _VERIFY_KEY_LENGTH:
            raise VerifyEventUsageError(
                "--key: %r is not a base64 ed25519 verify key (32 bytes)" % (encoded,)
            )
        keys.setdefault(server_name, {})[key_id] = raw
    return keys


def read_event(path: str, stdin: TextIO) -> dict[str, Any]:
    """The event in ``path`` (``-``: ``stdin``), decoded strictly.

    Raises:
        VerifyEventUsageError: the file cannot be read, is not JSON, or is no object.
    """
    name = "standard input" if path == "-" else path
    try:
        if path == "-":
            body = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read().encode()
        else:
            with open(path, "rb") as f:
                body = f.read()
    except OSError as e:
        raise VerifyEventUsageError("cannot read %s: %s" % (name, e.strerror or e))
    try:
        event = loads_strict(body)
    except ValueError as e:
        raise VerifyEventUsageError("%s is not JSON: %s" % (name, e))
    if not isinstance(event, dict):
        raise VerifyEventUsageError("%s holds no JSON object (an event)" % (name,))
    return event


def stored_keys(keys: GivenKeys, now: int) -> dict[str, dict[str, StoredKey]]:
    """The keys given with ``--key`` as current keys, fetched ``now``."""
    return {
        server_name: {
            key_id: StoredKey(
                server_name,
                key_id,
                raw,
                now + MAX_KEY_VALIDITY_MS,
                None,
                now,
                KEY_ARGUMENT_SOURCE,
                "",
            )
            for key_id, raw in by_id.items()
        }
        for server_name, by_id in keys.items()
    }


def check_offline(
    options: VerifyEventOptions, now: int
) -> tuple[EventCheck, dict[str, dict[str, StoredKey]]]:
    """Check the event with the keys given only (pure: no reactor, no I/O).

    Returns:
        The outcome, and the keys it was decided with.
    """
    keys = stored_keys(options.keys, now)
    try:
        redacted = verify_event_signatures(options.event, options.room_version, keys, now)
    except KeyVerificationError as e:
        return EventCheck(EventOutcome.REJECTED, e.reason, error=e), keys
    if redacted is None:
        return ACCEPTED, keys
    return EventCheck(EventOutcome.REDACTED, redacted_event=redacted), keys


def cmd_verify_event(args: argparse.Namespace) -> int:
    """Run ``keyring-module verify-event``; returns the exit status."""
    try:
        options = options_from_args(args)
    except VerifyEventUsageError as e:
        print("keyring-module verify-event: %s" % (e,), file=sys.stderr)
        return EXIT_USAGE
    if options.keys:
        return run_offline(options, int(time.time() * 1000))

    async def main(reactor: Any) -> None:
        code = await run_with_keyring(cast(KeyringReactor, reactor), options)
        if code:
            raise SystemExit(code)

    try:
        task.react(main)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_REJECTED
    return EXIT_OK  # pragma: no cover (react always exits)


def run_offline(
    options: VerifyEventOptions,
    now: int,
    *,
    out: Optional[TextIO] = None,
    err: Optional[TextIO] = None,
) -> int:
    """Check the event with the given keys and print the outcome and the checks (to
    ``out``, standard output by default; a rejection's reason to ``err``, standard error).

    Example::

        code = run_offline(options, now_ms)   # 0 ok, 3 redacted, 1 rejected
    """
    outcome, keys = check_offline(options, now)
    return report(options, outcome, keys, now, frozenset(), out, err)


async def run_with_keyring(
    reactor: KeyringReactor,
    options: VerifyEventOptions,
    *,
    client: Optional[FederationHttpClient] = None,
    store: Optional[KeyStore] = None,
    out: Optional[TextIO] = None,
    err: Optional[TextIO] = None,
) -> int:
    """Check the event through a keyring built from the config, then report.

    Args:
        reactor: the reactor (time, network, the store's threads).
        options: what to check.
        client: the federation client (tests inject a fake); the real one by default.
        store: the store (tests); the configured one, or an in-memory one, by default.
        out: where the report goes (standard output by default).
        err: where the reason of a rejection (or a store or TLS problem) goes
            (standard error by default).

    Returns:
        The exit status: 0, 3 or 1 as the outcome says; 1 also when the store cannot
        be opened or ``federation.ca_file`` cannot be loaded.

    Example::

        code = await run_with_keyring(reactor, options, client=fake)
    """
    config = options.config or parse_config(DEFAULT_QUERY_CONFIG, standalone=False)
    compromised = frozenset(config.key_trust.compromised_keys)
    try:
        fetching = await Fetching.open(reactor, config, store=store, client=client)
        try:
            keyring = Keyring(
                OwnKeys(_NO_OWN_SERVER, [generate_signing_key("unused")]),
                fetching.store,
                fetching.chain,
                reactor,
                compromised_keys=compromised,
                origin_chain=fetching.request_auth_chain,
                fetch_timeout_ms=2 * config.federation.request_timeout_ms + 10_000,
            )
            outcome = await keyring.check_events([options.event], options.room_version)[0]
            checked_at = now_ms(reactor)
            keys = await fetching.store.get_many_server_keys(
                signers_to_look_up(options.event, options.room_version)
            )
        finally:
            await fetching.close()
    except StorageError as e:
        print("keyring-module verify-event: database: %s" % (e,), file=err or sys.stderr)
        return EXIT_REJECTED
    except TLSError as e:
        print("keyring-module verify-event: federation.ca_file: %s" % (e,), file=err or sys.stderr)
        return EXIT_REJECTED
    return report(options, outcome, keys, checked_at, compromised, out, err)


def report(
    options: VerifyEventOptions,
    outcome: EventCheck,
    keys: Mapping[str, Mapping[str, StoredKey]],
    now: int,
    compromised: frozenset[bytes],
    out: Optional[TextIO],
    err: Optional[TextIO],
) -> int:
    """Print the outcome and the checks (re-run with the same keys); the exit status.

    A rejection that none of the re-run checks explains (e.g. the keyring's key fetch
    failed for a reason the keys read afterwards do not show) ends the checks with a
    failed ``keyring`` check carrying the keyring's reason, so the report never shows
    only passed checks for a rejected event.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    checks = event_checks(options.event, options.room_version, keys, now, compromised=compromised)
    unexplained = not any(is_rejection(check) for check in checks)
    if outcome.outcome is EventOutcome.REJECTED and unexplained:
        error = outcome.error
        checks.append(
            {
                "check": "keyring",
                "result": FAILED,
                "reason": outcome.reason.value if outcome.reason is not None else None,
                "detail": error.detail if error is not None else "rejected",
            }
        )
    result = outcome.outcome.value
    reason = outcome.reason.value if outcome.reason is not None else None
    code = _EXIT_STATUS[outcome.outcome]
    event_used = outcome.event_to_use(options.event)
    invite_check = None
    if event_used is not None:
        invite_check = third_party_invite_check(event_used, options.invite_event)
        if invite_check is not None:
            checks.append(invite_check)
    if invite_check is not None and invite_check["result"] == FAILED:
        result, reason, code = EventOutcome.REJECTED.value, invite_check["reason"], EXIT_REJECTED
    if options.as_json:
        print(
            json.dumps({"result": result, "reason": reason, "checks": checks}, indent=2),
            file=out,
        )
    else:
        print_checks(result, reason, checks, out)
    if outcome.error is not None:
        # Event-level reasons (value rules, ids, shape) name no server or key.
        error = outcome.error
        why = str(error) if error.server_name else error.detail
        print("keyring-module verify-event: rejected: %s" % (why,), file=err)
    elif code == EXIT_REJECTED and invite_check is not None:
        print("keyring-module verify-event: rejected: %s" % (invite_check["detail"],), file=err)
    return code


def third_party_invite_check(
    event: Mapping[str, Any], invite_event: Optional[Mapping[str, Any]]
) -> Optional[dict[str, Any]]:
    """The ``third_party_invite`` check of the event going on (the redacted copy, if
    redacted), or None when there is nothing to say: it is no third-party invite and no
    ``--invite-event`` was given.

    A third-party invite needs the room's ``m.room.third_party_invite`` event, which
    only the room's state holds: without ``--invite-event`` the check is ``not_checked``.

    Example:
        >>> third_party_invite_check({"type": "m.room.member", "content":
        ...     {"membership": "invite", "third_party_invite": {}}}, None)["result"]
        'not_checked'
    """
    content = event.get("content")
    is_invite = (
        event.get("type") == "m.room.member"
        and isinstance(content, dict)
        and content.get("membership") == "invite"
        and "third_party_invite" in content
    )
    if not is_invite:
        if invite_event is None:
            return None
        return {
            "check": "third_party_invite",
            "result": NOT_APPLICABLE,
            "detail": "the event is no invite made from a third-party invite",
        }
    if invite_event is None:
        return {
            "check": "third_party_invite",
            "result": NOT_CHECKED,
            "detail": "the room's m.room.third_party_invite event decides: "
            "give it with --invite-event FILE",
        }
    rejection = check_third_party_invite(event, invite_event)
    if rejection is None:
        return {"check": "third_party_invite", "result": PASSED}
    return {
        "check": "third_party_invite",
        "result": FAILED,
        "reason": rejection.reason.value,
        "detail": rejection.detail,
    }
