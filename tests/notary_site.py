"""A notary built by the wiring that answers raw HTTP bytes, for hostile-input tests.

:class:`RawNotarySite` puts the standalone server's :class:`KeyServerSite` (with
everything :class:`~keyring_module.wiring.KeyringServices` builds: our keys, the notary,
the keyring, one fetcher chain and limiter) on a ``StringTransport``, with fake origins
and an in-memory store on a fake reactor. Requests are bytes, so a test can send what
no HTTP client would: invalid UTF-8 in a path, a lone surrogate escaped in a body::

    site = RawNotarySite({"origin.test": origin_resource})
    response = site.request(b"GET", b"/_matrix/key/v2/query/bad%0Aname")
    assert response is not None and response.code == 400
"""

import json
from typing import Any, Mapping, Optional, Sequence

import attr
from prometheus_client import CollectorRegistry
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from keyring_module.config import parse_config
from keyring_module.http import HttpStatusError
from keyring_module.http.body import decode_json
from keyring_module.metrics import Metrics
from keyring_module.resources.site import KeyServerSite
from keyring_module.resources.tree import build_key_resource, build_root
from keyring_module.signing import OwnKeys
from keyring_module.storage.memory import InMemoryKeyStore
from keyring_module.wiring import KeyringServices
from tests.fake_reactors import FakeReactor
from tests.fakes import FakeFederationClient
from tests.utils import new_signing_key

NOTARY = "notary.test"
START_S = 1_700_000_000
#: Longer than the default request timeout (10 s), so that a fetch that never answers
#: still lets the notary answer in time.
DEFAULT_MAX_WAIT_SECONDS = 30
#: The address requests come from unless a test says otherwise.
CLIENT_HOST = "127.0.0.1"


@attr.s(auto_attribs=True, frozen=True, slots=True)
class RawResponse:
    """One complete HTTP answer: status, headers (lower-cased names) and body."""

    code: int
    headers: Mapping[bytes, bytes]
    body: bytes

    def json(self) -> Any:
        """The body decoded as JSON (raises ValueError when it is not)."""
        return json.loads(self.body)


class DecodingFederationClient(FakeFederationClient):
    """A :class:`FakeFederationClient` that decodes answers as the real client does
    (strict UTF-8, no ``NaN``, nesting bounded), so hostile answers are seen the same."""

    async def _decode(self, stub: Any, response: Any) -> object:
        content: bytes = await stub.content(response)
        if not 200 <= response.code < 300:
            raise HttpStatusError(response.code, content)
        return decode_json(content)


class RawNotarySite:
    """The notary's HTTP site on an in-memory transport, with fake origins.

    Args:
        origins: the resource serving each origin; other servers are unreachable
            (connection refused at once).
        config: settings on top of the minimal standalone configuration.
        request_timeouts: whether a fetch without an answer fails at
            ``federation.request_timeout``, as with the real client (otherwise a hanging
            origin hangs for ever).

    Attributes:
        reactor: the fake reactor; time only moves when :meth:`send` waits.
        client: the fake outbound client (its ``requests`` record every fetch).
        store: the in-memory key store the notary and the keyring share.
        services: everything the wiring built.
        query_resource: the ``/_matrix/key/v2/query`` resource it serves (None when
            the notary is disabled).
    """

    def __init__(
        self,
        origins: Optional[Mapping[str, Resource]] = None,
        config: Optional[Mapping[str, Any]] = None,
        *,
        request_timeouts: bool = False,
    ) -> None:
        self.reactor = FakeReactor()
        self.reactor.advance(START_S)
        parsed = parse_config(
            {
                "server_name": NOTARY,
                "signing_key_path": "unused",
                "listeners": [{"port": 1}],
                **(config or {}),
            }
        )
        timeout_s = parsed.federation.request_timeout_ms / 1000 if request_timeouts else None
        self.client = DecodingFederationClient(
            origins or {}, clock=self.reactor, timeout_s=timeout_s
        )
        self.store = InMemoryKeyStore()
        self.services = KeyringServices.build(
            self.reactor,
            parsed,
            OwnKeys(NOTARY, [new_signing_key("n1")]),
            self.store,
            client=self.client,
            metrics=Metrics(CollectorRegistry()),
        )
        self.query_resource = self.services.query_resource()
        self._site = KeyServerSite(
            build_root(build_key_resource(self.services.publisher, self.query_resource)),
            parsed.notary.max_request_body,
            inbound=parsed.inbound,
            reactor=self.reactor,
        )

    def request(
        self,
        method: bytes,
        target: bytes,
        body: bytes = b"",
        headers: Sequence[tuple[bytes, bytes]] = (),
        max_wait_seconds: int = DEFAULT_MAX_WAIT_SECONDS,
        client_host: str = CLIENT_HOST,
    ) -> Optional[RawResponse]:
        """Send one HTTP/1.1 request; its answer, or None if none came in time.

        Args:
            method: e.g. ``b"POST"``.
            target: the request target as sent: path and query, already escaped.
            body: the request body (sent with its ``Content-Length``).
            headers: more header lines.
            max_wait_seconds: how much fake time may pass waiting for the answer.
            client_host: the address the request comes from.
        """
        return self.send(
            request_bytes(method, target, body, headers), max_wait_seconds, client_host
        )

    def send(
        self,
        raw: bytes,
        max_wait_seconds: int = DEFAULT_MAX_WAIT_SECONDS,
        client_host: str = CLIENT_HOST,
    ) -> Optional[RawResponse]:
        """Send raw bytes on a new connection from ``client_host``; the answer, or None
        if none came in time.

        Fake time moves one second at a time (delivering fake origin answers between
        steps) until a whole answer has been written or ``max_wait_seconds`` passed.
        """
        pending = self.open(raw, client_host)
        try:
            for _ in range(max_wait_seconds + 1):
                response = pending.response()
                if response is not None:
                    return response
                self.reactor.advance(1)
                self.deliver()
            return None
        finally:
            pending.close()

    def open(self, raw: bytes, client_host: str = CLIENT_HOST) -> "OpenRequest":
        """Send raw bytes on a new connection from ``client_host`` (an IPv4 or IPv6
        address) that stays open until the test closes it (e.g. a query held waiting for
        a fetch while others are sent); time does not move.
        """
        address_type = IPv6Address if ":" in client_host else IPv4Address
        address = address_type("TCP", client_host, 40000)
        protocol = self._site.buildProtocol(address)
        assert protocol is not None
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        protocol.dataReceived(raw)
        self.deliver()
        return OpenRequest(protocol, transport)

    def deliver(self) -> None:
        """Run what is due now and deliver the answers fake servers have finished."""
        for _ in range(3):
            self.reactor.advance(0)
            self.client.flush()


class OpenRequest:
    """A request sent by :meth:`RawNotarySite.open` whose connection is still open."""

    def __init__(self, protocol: Any, transport: StringTransport) -> None:
        self._protocol = protocol
        self._transport = transport

    def response(self) -> Optional[RawResponse]:
        """The answer, once it has been written whole; None until then."""
        return parse_response(self._transport.value())

    def close(self) -> None:
        """Close the connection (the client went away, if no answer came yet)."""
        self._protocol.connectionLost(Failure(ConnectionDone()))


def request_bytes(
    method: bytes, target: bytes, body: bytes = b"", headers: Sequence[tuple[bytes, bytes]] = ()
) -> bytes:
    """One HTTP/1.1 request to the notary, as sent on the wire.

    Example::

        site.open(request_bytes(b"GET", b"/_matrix/key/v2/query/o.test"))
    """
    lines = [b"%s %s HTTP/1.1" % (method, target), b"Host: " + NOTARY.encode()]
    lines += [b"%s: %s" % (name, value) for name, value in headers]
    if body or method == b"POST":
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def parse_response(data: bytes) -> Optional[RawResponse]:
    """The first HTTP answer in ``data`` once it is complete (by ``Content-Length``)."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    status_line, *header_lines = head.split(b"\r\n")
    headers: dict[bytes, bytes] = {}
    for line in header_lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get(b"content-length", b"-1"))
    if length < 0 or len(rest) < length:
        return None
    return RawResponse(int(status_line.split(b" ")[1]), headers, rest[:length])
