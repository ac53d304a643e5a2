"""The ``inbound:`` protections against real clients on 127.0.0.1: the per-address cap,
the header timeout against a byte-at-a-time client, and non-reading clients held to the
answer budget while others are still answered. Every wait is bounded."""

import logging
import os
import select
import socket
import ssl
import time
from typing import Callable, Optional

import trustme
from twisted.internet import reactor as global_reactor
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from keyring_module.clock import global_reactor as typed_global_reactor
from keyring_module.config import InboundConfig
from keyring_module.resources.site import KeyServerSite
from keyring_module.server import TLSServerContextFactory
from tests.fake_connections import BodiesResource, get

SMALL = b'{"ok":true}'
BIG = b'{"pad":"' + b"x" * (16 * 1024 * 1024) + b'"}'
OTHER_BIG = b'{"pad":"' + b"y" * (16 * 1024 * 1024) + b'"}'
WAIT_SECONDS = 10.0


def read_answer(sock: socket.socket) -> tuple[int, bytes]:
    """Read one HTTP answer with a Content-Length from a blocking socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the headers: %r" % data[:200])
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(1024 * 1024)
        if not chunk:
            raise ConnectionError("closed in the body")
        body += chunk
    return int(head.split(b" ", 2)[1]), body


def closed_without_answer(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` without sending a byte."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


class InboundLoopbackTests(TestCase):
    """A ``KeyServerSite`` on the real reactor, on 127.0.0.1 port 0."""

    def listen(
        self, tls: Optional[ssl.SSLContext] = None, **limits: int
    ) -> tuple[KeyServerSite, int]:
        """Listen on 127.0.0.1 (with TLS when ``tls`` is a client context to trust it)."""
        self.resource = BodiesResource({b"small": SMALL, b"big": BIG, b"other": OTHER_BIG})
        reactor = typed_global_reactor()
        site = KeyServerSite(
            self.resource,
            max_request_body=1024,
            inbound=InboundConfig(**limits),
            reactor=reactor,
        )
        port: IListeningPort
        if tls is None:
            port = reactor.listenTCP(0, site, interface="127.0.0.1")
        else:
            ca = trustme.CA()
            ca.configure_trust(tls)
            cert = ca.issue_cert("localhost")
            directory = os.path.abspath(self.mktemp())
            os.makedirs(directory)
            cert_path = os.path.join(directory, "tls.crt")
            key_path = os.path.join(directory, "tls.key")
            cert.private_key_pem.write_to_path(key_path)
            cert.cert_chain_pems[0].write_to_path(cert_path)
            factory = TLSServerContextFactory(cert_path, key_path)
            port = reactor.listenSSL(0, site, factory, interface="127.0.0.1")
        self.addCleanup(site.drop_connections)
        self.addCleanup(port.stopListening)
        return site, port.getHost().port  # type: ignore[attr-defined]

    def client(self, port: int, receive_buffer: Optional[int] = None) -> socket.socket:
        sock = socket.socket()
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.settimeout(WAIT_SECONDS)
        sock.connect(("127.0.0.1", port))
        self.addCleanup(sock.close)
        return sock

    async def exchange(self, sock: socket.socket, path: bytes) -> tuple[int, bytes]:
        """Send a keep-alive GET on ``sock`` and read its answer, from a thread."""

        def run() -> tuple[int, bytes]:
            sock.sendall(get(path))
            return read_answer(sock)

        result: tuple[int, bytes] = await deferToThread(run)
        return result

    async def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        while not condition():
            if time.monotonic() > deadline:
                self.fail("not within %ss: %s" % (WAIT_SECONDS, what))
            await deferLater(global_reactor, 0.01, lambda: None)

    async def test_connection_over_the_per_address_cap_is_closed(self) -> None:
        """With two connections open, a third from the same address is closed unanswered."""
        site, port = self.listen(max_connections_per_address=2)
        first, second = self.client(port), self.client(port)
        self.assertEqual(await self.exchange(first, b"/small"), (200, SMALL))
        self.assertEqual(await self.exchange(second, b"/small"), (200, SMALL))

        with self.assertLogs("keyring_module.resources.per_address", logging.WARNING):
            third = self.client(port)
            third.sendall(get(b"/small"))
            self.assertTrue(await deferToThread(closed_without_answer, third))

        first.close()
        await self.wait_for(
            lambda: site.connections.open_count("127.0.0.1") == 1, "the closed one is counted off"
        )
        self.assertEqual(await self.exchange(self.client(port), b"/small"), (200, SMALL))

    async def test_tls_connection_over_the_cap_is_closed(self) -> None:
        """Over TLS too, a connection over the cap is closed before its handshake completes."""
        context = ssl.create_default_context()
        _, port = self.listen(tls=context, max_connections_per_address=1)

        def connect_tls() -> ssl.SSLSocket:
            return context.wrap_socket(self.client(port), server_hostname="localhost")

        first = await deferToThread(connect_tls)
        self.assertEqual(await self.exchange(first, b"/small"), (200, SMALL))
        with self.assertLogs("keyring_module.resources.per_address", logging.WARNING):
            with self.assertRaises(OSError):  # reset, or closed during the handshake
                await deferToThread(connect_tls)

    async def test_headers_one_byte_at_a_time_are_cut_at_the_header_timeout(self) -> None:
        """A client trickling its request every 50 ms is cut about 1 s after its first byte."""
        _, port = self.listen(header_timeout_ms=1000)
        request = get(b"/small").replace(b"\r\n\r\n", b"\r\nX-Pad: %s\r\n\r\n" % (b"p" * 200))

        def trickle(sock: socket.socket) -> tuple[float, int]:
            started = time.monotonic()
            for sent, byte in enumerate(request):
                try:
                    sock.send(bytes([byte]))
                except OSError:
                    return time.monotonic() - started, sent
                readable, _, _ = select.select([sock], [], [], 0.05)
                if readable and closed_without_answer(sock):
                    return time.monotonic() - started, sent + 1
            self.fail("the whole trickled request was accepted")

        elapsed, sent = await deferToThread(trickle, self.client(port))
        self.assertGreaterEqual(elapsed, 0.9)
        self.assertLess(elapsed, 5.0)
        self.assertGreater(sent, 5, "bytes kept coming, and did not reset the deadline")

    async def test_non_reading_client_is_held_to_the_budget_and_others_are_answered(
        self,
    ) -> None:
        """A client that never reads a 16 MB answer holds it in the budget only; while its
        address's share is full other big answers to it get 429, small ones 200; once it
        goes, all is freed."""
        site, port = self.listen(max_buffered_response_bytes=24 * 1024 * 1024)
        budget = site.response_budget
        non_reader = self.client(port, receive_buffer=4096)
        non_reader.sendall(get(b"/big"))
        await self.wait_for(lambda: budget.held_bytes > 0, "the big answer is counted")
        self.assertLessEqual(budget.held_bytes, len(BIG))

        code, body = await self.exchange(self.client(port), b"/other")
        self.assertEqual(code, 429)
        self.assertIn(b"M_LIMIT_EXCEEDED", body)
        self.assertEqual(await self.exchange(self.client(port), b"/small"), (200, SMALL))
        # The rest of the answer was never copied toward the non-reading client.
        self.assertLess(self.resource.rendered[0].sentLength, len(BIG))
        self.assertGreater(budget.held_bytes, 0)

        non_reader.close()
        await self.wait_for(lambda: budget.held_bytes == 0, "the budget is released")
        self.assertEqual(await self.exchange(self.client(port), b"/other"), (200, OTHER_BIG))

    async def test_non_reading_client_is_dropped_at_the_send_timeout(self) -> None:
        """A non-reading client is dropped at the send timeout and its budget released."""
        site, port = self.listen(send_timeout_ms=1000)
        non_reader = self.client(port, receive_buffer=4096)
        non_reader.sendall(get(b"/big"))
        await self.wait_for(lambda: site.response_budget.held_bytes > 0, "counted")
        started = time.monotonic()
        await self.wait_for(lambda: site.response_budget.held_bytes == 0, "released")
        self.assertLess(time.monotonic() - started, 5.0)
        await self.wait_for(
            lambda: site.connections.open_count("127.0.0.1") == 0, "the connection is gone"
        )
