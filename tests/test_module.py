"""The Synapse module entry point, driven by a hand-written fake ModuleApi (no Synapse)."""

import json
import os
import subprocess
import sys
from typing import Any

import attr
from signedjson.key import generate_signing_key, get_verify_key, write_signing_keys
from signedjson.sign import sign_json, verify_signed_json
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource

from keyring_module import KeyringModule
from keyring_module.errors import ConfigError, KeyVerificationError
from keyring_module.resources._json import JsonDirectory


@attr.s(auto_attribs=True)
class FakeHomeserver:
    def get_reactor(self) -> Any:
        return reactor


@attr.s(auto_attribs=True)
class FakeModuleApi:
    """The parts of Synapse's ModuleApi the module uses."""

    server_name: str
    resources: dict[str, Resource] = attr.ib(factory=dict)
    _hs: FakeHomeserver = attr.ib(factory=FakeHomeserver)

    def register_web_resource(self, path: str, resource: Resource) -> None:
        self.resources[path] = resource


class ParseConfigTests(SynchronousTestCase):
    def test_parse_config(self) -> None:
        """parse_config reads the module block and refuses standalone-only keys."""
        key_path = self.mktemp()
        with open(key_path, "w") as f:
            write_signing_keys(f, [generate_signing_key("a_hs")])
        config = KeyringModule.parse_config(
            {"signing_key_path": key_path, "database": {"path": ":memory:"}}
        )
        self.assertEqual(config.signing_key_path, key_path)
        self.assertRaisesRegex(
            ConfigError,
            "listeners: not allowed here",
            KeyringModule.parse_config,
            {"signing_key_path": "k", "listeners": [{"port": 1}]},
        )
        self.assertRaisesRegex(
            ConfigError,
            "signing_key_path: this setting is required",
            KeyringModule.parse_config,
            None,
        )

    def test_imports_without_synapse(self) -> None:
        """Importing the package and the module never imports Synapse."""
        code = (
            "import sys, keyring_module\n"
            "from keyring_module import KeyringModule\n"
            "import keyring_module.server, keyring_module.cli\n"
            "assert not any(m == 'synapse' or m.startswith('synapse.') for m in sys.modules), "
            "[m for m in sys.modules if m.startswith('synapse')]\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


class ModuleTests(TestCase):
    def make_module(self, **extra: Any) -> tuple[KeyringModule, FakeModuleApi, Any]:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        key = generate_signing_key("a_hs")
        key_path = os.path.join(directory, "homeserver.signing.key")
        with open(key_path, "w") as f:
            write_signing_keys(f, [key])
        raw = {
            "signing_key_path": key_path,
            "database": {"backend": "sqlite", "path": os.path.join(directory, "keyring.db")},
        }
        raw.update(extra)
        api = FakeModuleApi(server_name="hs.example.org")
        module = KeyringModule(KeyringModule.parse_config(raw), api)  # type: ignore[arg-type]
        self.addCleanup(module._close)
        return module, api, key

    def get(self, api: FakeModuleApi, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        root = JsonDirectory()
        matrix = JsonDirectory()
        root.putChild(b"_matrix", matrix)
        matrix.putChild(b"key", api.resources["/_matrix/key"])
        http = StubTreq(root)
        data = json.dumps(body).encode() if body is not None else None
        d = http.request(method, "https://hs.example.org" + path, data=data)  # type: ignore[attr-defined]
        http.flush()
        response = self.successResultOf(d)
        return response.code, json.loads(self.successResultOf(response.content()))

    async def test_registers_key_resource_with_homeserver_key(self) -> None:
        """The module registers /_matrix/key and serves the homeserver's key and name."""
        module, api, key = self.make_module()
        self.assertEqual(list(api.resources), ["/_matrix/key"])
        code, body = self.get(api, "GET", "/_matrix/key/v2/server")
        self.assertEqual(code, 200)
        self.assertEqual(body["server_name"], "hs.example.org")
        self.assertEqual(list(body["verify_keys"]), ["ed25519:a_hs"])
        verify_signed_json(body, "hs.example.org", get_verify_key(key))
        await module.ready

    async def test_query_served_once_ready(self) -> None:
        """/v2/query answers 503 until the store is open, then serves the notary."""
        module, api, key = self.make_module()
        if not module.ready.called:
            code, body = self.get(api, "POST", "/_matrix/key/v2/query", {"server_keys": {}})
            self.assertEqual((code, body["errcode"]), (503, "M_UNKNOWN"))
        await module.ready
        assert module.services is not None
        code, body = self.get(
            api, "POST", "/_matrix/key/v2/query", {"server_keys": {"hs.example.org": {}}}
        )
        self.assertEqual(code, 200)
        (entry,) = body["server_keys"]
        verify_signed_json(entry, "hs.example.org", get_verify_key(key))

    async def test_keyring_exposed_for_other_modules(self) -> None:
        """module.keyring verifies JSON signed by the homeserver, with no fetch."""
        module, api, key = self.make_module()
        await module.ready
        assert module.keyring is not None
        signed = sign_json({"hello": "world"}, "hs.example.org", key)
        await module.keyring.verify_json_for_server("hs.example.org", signed, 0)
        tampered = dict(signed, hello="mars")
        with self.assertRaises(KeyVerificationError):
            await module.keyring.verify_json_for_server("hs.example.org", tampered, 0)

    async def test_notary_disabled(self) -> None:
        """With notary.enabled false, /v2/query is not served."""
        module, api, _ = self.make_module(notary={"enabled": False})
        await module.ready
        code, body = self.get(api, "POST", "/_matrix/key/v2/query", {"server_keys": {}})
        self.assertEqual((code, body["errcode"]), (404, "M_UNRECOGNIZED"))

    def test_missing_key_file_is_config_error(self) -> None:
        """The homeserver's key file must exist: the module never invents one, and
        parse_config (where Synapse reports config errors) says so."""
        key_path = os.path.abspath(self.mktemp())
        with self.assertRaises(ConfigError) as cm:
            KeyringModule.parse_config({"signing_key_path": key_path})
        self.assertEqual(str(cm.exception), "signing_key_path: file not found: %s" % key_path)
