"""Big answers go out piece by piece as the client reads, counted toward one byte budget;
while the budget is full, big answers get 429 and small ones still go out."""

import json

from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.resources.body_producer import CHUNK_BYTES, ResponseBudget
from tests.fake_connections import BodiesResource, connect, disconnect, get, make_site

SMALL = b'{"ok":true}'
BIG = b'{"pad":"' + b"x" * (1024 * 1024) + b'"}'


def status_and_body(received: bytes) -> tuple[int, bytes]:
    """The status and body of the one HTTP answer in ``received``."""
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


class BodyProducerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.resource = BodiesResource({b"big": BIG, b"small": SMALL})
        self.site, self.clock = make_site(
            self.resource, max_buffered_response_bytes=len(BIG) + len(BIG) // 2
        )
        self.budget = self.site.response_budget

    def test_non_reading_client_holds_one_send_buffer_of_copies(self) -> None:
        """A client that never reads gets one send buffer of its answer; the rest is counted."""
        channel, transport = connect(self.site, buffer_bytes=128 * 1024)
        channel.dataReceived(get(b"/big"))
        self.assertTrue(transport.producer_paused)
        self.assertLessEqual(transport.unread_bytes(), 128 * 1024 + CHUNK_BYTES + 1024)
        self.assertEqual(self.budget.held_bytes, len(BIG))

    def test_budget_counts_down_as_the_client_reads(self) -> None:
        """Each buffer the client takes is released from the budget, all of it at the end."""
        channel, transport = connect(self.site)
        channel.dataReceived(get(b"/big"))
        transport.read()
        self.assertLess(self.budget.held_bytes, len(BIG))
        self.assertGreater(self.budget.held_bytes, 0)
        received = transport.read_all()
        self.assertEqual(status_and_body(received), (200, BIG))
        self.assertEqual(self.budget.held_bytes, 0)

    def test_full_budget_refuses_big_answers_and_serves_small_ones(self) -> None:
        """While a non-reader holds the budget, a big answer gets 429 and a small one 200."""
        reader_a, _ = connect(self.site, host="192.0.2.1")
        reader_a.dataReceived(get(b"/big"))
        self.assertEqual(self.budget.held_bytes, len(BIG))

        channel_b, transport_b = connect(self.site, host="192.0.2.2")
        channel_b.dataReceived(get(b"/big"))
        code, body = status_and_body(transport_b.read_all())
        self.assertEqual(code, 429)
        self.assertEqual(
            json.loads(body),
            {
                "errcode": "M_LIMIT_EXCEEDED",
                "error": "Too many answers are waiting to be read",
                "retry_after_ms": 1000,
            },
        )

        channel_c, transport_c = connect(self.site, host="192.0.2.3")
        channel_c.dataReceived(get(b"/small"))
        self.assertEqual(status_and_body(transport_c.read_all()), (200, SMALL))

        # Once the non-reader is gone, its bytes are released and big answers go out again.
        disconnect(reader_a)
        self.assertEqual(self.budget.held_bytes, 0)
        transport_b.clear()
        transport_b.received = b""
        channel_b.dataReceived(get(b"/big"))
        self.assertEqual(status_and_body(transport_b.read_all()), (200, BIG))

    def test_answer_larger_than_the_budget_goes_alone(self) -> None:
        """An answer bigger than the whole budget is sent while nothing else is held."""
        site, _ = make_site(self.resource, max_buffered_response_bytes=len(BIG) // 2)
        channel, transport = connect(site)
        channel.dataReceived(get(b"/big"))
        self.assertEqual(site.response_budget.held_bytes, len(BIG))
        self.assertEqual(status_and_body(transport.read_all()), (200, BIG))

    def test_small_answers_are_written_at_once_and_not_counted(self) -> None:
        """An answer up to one piece is written whole, with its Content-Length, uncounted."""
        channel, transport = connect(self.site)
        channel.dataReceived(get(b"/small"))
        self.assertEqual(self.budget.held_bytes, 0)
        received = transport.read()
        self.assertIn(b"Content-Length: %d\r\n" % len(SMALL), received)
        self.assertEqual(status_and_body(received), (200, SMALL))

    def test_head_of_a_big_answer_sends_no_body(self) -> None:
        """HEAD gets the big answer's headers and length, no body, and holds no budget."""
        channel, transport = connect(self.site)
        channel.dataReceived(b"HEAD /big HTTP/1.1\r\nHost: notary.test\r\n\r\n")
        received = transport.read()
        self.assertIn(b"Content-Length: %d\r\n" % len(BIG), received)
        self.assertTrue(received.endswith(b"\r\n\r\n"))
        self.assertEqual(self.budget.held_bytes, 0)

    def test_big_answer_through_a_site_without_budget(self) -> None:
        """On a plain Site (as inside Synapse or treq's test client) big answers arrive whole."""
        stub = StubTreq(self.resource)
        response = self.successResultOf(stub.get("http://notary.test/big"))  # type: ignore[attr-defined]
        self.assertEqual(response.code, 200)
        self.assertEqual(response.length, len(BIG))
        self.assertEqual(self.successResultOf(response.content()), BIG)


class ResponseBudgetTests(SynchronousTestCase):
    def test_take_and_release(self) -> None:
        """The budget admits answers while they fit and counts releases back down."""
        budget = ResponseBudget(max_bytes=100)
        self.assertTrue(budget.can_take(100))
        budget.take(60)
        self.assertTrue(budget.can_take(40))
        self.assertFalse(budget.can_take(41))
        budget.release(60)
        self.assertEqual(budget.held_bytes, 0)
        budget.release(5)
        self.assertEqual(budget.held_bytes, 0, "never below zero")
