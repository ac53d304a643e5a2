"""keyring_module: Matrix server signing keys, trustworthy and cheap.

Publishes a server's own keys (``GET /_matrix/key/v2/server``), runs a notary
(``/_matrix/key/v2/query``), and fetches, caches and verifies other servers' keys.
Run it standalone with ``keyring-module serve --config sample_config.yaml``.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
