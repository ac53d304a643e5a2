"""The supervisor's own listening sockets: a port it cannot take is reported in the
words the single-process server uses."""

import socket
from typing import Any, cast

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.config import KeyringConfig, ListenerConfig
from keyring_module.server import StartupError
from keyring_module.supervisor import Supervisor


class SupervisorBindTests(SynchronousTestCase):
    def test_port_in_use_names_the_listener_and_the_likely_cause(self) -> None:
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = KeyringConfig(
            signing_key_path="k.key",
            server_name="example.org",
            listeners=(ListenerConfig(port=port, bind_addresses=("127.0.0.1",)),),
        )
        supervisor = Supervisor(cast(Any, MemoryReactorClock()), config, "c.yaml", workers=2)
        with self.assertRaises(StartupError) as caught:
            supervisor._bind()
        self.assertEqual(
            str(caught.exception),
            "listeners.0: cannot listen on 127.0.0.1 port %d: Address already in use "
            "(is another server running?)" % (port,),
        )
