"""Tests for ``keyring-module keys list | show | conflicts | forget``: the actions on an
in-memory store (output, exit codes, confirmation), argument checks through ``main``,
and the real command in its own process against SQLite and PostgreSQL stores.
"""

import io
import json
import os
import sys
from typing import Any, Optional

import yaml
from twisted.internet.defer import ensureDeferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from keyring_module.cli import main
from keyring_module.cli.keys import KeysOptions, run_keys
from keyring_module.clock import global_reactor
from keyring_module.model import KeyConflict
from keyring_module.storage.memory import InMemoryKeyStore
from keyring_module.storage.sql import SqlKeyStore
from keyring_module.storage.sqlite import SqliteKeyStore
from tests.storage_writer import make_response, postgres_test_schema

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K1, K2, K3 = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
K1_B64 = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE"
JAN_1_2026 = 1767225600000
DEC_31_2025 = 1767139200000
HOUR_MS = 3600_000


class FakeTerminal(io.StringIO):
    """Standard input that is a terminal, with the operator's answer typed in."""

    def isatty(self) -> bool:
        return True


async def fill(store: Any) -> None:
    """a.example: keys a, b and old (fetched from the origin); b.example: one key from a
    notary; one conflict of a.example."""
    await store.store_server_keys(
        make_response(
            "a.example",
            JAN_1_2026,
            {"ed25519:a": K1, "ed25519:b": K2},
            {"ed25519:old": (K3, 1600000000000)},
        ),
        "origin",
        DEC_31_2025,
    )
    await store.store_server_keys(
        make_response("b.example", JAN_1_2026 + 365 * 24 * HOUR_MS, {"ed25519:k": K1}),
        "notary:matrix.org",
        DEC_31_2025,
    )
    await store.record_conflicts(
        [KeyConflict("a.example", "ed25519:a", K1, "origin", K2, "notary:n", DEC_31_2025)]
    )


class KeysActionTests(SynchronousTestCase):
    """``run_keys`` on an in-memory store, the clock one hour after the keys were fetched."""

    def setUp(self) -> None:
        self.store = InMemoryKeyStore()
        self.successResultOf(ensureDeferred(fill(self.store)))
        self.now = DEC_31_2025 + HOUR_MS

    def run_keys(
        self, options: KeysOptions, stdin: Optional[io.StringIO] = None
    ) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = self.successResultOf(
            ensureDeferred(
                run_keys(
                    options, self.store, self.now, out=out, err=err, stdin=stdin or io.StringIO()
                )
            )
        )
        return code, out.getvalue(), err.getvalue()

    def test_list_table(self) -> None:
        """``keys list`` prints one aligned row per stored key with ISO times, the
        expiry of old keys and where each came from."""
        code, out, err = self.run_keys(KeysOptions("list"))
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual(
            lines[0].split(),
            ["SERVER", "KEY", "ID", "VALID", "UNTIL", "EXPIRED", "SOURCE", "FETCHED"],
        )
        self.assertEqual(len(lines), 5)
        self.assertEqual(
            lines[3].split(),
            [
                "a.example",
                "ed25519:old",
                "2026-01-01T00:00:00Z",
                "2020-09-13T12:26:40Z",
                "origin",
                "2025-12-31T00:00:00Z",
            ],
        )
        self.assertIn("notary:matrix.org", lines[4])
        column = lines[0].index("SOURCE")
        self.assertEqual({line.index("origin") for line in lines[1:4]}, {column})
        self.assertEqual(lines[4].index("notary:matrix.org"), column)

    def test_list_marks_past_validity(self) -> None:
        """A key whose ``valid_until_ts`` has passed is marked ``(past)``."""
        self.now = JAN_1_2026 + 1
        _, out, _ = self.run_keys(KeysOptions("list", "a.example"))
        self.assertEqual(out.count("(past)"), 3)
        self.assertNotIn("b.example", out)

    def test_list_json(self) -> None:
        """``keys list --json`` prints every field of every key, base64 key included."""
        code, out, _ = self.run_keys(KeysOptions("list", "b.example", as_json=True))
        self.assertEqual(code, 0)
        (key,) = json.loads(out)["keys"]
        self.assertEqual(key["server_name"], "b.example")
        self.assertEqual(key["verify_key"], K1_B64)
        self.assertEqual(key["source"], "notary:matrix.org")
        self.assertEqual(key["fetched_ts"], DEC_31_2025)
        self.assertIsNone(key["expired_ts"])

    def test_list_nothing(self) -> None:
        """Listing an empty store, or a server it does not hold, exits 1 and says so."""
        code, out, err = self.run_keys(KeysOptions("list", "nobody.example"))
        self.assertEqual((code, out), (1, ""))
        self.assertIn("no keys stored for nobody.example", err)
        self.store = InMemoryKeyStore()
        code, out, _ = self.run_keys(KeysOptions("list", as_json=True))
        self.assertEqual((code, json.loads(out)), (1, {"keys": []}))

    def test_show(self) -> None:
        """``keys show`` gives the server's keys, its stored response and how old it is,
        and its conflicts."""
        code, out, _ = self.run_keys(KeysOptions("show", "a.example", as_json=True))
        self.assertEqual(code, 0)
        report = json.loads(out)
        self.assertEqual(
            [k["key_id"] for k in report["keys"]], ["ed25519:a", "ed25519:b", "ed25519:old"]
        )
        (response,) = report["responses"]
        self.assertEqual(response["age_ms"], HOUR_MS)
        self.assertEqual(response["valid_until_ts"], JAN_1_2026)
        self.assertGreater(response["size_bytes"], 100)
        (conflict,) = report["conflicts"]
        self.assertEqual((conflict["kept_key"], conflict["rejected_source"]), (K1_B64, "notary:n"))
        code, text, _ = self.run_keys(KeysOptions("show", "a.example"))
        self.assertIn("Keys: 3", text)
        self.assertIn("Stored responses (what the notary serves): 1", text)
        self.assertIn("1h", text)
        self.assertIn("Conflicts: 1", text)

    def test_show_unknown(self) -> None:
        """Showing a server the store knows nothing of exits 1."""
        code, _, err = self.run_keys(KeysOptions("show", "nobody.example"))
        self.assertEqual(code, 1)
        self.assertIn("nothing stored for nobody.example", err)

    def test_conflicts(self) -> None:
        """``keys conflicts`` lists every server's recorded conflicts; none exits 1."""
        code, out, _ = self.run_keys(KeysOptions("conflicts"))
        self.assertEqual(code, 0)
        self.assertEqual(len(out.splitlines()), 2)
        self.assertIn("notary:n", out)
        code, out, err = self.run_keys(KeysOptions("conflicts", "b.example", as_json=True))
        self.assertEqual((code, json.loads(out)), (1, {"conflicts": []}))
        self.assertIn("no conflicts recorded", err)

    def test_forget_refuses_without_terminal(self) -> None:
        """Without ``--yes`` and without a terminal to ask on, forget exits 2 and
        removes nothing."""
        code, out, err = self.run_keys(KeysOptions("forget", "a.example"))
        self.assertEqual((code, out), (2, ""))
        self.assertIn("--yes", err)
        self.assertEqual(len(self.store.keys["a.example"]), 3)

    def test_forget_asks(self) -> None:
        """On a terminal, forget asks; anything but y leaves the store as it was, y
        removes the keys and prints what was removed."""
        for answer in ("\n", "n\n", ""):
            code, out, err = self.run_keys(
                KeysOptions("forget", "a.example", ("ed25519:a",)), FakeTerminal(answer)
            )
            self.assertEqual((code, out), (1, ""))
            self.assertIn("Forget ed25519:a of a.example", err)
            self.assertIn("nothing removed", err)
            self.assertIn("ed25519:a", self.store.keys["a.example"])
        with self.assertLogs("keyring_module.storage.forget", "INFO") as logs:
            code, out, _ = self.run_keys(
                KeysOptions("forget", "a.example", ("ed25519:a",)), FakeTerminal("y\n")
            )
        self.assertEqual(code, 0)
        self.assertIn("key rows [ed25519:a]", out)
        self.assertIn("database.poll_interval", out)
        self.assertIn("ed25519:a", logs.output[0])
        self.assertEqual(sorted(self.store.keys["a.example"]), ["ed25519:b", "ed25519:old"])
        self.assertEqual([r for r in self.store.responses.values() if r[1] == "a.example"], [])

    def test_forget_yes_json(self) -> None:
        """``--yes`` forgets without asking; ``--json`` prints the removed rows."""
        response_id = next(iter(self.store.keys["b.example"].values()))[7]
        code, out, _ = self.run_keys(KeysOptions("forget", "b.example", yes=True, as_json=True))
        self.assertEqual(code, 0)
        self.assertEqual(
            json.loads(out),
            {"server_name": "b.example", "key_ids": ["ed25519:k"], "response_ids": [response_id]},
        )
        self.assertNotIn("b.example", self.store.keys)

    def test_forget_nothing(self) -> None:
        """Forgetting a key id or server the store does not hold exits 1, removing nothing."""
        code, _, err = self.run_keys(KeysOptions("forget", "a.example", ("ed25519:zz",), yes=True))
        self.assertEqual(code, 1)
        self.assertIn("nothing stored for a.example (ed25519:zz)", err)
        code, _, _ = self.run_keys(KeysOptions("forget", "nobody.example", yes=True))
        self.assertEqual(code, 1)
        self.assertEqual(len(self.store.keys["a.example"]), 3)


class KeysUsageTests(SynchronousTestCase):
    """Argument checks that end before any store is opened."""

    def setUp(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        self.config = os.path.join(directory, "c.yaml")
        with open(self.config, "w") as f:
            yaml.safe_dump({"signing_key_path": "k.key", "database": {"path": "keys.db"}}, f)
        self.err = io.StringIO()
        self.patch(sys, "stderr", self.err)

    def test_bad_server_name(self) -> None:
        """An invalid server name is a usage error (exit 2)."""
        self.assertEqual(main(["keys", "show", "bad name", "--config", self.config]), 2)
        self.assertEqual(main(["keys", "list", "--server", "a/b", "--config", "missing.yaml"]), 2)
        self.assertIn("not a valid server name", self.err.getvalue())

    def test_forget_without_terminal(self) -> None:
        """``forget`` without ``--yes`` with stdin not a terminal exits 2 before opening
        the store (no database file is created)."""
        self.patch(sys, "stdin", io.StringIO("y\n"))
        self.assertEqual(main(["keys", "forget", "a.example", "--config", self.config]), 2)
        self.assertIn("not a terminal", self.err.getvalue())
        self.assertFalse(os.path.exists(os.path.join(os.path.dirname(self.config), "keys.db")))

    def test_missing_sqlite_file(self) -> None:
        """A SQLite ``database.path`` that does not exist is reported (exit 1), not
        created."""
        self.assertEqual(main(["keys", "list", "--config", self.config]), 1)
        self.assertIn("keys.db does not exist", self.err.getvalue())
        self.assertFalse(os.path.exists(os.path.join(os.path.dirname(self.config), "keys.db")))

    def test_config_required(self) -> None:
        """Every action needs ``--config`` (argparse's usage exit 2)."""
        for argv in (["keys", "list"], ["keys", "show", "a.example"], ["keys", "conflicts"]):
            with self.assertRaises(SystemExit) as raised:
                main(argv)
            self.assertEqual(raised.exception.code, 2)


class KeysProcessTestsMixin:
    """The real command in its own process against a store filled by the test."""

    timeout = 60

    def open_store(self) -> SqlKeyStore:
        raise NotImplementedError

    def database_config(self) -> dict[str, Any]:
        raise NotImplementedError

    async def command(self, *args: str) -> tuple[int, str, str]:
        env = dict(os.environ, PYTHONPATH=REPO_ROOT)
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-m", "keyring_module", "keys", *args, "--config", self.config_path],
            env=env,
            path=REPO_ROOT,
        )
        return code, out.decode(), err.decode()

    async def prepare(self) -> None:
        test: Any = self
        directory = os.path.abspath(test.mktemp())
        os.makedirs(directory)
        self.config_path = os.path.join(directory, "c.yaml")
        self.directory = directory
        with open(self.config_path, "w") as f:
            yaml.safe_dump({"signing_key_path": "k.key", "database": self.database_config()}, f)
        store = self.open_store()
        await store.migrate()
        await fill(store)
        await store.close()

    async def test_list_forget_list(self) -> None:
        """``keys list --json`` shows the stored keys; ``forget --yes`` removes a server's
        keys from the database, printing and logging what it removed; a second list no
        longer has them."""
        test: Any = self
        await self.prepare()
        code, out, err = await self.command("list", "--json")
        test.assertEqual(code, 0, err)
        test.assertEqual(len(json.loads(out)["keys"]), 4)
        code, out, err = await self.command("forget", "b.example", "--yes")
        test.assertEqual(code, 0, err)
        test.assertIn("key rows [ed25519:k]", out)
        test.assertIn("Forgot b.example", err)  # the log line (default logging: stderr)
        code, out, _ = await self.command("list")
        test.assertEqual(code, 0)
        test.assertIn("a.example", out)
        test.assertNotIn("b.example", out)


class SqliteKeysProcessTests(KeysProcessTestsMixin, TestCase):
    """``keyring-module keys`` on a SQLite store."""

    def database_config(self) -> dict[str, Any]:
        return {"path": "keys.db"}  # relative to the config's folder

    def open_store(self) -> SqlKeyStore:
        return SqliteKeyStore(os.path.join(self.directory, "keys.db"), global_reactor())


class PostgresKeysProcessTests(KeysProcessTestsMixin, TestCase):
    """``keyring-module keys`` on a PostgreSQL store."""

    def setUp(self) -> None:
        self.dsn, _ = postgres_test_schema(self)

    def database_config(self) -> dict[str, Any]:
        return {"backend": "postgres", "dsn": self.dsn}

    def open_store(self) -> SqlKeyStore:
        from keyring_module.storage.postgres import PostgresKeyStore

        return PostgresKeyStore(self.dsn, global_reactor(), pool_size=1)
