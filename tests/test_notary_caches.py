"""The notary's caches on their own: the normalised query key, the answer cache (bytes,
minimums, expiry, store writes) and the co-signed cache's byte bound."""

from typing import Callable, Optional

from canonicaljson import encode_canonical_json
from prometheus_client import CollectorRegistry
from signedjson.sign import sign_json
from twisted.internet import defer
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.config import parse_config
from keyring_module.metrics import AnswerResult, Metrics
from keyring_module.model import StoredResponse, response_id_for
from keyring_module.notary.caches import (
    EXPIRY_HEAP_SLACK,
    SIGN_ALONE_BYTES,
    AnswerCache,
    CachedAnswer,
    CoSigner,
)
from keyring_module.notary.query import AnswerKey, ServerQuery, normalise_queries
from keyring_module.signing import OwnKeys
from keyring_module.sized_lru import ENTRY_OVERHEAD_BYTES
from keyring_module.storage.memory import InMemoryKeyStore
from keyring_module.wiring import KeyringServices
from tests.fake_reactors import FakeReactor
from tests.fakes import FakeFederationClient
from tests.memory import traced_bytes
from tests.utils import new_signing_key

RESULTS = ((AnswerResult.FRESH, 1),)


def answer(
    body: bytes = b"{}", expires_ms: int = 5000, generation: int = 0, met: int = 100
) -> CachedAnswer:
    return CachedAnswer(body, expires_ms, generation, RESULTS, (met,))


def key_of(server_name: str) -> AnswerKey:
    return normalise_queries([ServerQuery(server_name)]).key


class NormalisedQueryTests(SynchronousTestCase):
    def test_order_and_minimums_do_not_change_the_key(self) -> None:
        """The same servers and key ids in any order, with any minimums, share one key."""
        first = normalise_queries(
            [
                ServerQuery("b.example", {"ed25519:2": 5, "ed25519:1": None}),
                ServerQuery("a.example", all_keys_minimum=7),
            ]
        )
        second = normalise_queries(
            [
                ServerQuery("a.example"),
                ServerQuery("b.example", {"ed25519:1": 9, "ed25519:2": None}),
            ]
        )
        self.assertEqual(first.key, second.key)
        self.assertEqual([q.server_name for q in first.queries], ["a.example", "b.example"])
        self.assertEqual((first.minimums, second.minimums), ((7, 5), (None, 9)))

    def test_what_is_asked_changes_the_key(self) -> None:
        """Other key ids, all keys, or a preferred key id are different questions."""
        keys = {
            normalise_queries([query]).key
            for query in (
                ServerQuery("a.example"),
                ServerQuery("a.example", {"ed25519:1": None}),
                ServerQuery("a.example", {"ed25519:1": None, "ed25519:2": None}),
                ServerQuery("a.example", preferred_key_id="ed25519:1"),
                ServerQuery("b.example"),
            )
        }
        self.assertEqual(len(keys), 5)

    def test_highest_minimum(self) -> None:
        """A query's highest minimum covers its key criteria and its all-keys minimum."""
        self.assertIsNone(ServerQuery("a", {"ed25519:1": None}).highest_minimum())
        self.assertEqual(ServerQuery("a", {"k:1": 3, "k:2": 0}).highest_minimum(), 3)
        self.assertEqual(ServerQuery("a", all_keys_minimum=0).highest_minimum(), 0)


class AnswerCacheTests(SynchronousTestCase):
    def test_answer_used_only_up_to_the_minimum_it_meets(self) -> None:
        """A kept answer serves minimums up to what it meets, and no higher."""
        cache = AnswerCache(1 << 20)
        key = key_of("a.example")
        cache.put(key, answer(met=100), now_ms=0, generation=0)
        for minimum, hit in ((None, True), (0, True), (100, True), (101, False)):
            asked = normalise_queries([ServerQuery("a.example", all_keys_minimum=minimum)])
            self.assertEqual(cache.get(asked, 1, 0) is not None, hit, minimum)
        self.assertEqual(len(cache), 1, "a miss on the minimum keeps the entry")

    def test_expired_answers_dropped_without_being_asked_for(self) -> None:
        """An expired answer is dropped on the next use of the cache, whatever it asks."""
        cache = AnswerCache(1 << 20)
        cache.put(key_of("a.example"), answer(b"a" * 1000, expires_ms=100), 0, 0)
        cache.put(key_of("b.example"), answer(b"b", expires_ms=500), 0, 0)
        self.assertEqual(len(cache), 2)
        self.assertIsNone(cache.get(normalise_queries([ServerQuery("c.example")]), 100, 0))
        self.assertEqual(len(cache), 1)
        self.assertLess(cache.total_bytes, 1000)
        cache.put(key_of("c.example"), answer(expires_ms=1000), 500, 0)
        self.assertEqual(len(cache), 1, "b expired at 500")

    def test_replaced_answer_keeps_its_new_expiry(self) -> None:
        """An answer put again under the same key lives until its own expiry."""
        cache = AnswerCache(1 << 20)
        key = key_of("a.example")
        cache.put(key, answer(expires_ms=100), 0, 0)
        cache.put(key, answer(expires_ms=300), 50, 0)
        asked = normalise_queries([ServerQuery("a.example")])
        self.assertIsNotNone(cache.get(asked, 200, 0))
        self.assertIsNone(cache.get(asked, 300, 0))

    def test_store_write_drops_everything(self) -> None:
        """A new store generation drops every answer, and answers built before it are refused."""
        cache = AnswerCache(1 << 20)
        cache.put(key_of("a.example"), answer(generation=0), 0, 0)
        self.assertIsNone(cache.get(normalise_queries([ServerQuery("a.example")]), 1, 1))
        self.assertEqual((len(cache), cache.total_bytes), (0, 0))
        cache.put(key_of("a.example"), answer(generation=0), 1, 1)
        self.assertEqual(len(cache), 0)

    def test_bounded_in_bytes(self) -> None:
        """Answers (their bodies and keys) never hold more than the budget."""
        budget = 10 * (ENTRY_OVERHEAD_BYTES + 1000)
        cache = AnswerCache(budget)
        for i in range(100):
            cache.put(key_of("s%d.example" % i), answer(b"x" * 1000), 0, 0)
        self.assertLessEqual(cache.total_bytes, budget)
        self.assertGreater(len(cache), 5)
        self.assertLess(len(cache), 10, "the keys count too")
        empty = AnswerCache(0)
        empty.put(key_of("a.example"), answer(), 0, 0)
        self.assertEqual(len(empty), 0)

    def test_evicted_big_keys_are_let_go(self) -> None:
        """Answers to 2,000-server questions evicted for room free their keys: twenty of
        them through a 1 MiB cache leave it holding about its budget, not twenty keys."""
        names = ["s%05d.example.org" % i for i in range(2_000)]

        def fill() -> AnswerCache:
            cache = AnswerCache(1024 * 1024)
            for i in range(20):
                asked = normalise_queries([ServerQuery(n + str(i)) for n in names])
                met = (0,) * len(asked.key)
                cache.put(asked.key, CachedAnswer(b"x" * 1000, 5000, 0, RESULTS, met), 0, 0)
            return cache

        cache, held = traced_bytes(fill)
        self.assertLess(len(cache), 5)
        self.assertLess(held, 2 * cache.max_bytes)

    def test_expiry_heap_is_rebuilt_from_live_answers(self) -> None:
        """Many puts that evict each other, with far expiries, leave the expiry heap near
        the number of answers kept."""
        cache = AnswerCache(10 * (ENTRY_OVERHEAD_BYTES + 1000))
        for i in range(5000):
            cache.put(key_of("s%d.example" % i), answer(b"x" * 1000, expires_ms=10**12), 0, 0)
        self.assertLess(len(cache), 10)
        self.assertLessEqual(cache.expiry_items, 2 * len(cache) + EXPIRY_HEAP_SLACK + 1)
        # Expiry still works after rebuilds.
        self.assertIsNone(cache.get(normalise_queries([ServerQuery("x.example")]), 10**12, 0))
        self.assertEqual((len(cache), cache.expiry_items), (0, 0))


class HeldRunner:
    """A blocking runner that holds each job until the test finishes it."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[[], object], "defer.Deferred[object]"]] = []

    def __call__(self, work: Callable[[], object]) -> "defer.Deferred[object]":
        d: "defer.Deferred[object]" = defer.Deferred()
        self.jobs.append((work, d))
        return d

    def finish(self, index: int) -> None:
        """Run job ``index`` and deliver its result."""
        work, d = self.jobs[index]
        d.callback(work())


class CoSignerTests(SynchronousTestCase):
    def response(self, padding: int) -> StoredResponse:
        json_bytes = b'{"server_name":"a.example","pad":"%s"}' % (b"x" * padding)
        return StoredResponse(response_id_for(json_bytes), "a.example", 1, 0, "origin", json_bytes)

    def cosign(self, cosigner: CoSigner, response: StoredResponse) -> Optional[bytes]:
        blob: Optional[bytes] = self.successResultOf(
            defer.ensureDeferred(cosigner.cosign(response))
        )
        return blob

    def test_bounded_in_bytes(self) -> None:
        """Co-signed blobs are kept up to the byte budget, least recently used going first."""
        cosigner = CoSigner(OwnKeys("notary.test", [new_signing_key("n1")]), 3 * 20_000)
        responses = [self.response(10_000 + i) for i in range(10)]
        blobs = [self.cosign(cosigner, r) for r in responses]
        self.assertLessEqual(cosigner.total_bytes, 3 * 20_000)
        self.assertGreater(cosigner.total_bytes, 2 * 10_000)
        # The most recent one is still kept: the very same bytes come back.
        self.assertIs(self.cosign(cosigner, responses[-1]), blobs[-1])
        self.assertIsNot(self.cosign(cosigner, responses[0]), blobs[0])
        self.assertEqual(self.cosign(cosigner, responses[0]), blobs[0])

    def test_signs_as_signedjson_does(self) -> None:
        """Our co-signature is exactly the one ``sign_json`` would add, unsigned kept."""
        own_keys = OwnKeys("notary.test", [new_signing_key("n1")])
        obj = {
            "server_name": "a.example",
            "valid_until_ts": 5,
            "signatures": {"a.example": {"ed25519:a": "sig"}},
            "unsigned": {"note": "kept"},
            "pad": [[i] for i in range(60_000)],  # beyond the C codec's fast path
        }
        json_bytes = encode_canonical_json(obj)
        response = StoredResponse(
            response_id_for(json_bytes), "a.example", 5, 0, "origin", json_bytes
        )
        self.assertEqual(
            self.cosign(CoSigner(own_keys, 0), response),
            encode_canonical_json(sign_json(obj, "notary.test", own_keys.primary_key)),
        )

    def test_big_responses_are_signed_by_the_runner(self) -> None:
        """A response over the threshold is signed by the runner (a worker thread), a small
        one at once; the result is kept either way."""
        own_keys = OwnKeys("notary.test", [new_signing_key("n1")])
        handed: list[Callable[[], object]] = []
        held: "defer.Deferred[object]" = defer.Deferred()

        def runner(work: Callable[[], object]) -> "defer.Deferred[object]":
            handed.append(work)
            return held

        cosigner = CoSigner(own_keys, 10 * SIGN_ALONE_BYTES, runner)  # type: ignore[arg-type]
        self.assertIsNotNone(self.cosign(cosigner, self.response(100)))
        self.assertEqual(handed, [])
        big = self.response(SIGN_ALONE_BYTES)
        d = defer.ensureDeferred(cosigner.cosign(big))
        self.assertNoResult(d)
        [work] = handed
        held.callback(work())
        self.assertIsNotNone(self.successResultOf(d))
        self.assertIsNotNone(self.cosign(cosigner, big))  # kept: no second job
        self.assertEqual(len(handed), 1)

    def test_concurrent_misses_share_one_signing(self) -> None:
        """Five requests for one big response at once start one signing job and all get
        the very same bytes; nothing is tracked once it is done."""
        runner = HeldRunner()
        own_keys = OwnKeys("notary.test", [new_signing_key("n1")])
        cosigner = CoSigner(own_keys, 10 * SIGN_ALONE_BYTES, runner)  # type: ignore[arg-type]
        big = self.response(SIGN_ALONE_BYTES)
        waiting = [defer.ensureDeferred(cosigner.cosign(big)) for _ in range(5)]
        self.assertEqual(len(runner.jobs), 1)
        self.assertEqual(cosigner.signings_in_flight, 1)
        runner.finish(0)
        results = [self.successResultOf(d) for d in waiting]
        self.assertIsNotNone(results[0])
        self.assertEqual({id(r) for r in results}, {id(results[0])})
        self.assertEqual(cosigner.signings_in_flight, 0)

    def test_cancelled_caller_leaves_the_shared_signing_alone(self) -> None:
        """A caller cancelled while the signing runs (its client left) does not cancel the
        job or the other callers, who get the result; a failing job fails every caller."""
        runner = HeldRunner()
        own_keys = OwnKeys("notary.test", [new_signing_key("n1")])
        cosigner = CoSigner(own_keys, 10 * SIGN_ALONE_BYTES, runner)  # type: ignore[arg-type]
        big = self.response(SIGN_ALONE_BYTES)
        first = defer.ensureDeferred(cosigner.cosign(big))
        second = defer.ensureDeferred(cosigner.cosign(big))
        first.cancel()
        self.failureResultOf(first, defer.CancelledError)
        self.assertFalse(runner.jobs[0][1].called)
        runner.finish(0)
        self.assertIsNotNone(self.successResultOf(second))

        other = self.response(SIGN_ALONE_BYTES + 1)
        failing = [defer.ensureDeferred(cosigner.cosign(other)) for _ in range(2)]
        runner.jobs[1][1].errback(RuntimeError("worker died"))
        for d in failing:
            self.failureResultOf(d, RuntimeError)
        self.assertEqual(cosigner.signings_in_flight, 0)


class CacheWiringTests(SynchronousTestCase):
    def services(self, notary: dict[str, object]) -> KeyringServices:
        config = parse_config(
            {
                "server_name": "notary.test",
                "signing_key_path": "unused",
                "listeners": [{"port": 1}],
                "notary": notary,
            }
        )
        return KeyringServices.build(
            FakeReactor(),
            config,
            OwnKeys("notary.test", [new_signing_key("n1")]),
            InMemoryKeyStore(),
            client=FakeFederationClient({}),
            metrics=Metrics(CollectorRegistry()),
        )

    def test_configured_sizes_reach_the_notary_caches(self) -> None:
        """The notary cache sizes configured are the budgets of the caches the wiring builds."""
        notary = self.services({"answer_cache_size": "3M", "cosigned_cache_size": "5K"}).notary
        assert notary is not None
        self.assertEqual(notary.answer_cache.max_bytes, 3 * 1024 * 1024)
        self.assertEqual(notary.cosigned_cache.max_bytes, 5 * 1024)

    def test_answer_cache_size_zero_keeps_no_answers(self) -> None:
        """With notary.answer_cache_size 0 no whole answer is kept."""
        for size, kept in ((0, 0), ("1M", 1)):
            notary = self.services({"answer_cache_size": size}).notary
            assert notary is not None
            self.successResultOf(ensureDeferred(notary.query([ServerQuery("notary.test")])))
            self.assertEqual(len(notary.answer_cache), kept)
