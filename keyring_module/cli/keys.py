"""``keyring-module keys``: see and forget what the configured store holds.

::

    keyring-module keys list --config C [--server S] [--json]    # stored keys
    keyring-module keys show S --config C [--json]               # keys, responses, conflicts
    keyring-module keys conflicts --config C [--server S] [--json]
    keyring-module keys forget S [KEY_ID...] --config C [--yes] [--json]

``--config`` names the same file ``serve`` (or Synapse's module block) uses; its
``database:`` section says which store (SQLite file or PostgreSQL) is read. Text output
is aligned tables with times in ISO 8601 UTC (:mod:`keyring_module.cli.keys_report`);
``--json`` prints one JSON object instead.

``keys forget`` removes the key rows and every stored response listing them (the rule
is :mod:`keyring_module.storage.forget`), so that the next lookup fetches the keys again.
It shows what it will remove and asks ``[y/N]`` on the terminal unless ``--yes`` is
given; without a terminal and without ``--yes`` it refuses (exit 2). It logs what it
removed through the config's ``logging:`` settings and prints it. Running servers on
the same database are told, as of any key write: they drop the server from their
memory caches at once on PostgreSQL, within ``database.poll_interval`` on SQLite.

Exit status: 0 ok; 1 nothing found (no keys, no such server, no conflicts, no SQLite
file: it is never created here), the forget was declined, or the store failed; 2 usage
errors.
"""

import argparse
import json
import logging
import os
import sys
from typing import Any, Callable, Optional, TextIO

import attr
from twisted.internet import task

from keyring_module.cli.keys_report import (
    CONFLICT_COLUMNS,
    KEY_COLUMNS,
    RESPONSE_COLUMNS,
    SHOW_KEY_COLUMNS,
    JsonDict,
    conflict_json,
    forgotten_json,
    format_table,
    key_json,
    response_json,
)
from keyring_module.clock import now_ms
from keyring_module.config import STANDALONE_ONLY_SETTINGS, KeyringConfig
from keyring_module.config_file import load_config_file
from keyring_module.model import KeyConflict
from keyring_module.servername import is_valid_server_name
from keyring_module.storage import KeyStore, open_key_store
from keyring_module.storage.errors import StorageError
from keyring_module.storage.forget import ForgottenKeys

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2


class KeysUsageError(Exception):
    """The arguments cannot work (exit status 2)."""


@attr.s(auto_attribs=True, frozen=True, slots=True)
class KeysOptions:
    """One ``keys`` command.

    Attributes:
        action: ``list``, ``show``, ``conflicts`` or ``forget``.
        server_name: the server (``show``/``forget``, or ``--server`` of the others).
        key_ids: the key ids to forget (empty: all of the server's).
        yes: forget without asking.
        as_json: print one JSON object.
    """

    action: str
    server_name: Optional[str] = None
    key_ids: tuple[str, ...] = ()
    yes: bool = False
    as_json: bool = False


def add_keys_parser(sub: Any, cmd: Callable[[argparse.Namespace], int]) -> None:
    """Register ``keys`` and its actions on ``sub`` (argparse sub-parsers).

    Args:
        sub: the object ``add_subparsers()`` returned.
        cmd: the function to run for each action (:func:`cmd_keys`).
    """
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", "-c", required=True, help="YAML config whose database: holds the keys"
    )
    common.add_argument("--json", action="store_true", help="print one JSON object")
    keys = sub.add_parser("keys", help="see or forget the keys the store holds")
    actions = keys.add_subparsers(dest="keys_action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", parents=[common], help="list stored keys")
    listing.add_argument("--server", metavar="S", help="only this server's keys")
    show = actions.add_parser("show", parents=[common], help="everything held about one server")
    show.add_argument("server", metavar="S", help="e.g. matrix.org")
    conflicts = actions.add_parser("conflicts", parents=[common], help="recorded key conflicts")
    conflicts.add_argument("--server", metavar="S", help="only this server's conflicts")
    forget = actions.add_parser(
        "forget", parents=[common], help="remove a server's keys so they are fetched again"
    )
    forget.add_argument("server", metavar="S", help="e.g. matrix.org")
    forget.add_argument("key_ids", metavar="KEY_ID", nargs="*", help="only these key ids")
    forget.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    keys.set_defaults(func=cmd)


def load_keys_config(path: str) -> KeyringConfig:
    """Load a standalone config or a Synapse module's block alike (only ``database:``
    matters here)."""
    return load_config_file(path, standalone=False, ignore=STANDALONE_ONLY_SETTINGS)


def options_from_args(args: argparse.Namespace) -> KeysOptions:
    """Check the arguments (before the config is read).

    Raises:
        KeysUsageError: an invalid server name.
    """
    server_name = getattr(args, "server", None)
    if server_name is not None and not is_valid_server_name(server_name):
        raise KeysUsageError("%r is not a valid server name" % (server_name,))
    return KeysOptions(
        action=args.keys_action,
        server_name=server_name,
        key_ids=tuple(getattr(args, "key_ids", ()) or ()),
        yes=bool(getattr(args, "yes", False)),
        as_json=bool(args.json),
    )


def cmd_keys(args: argparse.Namespace) -> int:
    """Run one ``keyring-module keys`` action on the real reactor; returns the exit status."""
    from keyring_module.logconfig import setup_logging

    try:
        options = options_from_args(args)
    except KeysUsageError as e:
        print("keyring-module keys: %s" % (e,), file=sys.stderr)
        return EXIT_USAGE
    config = load_keys_config(args.config)
    if options.action == "forget" and not options.yes and not sys.stdin.isatty():
        return refuse_without_terminal(sys.stderr)
    database = config.database
    if database.backend == "sqlite" and database.path != ":memory:":
        if not os.path.exists(database.path):
            print(
                "keyring-module keys: database.path: %s does not exist (no keys stored "
                "yet, or not the config the server uses)" % (database.path,),
                file=sys.stderr,
            )
            return EXIT_NOT_FOUND
    if options.action == "forget":
        setup_logging(config.logging)  # what is removed goes to the operator's log
    else:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    async def main(reactor: Any) -> None:
        code = await open_and_run(options, config, reactor)
        if code:
            raise SystemExit(code)

    try:
        task.react(main)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_NOT_FOUND
    return EXIT_OK  # pragma: no cover (react always exits)


async def open_and_run(options: KeysOptions, config: KeyringConfig, reactor: Any) -> int:
    """Open the configured store, run the action, close the store; the exit status."""
    try:
        store = await open_key_store(config.database, reactor, reactor)
    except StorageError as e:
        print("keyring-module keys: database: %s" % (e,), file=sys.stderr)
        return EXIT_NOT_FOUND
    try:
        return await run_keys(options, store, now_ms(reactor))
    finally:
        await store.close()


def refuse_without_terminal(err: TextIO) -> int:
    """Say why a forget without ``--yes`` cannot ask; returns the usage exit status."""
    print(
        "keyring-module keys forget: standard input is not a terminal, so it cannot ask "
        "for confirmation; add --yes to forget without asking",
        file=err,
    )
    return EXIT_USAGE


async def run_keys(
    options: KeysOptions,
    store: KeyStore,
    now: int,
    *,
    out: Optional[TextIO] = None,
    err: Optional[TextIO] = None,
    stdin: Optional[TextIO] = None,
) -> int:
    """Run one action against ``store`` and print the result.

    Args:
        options: the action and its arguments.
        store: the open store.
        now: the time in ms (for ages and "(past)" marks).
        out: where the result goes (standard output by default).
        err: where problems, prompts and "nothing found" go (standard error).
        stdin: where a forget reads its confirmation (standard input).

    Returns:
        The exit status (see the module docstring); a store failure is one line on
        ``err`` and 1.

    Example::

        code = await run_keys(KeysOptions("list"), InMemoryKeyStore(), 0)
    """
    out, err, stdin = out or sys.stdout, err or sys.stderr, stdin or sys.stdin
    try:
        if options.action == "list":
            return await _list(options, store, now, out, err)
        if options.action == "show":
            return await _show(options, store, now, out, err)
        if options.action == "conflicts":
            return await _conflicts(options, store, out, err)
        if options.action == "forget":
            return await _forget(options, store, out, err, stdin)
    except StorageError as e:
        print("keyring-module keys: database: %s" % (e,), file=err)
        return EXIT_NOT_FOUND
    raise ValueError("unknown keys action %r" % (options.action,))


def _print_json(value: JsonDict, out: TextIO) -> None:
    print(json.dumps(value, indent=2, sort_keys=True), file=out)


async def _server_names(
    options: KeysOptions, store: KeyStore, *, conflicts_only: bool = False
) -> list[str]:
    if options.server_name is not None:
        return [options.server_name]
    return await store.list_server_names(conflicts_only=conflicts_only)


async def _list(options: KeysOptions, store: KeyStore, now: int, out: TextIO, err: TextIO) -> int:
    found = await store.get_many_server_keys(await _server_names(options, store))
    rows = [
        key_json(found[name][key_id]) for name in sorted(found) for key_id in sorted(found[name])
    ]
    if options.as_json:
        _print_json({"keys": rows}, out)
    elif rows:
        print(format_table(KEY_COLUMNS, rows, now), file=out)
    if not rows:
        what = " for %s" % options.server_name if options.server_name else ""
        print("keyring-module keys: no keys stored%s" % (what,), file=err)
        return EXIT_NOT_FOUND
    return EXIT_OK


async def _show(options: KeysOptions, store: KeyStore, now: int, out: TextIO, err: TextIO) -> int:
    server_name = options.server_name
    assert server_name is not None  # the parser requires it
    keys = await store.get_server_keys(server_name)
    responses = await store.get_server_responses(server_name)
    conflicts = await store.get_conflicts(server_name)
    key_rows = [key_json(keys[key_id]) for key_id in sorted(keys)]
    response_rows = [response_json(r, now) for r in responses]
    conflict_rows = [conflict_json(c) for c in conflicts]
    report = {
        "server_name": server_name,
        "keys": key_rows,
        "responses": response_rows,
        "conflicts": conflict_rows,
    }
    if options.as_json:
        _print_json(report, out)
    else:
        print("Server %s" % (server_name,), file=out)
        sections = (
            ("Keys", SHOW_KEY_COLUMNS, key_rows),
            ("Stored responses (what the notary serves)", RESPONSE_COLUMNS, response_rows),
            ("Conflicts", CONFLICT_COLUMNS[1:], conflict_rows),
        )
        for title, columns, rows in sections:
            print("\n%s: %s" % (title, len(rows) or "none"), file=out)
            if rows:
                print(_indent(format_table(columns, rows, now)), file=out)
    if not (keys or responses or conflicts):
        print("keyring-module keys: nothing stored for %s" % (server_name,), file=err)
        return EXIT_NOT_FOUND
    return EXIT_OK


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


async def _conflicts(options: KeysOptions, store: KeyStore, out: TextIO, err: TextIO) -> int:
    found: list[KeyConflict] = []
    for server_name in await _server_names(options, store, conflicts_only=True):
        found.extend(await store.get_conflicts(server_name))
    rows = [conflict_json(c) for c in found]
    if options.as_json:
        _print_json({"conflicts": rows}, out)
    elif rows:
        print(format_table(CONFLICT_COLUMNS, rows), file=out)
    if not rows:
        print("keyring-module keys: no conflicts recorded", file=err)
        return EXIT_NOT_FOUND
    return EXIT_OK


async def _forget(
    options: KeysOptions, store: KeyStore, out: TextIO, err: TextIO, stdin: TextIO
) -> int:
    server_name = options.server_name
    assert server_name is not None  # the parser requires it
    key_ids = options.key_ids or None
    if not options.yes and not stdin.isatty():
        return refuse_without_terminal(err)
    held = await store.get_server_keys(server_name, key_ids)
    responses = await store.get_server_responses(server_name)
    if not held and (key_ids is not None or not responses):
        what = " ".join(options.key_ids) or "no keys"
        print("keyring-module keys: nothing stored for %s (%s)" % (server_name, what), file=err)
        if options.as_json:  # a script reading stdout gets a document either way
            _print_json(forgotten_json(ForgottenKeys(server_name)), out)
        return EXIT_NOT_FOUND
    if not options.yes:
        print(
            "Forget %s of %s (and the stored responses listing them or no longer "
            "used)? [y/N] " % (", ".join(sorted(held)) or "the stored responses", server_name),
            end="",
            file=err,
        )
        err.flush()
        if stdin.readline().strip().lower() not in ("y", "yes"):
            print("keyring-module keys: nothing removed", file=err)
            if options.as_json:
                _print_json(forgotten_json(ForgottenKeys(server_name)), out)
            return EXIT_NOT_FOUND
    forgotten = await store.forget_server_keys(server_name, key_ids)
    if options.as_json:
        _print_json(forgotten_json(forgotten), out)
    else:
        print(
            "Removed from the store for %s: key rows [%s]; stored responses [%s]"
            % (server_name, ", ".join(forgotten.key_ids), ", ".join(forgotten.response_ids)),
            file=out,
        )
        if forgotten:
            print(
                "Servers running on this database drop their cached copy (at once on "
                "PostgreSQL, within database.poll_interval on SQLite) and fetch them again.",
                file=out,
            )
    return EXIT_OK if forgotten else EXIT_NOT_FOUND
