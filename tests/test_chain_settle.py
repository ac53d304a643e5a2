"""The fetcher chain settles a server by the first sufficient trusted answer(s).

Sources are :class:`~tests.chain_fakes.ScriptedFetcher` values on a ``Clock``: an honest
notary answering after 40 ms, a hanging one answering late (or never), and an origin that
is down. Times are seconds since the start of the call.
"""

from typing import Any, Mapping, Optional, Sequence

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.config import KeyTrustConfig
from keyring_module.fetchers.base import FailureKind
from keyring_module.fetchers.chain import KeyFetcherChain
from keyring_module.fetchers.trace import FetchTrace
from keyring_module.model import SOURCE_ORIGIN, KeyConflict, KeyRequest, StoredKey, notary_source
from keyring_module.storage.limits import StoreLimits
from keyring_module.storage.memory import InMemoryKeyStore
from tests.chain_fakes import ScriptedFetcher
from tests.storage_writer import make_response

NOW_MS = 1_700_000_000_000
DAY_MS = 24 * 60 * 60 * 1000
TIMEOUT_MS = 10_000
SERVER = "origin.example"
OTHER = "other.example"
KID, KID2 = "ed25519:k", "ed25519:k2"
GOOD, LIE, EXTRA = b"\x0a" * 32, b"\x0b" * 32, b"\x0c" * 32
S1, S2, S3 = (notary_source(n) for n in ("n1.example", "n2.example", "n3.example"))
HONEST_DELAY_S = 0.04


class JudgingFailsStore(InMemoryKeyStore):
    """A store whose bounds cannot be read once ``armed``: judging an answer fails then,
    once, as a bug would."""

    armed = False

    @property
    def limits(self) -> StoreLimits:
        if self.armed:
            self.armed = False
            raise RuntimeError("bug while judging")
        return super().limits


class ChainSettleTestCase(SynchronousTestCase):
    """A store, an origin that is down and three notaries, all hanging unless told."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW_MS / 1000)
        self.start = self.clock.seconds()
        self.store = InMemoryKeyStore()
        self.origin = ScriptedFetcher(SOURCE_ORIGIN, self.clock)  # knows nothing
        self.notaries = [ScriptedFetcher(s, self.clock, delay_s=None) for s in (S1, S2, S3)]
        self.conflicts: list[KeyConflict] = []
        self.reports: list[tuple[float, str]] = []

    def knows(
        self, i: int, keys: Mapping[str, bytes], delay_s: Optional[float], server: str = SERVER
    ) -> None:
        """Let notary ``i`` answer ``keys`` about ``server`` after ``delay_s``."""
        self.notaries[i].responses[server] = make_response(server, NOW_MS + DAY_MS, keys)
        self.notaries[i].delay_s = delay_s

    def make_chain(
        self, n: int = 1, order: Sequence[str] = ("origin", "notaries"), **kw: Any
    ) -> KeyFetcherChain:
        return KeyFetcherChain(
            self.store,
            self.origin,
            self.notaries,
            self.clock,
            order=order,
            trust=KeyTrustConfig(n),
            timeout_ms=TIMEOUT_MS,
            on_conflict=self.conflicts.append,
            **kw,
        )

    def start_get_keys(
        self, chain: KeyFetcherChain, *names: str, trace: Optional[FetchTrace] = None
    ) -> "defer.Deferred[dict[str, dict[str, StoredKey]]]":
        def on_server(server_name: str, keys: Mapping[str, StoredKey]) -> None:
            self.reports.append((round(self.clock.seconds() - self.start, 3), server_name))

        requests = [KeyRequest(name, None, NOW_MS) for name in names]
        return defer.ensureDeferred(chain.get_keys(requests, on_server=on_server, trace=trace))

    def stored(self, server: str = SERVER) -> dict[str, tuple[bytes, str]]:
        keys = self.successResultOf(defer.ensureDeferred(self.store.get_server_keys(server)))
        return {kid: (key.verify_key_bytes, key.source) for kid, key in keys.items()}

    def wait_for_background(self, chain: KeyFetcherChain) -> None:
        """Let the hanging sources time out, and wait for what the chain does meanwhile."""
        self.clock.advance(TIMEOUT_MS / 1000)
        self.successResultOf(defer.ensureDeferred(chain.wait_for_background()))


class FirstAnswerSettlesTests(ChainSettleTestCase):
    def test_returns_with_the_honest_answer_not_the_hanging_one(self) -> None:
        """N=1: with one hanging and one honest notary, get_keys returns as soon as the
        honest answer is in, even when the hanging notary is listed first."""
        self.knows(1, {KID: GOOD}, HONEST_DELAY_S)
        chain = self.make_chain()
        d = self.start_get_keys(chain, SERVER)
        self.assertEqual([len(n.calls) for n in self.notaries], [1, 1, 1])  # in parallel
        self.clock.advance(HONEST_DELAY_S - 0.001)
        self.assertNoResult(d)
        self.clock.advance(0.001)
        keys = self.successResultOf(d)
        self.assertEqual(keys[SERVER][KID].verify_key_bytes, GOOD)
        self.assertEqual(keys[SERVER][KID].source, S2)
        self.assertEqual(self.reports, [(HONEST_DELAY_S, SERVER)])
        self.assertEqual(len(self.notaries[0].pending), 1)  # still asked, not waited for

    def test_late_answer_is_still_stored(self) -> None:
        """The hanging notary's answer that comes after the server was settled is still
        judged and stored (here it adds a key id), in the background."""
        self.knows(1, {KID: GOOD}, HONEST_DELAY_S)
        self.knows(0, {KID: GOOD, KID2: EXTRA}, None)
        chain = self.make_chain()
        d = self.start_get_keys(chain, SERVER)
        self.clock.advance(HONEST_DELAY_S)
        self.assertEqual(list(self.successResultOf(d)[SERVER]), [KID])
        self.clock.advance(5)
        self.notaries[0].answer_pending()
        self.wait_for_background(chain)
        stored = self.stored()
        self.assertEqual(stored[KID][0], GOOD)
        self.assertEqual(stored[KID2], (EXTRA, S1))

    def test_late_conflicting_answer_is_recorded_not_stored(self) -> None:
        """A late answer that contradicts the settled key is not stored, and its conflict
        is recorded in the store and reported to the hook."""
        self.knows(1, {KID: GOOD}, HONEST_DELAY_S)
        self.knows(0, {KID: LIE}, None)
        chain = self.make_chain()
        d = self.start_get_keys(chain, SERVER)
        self.clock.advance(HONEST_DELAY_S)
        self.successResultOf(d)
        self.clock.advance(1)
        with self.assertLogs("keyring_module.fetchers.chain", "WARNING") as logs:
            self.notaries[0].answer_pending()
            self.wait_for_background(chain)
        self.assertIn("Key conflict for %s" % SERVER, logs.output[0])
        self.assertEqual(self.stored(), {KID: (GOOD, S2)})
        recorded = self.successResultOf(defer.ensureDeferred(self.store.get_conflicts(SERVER)))
        self.assertEqual(
            [
                (c.kept_key_bytes, c.kept_source, c.rejected_key_bytes, c.rejected_source)
                for c in recorded
            ],
            [(GOOD, S2, LIE, S1)],
        )
        self.assertEqual([c.rejected_source for c in self.conflicts], [S1])
        self.assertEqual(chain.conflicts_seen, 1)

    def test_answer_after_the_timeout_is_not_used(self) -> None:
        """A notary answering after the chain's timeout is recorded as timed out, and what
        it says then is not stored."""
        self.knows(1, {KID: GOOD}, HONEST_DELAY_S)
        self.knows(0, {KID: GOOD, KID2: EXTRA}, None)
        chain = self.make_chain()
        trace = FetchTrace()
        d = self.start_get_keys(chain, SERVER, trace=trace)
        self.clock.advance(TIMEOUT_MS / 1000)
        self.successResultOf(d)
        self.notaries[0].answer_pending()
        self.wait_for_background(chain)
        self.assertEqual(self.stored(), {KID: (GOOD, S2)})
        failures = [(f.source, f.kind) for f in trace.servers[SERVER].failures]
        self.assertIn((S1, FailureKind.TIMED_OUT), failures)

    def test_late_answer_is_traced(self) -> None:
        """A late answer is recorded in the call's trace when it comes: answered and used."""
        self.knows(1, {KID: GOOD}, HONEST_DELAY_S)
        self.knows(0, {KID: GOOD}, 2.0)
        chain = self.make_chain()
        trace = FetchTrace()
        d = self.start_get_keys(chain, SERVER, trace=trace)
        self.clock.advance(HONEST_DELAY_S)
        self.successResultOf(d)
        server = trace.servers[SERVER]
        self.assertEqual([r.source for r in server.used], [S2])
        self.clock.advance(2.0)
        self.wait_for_background(chain)
        self.assertEqual([r.source for r in server.answers], [S2, S1])
        self.assertEqual([r.source for r in server.used], [S2, S1])

    def test_each_server_settled_by_its_first_answer(self) -> None:
        """In one batch, each server is settled as soon as some notary answers it well,
        not when the slowest notary answers."""
        self.knows(1, {KID: GOOD}, HONEST_DELAY_S)
        self.knows(2, {KID: EXTRA}, 1.0, server=OTHER)
        chain = self.make_chain()
        d = self.start_get_keys(chain, SERVER, OTHER)
        self.clock.advance(HONEST_DELAY_S)
        self.assertEqual(self.reports, [(HONEST_DELAY_S, SERVER)])
        self.assertNoResult(d)
        self.clock.advance(1.0 - HONEST_DELAY_S)
        keys = self.successResultOf(d)
        self.assertEqual(self.reports, [(HONEST_DELAY_S, SERVER), (1.0, OTHER)])
        self.assertEqual(keys[OTHER][KID].verify_key_bytes, EXTRA)
        self.assertEqual(len(self.notaries[0].pending), 1)

    def test_unanswered_server_waits_for_every_notary(self) -> None:
        """A server no notary answers well is settled once all notaries are in or timed
        out, with whatever is stored (nothing here)."""
        self.knows(1, {KID: GOOD}, HONEST_DELAY_S)
        chain = self.make_chain()
        d = self.start_get_keys(chain, SERVER, OTHER)
        self.clock.advance(HONEST_DELAY_S)
        self.clock.advance(TIMEOUT_MS / 1000 - HONEST_DELAY_S - 0.001)
        self.assertNoResult(d)
        self.clock.advance(0.001)
        self.assertEqual(self.successResultOf(d)[OTHER], {})
        self.assertEqual(self.reports, [(HONEST_DELAY_S, SERVER), (TIMEOUT_MS / 1000, OTHER)])

    def test_notaries_first_goes_on_to_the_origin_when_all_notaries_are_in(self) -> None:
        """Notaries first: a server the notaries answer is settled by the first good
        answer; one they do not answer goes on to its origin once every notary is in."""
        self.knows(1, {KID: GOOD}, HONEST_DELAY_S)
        for notary in (self.notaries[0], self.notaries[2]):
            notary.delay_s = 0.5
        self.origin.responses[OTHER] = make_response(OTHER, NOW_MS + DAY_MS, {KID: EXTRA})
        chain = self.make_chain(order=("notaries", "origin"))
        d = self.start_get_keys(chain, SERVER, OTHER)
        self.clock.advance(HONEST_DELAY_S)
        self.assertEqual(self.reports, [(HONEST_DELAY_S, SERVER)])
        self.assertEqual(self.origin.calls, [])
        self.clock.advance(0.5 - HONEST_DELAY_S)
        self.assertEqual(self.origin.calls, [[OTHER]])
        keys = self.successResultOf(d)
        self.assertEqual(keys[OTHER][KID].source, SOURCE_ORIGIN)

    def test_late_answer_failure_is_logged(self) -> None:
        """When storing a late answer fails, the failure is logged with what it was about,
        not lost."""
        self.knows(1, {KID: GOOD}, HONEST_DELAY_S)
        self.knows(0, {KID: GOOD}, None)
        chain = self.make_chain()
        d = self.start_get_keys(chain, SERVER)
        self.clock.advance(HONEST_DELAY_S)
        self.successResultOf(d)

        async def broken(server_name: str, *args: Any) -> dict[str, StoredKey]:
            raise RuntimeError("store gone")

        self.store.get_server_keys = broken  # type: ignore[method-assign,assignment]
        with self.assertLogs("keyring_module.fetchers.chain", "ERROR") as logs:
            self.notaries[0].answer_pending()
            self.wait_for_background(chain)
        self.assertIn("late answer about %s" % SERVER, logs.output[0])
        self.assertIn("store gone", logs.output[0])

    def test_bug_judging_one_answer_fails_the_call_after_the_others(self) -> None:
        """A bug while judging one server's answer gives up on that server only: the
        others go on to the next stage and are settled, then the call fails with the
        error, which is logged."""
        broken, fine = "b-broken.example", "a-fine.example"
        self.origin.delay_s = None
        self.origin.responses[broken] = make_response(broken, NOW_MS + DAY_MS, {KID: GOOD})
        self.knows(0, {KID: EXTRA}, 0, server=fine)
        self.store = store = JudgingFailsStore()
        d = self.start_get_keys(self.make_chain(), broken, fine)
        store.armed = True
        with self.assertLogs("keyring_module.fetchers.chain", "ERROR") as logs:
            self.origin.answer_pending()  # fine's (nothing), then broken's (the bug)
        self.assertEqual(self.reports, [(0, fine)])
        self.failureResultOf(d, RuntimeError)
        self.assertIn("answers of origin of %s" % broken, logs.output[0])


class AgreementSettlesTests(ChainSettleTestCase):
    def test_two_of_three_agree_while_one_hangs(self) -> None:
        """N=2: with the origin down, two notaries agreeing settle the server at once,
        while the third still hangs."""
        self.knows(1, {KID: GOOD}, HONEST_DELAY_S)
        self.knows(2, {KID: GOOD}, 2 * HONEST_DELAY_S)
        chain = self.make_chain(n=2)
        d = self.start_get_keys(chain, SERVER)
        self.clock.advance(HONEST_DELAY_S)
        self.assertNoResult(d)  # one source is not enough
        self.clock.advance(HONEST_DELAY_S)
        keys = self.successResultOf(d)
        self.assertEqual(keys[SERVER][KID].verify_key_bytes, GOOD)
        self.assertEqual(self.reports, [(2 * HONEST_DELAY_S, SERVER)])
        self.assertEqual(len(self.notaries[0].pending), 1)

    def test_hanging_liar_answering_late_is_recorded(self) -> None:
        """N=2: a hanging notary's late contradicting answer leaves the agreed key and is
        recorded as a conflict."""
        self.knows(1, {KID: GOOD}, HONEST_DELAY_S)
        self.knows(2, {KID: GOOD}, HONEST_DELAY_S)
        self.knows(0, {KID: LIE}, None)
        chain = self.make_chain(n=2)
        d = self.start_get_keys(chain, SERVER)
        self.clock.advance(HONEST_DELAY_S)
        self.successResultOf(d)
        with self.assertLogs("keyring_module.fetchers.chain", "WARNING"):
            self.notaries[0].answer_pending()
            self.wait_for_background(chain)
        self.assertEqual(self.stored()[KID][0], GOOD)
        self.assertEqual(
            [(c.rejected_key_bytes, c.rejected_source) for c in self.conflicts], [(LIE, S1)]
        )

    def test_without_agreement_waits_for_all_sources(self) -> None:
        """N=2: when the sources in so far disagree, the server waits for the last one,
        and is settled by the agreement it brings."""
        self.knows(1, {KID: GOOD}, HONEST_DELAY_S)
        self.knows(2, {KID: LIE}, HONEST_DELAY_S)
        self.knows(0, {KID: GOOD}, 3.0)
        chain = self.make_chain(n=2)
        d = self.start_get_keys(chain, SERVER)
        self.clock.advance(3.0 - 0.001)
        self.assertNoResult(d)
        with self.assertLogs("keyring_module.fetchers.chain", "WARNING"):
            self.clock.advance(0.001)
            keys = self.successResultOf(d)
        self.assertEqual(keys[SERVER][KID].verify_key_bytes, GOOD)
        self.assertEqual(self.reports, [(3.0, SERVER)])
