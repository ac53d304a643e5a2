"""The notary's per-query plan: which servers are fetched, refreshed or answered as stored."""

from typing import Optional

from twisted.trial.unittest import SynchronousTestCase

from keyring_module.metrics import SkippedFetch
from keyring_module.model import StoredKey
from keyring_module.notary.plan import QueryPlan, Step, plan_query
from keyring_module.notary.query import ServerQuery

NOW = 10_000
OWN = "me.example"


def stored(name: str, valid_until_ts: int, fetched_ts: int = NOW) -> dict[str, StoredKey]:
    """One stored key ``ed25519:a`` of ``name``."""
    return {
        "ed25519:a": StoredKey(
            name, "ed25519:a", b"k" * 32, valid_until_ts, None, fetched_ts, "origin", "r"
        )
    }


#: Needs a fetch, but has a stale copy to serve.
EXPIRED = stored("x", NOW - 1, NOW - 100)
#: Meets any minimum up to NOW + 100, but is past its half-life: refresh in the background.
HALF_LIFE_PASSED = stored("x", NOW + 100, NOW - 1000)
#: Fresh.
FRESH = stored("x", NOW + 1000)


def asked(name: str, minimum: Optional[int] = NOW) -> ServerQuery:
    """A query for key ``ed25519:a`` of ``name``."""
    return ServerQuery(name, {"ed25519:a": minimum})


class PlanTests(SynchronousTestCase):
    def steps(
        self, table: dict[str, Optional[dict[str, StoredKey]]], max_fetches: int
    ) -> dict[str, Step]:
        queries = [asked(name) for name in sorted(table)]
        store = {name: keys for name, keys in table.items() if keys is not None}
        plan = plan_query(queries, store, NOW, OWN, max_fetches)
        self.plan = plan
        return {s.query.server_name: s.step for s in plan.servers}

    def test_verdicts_become_steps_within_the_budget(self) -> None:
        """Fresh servers are answered as stored, ourselves from our keys, and with room
        in the budget every fetch and refresh is made."""
        steps = self.steps(
            {OWN: None, "a": FRESH, "b": EXPIRED, "c": HALF_LIFE_PASSED, "d": None}, 10
        )
        self.assertEqual(
            steps,
            {OWN: Step.SELF, "a": Step.STORE, "b": Step.FETCH, "c": Step.REFRESH, "d": Step.FETCH},
        )
        self.assertEqual(self.plan.skipped, ())
        self.assertTrue(self.plan.waits_for_fetch)

    def test_nothing_stored_is_fetched_first_then_by_order(self) -> None:
        """Servers with nothing stored get the fetches before servers with a stale copy,
        each group in the query's order; refreshes get only what is left, and a refresh
        beyond it is a stale answer (served as stored, not refreshed)."""
        table = {"a": EXPIRED, "b": EXPIRED, "c": None, "d": HALF_LIFE_PASSED, "e": None}
        cases = [
            (
                1,
                {
                    "a": Step.STALE,
                    "b": Step.STALE,
                    "c": Step.FETCH,
                    "d": Step.STALE,
                    "e": Step.STALE,
                },
            ),
            (
                3,
                {
                    "a": Step.FETCH,
                    "b": Step.STALE,
                    "c": Step.FETCH,
                    "d": Step.STALE,
                    "e": Step.FETCH,
                },
            ),
            (
                5,
                {
                    "a": Step.FETCH,
                    "b": Step.FETCH,
                    "c": Step.FETCH,
                    "d": Step.REFRESH,
                    "e": Step.FETCH,
                },
            ),
        ]
        for budget, expected in cases:
            self.assertEqual(self.steps(table, budget), expected, budget)
        self.steps(table, 1)
        self.assertEqual(
            self.plan.skipped, ((SkippedFetch.REQUEST_CAP, 3), (SkippedFetch.REFRESH_CAP, 1))
        )

    def test_without_fetches_every_fetch_is_answered_from_the_store(self) -> None:
        """Without fetches, every fetch becomes a stale answer; a plan with a stale copy
        or ourselves still answers something, one with nothing stored does not."""
        self.steps({"a": None, "b": EXPIRED}, 10)
        busy = self.plan.without_fetches()
        self.assertEqual([s.step for s in busy.servers], [Step.STALE, Step.STALE])
        self.assertEqual(busy.skipped, ((SkippedFetch.BUSY, 2),))
        self.assertFalse(busy.waits_for_fetch)
        self.assertTrue(busy.answers_anything)
        self.steps({"a": None}, 10)
        self.assertFalse(self.plan.without_fetches().answers_anything)
        self.steps({"a": None, OWN: None}, 10)
        self.assertTrue(self.plan.without_fetches().answers_anything)

    def test_a_copy_of_other_key_ids_is_nothing_to_answer_with(self) -> None:
        """A server whose stored keys are not the ones asked for counts as having nothing
        stored: it is fetched before servers with a stale copy."""
        queries = [asked("a"), ServerQuery("b", {"ed25519:other": NOW})]
        plan = plan_query(queries, {"a": EXPIRED, "b": EXPIRED}, NOW, OWN, 1)
        self.assertEqual([s.step for s in plan.servers], [Step.STALE, Step.FETCH])


class BackedOffPlanTests(SynchronousTestCase):
    """Servers whose origin the limiter would refuse now spend none of the budget."""

    def test_backed_off_origins_leave_the_budget_to_others(self) -> None:
        """Backed-off servers are answered stale and counted as ``backed_off``; the
        budget goes to the next servers, also for refreshes."""
        table = {"a": None, "b": None, "c": EXPIRED, "d": HALF_LIFE_PASSED, "e": None}
        queries = [asked(name) for name in sorted(table)]
        stored_keys = {name: keys for name, keys in table.items() if keys is not None}
        refused = {"a", "b", "d"}
        asked_about: list[str] = []

        def backed_off(name: str) -> bool:
            asked_about.append(name)
            return name in refused

        plan = plan_query(queries, stored_keys, NOW, OWN, 2, backed_off)
        self.assertEqual(
            [s.step for s in plan.servers],
            [Step.STALE, Step.STALE, Step.FETCH, Step.STALE, Step.FETCH],
        )
        self.assertEqual(plan.skipped, ((SkippedFetch.BACKED_OFF, 3),))
        self.assertEqual(sorted(asked_about), ["a", "b", "c", "d", "e"])

    def test_fresh_servers_and_ourselves_are_not_looked_up(self) -> None:
        """The limiter is asked only about servers that need a fetch or a refresh."""
        asked_about: list[str] = []

        def backed_off(name: str) -> bool:
            asked_about.append(name)
            return True

        plan = plan_query([asked("a"), asked(OWN)], {"a": FRESH}, NOW, OWN, 2, backed_off)
        self.assertEqual([s.step for s in plan.servers], [Step.STORE, Step.SELF])
        self.assertEqual(asked_about, [])


class LeastRecentlyTriedPlanTests(SynchronousTestCase):
    """Servers needing a fetch: never tried first (nothing stored before a stale copy),
    then the least recently tried, then by name."""

    def plan(
        self,
        table: dict[str, Optional[dict[str, StoredKey]]],
        tried: dict[str, int],
        max_fetches: int,
    ) -> QueryPlan:
        queries = [asked(name) for name in sorted(table)]
        store = {name: keys for name, keys in table.items() if keys is not None}
        return plan_query(queries, store, NOW, OWN, max_fetches, last_tried=tried.get)

    def fetched(self, plan: QueryPlan) -> list[str]:
        """The servers fetched, first to fetch first."""
        return [plan.servers[i].query.server_name for i in plan.fetch_order]

    def test_never_tried_then_least_recently_tried(self) -> None:
        """Among servers with nothing stored, those never tried go first (by name), then
        those tried longest ago; the budget takes them in that order."""
        table: dict[str, Optional[dict[str, StoredKey]]] = dict.fromkeys("abcde")
        plan = self.plan(table, {"a": 300, "b": 100, "d": 200}, 10)
        self.assertEqual(self.fetched(plan), ["c", "e", "b", "d", "a"])
        plan = self.plan(table, {"a": 300, "b": 100, "d": 200}, 3)
        self.assertEqual(self.fetched(plan), ["c", "e", "b"])
        self.assertEqual(plan.skipped, ((SkippedFetch.REQUEST_CAP, 2),))

    def test_a_stale_copy_never_tried_comes_before_nothing_stored_tried_lately(self) -> None:
        """A server with a stale copy never tried is fetched before a server with
        nothing stored tried a moment ago (it would be starved otherwise); among
        servers never tried, nothing stored still comes first."""
        plan = self.plan({"a": EXPIRED, "b": None}, {"b": NOW}, 1)
        self.assertEqual(self.fetched(plan), ["a"])
        self.assertEqual([s.step for s in plan.servers], [Step.FETCH, Step.STALE])
        plan = self.plan({"a": EXPIRED, "b": None}, {}, 1)
        self.assertEqual(self.fetched(plan), ["b"])

    def test_a_stored_server_is_not_starved_by_dead_unstored_ones(self) -> None:
        """A batch repeated every minute, naming more dead servers with nothing stored
        than its budget and one server with an expired copy, fetches the stored one
        in its second round."""
        dead = ["dead%03d" % i for i in range(15)]
        table: dict[str, Optional[dict[str, StoredKey]]] = dict.fromkeys(dead)
        table["zz-live"] = EXPIRED
        tried: dict[str, int] = {}
        rounds = []
        for when in (NOW, NOW + 60_000):
            fetched = self.fetched(self.plan(table, tried, 10))
            rounds.append("zz-live" in fetched)
            tried.update(dict.fromkeys(fetched, when))
        self.assertEqual(rounds, [False, True])

    def test_refreshes_go_least_recently_tried_first(self) -> None:
        """What is left of the budget refreshes the server tried longest ago first."""
        plan = self.plan({"a": HALF_LIFE_PASSED, "b": HALF_LIFE_PASSED}, {"a": 5}, 1)
        self.assertEqual([s.step for s in plan.servers], [Step.STALE, Step.REFRESH])

    def test_a_smaller_budget_keeps_the_first_fetches(self) -> None:
        """``with_fetch_budget`` keeps the fetches first in order and counts the others
        under the reason given; a budget that fits changes nothing."""
        table: dict[str, Optional[dict[str, StoredKey]]] = {"a": None, "b": EXPIRED, "c": None}
        plan = self.plan(table, {"a": 7}, 10)
        self.assertEqual(self.fetched(plan), ["c", "b", "a"])
        smaller = plan.with_fetch_budget(2, SkippedFetch.CLIENT_CAP)
        self.assertEqual(self.fetched(smaller), ["c", "b"])
        self.assertEqual([s.step for s in smaller.servers], [Step.STALE, Step.FETCH, Step.FETCH])
        self.assertEqual(smaller.skipped, ((SkippedFetch.CLIENT_CAP, 1),))
        self.assertEqual(smaller.fetch_count, 2)
        self.assertIs(plan.with_fetch_budget(3, SkippedFetch.CLIENT_CAP), plan)
