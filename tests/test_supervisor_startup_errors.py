"""The supervisor's startup problems are reported as known problems (one line, no
traceback): a run folder it cannot create, a metrics port in use."""

import os
import socket
import tempfile
from typing import Any, cast

from twisted.internet import reactor as global_reactor
from twisted.trial.unittest import TestCase

from keyring_module.config import KeyringConfig, ListenerConfig, MetricsConfig
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
        # (absolute: from Python 3.12 mkdtemp answers an absolute path)
        parent = os.path.abspath(self.mktemp())
        os.mkdir(parent)
        self.patch(tempfile, "tempdir", parent)
        run_dir = _supervisor()._make_run_dir()
        self.assertEqual(os.path.dirname(run_dir), parent)
        self.assertEqual(sorted(os.listdir(run_dir)), ["health", "metrics"])


class MetricsPortInUseTests(TestCase):
    def test_a_metrics_port_in_use_is_named_once_with_the_hint(self) -> None:
        """The supervisor's metrics listener on a port in use fails with one line
        that names the address and port, the error once, and the likely cause."""
        busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        supervisor = _supervisor(
            metrics=MetricsConfig(enabled=True, port=port, bind_addresses=("127.0.0.1",))
        )
        run_dir = self.mktemp()
        os.makedirs(os.path.join(run_dir, "metrics"))
        supervisor.run_dir = run_dir
        with self.assertRaises(StartupError) as caught:
            supervisor._listen_metrics()
        message = str(caught.exception)
        self.assertTrue(
            message.startswith("metrics: cannot listen on 127.0.0.1 port %d: " % port), message
        )
        self.assertIn("(is another server running?)", message)
        self.assertEqual(message.count("in use"), 1, message)
        self.assertEqual(supervisor._metric_ports, [])
