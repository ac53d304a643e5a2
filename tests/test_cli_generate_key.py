"""Tests for ``keyring-module --version`` and what ``generate-key`` prints: the
``trusted_key_servers`` entry (with the server name from ``--server-name``, ``--config``
or a marked placeholder) and, with ``--config``, the ``old_signing_keys`` that retire
the current keys.
"""

import contextlib
import io
import os
import time

import yaml
from signedjson.key import get_verify_key
from twisted.trial.unittest import SynchronousTestCase

import keyring_module
from keyring_module.cli import main
from keyring_module.cli.generate_key import PLACEHOLDER_SERVER_NAME
from keyring_module.config import OldSigningKey, TrustedKeyServer, parse_config
from keyring_module.signing import key_id_of, load_signing_keys, write_new_signing_key

OTHER_KEY = b"\x07" * 32
OTHER_KEY_B64 = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc"


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """Run the command in-process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def snippet(out: str) -> dict:  # type: ignore[type-arg]
    """The YAML after the first line (comments are YAML comments)."""
    first, _, rest = out.partition("\n")
    assert first.startswith("Wrote "), first
    loaded = yaml.safe_load(rest)
    assert isinstance(loaded, dict)
    return loaded


class VersionTests(SynchronousTestCase):
    """``keyring-module --version``."""

    def test_version(self) -> None:
        """``--version`` prints ``keyring-module <__version__>`` and exits 0."""
        out = io.StringIO()
        with contextlib.redirect_stdout(out), self.assertRaises(SystemExit) as raised:
            main(["--version"])
        self.assertEqual(raised.exception.code, 0)
        self.assertEqual(out.getvalue(), "keyring-module %s\n" % (keyring_module.__version__,))


class GenerateKeyTests(SynchronousTestCase):
    """What ``generate-key`` prints, checked against the key file it wrote."""

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.output = os.path.join(self.directory, "new.key")

    def written_key_entry(self) -> tuple[str, bytes]:
        (key,) = load_signing_keys(self.output)
        return key_id_of(key), get_verify_key(key).encode()

    def peer_config(self, loaded: dict) -> TrustedKeyServer:  # type: ignore[type-arg]
        """The entry as another server's config parses it."""
        config = parse_config(
            {"signing_key_path": "k", "trusted_key_servers": loaded["trusted_key_servers"]},
            standalone=False,
        )
        (trusted,) = config.trusted_key_servers
        return trusted

    def write_config(self, **settings: object) -> str:
        path = os.path.join(self.directory, "keyring.yaml")
        raw = {
            "server_name": "notary.example.org",
            "signing_key_path": "current.key",
            "listeners": [{"port": 8448}],
            **settings,
        }
        with open(path, "w") as f:
            yaml.safe_dump(raw, f)
        return path

    def test_server_name(self) -> None:
        """With ``--server-name`` the first line is unchanged and the rest is a
        ``trusted_key_servers`` entry other servers' configs accept, holding the public
        key of the file just written."""
        code, out, err = run_cli(
            ["generate-key", "--output", self.output, "--server-name", "notary.example.org"]
        )
        self.assertEqual((code, err), (0, ""))
        key_id, public = self.written_key_entry()
        self.assertEqual(out.splitlines()[0], "Wrote %s to %s" % (key_id, self.output))
        self.assertEqual(
            self.peer_config(snippet(out)),
            TrustedKeyServer("notary.example.org", {key_id: public}),
        )
        self.assertNotIn("old_signing_keys", out)

    def test_placeholder(self) -> None:
        """Without a server name the entry holds a placeholder, marked by a comment."""
        code, out, _ = run_cli(["generate-key", "--output", self.output])
        self.assertEqual(code, 0)
        line = next(line for line in out.splitlines() if "server_name:" in line)
        self.assertIn(PLACEHOLDER_SERVER_NAME, line)
        self.assertIn("# placeholder", line)
        key_id, public = self.written_key_entry()
        self.assertEqual(self.peer_config(snippet(out)).verify_keys, {key_id: public})

    def test_config_without_key_file(self) -> None:
        """``--config`` gives the server name; with no key file yet there is nothing to
        retire."""
        config = self.write_config()
        code, out, _ = run_cli(["generate-key", "--output", self.output, "--config", config])
        self.assertEqual(code, 0)
        self.assertEqual(self.peer_config(snippet(out)).server_name, "notary.example.org")
        self.assertNotIn("old_signing_keys", out)

    def test_config_retires_current_keys(self) -> None:
        """With ``--config`` and an existing key file, the printed ``old_signing_keys``
        keeps the configured old keys and retires the current one as of now."""
        current = write_new_signing_key(os.path.join(self.directory, "current.key"))
        config = self.write_config(
            old_signing_keys={"ed25519:prev": {"key": OTHER_KEY_B64, "expired_ts": 1000}}
        )
        before = int(time.time() * 1000)
        code, out, _ = run_cli(["generate-key", "--output", self.output, "--config", config])
        after = int(time.time() * 1000)
        self.assertEqual(code, 0)
        loaded = snippet(out)
        parsed = parse_config(
            {"signing_key_path": "k", "old_signing_keys": loaded["old_signing_keys"]},
            standalone=False,
        )
        old = {k.key_id: k for k in parsed.old_signing_keys}
        self.assertEqual(sorted(old), sorted(["ed25519:prev", key_id_of(current)]))
        prev, retired = old["ed25519:prev"], old[key_id_of(current)]
        self.assertEqual(prev, OldSigningKey("ed25519:prev", OTHER_KEY, 1000))
        self.assertEqual(retired.key_id, key_id_of(current))
        self.assertEqual(retired.verify_key_bytes, get_verify_key(current).encode())
        self.assertTrue(before <= retired.expired_ts <= after)
        key_id, _ = self.written_key_entry()
        self.assertNotEqual(key_id, key_id_of(current))

    def test_name_and_config_exclusive(self) -> None:
        """``--server-name`` and ``--config`` together are a usage error (exit 2)."""
        with contextlib.redirect_stderr(io.StringIO()), self.assertRaises(SystemExit) as raised:
            main(["generate-key", "-o", self.output, "--server-name", "a", "--config", "c"])
        self.assertEqual(raised.exception.code, 2)
        self.assertFalse(os.path.exists(self.output))

    def test_bad_config(self) -> None:
        """An invalid ``--config`` exits 1 with ``path: problem`` and writes no key."""
        config = self.write_config(server_name=5)
        code, _, err = run_cli(["generate-key", "--output", self.output, "--config", config])
        self.assertEqual(code, 1)
        self.assertIn("server_name", err)
        self.assertFalse(os.path.exists(self.output))


class SampleConfigOldKeysTests(SynchronousTestCase):
    """The commented ``old_signing_keys`` example of ``sample_config.yaml``."""

    def test_example_parses(self) -> None:
        """Uncommented, the example is a valid setting (a 32-byte public key)."""
        path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "sample_config.yaml")
        with open(path) as f:
            lines = f.read().splitlines()
        start = lines.index("#   old_signing_keys:")
        example = "\n".join(line[2:] for line in lines[start : start + 2])
        config = parse_config(
            {"signing_key_path": "k", **yaml.safe_load(example)}, standalone=False
        )
        (old,) = config.old_signing_keys
        self.assertEqual(old.key_id, "ed25519:a_OldK")
