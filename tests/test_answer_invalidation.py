"""A key write drops only the cached whole answers naming its server: the answer cache
on its own (told by :meth:`AnswerCache.changed`), through the in-memory store's write
listeners, and in the notary, whose other answers are then served with no store read."""

from typing import Optional

from treq.testing import StubTreq
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

import tests.test_notary as notary_tests
from keyring_module.metrics import AnswerResult
from keyring_module.notary.answer_index import (
    INDEX_BYTES_PER_SERVER,
    MAX_CHANGES_REMEMBERED,
    ServerIndex,
)
from keyring_module.notary.caches import AnswerCache, CachedAnswer
from keyring_module.notary.query import AnswerKey, NormalisedQuery, ServerQuery, normalise_queries
from keyring_module.storage.cache import CachedKeyStore
from keyring_module.storage.memory import InMemoryKeyStore
from keyring_module.storage.write_news import TellsWrites
from tests.fakes import FakeOriginResource
from tests.memory import traced_bytes
from tests.storage_writer import make_response
from tests.utils import new_signing_key

RESULTS = ((AnswerResult.FRESH, 1),)


def asked(*names: str) -> NormalisedQuery:
    """The normalised question about all keys of ``names``."""
    return normalise_queries([ServerQuery(name) for name in names])


def built(question: NormalisedQuery, generation: int, expires_ms: int = 5000) -> CachedAnswer:
    """An answer to ``question`` built on the store's ``generation``."""
    body = b'{"server_keys":"%s"}' % ",".join(q.server_name for q in question.queries).encode()
    return CachedAnswer(body, expires_ms, generation, RESULTS, (0,) * len(question.key))


class AnswerCacheChangesTests(SynchronousTestCase):
    """The answer cache told which server each write was about."""

    def setUp(self) -> None:
        self.cache = AnswerCache(1 << 20)
        self.questions = {
            "a": asked("a.example"),
            "b": asked("b.example"),
            "ab": asked("a.example", "b.example"),
            "bc": asked("b.example", "c.example"),
        }
        self.kept: dict[str, CachedAnswer] = {}
        for name, question in self.questions.items():
            self.kept[name] = built(question, 0)
            self.cache.put(question.key, self.kept[name], 0, 0)

    def served(self, generation: int) -> set[str]:
        """The questions the cache answers now, each checked to be the very answer put."""
        found = set()
        for name, question in self.questions.items():
            hit = self.cache.get(question, 1, generation)
            if hit is not None:
                self.assertIs(hit, self.kept[name])
                found.add(name)
        return found

    def test_a_write_drops_only_the_answers_naming_its_server(self) -> None:
        """A write of a.example drops its GET answer and the POST answer naming it with
        b.example; the answers about b.example alone, or with c.example, stay."""
        self.assertEqual(self.served(0), {"a", "b", "ab", "bc"})
        self.cache.changed("a.example", 1)
        self.assertEqual(self.served(1), {"b", "bc"})
        self.assertEqual(len(self.cache), 2)
        self.cache.changed("c.example", 2)
        self.assertEqual(self.served(2), {"b"})
        self.cache.changed("nobody.example", 3)
        self.assertEqual(self.served(3), {"b"})

    def test_news_of_any_server_drops_everything(self) -> None:
        """A write of unknown servers (None: news may have been missed) drops every answer."""
        self.cache.changed(None, 1)
        self.assertEqual(self.served(1), set())
        self.assertEqual((len(self.cache), self.cache.total_bytes), (0, 0))
        self.assertEqual(self.cache.indexed_servers, 0)

    def test_an_unheard_write_drops_everything(self) -> None:
        """A write the cache was not told of (the generation moved by more than one, or
        moved without a word) drops every answer: which server it was is unknown."""
        self.cache.changed("a.example", 2)  # write 1 went unheard
        self.assertEqual(self.served(2), set())
        for name, question in self.questions.items():
            self.cache.put(question.key, self.kept[name], 0, 2)
        self.assertEqual(self.served(3), set())  # write 3 was never told

    def test_answer_built_before_a_write_is_kept_only_if_it_names_none_written(self) -> None:
        """An answer whose reads were made before a write (it was being built meanwhile)
        is kept if none of its servers was written since, and refused otherwise."""
        self.cache.changed("a.example", 1)
        self.cache.changed("z.example", 2)
        late_a, late_b = built(self.questions["a"], 0), built(self.questions["b"], 0)
        self.cache.put(self.questions["a"].key, late_a, 0, 2)
        self.cache.put(self.questions["ab"].key, built(self.questions["ab"], 0), 0, 2)
        self.cache.put(self.questions["b"].key, late_b, 0, 2)
        self.assertIsNone(self.cache.get(self.questions["a"], 1, 2))
        self.assertIsNone(self.cache.get(self.questions["ab"], 1, 2))
        self.assertIs(self.cache.get(self.questions["b"], 1, 2), late_b)
        built_after = built(self.questions["a"], 1)  # read after a.example's write
        self.cache.put(self.questions["a"].key, built_after, 0, 2)
        self.assertIs(self.cache.get(self.questions["a"], 1, 2), built_after)

    def test_answer_built_before_more_writes_than_remembered_is_refused(self) -> None:
        """The servers written lately are remembered up to a bound: an answer built
        before more writes than that is refused (one of them may have named it)."""
        generation = 0
        for i in range(MAX_CHANGES_REMEMBERED + 1):
            generation += 1
            self.cache.changed("other%d.example" % i, generation)
        self.assertEqual(self.served(generation), {"a", "b", "ab", "bc"})
        new = asked("new.example")
        self.cache.put(new.key, built(new, 0), 0, generation)
        self.assertIsNone(self.cache.get(new, 1, generation))
        recent = built(new, generation - 1)
        self.cache.put(new.key, recent, 0, generation)
        self.assertIs(self.cache.get(new, 1, generation), recent)

    def test_the_index_names_only_answers_kept(self) -> None:
        """Answers dropped by a write, by expiry, by replacement or to stay within the
        budget leave the index: it names the servers of the answers kept, no more."""
        self.cache.changed("a.example", 1)
        self.assertEqual(self.cache.indexed_servers, 2)  # b and c
        short = asked("d.example", "e.example")
        self.cache.put(short.key, built(short, 1, expires_ms=10), 0, 1)
        self.cache.put(short.key, built(short, 1, expires_ms=20), 0, 1)
        self.assertEqual(self.cache.indexed_servers, 4)
        self.assertIsNone(self.cache.get(short, 20, 1))
        self.assertEqual(self.cache.indexed_servers, 2)
        small = AnswerCache(20_000)
        for i in range(200):
            question = asked("s%d.example" % i, "popular.example")
            small.put(question.key, built(question, 0), 0, 0)
        self.assertLess(len(small), 50)
        self.assertEqual(small.indexed_servers, len(small) + 1)
        small.changed("popular.example", 1)
        self.assertEqual((len(small), small.indexed_servers, small.total_bytes), (0, 0, 0))


class ServerIndexTests(SynchronousTestCase):
    def test_the_index_costs_at_most_what_the_budget_counts(self) -> None:
        """What indexing answers' servers holds in memory stays within the
        INDEX_BYTES_PER_SERVER the answer cache counts for each, however the answers
        share servers: none shared, one server named by every answer, pairs, big POSTs."""
        shapes: dict[str, list[AnswerKey]] = {
            "disjoint": [(("s%d.example.org" % i, (), None),) for i in range(5000)],
            "one popular": [(("matrix.org", ("ed25519:%d" % i,), None),) for i in range(5000)],
            "pairs": [
                (("p%d.example.org" % (i % 50), (), None), ("s%d.example.org" % i, (), None))
                for i in range(5000)
            ],
            "big posts": [
                tuple(("x%d.example.org" % j, (), None) for j in range(i * 500, i * 500 + 500))
                for i in range(20)
            ],
        }
        for shape, keys in shapes.items():
            for count in (len(keys) // 3, len(keys) // 2 + 1, len(keys)):
                part = keys[:count]

                def index(part: list[AnswerKey] = part) -> ServerIndex:
                    built_index = ServerIndex()
                    for key in part:
                        built_index.add(key)
                    return built_index

                _, held = traced_bytes(index)
                servers = sum(len(key) for key in part)
                self.assertLessEqual(held, INDEX_BYTES_PER_SERVER * servers, (shape, count))

    def test_a_server_named_twice_in_one_key_is_indexed_once(self) -> None:
        """Adding and removing are idempotent, and a name twice in a key is no trouble."""
        index = ServerIndex()
        key = (("a.example", (), None), ("a.example", ("ed25519:1",), None))
        other = (("a.example", ("ed25519:2",), None),)
        index.add(key)
        index.add(key)
        index.add(other)
        self.assertEqual(sorted(index.keys_naming("a.example")), sorted([key, other]))
        index.remove(key)
        index.remove(key)
        self.assertEqual(index.keys_naming("a.example"), [other])
        index.remove(other)
        self.assertEqual((len(index), index.keys_naming("a.example")), (0, []))


class StoreListenerTests(SynchronousTestCase):
    """The in-memory store tells its listeners which server each write was about."""

    def setUp(self) -> None:
        from twisted.internet.task import Clock

        self.store = CachedKeyStore(InMemoryKeyStore(), Clock(), 100, 10_000)
        self.told: list[tuple[object, int]] = []
        self.store.add_write_listener(lambda name, g: self.told.append((name, g)))

    def test_writes_forgets_and_news_are_told_with_their_generation(self) -> None:
        """A store, a ``keys forget`` through this store, another process's news of one
        server and of any server: each told once, with the generation counting it."""
        self.assertIsInstance(self.store, TellsWrites)
        response = make_response("a.example", 10**13, {"ed25519:a": b"a" * 32})
        self.successResultOf(
            defer.ensureDeferred(self.store.store_server_keys(response, "origin", 1))
        )
        self.successResultOf(defer.ensureDeferred(self.store.forget_server_keys("a.example")))
        self.store.forget("b.example")
        self.store.forget(None)
        self.assertEqual(
            self.told, [("a.example", 1), ("a.example", 2), ("b.example", 3), (None, 4)]
        )
        self.assertEqual(self.store.write_generation, 4)

    def test_a_failing_listener_leaves_the_others_told(self) -> None:
        """A listener that raises is logged; the others are still told."""

        def failing(name: object, generation: int) -> None:
            raise RuntimeError("boom")

        store = CachedKeyStore(InMemoryKeyStore(), self.store._clock, 100, 10_000)
        told: list[object] = []
        store.add_write_listener(failing)
        store.add_write_listener(lambda name, g: told.append(name))
        with self.assertLogs("keyring_module.storage.write_news", "ERROR"):
            store.forget("a.example")
        self.assertEqual(told, ["a.example"])


OTHER = "other.test"


class CachedQuestions(notary_tests.NotaryTestCase):
    """Three questions answered and kept whole: about the origin, about other.test,
    and about both in one POST."""

    def setUp(self) -> None:
        super().setUp()
        self.outbound._stubs[OTHER] = StubTreq(
            FakeOriginResource(new_signing_key("x1"), OTHER, self.clock)
        )
        self.post({notary_tests.ORIGIN: {}, OTHER: {}})  # both fetched and stored
        self.questions = {
            "origin": [notary_tests.ORIGIN],
            "other": [OTHER],
            "both": [notary_tests.ORIGIN, OTHER],
        }
        for names in self.questions.values():
            self.post({name: {} for name in names})  # all fresh: kept whole
        self.kept = {name: self.cached(name) for name in self.questions}
        for name, body in self.kept.items():
            self.assertIsNotNone(body, name)

    def cached(self, name: str) -> Optional[bytes]:
        """The cached body answering question ``name`` (None if none)."""
        return self.notary.cached_answer([ServerQuery(s) for s in self.questions[name]])

    def write_origin_keys(self) -> None:
        response = make_response(
            notary_tests.ORIGIN, self.now_ms() + notary_tests.DAY_MS, {"ed25519:new": b"n" * 32}
        )
        self.successResultOf(
            defer.ensureDeferred(self.store.store_server_keys(response, "origin", self.now_ms()))
        )

    def still_cached(self) -> set[str]:
        """The questions still answered from the answer cache, each by the very body
        kept before, with no store read."""
        reads = self.count_store_reads()
        found = set()
        for name in self.questions:
            body = self.cached(name)
            if body is not None:
                self.assertIs(body, self.kept[name])
                found.add(name)
        self.assertEqual(reads, [])
        return found


class NotaryAnswerInvalidationTests(CachedQuestions):
    """The notary on the in-memory store (as deployed): a write of one server leaves its
    cached answers about others alone, served with no store read."""

    def test_a_write_keeps_the_answers_about_other_servers(self) -> None:
        """A write of the origin's keys drops the answers naming it (alone, or with
        other.test in one POST); the answer about other.test alone is served as kept,
        and a POST for it reads nothing from the store."""
        self.write_origin_keys()
        self.assertEqual(self.still_cached(), {"other"})
        reads = self.count_store_reads()
        self.post({OTHER: {}})
        self.assertEqual(reads, [])
        self.post({notary_tests.ORIGIN: {}})
        self.assertNotEqual(reads, [], "the dropped answer is built again from the store")

    def test_keys_forget_drops_the_answers_naming_the_server(self) -> None:
        """``keys forget`` through this process's store drops the answers naming that
        server, and only those."""
        self.successResultOf(
            defer.ensureDeferred(self.store.forget_server_keys(notary_tests.ORIGIN))
        )
        self.assertEqual(self.still_cached(), {"other"})

    def test_news_of_another_process_drops_the_answers_naming_the_server(self) -> None:
        """News that another process wrote other.test's keys drops the answers naming
        it; news that any server's keys may have changed drops them all."""
        assert isinstance(self.store, CachedKeyStore)
        self.store.forget(OTHER)
        self.assertEqual(self.still_cached(), {"origin"})
        self.store.forget(None)
        self.assertEqual(self.still_cached(), set())


class NotaryOnPlainStoreTests(CachedQuestions):
    """The notary on a store that does not tell which server it wrote."""

    cached_store = False

    def test_any_write_drops_every_answer(self) -> None:
        """A write of the origin's keys drops the answer about other.test too: which
        server was written is unknown (the fallback)."""
        self.write_origin_keys()
        self.assertEqual(self.still_cached(), set())
