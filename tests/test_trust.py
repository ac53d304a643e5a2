"""Tests for the trust policy: corroboration across sources, conflicts, direct confirmation.

The pure policy (:mod:`keyring_module.fetchers.trust`) is table-tested; the chain is
tested with one fake origin and three fake notaries on a ``Clock``.
"""

from typing import Any, Optional, Sequence

import attr
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from keyring_module.config import KeyTrustConfig, RateLimitConfig
from keyring_module.fetchers.base import FetchResult
from keyring_module.fetchers.chain import KeyFetcherChain
from keyring_module.fetchers.notary_client import NotaryKeyFetcher
from keyring_module.fetchers.origin import OriginKeyFetcher
from keyring_module.fetchers.trust import decide, project_keys
from keyring_module.model import SOURCE_ORIGIN, KeyConflict, KeyRequest, StoredKey, notary_source
from keyring_module.ratelimit import OriginRateLimiter
from keyring_module.storage.limits import StoreLimits
from keyring_module.storage.memory import InMemoryKeyStore
from tests.fakes import (
    FakeFederationClient,
    FakeNotaryResource,
    FakeOriginResource,
    HangingResource,
)
from tests.storage_writer import make_response
from tests.utils import (
    key_id,
    make_signed_server_keys,
    make_trusted_key_server,
    new_signing_key,
    verify_key_bytes,
)

NOW_MS = 1_700_000_000_000
DAY_MS = 24 * 60 * 60 * 1000
TIMEOUT_MS = 10_000
SERVER = "origin.example"
N1, N2, N3 = "n1.example", "n2.example", "n3.example"
S1, S2, S3 = notary_source(N1), notary_source(N2), notary_source(N3)
A, B, C = b"\x0a" * 32, b"\x0b" * 32, b"\x0c" * 32
KID = "ed25519:k"


def result(source: str, keys: dict[str, bytes], valid_until_ts: int = 1000) -> FetchResult:
    """An answer about SERVER from ``source`` holding ``keys``."""
    return FetchResult(make_response(SERVER, valid_until_ts, keys), source)


def stored_key(key_bytes: bytes, source: str, kid: str = KID) -> StoredKey:
    return StoredKey(SERVER, kid, key_bytes, 1000, None, 1, source, "r")


class DecideTests(SynchronousTestCase):
    """The pure policy, one table row per rule."""

    def test_table(self) -> None:
        """Winners, stored answers, rejected answers and conflicts follow the documented rules."""
        o_a, n1_a, n2_a = (
            result(SOURCE_ORIGIN, {KID: A}),
            result(S1, {KID: A}),
            result(S2, {KID: A}),
        )
        n1_b, n3_b = result(S1, {KID: B}), result(S3, {KID: B})
        # (name, stored, results, N, override,
        #  accepted [(source, replace)], rejected sources, conflicts [(kept, kept_src, rej, rej_src)])
        table: list[Any] = [
            ("N=1 single source", {}, [n1_a], 1, False, [(S1, ())], [], []),
            ("N=2 one source is not enough", {}, [n1_a], 2, False, [], [S1], []),
            ("N=2 origin+notary agree", {}, [o_a, n1_a], 2, False, [(S1, ()), (SOURCE_ORIGIN, ())], [], []),
            ("same source twice is one vote", {}, [n1_a, n1_a], 2, False, [], [S1, S1], []),
            ("N=1 first in order wins", {}, [n1_b, n2_a], 1, False, [(S1, ())], [S2], [(B, S1, A, S2)]),
            ("N=2 majority beats first", {}, [n1_b, n2_a, result(S3, {KID: A})], 2, False,
             [(S2, ()), (S3, ())], [S1], [(A, S2, B, S1)]),
            ("N=2 tie: nothing trusted, conflict vs first", {}, [o_a, n1_b], 2, False, [],
             [SOURCE_ORIGIN, S1], [(A, SOURCE_ORIGIN, B, S1)]),
            ("stored key wins over new answers", {KID: stored_key(A, S2)}, [n3_b, n2_a], 1, False,
             [(S2, ())], [S3], [(A, S2, B, S3)]),
            ("stored key needs no votes", {KID: stored_key(A, S2)}, [n2_a], 3, False, [(S2, ())], [], []),
            ("origin overrides a provisional key", {KID: stored_key(B, S1)}, [result(SOURCE_ORIGIN, {KID: A}), n1_b],
             1, True, [(SOURCE_ORIGIN, (KID,))], [S1], []),
            ("no override of an origin key", {KID: stored_key(B, SOURCE_ORIGIN)}, [o_a], 1, True,
             [], [SOURCE_ORIGIN], [(B, SOURCE_ORIGIN, A, SOURCE_ORIGIN)]),
            ("no override when N > 1", {KID: stored_key(B, S1)}, [o_a], 2, True,
             [], [SOURCE_ORIGIN], [(B, S1, A, SOURCE_ORIGIN)]),
            ("one untrusted key rejects the whole answer", {}, [result(S1, {KID: A, "ed25519:x": C}), n2_a],
             2, False, [(S2, ())], [S1], []),
        ]  # fmt: skip
        for name, stored, results, n, override, accepted, rejected, conflicts in table:
            decision = decide(stored, results, n, override, seen_ts=5)
            self.assertEqual(
                [(a.result.source, tuple(sorted(a.replace))) for a in decision.accepted],
                accepted,
                name,
            )
            self.assertEqual([r.result.source for r in decision.rejected], rejected, name)
            self.assertEqual(
                [
                    (c.kept_key_bytes, c.kept_source, c.rejected_key_bytes, c.rejected_source)
                    for c in decision.conflicts
                ],
                conflicts,
                name,
            )

    def test_override_stores_each_answer_once(self) -> None:
        """With an override, each trusted answer is stored once, agreeing notary answers
        raise no conflict, and the confirmed rows end up the origin's, as projected."""
        store = InMemoryKeyStore()
        provisional = result(S1, {KID: B})
        self.successResultOf(
            defer.ensureDeferred(store.store_server_keys(provisional.response, S1, 1))
        )
        stored = self.successResultOf(defer.ensureDeferred(store.get_server_keys(SERVER)))
        origin = result(SOURCE_ORIGIN, {KID: A, "ed25519:o": C}, 2000)
        copy = result(S2, {KID: A, "ed25519:o": C}, 2000)  # the origin's answer, re-served
        older = result(S3, {KID: A}, 1500)
        unrelated = result(S2, {"ed25519:o": C}, 2000)
        liar = result(S1, {KID: B})
        decision = decide(stored, [origin, copy, older, unrelated, liar], 1, True, seen_ts=9)
        self.assertEqual(
            [(a.result, tuple(a.replace)) for a in decision.accepted],
            [(unrelated, ()), (origin, (KID,)), (older, ())],
        )
        self.assertEqual(decision.copies, (copy,))
        self.assertEqual([r.result for r in decision.rejected], [liar])
        self.assertEqual(decision.conflicts, ())
        for item in decision.accepted:
            self.successResultOf(
                defer.ensureDeferred(
                    store.store_server_keys(
                        item.result.response, item.result.source, 9, replace=item.replace
                    )
                )
            )
        keys = self.successResultOf(defer.ensureDeferred(store.get_server_keys(SERVER)))
        self.assertEqual(
            {k: (v.verify_key_bytes, v.valid_until_ts, v.source) for k, v in keys.items()},
            {KID: (A, 2000, SOURCE_ORIGIN), "ed25519:o": (C, 2000, SOURCE_ORIGIN)},
        )
        self.assertEqual(project_keys(stored, decision.accepted, 9), keys)
        self.assertEqual(self.conflicts_of(store), [(A, SOURCE_ORIGIN, B, S1)])

    def conflicts_of(self, store: InMemoryKeyStore) -> list[tuple[bytes, str, bytes, str]]:
        recorded = self.successResultOf(defer.ensureDeferred(store.get_conflicts(SERVER)))
        return [
            (c.kept_key_bytes, c.kept_source, c.rejected_key_bytes, c.rejected_source)
            for c in recorded
        ]

    def test_project_keys(self) -> None:
        """Projection follows the newest copy and changes bytes only where overridden."""
        stored = {KID: stored_key(B, S1)}
        newer = decide(stored, [result(S2, {KID: B}, 5000)], 1).accepted
        self.assertEqual(project_keys(stored, newer, 9)[KID].valid_until_ts, 5000)
        overridden = decide(stored, [result(SOURCE_ORIGIN, {KID: A})], 1, True).accepted
        self.assertEqual(project_keys(stored, overridden, 9)[KID].verify_key_bytes, A)

    def test_project_keys_within_the_store_bounds(self) -> None:
        """Projection leaves out what the store will refuse: a notary's new key id once
        the notaries' half of the key bound is full (the origin's still fits), and an
        answer too big for the response bytes bound."""
        limits = StoreLimits(max_keys=4, max_responses=4, max_conflicts=0)
        stored = {"ed25519:n%d" % i: stored_key(B, S1, "ed25519:n%d" % i) for i in range(2)}
        new_id = {"ed25519:new": A}
        from_notary = decide(stored, [result(S2, new_id)], 1).accepted
        self.assertNotIn("ed25519:new", project_keys(stored, from_notary, 9, limits))
        self.assertIn("ed25519:new", project_keys(stored, from_notary, 9))  # default bounds
        from_origin = decide(stored, [result(SOURCE_ORIGIN, new_id)], 1).accepted
        self.assertIn("ed25519:new", project_keys(stored, from_origin, 9, limits))
        tiny = attr.evolve(limits, max_response_bytes=100)
        self.assertNotIn("ed25519:new", project_keys(stored, from_origin, 9, tiny))


class ChainTrustTests(SynchronousTestCase):
    """One origin and three notaries on a fake network; ``n1`` may be made to lie."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW_MS / 1000)
        self.key = new_signing_key("k1")
        self.forged = new_signing_key("k1")  # same key id, other bytes
        self.origin = FakeOriginResource(self.key, SERVER, self.clock)
        notary_keys = [new_signing_key("n") for _ in range(3)]
        self.notaries = [
            FakeNotaryResource(n, k) for n, k in zip((N1, N2, N3), notary_keys, strict=True)
        ]
        self.trusted = [
            make_trusted_key_server(n, k) for n, k in zip((N1, N2, N3), notary_keys, strict=True)
        ]
        self.resources: dict[str, Resource] = {SERVER: self.origin}
        self.resources.update(zip((N1, N2, N3), self.notaries, strict=True))
        self.store = InMemoryKeyStore()
        self.seen: list[KeyConflict] = []

    def honest(self, *indexes: int) -> None:
        """Let the given notaries (0-based) serve the origin's real keys."""
        entry = make_signed_server_keys(SERVER, [self.key], NOW_MS + DAY_MS)
        for i in indexes:
            self.notaries[i].entries[SERVER] = [entry]

    def lying(self, *indexes: int) -> None:
        """Let the given notaries serve a forged key under the origin's key id."""
        entry = make_signed_server_keys(SERVER, [self.forged], NOW_MS + 2 * DAY_MS)
        for i in indexes:
            self.notaries[i].entries[SERVER] = [entry]

    def make_chain(
        self,
        n: int = 1,
        confirm: bool = False,
        order: Sequence[str] = ("origin", "notaries"),
    ) -> KeyFetcherChain:
        self.client = FakeFederationClient(self.resources)
        limiter = OriginRateLimiter(self.clock, RateLimitConfig(), random=lambda: 0.5)
        return KeyFetcherChain(
            self.store,
            OriginKeyFetcher(self.client, limiter, self.clock),
            [NotaryKeyFetcher(self.client, [t], limiter, self.clock) for t in self.trusted],
            self.clock,
            order=order,
            trust=KeyTrustConfig(n, confirm),
            timeout_ms=TIMEOUT_MS,
            on_conflict=self.seen.append,
        )

    def get(self, chain: KeyFetcherChain, use_cache: bool = True) -> Optional[StoredKey]:
        """The key the chain returns for SERVER's key id (None if none)."""
        request = KeyRequest(SERVER, None, NOW_MS)
        keys = self.successResultOf(
            defer.ensureDeferred(chain.get_keys([request], use_cache=use_cache))
        )
        return keys[SERVER].get(key_id(self.key))

    def conflicts(self) -> list[tuple[bytes, str, bytes, str]]:
        recorded = self.successResultOf(defer.ensureDeferred(self.store.get_conflicts(SERVER)))
        return [
            (c.kept_key_bytes, c.kept_source, c.rejected_key_bytes, c.rejected_source)
            for c in recorded
        ]

    def test_origin_and_notary_agree(self) -> None:
        """With N=2 the origin and one notary agreeing is enough, and both were asked."""
        self.honest(0)
        key = self.get(self.make_chain(n=2))
        assert key is not None
        self.assertEqual(key.verify_key_bytes, verify_key_bytes(self.key))
        self.assertEqual(key.source, SOURCE_ORIGIN)
        self.assertEqual(self.origin.hits, 1)
        self.assertEqual(len(self.notaries[0].bodies), 1)

    def test_origin_alone_not_enough_for_n2(self) -> None:
        """With N=2 an answer from the origin alone is neither stored nor returned."""
        self.assertIsNone(self.get(self.make_chain(n=2)))
        self.assertEqual(self.store.keys, {})

    def test_three_notaries_agree_origin_down(self) -> None:
        """With N=3 and the origin down, three agreeing notaries make the key trusted."""
        self.origin.code = 500
        self.honest(0, 1, 2)
        key = self.get(self.make_chain(n=3))
        assert key is not None
        self.assertEqual(key.verify_key_bytes, verify_key_bytes(self.key))

    def test_two_notaries_short_of_three(self) -> None:
        """With N=3 and only two notaries agreeing, nothing is stored or returned."""
        self.origin.code = 500
        self.honest(1, 2)
        self.assertIsNone(self.get(self.make_chain(n=3)))
        self.assertEqual(self.store.responses, {})

    def test_liar_outvoted(self) -> None:
        """Two honest notaries outvote a liar listed first: honest key kept, conflict recorded."""
        self.origin.code = 500
        self.lying(0)
        self.honest(1, 2)
        with self.assertLogs("keyring_module.fetchers.chain", "WARNING") as logs:
            key = self.get(self.make_chain(n=2))
        assert key is not None
        self.assertEqual(key.verify_key_bytes, verify_key_bytes(self.key))
        expected = (verify_key_bytes(self.key), S2, verify_key_bytes(self.forged), S1)
        self.assertEqual(self.conflicts(), [expected])
        self.assertEqual([(c.kept_source, c.rejected_source) for c in self.seen], [(S2, S1)])
        self.assertIn(S1, logs.output[0])
        self.assertIn(S2, logs.output[0])
        responses = self.successResultOf(
            defer.ensureDeferred(self.store.get_server_responses(SERVER))
        )
        self.assertEqual(len(responses), 1)
        self.assertNotIn(b"notary", responses[0].json_bytes)

    def test_first_notary_wins_with_n1(self) -> None:
        """With N=1 and two notaries disagreeing on a new key, the first configured one wins."""
        self.origin.code = 500
        self.lying(0)
        self.honest(1)
        key = self.get(self.make_chain(n=1))
        assert key is not None
        self.assertEqual(key.verify_key_bytes, verify_key_bytes(self.forged))
        self.assertEqual(
            self.conflicts(),
            [(verify_key_bytes(self.forged), S1, verify_key_bytes(self.key), S2)],
        )

    def test_liar_overridden_by_direct_confirmation(self) -> None:
        """A liar's key accepted with N=1 is replaced once the origin answers a confirmation."""
        self.origin.code = 500
        self.lying(0)
        chain = self.make_chain(n=1, confirm=True, order=("notaries", "origin"))
        first = self.get(chain)
        assert first is not None
        self.assertEqual(
            (first.verify_key_bytes, first.source), (verify_key_bytes(self.forged), S1)
        )
        self.assertEqual(self.origin.hits, 1)  # the confirmation, which failed
        for _ in range(10):
            self.get(chain)
        self.assertEqual(self.origin.hits, 1)  # paced: no flood on the origin
        self.origin.code = 200
        self.clock.advance(61)
        self.get(chain)
        self.successResultOf(defer.ensureDeferred(chain.wait_for_confirmations()))
        self.assertEqual(self.origin.hits, 2)
        key = self.get(chain)
        assert key is not None
        self.assertEqual((key.verify_key_bytes, key.source), (verify_key_bytes(self.key), "origin"))
        expected = (verify_key_bytes(self.key), SOURCE_ORIGIN, verify_key_bytes(self.forged), S1)
        self.assertEqual(self.conflicts(), [expected])
        self.assertEqual(len(self.seen), 1)
        self.get(chain)
        self.assertEqual(self.origin.hits, 2)  # confirmed: no more direct fetches

    def test_overriding_answer_stored_once(self) -> None:
        """A direct confirmation that overrides a notary's key stores (and counts) the
        origin's answer once."""
        self.origin.code = 500
        self.lying(0)
        chain = self.make_chain(n=1, confirm=True, order=("notaries", "origin"))
        self.get(chain)
        stored_from: list[str] = []
        chain.on_stored = stored_from.append
        self.origin.code = 200
        self.clock.advance(61)
        self.get(chain)
        self.successResultOf(defer.ensureDeferred(chain.wait_for_confirmations()))
        self.assertEqual(self.origin.hits, 2)
        self.assertEqual(stored_from, [SOURCE_ORIGIN])
        key = self.get(chain)
        assert key is not None
        self.assertEqual((key.verify_key_bytes, key.source), (verify_key_bytes(self.key), "origin"))

    def test_confirmation_of_agreeing_key(self) -> None:
        """A notary-provided key the origin confirms becomes an origin key, with no conflict."""
        self.origin.code = 500
        self.honest(0)
        chain = self.make_chain(n=1, confirm=True, order=("notaries", "origin"))
        self.get(chain)
        self.origin.code = 200
        self.clock.advance(61)
        self.get(chain)
        key = self.get(chain)
        assert key is not None
        self.assertEqual(key.source, SOURCE_ORIGIN)
        self.assertEqual(self.conflicts(), [])

    def test_conflict_recorded_once(self) -> None:
        """A liar seen in several rounds leaves one conflict record naming both sources."""
        self.origin.code = 500
        self.lying(0)
        self.honest(1, 2)
        chain = self.make_chain(n=2)
        for _ in range(3):
            self.get(chain, use_cache=False)
            self.clock.advance(61)
        self.assertEqual(len(self.notaries[0].bodies), 3)
        self.assertEqual(
            self.conflicts(),
            [(verify_key_bytes(self.key), S2, verify_key_bytes(self.forged), S1)],
        )
        self.assertEqual(chain.conflicts_seen, 3)
        self.assertEqual([c.rejected_source for c in self.seen], [S1, S1, S1])

    def test_hanging_notary_bounded_by_timeout(self) -> None:
        """A notary that never answers holds a server short of agreement up for the request
        timeout, no longer."""
        self.origin.code = 500
        self.resources[N1] = HangingResource()
        self.honest(1)
        chain = self.make_chain(n=2)
        request = KeyRequest(SERVER, None, NOW_MS)
        d = defer.ensureDeferred(chain.get_keys([request]))
        self.assertNoResult(d)
        self.clock.advance(TIMEOUT_MS / 1000 - 0.001)
        self.assertNoResult(d)
        self.clock.advance(0.001)
        self.assertEqual(self.successResultOf(d), {SERVER: {}})

    def test_notary_answer_the_store_refuses_does_not_settle_the_server(self) -> None:
        """Notaries first: when the notaries' share of the server's keys is full, a notary
        relaying the origin's new key does not settle the request (the store would refuse
        that key), so the origin is asked and its answer is stored."""
        self.store = InMemoryKeyStore(StoreLimits(max_keys=4, max_responses=8, max_conflicts=5))
        for i in range(2):  # what a notary said earlier fills the notaries' half
            fake = make_response(SERVER, NOW_MS + DAY_MS, {"ed25519:fake%d" % i: C})
            self.successResultOf(defer.ensureDeferred(self.store.store_server_keys(fake, S2, 1)))
        self.honest(0)
        chain = self.make_chain(n=1, order=("notaries", "origin"))
        request = KeyRequest(SERVER, frozenset({key_id(self.key)}), NOW_MS)
        with self.assertLogs("keyring_module.storage", "WARNING"):  # the notary's key refused
            keys = self.successResultOf(defer.ensureDeferred(chain.get_keys([request])))
        key = keys[SERVER][key_id(self.key)]
        self.assertEqual((key.verify_key_bytes, key.source), (verify_key_bytes(self.key), "origin"))
        self.assertEqual((len(self.notaries[0].bodies), self.origin.hits), (1, 1))

    def test_notary_service_refresh_serves_only_trusted(self) -> None:
        """A refresh the way the notary service makes it stores only corroborated responses."""
        self.lying(0)
        self.honest(1)
        chain = self.make_chain(n=2, order=("notaries", "origin"))
        request = KeyRequest(SERVER, None, NOW_MS)
        self.successResultOf(defer.ensureDeferred(chain.get_keys([request], use_cache=False)))
        responses = self.successResultOf(
            defer.ensureDeferred(self.store.get_server_responses(SERVER))
        )
        self.assertEqual([r.valid_until_ts for r in responses], [NOW_MS + DAY_MS])
        self.assertEqual(self.origin.hits, 1)  # asked in parallel despite notaries-first
        self.assertEqual(len(self.conflicts()), 1)
