"""Build the running pieces from the configuration, once, for both entry points.

The standalone server (``server.py``) and the Synapse module (``module.py``) both call
:meth:`KeyringServices.create`; only they choose the reactor. The notary service and the
keyring share one fetcher chain and one per-origin limiter, so an origin sees one fetch
no matter which side asked::

    services = await KeyringServices.create(reactor, config, own_keys)
    root.putChild(b"key", services.key_resource())
    ...
    await services.close()
"""

import logging
from typing import Any, Optional

import attr
from twisted.web.resource import Resource

from keyring_module.config import KeyringConfig
from keyring_module.fetchers.chain import KeyFetcherChain
from keyring_module.fetchers.notary_client import NotaryKeyFetcher
from keyring_module.fetchers.origin import OriginKeyFetcher
from keyring_module.http import FederationHttpClient
from keyring_module.keyring.api import Keyring
from keyring_module.metrics import Metrics, shared_metrics
from keyring_module.model import SOURCE_ORIGIN
from keyring_module.notary.service import NotaryService
from keyring_module.ratelimit import OriginRateLimiter
from keyring_module.resources.key_query import KeyQueryResource
from keyring_module.resources.tree import build_key_resource
from keyring_module.signing import OwnKeys, ServerKeyPublisher
from keyring_module.storage import KeyStore, open_key_store

logger = logging.getLogger(__name__)


@attr.s(auto_attribs=True, slots=True)
class KeyringServices:
    """The shared objects: store, client, limiter, fetcher chain and notary service."""

    config: KeyringConfig
    own_keys: OwnKeys
    publisher: ServerKeyPublisher
    store: KeyStore
    client: FederationHttpClient
    limiter: OriginRateLimiter
    chain: KeyFetcherChain
    notary: Optional[NotaryService]
    metrics: Metrics
    reactor: Any
    keyring: Keyring

    @classmethod
    async def create(
        cls,
        reactor: Any,
        config: KeyringConfig,
        own_keys: OwnKeys,
        *,
        store: Optional[KeyStore] = None,
        client: Optional[FederationHttpClient] = None,
        publisher: Optional[ServerKeyPublisher] = None,
        metrics: Optional[Metrics] = None,
    ) -> "KeyringServices":
        """Open the store and build everything else on ``reactor``.

        Args:
            reactor: the reactor everything schedules on and reads time from.
            config: the parsed configuration.
            own_keys: our signing keys (from ``signing_key_path``).
            store: an already open store (tests); otherwise ``config.database`` is opened.
            client: a federation client (tests); otherwise the real one is built.
            publisher: our ``/server`` publisher, when the caller already serves it
                (the Synapse module registers its resources before the store opens).
            metrics: where to record metrics (tests); the process-wide ones otherwise.

        Raises:
            StorageError: the database cannot be opened or is too new.
        """
        if store is None:
            store = await open_key_store(config.database, reactor, reactor)
        return cls.build(
            reactor, config, own_keys, store, client=client, publisher=publisher, metrics=metrics
        )

    @classmethod
    def build(
        cls,
        reactor: Any,
        config: KeyringConfig,
        own_keys: OwnKeys,
        store: KeyStore,
        *,
        client: Optional[FederationHttpClient] = None,
        publisher: Optional[ServerKeyPublisher] = None,
        metrics: Optional[Metrics] = None,
    ) -> "KeyringServices":
        """Build everything around an open store (no I/O).

        ``metrics`` defaults to the process-wide registry's (the homeserver's inside
        Synapse).
        """
        if metrics is None:
            metrics = shared_metrics()
        if publisher is None:
            publisher = ServerKeyPublisher(own_keys, reactor, config.key_refresh_interval_ms)
        if client is None:
            from keyring_module.http.client import MatrixFederationClient

            client = MatrixFederationClient(reactor, config.federation)
        limiter = OriginRateLimiter(reactor, config.ratelimit)
        metrics.use_clock(reactor)
        metrics.watch_backed_off(limiter.backed_off_origins)
        origin_fetcher = OriginKeyFetcher(client, limiter, reactor, metrics=metrics)
        # One fetcher per notary: each is its own source for the trust policy's timeout.
        notary_fetchers = [
            NotaryKeyFetcher(client, [server], limiter, reactor)
            for server in config.trusted_key_servers
        ]
        chain = KeyFetcherChain(
            store,
            origin_fetcher,
            notary_fetchers,
            reactor,
            order=config.key_fetch_order,
            trust=config.key_trust,
            timeout_ms=config.federation.request_timeout_ms,
            on_conflict=lambda conflict: metrics.key_conflicts.inc(),
        )
        chain.on_stored = lambda source: metrics.keys_stored.labels(
            "origin" if source == SOURCE_ORIGIN else "notary"
        ).inc()
        notary = None
        if config.notary.enabled:
            notary = NotaryService(
                own_keys,
                publisher,
                store,
                chain,
                reactor,
                config.federation.request_timeout_ms,
                metrics=metrics,
            )
        keyring = Keyring(
            own_keys,
            store,
            chain,
            reactor,
            compromised_keys=frozenset(config.key_trust.compromised_keys),
            origin_chain=cls._request_auth_chain(reactor, config, store, origin_fetcher, chain),
            fetch_timeout_ms=2 * config.federation.request_timeout_ms + 10_000,
            metrics=metrics,
        )
        return cls(
            config,
            own_keys,
            publisher,
            store,
            client,
            limiter,
            chain,
            notary,
            metrics,
            reactor,
            keyring,
        )

    @staticmethod
    def _request_auth_chain(
        reactor: Any,
        config: KeyringConfig,
        store: KeyStore,
        origin_fetcher: OriginKeyFetcher,
        chain: KeyFetcherChain,
    ) -> KeyFetcherChain:
        """Keys for X-Matrix request signatures come from the origin only (MSC4029).

        When the operator asks for corroboration (``min_agreeing_sources`` > 1), a single
        origin answer cannot be enough, so the main chain (with its notaries) is used.
        """
        if config.key_trust.min_agreeing_sources > 1:
            return chain
        return KeyFetcherChain(
            store,
            origin_fetcher,
            None,
            reactor,
            order=("origin",),
            timeout_ms=config.federation.request_timeout_ms,
        )

    def query_resource(self) -> Optional[Resource]:
        """``/_matrix/key/v2/query``, or None when the notary is disabled."""
        if self.notary is None:
            return None
        return KeyQueryResource(self.notary, self.config.notary, self.reactor, self.metrics)

    def key_resource(self) -> Resource:
        """The resource for ``/_matrix/key``: ``v2/server``, and ``v2/query`` if enabled."""
        return build_key_resource(self.publisher, self.query_resource())

    async def close(self) -> None:
        """Close the store and drop pooled connections."""
        close_client = getattr(self.client, "close", None)
        if close_client is not None:
            await close_client()
        await self.store.close()
