"""``keyring-module check-config`` and ``serve`` as real processes, on the README's
systemd layout: the sample config installed the way the README installs it passes, each
problem serve would meet is one line and exit status 1, and ``serve`` prints the same
lines and exits before listening. The README's unit and ``contrib/``'s are one unit."""

import os
import re
import subprocess
import sys
from typing import Any

import trustme
import yaml
from signedjson.key import generate_signing_key, write_signing_keys
from twisted.trial.unittest import SynchronousTestCase

from tests.utils import closed_loopback_port, verify_key_base64

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO_ROOT, "README.md")
SAMPLE_CONFIG = os.path.join(REPO_ROOT, "sample_config.yaml")
UNIT_FILE = os.path.join(REPO_ROOT, "contrib", "systemd", "keyring-module.service")
# Each process is bounded: a start that hangs fails the test instead of blocking it.
PROCESS_TIMEOUT_SECONDS = 60
# A folder no one may create files in, root included (sysfs refuses new files).
UNWRITABLE_FOLDER = "/sys"


def readme_text() -> str:
    with open(README, encoding="utf-8") as f:
        return f.read()


def readme_systemd_section() -> str:
    text = readme_text()
    start = text.index("**systemd.**")
    return text[start : text.index("\n## ", start)]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m keyring_module ARGS`` with this checkout first on the path."""
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    return subprocess.run(
        [sys.executable, "-m", "keyring_module", *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT_SECONDS,
        check=False,
    )


class ReadmeLayoutTests(SynchronousTestCase):
    def setUp(self) -> None:
        # A root folder standing for "/": etc/keyring holds the config, var/lib/keyring
        # is the service's StateDirectory (data_dir).
        self.root = os.path.abspath(self.mktemp())
        self.etc = os.path.join(self.root, "etc", "keyring")
        self.data_dir = os.path.join(self.root, "var", "lib", "keyring")
        os.makedirs(self.etc)
        os.makedirs(self.data_dir, mode=0o700)
        self.config_path = os.path.join(self.etc, "config.yaml")
        self.install_sample_config()

    def install_sample_config(self) -> None:
        """What the README's sed line does, with /var/lib/keyring under the test root."""
        match = re.search(r"sed 's\|(.+?)\|(.+?)\|' sample_config\.yaml", readme_systemd_section())
        assert match is not None, "the README installs the sample config with sed"
        pattern, replacement = match.group(1), match.group(2)
        replacement = replacement.replace("/var/lib/keyring", self.data_dir)
        with open(SAMPLE_CONFIG, encoding="utf-8") as f:
            sample = f.read()
        installed, count = re.subn(pattern, replacement, sample, flags=re.MULTILINE)
        self.assertEqual(count, 1, "the sample config has one data_dir line")
        with open(self.config_path, "w", encoding="utf-8") as f:
            f.write(installed)

    def edit_config(self, **changes: Any) -> None:
        with open(self.config_path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
        raw.update(changes)
        with open(self.config_path, "w", encoding="utf-8") as f:
            yaml.safe_dump(raw, f)

    def check_config(self) -> subprocess.CompletedProcess[str]:
        return run_cli("check-config", "--config", self.config_path)

    def assert_one_problem(self, expected: str) -> None:
        """check-config exits 1 and prints exactly ``expected`` (its start, when it ends
        with "(" before an OS message)."""
        result = self.check_config()
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(result.stdout, "")
        lines = result.stderr.splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        if expected.endswith("("):
            self.assertTrue(lines[0].startswith("keyring-module: " + expected), lines[0])
        else:
            self.assertEqual(lines[0], "keyring-module: " + expected)

    def write_tls(self) -> tuple[str, str]:
        cert = trustme.CA().issue_cert("localhost")
        cert_path = os.path.join(self.etc, "cert.pem")
        key_path = os.path.join(self.etc, "key.pem")
        cert.cert_chain_pems[0].write_to_path(cert_path)
        cert.private_key_pem.write_to_path(key_path)
        return cert_path, key_path

    def test_sample_config_installed_as_the_readme_says_passes(self) -> None:
        """The sample config installed as the README's systemd steps install it passes
        check-config; its data paths are under data_dir, and nothing is written."""
        result = self.check_config()
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, "%s: OK (server_name localhost:8080)\n" % self.config_path)
        self.assertEqual(result.stderr, "")
        self.assertEqual(os.listdir(self.data_dir), [])
        with open(self.config_path, encoding="utf-8") as f:
            self.assertEqual(yaml.safe_load(f)["data_dir"], self.data_dir)

    def test_each_problem_is_one_line_and_exit_status_1(self) -> None:
        """A missing TLS certificate, key folder, logging config or CA file, an old key
        id equal to a current one and an unwritable key folder: one line each."""
        cert_path, key_path = self.write_tls()
        os.remove(cert_path)
        tls_listener = {
            "port": 8448,
            "tls": True,
            "tls_certificate_path": "cert.pem",
            "tls_private_key_path": "key.pem",
        }
        self.edit_config(listeners=[tls_listener])
        self.assert_one_problem("listeners.0.tls_certificate_path: file not found: %s" % cert_path)
        self.install_sample_config()

        self.edit_config(data_dir=os.path.join(self.root, "missing"))
        self.assert_one_problem(
            "data_dir: folder not found: %s" % os.path.join(self.root, "missing")
        )
        self.install_sample_config()

        self.edit_config(signing_key_path=os.path.join(self.root, "keys", "k.key"))
        self.assert_one_problem(
            "signing_key_path: folder not found: %s" % os.path.join(self.root, "keys")
        )
        self.install_sample_config()

        self.edit_config(logging={"config_file": "log.yaml"})
        self.assert_one_problem(
            "logging.config_file: file not found: %s" % os.path.join(self.etc, "log.yaml")
        )
        self.install_sample_config()

        self.edit_config(federation={"ca_file": "ca.pem"})
        self.assert_one_problem(
            "federation.ca_file: file not found: %s" % os.path.join(self.etc, "ca.pem")
        )
        self.install_sample_config()

        key = generate_signing_key("a_now")
        with open(os.path.join(self.data_dir, "notary.signing.key"), "w") as f:
            write_signing_keys(f, [key])
        old = {"key": verify_key_base64(key), "expired_ts": 1}
        self.edit_config(old_signing_keys={"ed25519:a_now": old})
        self.assert_one_problem(
            "old_signing_keys: ed25519:a_now is both a current signing key and an old signing key"
        )
        self.install_sample_config()

        self.edit_config(signing_key_path=UNWRITABLE_FOLDER + "/notary.signing.key")
        self.assert_one_problem("signing_key_path: folder not writable: %s (" % UNWRITABLE_FOLDER)

    def test_serve_prints_the_same_lines_and_exits_before_listening(self) -> None:
        """serve on 127.0.0.1 with a missing certificate (and other problems) exits 1
        with exactly check-config's lines, before listening or writing anything."""
        _, key_path = self.write_tls()
        port = closed_loopback_port()
        self.edit_config(
            listeners=[
                {
                    "port": port,
                    "bind_addresses": ["127.0.0.1"],
                    "tls": True,
                    "tls_certificate_path": "missing-cert.pem",
                    "tls_private_key_path": "key.pem",
                }
            ],
            federation={"ca_file": "ca.pem"},
        )
        checked = self.check_config()
        served = run_cli("serve", "--config", self.config_path)
        self.assertEqual(checked.returncode, 1)
        self.assertEqual(served.returncode, 1, served.stderr)
        self.assertEqual(
            checked.stderr.splitlines(),
            [
                "keyring-module: listeners.0.tls_certificate_path: file not found: %s"
                % os.path.join(self.etc, "missing-cert.pem"),
                "keyring-module: federation.ca_file: file not found: %s"
                % os.path.join(self.etc, "ca.pem"),
            ],
        )
        self.assertEqual(served.stderr, checked.stderr)
        self.assertEqual(os.listdir(self.data_dir), [], "no key or database made")

    def test_readme_unit_is_the_contrib_unit(self) -> None:
        """The unit in the README is contrib/systemd's, and both keep the data where the
        README's config puts data_dir: the StateDirectory, writable under
        ProtectSystem=strict."""
        section = readme_systemd_section()
        match = re.search(r"```ini\n(.*?)```", section, re.DOTALL)
        assert match is not None, "the README shows the unit"
        with open(UNIT_FILE, encoding="utf-8") as f:
            unit = f.read()
        self.assertEqual(unit[unit.index("[Unit]") :], match.group(1))
        settings = dict(line.split("=", 1) for line in match.group(1).splitlines() if "=" in line)
        self.assertEqual(settings["ProtectSystem"], "strict")
        self.assertEqual("/var/lib/" + settings["StateDirectory"], "/var/lib/keyring")
        self.assertIn('data_dir: "/var/lib/keyring"', section)
        self.assertIn("--config /etc/keyring/config.yaml", settings["ExecStart"])
        self.assertIn("> /etc/keyring/config.yaml", section)
