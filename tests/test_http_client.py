"""Tests for MatrixFederationClient: SSRF guard, limits, errors, and real TLS on loopback."""

import gzip
import ipaddress
import json
from typing import Any, Optional

from twisted.internet import defer, error, task
from twisted.internet import reactor as global_reactor
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IProtocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from keyring_module.config import FederationConfig
from keyring_module.http import (
    ConnectError,
    DeniedAddressError,
    FederationHttpClient,
    HttpStatusError,
    InvalidResponseError,
    RequestTimeoutError,
    ResponseTooLargeError,
    TLSError,
)
from keyring_module.http.body import decode_json
from keyring_module.http.client import INLINE_DECODE_MAX_BYTES, MatrixFederationClient
from keyring_module.json_codec import FAST_PATH_MAX_VALUES
from tests.fake_reactors import MemoryNetworkReactor
from tests.fakes import HeldRunner
from tests.test_json_codec import record_slow_decodes
from tests.tls_helpers import (
    FakeHostnameResolver,
    FakeSrvResolver,
    JsonResource,
    listen_tls,
    make_ca,
    write_ca_pem,
)

PUBLIC_IP = "93.184.215.14"
PUBLIC_IP_2 = "93.184.215.15"


def federation_config(allow: tuple[str, ...] = (), **kwargs: Any) -> FederationConfig:
    networks = tuple(ipaddress.ip_network(a) for a in allow)
    return FederationConfig(ip_range_allowlist=networks, **kwargs)


class MemoryClientTests(SynchronousTestCase):
    """Unit tests on an in-memory reactor: no socket is ever opened."""

    def setUp(self) -> None:
        self.reactor = MemoryNetworkReactor()
        self.resolver = FakeHostnameResolver({"example.org": [PUBLIC_IP]})
        self.srv = FakeSrvResolver()

    def client(
        self, allow: tuple[str, ...] = (), plain: bool = True, **kwargs: Any
    ) -> MatrixFederationClient:
        return MatrixFederationClient(
            self.reactor,
            federation_config(allow, **kwargs),
            resolver=self.resolver,
            srv_resolver=self.srv,
            allow_plain_http_for_tests=plain,
        )

    def get(self, client: MatrixFederationClient, server: str, path: str = "/x") -> Any:
        return defer.ensureDeferred(client.get_json(server, path))

    def connected_hosts(self) -> list[tuple[str, int]]:
        return [(host, port) for host, port, *_ in self.reactor.tcpClients]

    def accept(self, index: int = 0) -> tuple[IProtocol, StringTransport]:
        """Complete the index-th pending TCP connection onto a StringTransport."""
        host, port, factory, *_ = self.reactor.tcpClients[index]
        transport = StringTransport()
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        assert protocol is not None
        protocol.makeConnection(transport)
        return protocol, transport

    def respond(self, data: bytes, index: int = 0) -> StringTransport:
        protocol, transport = self.accept(index)
        protocol.dataReceived(data)
        return transport

    # -- SSRF guard --------------------------------------------------------------------

    def test_denied_name_makes_no_connection_attempt(self) -> None:
        """A name resolving only to a private address fails with DeniedAddressError, unconnected."""
        self.resolver.table["evil.example"] = ["10.0.0.1"]
        d = self.get(self.client(), "evil.example:8448")
        self.failureResultOf(d, DeniedAddressError)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_denied_name_without_port_guards_well_known_too(self) -> None:
        """With discovery (.well-known, SRV, 8448) every step is refused without connecting."""
        self.resolver.table["evil.example"] = ["127.0.0.1", "::1"]
        d = self.get(self.client(), "evil.example")
        self.failureResultOf(d, DeniedAddressError)
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(self.srv.lookups[0], "_matrix-fed._tcp.evil.example")

    def test_denied_ip_literal_is_refused_without_lookup(self) -> None:
        """An IP-literal server name in a denied range is refused before any lookup."""
        for server in ("10.0.0.1:8448", "169.254.169.254", "[::1]:8448", "[fd00::1]"):
            self.failureResultOf(self.get(self.client(), server), DeniedAddressError)
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(self.resolver.lookups, [])

    def test_ipv4_mapped_ipv6_is_caught(self) -> None:
        """IPv4-mapped forms of denied addresses are refused, from DNS and as literals."""
        self.resolver.table["mapped.example"] = ["::ffff:10.0.0.1"]
        self.failureResultOf(self.get(self.client(), "mapped.example:8448"), DeniedAddressError)
        self.failureResultOf(self.get(self.client(), "[::ffff:127.0.0.1]:8448"), DeniedAddressError)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_allowlist_carves_out(self) -> None:
        """An allow-listed private address is connected to; its neighbour is not."""
        self.resolver.table["lan.example"] = ["10.1.2.3"]
        self.resolver.table["lan2.example"] = ["10.1.2.4"]
        client = self.client(allow=("10.1.2.3/32",))
        pending = self.get(client, "lan.example:8448")
        self.assertNoResult(pending)
        self.assertEqual(self.connected_hosts(), [("10.1.2.3", 8448)])
        self.failureResultOf(self.get(client, "lan2.example:8448"), DeniedAddressError)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.reactor.advance(10)
        self.failureResultOf(pending, RequestTimeoutError)

    def test_only_allowed_addresses_of_a_name_are_tried(self) -> None:
        """Of a name with private and public addresses, only the public one is dialled."""
        self.resolver.table["mixed.example"] = ["10.0.0.1", PUBLIC_IP, "fe80::1"]
        pending = self.get(self.client(), "mixed.example:8448")
        self.reactor.advance(1)
        self.assertEqual(self.connected_hosts(), [(PUBLIC_IP, 8448)])
        self.reactor.advance(10)
        self.failureResultOf(pending, RequestTimeoutError)

    def test_srv_targets_pass_the_guard(self) -> None:
        """A denied SRV target is skipped and the next allowed target is dialled."""
        self.srv.records["_matrix-fed._tcp.example.org"] = [
            (0, 0, 443, "internal.example"),
            (1, 0, 8443, "public.example"),
        ]
        self.resolver.table = {"internal.example": ["192.168.1.1"], "public.example": [PUBLIC_IP]}
        pending = self.get(self.client(), "example.org")
        # example.org itself does not resolve now, so .well-known failed without a dial.
        self.assertEqual(self.connected_hosts(), [(PUBLIC_IP, 8443)])
        self.reactor.advance(10)
        self.failureResultOf(pending, RequestTimeoutError)

    def test_well_known_redirect_goes_through_the_guard(self) -> None:
        """A .well-known redirect to an internal host is not followed onto it."""
        self.resolver.table["internal.example"] = ["10.0.0.9"]
        pending = self.get(self.client(), "example.org")
        self.assertEqual(self.connected_hosts(), [(PUBLIC_IP, 80)])
        self.respond(
            b"HTTP/1.1 302 Found\r\nLocation: http://internal.example/x\r\n"
            b"Content-Length: 0\r\n\r\n"
        )
        # The redirect target was refused; discovery fell back to example.org:8448.
        self.assertEqual(self.connected_hosts(), [(PUBLIC_IP, 80), (PUBLIC_IP, 8448)])
        self.reactor.advance(10)
        self.failureResultOf(pending, RequestTimeoutError)

    # -- request shape and answers ------------------------------------------------------

    def test_post_request_shape(self) -> None:
        """POST sends path, Host (with explicit port), JSON content type and canonical JSON."""
        d = defer.ensureDeferred(
            self.client().post_json("example.org:8449", "/_matrix/key/v2/query", {"b": [2], "a": 1})
        )
        protocol, transport = self.accept()
        request = transport.value()
        head, _, body = request.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.assertEqual(lines[0], b"POST /_matrix/key/v2/query HTTP/1.1")
        self.assertIn(b"Host: example.org:8449", lines)
        self.assertIn(b"Content-Type: application/json", lines)
        self.assertEqual(body, b'{"a":1,"b":[2]}')
        protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b'Content-Length: 11\r\n\r\n{"ok":true}'
        )
        self.assertEqual(self.successResultOf(d), {"ok": True})

    def test_ipv6_literal_request(self) -> None:
        """An IPv6-literal server is dialled unbracketed and addressed as ``[v6]:port``."""
        d = self.get(self.client(), "[2606:4700::1111]:8448", "/_matrix/key/v2/server")
        self.assertEqual(self.connected_hosts(), [("2606:4700::1111", 8448)])
        protocol, transport = self.accept()
        lines = transport.value().split(b"\r\n")
        self.assertEqual(lines[0], b"GET /_matrix/key/v2/server HTTP/1.1")
        self.assertIn(b"Host: [2606:4700::1111]:8448", lines)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        self.assertEqual(self.successResultOf(d), {})
        self.assertEqual(self.resolver.lookups, [])

    def test_json_without_content_type_is_accepted(self) -> None:
        """A body without Content-Type is accepted when it parses as JSON."""
        d = self.get(self.client(), "example.org:8448")
        self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n[1,2,3]")
        self.assertEqual(self.successResultOf(d), [1, 2, 3])

    def test_bad_json_and_wrong_content_type_are_invalid(self) -> None:
        """Invalid JSON, NaN, and a non-JSON Content-Type raise InvalidResponseError."""
        for response in (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{nope",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nNaN",
            b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 2\r\n\r\n{}",
        ):
            self.reactor.tcpClients.clear()
            d = self.get(self.client(), "example.org:8448")
            self.respond(response)
            self.failureResultOf(d, InvalidResponseError)

    def test_non_2xx_raises_http_status_error(self) -> None:
        """A 404 raises HttpStatusError with the code and the first 1K of the body."""
        d = self.get(self.client(), "example.org:8448")
        body = b"e" * 5000
        self.respond(b"HTTP/1.1 404 Not Found\r\nContent-Length: 5000\r\n\r\n" + body)
        failure = self.failureResultOf(d, HttpStatusError)
        self.assertEqual(failure.value.code, 404)
        self.assertEqual(failure.value.body, body[:1024])

    def test_error_body_prefix_drops_the_connection(self) -> None:
        """A non-2xx answer fails once its first 1K arrived, and the rest is not read."""
        d = self.get(self.client(), "example.org:8448")
        protocol, transport = self.accept()
        protocol.dataReceived(b"HTTP/1.1 500 Oops\r\nContent-Length: 5000\r\n\r\n")
        protocol.dataReceived(b"e" * 1000)
        self.assertNoResult(d)
        protocol.dataReceived(b"f" * 100)
        failure = self.failureResultOf(d, HttpStatusError)
        self.assertEqual((failure.value.code, failure.value.body), (500, b"e" * 1000 + b"f" * 24))
        self.assertTrue(transport.disconnected)

    def test_gzip_answer_is_not_inflated(self) -> None:
        """No compression is asked for, and a gzip body is not inflated (the cap counts wire bytes)."""
        d = self.get(self.client(), "example.org:8448")
        protocol, transport = self.accept()
        self.assertNotIn(b"accept-encoding", transport.value().lower())
        body = gzip.compress(b'{"inflated": true}')
        protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.failureResultOf(d, InvalidResponseError)

    def test_cookies_are_not_kept(self) -> None:
        """A Set-Cookie from a server is never sent back to it."""
        client = self.client()
        first = self.get(client, "example.org:8448")
        protocol, transport = self.accept()
        protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nSet-Cookie: session=abc; Path=/\r\nContent-Length: 2\r\n\r\n{}"
        )
        self.assertEqual(self.successResultOf(first), {})
        transport.clear()
        second = self.get(client, "example.org:8448")
        self.assertIn(b"GET /x HTTP/1.1", transport.value())  # the pooled connection
        self.assertNotIn(b"cookie", transport.value().lower())
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]")
        self.assertEqual(self.successResultOf(second), [])

    def test_global_reactor_and_cooperator_are_never_used(self) -> None:
        """Discovery, connecting and sending a POST body all run on the injected reactor."""
        for name in ("callLater", "connectTCP", "listenUDP"):
            self.patch(global_reactor, name, self.fail_global)
        self.patch(task, "cooperate", self.fail_global)
        d = defer.ensureDeferred(self.client().post_json("example.org", "/q", {"a": 1}))
        self.respond(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")  # .well-known
        self.assertEqual(self.connected_hosts(), [(PUBLIC_IP, 80), (PUBLIC_IP, 8448)])
        protocol, transport = self.accept(1)
        self.assertTrue(transport.value().endswith(b'\r\n\r\n{"a":1}'))  # written at once
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        self.assertEqual(self.successResultOf(d), {})

    def fail_global(self, *args: object, **kwargs: object) -> None:
        self.fail("the global reactor or cooperator was used")

    # -- limits -------------------------------------------------------------------------

    def test_body_at_cap_is_accepted(self) -> None:
        """A body of exactly max_response_size bytes is read in full."""
        body = json.dumps("x" * (4096 - 2)).encode()
        self.assertEqual(len(body), 4096)
        d = self.get(self.client(max_response_size=4096), "example.org:8448")
        self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 4096\r\n\r\n" + body)
        self.assertEqual(self.successResultOf(d), "x" * 4094)

    def test_big_body_is_decoded_by_the_runner(self) -> None:
        """Bodies over INLINE_DECODE_MAX_BYTES are decoded by the runner, smaller ones at once."""
        runner = HeldRunner()
        small = json.dumps("x" * (INLINE_DECODE_MAX_BYTES - 2)).encode()
        big = json.dumps("x" * (INLINE_DECODE_MAX_BYTES - 1)).encode()
        answers = []
        for index, body in enumerate((small, big)):
            client = MatrixFederationClient(
                self.reactor,
                federation_config(),
                resolver=self.resolver,
                srv_resolver=self.srv,
                allow_plain_http_for_tests=True,
                run_blocking=runner,
            )
            answers.append(self.get(client, "example.org:8448"))
            head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
            self.respond(head + body, index)
        self.assertEqual(self.successResultOf(answers[0]), json.loads(small))
        self.assertNoResult(answers[1])
        self.assertEqual(len(runner.jobs), 1)
        runner.run_all()
        self.assertEqual(self.successResultOf(answers[1]), json.loads(big))

    def test_runner_decodes_big_documents_the_gil_friendly_way(self) -> None:
        """A big body of many values, decoded by the runner (a worker thread), takes the
        decoder that lets the reactor thread run; one decoded at once never does."""
        slow_decodes = record_slow_decodes(self)
        runner = HeldRunner()
        big = json.dumps([0] * (FAST_PATH_MAX_VALUES + 1)).encode()
        client = MatrixFederationClient(
            self.reactor,
            federation_config(max_response_size=2 * len(big)),
            resolver=self.resolver,
            srv_resolver=self.srv,
            allow_plain_http_for_tests=True,
            run_blocking=runner,
        )
        answer = self.get(client, "example.org:8448")
        self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big)
        self.assertEqual(slow_decodes, [])
        runner.run_all()
        self.assertEqual(self.successResultOf(answer), [0] * (FAST_PATH_MAX_VALUES + 1))
        self.assertEqual(slow_decodes, ["slow"])

    def test_streamed_body_over_cap_aborts_connection(self) -> None:
        """A chunked body growing past the cap fails and the connection is aborted."""
        d = self.get(self.client(max_response_size=4096), "example.org:8448")
        protocol, transport = self.accept()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        protocol.dataReceived(b"800\r\n" + b" " * 0x800 + b"\r\n")
        self.assertNoResult(d)
        self.assertFalse(transport.disconnected)
        protocol.dataReceived(b"800\r\n" + b" " * 0x800 + b"\r\n")
        protocol.dataReceived(b"1\r\n \r\n")
        self.failureResultOf(d, ResponseTooLargeError)
        self.assertTrue(transport.disconnected)

    def test_declared_length_over_cap_aborts_at_once(self) -> None:
        """A Content-Length above the cap fails before the body arrives."""
        d = self.get(self.client(max_response_size=4096), "example.org:8448")
        transport = self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n{")
        self.failureResultOf(d, ResponseTooLargeError)
        self.assertTrue(transport.disconnected)

    def test_timeout_covers_the_body(self) -> None:
        """Headers that arrive in time do not save a body that does not."""
        d = self.get(self.client(request_timeout_ms=5000), "example.org:8448")
        protocol, transport = self.accept()
        self.reactor.advance(4)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n[1,")
        self.assertNoResult(d)
        self.reactor.advance(1.5)
        self.failureResultOf(d, RequestTimeoutError)
        self.assertTrue(transport.disconnected)

    def test_per_call_timeout_override(self) -> None:
        """``timeout_ms`` overrides the configured request timeout."""
        client = self.client(request_timeout_ms=60_000)
        d = defer.ensureDeferred(client.get_json("example.org:8448", "/x", timeout_ms=500))
        self.reactor.advance(0.4)
        self.assertNoResult(d)
        self.reactor.advance(0.2)
        self.failureResultOf(d, RequestTimeoutError)

    def test_discovery_time_counts_against_the_deadline(self) -> None:
        """Time spent on .well-known is taken from the same request deadline."""
        d = self.get(self.client(request_timeout_ms=10_000), "example.org")
        self.reactor.advance(6)
        self.respond(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")  # .well-known
        self.assertEqual(self.connected_hosts(), [(PUBLIC_IP, 80), (PUBLIC_IP, 8448)])
        self.reactor.advance(3.9)
        self.assertNoResult(d)
        self.reactor.advance(0.2)
        self.failureResultOf(d, RequestTimeoutError)

    # -- connection pool ----------------------------------------------------------------

    def test_finished_connection_is_reused(self) -> None:
        """After a complete answer, the next request to the server reuses the connection."""
        client = self.client()
        first = self.get(client, "example.org:8448")
        protocol, transport = self.accept()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        self.successResultOf(first)
        second = self.get(client, "example.org:8448", "/y")
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertIn(b"GET /y HTTP/1.1", transport.value())
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]")
        self.assertEqual(self.successResultOf(second), [])

    def test_aborted_connection_is_not_reused(self) -> None:
        """A connection dropped for an oversized body never serves another request."""
        client = self.client(max_response_size=16)
        first = self.get(client, "example.org:8448")
        protocol, transport = self.accept()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n" + b" " * 40)
        self.failureResultOf(first, ResponseTooLargeError)
        self.assertTrue(transport.disconnected)
        transport.clear()
        self.get(client, "example.org:8448", "/y")
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.assertEqual(transport.value(), b"")

    # -- connection errors and construction --------------------------------------------

    def test_connection_refused_is_connect_error(self) -> None:
        """A refused connection raises ConnectError."""
        d = self.get(self.client(), "example.org:8448")
        _host, _port, factory, *_ = self.reactor.tcpClients[0]
        factory.clientConnectionFailed(
            self.reactor.connectors[0], Failure(error.ConnectionRefusedError())
        )
        self.reactor.advance(1)
        self.failureResultOf(d, ConnectError)

    def test_unresolvable_name_is_connect_error(self) -> None:
        """A name without addresses raises ConnectError (not DeniedAddressError)."""
        self.failureResultOf(self.get(self.client(), "nowhere.example:8448"), ConnectError)

    def test_construction_touches_no_network(self) -> None:
        """Building the client (default resolvers) dials, binds and schedules nothing."""
        reactor = MemoryNetworkReactor()
        client: FederationHttpClient = MatrixFederationClient(reactor, FederationConfig())
        self.assertIsNotNone(client)
        self.assertEqual(reactor.tcpClients, [])
        self.assertEqual((reactor.tcpServers, reactor.sslClients), ([], []))
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_decode_json_rejects_constants(self) -> None:
        """decode_json refuses Infinity and invalid UTF-8."""
        self.assertEqual(decode_json(b'{"a": 1.5}'), {"a": 1.5})
        for bad in (b"Infinity", b"[-Infinity]", b'"\xff"'):
            self.assertRaises(InvalidResponseError, decode_json, bad)


class LoopbackTLSTests(TestCase):
    """Integration: a real TLS origin on 127.0.0.1 with a trustme CA made at test time."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self.ca = make_ca()
        self.ca_file = write_ca_pem(self.ca, self.mktemp())
        self.resource = JsonResource(b'{"server_name": "127.0.0.1"}')
        self.port = listen_tls(self.reactor, self.ca, self.resource, ["127.0.0.1", "notary.test"])
        self.addCleanup(self.port.stopListening)
        address = self.port.getHost()
        assert isinstance(address, IPv4Address)
        self.port_number = address.port
        self.resolver = FakeHostnameResolver(
            {"notary.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]}
        )

    def client(self, ca_file: Optional[str] = None, **kwargs: Any) -> MatrixFederationClient:
        client = MatrixFederationClient(
            self.reactor,
            federation_config(("127.0.0.1/32",), ca_file=ca_file, **kwargs),
            resolver=self.resolver,
            srv_resolver=FakeSrvResolver(),
        )
        self.addCleanup(client.close)
        return client

    async def test_fetch_with_ca_file(self) -> None:
        """With the test CA in ca_file, an HTTPS fetch from 127.0.0.1:<port> succeeds."""
        server = "127.0.0.1:%d" % self.port_number
        body = await self.client(self.ca_file).get_json(server, "/_matrix/key/v2/server")
        self.assertEqual(body, {"server_name": "127.0.0.1"})
        self.assertEqual(
            self.resource.requests, [(b"GET", b"/_matrix/key/v2/server", server.encode())]
        )

    async def test_fetch_without_ca_file_fails_tls(self) -> None:
        """Without the test CA the same fetch fails with TLSError."""
        with self.assertRaises(TLSError):
            await self.client().get_json("127.0.0.1:%d" % self.port_number, "/x")
        self.assertEqual(self.resource.requests, [])

    async def test_verify_tls_false_skips_checks(self) -> None:
        """With verify_tls false, the untrusted certificate is accepted."""
        with self.assertLogs("keyring_module.http.tls", "WARNING"):
            client = self.client(verify_tls=False)
        body = await client.get_json("127.0.0.1:%d" % self.port_number, "/x")
        self.assertEqual(body, {"server_name": "127.0.0.1"})

    async def test_hostname_is_verified(self) -> None:
        """A DNS name is checked against the certificate: notary.test passes, other.test fails."""
        client = self.client(self.ca_file)
        body = await client.post_json("notary.test:%d" % self.port_number, "/q", {"x": 1})
        self.assertEqual(body, {"server_name": "127.0.0.1"})
        self.assertEqual(self.resource.requests[0][2], b"notary.test:%d" % self.port_number)
        with self.assertRaises(TLSError):
            await client.get_json("other.test:%d" % self.port_number, "/x")

    async def test_body_over_cap_fails(self) -> None:
        """A real response larger than max_response_size raises ResponseTooLargeError."""
        self.resource.body = json.dumps("x" * 200_000).encode()
        with self.assertRaises(ResponseTooLargeError):
            await self.client(self.ca_file, max_response_size=64 * 1024).get_json(
                "127.0.0.1:%d" % self.port_number, "/x"
            )

    async def test_loopback_denied_by_default(self) -> None:
        """Without the allowlist the default denylist refuses 127.0.0.1 outright."""
        client = MatrixFederationClient(
            self.reactor, FederationConfig(ca_file=self.ca_file), srv_resolver=FakeSrvResolver()
        )
        self.addCleanup(client.close)
        with self.assertRaises(DeniedAddressError):
            await client.get_json("127.0.0.1:%d" % self.port_number, "/x")
        self.assertEqual(self.resource.requests, [])
