"""Outbound federation HTTP: server discovery, TLS, SSRF guard, limits.

The fetchers talk to other servers only through the :class:`FederationHttpClient`
protocol, addressing them by Matrix server name; discovery (``.well-known``, SRV, port
8448), certificate checks, the IP range guard, the timeout and the response size cap all
happen behind it. Failures raise a :class:`FederationRequestError` subclass, so callers
can count outcomes (timeout, TLS, refused by the guard, HTTP status, bad body).
"""

from typing import Optional, Protocol


class FederationRequestError(Exception):
    """A request to another server failed. ``outcome`` is a short metric label."""

    outcome = "error"


class RequestTimeoutError(FederationRequestError):
    """The whole exchange took longer than ``federation.request_timeout``."""

    outcome = "timeout"


class ConnectError(FederationRequestError):
    """No connection could be made (DNS failure, refused, unreachable)."""

    outcome = "connect_error"


class TLSError(FederationRequestError):
    """The TLS handshake or the certificate check failed."""

    outcome = "tls_error"


class DeniedAddressError(FederationRequestError):
    """Every address of the target is in ``federation.ip_range_denylist``."""

    outcome = "denied"


class ResponseTooLargeError(FederationRequestError):
    """The body exceeded ``federation.max_response_size``; the connection was dropped."""

    outcome = "too_large"


class HttpStatusError(FederationRequestError):
    """The server answered with a non-2xx status.

    ``body`` holds the start of the answer; ``retry_after_ms`` the ``Retry-After``
    header in ms when it gave a number of seconds (None otherwise).
    """

    outcome = "http_error"

    def __init__(self, code: int, body: bytes = b"", retry_after_ms: Optional[int] = None) -> None:
        super().__init__("HTTP %d" % code)
        self.code = code
        self.body = body
        self.retry_after_ms = retry_after_ms


class InvalidResponseError(FederationRequestError):
    """The body was not JSON (or not the JSON type expected)."""

    outcome = "invalid_json"


class InvalidServerNameError(FederationRequestError):
    """The server name is not a valid Matrix server name, so it was never contacted."""

    outcome = "invalid_server_name"


class FederationHttpClient(Protocol):
    """Requests to other Matrix servers, addressed by server name.

    Example::

        body = await client.get_json("example.org", "/_matrix/key/v2/server")
        body = await client.post_json(
            "notary.example.org", "/_matrix/key/v2/query", {"server_keys": {...}}
        )

    Both return the decoded JSON value (any JSON type) or raise
    :class:`FederationRequestError`.
    """

    async def get_json(
        self, server_name: str, path: str, timeout_ms: Optional[int] = None
    ) -> object: ...

    async def post_json(
        self, server_name: str, path: str, body: object, timeout_ms: Optional[int] = None
    ) -> object: ...
