"""A real Synapse puts our fetcher in place when it loads the module, before it listens.

With ``use_module_fetchers`` on, the module installs its fetcher from its ``__init__``
(Synapse calls it in ``start()``, after ``hs.setup()``, before the listeners start), so
no request Synapse serves is verified with its own fetchers while our key store opens;
lookups made meanwhile wait for the store (``tests/test_synapse_switch_safety.py``).
"""

from interop.harness import InteropTestCase
from interop.test_synapse_fetchers import INSTALLED_LINE, NOT_INSTALLED_LINE

#: Logged by Synapse once its listeners are up.
LISTENING_LINE = "Synapse now listening on TCP port"
#: Logged by our module once its key store is open.
STORE_READY_LINE = "keyring_module key store ready"


class FetcherAtLoadTests(InteropTestCase):
    async def test_installed_before_synapse_listens_and_before_the_store_is_open(self) -> None:
        """Our INFO line comes before Synapse's first listening line and our store's."""
        homeserver = await self.start_synapse(
            keyring_module={"synapse_keyring": {"use_module_fetchers": True}}
        )
        with open(homeserver.log_path, encoding="utf8", errors="replace") as f:
            log = f.read()
        self.assertNotIn(NOT_INSTALLED_LINE, log)
        installed = log.find(INSTALLED_LINE)
        self.assertGreaterEqual(installed, 0, log[-2000:])
        self.assertLess(installed, log.find(LISTENING_LINE))
        self.assertLess(installed, log.find(STORE_READY_LINE))
