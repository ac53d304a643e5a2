"""More start-up checks (``keyring_module.startup_checks``), and ``serve`` meeting the
same problems in the same words."""

import os
from typing import Any

import yaml
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.config_file import load_config_file
from keyring_module.errors import ConfigError
from keyring_module.server import KeyServer
from keyring_module.startup_checks import startup_problems
from tests.fake_reactors import FakeReactor


class StartupCheckCase(SynchronousTestCase):
    """A temporary folder holding a standalone config file and what it points at."""

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def path(self, *parts: str) -> str:
        return os.path.join(self.directory, *parts)

    def write(self, name: str, data: "str | bytes") -> str:
        mode = "wb" if isinstance(data, bytes) else "w"
        with open(self.path(name), mode) as f:
            f.write(data)
        return self.path(name)

    def config(self, **raw: Any) -> Any:
        settings: dict[str, Any] = {
            "server_name": "notary.example.org",
            "signing_key_path": "notary.signing.key",
            "listeners": [{"port": 8080}],
        }
        settings.update(raw)
        return load_config_file(self.write("config.yaml", yaml.safe_dump(settings)))

    def problems(self, **raw: Any) -> list[str]:
        return [str(problem) for problem in startup_problems(self.config(**raw))]


class DanglingSymlinkTests(StartupCheckCase):
    def test_signing_key_path_dangling_symlink(self) -> None:
        """A symbolic link to nothing at signing_key_path is reported by check-config,
        and serve refuses it in the same words (rather than ``[Errno 17] File exists``)."""
        link = self.path("notary.signing.key")
        os.symlink(self.path("gone", "k.key"), link)
        expected = "signing_key_path: dangling symlink: %s (-> %s)" % (
            link,
            self.path("gone", "k.key"),
        )
        self.assertEqual(self.problems(), [expected])
        with self.assertRaises(ConfigError) as caught:
            KeyServer(FakeReactor(), self.config())
        self.assertEqual(str(caught.exception), expected)
        self.assertFalse(os.path.lexists(self.path("gone")))

    def test_tls_file_dangling_symlink(self) -> None:
        """Every file check says so, e.g. a listener's certificate."""
        os.symlink(self.path("nothing.crt"), self.path("tls.crt"))
        self.write("tls.key", "")
        problems = self.problems(
            listeners=[
                {
                    "port": 8448,
                    "tls": True,
                    "tls_certificate_path": "tls.crt",
                    "tls_private_key_path": "tls.key",
                }
            ]
        )
        self.assertIn(
            "listeners.0.tls_certificate_path: dangling symlink: %s (-> %s)"
            % (self.path("tls.crt"), self.path("nothing.crt")),
            problems,
        )

    def test_serve_names_the_setting_when_it_cannot_create_the_key(self) -> None:
        """An OSError creating the key file is reported under signing_key_path."""
        path = self.path("missing-folder", "k.key")
        with self.assertRaises(ConfigError) as caught:
            KeyServer(FakeReactor(), self.config(signing_key_path=path))
        self.assertEqual(
            str(caught.exception),
            "signing_key_path: cannot create signing key file %s: No such file or directory"
            % (path,),
        )


class SqliteFileTests(StartupCheckCase):
    def setUp(self) -> None:
        super().setUp()
        from signedjson.key import generate_signing_key, write_signing_keys

        with open(self.path("notary.signing.key"), "w") as f:
            write_signing_keys(f, [generate_signing_key("a_1")])

    def test_existing_file_that_is_not_sqlite(self) -> None:
        """An existing database.path that is not an SQLite database is a problem."""
        path = self.write("keyring.db", b"\x00" * 100)
        self.assertEqual(
            self.problems(database={"path": path}),
            ["database.path: not an SQLite database: %s" % (path,)],
        )
        path = self.write("notes.txt", "database notes\n" * 20)
        self.assertEqual(
            self.problems(database={"path": path}),
            ["database.path: not an SQLite database: %s" % (path,)],
        )

    def test_empty_file_and_real_database_pass(self) -> None:
        import sqlite3

        empty = self.write("empty.db", b"")
        self.assertEqual(self.problems(database={"path": empty}), [])
        real = self.path("real.db")
        connection = sqlite3.connect(real)
        connection.execute("CREATE TABLE t (x)")
        connection.commit()
        connection.close()
        self.assertEqual(self.problems(database={"path": real}), [])


class EncryptedTLSKeyTests(StartupCheckCase):
    def test_passphrase_protected_key_is_refused_without_prompting(self) -> None:
        """An encrypted private key is reported, by check-config and serve alike, instead
        of OpenSSL asking for its passphrase on the terminal (or, with none, failing
        with a reason that does not say why)."""
        import trustme
        from cryptography.hazmat.primitives import serialization

        from keyring_module.server import StartupError, TLSServerContextFactory

        cert = trustme.CA().issue_cert("notary.example.org")
        cert.cert_chain_pems[0].write_to_path(self.path("tls.crt"))
        key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), None)
        encrypted = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
        self.write("tls.key", encrypted)
        expected = (
            "listeners.0.tls_private_key_path: encrypted private key: %s "
            "(passphrase-protected keys are not supported)" % (self.path("tls.key"),)
        )
        problems = self.problems(
            listeners=[
                {
                    "port": 8448,
                    "tls": True,
                    "tls_certificate_path": "tls.crt",
                    "tls_private_key_path": "tls.key",
                }
            ]
        )
        self.assertEqual(problems, [expected])
        with self.assertRaises(StartupError) as caught:
            TLSServerContextFactory(self.path("tls.crt"), self.path("tls.key"), ("listeners", "0"))
        self.assertEqual(str(caught.exception), expected)
