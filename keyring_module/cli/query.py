"""``keyring-module query``: fetch a server's signing keys, verify them, print them.

::

    keyring-module query example.org                       # direct from the origin
    keyring-module query example.org --config notary.yaml --notary matrix.org
    keyring-module query example.org --json

The keys are fetched through the same machinery the keyring uses (the federation
client, the per-origin limiter, :class:`~keyring_module.fetchers.chain.KeyFetcherChain`
with the origin or notary fetcher, and response validation), always fresh
(``use_cache=False``). Without ``--config`` the defaults apply: an in-memory store, real
TLS verification and the default IP denylist. With ``--config`` the configured
database is used, so conflicts recorded earlier are shown too.

Example output::

    Keys of example.org, fetched from the origin
      ed25519:a_AbCd  current  valid 23h 59m more (valid_until_ts 1700086400000)
          key: l8Hft5qXKn1vfHrg3p4+W8gELQVo8N13JkluMfmn2sQ
          source: origin (fetched now)
          self-signature: verified
    Key conflicts: none

Exit status: 0 when at least one key was fetched now and its signatures verified;
1 otherwise, with the reason on stderr (e.g. ``could not reach example.org: timeout``);
2 for usage errors.
"""

import argparse
import json
import os
import sys
from typing import Any, Callable, Optional, TextIO

import attr
from twisted.internet import task

from keyring_module.cli.report import conflict_report, key_report, print_report
from keyring_module.clock import now_ms
from keyring_module.config import (
    FederationConfig,
    KeyringConfig,
    RateLimitConfig,
    TrustedKeyServer,
    load_config_file,
    parse_config,
)
from keyring_module.encoding import decode_base64_tolerant
from keyring_module.errors import ConfigError, KeyVerificationError
from keyring_module.fetchers.base import KeyRequest
from keyring_module.fetchers.chain import NOTARIES, ORIGIN, KeyFetcherChain
from keyring_module.fetchers.notary_client import NotaryKeyFetcher
from keyring_module.fetchers.origin import OriginKeyFetcher
from keyring_module.http import FederationHttpClient, FederationRequestError
from keyring_module.model import SOURCE_ORIGIN, StoredKey, notary_source
from keyring_module.ratelimit import OriginRateLimiter
from keyring_module.servername import is_valid_server_name
from keyring_module.storage import KeyStore
from keyring_module.validation import InvalidKeyResponseError, parse_server_keys_response
from keyring_module.verify import (
    verify_signed_json_with_keys,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class QueryUsageError(Exception):
    """The arguments cannot work together (exit status 2)."""


@attr.s(auto_attribs=True, frozen=True, slots=True)
class QueryOptions:
    """What to query and how.

    Attributes:
        server_name: the server whose keys are wanted.
        config: the parsed config, or None for the defaults.
        config_dir: the config file's directory (relative paths), or None.
        notary: the trusted notary to ask instead of the origin, or None.
        as_json: print one JSON object instead of text.
    """

    server_name: str
    config: Optional[KeyringConfig] = None
    config_dir: Optional[str] = None
    notary: Optional[TrustedKeyServer] = None
    as_json: bool = False


def add_query_parser(sub: Any, cmd: Callable[[argparse.Namespace], int]) -> None:
    """Register the ``query`` sub-command on ``sub`` (argparse sub-parsers).

    Args:
        sub: the object ``add_subparsers()`` returned.
        cmd: the function to run for it (:func:`cmd_query`).
    """
    query = sub.add_parser("query", help="fetch, verify and print a server's signing keys")
    query.add_argument("server_name", metavar="SERVER_NAME", help="e.g. matrix.org")
    query.add_argument("--config", "-c", help="YAML config (store, federation, notaries)")
    query.add_argument(
        "--notary",
        metavar="NAME",
        help="ask this notary (one of the config's trusted_key_servers) instead of the origin",
    )
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
    config: Optional[KeyringConfig] = None
    config_dir: Optional[str] = None
    if args.config:
        config = _load_config(args.config)
        config_dir = os.path.dirname(os.path.abspath(args.config))
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
    return QueryOptions(server_name, config, config_dir, notary, bool(args.json))


def _load_config(path: str) -> KeyringConfig:
    """Load a standalone config, or any config whose listeners/server_name are missing
    (e.g. a Synapse module's block): the query needs neither."""
    try:
        return load_config_file(path, standalone=True)
    except ConfigError as e:
        if e.path not in (("server_name",), ("listeners",)):
            raise
        first = e
    import yaml

    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    if not isinstance(raw, dict):
        raise first
    raw = {k: v for k, v in raw.items() if k not in ("server_name", "listeners")}
    return parse_config(raw, standalone=False)


def cmd_query(args: argparse.Namespace) -> int:
    """Run ``keyring-module query`` on the real reactor; returns the exit status."""
    try:
        options = options_from_args(args)
    except QueryUsageError as e:
        print("keyring-module query: %s" % (e,), file=sys.stderr)
        return EXIT_USAGE

    async def main(reactor: Any) -> None:
        code = await run_query(reactor, options)
        if code:
            raise SystemExit(code)

    try:
        task.react(main)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_FAILED
    return EXIT_OK  # pragma: no cover (react always exits)


class RecordingClient:
    """Passes requests to a federation client and remembers how each one ended.

    The fetchers log failures but return nothing about them; the command needs the
    reason to print it.
    """

    def __init__(self, client: FederationHttpClient) -> None:
        self._client = client
        self.outcomes: dict[tuple[str, str], object] = {}

    async def get_json(self, server_name: str, path: str, timeout_ms: Optional[int] = None) -> Any:
        return await self._record(
            ("GET", server_name), self._client.get_json(server_name, path, timeout_ms)
        )

    async def post_json(
        self, server_name: str, path: str, body: object, timeout_ms: Optional[int] = None
    ) -> Any:
        return await self._record(
            ("POST", server_name), self._client.post_json(server_name, path, body, timeout_ms)
        )

    async def _record(self, key: tuple[str, str], request: Any) -> Any:
        try:
            result = await request
        except FederationRequestError as e:
            self.outcomes[key] = e
            raise
        self.outcomes[key] = result
        return result


async def run_query(
    reactor: Any,
    options: QueryOptions,
    *,
    client: Optional[FederationHttpClient] = None,
    store: Optional[KeyStore] = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Fetch, verify and print ``options.server_name``'s keys.

    Args:
        reactor: the reactor (time, network).
        options: what to query.
        client: the federation client (tests inject a fake); the real one by default.
        store: the store (tests); the configured one, or an in-memory one, by default.
        out: where the report goes.
        err: where the failure reason goes.

    Returns:
        The exit status: 0 if at least one key was fetched now and verified, else 1.

    Example::

        code = await run_query(reactor, QueryOptions("example.org"), client=fake)
    """
    config = options.config
    own_store = store is None
    own_client = client is None
    if store is None:
        store = await _open_store(reactor, options)
    if client is None:
        from keyring_module.http.client import MatrixFederationClient

        client = MatrixFederationClient(
            reactor, config.federation if config is not None else FederationConfig()
        )
    try:
        report = await _query(reactor, options, client, store)
    finally:
        if own_client:
            close = getattr(client, "close", None)
            if close is not None:
                await close()
        if own_store:
            await store.close()
    if options.as_json:
        print(json.dumps(report, indent=2, sort_keys=True), file=out)
    else:
        print_report(report, out)
    if not report["ok"]:
        print("keyring-module query: %s" % (report["error"],), file=err)
        return EXIT_FAILED
    return EXIT_OK


async def _open_store(reactor: Any, options: QueryOptions) -> KeyStore:
    if options.config is None:
        from keyring_module.storage.memory import InMemoryKeyStore

        return InMemoryKeyStore()
    from keyring_module.server import resolve_path
    from keyring_module.storage import open_key_store

    database = options.config.database
    if database.backend == "sqlite" and options.config_dir is not None:
        database = attr.evolve(database, path=resolve_path(options.config_dir, database.path))
    return await open_key_store(database, reactor, reactor)


async def _query(
    reactor: Any, options: QueryOptions, client: FederationHttpClient, store: KeyStore
) -> dict[str, Any]:
    server_name = options.server_name
    config = options.config
    recorder = RecordingClient(client)
    limiter = OriginRateLimiter(reactor, config.ratelimit if config else RateLimitConfig())
    origin_fetcher = OriginKeyFetcher(recorder, limiter, reactor)
    notary = options.notary
    if notary is None:
        chain = KeyFetcherChain(store, origin_fetcher, None, reactor, order=(ORIGIN,))
        via = SOURCE_ORIGIN
    else:
        notary_fetcher = NotaryKeyFetcher(recorder, [notary], limiter, reactor)
        chain = KeyFetcherChain(store, origin_fetcher, notary_fetcher, reactor, order=(NOTARIES,))
        via = notary_source(notary.server_name)

    start = now_ms(reactor)
    keys = await chain.get_keys([KeyRequest(server_name, frozenset(), start)], use_cache=False)
    now = now_ms(reactor)
    stored = keys.get(server_name, {})
    responses = {r.response_id: r for r in await store.get_server_responses(server_name)}
    notary_entry = _notary_entry(recorder, notary, server_name)

    key_reports = []
    verified = 0
    for key_id in sorted(stored, key=lambda k: (stored[k].expired_ts is not None, k)):
        key = stored[key_id]
        fresh = key.fetched_ts >= start and key.source == via
        self_signature = _self_signature(key, responses.get(key.response_id))
        notary_signature = (
            _notary_signature(notary, notary_entry, key)
            if notary is not None and key.source == via
            else None
        )
        if (
            fresh
            and key.expired_ts is None
            and self_signature == "verified"
            and notary_signature in (None, "verified")
        ):
            verified += 1
        key_reports.append(key_report(key, now, fresh, self_signature, notary_signature))

    conflicts = await store.get_conflicts(server_name)
    error = None
    if not verified:
        error = _failure_reason(recorder, server_name, notary, bool(stored))
    return {
        "server_name": server_name,
        "via": via,
        "queried_ts": now,
        "ok": verified > 0,
        "error": error,
        "keys": key_reports,
        "conflicts": [conflict_report(c) for c in conflicts],
    }


def _self_signature(key: StoredKey, response: Any) -> str:
    """Check the origin's signature by ``key`` on the response it came from."""
    if key.expired_ts is not None:
        return "not_applicable"  # old_verify_keys entries carry no signature of their own
    if response is None:
        return "unknown"
    try:
        obj = json.loads(response.json_bytes)
        # Judge the signature only: validity is reported separately.
        verify_signed_json_with_keys(
            obj,
            key.server_name,
            {key.key_id: key},
            0,
            0,
            enforce_validity=False,
        )
    except KeyVerificationError:
        return "invalid"
    except ValueError:
        return "unknown"
    return "verified"


def _notary_entry(
    recorder: RecordingClient, notary: Optional[TrustedKeyServer], server_name: str
) -> list[dict[str, Any]]:
    if notary is None:
        return []
    answer = recorder.outcomes.get(("POST", notary.server_name))
    if not isinstance(answer, dict) or not isinstance(answer.get("server_keys"), list):
        return []
    return [
        entry
        for entry in answer["server_keys"]
        if isinstance(entry, dict) and entry.get("server_name") == server_name
    ]


def _notary_signature(
    notary: Optional[TrustedKeyServer], entries: list[dict[str, Any]], key: StoredKey
) -> str:
    """Check the notary's signature on an answer entry publishing ``key``'s bytes."""
    if notary is None:
        return "unknown"
    notary_keys = {
        key_id: StoredKey(notary.server_name, key_id, raw, 2**62, None, 0, "config", "")
        for key_id, raw in notary.verify_keys.items()
    }
    for entry in entries:
        published = (entry.get("verify_keys") or {}).get(key.key_id) or (
            entry.get("old_verify_keys") or {}
        ).get(key.key_id)
        if not isinstance(published, dict):
            continue
        if decode_base64_tolerant(published.get("key")) != key.verify_key_bytes:
            continue
        try:
            verify_signed_json_with_keys(
                entry, notary.server_name, notary_keys, 0, 0, enforce_validity=False
            )
        except KeyVerificationError:
            continue
        return "verified"
    return "invalid"


def _failure_reason(
    recorder: RecordingClient,
    server_name: str,
    notary: Optional[TrustedKeyServer],
    have_stale: bool,
) -> str:
    stale = "; only keys stored earlier are shown" if have_stale else ""
    if notary is None:
        outcome = recorder.outcomes.get(("GET", server_name))
        target = server_name
    else:
        outcome = recorder.outcomes.get(("POST", notary.server_name))
        target = "notary %s" % (notary.server_name,)
    if outcome is None:
        return "no request was made to %s (refused by the rate limiter?)%s" % (target, stale)
    if isinstance(outcome, FederationRequestError):
        return "could not reach %s: %s (%s)%s" % (target, outcome.outcome, outcome, stale)
    if notary is not None:
        return "%s returned no valid keys for %s%s" % (target, server_name, stale)
    try:
        parse_server_keys_response(outcome, server_name)
    except InvalidKeyResponseError as e:
        return "invalid key response from %s: %s%s" % (server_name, e, stale)
    return "no key of %s could be verified%s" % (server_name, stale)
