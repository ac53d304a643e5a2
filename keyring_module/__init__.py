"""keyring_module: Matrix server signing keys, trustworthy and cheap.

Publishes a server's own keys (``GET /_matrix/key/v2/server``), runs a notary
(``/_matrix/key/v2/query``), and fetches, caches and verifies other servers' keys.
Load it into Synapse as ``keyring_module.KeyringModule`` or run it standalone with
``keyring-module serve --config sample_config.yaml``.
"""

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["KeyringModule", "__version__"]

if TYPE_CHECKING:
    from keyring_module.module import KeyringModule


def __getattr__(name: str) -> Any:
    # The Synapse adapter is imported on first use, so ``import keyring_module`` stays
    # cheap for the CLI and the standalone server.
    if name == "KeyringModule":
        from keyring_module.module import KeyringModule

        return KeyringModule
    raise AttributeError(name)
