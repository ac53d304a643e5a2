"""The README's "Rotating the signing key", step by step: the real ``generate-key`` and
``check-config`` commands in their own processes, the config edited as the README says,
then the ``/_matrix/key/v2/server`` response the server builds from the edited config.
"""

import json
import os
import sys
import time
from typing import Any

import yaml
from signedjson.key import decode_verify_key_bytes, get_verify_key
from signedjson.sign import SignatureVerifyException, verify_signed_json
from treq.testing import StubTreq
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from unpaddedbase64 import decode_base64

from keyring_module.config import parse_config
from keyring_module.config_file import load_config_file
from keyring_module.server import KeyServer
from keyring_module.signing import key_id_of, load_signing_keys
from keyring_module.storage.memory import InMemoryKeyStore
from keyring_module.wiring import KeyringServices
from tests.fake_reactors import FakeReactor

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER_NAME = "notary.test"


async def command(*args: str) -> tuple[int, str, str]:
    """``keyring-module ARGS`` in its own process: (exit status, stdout, stderr)."""
    out, err, code = await getProcessOutputAndValue(
        sys.executable,
        ["-m", "keyring_module", *args],
        env=dict(os.environ, PYTHONPATH=REPO_ROOT),
        path=REPO_ROOT,
    )
    return code, out.decode(), err.decode()


def printed_yaml(out: str) -> Any:
    """What ``generate-key`` printed after its first line, as YAML."""
    return yaml.safe_load(out.partition("\n")[2])


class RotationTests(TestCase):
    """A notary rotates its key as the README says."""

    timeout = 60

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.config_path = os.path.join(self.directory, "config.yaml")
        self.old_key_path = os.path.join(self.directory, "notary.signing.key")
        self.new_key_path = self.old_key_path + ".new"
        self.write_config(
            {
                "server_name": SERVER_NAME,
                "signing_key_path": self.old_key_path,
                "listeners": [{"port": 8448}],
                "database": {"path": os.path.join(self.directory, "keys.db")},
            }
        )

    def write_config(self, raw: dict[str, Any]) -> None:
        with open(self.config_path, "w") as f:
            yaml.safe_dump(raw, f)

    def read_config(self) -> Any:
        with open(self.config_path) as f:
            return yaml.safe_load(f)

    def published(self) -> Any:
        """``GET /_matrix/key/v2/server`` of a server built from the config file."""
        reactor = FakeReactor()
        reactor.advance(time.time())
        config = load_config_file(self.config_path, standalone=True)
        server = KeyServer(reactor, config)
        services = KeyringServices.build(reactor, config, server.own_keys, InMemoryKeyStore())
        root, matrix = Resource(), Resource()
        root.putChild(b"_matrix", matrix)
        matrix.putChild(b"key", services.key_resource())
        treq = StubTreq(root)
        url = "https://%s/_matrix/key/v2/server" % SERVER_NAME
        d = treq.get(url)  # type: ignore[attr-defined]
        treq.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        return json.loads(self.successResultOf(response.content()))

    async def test_rotation_as_documented(self) -> None:
        """After the README's steps /server lists the new key in verify_keys, the old one
        in old_verify_keys with the printed expired_ts, is signed by the new key only,
        and the printed trusted_key_servers entry lets peers check it; check-config
        accepts the edited config."""
        # Before: the server's first key.
        code, _, err = await command(
            "generate-key", "--output", self.old_key_path, "--server-name", SERVER_NAME
        )
        self.assertEqual(code, 0, err)
        (old_key,) = load_signing_keys(self.old_key_path)
        old_id = key_id_of(old_key)
        self.assertEqual(list(self.published()["verify_keys"]), [old_id])

        # Step 1: generate the new key, reading the config.
        before = int(time.time() * 1000)
        code, out, err = await command(
            "generate-key", "--config", self.config_path, "--output", self.new_key_path
        )
        after = int(time.time() * 1000)
        self.assertEqual(code, 0, err)
        (new_key,) = load_signing_keys(self.new_key_path)
        new_id = key_id_of(new_key)
        self.assertEqual(out.splitlines()[0], "Wrote %s to %s" % (new_id, self.new_key_path))
        printed = printed_yaml(out)

        # Step 3: signing_key_path to the new file; old_signing_keys as printed.
        raw = self.read_config()
        raw["signing_key_path"] = self.new_key_path
        raw["old_signing_keys"] = printed["old_signing_keys"]
        self.write_config(raw)

        # Step 4: check-config accepts it.
        code, out, err = await command("check-config", "--config", self.config_path)
        self.assertEqual(code, 0, err)
        self.assertIn("OK", out)

        # What peers see.
        body = self.published()
        new_public = get_verify_key(new_key)
        self.assertEqual(list(body["verify_keys"]), [new_id])
        self.assertEqual(decode_base64(body["verify_keys"][new_id]["key"]), new_public.encode())
        (retired,) = body["old_verify_keys"].items()
        self.assertEqual(retired[0], old_id)
        self.assertEqual(decode_base64(retired[1]["key"]), get_verify_key(old_key).encode())
        self.assertTrue(before <= retired[1]["expired_ts"] <= after)
        self.assertEqual(list(body["signatures"]), [SERVER_NAME])
        self.assertEqual(list(body["signatures"][SERVER_NAME]), [new_id])
        verify_signed_json(body, SERVER_NAME, new_public)
        with self.assertRaises(SignatureVerifyException):
            verify_signed_json(body, SERVER_NAME, get_verify_key(old_key))

        # Step 2: the entry sent to peers holds the key that now signs.
        peer = parse_config(
            {"signing_key_path": "k", "trusted_key_servers": printed["trusted_key_servers"]},
            standalone=False,
        )
        (trusted,) = peer.trusted_key_servers
        self.assertEqual(trusted.server_name, SERVER_NAME)
        for key_id, key_bytes in trusted.verify_keys.items():
            verify_signed_json(body, SERVER_NAME, decode_verify_key_bytes(key_id, key_bytes))
