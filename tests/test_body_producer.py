"""Big answers go out piece by piece as the client reads, counted toward one byte budget;
while the budget is full, big answers get 429 and small ones still go out."""

import json

from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.resources.body_producer import (
    CHUNK_BYTES,
    COPIES_BYTES_PER_CONNECTION,
    ResponseBudget,
)
from tests.fake_connections import BodiesResource, connect, disconnect, get, make_site

SMALL = b'{"ok":true}'
BIG = b'{"pad":"' + b"x" * (1024 * 1024) + b'"}'
OTHER_BIG = b'{"pad":"' + b"y" * (1024 * 1024) + b'"}'


def status_and_body(received: bytes) -> tuple[int, bytes]:
    """The status and body of the one HTTP answer in ``received``."""
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


class BodyProducerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.resource = BodiesResource({b"big": BIG, b"other": OTHER_BIG, b"small": SMALL})
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
        """While a non-reader holds the budget, another big answer gets 429 and a small
        one 200."""
        reader_a, _ = connect(self.site, host="192.0.2.1")
        reader_a.dataReceived(get(b"/big"))
        self.assertEqual(self.budget.held_bytes, len(BIG))

        channel_b, transport_b = connect(self.site, host="192.0.2.2")
        channel_b.dataReceived(get(b"/other"))
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
        channel_b.dataReceived(get(b"/other"))
        self.assertEqual(status_and_body(transport_b.read_all()), (200, OTHER_BIG))

    def test_one_address_holds_at_most_its_share(self) -> None:
        """Seven non-reading connections from one address asking for different big
        answers get one (its share is a quarter of the budget); another address is
        still answered."""
        bodies = {b"big%d" % i: b'{"pad":"%d%s"}' % (i, b"x" * (256 * 1024)) for i in range(8)}
        site, _ = make_site(BodiesResource(bodies), max_buffered_response_bytes=1024 * 1024)
        codes = []
        for i in range(7):
            channel, transport = connect(site, host="192.0.2.1", buffer_bytes=16 * 1024)
            channel.dataReceived(get(b"/big%d" % i))
            codes.append(int(transport.value().split(b" ", 2)[1]))
        self.assertEqual(codes, [200] + [429] * 6)
        self.assertEqual(site.response_budget.held_by("192.0.2.1"), len(bodies[b"big0"]))

        channel, transport = connect(site, host="192.0.2.2")
        channel.dataReceived(get(b"/big7"))
        self.assertEqual(status_and_body(transport.read_all()), (200, bodies[b"big7"]))

    def test_no_address_share_without_a_per_address_cap(self) -> None:
        """With max_connections_per_address 0 (behind a proxy, one address for all),
        one address may hold the whole budget."""
        bodies = {b"big%d" % i: b'{"pad":"%d%s"}' % (i, b"x" * (256 * 1024)) for i in range(3)}
        site, _ = make_site(
            BodiesResource(bodies),
            max_buffered_response_bytes=1024 * 1024,
            max_connections_per_address=0,
        )
        for i in range(3):
            channel, transport = connect(site, host="192.0.2.1", buffer_bytes=16 * 1024)
            channel.dataReceived(get(b"/big%d" % i))
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "), i)

    def test_an_answer_sent_to_many_clients_is_counted_once(self) -> None:
        """Non-readers on five addresses sharing one big answer hold it once (plus their
        copies) until the last of them is gone."""
        site, _ = make_site(self.resource, max_buffered_response_bytes=4 * len(BIG))
        budget = site.response_budget
        channels = []
        for i in range(5):
            channel, transport = connect(site, host="192.0.2.%d" % (i + 1))
            channel.dataReceived(get(b"/big"))
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))
            channels.append((channel, transport))
        self.assertEqual(budget.held_bytes, len(BIG) + 5 * COPIES_BYTES_PER_CONNECTION)
        self.assertEqual(budget.held_by("192.0.2.3"), len(BIG))
        for channel, _ in channels[:4]:
            disconnect(channel)
        self.assertEqual(budget.held_bytes, len(BIG), "the last one took nothing yet")
        _, transport = channels[4]
        self.assertEqual(status_and_body(transport.read_all()), (200, BIG))
        self.assertEqual(budget.held_bytes, 0)

    def test_shared_answer_counts_down_once_one_client_is_left(self) -> None:
        """A shared answer counts in full while shared; left with one client, it counts
        what that client has not taken."""
        reader, reader_transport = connect(self.site, host="192.0.2.1")
        other, _ = connect(self.site, host="192.0.2.2")
        reader.dataReceived(get(b"/big"))
        other.dataReceived(get(b"/big"))
        reader_transport.read()
        self.assertEqual(self.budget.held_bytes, len(BIG) + 2 * COPIES_BYTES_PER_CONNECTION)
        disconnect(other)
        self.assertLess(self.budget.held_bytes, len(BIG))
        self.assertGreater(self.budget.held_bytes, 0)
        self.assertEqual(self.budget.held_by("192.0.2.2"), 0)

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
