"""Tests for ``keyring-module query`` (:mod:`keyring_module.cli.query`), in process.

The query logic runs on a ``Clock`` against fake origins and notaries through an injected
``FakeFederationClient``; nothing touches the network or the global reactor.
"""

import io
import json
import os
import sys
from typing import Any, Optional

import attr
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from unpaddedbase64 import encode_base64

from keyring_module.cli import build_parser, main
from keyring_module.cli.query import (
    QueryOptions,
    QueryUsageError,
    options_from_args,
    run_query,
)
from keyring_module.cli.report import key_report
from keyring_module.model import StoredKey, notary_source
from keyring_module.storage.memory import InMemoryKeyStore
from keyring_module.validation import parse_server_keys_response
from tests.fakes import (
    FakeFederationClient,
    FakeNotaryResource,
    FakeOriginResource,
    HangingResource,
)
from tests.keyring_fixtures import TimeoutClient
from tests.utils import (
    key_id,
    make_signed_server_keys,
    make_trusted_key_server,
    new_signing_key,
    verify_key_base64,
    verify_key_bytes,
)

START_S = 1_700_000_000
DAY_MS = 24 * 60 * 60 * 1000
ORIGIN = "origin.test"
NOTARY = "notary.test"


class QueryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START_S)
        self.origin_key = new_signing_key("o1")
        self.origin = FakeOriginResource(self.origin_key, ORIGIN, self.clock)
        self.origin.valid_for_ms = DAY_MS - 60_000  # "23h 59m" left
        self.notary_key = new_signing_key("n1")
        self.notary = FakeNotaryResource(NOTARY, self.notary_key)
        self.hanging = HangingResource()
        self.outbound = FakeFederationClient(
            {ORIGIN: self.origin, NOTARY: self.notary, "slow.test": self.hanging}
        )
        self.store = InMemoryKeyStore()

    def now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    def query(self, options: QueryOptions, advance_s: float = 0) -> tuple[int, str, str]:
        """Run the query logic and return (exit status, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        d = defer.ensureDeferred(
            run_query(
                self.clock,
                options,
                client=TimeoutClient(self.outbound, self.clock),
                store=self.store,
                out=out,
                err=err,
            )
        )
        for _ in range(5):
            self.clock.advance(0)
            self.outbound.flush()
        if advance_s:
            self.clock.advance(advance_s)
        code = self.successResultOf(d)
        return code, out.getvalue(), err.getvalue()

    def via_notary(self, **kw: Any) -> QueryOptions:
        return QueryOptions(ORIGIN, notary=make_trusted_key_server(NOTARY, self.notary_key), **kw)

    def test_direct_success_prints_each_key(self) -> None:
        """A reachable origin: key id, kind, time left, source and signature, exit 0."""
        code, out, err = self.query(QueryOptions(ORIGIN))
        self.assertEqual(code, 0, err)
        self.assertEqual(err, "")
        self.assertIn("Keys of origin.test, fetched from the origin", out)
        self.assertIn("ed25519:o1  current  valid 23h 59m more", out)
        self.assertIn("key: %s" % verify_key_base64(self.origin_key), out)
        self.assertIn("source: origin (fetched now)", out)
        self.assertIn("self-signature: verified", out)
        self.assertIn("Key conflicts: none", out)
        self.assertEqual(len(self.outbound.requests_to(ORIGIN)), 1)

    def test_old_and_expired_keys_are_described(self) -> None:
        """Old keys say when they expired; an expired response says how long ago."""
        old = new_signing_key("old")
        self.origin.body_override = make_signed_server_keys(
            ORIGIN,
            [self.origin_key],
            self.now_ms() - 3 * 3600 * 1000,
            old_keys={key_id(old): (verify_key_bytes(old), self.now_ms() - 2 * DAY_MS)},
        )
        code, out, err = self.query(QueryOptions(ORIGIN))
        self.assertIn("ed25519:o1  current  expired 3h 0m ago", out)
        self.assertIn("ed25519:old  old      old key, expired 2d 0h ago", out)
        self.assertIn("self-signature: n/a", out)
        # Its signature still verifies: exit 0; validity is reported, not judged.
        self.assertEqual(code, 0)

    def test_json_output(self) -> None:
        """--json prints one object with every key's facts."""
        code, out, _ = self.query(QueryOptions(ORIGIN, as_json=True))
        self.assertEqual(code, 0)
        report = json.loads(out)
        self.assertEqual(report["server_name"], ORIGIN)
        self.assertEqual(report["via"], "origin")
        self.assertTrue(report["ok"])
        self.assertIsNone(report["error"])
        self.assertEqual(report["conflicts"], [])
        (key,) = report["keys"]
        self.assertEqual(key["key_id"], "ed25519:o1")
        self.assertEqual(key["kind"], "current")
        self.assertEqual(key["key"], verify_key_base64(self.origin_key))
        self.assertEqual(key["valid_until_ts"], self.now_ms() + DAY_MS - 60_000)
        self.assertEqual(key["valid_for_ms"], DAY_MS - 60_000)
        self.assertEqual(key["source"], "origin")
        self.assertTrue(key["fetched_now"])
        self.assertEqual(key["self_signature"], "verified")
        self.assertIsNone(key["notary_signature"])

    def test_unreachable_origin_fails_with_reason(self) -> None:
        """An origin that cannot be reached exits 1 and says why."""
        code, out, err = self.query(QueryOptions("nowhere.test"))
        self.assertEqual(code, 1)
        self.assertIn("could not reach nowhere.test: connect_error", err)
        self.assertIn("(no keys)", out)

    def test_timeout_is_reported(self) -> None:
        """An origin that never answers fails with "timeout" after the request timeout."""
        code, _, err = self.query(QueryOptions("slow.test"), advance_s=10)
        self.assertEqual(code, 1)
        self.assertIn("could not reach slow.test: timeout", err)

    def test_invalid_response_is_reported(self) -> None:
        """A response with a bad self-signature exits 1 naming the problem."""
        body = make_signed_server_keys(ORIGIN, [self.origin_key], self.now_ms() + DAY_MS)
        body["signatures"][ORIGIN]["ed25519:o1"] = encode_base64(b"\0" * 64)
        self.origin.body_override = body
        code, _, err = self.query(QueryOptions(ORIGIN, as_json=True))
        self.assertEqual(code, 1)
        self.assertIn("invalid key response from origin.test", err)

    def test_via_notary(self) -> None:
        """--notary asks only the notary and checks its signature as well."""
        self.notary.entries[ORIGIN] = [
            make_signed_server_keys(ORIGIN, [self.origin_key], self.now_ms() + DAY_MS)
        ]
        code, out, err = self.query(self.via_notary())
        self.assertEqual(code, 0, err)
        self.assertIn("fetched from notary notary.test", out)
        self.assertIn("source: notary:notary.test (fetched now)", out)
        self.assertIn("self-signature: verified", out)
        self.assertIn("notary signature: verified", out)
        self.assertEqual(self.outbound.requests_to(ORIGIN), [])
        code, out, _ = self.query(self.via_notary(as_json=True))
        report = json.loads(out)
        self.assertEqual(report["via"], notary_source(NOTARY))
        self.assertEqual(report["keys"][0]["notary_signature"], "verified")

    def test_notary_signed_by_an_untrusted_key_fails(self) -> None:
        """A notary answer not signed by its configured key yields no verified key."""
        self.notary.entries[ORIGIN] = [
            make_signed_server_keys(ORIGIN, [self.origin_key], self.now_ms() + DAY_MS)
        ]
        self.notary.signing_key = new_signing_key("n1")  # not the configured key
        code, _, err = self.query(self.via_notary())
        self.assertEqual(code, 1)
        self.assertIn("notary notary.test returned no valid keys for origin.test", err)

    def test_conflicts_are_listed(self) -> None:
        """A key id seen earlier with other bytes is reported as a conflict."""
        earlier = new_signing_key("o1")  # same key id, other key
        response = parse_server_keys_response(
            make_signed_server_keys(ORIGIN, [earlier], self.now_ms() + DAY_MS), ORIGIN
        )
        self.successResultOf(
            defer.ensureDeferred(
                self.store.store_server_keys(response, notary_source("old.test"), 1000)
            )
        )
        code, out, err = self.query(QueryOptions(ORIGIN))
        self.assertIn("Key conflicts:", out)
        self.assertIn(
            "ed25519:o1: kept %s from notary:old.test, rejected %s from origin"
            % (verify_key_base64(earlier), verify_key_base64(self.origin_key)),
            out,
        )
        self.assertIn("source: notary:old.test (stored earlier)", out)
        # The key we hold is not the one the origin publishes now: nothing verified.
        self.assertEqual(code, 1)
        self.assertIn("only keys stored earlier are shown", err)


class ArgumentTests(SynchronousTestCase):
    def parse(self, *argv: str) -> Any:
        return build_parser().parse_args(["query", *argv])

    def write_config(self, trusted: list[dict[str, Any]]) -> str:
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "config.yaml")
        with open(path, "w") as f:
            json.dump(
                {
                    "signing_key_path": "key",
                    "database": {"path": "keys.db"},
                    "trusted_key_servers": trusted,
                },
                f,
            )
        return path

    def test_notary_needs_a_config(self) -> None:
        """--notary without --config is refused with a helpful message."""
        with self.assertRaises(QueryUsageError) as cm:
            options_from_args(self.parse("example.org", "--notary", "matrix.org"))
        self.assertIn("--notary needs --config", str(cm.exception))

    def test_notary_must_be_trusted(self) -> None:
        """--notary must name one of the config's trusted_key_servers."""
        key = new_signing_key("n1")
        path = self.write_config(
            [{"server_name": NOTARY, "verify_keys": {"ed25519:n1": verify_key_base64(key)}}]
        )
        with self.assertRaises(QueryUsageError) as cm:
            options_from_args(self.parse("example.org", "--config", path, "--notary", "x.test"))
        self.assertIn("'x.test' is not in trusted_key_servers", str(cm.exception))
        self.assertIn("configured: notary.test", str(cm.exception))
        options = options_from_args(
            self.parse("example.org", "--config", path, "--notary", NOTARY, "--json")
        )
        assert options.notary is not None
        self.assertEqual(options.notary.server_name, NOTARY)
        self.assertEqual(options.config_dir, os.path.dirname(os.path.abspath(path)))
        self.assertTrue(options.as_json)

    def test_invalid_server_name(self) -> None:
        """A server name that is not valid is a usage error."""
        with self.assertRaises(QueryUsageError):
            options_from_args(self.parse("not a name"))

    def test_main_exit_status_for_usage_errors(self) -> None:
        """The command exits 2 on usage errors, printing the reason, without running."""
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        self.assertEqual(main(["query", "example.org", "--notary", "matrix.org"]), 2)
        self.assertIn("--notary needs --config", err.getvalue())
        with self.assertRaises(SystemExit) as cm:
            main(["query"])
        self.assertEqual(cm.exception.code, 2)

    def test_defaults(self) -> None:
        """Without options: direct from the origin, text output, no config."""
        options = options_from_args(self.parse("example.org"))
        self.assertEqual(
            attr.astuple(options, recurse=False), ("example.org", None, None, None, False)
        )


class KeyReportTests(SynchronousTestCase):
    NOW = START_S * 1000

    def stored(self, valid_until_ts: int, expired_ts: Optional[int] = None) -> StoredKey:
        raw = verify_key_bytes(new_signing_key("r1"))
        return StoredKey(ORIGIN, "ed25519:r1", raw, valid_until_ts, expired_ts, 0, "origin", "")

    def test_validity_is_capped_at_seven_days(self) -> None:
        """A current key published for longer than 7 days is reported valid for 7 days."""
        report = key_report(self.stored(self.NOW + 30 * DAY_MS), self.NOW, True, "verified", None)
        self.assertEqual(report["valid_for_ms"], 7 * DAY_MS)
        self.assertIn("valid 7d 0h more (capped at 7 days)", report["validity"])
        at_cap = key_report(self.stored(self.NOW + 7 * DAY_MS), self.NOW, True, "verified", None)
        self.assertEqual(at_cap["valid_for_ms"], 7 * DAY_MS)
        self.assertNotIn("capped", at_cap["validity"])

    def test_expired_and_old_keys(self) -> None:
        """A lapsed current key reads "expired ... ago"; an old key counts to its expired_ts."""
        lapsed = key_report(self.stored(self.NOW - 5_000), self.NOW, False, "verified", None)
        self.assertEqual(lapsed["valid_for_ms"], -5_000)
        self.assertIn("expired 5s ago", lapsed["validity"])
        old = key_report(self.stored(0, expired_ts=self.NOW + 60_000), self.NOW, False, "x", None)
        self.assertEqual(old["kind"], "old")
        self.assertIsNone(old["valid_until_ts"])
        self.assertEqual(old["valid_for_ms"], 60_000)
        self.assertIn("expires in 1m 0s", old["validity"])
