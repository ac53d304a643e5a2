"""``keyring-module keys forget --json`` prints a JSON document whatever happens, so a
script reading standard output never gets an empty string to parse."""

import io
import json

from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.cli.keys import KeysOptions, run_keys
from keyring_module.storage.memory import InMemoryKeyStore
from tests.test_cli_keys import DEC_31_2025, FakeTerminal, fill


class ForgetJsonTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = InMemoryKeyStore()
        self.successResultOf(ensureDeferred(fill(self.store)))

    def run_keys(self, options: KeysOptions, stdin: io.StringIO) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = self.successResultOf(
            ensureDeferred(
                run_keys(options, self.store, DEC_31_2025, out=out, err=err, stdin=stdin)
            )
        )
        return code, out.getvalue(), err.getvalue()

    def test_nothing_matches(self) -> None:
        """Nothing to forget: exit 1, the message on stderr, an empty removal on stdout."""
        for server_name, key_ids in (("a.example", ("ed25519:zz",)), ("nobody.example", ())):
            code, out, err = self.run_keys(
                KeysOptions("forget", server_name, key_ids, yes=True, as_json=True),
                io.StringIO(),
            )
            self.assertEqual(code, 1)
            self.assertIn("nothing stored for %s" % (server_name,), err)
            self.assertEqual(
                json.loads(out), {"server_name": server_name, "key_ids": [], "response_ids": []}
            )
        self.assertEqual(len(self.store.keys["a.example"]), 3)

    def test_declined(self) -> None:
        """The operator answers no: exit 1 and an empty removal on stdout."""
        code, out, _ = self.run_keys(
            KeysOptions("forget", "a.example", ("ed25519:a",), as_json=True), FakeTerminal("n\n")
        )
        self.assertEqual(code, 1)
        self.assertEqual(
            json.loads(out), {"server_name": "a.example", "key_ids": [], "response_ids": []}
        )
        self.assertEqual(len(self.store.keys["a.example"]), 3)
