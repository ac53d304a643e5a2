"""The supervisor's startup problems are reported as known problems (one line, no
traceback): a run folder it cannot create."""

import os
import tempfile
from typing import Any, cast

from twisted.internet import reactor as global_reactor
from twisted.trial.unittest import TestCase

from keyring_module.config import KeyringConfig, ListenerConfig
from keyring_module.server import StartupError
from keyring_module.supervisor import Supervisor


def _supervisor(**config: Any) -> Supervisor:
    return Supervisor(
        cast(Any, global_reactor),
        KeyringConfig(
            signing_key_path="k.key",
            server_name="example.org",
            listeners=(ListenerConfig(port=8448),),
            **config,
        ),
        "/etc/keyring.yaml",
        workers=2,
    )


class RunFolderTests(TestCase):
    def test_an_unwritable_temporary_folder_is_a_startup_error(self) -> None:
        """When the run folder cannot be made (here the temporary folder is a file),
        the supervisor raises StartupError naming the cause, not a bare OSError."""
        not_a_folder = self.mktemp()
        with open(not_a_folder, "w"):
            pass
        self.patch(tempfile, "tempdir", not_a_folder)
        with self.assertRaises(StartupError) as caught:
            _supervisor()._make_run_dir()
        self.assertIn("cannot create the workers' run folder", str(caught.exception))

    def test_the_run_folder_holds_metrics_and_health(self) -> None:
        """The run folder is made with its two folders, in the temporary folder."""
        parent = self.mktemp()
        os.mkdir(parent)
        self.patch(tempfile, "tempdir", parent)
        run_dir = _supervisor()._make_run_dir()
        self.assertEqual(os.path.dirname(run_dir), parent)
        self.assertEqual(sorted(os.listdir(run_dir)), ["health", "metrics"])
