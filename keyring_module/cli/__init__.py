"""The ``keyring-module`` command.

::

    keyring-module --version                              # keyring-module 0.1.0
    keyring-module serve --config sample_config.yaml      # run the standalone server
    keyring-module serve --config sample_config.yaml --workers 4   # in 4 worker processes
    keyring-module generate-key --output notary.signing.key [--server-name NAME | --config PATH]
    keyring-module check-config --config sample_config.yaml
    keyring-module query example.org [--config PATH] [--notary NAME | --direct] [--json]
    keyring-module verify-event FILE|- --room-version V [--key SERVER KEY_ID BASE64]...
        [--invite-event FILE] [--config PATH] [--json]
    keyring-module keys list [--server S] | show S | conflicts | forget S [KEY_ID]... [--yes]
        --config PATH [--json]

``generate-key`` also prints a ``trusted_key_servers`` entry for the new key (and, with
``--config``, the ``old_signing_keys`` that retire the current ones). ``keys`` reads and
forgets what the configured store holds (:mod:`keyring_module.cli.keys`).

``python -m keyring_module ...`` is the same command.
"""

import argparse
import sys
from typing import Optional, Sequence

from keyring_module import __version__
from keyring_module.config import MAX_WORKERS, KeyringConfig
from keyring_module.config_file import load_config_file
from keyring_module.errors import ConfigError


def _load(path: str) -> KeyringConfig:
    return load_config_file(path, standalone=True)


def _workers(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_WORKERS:
        raise argparse.ArgumentTypeError("expected 1 to %d, got %r" % (MAX_WORKERS, text))
    return value


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the standalone key server until SIGTERM/SIGINT."""
    from keyring_module.logconfig import setup_logging
    from keyring_module.server import run
    from keyring_module.startup_checks import report_problems, startup_problems

    config = _load(args.config)
    problems = startup_problems(config)
    if problems:
        report_problems(problems)
        return 1
    setup_logging(config.logging)
    workers = args.workers if args.workers is not None else config.workers
    if workers > 1:
        import os

        from keyring_module.supervisor import run_supervisor

        return run_supervisor(config, os.path.abspath(args.config), workers)
    return run(config)


def cmd_generate_key(args: argparse.Namespace) -> int:
    """Write a new signing key and print the snippets to paste (:mod:`.generate_key`)."""
    from keyring_module.cli.generate_key import cmd_generate_key as generate

    return generate(args)


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate a config file and run every start-up check ``serve`` runs (files, key
    folder, TLS, CA file, logging config, key ids), without listening."""
    from keyring_module.startup_checks import report_problems, startup_problems, startup_warnings

    config = _load(args.config)
    problems = startup_problems(config)
    report_problems(startup_warnings(config), prog="keyring-module: warning")
    if problems:
        report_problems(problems)
        return 1
    print("%s: OK (server_name %s)" % (args.config, config.server_name))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per action."""
    parser = argparse.ArgumentParser(
        prog="keyring-module",
        description="Matrix server signing keys: publish, notarise, fetch and verify.",
    )
    parser.add_argument("--version", action="version", version="keyring-module %s" % (__version__,))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the standalone key server / notary")
    serve.add_argument("--config", "-c", required=True, help="path to the YAML config file")
    serve.add_argument(
        "--workers",
        type=_workers,
        metavar="N",
        help="processes sharing the listeners (1-%d; overrides the config's workers)"
        % (MAX_WORKERS,),
    )
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate-key", help="write a new signing key file")
    gen.add_argument("--output", "-o", required=True, help="where to write the key")
    from keyring_module.cli.generate_key import add_generate_key_arguments

    add_generate_key_arguments(gen)
    gen.set_defaults(func=cmd_generate_key)

    check = sub.add_parser(
        "check-config", help="run every start-up check of serve on a config file, and exit"
    )
    check.add_argument("--config", "-c", required=True, help="path to the YAML config file")
    check.set_defaults(func=cmd_check_config)

    from keyring_module.cli.query import add_query_parser, cmd_query

    add_query_parser(sub, cmd_query)

    from keyring_module.cli.verify_event import add_verify_event_parser, cmd_verify_event

    add_verify_event_parser(sub, cmd_verify_event)

    from keyring_module.cli.keys import add_keys_parser, cmd_keys

    add_keys_parser(sub, cmd_keys)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``keyring-module`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as e:
        print("keyring-module: %s" % (e,), file=sys.stderr)
        return 1


def console_main() -> None:
    """``sys.exit`` wrapper for the console script."""
    sys.exit(main())
