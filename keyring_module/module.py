"""The Synapse entry point: ``keyring_module.KeyringModule``.

In ``homeserver.yaml``::

    modules:
      - module: keyring_module.KeyringModule
        config:
          signing_key_path: "/data/homeserver.signing.key"   # the homeserver's own key file
          database: {backend: sqlite, path: "/data/keyring.db"}
          trusted_key_servers: []

The module registers ``/_matrix/key`` itself, replacing Synapse's key endpoints on every
listener (a module path *below* ``/_matrix/key/`` would be shadowed by Synapse's own
leaf resource), and serves ``v2/server`` with the homeserver's key and server name, and
the notary at ``v2/query``. Once ``module.ready`` has fired, ``module.keyring`` (a
:class:`~keyring_module.keyring.Keyring`) verifies signed JSON, events and X-Matrix
requests for other modules, and ``module.services`` holds the shared store, fetcher
chain and limiter.

With ``synapse_keyring: {use_module_fetchers: true}`` the homeserver's own key lookups
go through our keyring too: our fetcher is put in place when the module is loaded,
before Synapse listens, and answers once the key store is open (lookups wait for it; if
it fails to open, Synapse's own fetchers are put back). At shutdown Synapse's fetchers
are put back before the store closes. See :mod:`keyring_module.synapse_adapter`, the
one module that imports Synapse, and only then. Otherwise nothing here imports Synapse:
the package works without it.
"""

import logging
from typing import TYPE_CHECKING, Any, Optional, cast

import attr
from twisted.internet import defer
from twisted.python.failure import Failure

from keyring_module.clock import KeyringReactor, global_reactor
from keyring_module.config import KeyringConfig, parse_config
from keyring_module.config_file import resolve_data_paths
from keyring_module.keyring.api import Keyring
from keyring_module.metrics import shared_metrics
from keyring_module.resources.tree import StartingResource, build_key_resource
from keyring_module.signing import OwnKeys, ServerKeyPublisher, key_id_of, load_signing_keys
from keyring_module.startup_checks import check_startup
from keyring_module.wiring import KeyringServices

if TYPE_CHECKING:
    from synapse.module_api import ModuleApi

    from keyring_module.synapse_adapter import InstalledFetcher

logger = logging.getLogger(__name__)


def homeserver_reactor(api: Any) -> KeyringReactor:
    """The homeserver's reactor (Synapse keeps it on the HomeServer object)."""
    hs = getattr(api, "_hs", None)
    if hs is not None and hasattr(hs, "get_reactor"):
        return cast(KeyringReactor, hs.get_reactor())
    return global_reactor()


class KeyringModule:
    """Serves our key endpoints inside Synapse.

    Args:
        config: the parsed module config (see :meth:`parse_config`).
        api: Synapse's ``ModuleApi``.
    """

    def __init__(self, config: KeyringConfig, api: "ModuleApi") -> None:
        self._api = api
        self._reactor = homeserver_reactor(api)
        self.config = attr.evolve(config, server_name=api.server_name)
        signing_keys = load_signing_keys(config.signing_key_path)
        self.own_keys = OwnKeys(api.server_name, signing_keys, config.old_signing_keys)
        self.publisher = ServerKeyPublisher(
            self.own_keys, self._reactor, config.key_refresh_interval_ms
        )
        self._query = StartingResource() if config.notary.enabled else None
        # Synapse only accepts web resources during __init__.
        api.register_web_resource("/_matrix/key", build_key_resource(self.publisher, self._query))
        self.services: Optional[KeyringServices] = None
        self.keyring: Optional[Keyring] = None
        self.ready: "defer.Deferred[None]" = defer.Deferred()
        self._installed: "Optional[InstalledFetcher]" = None
        if config.synapse_keyring.use_module_fetchers:
            # Imported only now: the adapter is the one module that imports Synapse.
            # Installed before Synapse listens; lookups wait until the store is open.
            from keyring_module.synapse_adapter import install_module_fetcher

            self._installed = install_module_fetcher(
                api,
                None,
                shared_metrics(),  # what KeyringServices.create counts into too
                self._reactor,
                trusted_key_servers=[s.server_name for s in config.trusted_key_servers],
            )
        self._reactor.callWhenRunning(self._start)
        logger.info(
            "keyring_module serving /_matrix/key for %s with %s",
            api.server_name,
            ", ".join(key_id_of(k) for k in signing_keys),
        )

    @staticmethod
    def parse_config(config: Any) -> KeyringConfig:
        """Parse the ``config:`` block and run the start-up checks that apply inside
        Synapse (the signing key file, key ids, the SQLite folder, the CA file; see
        :mod:`keyring_module.startup_checks`); Synapse reports any exception as a config
        error. Relative data paths resolve under ``data_dir`` when it is given, other
        relative paths under the working directory.

        Raises:
            ConfigError: a bad value, or
                :class:`~keyring_module.startup_checks.StartupProblems` listing every
                start-up problem (one ``path.to.key: problem`` line each).
        """
        parsed = parse_config(config if config is not None else {}, standalone=False)
        if parsed.data_dir is not None:
            parsed = resolve_data_paths(parsed, parsed.data_dir)
        check_startup(parsed, standalone=False)
        return parsed

    def _start(self) -> None:
        d = defer.ensureDeferred(self._open())
        d.addErrback(self._failed)

    async def _open(self) -> None:
        self.services = await KeyringServices.create(
            self._reactor, self.config, self.own_keys, publisher=self.publisher
        )
        self.keyring = self.services.keyring
        if self._query is not None:
            self._query.target = self.services.query_resource()
        self._reactor.addSystemEventTrigger("before", "shutdown", self._close)
        logger.info("keyring_module key store ready (%s)", self.config.database.backend)
        if self._installed is not None:
            self._installed.use(self.services.keyring)
        self.ready.callback(None)

    def _failed(self, failure: Failure) -> None:
        fetchers = ""
        if self._installed is not None:
            self._installed.give_up()
            fetchers = (
                "; synapse_keyring.use_module_fetchers is not in effect: the homeserver's"
                " keyring uses Synapse's own key fetchers again"
            )
        logger.error(
            "keyring_module could not open its key store; /_matrix/key/v2/query answers 503%s: %s",
            fetchers,
            failure.getErrorMessage(),
        )
        self.ready.errback(failure)

    def _close(self) -> "defer.Deferred[None]":
        # Synapse still serves requests now ("before" shutdown): its own fetchers
        # answer them once our store is closed.
        if self._installed is not None:
            self._installed.give_up()
        services, self.services = self.services, None
        if services is None:
            return defer.succeed(None)
        return defer.ensureDeferred(services.close())
