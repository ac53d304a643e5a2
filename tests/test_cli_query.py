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
from signedjson.types import SigningKey
from twisted.internet import defer
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
from keyring_module.config import KeyringConfig, parse_config
from keyring_module.model import StoredKey, notary_source
from keyring_module.storage.bounds import StoreLimits
from keyring_module.storage.errors import StorageUnavailableError
from keyring_module.storage.memory import InMemoryKeyStore
from keyring_module.validation import parse_server_keys_response
from tests.fake_reactors import FakeReactor
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
        self.clock = FakeReactor()
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

    def config(self, **raw: Any) -> KeyringConfig:
        """A module-style config trusting the fake notary, with ``raw`` on top."""
        trusted = [
            {
                "server_name": NOTARY,
                "verify_keys": {"ed25519:n1": verify_key_base64(self.notary_key)},
            }
        ]
        return parse_config(
            {"signing_key_path": "unused", "trusted_key_servers": trusted, **raw},
            standalone=False,
        )

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
            for _ in range(5):
                self.clock.advance(0)
                self.outbound.flush()
        code = self.successResultOf(d)
        return code, out.getvalue(), err.getvalue()

    def json_query(self, options: QueryOptions) -> tuple[int, dict[str, Any]]:
        code, out, _ = self.query(attr.evolve(options, as_json=True))
        report: dict[str, Any] = json.loads(out)
        return code, report

    def via_notary(self, **kw: Any) -> QueryOptions:
        return QueryOptions(ORIGIN, notary=make_trusted_key_server(NOTARY, self.notary_key), **kw)

    def notary_knows_origin(self, signing_key: Optional[SigningKey] = None) -> None:
        """The notary serves the origin's keys (or a lie: other keys, signed by them)."""
        self.notary.entries[ORIGIN] = [
            make_signed_server_keys(
                ORIGIN, [signing_key or self.origin_key], self.now_ms() + DAY_MS
            )
        ]

    def test_direct_success_prints_each_key(self) -> None:
        """A reachable origin: key id, kind, time left, source and signature, exit 0."""
        code, out, err = self.query(QueryOptions(ORIGIN))
        self.assertEqual(code, 0, err)
        self.assertEqual(err, "")
        self.assertIn("Keys of origin.test, fetched from the origin\n", out)
        self.assertIn("  origin: answered; used", out)
        self.assertIn("ed25519:o1  current  valid 23h 59m more", out)
        self.assertIn("key: %s" % verify_key_base64(self.origin_key), out)
        self.assertIn("source: origin (fetched now)", out)
        self.assertIn("answered by: origin", out)
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
        # The answer verified and was stored: exit 0; validity is reported, not judged.
        self.assertEqual(code, 0)

    def test_json_output(self) -> None:
        """--json prints one object with every source's outcome and every key's facts."""
        code, report = self.json_query(QueryOptions(ORIGIN))
        self.assertEqual(code, 0)
        self.assertEqual(report["server_name"], ORIGIN)
        self.assertEqual(report["asked"], ["origin"])
        self.assertEqual(
            report["sources"], [{"source": "origin", "outcome": "used", "detail": "answered; used"}]
        )
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
        self.assertEqual(key["answered_by"], ["origin"])
        self.assertEqual(key["self_signature"], "verified")
        self.assertIsNone(key["notary_signature"])
        self.assertFalse(key["compromised"])

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
        """--notary asks only the notary and says its signature was checked as well."""
        self.notary_knows_origin()
        code, out, err = self.query(self.via_notary(config=self.config()))
        self.assertEqual(code, 0, err)
        self.assertIn("fetched from notary notary.test\n", out)
        self.assertIn("  notary:notary.test: answered; used", out)
        self.assertIn("source: notary:notary.test (fetched now)", out)
        self.assertIn("self-signature: verified", out)
        self.assertIn("notary signature: verified", out)
        self.assertEqual(self.outbound.requests_to(ORIGIN), [])
        code, report = self.json_query(self.via_notary(config=self.config()))
        self.assertEqual(report["asked"], [notary_source(NOTARY)])
        self.assertEqual(report["keys"][0]["notary_signature"], "verified")
        self.assertEqual(self.outbound.requests_to(ORIGIN), [])

    def test_notary_signed_by_an_untrusted_key_fails(self) -> None:
        """A notary answer not signed by its configured key yields no trusted answer."""
        self.notary_knows_origin()
        self.notary.signing_key = new_signing_key("n1")  # not the configured key
        code, _, err = self.query(self.via_notary(config=self.config()))
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
        self.assertIn("origin: answered; not used (not trusted: key ed25519:o1 conflicts", out)
        # The key we hold is not the one the origin publishes now: nothing trusted.
        self.assertEqual(code, 1)
        self.assertIn("no answer was used", err)
        self.assertIn("only keys stored earlier are shown", err)

    def test_falls_back_to_the_configured_notary(self) -> None:
        """With the origin down, the configured notary is asked, and its answer is used."""
        self.origin.code = 500
        self.notary_knows_origin()
        code, report = self.json_query(QueryOptions(ORIGIN, self.config()))
        self.assertEqual(code, 0, report["error"])
        self.assertEqual(report["asked"], ["origin", notary_source(NOTARY)])
        self.assertEqual(
            [(s["source"], s["outcome"]) for s in report["sources"]],
            [("origin", "failed"), (notary_source(NOTARY), "used")],
        )
        self.assertIn("could not reach origin.test: http_error", report["sources"][0]["detail"])
        (key,) = report["keys"]
        self.assertEqual(key["source"], notary_source(NOTARY))
        self.assertEqual(key["answered_by"], [notary_source(NOTARY)])
        self.assertEqual(key["notary_signature"], "verified")
        self.assertEqual(len(self.notary.bodies), 1)

    def test_notaries_first_when_configured(self) -> None:
        """key_fetch_order [notaries, origin] asks the notary first; the origin not at all."""
        self.notary_knows_origin()
        config = self.config(key_fetch_order=["notaries", "origin"])
        code, report = self.json_query(QueryOptions(ORIGIN, config))
        self.assertEqual(code, 0)
        self.assertEqual(report["asked"], [notary_source(NOTARY)])
        self.assertEqual(self.outbound.requests_to(ORIGIN), [])

    def test_direct_asks_only_the_origin(self) -> None:
        """--direct never asks the configured notaries, even when the origin fails."""
        self.origin.code = 500
        self.notary_knows_origin()
        code, report = self.json_query(QueryOptions(ORIGIN, self.config(), direct=True))
        self.assertEqual(code, 1)
        self.assertEqual(report["asked"], ["origin"])
        self.assertEqual(self.notary.bodies, [])
        self.assertIn("could not reach origin.test: http_error", report["error"])

    def test_two_agreeing_sources_are_required(self) -> None:
        """min_agreeing_sources 2: origin and notary agreeing is enough; both are named."""
        self.notary_knows_origin()
        config = self.config(key_trust={"min_agreeing_sources": 2})
        code, report = self.json_query(QueryOptions(ORIGIN, config))
        self.assertEqual(code, 0, report["error"])
        self.assertEqual(report["keys"][0]["answered_by"], ["origin", notary_source(NOTARY)])
        self.assertEqual(sorted(s["outcome"] for s in report["sources"]), ["used", "used"])

    def test_one_source_is_not_enough_for_two(self) -> None:
        """min_agreeing_sources 2: a lying notary means no key is trusted, and the
        disagreement is reported as a conflict; the origin alone is not enough either."""
        self.notary_knows_origin(new_signing_key("o1"))  # same key id, other key
        config = self.config(key_trust={"min_agreeing_sources": 2})
        code, report = self.json_query(QueryOptions(ORIGIN, config))
        self.assertEqual(code, 1)
        self.assertEqual(report["keys"], [])
        self.assertIn("no answer was used", report["error"])
        self.assertIn("1 of 2 agreeing sources", report["error"])
        self.assertEqual([c["key_id"] for c in report["conflicts"]], ["ed25519:o1"])
        self.assertEqual(sorted(s["outcome"] for s in report["sources"]), ["not_used", "not_used"])

    def test_compromised_key_is_never_ok(self) -> None:
        """A key listed in key_trust.compromised_keys is flagged, and cannot make the
        query succeed."""
        config = self.config(key_trust={"compromised_keys": [verify_key_base64(self.origin_key)]})
        code, out, err = self.query(QueryOptions(ORIGIN, config))
        self.assertEqual(code, 1)
        self.assertIn("COMPROMISED", out)
        self.assertIn("compromised", err)

    def test_a_later_stored_copy_of_the_answered_key_is_ok(self) -> None:
        """The origin's answer is trusted, but the store keeps its later copy of the same
        key (fetched earlier): the query succeeds and blames no compromised key."""
        later = parse_server_keys_response(
            make_signed_server_keys(ORIGIN, [self.origin_key], self.now_ms() + 3 * DAY_MS), ORIGIN
        )
        self.successResultOf(
            defer.ensureDeferred(
                self.store.store_server_keys(later, notary_source("old.test"), self.now_ms() - 1)
            )
        )
        code, report = self.json_query(QueryOptions(ORIGIN))
        self.assertEqual(code, 0, report["error"])
        self.assertTrue(report["ok"])
        self.assertIsNone(report["error"])
        (key,) = report["keys"]
        self.assertEqual(key["answered_by"], ["origin"])
        self.assertFalse(key["fetched_now"])

    def test_keys_the_store_refused_at_its_bound_are_not_ok(self) -> None:
        """A trusted answer whose new key id the store refused (per-server bound) fails,
        saying so rather than blaming a compromised key."""
        self.store = InMemoryKeyStore(StoreLimits(max_keys=1, max_responses=4, max_conflicts=4))
        previous = parse_server_keys_response(
            make_signed_server_keys(ORIGIN, [new_signing_key("prev")], self.now_ms() - 1), ORIGIN
        )
        self.successResultOf(
            defer.ensureDeferred(self.store.store_server_keys(previous, "origin", 1000))
        )
        code, report = self.json_query(QueryOptions(ORIGIN))
        self.assertEqual(code, 1)
        self.assertEqual([k["key_id"] for k in report["keys"]], ["ed25519:prev"])
        self.assertIn("the store holds none of their current keys", report["error"])
        self.assertNotIn("compromised", report["error"])

    def test_an_answer_the_store_refused_is_reported_as_such(self) -> None:
        """An answer that could not be stored is reported as not used, with the error."""

        class FullStore(InMemoryKeyStore):
            async def store_server_keys(self, *args: Any, **kwargs: Any) -> Any:
                raise RuntimeError("disk full")

        self.store = FullStore()
        with self.assertLogs("keyring_module.fetchers.chain", "ERROR"):
            code, report = self.json_query(QueryOptions(ORIGIN))
        self.assertEqual(code, 1)
        detail = "answered; not used (could not be stored: RuntimeError: disk full)"
        self.assertEqual(
            report["sources"], [{"source": "origin", "outcome": "not_used", "detail": detail}]
        )
        self.assertEqual(
            report["error"],
            "no answer was used (origin: could not be stored: RuntimeError: disk full)",
        )

    def test_provisional_notary_keys_are_confirmed_directly(self) -> None:
        """confirm_notary_keys_directly: a notary-learned key is shown as provisional, and
        the origin is asked again in the background (here it is still failing)."""
        self.origin.code = 500
        self.notary_knows_origin()
        config = self.config(key_trust={"confirm_notary_keys_directly": True})
        code, out, err = self.query(QueryOptions(ORIGIN, config))
        self.assertEqual(code, 0, err)
        self.assertIn("provisional until the origin confirms it", out)
        # The confirmation asked the origin again (an origin answering 500 is up, so it
        # is not backed off), and the report shows both failed answers.
        self.assertIn(
            "  origin: could not reach origin.test: http_error (HTTP 500)\n"
            "  origin: could not reach origin.test: http_error (HTTP 500)\n",
            out,
        )
        self.assertEqual(len(self.outbound.requests_to(ORIGIN)), 2)

    def test_confirmed_notary_keys_are_reported_confirmed(self) -> None:
        """confirm_notary_keys_directly: when the origin confirms the notary's key, the
        report shows the key as the origin's (no longer provisional) and the origin's
        answer as used."""
        self.origin.valid_for_ms = DAY_MS
        self.notary.entries[ORIGIN] = [
            make_signed_server_keys(ORIGIN, [self.origin_key], self.now_ms() + DAY_MS - 5)
        ]
        config = self.config(
            key_fetch_order=["notaries", "origin"],
            key_trust={"confirm_notary_keys_directly": True},
        )
        code, report = self.json_query(QueryOptions(ORIGIN, config))
        self.assertEqual(code, 0, report["error"])
        self.assertEqual(len(self.outbound.requests_to(ORIGIN)), 1)
        self.assertEqual(report["asked"], [notary_source(NOTARY), "origin"])
        self.assertEqual(
            [(s["source"], s["outcome"]) for s in report["sources"]],
            [(notary_source(NOTARY), "used"), ("origin", "used")],
        )
        (key,) = report["keys"]
        self.assertEqual(key["source"], "origin")
        self.assertFalse(key["provisional"])
        self.assertEqual(key["valid_until_ts"], self.now_ms() + DAY_MS)
        self.assertEqual(key["answered_by"], [notary_source(NOTARY), "origin"])


class StartupProblemTests(SynchronousTestCase):
    """Problems opening the fetch layer are one line on stderr and exit status 1."""

    def run_query(self, config: KeyringConfig) -> tuple[int, str]:
        err = io.StringIO()
        d = defer.ensureDeferred(
            run_query(
                FakeReactor(),
                QueryOptions(ORIGIN, config),
                store=InMemoryKeyStore(),
                out=io.StringIO(),
                err=err,
            )
        )
        code: int = self.successResultOf(d)
        return code, err.getvalue()

    def test_unusable_ca_file(self) -> None:
        """A ca_file holding no certificate is reported in one line, as serve does."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("not a certificate\n")
        config = parse_config(
            {"signing_key_path": "unused", "federation": {"ca_file": path}}, standalone=False
        )
        code, err = self.run_query(config)
        self.assertEqual(code, 1)
        self.assertEqual(
            err,
            "keyring-module query: federation.ca_file: no PEM certificate found in CA file %s\n"
            % (path,),
        )

    def test_store_failure_during_the_query(self) -> None:
        """A store that fails while the query runs is reported in one line."""

        class DownStore(InMemoryKeyStore):
            async def get_many_server_keys(self, *args: Any, **kwargs: Any) -> Any:
                raise StorageUnavailableError("database is locked")

        err = io.StringIO()
        config = parse_config({"signing_key_path": "unused"}, standalone=False)
        d = defer.ensureDeferred(
            run_query(
                FakeReactor(),
                QueryOptions(ORIGIN, config),
                client=FakeFederationClient({}),
                store=DownStore(),
                out=io.StringIO(),
                err=err,
            )
        )
        self.assertEqual(self.successResultOf(d), 1)
        self.assertEqual(err.getvalue(), "keyring-module query: database: database is locked\n")


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
        self.assertTrue(options.as_json)
        assert options.config is not None
        # Relative paths in the config are relative to its folder.
        self.assertEqual(
            options.config.database.path,
            os.path.join(os.path.dirname(os.path.abspath(path)), "keys.db"),
        )

    def test_direct_and_notary_exclude_each_other(self) -> None:
        """--direct and --notary cannot be given together."""
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        with self.assertRaises(SystemExit) as cm:
            self.parse("example.org", "--direct", "--notary", "x.test")
        self.assertEqual(cm.exception.code, 2)
        self.assertIn("not allowed with argument", err.getvalue())
        self.assertTrue(options_from_args(self.parse("example.org", "--direct")).direct)

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
            attr.astuple(options, recurse=False), ("example.org", None, None, False, False)
        )


class KeyReportTests(SynchronousTestCase):
    NOW = START_S * 1000

    def stored(self, valid_until_ts: int, expired_ts: Optional[int] = None) -> StoredKey:
        raw = verify_key_bytes(new_signing_key("r1"))
        return StoredKey(ORIGIN, "ed25519:r1", raw, valid_until_ts, expired_ts, 0, "origin", "")

    def test_validity_is_capped_at_seven_days(self) -> None:
        """A current key published for longer than 7 days is reported valid for 7 days."""
        report = key_report(self.stored(self.NOW + 30 * DAY_MS), self.NOW, True)
        self.assertEqual(report["valid_for_ms"], 7 * DAY_MS)
        self.assertIn("valid 7d 0h more (capped at 7 days)", report["validity"])
        at_cap = key_report(self.stored(self.NOW + 7 * DAY_MS), self.NOW, True)
        self.assertEqual(at_cap["valid_for_ms"], 7 * DAY_MS)
        self.assertNotIn("capped", at_cap["validity"])

    def test_expired_and_old_keys(self) -> None:
        """A lapsed current key reads "expired ... ago"; an old key counts to its expired_ts."""
        lapsed = key_report(self.stored(self.NOW - 5_000), self.NOW, False)
        self.assertEqual(lapsed["valid_for_ms"], -5_000)
        self.assertIn("expired 5s ago", lapsed["validity"])
        self.assertEqual(lapsed["self_signature"], "verified_when_stored")
        old = key_report(self.stored(0, expired_ts=self.NOW + 60_000), self.NOW, False)
        self.assertEqual(old["kind"], "old")
        self.assertIsNone(old["valid_until_ts"])
        self.assertEqual(old["valid_for_ms"], 60_000)
        self.assertIn("expires in 1m 0s", old["validity"])
        self.assertEqual(old["self_signature"], "not_applicable")
