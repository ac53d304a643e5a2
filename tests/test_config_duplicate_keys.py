"""A config file that sets a key twice is refused (PyYAML would keep the last one
without a word), at any depth, by every command that reads it."""

import io
import os
import sys

import yaml
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.cli import main
from keyring_module.config_file import load_config_file
from keyring_module.errors import ConfigError
from keyring_module.yaml_strict import load_yaml_strict

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD_KEYS = 'old_signing_keys:\n  "ed25519:a_old": {key: "%s", expired_ts: 1767225600000}\n' % (
    "O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2ik",
)


class DuplicateKeyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def write(self, text: str) -> str:
        path = os.path.join(self.directory, "config.yaml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_pasted_above_the_sample(self) -> None:
        """old_signing_keys pasted above the sample config's own ``old_signing_keys: {}``
        would be undone by it: the file is refused, naming both lines."""
        with open(os.path.join(REPO_ROOT, "sample_config.yaml")) as f:
            sample = f.read()
        self.assertIn("\nold_signing_keys: {}\n", sample)
        path = self.write(OLD_KEYS + sample)
        later = 2 + sample.splitlines().index("old_signing_keys: {}") + 1
        with self.assertRaises(ConfigError) as caught:
            load_config_file(path)
        self.assertEqual(
            str(caught.exception),
            "old_signing_keys: set twice (lines 1 and %d of %s)" % (later, path),
        )
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        self.assertEqual(main(["check-config", "--config", path]), 1)
        self.assertEqual(err.getvalue(), "keyring-module: %s\n" % (caught.exception,))

    def test_nested_and_in_lists(self) -> None:
        text = "server_name: a.example\ndatabase:\n  backend: sqlite\n  backend: postgres\n"
        with self.assertRaises(ConfigError) as caught:
            load_yaml_strict(text, "c.yaml")
        self.assertEqual(
            str(caught.exception), "database.backend: set twice (lines 3 and 4 of c.yaml)"
        )
        text = "listeners:\n  - port: 8008\n  - {port: 8448, tls: true, port: 8449}\n"
        with self.assertRaises(ConfigError) as caught:
            load_yaml_strict(text, "c.yaml")
        self.assertEqual(
            str(caught.exception), "listeners.1.port: set twice (lines 3 and 3 of c.yaml)"
        )

    def test_what_is_not_a_repeat(self) -> None:
        """The same key in different mappings, and keys a merge brings in, are fine;
        the result is what ``yaml.safe_load`` gives."""
        text = (
            "defaults: &d {port: 8008, tls: false}\n"
            "listeners:\n"
            "  - {<<: *d, port: 8448}\n"
            "  - {port: 8009}\n"
            "metrics: {port: 9000}\n"
        )
        self.assertEqual(load_yaml_strict(text, "c.yaml"), yaml.safe_load(text))
        self.assertIsNone(load_yaml_strict("", "c.yaml"))

    def test_invalid_yaml_still_says_so(self) -> None:
        path = self.write("a: [1,\n")
        with self.assertRaises(ConfigError) as caught:
            load_config_file(path)
        self.assertIn("is not valid YAML", str(caught.exception))
