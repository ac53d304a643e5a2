"""Quiet logs: no factory start/stop lines per outbound connection, no INFO access
lines for /metrics and /health, Twisted's port and DNS chatter at DEBUG.

These run on the real reactor over 127.0.0.1 only, each bounded by a short timeout.
"""

import ipaddress
import logging
import socket
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IListeningPort
from twisted.logger import (
    ILogObserver,
    LogEvent,
    LogLevel,
    STDLibLogObserver,
    formatEvent,
    globalLogPublisher,
)
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from keyring_module.config import FederationConfig
from keyring_module.http.client import MatrixFederationClient
from keyring_module.http.pool import QuietHTTPConnectionPool
from keyring_module.resources.health import HealthResource
from keyring_module.resources.metrics_site import build_metrics_site
from keyring_module.resources.site import KeyServerSite
from keyring_module.resources.tree import build_root
from keyring_module.twisted_logs import ChatterDemotingObserver, is_chatter
from tests.tls_helpers import (
    FakeHostnameResolver,
    FakeSrvResolver,
    JsonResource,
    listen_tls,
    make_ca,
    write_ca_pem,
)


@implementer(ILogObserver)
class EventRecorder:
    """Collects the formatted text and level of every Twisted log event while added."""

    def __init__(self) -> None:
        self.events: list[tuple[LogLevel, str]] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append((event.get("log_level", LogLevel.info), formatEvent(event)))

    def texts(self, needle: str) -> list[str]:
        return [text for _, text in self.events if needle in text]


def record_twisted_events(test: TestCase) -> EventRecorder:
    recorder = EventRecorder()
    globalLogPublisher.addObserver(recorder)
    test.addCleanup(globalLogPublisher.removeObserver, recorder)
    return recorder


async def next_turn() -> None:
    """Let the reactor finish what the current call stack started (e.g. a closing
    connection's factory being stopped)."""
    from twisted.internet import reactor

    for _ in range(3):
        await task.deferLater(reactor, 0, lambda: None)


class OutboundFactoryTests(TestCase):
    """Outbound connections log no ``Starting factory`` / ``Stopping factory`` lines."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self.ca = make_ca()
        self.ca_file = write_ca_pem(self.ca, self.mktemp())
        self.port = listen_tls(self.reactor, self.ca, JsonResource(b"{}"), ["127.0.0.1"])
        self.addCleanup(self.port.stopListening)
        address = self.port.getHost()
        assert isinstance(address, IPv4Address)
        self.server = "127.0.0.1:%d" % address.port

    async def test_federation_client_connections_are_quiet(self) -> None:
        """A fetch over a real connection, then closing it, logs no factory lines."""
        recorder = record_twisted_events(self)
        client = MatrixFederationClient(
            self.reactor,
            FederationConfig(
                ip_range_allowlist=(ipaddress.ip_network("127.0.0.1/32"),), ca_file=self.ca_file
            ),
            resolver=FakeHostnameResolver({}),
            srv_resolver=FakeSrvResolver(),
        )
        self.assertEqual(await client.get_json(self.server, "/x"), {})
        await client.close()
        await next_turn()
        self.assertEqual(recorder.texts("factory"), [])

    async def exchange_over(self, pool: HTTPConnectionPool) -> EventRecorder:
        """One plain-HTTP GET on 127.0.0.1 through ``pool``, then closing it; returns the
        Twisted events logged meanwhile."""
        port: IListeningPort = self.reactor.listenTCP(
            0, Site(JsonResource(b"{}")), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        recorder = record_twisted_events(self)
        response = await Agent(self.reactor, pool=pool).request(
            b"GET", b"http://127.0.0.1:%d/x" % address.port
        )
        self.assertEqual(await readBody(response), b"{}")
        await pool.closeCachedConnections()
        await next_turn()
        return recorder

    async def test_quiet_pool_logs_no_factory_lines(self) -> None:
        """The pool the client uses opens and closes a connection without factory lines."""
        recorder = await self.exchange_over(QuietHTTPConnectionPool(self.reactor))
        self.assertEqual(recorder.texts("factory"), [])

    async def test_twisted_pool_would_log_them(self) -> None:
        """Control: Twisted's own pool logs both lines for the same exchange, so the tests
        above would see them."""
        recorder = await self.exchange_over(HTTPConnectionPool(self.reactor))
        self.assertEqual(len(recorder.texts("Starting factory _HTTP11ClientFactory")), 1)
        self.assertEqual(len(recorder.texts("Stopping factory _HTTP11ClientFactory")), 1)


class AccessLogTests(TestCase):
    """``/metrics`` scrapes and ``/health`` checks log no access line at INFO."""

    def listen(self, site: Site) -> int:
        from twisted.internet import reactor as global_reactor

        reactor: Any = global_reactor
        port: IListeningPort = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        return address.port

    async def get(self, url: bytes) -> tuple[int, bytes]:
        from twisted.internet import reactor

        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await Agent(reactor, pool=pool).request(b"GET", url)
        body = await readBody(response)
        await next_turn()
        return response.code, body

    async def test_metrics_scrape_logs_at_debug_only(self) -> None:
        """A scrape of the metrics listener gets the metrics, with its access line at DEBUG."""
        registry = CollectorRegistry()
        Counter("keyring_test_scrapes", "a counter", registry=registry).inc()
        port = self.listen(build_metrics_site(registry))
        recorder = record_twisted_events(self)
        with self.assertLogs(level=logging.DEBUG) as logs:
            code, body = await self.get(b"http://127.0.0.1:%d/metrics" % port)
        self.assertEqual(code, 200)
        self.assertIn(b"keyring_test_scrapes_total 1.0", body)
        access = [r for r in logs.records if "/metrics" in r.getMessage()]
        self.assertEqual([r.levelno for r in access], [logging.DEBUG])
        self.assertEqual(recorder.texts("/metrics"), [], "no Twisted access line")

    async def test_plain_site_would_log_the_scrape(self) -> None:
        """Control: Twisted's own Site logs the same scrape as an INFO event."""
        registry = CollectorRegistry()
        site = build_metrics_site(registry)
        plain = Site(site.resource)
        port = self.listen(plain)
        recorder = record_twisted_events(self)
        await self.get(b"http://127.0.0.1:%d/metrics" % port)
        self.assertEqual(len(recorder.texts('"GET /metrics HTTP/1.1" 200')), 1)

    async def test_health_check_logs_at_debug_only(self) -> None:
        """A /health request on a key listener has its access line at DEBUG, none at INFO."""

        async def healthy() -> None:
            return None

        root = build_root(Resource(), HealthResource(healthy))
        port = self.listen(KeyServerSite(root, max_request_body=1024))
        recorder = record_twisted_events(self)
        with self.assertLogs(level=logging.DEBUG) as logs:
            code, body = await self.get(b"http://127.0.0.1:%d/health" % port)
        self.assertEqual((code, body), (200, b'{"status":"ok"}'))
        access = [r for r in logs.records if "/health" in r.getMessage()]
        self.assertEqual([r.levelno for r in access], [logging.DEBUG])
        self.assertEqual(recorder.texts("/health"), [])


class ChatterTests(TestCase):
    """Twisted's port, protocol and factory start/stop lines reach ``logging`` at DEBUG."""

    async def test_dns_query_chatter_is_debug(self) -> None:
        """A real DNS query (to a silent UDP socket on 127.0.0.1) makes Twisted log four
        lines at INFO; through the demoting observer they all arrive at DEBUG."""
        from twisted.internet import reactor
        from twisted.names import client

        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(silent.close)
        silent.bind(("127.0.0.1", 0))
        recorder = record_twisted_events(self)
        observer = ChatterDemotingObserver(STDLibLogObserver())
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        resolver = client.Resolver(servers=[silent.getsockname()], reactor=reactor)
        with self.assertLogs(level=logging.DEBUG) as logs:
            d = resolver.lookupService("_matrix-fed._tcp.example.org", timeout=[0.2])
            try:
                await d
            except Exception:
                pass  # the silent server never answers: a timeout
            await next_turn()
        chatter = [text for level, text in recorder.events if is_chatter({"log_format": text})]
        self.assertGreaterEqual(len(chatter), 3, recorder.events)
        self.assertTrue(any("UDP Port" in text for text in chatter))
        self.assertTrue(any("Starting protocol" in text for text in chatter))
        demoted = [r for r in logs.records if r.getMessage() in chatter]
        # At least one record per line: another forwarding observer that an earlier test
        # in this process left behind may repeat them, and it must demote them as well.
        self.assertGreaterEqual(len(demoted), len(chatter))
        self.assertEqual({r.levelno for r in demoted}, {logging.DEBUG})

    def test_other_events_keep_their_level(self) -> None:
        """Events that are not start/stop chatter pass unchanged; warnings never demote."""
        seen: list[LogEvent] = []
        observer = ChatterDemotingObserver(seen.append)
        observer({"log_format": "Listening on {where}", "where": "x", "log_level": LogLevel.info})
        observer({"log_format": "Stopping factory {f}", "f": "x", "log_level": LogLevel.warn})
        observer({"log_format": "Stopping factory {f}", "f": "x", "log_level": LogLevel.info})
        observer({"log_format": "Site starting on 8080", "log_level": LogLevel.info})
        self.assertEqual(
            [e["log_level"] for e in seen],
            [LogLevel.info, LogLevel.warn, LogLevel.debug, LogLevel.debug],
        )
