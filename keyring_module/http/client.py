"""The real :class:`~keyring_module.http.FederationHttpClient`: HTTPS to Matrix servers.

:class:`MatrixFederationClient` resolves a server name (``.well-known``, SRV, 8448; see
:mod:`keyring_module.http.discovery`), connects only to addresses the IP range guard
allows, checks the certificate against the name discovery chose (platform trust store
plus ``federation.ca_file``), sends the ``Host`` header the specification asks for,
bounds the whole exchange by ``federation.request_timeout`` and the body by
``federation.max_response_size``, and decodes strict JSON (bodies over
:data:`INLINE_DECODE_MAX_BYTES` through the injected runner, a worker thread in the
wiring).

Example::

    from twisted.internet import reactor
    from keyring_module.config import FederationConfig

    client = MatrixFederationClient(reactor, FederationConfig())
    keys = await client.get_json("matrix.org", "/_matrix/key/v2/server")
    answer = await client.post_json(
        "notary.example.org", "/_matrix/key/v2/query", {"server_keys": {"matrix.org": {}}}
    )
    await client.close()
"""

import logging
import random
from typing import Optional
from urllib.parse import quote

from canonicaljson import encode_canonical_json
from twisted.internet import defer
from twisted.internet.interfaces import IHostnameResolver, IStreamClientEndpoint
from twisted.web.client import URI
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

import keyring_module
from keyring_module.blocking import BlockingRunner, run_inline
from keyring_module.clock import NetworkReactor
from keyring_module.config import FederationConfig
from keyring_module.http import (
    FederationRequestError,
    HttpStatusError,
    InvalidResponseError,
)
from keyring_module.http.agent import (
    GuardedConnector,
    HttpExchanger,
    RawResponse,
    TargetsEndpoint,
    UrlEndpointFactory,
    run_with_timeout,
)
from keyring_module.http.body import decode_json
from keyring_module.http.discovery import (
    LazySrvResolver,
    ResolvedServer,
    ServerResolver,
    SrvResolver,
)
from keyring_module.http.ipfilter import IPRangeFilter
from keyring_module.http.pool import QuietHTTPConnectionPool
from keyring_module.http.tls import FederationTLSPolicy
from keyring_module.http.wellknown import DEFAULT_CACHE_ENTRIES, FetchedResponse, WellKnownResolver

logger = logging.getLogger(__name__)

ERROR_BODY_SIZE = 1024
#: Bodies up to this size are decoded on the calling thread (a few ms at most).
INLINE_DECODE_MAX_BYTES = 64 * 1024
DEFAULT_MAX_PERSISTENT_PER_HOST = 4
_PATH_SAFE = "/?=&%:@!$'()*+,;~-._"


@implementer(IAgentEndpointFactory)
class _ResolvedEndpointFactory:
    """Maps a ``matrix-federation://<server name>`` URI to its discovered targets."""

    def __init__(
        self, connector: GuardedConnector, resolved: ResolvedServer, use_tls: bool
    ) -> None:
        self._connector = connector
        self._resolved = resolved
        self._use_tls = use_tls

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        tls_name = self._resolved.tls_server_name if self._use_tls else None
        return TargetsEndpoint(self._connector, self._resolved.targets, tls_name)


class _GuardedWellKnownFetcher:
    """Single GETs for the well-known resolver, over the client's guarded agent."""

    def __init__(self, client: "MatrixFederationClient") -> None:
        self._client = client

    async def fetch(self, url: str, max_size: int) -> FetchedResponse:
        return await self._client._fetch_url(url, max_size)


class MatrixFederationClient:
    """Sends JSON requests to Matrix servers by server name.

    Args:
        reactor: the reactor (TCP, time, a ``nameResolver``, UDP for SRV lookups).
        config: the ``federation:`` section (TLS, IP ranges, timeout, size cap).
        resolver: hostname resolver under the IP filter; ``reactor.nameResolver`` by
            default. Tests pass a fake so no real DNS lookup happens.
        srv_resolver: SRV lookups; a ``twisted.names`` resolver created on first use
            by default (constructing the client touches no network).
        rng: randomness for SRV weights.
        allow_plain_http_for_tests: speak plain HTTP to targets and ``.well-known``
            (never set outside tests; deliberately not a config option).
        max_persistent_per_host: idle connections kept per server.
        well_known_cache_entries: bound on the ``.well-known`` cache.
        run_blocking: where bodies over :data:`INLINE_DECODE_MAX_BYTES` are decoded;
            at once on the calling thread by default, a worker thread in the wiring.

    Raises:
        TLSError: ``config.ca_file`` cannot be read.

    Example::

        client = MatrixFederationClient(reactor, config.federation)
        try:
            body = await client.get_json("example.org", "/_matrix/key/v2/server")
        except FederationRequestError as e:
            logger.info("fetch failed (%s): %s", e.outcome, e)
    """

    def __init__(
        self,
        reactor: NetworkReactor,
        config: FederationConfig,
        resolver: Optional[IHostnameResolver] = None,
        srv_resolver: Optional[SrvResolver] = None,
        *,
        rng: Optional[random.Random] = None,
        allow_plain_http_for_tests: bool = False,
        max_persistent_per_host: int = DEFAULT_MAX_PERSISTENT_PER_HOST,
        well_known_cache_entries: int = DEFAULT_CACHE_ENTRIES,
        run_blocking: BlockingRunner = run_inline,
    ) -> None:
        self._reactor = reactor
        self._run_blocking = run_blocking
        self._config = config
        self._use_tls = not allow_plain_http_for_tests
        ip_filter = IPRangeFilter(config.ip_range_denylist, config.ip_range_allowlist)
        tls_policy = FederationTLSPolicy(config.verify_tls, config.ca_file)
        base_resolver = resolver if resolver is not None else reactor.nameResolver
        self._connector = GuardedConnector(reactor, base_resolver, ip_filter, tls_policy)
        self._pool = QuietHTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = max_persistent_per_host
        self._exchanger = HttpExchanger(reactor, self._pool)
        self._url_endpoints = UrlEndpointFactory(
            self._connector, allow_http=allow_plain_http_for_tests
        )
        self._user_agent = b"keyring-module/%s" % keyring_module.__version__.encode("ascii")
        self._well_known = WellKnownResolver(
            reactor,
            _GuardedWellKnownFetcher(self),
            max_entries=well_known_cache_entries,
            allow_http=allow_plain_http_for_tests,
        )
        self._discovery = ServerResolver(
            self._well_known,
            srv_resolver if srv_resolver is not None else LazySrvResolver(reactor),
            rng,
        )

    async def get_json(
        self, server_name: str, path: str, timeout_ms: Optional[int] = None
    ) -> object:
        """GET ``path`` from ``server_name`` and decode the JSON answer.

        Args:
            server_name: the Matrix server name (``example.org``, ``1.2.3.4:8448``).
            path: absolute path with query string, e.g. ``/_matrix/key/v2/server``.
            timeout_ms: overrides ``federation.request_timeout`` for this request.

        Returns:
            The decoded JSON value.

        Raises:
            FederationRequestError: a subclass naming what went wrong.
        """
        return await self._request_json(b"GET", server_name, path, None, timeout_ms)

    async def post_json(
        self, server_name: str, path: str, body: object, timeout_ms: Optional[int] = None
    ) -> object:
        """POST ``body`` as JSON to ``path`` on ``server_name``; decode the answer.

        Args:
            server_name: the Matrix server name.
            path: absolute path, e.g. ``/_matrix/key/v2/query``.
            body: any JSON-encodable value (sent as canonical JSON).
            timeout_ms: overrides ``federation.request_timeout`` for this request.

        Returns:
            The decoded JSON value.

        Raises:
            FederationRequestError: a subclass naming what went wrong.
        """
        return await self._request_json(
            b"POST", server_name, path, encode_canonical_json(body), timeout_ms
        )

    def close(self) -> "defer.Deferred[None]":
        """Close idle pooled connections (fires once they are closed)."""
        result: defer.Deferred[None] = self._pool.closeCachedConnections()
        return result

    async def _request_json(
        self,
        method: bytes,
        server_name: str,
        path: str,
        body: Optional[bytes],
        timeout_ms: Optional[int],
    ) -> object:
        if not path.startswith("/"):
            raise ValueError("path must start with '/': %r" % (path,))
        timeout_seconds = (
            timeout_ms if timeout_ms is not None else self._config.request_timeout_ms
        ) / 1000.0

        async def exchange() -> RawResponse:
            resolved = await self._discovery.resolve(server_name)  # validates the name
            uri = b"matrix-federation://%s%s" % (
                server_name.encode("ascii"),
                quote(path, safe=_PATH_SAFE).encode("ascii"),
            )
            headers = Headers(
                {
                    b"Host": [resolved.host_header.encode("ascii")],
                    b"User-Agent": [self._user_agent],
                    b"Accept": [b"application/json"],
                }
            )
            if body is not None:
                headers.setRawHeaders(b"Content-Type", [b"application/json"])
            logger.debug(
                "%s %s%s via %s (Host %s, TLS name %s)",
                method.decode("ascii"),
                server_name,
                path,
                resolved.targets,
                resolved.host_header,
                resolved.tls_server_name if self._use_tls else "-",
            )
            return await self._exchanger.request(
                method,
                uri,
                _ResolvedEndpointFactory(self._connector, resolved, self._use_tls),
                max_size=self._config.max_response_size,
                headers=headers,
                body=body,
                error_body_size=ERROR_BODY_SIZE,
            )

        # One deadline over discovery, connecting, the headers and the body.
        raw = await run_with_timeout(self._reactor, timeout_seconds, exchange)
        logger.debug(
            "%s %s%s -> %d (%d bytes)",
            method.decode("ascii"),
            server_name,
            path,
            raw.code,
            len(raw.body),
        )
        if not 200 <= raw.code < 300:
            raise HttpStatusError(
                raw.code, raw.body[:ERROR_BODY_SIZE], _retry_after_ms(raw.headers)
            )
        content_types = raw.headers.getRawHeaders(b"Content-Type")
        if content_types:
            media_type = content_types[0].split(b";")[0].strip().lower()
            if media_type != b"application/json" and not media_type.endswith(b"+json"):
                raise InvalidResponseError(
                    "Content-Type %r is not JSON" % (content_types[0].decode("latin-1"),)
                )
        if len(raw.body) <= INLINE_DECODE_MAX_BYTES:
            return decode_json(raw.body)
        return await self._run_blocking(lambda: decode_json(raw.body, in_worker_thread=True))

    async def _fetch_url(self, url: str, max_size: int) -> FetchedResponse:
        """One GET of an ordinary URL (``.well-known`` and its redirects)."""
        try:
            uri = url.encode("ascii")
        except UnicodeEncodeError:
            raise FederationRequestError("URL is not ASCII: %r" % (url,)) from None
        logger.debug("GET %s", url)
        raw = await run_with_timeout(
            self._reactor,
            self._config.request_timeout_ms / 1000.0,
            lambda: self._exchanger.request(
                b"GET",
                uri,
                self._url_endpoints,
                max_size=max_size,
                headers=Headers({b"User-Agent": [self._user_agent]}),
                error_body_size=ERROR_BODY_SIZE,
            ),
        )
        headers = {
            name.decode("latin-1").lower(): ", ".join(v.decode("latin-1") for v in values)
            for name, values in raw.headers.getAllRawHeaders()
        }
        return FetchedResponse(raw.code, headers, raw.body)


def _retry_after_ms(headers: Headers) -> Optional[int]:
    """A ``Retry-After: <seconds>`` header in ms (None when absent or an HTTP date).

    Example:
        >>> _retry_after_ms(Headers({b"Retry-After": [b"2"]}))
        2000
    """
    values = headers.getRawHeaders(b"Retry-After")
    if not values or not values[0].strip().isdigit() or len(values[0].strip()) > 9:
        return None
    return int(values[0].strip()) * 1000
