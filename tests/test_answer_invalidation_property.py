"""Property: whatever the sequence of answers kept (some built before writes landed),
writes told by server, news of "any server" and writes nobody told of, the answer cache
never returns an answer naming a server written after the answer was built, and returns
every other answer it was given (its budget and expiry kept out of the way)."""

from typing import Optional, Union

import attr
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.metrics import AnswerResult
from keyring_module.notary.caches import AnswerCache, CachedAnswer
from keyring_module.notary.query import NormalisedQuery, ServerQuery, normalise_queries

NAMES = ["a.example", "b.example", "c.example", "d.example"]
QUESTIONS = [
    normalise_queries([ServerQuery(name) for name in names])
    for names in (
        ["a.example"],
        ["b.example"],
        ["a.example", "b.example"],
        ["b.example", "c.example", "d.example"],
        ["a.example", "b.example", "c.example", "d.example"],
    )
]
RESULTS = ((AnswerResult.FRESH, 1),)


@attr.s(auto_attribs=True, frozen=True)
class Put:
    """Keep an answer to ``QUESTIONS[question]`` built ``lag`` writes ago."""

    question: int
    lag: int


@attr.s(auto_attribs=True, frozen=True)
class Write:
    """A write of ``name``'s keys, told to the cache (None: of any server's)."""

    name: Optional[str]


@attr.s(auto_attribs=True, frozen=True)
class Unheard:
    """A write the cache is not told of (the store's generation moves on alone)."""


@attr.s(auto_attribs=True, frozen=True)
class Check:
    """Ask the cache every question (which also shows it the store's generation)."""


Step = Union[Put, Write, Unheard, Check]

steps = st.one_of(
    st.builds(Put, st.integers(0, len(QUESTIONS) - 1), st.integers(0, 3)),
    st.builds(Write, st.one_of(st.none(), st.sampled_from(NAMES))),
    st.just(Unheard()),
    st.just(Check()),
)


class Model:
    """What the cache must return: the last answer kept per question, while none of
    its servers was written after it was built (nor anything unknown happened)."""

    def __init__(self) -> None:
        self.generation = 0
        self.last_change: dict[str, int] = {}
        # The last write of unknown servers: news of any server, a write nobody told
        # of, or a write told right after one nobody told of (the cache cannot tell
        # that the write before it is the unheard one, so it drops everything).
        self.unknown_until = 0
        self.in_step = True  # whether the cache has seen the store's generation
        self.kept: dict[int, CachedAnswer] = {}

    def good(self, question: NormalisedQuery, built_on: int) -> bool:
        return self.unknown_until <= built_on and all(
            self.last_change.get(q.server_name, -1) <= built_on for q in question.queries
        )


class AnswerInvalidationPropertyTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.lists(steps, max_size=40))
    def test_no_answer_naming_a_written_server_is_returned(self, sequence: list[Step]) -> None:
        """After any sequence of steps, each question gets exactly the answer the
        model expects: never one naming a server written after it was built."""
        cache = AnswerCache(1 << 24)
        model = Model()
        cache.get(QUESTIONS[0], 1, 0)  # the cache starts at the store's generation 0
        for step in sequence:
            if isinstance(step, Put):
                built_on = max(0, model.generation - step.lag)
                question = QUESTIONS[step.question]
                entry = CachedAnswer(b"{}", 10**15, built_on, RESULTS, (0,) * len(question.key))
                cache.put(question.key, entry, 1, model.generation)
                model.in_step = True
                if model.good(question, built_on):
                    model.kept[step.question] = entry
            elif isinstance(step, Write):
                model.generation += 1
                if step.name is None or not model.in_step:
                    model.unknown_until = model.generation
                else:
                    model.last_change[step.name] = model.generation
                cache.changed(step.name, model.generation)
                model.in_step = True
            elif isinstance(step, Unheard):
                model.generation += 1
                model.unknown_until = model.generation
                model.in_step = False
            else:
                self.check(cache, model)
        self.check(cache, model)

    def check(self, cache: AnswerCache, model: Model) -> None:
        for index, question in enumerate(QUESTIONS):
            hit = cache.get(question, 1, model.generation)
            model.in_step = True
            if hit is not None:
                self.assertTrue(model.good(question, hit.generation), "a stale answer")
            expected = model.kept.get(index)
            if expected is not None and not model.good(question, expected.generation):
                expected = None
            self.assertIs(hit, expected)
