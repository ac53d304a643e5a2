"""The standalone server's federation basics: ``GET /_matrix/federation/v1/version`` and
the ``well_known:`` setting served at ``/.well-known/matrix/server``."""

import json
from typing import Any, Optional

from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

import keyring_module
from keyring_module.config import ConfigError, WellKnownConfig, parse_config
from keyring_module.resources.federation_basics import add_federation_basics
from keyring_module.resources.health import HealthResource
from keyring_module.resources.tree import build_root

BASE = "http://notary.test"
STANDALONE = {"server_name": "notary.test", "signing_key_path": "k", "listeners": [{"port": 1}]}


class WellKnownConfigTests(SynchronousTestCase):
    """``well_known:`` is checked when the config is read."""

    def parse(self, well_known: object, standalone: bool = True) -> Optional[WellKnownConfig]:
        raw: dict[str, Any] = dict(STANDALONE) if standalone else {"signing_key_path": "k"}
        raw["well_known"] = well_known
        return parse_config(raw, standalone=standalone).well_known

    def test_left_out_or_null_is_none(self) -> None:
        """Without the setting (or with null) nothing is configured."""
        self.assertIsNone(parse_config(STANDALONE).well_known)
        self.assertIsNone(self.parse(None))

    def test_server_names_with_and_without_port(self) -> None:
        """Host names, names with a port and IP literals are accepted as m.server."""
        for name in ("notary.example.org", "notary.example.org:443", "[2001:db8::1]:8448"):
            self.assertEqual(self.parse({"m.server": name}), WellKnownConfig(name))

    def test_bad_values_name_the_key(self) -> None:
        """A URL, a bad port, a missing m.server, another key or a non-mapping is an error
        naming the key."""
        cases = [
            ({"m.server": "https://notary.example.org"}, "well_known.m.server: expected a Matrix"),
            ({"m.server": "notary.example.org:99999"}, "well_known.m.server: expected a Matrix"),
            ({"m.server": 443}, "well_known.m.server: expected a non-empty string"),
            ({}, "well_known.m.server: this setting is required"),
            (
                {"m.server": "a.example", "m.client": "x"},
                "well_known.m.client: unknown setting; the only valid setting here is: m.server",
            ),
            ("notary.example.org:443", "well_known: expected a mapping"),
        ]
        for value, message in cases:
            with self.subTest(value=value):
                with self.assertRaises(ConfigError) as raised:
                    self.parse(value)
                self.assertIn(message, str(raised.exception))

    def test_refused_inside_synapse(self) -> None:
        """Inside Synapse the homeserver serves its own .well-known: the key is refused."""
        with self.assertRaises(ConfigError) as raised:
            self.parse({"m.server": "a.example:443"}, standalone=False)
        self.assertIn("well_known: not allowed here", str(raised.exception))


class FederationBasicsResourceTests(SynchronousTestCase):
    """The version and well-known resources on a standalone root, through StubTreq."""

    def treq(self, well_known: Optional[WellKnownConfig]) -> StubTreq:
        async def healthy() -> None:
            return None

        root = build_root(Resource(), HealthResource(healthy))
        add_federation_basics(root, well_known)
        return StubTreq(root)

    def request(
        self, treq: StubTreq, method: str, path: str
    ) -> tuple[int, dict[bytes, list[bytes]], bytes]:
        d = treq.request(method, BASE + path)  # type: ignore[attr-defined]
        treq.flush()
        response = self.successResultOf(d)
        body: bytes = self.successResultOf(response.content())
        return response.code, dict(response.headers.getAllRawHeaders()), body

    def test_version(self) -> None:
        """GET /_matrix/federation/v1/version names the software and the package version."""
        code, headers, body = self.request(self.treq(None), "GET", "/_matrix/federation/v1/version")
        self.assertEqual(code, 200)
        self.assertEqual(headers[b"Content-Type"], [b"application/json"])
        self.assertEqual(
            json.loads(body),
            {"server": {"name": "keyring_module", "version": keyring_module.__version__}},
        )

    def test_well_known_served_when_configured(self) -> None:
        """With well_known set, its document is served as JSON, cacheable for an hour."""
        treq = self.treq(WellKnownConfig("notary.example.org:443"))
        code, headers, body = self.request(treq, "GET", "/.well-known/matrix/server")
        self.assertEqual((code, body), (200, b'{"m.server":"notary.example.org:443"}'))
        self.assertEqual(headers[b"Content-Type"], [b"application/json"])
        self.assertEqual(headers[b"Cache-Control"], [b"max-age=3600"])
        code, headers, body = self.request(treq, "HEAD", "/.well-known/matrix/server")
        self.assertEqual((code, body), (200, b""))
        self.assertEqual(headers[b"Content-Length"], [b"37"])

    def test_well_known_not_found_when_not_configured(self) -> None:
        """Without well_known the path answers 404 M_UNRECOGNIZED in JSON, as before."""
        code, headers, body = self.request(self.treq(None), "GET", "/.well-known/matrix/server")
        self.assertEqual(code, 404)
        self.assertEqual(headers[b"Content-Type"], [b"application/json"])
        self.assertEqual(json.loads(body)["errcode"], "M_UNRECOGNIZED")

    def test_other_methods_and_paths(self) -> None:
        """POST gets 405 with Allow; neighbouring paths get 404 M_UNRECOGNIZED."""
        treq = self.treq(WellKnownConfig("a.example"))
        code, headers, body = self.request(treq, "POST", "/_matrix/federation/v1/version")
        self.assertEqual((code, headers[b"Allow"]), (405, [b"GET, HEAD"]))
        self.assertEqual(json.loads(body)["errcode"], "M_UNRECOGNIZED")
        for path in (
            "/.well-known/matrix/client",
            "/.well-known/matrix/server/x",
            "/_matrix/federation/v1/version/x",
            "/_matrix/federation/v2/version",
            "/_matrix/federation/v1/send/1",
        ):
            with self.subTest(path=path):
                code, _, body = self.request(treq, "GET", path)
                self.assertEqual(code, 404)
                self.assertEqual(json.loads(body)["errcode"], "M_UNRECOGNIZED")

    def test_key_api_and_health_still_mounted(self) -> None:
        """Adding the basics keeps the root's other children."""
        code, _, body = self.request(self.treq(None), "GET", "/health")
        self.assertEqual((code, body), (200, b'{"status":"ok"}'))
