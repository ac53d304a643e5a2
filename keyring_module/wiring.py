"""The one wiring root: build the running pieces from the configuration.

Every entry point builds through here, and only the entry points choose the reactor:
the standalone server (``server.py``), the Synapse module (``module.py``) and every CLI
command that fetches (``keyring-module query``). This is the only module that constructs
the per-origin limiter, the notary limiter, the global cap on outbound fetches they share
(``federation.max_concurrent_fetches``), the fetchers and the fetcher chains, so an origin
sees one fetch no matter which side asked (the notary and the keyring share them)::

    # serve, and the Synapse module: everything
    services = await KeyringServices.create(reactor, config, own_keys)
    root.putChild(b"key", services.key_resource())
    ...
    await services.close()

    # keyring-module query: the fetch layer alone, optionally asking one source only
    fetching = await Fetching.open(reactor, config, sources=FetchSources.origin_only())
    keys = await fetching.chain.get_keys([KeyRequest("example.org")], use_cache=False)
    await fetching.close()
"""

import logging
from typing import Optional

import attr
from twisted.web.resource import Resource

from keyring_module.blocking import BlockingRunner, WorkerPool, run_inline, worker_pool
from keyring_module.clock import KeyringReactor
from keyring_module.config import KeyringConfig, TrustedKeyServer
from keyring_module.fetch_slots import FetchSlots
from keyring_module.fetchers.chain import NOTARIES, ORIGIN, KeyFetcherChain
from keyring_module.fetchers.notary_client import NotaryKeyFetcher
from keyring_module.fetchers.origin import OriginKeyFetcher
from keyring_module.fetchers.refusal import RefuseReason, denied_ip_literals
from keyring_module.http import FederationHttpClient
from keyring_module.http.ipfilter import IPRangeFilter
from keyring_module.keyring.api import Keyring
from keyring_module.metrics import Metrics, shared_metrics
from keyring_module.model import SOURCE_ORIGIN, KeyConflict
from keyring_module.notary.server_fetches import background_refresh_cap
from keyring_module.notary.service import NotaryService
from keyring_module.notary_limiter import NotaryLimiter
from keyring_module.ratelimit import OriginRateLimiter
from keyring_module.resources.key_query import KeyQueryResource
from keyring_module.resources.tree import build_key_resource
from keyring_module.shared_flights import SharedFlights
from keyring_module.shared_limits import SharedOriginLimits
from keyring_module.signing import OwnKeys, ServerKeyPublisher
from keyring_module.storage import KeyStore, open_key_store
from keyring_module.storage.coordination import coordination_of
from keyring_module.storage.flight_rows import keep_limits_for

logger = logging.getLogger(__name__)


@attr.s(auto_attribs=True, frozen=True, slots=True)
class FetchSources:
    """Which sources the fetcher chain asks, and in which order.

    Attributes:
        order: ``("origin", "notaries")``, ``("notaries", "origin")``, or one of them.
        notaries: the notaries to ask, in configuration order.
        confirm_directly: whether notary-learned keys get a background direct
            confirmation (``key_trust.confirm_notary_keys_directly``); only when the
            origin is one of the sources.

    Example::

        FetchSources.configured(config)              # serve, the module, plain query
        FetchSources.origin_only()                   # keyring-module query --direct
        FetchSources.one_notary(config.trusted_key_servers[0])  # query --notary NAME
    """

    order: tuple[str, ...]
    notaries: tuple[TrustedKeyServer, ...]
    confirm_directly: bool

    @classmethod
    def configured(cls, config: KeyringConfig) -> "FetchSources":
        """``key_fetch_order`` over the configured ``trusted_key_servers``."""
        return cls(
            config.key_fetch_order,
            config.trusted_key_servers,
            config.key_trust.confirm_notary_keys_directly,
        )

    @classmethod
    def origin_only(cls) -> "FetchSources":
        """Each server itself, never a notary."""
        return cls((ORIGIN,), (), False)

    @classmethod
    def one_notary(cls, notary: TrustedKeyServer) -> "FetchSources":
        """One trusted notary, never the origin."""
        return cls((NOTARIES,), (notary,), False)


@attr.s(auto_attribs=True, slots=True)
class Fetching:
    """The fetch layer: store, federation client, per-origin limiter and fetcher chains.

    Attributes:
        store: the key store.
        client: the outbound federation client.
        limiter: the per-origin limiter every origin fetch goes through.
        notary_limiter: the policy every query to an upstream notary goes through.
        fetch_slots: the global cap on outbound fetches, shared by both limiters.
        origin_fetcher: fetches ``/_matrix/key/v2/server`` from the servers themselves.
        notary_fetchers: one per notary asked, in configuration order, each counting
            its queries about each server in a token bucket of its own.
        chain: store, then origins and notaries under the trust policy (events, signed
            JSON, the notary).
        request_auth_chain: the chain for X-Matrix request keys: origins only (MSC4029),
            unless ``min_agreeing_sources`` > 1 asks for corroboration.
        metrics: where fetches, stores and conflicts are counted.
        run_blocking: where heavy work runs: a worker pool of our own (not the
            reactor's thread pool, which name resolution uses), or inline on reactors
            without threads.
        workers: the worker pool built here, stopped by :meth:`close` (None when
            ``run_blocking`` was given, or the reactor runs no threads).
    """

    store: KeyStore
    client: FederationHttpClient
    limiter: OriginRateLimiter
    origin_fetcher: OriginKeyFetcher
    notary_fetchers: list[NotaryKeyFetcher]
    chain: KeyFetcherChain
    request_auth_chain: KeyFetcherChain
    metrics: Metrics
    run_blocking: BlockingRunner
    workers: Optional[WorkerPool] = None
    notary_limiter: Optional[NotaryLimiter] = None
    fetch_slots: Optional[FetchSlots] = None

    @classmethod
    async def open(
        cls,
        reactor: KeyringReactor,
        config: KeyringConfig,
        *,
        store: Optional[KeyStore] = None,
        client: Optional[FederationHttpClient] = None,
        metrics: Optional[Metrics] = None,
        sources: Optional[FetchSources] = None,
    ) -> "Fetching":
        """Open the configured store (unless one is given) and build the fetch layer.

        Raises:
            StorageError: the database cannot be opened or is too new.
        """
        if store is None:
            store = await open_key_store(config.database, reactor, reactor)
            await start_coordination(store)
        return cls.build(reactor, config, store, client=client, metrics=metrics, sources=sources)

    @classmethod
    def build(
        cls,
        reactor: KeyringReactor,
        config: KeyringConfig,
        store: KeyStore,
        *,
        client: Optional[FederationHttpClient] = None,
        metrics: Optional[Metrics] = None,
        sources: Optional[FetchSources] = None,
        run_blocking: Optional[BlockingRunner] = None,
    ) -> "Fetching":
        """Build the fetch layer around an open store (no I/O).

        Args:
            reactor: the reactor everything schedules on and connects with.
            config: the parsed configuration.
            store: the open key store.
            client: a federation client (tests); otherwise the real one is built.
            metrics: where to count (tests); the process-wide registry's otherwise (the
                homeserver's inside Synapse).
            sources: which sources to ask; the configured ones by default.
            run_blocking: where heavy work runs (a benchmark shares one pool between
                several fetch layers); by default a worker pool built here.
        """
        if metrics is None:
            metrics = shared_metrics()
        if sources is None:
            sources = FetchSources.configured(config)
        # Decoding and validating answers (and co-signing big ones) runs in a small
        # thread pool of our own, stopped by close().
        workers = None
        if run_blocking is None:
            workers = worker_pool(reactor)
            run_blocking = workers if workers is not None else run_inline
        if client is None:
            from keyring_module.http.client import MatrixFederationClient

            client = MatrixFederationClient(reactor, config.federation, run_blocking=run_blocking)
        fetch_slots = FetchSlots(config.federation.max_concurrent_fetches)
        limiter = OriginRateLimiter(reactor, config.ratelimit, fetch_slots=fetch_slots)
        notary_limiter = NotaryLimiter(
            reactor, config.ratelimit, fetch_slots=fetch_slots, on_backoff=metrics.notary_backed_off
        )
        metrics.use_clock(reactor)
        metrics.watch_backed_off(limiter.backed_off_origins)
        metrics.watch_notaries_backed_off(notary_limiter.backed_off_notaries)
        metrics.watch_fetch_slots(lambda: fetch_slots.in_use, lambda: fetch_slots.waiting)
        max_keys = config.federation.max_keys_per_response
        # With other processes on the database, one of them fetches each origin at a
        # time (the in-process flight first, then the store's shared flight).
        coordination = coordination_of(store)
        shared = coordination.shared
        keep_limits_for(coordination, config.ratelimit)
        shared_flights = SharedFlights(coordination, reactor) if shared else None
        origin_fetcher = OriginKeyFetcher(
            client,
            limiter,
            reactor,
            metrics=metrics,
            max_keys_per_response=max_keys,
            run_blocking=run_blocking,
            shared_flights=shared_flights,
            shared_limits=(
                SharedOriginLimits(coordination, reactor, config.ratelimit) if shared else None
            ),
        )
        # One fetcher per notary: each is its own source for the trust policy's timeout.
        notary_fetchers = [
            NotaryKeyFetcher(
                client,
                [server],
                notary_limiter,
                reactor,
                metrics=metrics,
                max_keys_per_response=max_keys,
                run_blocking=run_blocking,
                per_server_limiter=OriginRateLimiter(reactor, config.ratelimit),
            )
            for server in sources.notaries
        ]
        chain, request_auth_chain = _build_chains(
            reactor, config, store, origin_fetcher, notary_fetchers, sources, metrics, limiter
        )
        if shared_flights is not None:  # an answer it did not store, it says so
            chain.on_settled = request_auth_chain.on_settled = shared_flights.settled
        return cls(
            store,
            client,
            limiter,
            origin_fetcher,
            notary_fetchers,
            chain,
            request_auth_chain,
            metrics,
            run_blocking,
            workers,
            notary_limiter,
            fetch_slots,
        )

    async def close(self) -> None:
        """Cancel the chains' scheduled confirmations, close the client's idle
        connections and the store, and stop the worker pool."""
        self.chain.close()
        self.request_auth_chain.close()
        try:
            close_client = getattr(self.client, "close", None)
            if close_client is not None:
                await close_client()
            await self.store.close()
        finally:
            if self.workers is not None:
                self.workers.stop()


async def start_coordination(store: KeyStore) -> None:
    """Start the store's coordination with the other processes on its database (news
    of their writes, for the caches and the shared flights), if it has one; the
    store's ``close()`` stops it."""
    await coordination_of(store).start()


def local_refusal(config: KeyringConfig) -> RefuseReason:
    """Our local policy refusing server names: IP literals the federation IP ranges
    deny (see :func:`~keyring_module.fetchers.refusal.denied_ip_literals`)."""
    federation = config.federation
    return denied_ip_literals(
        IPRangeFilter(federation.ip_range_denylist, federation.ip_range_allowlist)
    )


def _build_chains(
    reactor: KeyringReactor,
    config: KeyringConfig,
    store: KeyStore,
    origin_fetcher: OriginKeyFetcher,
    notary_fetchers: list[NotaryKeyFetcher],
    sources: FetchSources,
    metrics: Metrics,
    limiter: OriginRateLimiter,
) -> tuple[KeyFetcherChain, KeyFetcherChain]:
    """The fetcher chain and the chain for X-Matrix request keys (the same one when
    ``min_agreeing_sources`` > 1), counting into the same metrics and writing one
    rate-limited conflict log. Both refuse server names that are IP literals the
    federation IP ranges deny; direct confirmations follow the limiter's schedule."""

    def count_stored(source: str) -> None:
        metrics.keys_stored.labels("origin" if source == SOURCE_ORIGIN else "notary").inc()

    def count_conflict(conflict: KeyConflict) -> None:
        metrics.key_conflicts.inc()

    timeout_ms = config.federation.request_timeout_ms
    refuse_reason = local_refusal(config)
    chain = KeyFetcherChain(
        store,
        origin_fetcher,
        notary_fetchers,
        reactor,
        order=sources.order,
        trust=attr.evolve(config.key_trust, confirm_notary_keys_directly=sources.confirm_directly),
        timeout_ms=timeout_ms,
        on_conflict=count_conflict,
        on_stored=count_stored,
        refuse_reason=refuse_reason,
        # Direct confirmations are not marked as ours: they keep the reserve.
        retry_after_ms=limiter.keeping_reserve().retry_after_ms,
        confirm_retry_ms=config.ratelimit.failure_backoff_initial_ms,
    )
    if config.key_trust.min_agreeing_sources > 1:
        return chain, chain
    # Keys for X-Matrix request signatures come from the origin only (MSC4029);
    # corroboration (N > 1) cannot come from a single origin answer.
    request_auth_chain = KeyFetcherChain(
        store,
        origin_fetcher,
        None,
        reactor,
        order=(ORIGIN,),
        timeout_ms=timeout_ms,
        on_conflict=count_conflict,
        on_stored=count_stored,
        conflict_log=chain.conflict_log,
        refuse_reason=refuse_reason,
    )
    return chain, request_auth_chain


@attr.s(auto_attribs=True, slots=True)
class KeyringServices:
    """Everything ``serve`` and the Synapse module run: our keys and ``/server``, the
    fetch layer, the notary service (when enabled) and the keyring.

    Attributes:
        fetching: the store, client, limiter and chains shared by the notary and the
            keyring.
        notary: the notary service, or None when ``notary.enabled`` is false.
    """

    config: KeyringConfig
    own_keys: OwnKeys
    publisher: ServerKeyPublisher
    fetching: Fetching
    notary: Optional[NotaryService]
    keyring: Keyring
    reactor: KeyringReactor

    @classmethod
    async def create(
        cls,
        reactor: KeyringReactor,
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
            await start_coordination(store)
        return cls.build(
            reactor, config, own_keys, store, client=client, publisher=publisher, metrics=metrics
        )

    @classmethod
    def build(
        cls,
        reactor: KeyringReactor,
        config: KeyringConfig,
        own_keys: OwnKeys,
        store: KeyStore,
        *,
        client: Optional[FederationHttpClient] = None,
        publisher: Optional[ServerKeyPublisher] = None,
        metrics: Optional[Metrics] = None,
    ) -> "KeyringServices":
        """Build everything around an open store (no I/O)."""
        fetching = Fetching.build(reactor, config, store, client=client, metrics=metrics)
        if publisher is None:
            publisher = ServerKeyPublisher(own_keys, reactor, config.key_refresh_interval_ms)
        notary = None
        if config.notary.enabled:
            notary = NotaryService(
                own_keys,
                publisher,
                store,
                fetching.chain,
                reactor,
                config.federation.request_timeout_ms,
                metrics=fetching.metrics,
                config=config.notary,
                runner=fetching.run_blocking,
                # Without trusted notaries, a backed-off origin's server cannot be
                # fetched: it spends none of a request's fetch budget.
                origin_retry_after_ms=(
                    None
                    if fetching.notary_fetchers
                    else fetching.limiter.keeping_reserve().retry_after_ms
                ),
                max_background_refreshes=background_refresh_cap(
                    config.federation.max_concurrent_fetches
                ),
                # Names the chain refuses at once spend none of a request's budget.
                refuse_reason=local_refusal(config),
            )
        keyring = Keyring(
            own_keys,
            store,
            fetching.chain,
            reactor,
            compromised_keys=frozenset(config.key_trust.compromised_keys),
            origin_chain=fetching.request_auth_chain,
            fetch_timeout_ms=2 * config.federation.request_timeout_ms + 10_000,
            metrics=fetching.metrics,
        )
        return cls(config, own_keys, publisher, fetching, notary, keyring, reactor)

    @property
    def store(self) -> KeyStore:
        """The key store."""
        return self.fetching.store

    @property
    def metrics(self) -> Metrics:
        """Where everything is counted."""
        return self.fetching.metrics

    def query_resource(self) -> Optional[Resource]:
        """``/_matrix/key/v2/query``, or None when the notary is disabled."""
        if self.notary is None:
            return None
        return KeyQueryResource(
            self.notary,
            self.config.notary,
            self.reactor,
            self.metrics,
            runner=self.fetching.run_blocking,
        )

    def key_resource(self) -> Resource:
        """The resource for ``/_matrix/key``: ``v2/server``, and ``v2/query`` if enabled."""
        return build_key_resource(self.publisher, self.query_resource())

    async def close(self) -> None:
        """Close outbound connections and the store, and stop the worker pool."""
        await self.fetching.close()
