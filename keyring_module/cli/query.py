"""``keyring-module query``: fetch a server's signing keys as the keyring would, and show
what each source said.

::

    keyring-module query example.org                          # the configured sources
    keyring-module query example.org --config notary.yaml     # ... of this config
    keyring-module query example.org --config notary.yaml --notary matrix.org
    keyring-module query example.org --direct --json

The keys are fetched through the same wiring the server and the keyring use
(:class:`~keyring_module.wiring.Fetching`): the configured store, federation client,
per-origin limiter and fetcher chain, so ``key_fetch_order`` (falling back to the
notaries), ``trusted_key_servers`` and ``key_trust`` (agreement, direct confirmation,
compromised keys) apply, always fresh (``use_cache=False``); a direct confirmation of
notary-learned keys is waited for and shown, and the keys are read after it. ``--notary NAME`` asks only
that notary, ``--direct`` only the origin; the trust policy still decides what is
stored. Without ``--config`` the defaults apply: an in-memory store, no notaries, real
TLS verification and the default IP denylist.

Exit status: 0 when a source's answer was trusted (stored) now; 1 otherwise, with the
reason on stderr (e.g. ``could not reach example.org: timeout (...)``); 2 for usage
errors. See :mod:`keyring_module.cli.report` for the output.
"""

import argparse
import json
import sys
from typing import Any, Callable, Optional, TextIO, cast

import attr
from twisted.internet import task

from keyring_module.cli.report import build_report, print_report
from keyring_module.clock import KeyringReactor, now_ms
from keyring_module.config import (
    STANDALONE_ONLY_SETTINGS,
    KeyringConfig,
    TrustedKeyServer,
    parse_config,
)
from keyring_module.config_file import load_config_file
from keyring_module.fetchers.trace import FetchTrace
from keyring_module.http import FederationHttpClient, TLSError
from keyring_module.model import FetchPurpose, KeyRequest
from keyring_module.servername import is_valid_server_name
from keyring_module.storage import KeyStore
from keyring_module.storage.errors import StorageError
from keyring_module.wiring import Fetching, FetchSources

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

#: The configuration of a query without ``--config``: the defaults, an in-memory store.
#: (``signing_key_path`` is required by the parser; a query never reads it.)
DEFAULT_QUERY_CONFIG = {"signing_key_path": "unused", "database": {"path": ":memory:"}}


class QueryUsageError(Exception):
    """The arguments cannot work together (exit status 2)."""


@attr.s(auto_attribs=True, frozen=True, slots=True)
class QueryOptions:
    """What to query and how.

    Attributes:
        server_name: the server whose keys are wanted.
        config: the parsed config, or None for the defaults.
        notary: the one trusted notary to ask, or None.
        direct: ask only the origin.
        as_json: print one JSON object instead of text.
    """

    server_name: str
    config: Optional[KeyringConfig] = None
    notary: Optional[TrustedKeyServer] = None
    direct: bool = False
    as_json: bool = False

    def sources(self, config: KeyringConfig) -> FetchSources:
        """The sources to ask: the configured ones unless one was chosen."""
        if self.notary is not None:
            return FetchSources.one_notary(self.notary)
        if self.direct:
            return FetchSources.origin_only()
        return FetchSources.configured(config)


def add_query_parser(sub: Any, cmd: Callable[[argparse.Namespace], int]) -> None:
    """Register the ``query`` sub-command on ``sub`` (argparse sub-parsers).

    Args:
        sub: the object ``add_subparsers()`` returned.
        cmd: the function to run for it (:func:`cmd_query`).
    """
    query = sub.add_parser(
        "query",
        help="fetch a server's signing keys as the keyring would, and show each source's answer",
    )
    query.add_argument("server_name", metavar="SERVER_NAME", help="e.g. matrix.org")
    query.add_argument(
        "--config", "-c", help="YAML config (store, federation, notaries, trust policy)"
    )
    only = query.add_mutually_exclusive_group()
    only.add_argument(
        "--notary",
        metavar="NAME",
        help="ask only this notary (one of the config's trusted_key_servers)",
    )
    only.add_argument("--direct", action="store_true", help="ask only the origin")
    query.add_argument("--json", action="store_true", help="print one JSON object")
    query.set_defaults(func=cmd)


def options_from_args(args: argparse.Namespace) -> QueryOptions:
    """Check the arguments and load the config.

    Raises:
        QueryUsageError: an invalid server name, or ``--notary`` without ``--config`` or
            naming a notary the config does not trust.
        ConfigError: the config file is invalid.
    """
    server_name: str = args.server_name
    if not is_valid_server_name(server_name):
        raise QueryUsageError("%r is not a valid server name" % (server_name,))
    config = load_query_config(args.config) if args.config else None
    notary: Optional[TrustedKeyServer] = None
    if args.notary:
        if config is None:
            raise QueryUsageError(
                "--notary needs --config: the notary must be one of the config's "
                "trusted_key_servers, whose verify_keys are needed to check its signature"
            )
        by_name = {t.server_name: t for t in config.trusted_key_servers}
        notary = by_name.get(args.notary)
        if notary is None:
            raise QueryUsageError(
                "notary %r is not in trusted_key_servers of %s (configured: %s)"
                % (args.notary, args.config, ", ".join(sorted(by_name)) or "none")
            )
    return QueryOptions(server_name, config, notary, bool(args.direct), bool(args.json))


def load_query_config(path: str) -> KeyringConfig:
    """Load a standalone config or a Synapse module's block alike: a query needs none of
    the standalone-only settings (``server_name``, ``listeners``, ``inbound``)."""
    return load_config_file(path, standalone=False, ignore=STANDALONE_ONLY_SETTINGS)


def cmd_query(args: argparse.Namespace) -> int:
    """Run ``keyring-module query`` on the real reactor; returns the exit status."""
    try:
        options = options_from_args(args)
    except QueryUsageError as e:
        print("keyring-module query: %s" % (e,), file=sys.stderr)
        return EXIT_USAGE

    async def main(reactor: Any) -> None:
        code = await run_query(cast(KeyringReactor, reactor), options)
        if code:
            raise SystemExit(code)

    try:
        task.react(main)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_FAILED
    return EXIT_OK  # pragma: no cover (react always exits)


async def run_query(
    reactor: KeyringReactor,
    options: QueryOptions,
    *,
    client: Optional[FederationHttpClient] = None,
    store: Optional[KeyStore] = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Fetch ``options.server_name``'s keys and print what each source said.

    Args:
        reactor: the reactor (time, network, the store's threads).
        options: what to query.
        client: the federation client (tests inject a fake); the real one by default.
        store: the store (tests); the configured one, or an in-memory one, by default.
        out: where the report goes.
        err: where the failure reason goes.

    Returns:
        The exit status: 0 if an answer was trusted now, else 1 (also when the store
        cannot be opened or read, or ``federation.ca_file`` cannot be loaded: one line
        on ``err`` says so, as ``serve`` does).

    Example::

        code = await run_query(reactor, QueryOptions("example.org"), client=fake)
    """
    config = options.config or parse_config(DEFAULT_QUERY_CONFIG, standalone=False)
    sources = options.sources(config)
    server_name = options.server_name
    trace = FetchTrace()
    try:
        fetching = await Fetching.open(reactor, config, store=store, client=client, sources=sources)
        try:
            start = now_ms(reactor)
            await fetching.chain.get_keys(
                # The operator asks: like our own keyring, it may use the reserve.
                [KeyRequest(server_name, None, start, FetchPurpose.OWN)],
                use_cache=False,
                trace=trace,
            )
            # Late answers and a direct confirmation may change them: read them after.
            await fetching.chain.wait_for_background()
            keys = await fetching.store.get_server_keys(server_name)
            conflicts = await fetching.store.get_conflicts(server_name)
        finally:
            await fetching.close()
    except StorageError as e:
        print("keyring-module query: database: %s" % (e,), file=err)
        return EXIT_FAILED
    except TLSError as e:
        print("keyring-module query: federation.ca_file: %s" % (e,), file=err)
        return EXIT_FAILED
    report = build_report(
        server_name,
        keys,
        trace.server(server_name),
        conflicts,
        start,
        now_ms(reactor),
        attr.evolve(config.key_trust, confirm_notary_keys_directly=sources.confirm_directly),
    )
    if options.as_json:
        print(json.dumps(report, indent=2, sort_keys=True), file=out)
    else:
        print_report(report, out)
    if not report["ok"]:
        print("keyring-module query: %s" % (report["error"],), file=err)
        return EXIT_FAILED
    return EXIT_OK
