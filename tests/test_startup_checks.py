"""The start-up checks (``keyring_module.startup_checks``): every problem ``serve`` would
meet before listening, each one ``path.to.key: problem`` line, all of them at once."""

import os
from typing import Any

import trustme
import yaml
from signedjson.key import generate_signing_key, write_signing_keys
from twisted.trial.unittest import SynchronousTestCase

from keyring_module import KeyringModule
from keyring_module.config_file import load_config_file
from keyring_module.errors import ConfigError
from keyring_module.server import StartupError, TLSServerContextFactory
from keyring_module.startup_checks import StartupProblems, check_startup, startup_problems
from keyring_module.storage.errors import StorageError
from tests.utils import verify_key_base64

# A folder no one may create files in, root included (sysfs refuses new files).
UNWRITABLE_FOLDER = "/sys"


class StartupChecksTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def path(self, *parts: str) -> str:
        return os.path.join(self.directory, *parts)

    def write(self, name: str, text: str) -> str:
        with open(self.path(name), "w") as f:
            f.write(text)
        return self.path(name)

    def write_key(self, name: str = "notary.signing.key", version: str = "a_1") -> str:
        key = generate_signing_key(version)
        with open(self.path(name), "w") as f:
            write_signing_keys(f, [key])
        self.key = key
        return self.path(name)

    def write_tls(self, prefix: str = "tls") -> tuple[str, str]:
        cert = trustme.CA().issue_cert("notary.example.org")
        cert_path, key_path = self.path(prefix + ".crt"), self.path(prefix + ".key")
        cert.cert_chain_pems[0].write_to_path(cert_path)
        cert.private_key_pem.write_to_path(key_path)
        return cert_path, key_path

    def problems(self, **raw: Any) -> list[str]:
        """The problem lines of a standalone config file in the test folder."""
        config: dict[str, Any] = {
            "server_name": "notary.example.org",
            "signing_key_path": "notary.signing.key",
            "listeners": [{"port": 8080}],
        }
        config.update(raw)
        path = self.write("config.yaml", yaml.safe_dump(config))
        return [str(problem) for problem in startup_problems(load_config_file(path))]

    def test_a_good_config_has_no_problem(self) -> None:
        """Key to be created in a writable folder, TLS files that match, a CA bundle and
        a logging config: no problem, and check_startup returns."""
        cert_path, key_path = self.write_tls()
        self.write("ca.pem", trustme.CA().cert_pem.bytes().decode())
        self.write("log.yaml", "version: 1\n")
        listeners = [
            {
                "port": 8448,
                "tls": True,
                "tls_certificate_path": "tls.crt",
                "tls_private_key_path": "tls.key",
            }
        ]
        self.assertEqual(
            self.problems(
                listeners=listeners,
                federation={"ca_file": "ca.pem"},
                logging={"config_file": "log.yaml"},
            ),
            [],
        )
        self.assertFalse(os.path.exists(self.path("notary.signing.key")), "nothing created")
        self.assertEqual(
            [name for name in os.listdir(self.directory) if name.startswith(".")], [], "no probe"
        )

    def test_missing_tls_files(self) -> None:
        """A TLS listener whose certificate and key are missing: one line each, saying
        "file not found" (which OpenSSL's error list never says)."""
        listeners = [
            {"port": 8080},
            {
                "port": 8448,
                "tls": True,
                "tls_certificate_path": "certs/cert.pem",
                "tls_private_key_path": "certs/key.pem",
            },
        ]
        self.assertEqual(
            self.problems(listeners=listeners),
            [
                "listeners.1.tls_certificate_path: file not found: %s"
                % self.path("certs", "cert.pem"),
                "listeners.1.tls_private_key_path: file not found: %s"
                % self.path("certs", "key.pem"),
            ],
        )

    def test_tls_files_that_are_not_pem_or_do_not_match(self) -> None:
        """A certificate file holding no certificate, a key file holding no key, and a
        key of another certificate are each named."""
        cert_path, key_path = self.write_tls()
        _, other_key_path = self.write_tls("other")
        self.write("junk.pem", "not PEM\n")
        tls = {"port": 8448, "tls": True}
        problems = self.problems(
            listeners=[
                dict(tls, tls_certificate_path="junk.pem", tls_private_key_path="junk.pem"),
                dict(
                    tls,
                    port=8449,
                    tls_certificate_path=cert_path,
                    tls_private_key_path=other_key_path,
                ),
            ]
        )
        self.assertEqual(len(problems), 3, problems)
        self.assertTrue(
            problems[0].startswith(
                "listeners.0.tls_certificate_path: not a PEM certificate: %s ("
                % self.path("junk.pem")
            ),
            problems[0],
        )
        self.assertTrue(
            problems[1].startswith(
                "listeners.0.tls_private_key_path: not a PEM private key: %s ("
                % self.path("junk.pem")
            ),
            problems[1],
        )
        self.assertEqual(
            problems[2],
            "listeners.1.tls_private_key_path: %s does not match the certificate in %s"
            % (other_key_path, cert_path),
        )

    def test_serve_words_tls_problems_alike(self) -> None:
        """serve's TLS context factory fails with the very lines check-config prints."""
        cert_path = self.path("missing.crt")
        _, key_path = self.write_tls()
        with self.assertRaises(StartupError) as cm:
            TLSServerContextFactory(cert_path, key_path, ("listeners", "0"))
        self.assertEqual(
            str(cm.exception),
            "listeners.0.tls_certificate_path: file not found: %s" % (cert_path,),
        )

    def test_signing_key_folder_missing_or_not_writable(self) -> None:
        """The key must be created: a missing folder, a file where the folder should be,
        and a folder we may not write in are each a problem."""
        self.write("plain", "")
        self.assertEqual(
            self.problems(signing_key_path="keys/notary.signing.key"),
            ["signing_key_path: folder not found: %s" % self.path("keys")],
        )
        self.assertEqual(
            self.problems(signing_key_path="plain/notary.signing.key"),
            ["signing_key_path: not a folder: %s" % self.path("plain")],
        )
        (problem,) = self.problems(signing_key_path=UNWRITABLE_FOLDER + "/notary.signing.key")
        self.assertTrue(
            problem.startswith("signing_key_path: folder not writable: %s (" % UNWRITABLE_FOLDER),
            problem,
        )

    def test_existing_signing_key_needs_no_writable_folder(self) -> None:
        """An existing, readable key file is enough; a broken one is named."""
        self.write_key()
        self.assertEqual(self.problems(), [])
        self.write("notary.signing.key", "garbage\n")
        (problem,) = self.problems()
        self.assertTrue(
            problem.startswith(
                "signing_key_path: cannot read signing key file %s"
                % self.path("notary.signing.key")
            ),
            problem,
        )

    def test_old_signing_key_id_equal_to_a_current_one(self) -> None:
        """An old_signing_keys id that is also a current key id is refused, as serve
        refuses it."""
        self.write_key(version="a_1")
        old = {"ed25519:a_1": {"key": verify_key_base64(self.key), "expired_ts": 1}}
        self.assertEqual(
            self.problems(old_signing_keys=old),
            ["old_signing_keys: ed25519:a_1 is both a current signing key and an old signing key"],
        )

    def test_ca_file(self) -> None:
        """federation.ca_file must exist and hold at least one PEM certificate."""
        self.assertEqual(
            self.problems(federation={"ca_file": "ca.pem"}),
            ["federation.ca_file: file not found: %s" % self.path("ca.pem")],
        )
        self.write("ca.pem", "no certificate here\n")
        self.assertEqual(
            self.problems(federation={"ca_file": "ca.pem"}),
            ["federation.ca_file: no PEM certificate found in CA file %s" % self.path("ca.pem")],
        )

    def test_logging_config_file(self) -> None:
        """logging.config_file must exist and parse as the kind of file its name says,
        without being applied."""
        self.assertEqual(
            self.problems(logging={"config_file": "log.yaml"}),
            ["logging.config_file: file not found: %s" % self.path("log.yaml")],
        )
        self.write("log.yaml", "- a list\n")
        self.assertEqual(
            self.problems(logging={"config_file": "log.yaml"}),
            [
                "logging.config_file: not a logging configuration: %s "
                "(expected a mapping with version: 1)" % self.path("log.yaml")
            ],
        )
        self.write("log.yaml", "version: [1\n")
        (problem,) = self.problems(logging={"config_file": "log.yaml"})
        self.assertTrue(
            problem.startswith("logging.config_file: not valid YAML: %s (" % self.path("log.yaml")),
            problem,
        )
        self.write("log.ini", "[loggers]\nkeys=root\n")
        self.assertEqual(
            self.problems(logging={"config_file": "log.ini"}),
            [
                "logging.config_file: not a logging configuration: %s "
                "(no [handlers], [formatters] section)" % self.path("log.ini")
            ],
        )
        self.write(
            "log.ini",
            "[loggers]\nkeys=root\n[handlers]\nkeys=\n[formatters]\nkeys=\n"
            "[logger_root]\nhandlers=\n",
        )
        self.assertEqual(self.problems(logging={"config_file": "log.ini"}), [])

    def test_sqlite_folder_and_file(self) -> None:
        """SQLite needs a writable folder (for its journal) and a readable and writable
        file, if there is one; ":memory:" needs neither."""
        self.assertEqual(
            self.problems(database={"path": "db/keyring.db"}),
            ["database.path: folder not found: %s" % self.path("db")],
        )
        (problem,) = self.problems(database={"path": UNWRITABLE_FOLDER + "/keyring.db"})
        self.assertTrue(
            problem.startswith("database.path: folder not writable: %s (" % UNWRITABLE_FOLDER),
            problem,
        )
        os.makedirs(self.path("keyring.db"))
        self.assertEqual(
            self.problems(),
            ["database.path: not a file: %s" % self.path("keyring.db")],
        )
        self.assertEqual(self.problems(database={"path": ":memory:"}), [])

    def test_postgres_driver_missing(self) -> None:
        """PostgreSQL is not connected to, but a missing driver is reported in serve's
        words (``database: ...``)."""
        import keyring_module.storage.postgres as postgres

        def no_driver() -> None:
            raise StorageError('database backend "postgres" needs psycopg2')

        self.patch(postgres, "postgres_dialect", no_driver)
        self.assertEqual(
            self.problems(database={"backend": "postgres", "dsn": "host=127.0.0.1 dbname=k"}),
            ['database: database backend "postgres" needs psycopg2'],
        )

    def test_listeners_on_one_address_and_port(self) -> None:
        """A second listener (or the metrics listener) on an address and port already
        used would fail to listen; port 0 never clashes."""
        self.assertEqual(
            self.problems(
                listeners=[
                    {"port": 8080, "bind_addresses": ["127.0.0.1", "::1"]},
                    {"port": 8080, "bind_addresses": ["::1"]},
                    {"port": 0},
                    {"port": 0},
                ],
                metrics={"enabled": True, "port": 8080},
            ),
            [
                "listeners.1: ::1 port 8080 is also used by listeners.0",
                "metrics: 127.0.0.1 port 8080 is also used by listeners.0",
            ],
        )

    def test_every_problem_at_once(self) -> None:
        """All problems are listed, in the config's order, not just the first; the
        exception form has one line per problem."""
        raw = {
            "signing_key_path": "keys/k.key",
            "listeners": [
                {
                    "port": 8448,
                    "tls": True,
                    "tls_certificate_path": "c.pem",
                    "tls_private_key_path": "k.pem",
                }
            ],
            "database": {"path": "db/keyring.db"},
            "federation": {"ca_file": "ca.pem"},
            "logging": {"config_file": "log.yaml"},
        }
        problems = self.problems(**raw)
        self.assertEqual(
            [line.split(":")[0] for line in problems],
            [
                "signing_key_path",
                "listeners.0.tls_certificate_path",
                "listeners.0.tls_private_key_path",
                "database.path",
                "federation.ca_file",
                "logging.config_file",
            ],
        )
        config = load_config_file(self.path("config.yaml"))
        with self.assertRaises(StartupProblems) as cm:
            check_startup(config)
        self.assertEqual(str(cm.exception).splitlines(), problems)
        self.assertIsInstance(cm.exception, ConfigError)

    def test_data_dir(self) -> None:
        """data_dir is where relative data paths resolve (itself relative to the config's
        folder); other files stay relative to the config's folder. A missing data_dir
        is named once, not again for each file in it."""
        os.makedirs(self.path("data"))
        self.write("ca.pem", trustme.CA().cert_pem.bytes().decode())
        path = self.write(
            "config.yaml",
            yaml.safe_dump(
                {
                    "server_name": "notary.example.org",
                    "data_dir": "data",
                    "signing_key_path": "notary.signing.key",
                    "listeners": [{"port": 8080}],
                    "federation": {"ca_file": "ca.pem"},
                }
            ),
        )
        config = load_config_file(path)
        self.assertEqual(config.data_dir, self.path("data"))
        self.assertEqual(config.signing_key_path, self.path("data", "notary.signing.key"))
        self.assertEqual(config.database.path, self.path("data", "keyring.db"))
        self.assertEqual(config.federation.ca_file, self.path("ca.pem"))
        self.assertEqual(startup_problems(config), [])
        self.assertEqual(
            self.problems(data_dir="gone"),
            ["data_dir: folder not found: %s" % self.path("gone")],
        )


class ModuleStartupChecksTests(SynchronousTestCase):
    def test_module_parse_config_runs_the_checks_that_apply(self) -> None:
        """Inside Synapse the key file must exist (it is never created), and the CA file
        and SQLite folder are checked too, all at once from parse_config."""
        directory = os.path.abspath(self.mktemp())
        with self.assertRaises(StartupProblems) as cm:
            KeyringModule.parse_config(
                {
                    "signing_key_path": os.path.join(directory, "hs.key"),
                    "database": {"path": os.path.join(directory, "keyring.db")},
                    "federation": {"ca_file": os.path.join(directory, "ca.pem")},
                }
            )
        self.assertEqual(
            str(cm.exception).splitlines(),
            [
                "signing_key_path: file not found: %s" % os.path.join(directory, "hs.key"),
                "database.path: folder not found: %s" % directory,
                "federation.ca_file: file not found: %s" % os.path.join(directory, "ca.pem"),
            ],
        )

    def test_module_data_dir(self) -> None:
        """A module's data_dir is where its relative key and database paths resolve."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        with open(os.path.join(directory, "hs.key"), "w") as f:
            write_signing_keys(f, [generate_signing_key("a_hs")])
        config = KeyringModule.parse_config({"data_dir": directory, "signing_key_path": "hs.key"})
        self.assertEqual(config.signing_key_path, os.path.join(directory, "hs.key"))
        self.assertEqual(config.database.path, os.path.join(directory, "keyring.db"))
