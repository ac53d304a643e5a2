"""The Twisted ``Site`` used by the standalone server.

What differs from Twisted's defaults:

* request bodies are capped while they arrive (``notary.max_request_body``): a larger
  body gets 413 ``M_TOO_LARGE`` and the connection is closed, nothing is buffered;
* connections have idle, header and send deadlines that traffic does not reset
  (:mod:`keyring_module.resources.channel`), and each client address may have at most
  ``inbound.max_connections_per_address`` open (:mod:`keyring_module.resources.per_address`);
* the bytes big answers hold until their clients have read them count toward
  ``inbound.max_buffered_response_bytes``, each client address within a quarter of it
  (:mod:`keyring_module.resources.body_producer`);
* no access-log line per request at INFO (only at DEBUG), so a busy notary's log stays
  readable.

Example::

    site = KeyServerSite(root, max_request_body=64 * 1024, inbound=InboundConfig(),
                         reactor=reactor)
    reactor.listenTCP(8080, site, interface="127.0.0.1")
"""

import io
import logging
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from keyring_module.clock import ReactorClock
from keyring_module.config import InboundConfig
from keyring_module.errors import RequestError
from keyring_module.resources._json import error_body
from keyring_module.resources.body_producer import SiteResponseBudget
from keyring_module.resources.channel import GuardedHTTPChannel
from keyring_module.resources.per_address import (
    ConnectionsPerAddress,
    RefusedConnection,
    client_key,
)

logger = logging.getLogger(__name__)


def log_request_at_debug(log: logging.Logger, request: Request) -> None:
    """A site's access line, at DEBUG only (operators read the metrics, not one line
    per request): ``<client> GET '/_matrix/key/v2/server' -> 200``."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            "%s %s %r -> %d",
            request.getClientAddress(),
            request.method.decode("ascii", "replace"),
            request.uri,
            request.code,
        )


class SizeLimitedRequest(Request):
    """A request that refuses bodies larger than its site's ``max_request_body``, and
    waits to be processed while its client has not read the previous answer."""

    def gotLength(self, length: int | None) -> None:
        limit = self._limit()
        if length is not None and length > limit:
            self._refuse_too_large(limit)
            return
        super().gotLength(length)
        self._body_bytes = 0

    def process(self) -> None:
        if getattr(self, "_refused", False):
            return  # the 413 answer was already written and the connection is closing
        if isinstance(self.channel, GuardedHTTPChannel):
            self.channel.process_when_caught_up(self._process_if_connected)
        else:
            super().process()

    def _process_if_connected(self) -> None:
        if not self._disconnected:
            super().process()

    def handleContentChunk(self, data: bytes) -> None:
        if getattr(self, "_refused", False):
            return
        self._body_bytes = getattr(self, "_body_bytes", 0) + len(data)
        limit = self._limit()
        if self._body_bytes > limit:
            self._refuse_too_large(limit)
            return
        super().handleContentChunk(data)

    def _limit(self) -> int:
        site = getattr(self.channel, "site", None)
        return int(getattr(site, "max_request_body", 64 * 1024))

    def _refuse_too_large(self, limit: int) -> None:
        self._refused = True
        self.content = io.BytesIO()
        body = error_body(
            RequestError(413, "M_TOO_LARGE", "Request body is larger than %d bytes" % limit)
        )
        logger.info("Refused a request body over %d bytes", limit)
        # Answer directly on the transport (the request has not been parsed yet) and
        # close the connection, so the rest of the body is never read.
        transport = self.channel.transport if self.channel is not None else None
        if transport is None:
            return
        transport.write(
            b"HTTP/1.1 413 Payload Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Connection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        transport.loseConnection()


class KeyServerSite(Site):
    """A ``Site`` with the request body cap, the ``inbound:`` limits and a quiet access log.

    Args:
        resource: the root resource.
        max_request_body: ``notary.max_request_body``.
        inbound: the connection limits (None: the defaults).
        reactor: runs the connection deadlines (None: the global reactor).
        **kwargs: passed to ``Site``.

    Attributes:
        response_budget: the bytes big answers hold until their clients have read
            them, against ``inbound.max_buffered_response_bytes`` (each client address
            within a quarter of it, unless ``max_connections_per_address`` is 0).
        connections: open connections per client address.
    """

    requestFactory = SizeLimitedRequest
    # HTTP/1.1 only (no ALPN is offered, so Twisted's HTTP/2 switch was never used).
    protocol = GuardedHTTPChannel  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        resource: Resource,
        max_request_body: int,
        inbound: Optional[InboundConfig] = None,
        reactor: Optional[ReactorClock] = None,
        **kwargs: Any,
    ) -> None:
        # timeout=None: Twisted's idle timeout (reset by every byte) is replaced by the
        # channel's own deadlines.
        super().__init__(resource, timeout=None, reactor=reactor, **kwargs)
        self.max_request_body = max_request_body
        self.inbound = inbound = inbound if inbound is not None else InboundConfig()
        # No per-address cap (max_connections_per_address 0, e.g. behind a reverse
        # proxy where every connection has one address): no per-address share either.
        budget_bytes = inbound.max_buffered_response_bytes
        self.response_budget = SiteResponseBudget(
            budget_bytes, None if inbound.max_connections_per_address else budget_bytes
        )
        self.connections = ConnectionsPerAddress(inbound.max_connections_per_address, self.reactor)
        self._channels: set[GuardedHTTPChannel] = set()
        self._all_closed: list["defer.Deferred[None]"] = []
        # Our POST bodies are JSON: skip Twisted's form parsing (it costs ~50 µs a request).
        self._parsePOSTFormSubmission = False

    def buildProtocol(self, addr: Optional[IAddress]) -> Optional[Protocol]:  # type: ignore[override]
        """A guarded channel, or a :class:`RefusedConnection` over the per-address cap."""
        key = client_key(addr)
        if not self.connections.try_open(key):
            return RefusedConnection()
        channel = super().buildProtocol(addr)
        assert isinstance(channel, GuardedHTTPChannel)
        channel.limits = self.inbound
        channel.clock = self.reactor
        self._channels.add(channel)

        def closed() -> None:
            self.connections.close(key)
            self._channels.discard(channel)
            if not self._channels:
                waiting, self._all_closed = self._all_closed, []
                for d in waiting:
                    d.callback(None)

        channel.on_closed = closed
        return channel

    def drop_connections(self) -> "defer.Deferred[None]":
        """Drop every open connection (at shutdown); fires once they are all closed."""
        if not self._channels:
            return defer.succeed(None)
        d: "defer.Deferred[None]" = defer.Deferred()
        self._all_closed.append(d)
        for channel in list(self._channels):
            if channel.transport is None:
                channel.connectionLost(Failure(ConnectionDone()))  # built, never connected
            else:
                channel.drop()
        return d

    def log(self, request: Request) -> None:  # type: ignore[override]
        log_request_at_debug(logger, request)
