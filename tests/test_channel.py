"""Connection deadlines of the standalone site: idle, header and send timeouts that no
amount of trickled traffic resets, and pipelined requests that wait for a reading client."""

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.resources.channel import CLOSE_GRACE_SECONDS, GuardedHTTPChannel, Phase
from tests.fake_connections import BodiesResource, connect, disconnect, get, make_site

SMALL = b'{"ok":true}'
MEDIUM = b'{"pad":"' + b"m" * (50 * 1024) + b'"}'  # written at once (under one piece)
BIG = b'{"pad":"' + b"x" * (1024 * 1024) + b'"}'


class HeaderTimeoutTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.resource = BodiesResource({b"small": SMALL})
        self.site, self.clock = make_site(
            self.resource, idle_timeout_ms=60_000, header_timeout_ms=10_000
        )

    def test_headers_one_byte_at_a_time_are_cut_at_the_header_timeout(self) -> None:
        """A request trickled one byte every 2 s is dropped 10 s after its first byte."""
        channel, transport = connect(self.site)
        request = get(b"/small")
        for i in range(5):  # bytes at t = 0, 2, 4, 6, 8
            channel.dataReceived(request[i : i + 1])
            self.clock.advance(2 if i < 4 else 1.9)
        self.assertFalse(transport.disconnecting, "still within 10 s of the first byte")
        channel.dataReceived(request[5:6])
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnected, "dropped at the header timeout")
        self.assertEqual(transport.value(), b"", "never answered")
        self.assertEqual(self.resource.rendered, [])

    def test_whole_request_in_time_is_answered_and_cancels_the_header_timeout(self) -> None:
        """A request completed within the header timeout is answered and not cut later."""
        channel, transport = connect(self.site)
        request = get(b"/small")
        channel.dataReceived(request[:10])
        self.clock.advance(9)
        channel.dataReceived(request[10:])
        self.assertIn(SMALL, transport.read())
        self.clock.advance(30)
        self.assertFalse(transport.disconnecting)

    def test_header_timeout_counts_from_the_first_byte_after_idling(self) -> None:
        """A keep-alive connection may idle, then has the whole header timeout for its request."""
        channel, transport = connect(self.site)
        self.clock.advance(50)  # idle, under the 60 s idle timeout
        channel.dataReceived(b"G")
        self.clock.advance(9.9)
        channel.dataReceived(get(b"/small")[1:])
        self.assertIn(SMALL, transport.read())
        self.assertFalse(transport.disconnecting)

    def test_partial_request_pipelined_behind_an_answer_gets_the_header_timeout(self) -> None:
        """The start of a request that arrived while the previous one was being answered
        has the header timeout from when that answer is written, not the idle timeout."""
        self.resource.pending[b"slow"] = defer.Deferred()
        channel, transport = connect(self.site)
        channel.dataReceived(get(b"/slow") + b"GET /sm")
        self.resource.pending[b"slow"].callback(SMALL)
        self.assertIn(SMALL, transport.read())
        assert isinstance(channel, GuardedHTTPChannel)
        self.assertIs(channel.phase, Phase.RECEIVING)
        self.clock.advance(10)
        self.assertTrue(transport.disconnected, "dropped at the header timeout")


class IdleTimeoutTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.resource = BodiesResource({b"small": SMALL})
        self.site, self.clock = make_site(
            self.resource, idle_timeout_ms=60_000, header_timeout_ms=10_000
        )

    def test_connection_without_a_request_is_closed_at_the_idle_timeout(self) -> None:
        """A connection that sends nothing is closed gracefully after the idle timeout."""
        _, transport = connect(self.site)
        self.clock.advance(59.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected, "a graceful close first")
        self.clock.advance(CLOSE_GRACE_SECONDS)
        self.assertTrue(transport.disconnected, "dropped when the close does not complete")

    def test_idle_timeout_restarts_when_an_answer_is_written(self) -> None:
        """After an answer the connection may idle for the whole idle timeout again."""
        channel, transport = connect(self.site)
        self.clock.advance(50)
        channel.dataReceived(get(b"/small"))
        self.assertIn(SMALL, transport.read())
        self.clock.advance(59.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)

    def test_a_slow_answer_is_not_cut_by_any_timeout(self) -> None:
        """While an answer is being worked on, neither the idle nor the header timeout runs."""
        self.resource.pending[b"slow"] = defer.Deferred()
        channel, transport = connect(self.site)
        channel.dataReceived(get(b"/slow"))
        self.clock.advance(600)
        self.assertFalse(transport.disconnecting)
        self.resource.pending[b"slow"].callback(SMALL)
        self.assertIn(SMALL, transport.read())
        self.clock.advance(60)
        self.assertTrue(transport.disconnecting, "idle again once answered")

    def test_keep_alive_requests_keep_one_timer(self) -> None:
        """However many requests a connection serves, it has one wake-up call on the clock."""
        channel, transport = connect(self.site)
        for _ in range(100):
            channel.dataReceived(get(b"/small"))
            self.clock.advance(1)
        self.assertEqual(transport.read().count(SMALL), 100)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_closed_connection_leaves_no_timer(self) -> None:
        """A connection that is gone has no deadline left on the clock."""
        channel, _ = connect(self.site)
        channel.dataReceived(b"GE")
        disconnect(channel)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class SendTimeoutTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.resource = BodiesResource({b"big": BIG, b"small": SMALL})
        self.site, self.clock = make_site(
            self.resource, idle_timeout_ms=600_000, send_timeout_ms=60_000
        )

    def test_slow_reader_is_dropped_at_the_send_timeout_however_often_it_reads(self) -> None:
        """A client reading a bit every 20 s is dropped 60 s after it first fell behind."""
        channel, transport = connect(self.site)
        channel.dataReceived(get(b"/big"))
        self.assertTrue(transport.producer_paused, "behind after the first pieces")
        for _ in range(2):
            self.clock.advance(20)
            transport.read()  # the client takes a little and falls behind again
            self.assertTrue(transport.producer_paused)
        self.clock.advance(19.9)
        self.assertFalse(transport.disconnected)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnected)
        self.assertLess(len(transport.received), len(BIG))

    def test_reader_that_keeps_up_has_no_send_deadline(self) -> None:
        """A client that reads the whole answer in time keeps its connection."""
        channel, transport = connect(self.site)
        channel.dataReceived(get(b"/big"))
        self.clock.advance(59)
        received = transport.read_all()
        self.assertTrue(received.endswith(BIG))
        self.clock.advance(120)
        self.assertFalse(transport.disconnecting)
        assert isinstance(channel, GuardedHTTPChannel)
        self.assertIs(channel.phase, Phase.IDLE)


class PipeliningTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.resource = BodiesResource({b"big": BIG, b"medium": MEDIUM, b"small": SMALL})
        self.site, self.clock = make_site(self.resource)

    def test_pipelined_requests_wait_while_the_client_does_not_read(self) -> None:
        """Requests pipelined behind unread answers are processed only as the client reads."""
        channel, transport = connect(self.site, buffer_bytes=80 * 1024)
        channel.dataReceived(get(b"/medium") * 5 + get(b"/small"))
        # The first two answers filled the send buffer; the rest wait, unanswered.
        self.assertEqual(len(self.resource.rendered), 2)
        self.assertLess(transport.unread_bytes(), 3 * len(MEDIUM))
        received = transport.read_all()
        self.assertEqual(len(self.resource.rendered), 6)
        self.assertEqual(received.count(b"HTTP/1.1 200 OK"), 6)
        self.assertEqual(received.count(MEDIUM), 5)
        self.assertTrue(received.endswith(SMALL))

    def test_big_answers_pipelined_are_held_one_at_a_time(self) -> None:
        """Only one big answer of a non-reading client counts toward the budget at a time."""
        channel, transport = connect(self.site)
        channel.dataReceived(get(b"/big") + get(b"/big") + get(b"/small"))
        self.assertEqual(len(self.resource.rendered), 1)
        self.assertEqual(self.site.response_budget.held_bytes, len(BIG))
        received = transport.read_all()
        self.assertEqual(received.count(BIG), 2)
        self.assertTrue(received.endswith(SMALL))
        self.assertEqual(self.site.response_budget.held_bytes, 0)

    def test_client_gone_while_its_request_waits(self) -> None:
        """A waiting pipelined request of a client that disconnects is never processed."""
        channel, transport = connect(self.site, buffer_bytes=80 * 1024)
        channel.dataReceived(get(b"/medium") * 3)
        self.assertEqual(len(self.resource.rendered), 2)
        disconnect(channel)
        transport.read_all()
        self.assertEqual(len(self.resource.rendered), 2)
