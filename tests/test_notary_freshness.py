"""Tests for :mod:`keyring_module.notary.freshness`: when stored keys answer a query."""

from collections.abc import Mapping
from typing import Optional

import attr
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.model import StoredKey
from keyring_module.notary.freshness import (
    Verdict,
    fresh_until_ms,
    half_life_ts,
    judge_key,
    judge_query,
)

#: A key fetched at 1000 and valid until 3000: its half-life is 2000.
FETCHED_TS = 1000
VALID_UNTIL_TS = 3000
HALF_LIFE_TS = 2000


def key(
    key_id: str = "ed25519:a",
    valid_until_ts: int = VALID_UNTIL_TS,
    fetched_ts: int = FETCHED_TS,
    expired_ts: Optional[int] = None,
) -> StoredKey:
    """A stored key of ``x.org``."""
    return StoredKey(
        "x.org", key_id, b"k" * 32, valid_until_ts, expired_ts, fetched_ts, "origin", "r"
    )


@attr.s(auto_attribs=True, frozen=True)
class Query:
    """A query as the verdicts read it."""

    key_criteria: Mapping[str, Optional[int]] = attr.ib(factory=dict)
    all_keys_minimum: Optional[int] = None


class JudgeKeyTests(SynchronousTestCase):
    def test_verdicts(self) -> None:
        """Each row's stored key, minimum and time give the verdict of the notary rules."""
        table: list[tuple[str, Optional[StoredKey], Optional[int], int, Verdict]] = [
            ("nothing stored", None, None, 0, Verdict.FETCH),
            ("nothing stored, minimum", None, 5, 0, Verdict.FETCH),
            ("minimum met, before half-life", key(), 3000, 1999, Verdict.FRESH),
            ("minimum met, at half-life", key(), 3000, 2000, Verdict.REFRESH),
            ("minimum met, even expired", key(), 0, 5000, Verdict.REFRESH),
            ("minimum one ms too high", key(), 3001, 1500, Verdict.FETCH),
            ("no minimum, before half-life", key(), None, 1999, Verdict.FRESH),
            ("no minimum, at half-life", key(), None, 2000, Verdict.FETCH),
            ("no minimum, expired", key(), None, 3001, Verdict.FETCH),
        ]
        for label, stored, minimum, now, verdict in table:
            self.assertIs(judge_key(stored, minimum, now), verdict, label)

    def test_half_life(self) -> None:
        """The half-life is halfway from the fetch to ``valid_until_ts`` (rounded down)."""
        self.assertEqual(half_life_ts(key()), HALF_LIFE_TS)
        self.assertEqual(half_life_ts(key(valid_until_ts=1001)), 1000)


class JudgeQueryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.keys = {
            "ed25519:a": key("ed25519:a"),
            "ed25519:b": key("ed25519:b", valid_until_ts=5000),  # half-life 3000
        }

    def test_worst_verdict_of_the_asked_keys_wins(self) -> None:
        """FETCH beats REFRESH beats FRESH among the keys a query names."""
        now = 2500  # past a's half-life, before b's
        table: list[tuple[dict[str, Optional[int]], Verdict]] = [
            ({"ed25519:b": 0}, Verdict.FRESH),
            ({"ed25519:a": 0, "ed25519:b": 0}, Verdict.REFRESH),
            ({"ed25519:a": 0, "ed25519:b": 0, "ed25519:missing": 0}, Verdict.FETCH),
            ({"ed25519:a": 4000, "ed25519:b": 0}, Verdict.FETCH),
        ]
        for criteria, verdict in table:
            self.assertIs(judge_query(Query(criteria), self.keys, now), verdict, criteria)

    def test_all_keys_query_is_judged_by_the_best_current_key(self) -> None:
        """An all-keys query looks at the current key valid longest; old keys never count."""
        now = 2500
        self.assertIs(judge_query(Query(), self.keys, now), Verdict.FRESH)
        self.assertIs(judge_query(Query(all_keys_minimum=5001), self.keys, now), Verdict.FETCH)
        old_only = {"ed25519:o": key("ed25519:o", valid_until_ts=10**9, expired_ts=1500)}
        self.assertIs(judge_query(Query(), old_only, now), Verdict.FETCH)
        self.assertIs(judge_query(Query(), {}, now), Verdict.FETCH)

    def test_fresh_until_is_the_earliest_half_life(self) -> None:
        """A fresh answer holds until the earliest half-life of the keys judged, or None
        when none of them is stored."""
        both = Query({"ed25519:a": None, "ed25519:b": None})
        self.assertEqual(fresh_until_ms(both, self.keys), HALF_LIFE_TS)
        self.assertEqual(fresh_until_ms(Query(), self.keys), 3000)  # b: valid longest
        self.assertIsNone(fresh_until_ms(Query({"ed25519:missing": None}), self.keys))
