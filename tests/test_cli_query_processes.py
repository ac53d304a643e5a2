"""``keyring-module query`` end to end: the command in its own process, against fake
origins and notaries serving HTTPS on 127.0.0.1.

The fakes run on the test's reactor with certificates from a test CA, which the
query's config trusts through ``federation.ca_file``; ``127.0.0.1/32`` is allow-listed
(loopback is denied by default). Server names are ``127.0.0.1:<port>``, so no DNS is
involved. A "dead" origin is a loopback port with nothing listening.
"""

import json
import os
import sys
from typing import Any, Optional

import yaml
from twisted.internet.address import IPv4Address
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from keyring_module.clock import global_reactor
from tests.fakes import FakeNotaryResource, FakeOriginResource
from tests.tls_helpers import listen_tls, make_ca, write_ca_pem
from tests.utils import (
    closed_loopback_port,
    make_signed_server_keys,
    new_signing_key,
    verify_key_base64,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAY_MS = 24 * 60 * 60 * 1000


class QueryProcessTests(TestCase):
    """The real command, real TLS and real sockets; one process per query."""

    timeout = 60

    def setUp(self) -> None:
        self.reactor = global_reactor()
        self.ca = make_ca()
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.ca_file = write_ca_pem(self.ca, os.path.join(self.directory, "ca.pem"))
        self.origin_key = new_signing_key("o1")
        self.origin = FakeOriginResource(self.origin_key, "origin", self.reactor)
        self.notary_key = new_signing_key("n1")
        self.notary = FakeNotaryResource("notary", self.notary_key)
        self.origin_name = self.serve(self.origin)
        self.origin.server_name = self.origin_name
        self.notary_name = self.serve(self.notary)
        self.notary.server_name = self.notary_name

    def serve(self, resource: Any) -> str:
        """Serve ``resource`` over TLS on 127.0.0.1; returns its server name."""
        port = listen_tls(self.reactor, self.ca, resource, ["127.0.0.1"])
        self.addCleanup(port.stopListening)
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        return "127.0.0.1:%d" % address.port

    def kill_origin(self) -> None:
        """Make the origin a dead one: its name now points at a closed port."""
        self.origin_name = "127.0.0.1:%d" % closed_loopback_port()

    def notary_knows_origin(self, signing_key: Any = None) -> None:
        """The notary serves the origin's keys (or other keys under the same id)."""
        now_ms = int(self.reactor.seconds() * 1000)
        self.notary.entries[self.origin_name] = [
            make_signed_server_keys(
                self.origin_name, [signing_key or self.origin_key], now_ms + DAY_MS
            )
        ]

    def write_config(self, key_trust: Optional[dict[str, Any]] = None) -> str:
        raw = {
            "signing_key_path": "unused.key",
            "database": {"path": ":memory:"},
            "federation": {
                "ca_file": "ca.pem",  # relative to the config's folder
                "ip_range_allowlist": ["127.0.0.1/32"],
                "request_timeout": "10s",
            },
            "trusted_key_servers": [
                {
                    "server_name": self.notary_name,
                    "verify_keys": {"ed25519:n1": verify_key_base64(self.notary_key)},
                }
            ],
            "key_trust": key_trust or {},
        }
        path = os.path.join(self.directory, "query.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(raw, f)
        return path

    async def run_query(self, *args: str) -> tuple[int, str, str]:
        """Run ``python -m keyring_module query ...``; (exit status, stdout, stderr)."""
        env = dict(os.environ, PYTHONPATH=REPO_ROOT)
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-m", "keyring_module", "query", *args],
            env=env,
            path=REPO_ROOT,
            reactor=self.reactor,
        )
        return code, out.decode(), err.decode()

    async def json_query(self, *args: str) -> tuple[int, dict[str, Any]]:
        code, out, err = await self.run_query(*args, "--json")
        self.assertTrue(out, "no output; stderr: %s" % (err,))
        report: dict[str, Any] = json.loads(out)
        return code, report

    async def test_falls_back_to_the_notary_when_the_origin_is_down(self) -> None:
        """Origin down, honest notary configured: the notary's answer is used, exit 0."""
        self.kill_origin()
        self.notary_knows_origin()
        code, out, err = await self.run_query(self.origin_name, "--config", self.write_config())
        self.assertEqual(code, 0, err)
        self.assertIn("fetched from the origin, then notary %s" % (self.notary_name,), out)
        self.assertIn("could not reach %s: connect_error" % (self.origin_name,), out)
        self.assertIn("notary:%s: answered; used" % (self.notary_name,), out)
        self.assertIn("key: %s" % (verify_key_base64(self.origin_key),), out)
        self.assertIn("notary signature: verified", out)
        self.assertEqual(len(self.notary.bodies), 1)

    async def test_two_agreeing_sources(self) -> None:
        """min_agreeing_sources 2: origin and notary agree, both are named, exit 0."""
        self.notary_knows_origin()
        config = self.write_config({"min_agreeing_sources": 2})
        code, report = await self.json_query(self.origin_name, "--config", config)
        self.assertEqual(code, 0, report["error"])
        (key,) = report["keys"]
        self.assertEqual(key["answered_by"], ["origin", "notary:" + self.notary_name])
        self.assertEqual(self.origin.hits, 1)

    async def test_one_notary_is_not_two_sources(self) -> None:
        """min_agreeing_sources 2 with the origin down: the notary alone is not trusted."""
        self.kill_origin()
        self.notary_knows_origin()
        config = self.write_config({"min_agreeing_sources": 2})
        code, report = await self.json_query(self.origin_name, "--config", config)
        self.assertEqual(code, 1)
        self.assertIn("1 of 2 agreeing sources", report["error"])
        self.assertEqual(report["keys"], [])

    async def test_a_lying_notary_is_outvoted_by_nobody(self) -> None:
        """min_agreeing_sources 2, the notary disagrees with the origin: nothing is
        trusted, and the disagreement is recorded as a conflict."""
        self.notary_knows_origin(new_signing_key("o1"))
        config = self.write_config({"min_agreeing_sources": 2})
        code, report = await self.json_query(self.origin_name, "--config", config)
        self.assertEqual(code, 1)
        self.assertEqual([c["key_id"] for c in report["conflicts"]], ["ed25519:o1"])

    async def test_direct_and_notary_ask_one_source(self) -> None:
        """--direct never asks the notary; --notary never asks the origin."""
        self.notary_knows_origin()
        config = self.write_config()
        code, report = await self.json_query(self.origin_name, "--config", config, "--direct")
        self.assertEqual((code, report["asked"]), (0, ["origin"]))
        self.assertEqual(self.notary.bodies, [])
        hits = self.origin.hits
        code, report = await self.json_query(
            self.origin_name, "--config", config, "--notary", self.notary_name
        )
        self.assertEqual((code, report["asked"]), (0, ["notary:" + self.notary_name]))
        self.assertEqual(self.origin.hits, hits)

    async def test_a_database_that_cannot_be_opened_is_one_line(self) -> None:
        """A database in a folder that does not exist: one line on stderr, exit 1."""
        path = os.path.join(self.directory, "missing.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(
                {
                    "signing_key_path": "unused.key",
                    "database": {"path": os.path.join(self.directory, "no-such-folder", "k.db")},
                },
                f,
            )
        code, out, err = await self.run_query(self.origin_name, "--config", path)
        self.assertEqual(code, 1)
        self.assertEqual(out, "")
        self.assertTrue(err.startswith("keyring-module query: database: "), err)
        self.assertEqual(err.count("\n"), 1, err)
