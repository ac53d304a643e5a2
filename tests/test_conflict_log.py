"""Tests for rate-limited key conflict log lines: ``ConflictLog`` alone, and the fetcher
chain facing an origin that re-keys many ``old_verify_keys`` on every refetch."""

from typing import Mapping

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.fetchers.base import FetchResult, SourceAnswers
from keyring_module.fetchers.chain import KeyFetcherChain
from keyring_module.fetchers.conflict_log import ConflictLog
from keyring_module.model import SOURCE_ORIGIN, KeyConflict, KeyRequest, ServerKeysResponse
from keyring_module.storage.bounds import StoreLimits
from keyring_module.storage.memory import InMemoryKeyStore
from tests.storage_writer import make_response

A, B = b"\x0a" * 32, b"\x0b" * 32
LOGGER = "keyring_module.fetchers.conflict_log"


def conflict(server_name: str, n: int) -> KeyConflict:
    """The n-th conflict of a server (a distinct key id each)."""
    return KeyConflict(server_name, "ed25519:k%d" % n, A, "origin", B, "notary:n", 1)


class ConflictLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.log = ConflictLog(self.clock, max_lines=3, window_ms=60_000, max_servers=5)

    def report(self, server_name: str, count: int) -> list[str]:
        """Report ``count`` conflicts of a server and flush; returns the lines logged."""
        with self.assertLogs(LOGGER, "WARNING") as logs:
            for n in range(count):
                self.log.report(conflict(server_name, n))
            self.log.flush(server_name)
        return logs.output

    def test_lines_per_server_then_one_summary(self) -> None:
        """A server's first conflicts of a window are logged, then one summary line says
        how many were left out."""
        lines = self.report("a.example", 10)
        self.assertEqual(len(lines), 4)
        self.assertEqual(
            lines[0],
            "WARNING:%s:Key conflict for a.example ed25519:k0: kept CgoKCgoKCgoKCgoKCgoKCgoKCgoK"
            "CgoKCgoKCgoKCgo from origin, rejected CwsLCwsLCwsLCwsLCwsLCwsLCwsLCwsLCwsLCwsLCws"
            " from notary:n" % LOGGER,
        )
        self.assertEqual(
            lines[3],
            "WARNING:%s:7 more key conflicts of a.example not logged"
            " (at most 3 lines per server every 60 s)" % LOGGER,
        )

    def test_servers_have_their_own_budget(self) -> None:
        """A server that used up its lines does not silence another server."""
        self.report("a.example", 10)
        self.assertEqual(len(self.report("b.example", 3)), 3)

    def test_window_starts_again(self) -> None:
        """Within the window only summaries are logged; the next window logs lines again."""
        self.report("a.example", 3)
        self.assertEqual(
            [line.split(":", 2)[2] for line in self.report("a.example", 5)],
            [
                "5 more key conflicts of a.example not logged (at most 3 lines per server every 60 s)"
            ],
        )
        self.clock.advance(60)
        self.assertEqual(len(self.report("a.example", 3)), 3)

    def test_no_summary_when_nothing_was_left_out(self) -> None:
        """Flushing a server with nothing left out logs nothing."""
        self.report("a.example", 2)
        with self.assertNoLogs(LOGGER, "WARNING"):
            self.log.flush("a.example")
            self.log.flush("unknown.example")

    def test_memory_bounded(self) -> None:
        """At most ``max_servers`` windows are kept, and ended windows are forgotten."""
        for i in range(100):
            self.report("s%d.example" % i, 1)
        self.assertEqual(self.log.tracked_servers(), 5)
        self.clock.advance(60)
        self.report("new.example", 1)
        self.assertEqual(self.log.tracked_servers(), 1)


class OriginAnswers:
    """An origin fetcher that answers with the responses queued for it, one per fetch."""

    sources = (SOURCE_ORIGIN,)

    def __init__(self) -> None:
        self.queue: list[ServerKeysResponse] = []

    async def fetch_keys(self, requests: Mapping[str, KeyRequest]) -> SourceAnswers:
        answers = SourceAnswers()
        response = self.queue.pop(0)
        answers.add_result(response.server_name, FetchResult(response, SOURCE_ORIGIN))
        return answers


class RekeyingOriginTests(SynchronousTestCase):
    """An origin that re-keys 50 old keys on every forced refetch."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.store = InMemoryKeyStore(StoreLimits(max_keys=100, max_responses=4, max_conflicts=20))
        self.origin = OriginAnswers()
        self.seen: list[KeyConflict] = []
        self.chain = KeyFetcherChain(
            self.store, self.origin, None, self.clock, on_conflict=self.seen.append
        )
        self.key_ids = ["ed25519:old%02d" % i for i in range(50)]

    def refetch(self, key_bytes: bytes, valid_until_ts: int) -> list[str]:
        """One forced refetch answered with the old keys re-keyed to ``key_bytes``;
        returns the chain's WARNING lines."""
        old = dict.fromkeys(self.key_ids, (key_bytes, 500))
        self.origin.queue.append(make_response("o.example", valid_until_ts, {}, old))
        request = KeyRequest("o.example", None, 0)
        with self.assertLogs("keyring_module.fetchers.chain", "INFO") as logs:
            d = defer.ensureDeferred(self.chain.get_keys([request], use_cache=False))
            self.successResultOf(d)
        return [line for line in logs.output if line.startswith("WARNING")]

    def test_lines_bounded_every_sighting_counted(self) -> None:
        """Each refetch logs at most 10 conflict lines and one summary, while the metric
        hook sees every conflict and the store keeps at most its bound of records."""
        self.assertEqual(self.refetch(A, 2_000_000_000_000), [])
        first = self.refetch(B, 2_000_000_000_001)
        self.assertEqual(len(first), 11)
        self.assertIn("40 more key conflicts of o.example not logged", first[-1])
        second = self.refetch(bytes(32), 2_000_000_000_002)
        self.assertEqual(len(second), 1)
        self.assertIn("50 more key conflicts of o.example not logged", second[0])
        self.assertEqual(self.chain.conflicts_seen, 100)
        self.assertEqual(len(self.seen), 100)
        recorded = self.successResultOf(defer.ensureDeferred(self.store.get_conflicts("o.example")))
        self.assertEqual([c.key_id for c in recorded], self.key_ids[:20])
        self.assertTrue(all(c.rejected_key_bytes == B for c in recorded))
