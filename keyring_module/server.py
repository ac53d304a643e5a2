"""The standalone key server: ``keyring-module serve --config sample_config.yaml``.

:class:`KeyServer` wires the pieces on a given reactor (tests pass a fake one):
our own keys and ``/server``, the key store, the notary (when enabled) and the
listeners. :func:`run` is the process entry point: it picks the real reactor, logs one
line per listener when ready, and stops cleanly on SIGTERM/SIGINT (exit status 0).
With ``workers: N`` (N > 1) the CLI runs :mod:`keyring_module.supervisor` instead,
whose workers (:mod:`keyring_module.worker`) each run a :class:`KeyServer`.
"""

import logging
import sys
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Optional

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IOpenSSLContextFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from keyring_module.clock import KeyringReactor, global_reactor
from keyring_module.config import KeyringConfig, ListenerConfig, MetricsConfig
from keyring_module.config_values import Path
from keyring_module.errors import ConfigError
from keyring_module.gc_policy import ReactorGarbageCollector
from keyring_module.http import TLSError
from keyring_module.resources.federation_basics import add_federation_basics
from keyring_module.resources.health import HealthResource
from keyring_module.resources.site import KeyServerSite
from keyring_module.resources.tree import build_root
from keyring_module.server_tls import TLSFilesError, load_tls_server_context
from keyring_module.signals import install_stop_handlers
from keyring_module.signing import OwnKeys, key_id_of, load_or_create_signing_keys
from keyring_module.storage.errors import StorageError
from keyring_module.wiring import KeyringServices

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

logger = logging.getLogger(__name__)


class StartupError(Exception):
    """The server could not start (port in use, unreadable TLS files...)."""


def log_listening(tls: bool, host: str, port: int, own_keys: OwnKeys) -> None:
    """Log the line that says a listener is ready (one per listener and address)."""
    shown = "[%s]" % host if ":" in host else host
    logger.info(
        "Listening on %s://%s:%d for %s (keys %s)",
        "https" if tls else "http",
        shown,
        port,
        own_keys.server_name,
        ", ".join(key_id_of(k) for k in own_keys.signing_keys),
    )


@implementer(IOpenSSLContextFactory)
class TLSServerContextFactory:
    """A TLS (1.2+) server context from PEM files; the certificate file may hold a chain.

    Raises:
        StartupError: a file is missing, unreadable or not PEM, or the key does not
            match (one ``path.to.key: problem`` line each; see
            :func:`~keyring_module.server_tls.load_tls_server_context`).
    """

    def __init__(
        self, certificate_path: str, private_key_path: str, setting_path: Path = ()
    ) -> None:
        try:
            self._context = load_tls_server_context(
                certificate_path, private_key_path, setting_path
            )
        except TLSFilesError as e:
            # The same words as check-config (keyring_module.startup_checks).
            raise StartupError(str(e)) from None

    def getContext(self) -> SSL.Context:
        return self._context


class KeyServer:
    """Everything the standalone server runs, built on an injected reactor.

    The config's file paths are used as they are (``load_config_file`` has already made
    relative ones absolute: data paths under ``data_dir``, others under the config
    file's folder). The CLI runs :mod:`keyring_module.startup_checks` before building
    it, so a bad file is reported before anything is created or listened on.

    Example::

        server = KeyServer(reactor, load_config_file("/etc/keyring/keyring.yaml"))
        ports = await server.start()   # listening
        await server.stop()
    """

    def __init__(self, reactor: KeyringReactor, config: KeyringConfig) -> None:
        assert config.server_name is not None, "standalone config has a server_name"
        self._reactor = reactor
        self.config = config
        signing_keys = load_or_create_signing_keys(config.signing_key_path)
        self.own_keys = OwnKeys(config.server_name, signing_keys, config.old_signing_keys)
        self.ports: list[IListeningPort] = []
        self.services: Optional[KeyringServices] = None
        self.site: Optional[KeyServerSite] = None

    def build_site(self, services: KeyringServices) -> KeyServerSite:
        """The HTTP site with ``/_matrix/key/...``, ``/health``, the federation version
        and the configured ``.well-known``, under the ``inbound:`` connection limits."""
        root = build_root(services.key_resource(), HealthResource(self.health_check(services)))
        add_federation_basics(root, self.config.well_known)
        return KeyServerSite(
            root,
            max_request_body=self.config.notary.max_request_body,
            inbound=self.config.inbound,
            reactor=self._reactor,
        )

    def health_check(self, services: KeyringServices) -> Callable[[], Awaitable[None]]:
        """What ``/health`` runs: a trivial store query (a worker adds the others' state)."""
        return services.store.check_health

    async def start(self) -> list[IListeningPort]:
        """Open the store, then every configured listener.

        Raises:
            StartupError: the database cannot be used, or a listener cannot listen.
        """
        try:
            self.services = await KeyringServices.create(self._reactor, self.config, self.own_keys)
        except StorageError as e:
            raise StartupError("database: %s" % (e,)) from None
        except TLSError as e:
            raise StartupError("federation.ca_file: %s" % (e,)) from None
        site = self.site = self.build_site(self.services)
        try:
            for index, listener in enumerate(self.config.listeners):
                for address in listener.bind_addresses:
                    self.ports.append(self._listen(index, listener, address, site))
            if self.config.metrics.enabled:
                self._listen_metrics(self.services)
        except StartupError:
            await self.stop()
            raise
        return self.ports

    def _listen(
        self, index: int, listener: ListenerConfig, address: str, site: KeyServerSite
    ) -> IListeningPort:
        try:
            if listener.tls:
                factory = tls_context_of(index, listener)
                port = self._reactor.listenSSL(listener.port, site, factory, interface=address)
            else:
                port = self._reactor.listenTCP(listener.port, site, interface=address)
        except CannotListenError as e:
            raise StartupError(
                "listeners.%d: cannot listen on %s port %d: %s%s"
                % (index, address, listener.port, e.socketError, _hint(e, listener.port))
            ) from None
        host = port.getHost()
        log_listening(listener.tls, host.host, host.port, self.own_keys)
        return port  # type: ignore[no-any-return]

    def _listen_metrics(self, services: KeyringServices) -> None:
        """Serve ``/metrics`` (Prometheus text format) on the metrics listener."""
        self.ports.extend(
            listen_metrics(self._reactor, self.config.metrics, services.metrics.registry)
        )

    async def stop(self) -> None:
        """Close the listeners and drop open connections, then close the store and
        outbound connections."""
        ports, self.ports = self.ports, []
        await defer.gatherResults(
            [defer.maybeDeferred(p.stopListening) for p in ports], consumeErrors=True
        )
        site, self.site = self.site, None
        if site is not None:
            await site.drop_connections()
        services, self.services = self.services, None
        if services is not None:
            await services.close()


def listen_metrics(
    reactor: Any, metrics: MetricsConfig, registry: "CollectorRegistry"
) -> list[IListeningPort]:
    """Serve ``registry`` as ``/metrics`` (Prometheus text format) on each of the
    metrics listener's addresses; logs one line per address. Shared by ``serve`` and
    its supervisor.

    Raises:
        StartupError: an address cannot be listened on (the ports already opened are
            closed), e.g. ``metrics: cannot listen on 127.0.0.1 port 9100: [Errno 98]
            Address already in use (is another server running?)``.
    """
    from keyring_module.resources.metrics_site import build_metrics_site

    site = build_metrics_site(registry)
    ports: list[IListeningPort] = []
    for address in metrics.bind_addresses:
        try:
            port = reactor.listenTCP(metrics.port, site, interface=address)
        except CannotListenError as e:
            for opened in ports:
                opened.stopListening()
            raise StartupError(
                "metrics: cannot listen on %s port %d: %s%s"
                % (address, metrics.port, e.socketError, _hint(e, metrics.port))
            ) from None
        host = port.getHost()
        logger.info("Serving metrics on http://%s:%d/metrics", host.host, host.port)
        ports.append(port)
    return ports


def _hint(error: CannotListenError, port: int) -> str:
    """The likely cause of a listen failure, e.g. ``" (is another server running?)"``."""
    from keyring_module.privileged_ports import listen_failure_hint, unprivileged_port_start

    error_number = getattr(error.socketError, "errno", None)
    return listen_failure_hint(error_number, port, unprivileged_port_start())


def tls_context_of(index: int, listener: ListenerConfig) -> "TLSServerContextFactory":
    """The TLS context of ``listeners[index]`` (which has ``tls`` set)."""
    assert listener.tls_certificate_path and listener.tls_private_key_path
    return TLSServerContextFactory(
        listener.tls_certificate_path, listener.tls_private_key_path, ("listeners", str(index))
    )


def report_startup_failure(failure: Failure, prefix: str = "keyring-module") -> None:
    """Print why startup failed on stderr: a known problem's lines (each as
    ``prefix: line``), anything else with its traceback. Shared by ``serve`` and its
    workers."""
    if failure.check(StartupError, ConfigError):
        for line in str(failure.value).splitlines():
            print("%s: %s" % (prefix, line), file=sys.stderr)
    else:
        print("%s: startup failed:\n%s" % (prefix, failure.getTraceback()), file=sys.stderr)


def run_reactor(
    reactor: Any, start: Callable[[], None], shutdown: Callable[[], "defer.Deferred[None]"]
) -> None:
    """Run ``reactor`` until SIGTERM/SIGINT (stopping once): ``start`` once it runs,
    ``shutdown`` before it stops. Shared by ``serve`` and its workers."""
    reactor.callWhenRunning(install_stop_handlers, reactor)
    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", shutdown)
    reactor.run()


def run(config: KeyringConfig) -> int:
    """Run the standalone server on the real reactor until SIGTERM/SIGINT.

    Once it listens, garbage collection is driven by the reactor
    (:class:`~keyring_module.gc_policy.ReactorGarbageCollector`), as in Synapse.

    Returns the process exit status: 0 after a clean stop, 1 when startup failed.
    """
    reactor = global_reactor()
    status = {"code": 0}
    try:
        server = KeyServer(reactor, config)
    except (ConfigError, OSError) as e:
        print("keyring-module: %s" % (e,), file=sys.stderr)
        return 1

    def started_failed(failure: Failure) -> None:
        status["code"] = 1
        report_startup_failure(failure)
        reactor.stop()

    collector = ReactorGarbageCollector(reactor)

    def start() -> None:
        d = defer.ensureDeferred(server.start())
        d.addCallback(lambda _: collector.start())
        d.addErrback(started_failed)

    def shutdown() -> "defer.Deferred[None]":
        logger.info("Shutting down")
        collector.stop()
        return defer.ensureDeferred(server.stop())

    run_reactor(reactor, start, shutdown)
    return status["code"]
