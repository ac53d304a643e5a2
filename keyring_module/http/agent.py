"""Guarded connections and bounded HTTP exchanges under the federation client.

Every outbound connection (federation requests, ``.well-known`` fetches, their
redirects) is made by :class:`GuardedConnector`: a ``HostnameEndpoint`` whose name
resolution goes through :class:`~keyring_module.http.ipfilter.IPFilteringResolver`,
optionally wrapped in TLS. :class:`HttpExchanger` runs one request through a Twisted
``Agent`` sharing one connection pool and reads the body under a size cap;
:func:`run_with_timeout` puts one deadline over a whole exchange (discovery included)
and turns every failure into a :class:`~keyring_module.http.FederationRequestError`.

Why Twisted's ``Agent`` and not ``treq.HTTPClient``: treq's client does not fit a
client that talks to hostile servers by Matrix server name.

* It renders every URL through ``hyperlink``'s ``to_uri()``, which IDNA-encodes the
  host: IPv6 literals (``[2001:db8::1]:8448`` is a valid server name, and a
  ``.well-known`` redirect may point at one) raise, as do some valid DNS names
  (``ab--c.example``), and hosts are lower-cased.
* It always wraps the agent in ``ContentDecoderAgent(gzip)``: every request asks for
  gzip, and an answer is inflated chunk by chunk without a bound, so a peer turns a
  few kilobytes on the wire into megabytes in one call, before any cap sees them.
* It keeps cookies from every peer in one jar for the client's lifetime.

Working around all three (keeping the server name out of the URL treq sees, stripping
the encoding headers both ways, a jar that refuses cookies) would leave treq doing
nothing but call ``agent.request``. Its body helpers do not fit either: see
:mod:`keyring_module.http.body`.

Example::

    connector = GuardedConnector(reactor, reactor.nameResolver, ip_filter, tls_policy)
    exchanger = HttpExchanger(reactor, pool)
    response = await run_with_timeout(
        reactor,
        10.0,
        lambda: exchanger.request(
            b"GET", b"https://example.org/.well-known/matrix/server",
            UrlEndpointFactory(connector), max_size=64 * 1024,
        ),
    )
"""

import logging
from typing import Any, Callable, Coroutine, Optional, TypeVar

import attr
from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IHostnameResolver,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from keyring_module.clock import DeadlineExceeded, NetworkReactor, ReactorClock, with_deadline
from keyring_module.http import (
    ConnectError,
    DeniedAddressError,
    FederationRequestError,
    RequestTimeoutError,
    TLSError,
)
from keyring_module.http.body import BytesProducer, read_body
from keyring_module.http.ipfilter import IPFilteringResolver, IPRangeFilter, ResolverOverrideReactor
from keyring_module.http.tls import FederationTLSPolicy

logger = logging.getLogger(__name__)

T = TypeVar("T")

try:  # service_identity is what Twisted uses to check the certificate's names.
    from service_identity import CertificateError as _CertificateError
    from service_identity import VerificationError as _VerificationError

    _TLS_EXCEPTIONS: tuple[type[BaseException], ...] = (
        SSL.Error,
        _VerificationError,
        _CertificateError,
    )
except ImportError:  # pragma: no cover - service_identity is a dependency of twisted[tls]
    _TLS_EXCEPTIONS = (SSL.Error,)


@attr.s(auto_attribs=True, frozen=True, slots=True)
class RawResponse:
    """A finished HTTP exchange: status, headers and the (size-capped) body."""

    code: int
    headers: Headers
    body: bytes


@implementer(IStreamClientEndpoint)
class _GuardedEndpoint:
    """A ``HostnameEndpoint`` that can only reach addresses the filter allows.

    A name whose every address was dropped fails with :class:`DeniedAddressError`
    instead of a DNS error, and no connection is attempted.
    """

    def __init__(
        self,
        reactor: NetworkReactor,
        resolver: IHostnameResolver,
        ip_filter: IPRangeFilter,
        host: str,
        port: int,
    ) -> None:
        self._reactor = reactor
        self._resolver = resolver
        self._filter = ip_filter
        self._host = host
        self._port = port

    def connect(self, protocolFactory: IProtocolFactory) -> "defer.Deferred[IProtocol]":
        dropped: list[str] = []
        resolver = IPFilteringResolver(
            self._resolver, self._filter, lambda _name, ip: dropped.append(ip)
        )
        endpoint = HostnameEndpoint(
            ResolverOverrideReactor(self._reactor, resolver), self._host, self._port
        )
        d = endpoint.connect(protocolFactory)

        def on_error(failure: Failure) -> Failure:
            if failure.check(error.DNSLookupError) and dropped:
                logger.debug(
                    "Refused %s:%d: only denied addresses %s", self._host, self._port, dropped
                )
                return Failure(
                    DeniedAddressError(
                        "%s resolves only to denied addresses (%s)"
                        % (self._host, ", ".join(sorted(set(dropped))))
                    )
                )
            return failure

        return d.addErrback(on_error)


class GuardedConnector:
    """Makes endpoints to ``host:port`` that pass the IP filter, TLS-wrapped if asked.

    Args:
        reactor: provides TCP and time; its resolver is not used directly.
        resolver: the underlying hostname resolver (``reactor.nameResolver`` normally).
        ip_filter: the SSRF guard.
        tls_policy: how to build TLS for a given certificate name.
    """

    def __init__(
        self,
        reactor: NetworkReactor,
        resolver: IHostnameResolver,
        ip_filter: IPRangeFilter,
        tls_policy: FederationTLSPolicy,
    ) -> None:
        self._reactor = reactor
        self._resolver = resolver
        self._filter = ip_filter
        self._tls_policy = tls_policy

    def endpoint(self, host: str, port: int, tls_name: Optional[str]) -> IStreamClientEndpoint:
        """An endpoint to ``host:port``; TLS checked against ``tls_name`` unless None."""
        guarded = _GuardedEndpoint(self._reactor, self._resolver, self._filter, host, port)
        if tls_name is None:
            return guarded
        return wrapClientTLS(self._tls_policy.creator_for(tls_name), guarded)


@implementer(IAgentEndpointFactory)
class UrlEndpointFactory:
    """Endpoints for ordinary ``https://`` (and, if allowed, ``http://``) URLs."""

    def __init__(self, connector: GuardedConnector, allow_http: bool = False) -> None:
        self._connector = connector
        self._allow_http = allow_http

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if uri.scheme == b"https":
            return self._connector.endpoint(host, uri.port, host)
        if uri.scheme == b"http" and self._allow_http:
            return self._connector.endpoint(host, uri.port, None)
        raise FederationRequestError("refusing URL scheme %r" % (uri.scheme,))


@implementer(IStreamClientEndpoint)
class TargetsEndpoint:
    """Tries each ``(host, port)`` target in order until one connects.

    Args:
        connector: makes the guarded endpoint for each target.
        targets: candidates, best first.
        tls_name: certificate name for every target, or None for plain TCP.
    """

    def __init__(
        self,
        connector: GuardedConnector,
        targets: "tuple[tuple[str, int], ...]",
        tls_name: Optional[str],
    ) -> None:
        self._connector = connector
        self._targets = targets
        self._tls_name = tls_name

    def connect(self, protocolFactory: IProtocolFactory) -> "defer.Deferred[IProtocol]":
        return defer.ensureDeferred(self._connect(protocolFactory))

    async def _connect(self, factory: IProtocolFactory) -> IProtocol:
        last: Optional[BaseException] = None
        for host, port in self._targets:
            endpoint = self._connector.endpoint(host, port, self._tls_name)
            try:
                return await endpoint.connect(factory)
            except defer.CancelledError:
                raise
            except Exception as e:
                logger.debug("Connecting to %s:%d failed: %r", host, port, e)
                # Keep the most telling error: anything beats "denied" from an earlier
                # target only if every target was denied.
                if last is None or not isinstance(e, DeniedAddressError):
                    last = e
        if last is None:
            raise ConnectError("no targets to connect to")
        raise last


def map_exception(exc: BaseException) -> FederationRequestError:
    """Turn a Twisted/OpenSSL failure into the matching FederationRequestError."""
    if isinstance(exc, FederationRequestError):
        return exc
    causes = list(_causes(exc))
    for cause in causes:
        if isinstance(cause, FederationRequestError):
            return cause
    for cause in causes:
        if isinstance(cause, _TLS_EXCEPTIONS):
            return TLSError("TLS failure: %s" % (_describe(cause),))
    for cause in causes:
        if isinstance(cause, (error.TimeoutError, defer.TimeoutError)):
            return RequestTimeoutError("connection timed out")
        if isinstance(cause, (error.DNSLookupError, error.ConnectError)):
            return ConnectError(_describe(cause))
    return FederationRequestError(_describe(exc))


def _causes(exc: BaseException) -> "list[BaseException]":
    """``exc`` and everything wrapped in it (Twisted's ``reasons`` lists, failures)."""
    found = [exc]
    reasons = getattr(exc, "reasons", None)
    if isinstance(reasons, list):
        for reason in reasons:
            inner = reason.value if isinstance(reason, Failure) else reason
            if isinstance(inner, BaseException):
                found.extend(_causes(inner))
    if isinstance(exc, error.ConnectionLost) and exc.args:
        first = exc.args[0]
        if isinstance(first, Failure) and isinstance(first.value, BaseException):
            found.extend(_causes(first.value))
    return found


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return "%s: %s" % (type(exc).__name__, text) if text else type(exc).__name__


class HttpExchanger:
    """Runs single HTTP exchanges with a body cap, over one connection pool.

    It sets no deadline of its own: callers run the exchange under
    :func:`run_with_timeout`, whose cancellation drops the connection.

    Args:
        reactor: the reactor the ``Agent`` runs on.
        pool: the shared persistent connection pool.
    """

    def __init__(self, reactor: NetworkReactor, pool: HTTPConnectionPool) -> None:
        self._reactor = reactor
        self._pool = pool

    async def request(
        self,
        method: bytes,
        uri: bytes,
        endpoint_factory: IAgentEndpointFactory,
        max_size: int,
        headers: Optional[Headers] = None,
        body: Optional[bytes] = None,
        error_body_size: int = 1024,
    ) -> RawResponse:
        """Send one request and read the whole response.

        Args:
            method: ``b"GET"`` or ``b"POST"``.
            uri: the request URI; the endpoint factory decides where it connects.
            endpoint_factory: maps the URI to a (guarded) endpoint.
            max_size: body cap for 2xx answers.
            headers: request headers (a ``Host`` header here wins over the URI's).
            body: request body, sent with a known length.
            error_body_size: for non-2xx answers only this much body is kept.

        Raises:
            Exception: whatever Twisted raised; :func:`run_with_timeout` maps it.
        """
        agent = Agent.usingEndpointFactory(self._reactor, endpoint_factory, pool=self._pool)
        producer = BytesProducer(body) if body is not None else None
        response = await agent.request(method, uri, headers, producer)
        success = 200 <= response.code < 300
        data = await read_body(response, max_size, None if success else error_body_size)
        return RawResponse(response.code, response.headers, data)


async def run_with_timeout(
    reactor: ReactorClock, timeout_seconds: float, work: Callable[[], Coroutine[Any, Any, T]]
) -> T:
    """Run ``work()``, cancelling it after ``timeout_seconds``.

    Raises:
        RequestTimeoutError: the deadline passed first (whatever error cancellation
            caused underneath).
        FederationRequestError: any other failure, mapped by :func:`map_exception`.
    """
    try:
        return await with_deadline(reactor, work(), timeout_seconds, cancel_work=True)
    except DeadlineExceeded:
        raise RequestTimeoutError(
            "no complete response within %.3gs" % (timeout_seconds,)
        ) from None
    except defer.CancelledError:
        raise
    except Exception as e:
        raise map_exception(e) from e
