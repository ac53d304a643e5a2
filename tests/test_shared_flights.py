"""The shared-flight protocol (:mod:`keyring_module.shared_flights`) on a fake clock,
against an in-memory stand-in for the other processes on the database."""

from typing import Optional

import attr
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.clock import now_ms
from keyring_module.shared_flights import REUSE_ELSEWHERE_MS, SharedFlights
from keyring_module.storage.coordination import (
    OUTCOME_NOT_STORED,
    OUTCOME_OK,
    OUTCOME_UNREACHABLE,
    FlightOutcome,
    KeysChanged,
    LeaseAttempt,
    LimitUpdate,
)
from keyring_module.storage.errors import StorageUnavailableError
from keyring_module.storage.watchers import Watchers

LEASE_MS = 10_000
RETRY_MS = 500


class FakeCoordination:
    """The database as every process sees it: who holds which flight, the outcomes."""

    shared = True
    on_keys_changed: Optional[KeysChanged] = None

    def __init__(self, holder_id: str = "me") -> None:
        self.holder_id = holder_id
        self.lease_ms = LEASE_MS
        self.holders: dict[str, str] = {}
        self.outcomes: dict[str, FlightOutcome] = {}
        self.watchers = Watchers()
        self.renewals = 0
        self.failing = False
        self.stored: set[str] = set()  # response ids in the store

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def try_acquire(self, server_name: str) -> LeaseAttempt:
        if self.failing:
            raise StorageUnavailableError("down")
        holder = self.holders.get(server_name)
        if holder is None or holder == self.holder_id:
            self.holders[server_name] = self.holder_id
            return LeaseAttempt(True)
        return LeaseAttempt(False, RETRY_MS)

    async def renew(self, server_name: str) -> None:
        self.renewals += 1

    async def finish(self, server_name: str, outcome: Optional[FlightOutcome]) -> None:
        if outcome is not None:
            self.outcomes[server_name] = outcome
        if self.holders.get(server_name) == self.holder_id:
            del self.holders[server_name]
        self.watchers.wake(server_name)

    async def read_outcome(self, server_name: str) -> Optional[FlightOutcome]:
        if self.failing:
            raise StorageUnavailableError("down")
        return self.outcomes.get(server_name)

    def watch(self, server_name: str) -> "defer.Deferred[None]":
        return self.watchers.watch(server_name)

    async def mark_not_stored(self, server_name: str, response_id: str) -> bool:
        found = self.outcomes.get(server_name)
        if found is None or not found.awaits_store or found.detail != response_id:
            return False
        if found.finished_by != self.holder_id or response_id in self.stored:
            return False
        self.outcomes[server_name] = attr.evolve(found, outcome=OUTCOME_NOT_STORED)
        self.watchers.wake(server_name)
        return True

    async def update_limits(self, target: str, update: LimitUpdate) -> int:
        return update(None)[1]

    def other_finishes(self, server_name: str, outcome: FlightOutcome) -> None:
        """Another process ends its flight with ``outcome``."""
        self.holders.pop(server_name, None)
        self.outcomes[server_name] = outcome
        self.watchers.wake(server_name)


class Unreachable(Exception):
    pass


class TextCodec:
    """Answers are strings; a failure is shared as unreachable."""

    def encode(self, result: str, finished_ts: int, holder_id: str) -> FlightOutcome:
        return FlightOutcome(finished_ts, holder_id, OUTCOME_OK, "ok", "", result.encode())

    def encode_error(
        self, error: BaseException, finished_ts: int, holder_id: str
    ) -> Optional[FlightOutcome]:
        if isinstance(error, Unreachable):
            return FlightOutcome(finished_ts, holder_id, OUTCOME_UNREACHABLE, "timeout", "t/o")
        return None

    async def decode(self, outcome: FlightOutcome) -> str:
        if not outcome.ok:
            raise Unreachable(outcome.detail)
        assert outcome.body is not None
        return outcome.body.decode()


class SharedFlightTests(SynchronousTestCase):
    """One process of those sharing a database fetches; the others use its outcome."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.db = FakeCoordination()
        self.flights = SharedFlights(self.db, self.clock)
        self.calls = 0
        self.answer: "defer.Deferred[str]" = defer.Deferred()

    async def fetch(self) -> str:
        self.calls += 1
        return await self.answer

    def start_flight(self, name: str = "example.org") -> "defer.Deferred[str]":
        return defer.ensureDeferred(self.flights.run(name, self.fetch, TextCodec()))

    def test_the_holder_fetches_and_shares_its_answer(self) -> None:
        """With nobody else holding the flight, it fetches once and writes the outcome
        for the others, giving the lease back."""
        running = self.start_flight()
        self.assertEqual(self.db.holders, {"example.org": "me"})
        self.answer.callback("keys")
        self.assertEqual(self.successResultOf(running), "keys")
        self.assertEqual(self.calls, 1)
        outcome = self.db.outcomes["example.org"]
        self.assertEqual((outcome.finished_by, outcome.body), ("me", b"keys"))
        self.assertEqual(self.db.holders, {})
        self.assertEqual((self.flights.fetched, self.flights.shared), (1, 0))

    def test_a_waiter_uses_the_holders_answer_without_fetching(self) -> None:
        """While another process holds the flight, it waits, and uses the answer that
        process writes as soon as it is told of it (no fetch, no timer)."""
        self.db.holders["example.org"] = "other"
        running = self.start_flight()
        self.assertNoResult(running)
        self.db.other_finishes(
            "example.org",
            FlightOutcome(now_ms(self.clock), "other", OUTCOME_OK, "ok", "", b"theirs"),
        )
        self.assertEqual(self.successResultOf(running), "theirs")
        self.assertEqual(self.calls, 0)
        self.assertEqual(self.flights.shared, 1)

    def test_a_failure_elsewhere_is_raised_here(self) -> None:
        """The holder's unreachable origin is this flight's failure too (no fetch)."""
        self.db.holders["example.org"] = "other"
        running = self.start_flight()
        self.db.other_finishes(
            "example.org",
            FlightOutcome(now_ms(self.clock), "other", OUTCOME_UNREACHABLE, "timeout", "t/o"),
        )
        self.failureResultOf(running, Unreachable)
        self.assertEqual(self.calls, 0)

    def test_the_holders_failure_is_shared(self) -> None:
        """A fetch that could not reach the origin writes that outcome; the fetch's
        own error is raised here."""
        running = self.start_flight()
        self.answer.errback(Unreachable("no answer"))
        self.failureResultOf(running, Unreachable)
        self.assertEqual(self.db.outcomes["example.org"].outcome, OUTCOME_UNREACHABLE)

    def test_an_error_not_worth_sharing_only_gives_the_lease_back(self) -> None:
        """An error the codec does not share (a bug here) writes no outcome."""
        running = self.start_flight()
        self.answer.errback(ZeroDivisionError())
        self.failureResultOf(running, ZeroDivisionError)
        self.assertEqual((self.db.outcomes, self.db.holders), ({}, {}))

    def test_its_own_outcomes_are_never_reused(self) -> None:
        """A second flight of the same process fetches again (a refresh or a higher
        minimum asks the origin again, as a single process does)."""
        self.answer.callback("first")
        self.successResultOf(self.start_flight())
        self.answer = defer.succeed("second")
        self.assertEqual(self.successResultOf(self.start_flight()), "second")
        self.assertEqual(self.calls, 2)

    def test_a_recent_outcome_of_another_process_is_reused(self) -> None:
        """Another process's answer from at most REUSE_ELSEWHERE_MS before the flight
        began is used (the caller's store lookup missed it by moments); an older one
        is not."""
        finished = now_ms(self.clock) - REUSE_ELSEWHERE_MS
        self.db.outcomes["example.org"] = FlightOutcome(
            finished, "other", OUTCOME_OK, "ok", "", b"recent"
        )
        self.assertEqual(self.successResultOf(self.start_flight()), "recent")
        self.clock.advance(0.001)
        self.answer.callback("fetched")
        self.assertEqual(self.successResultOf(self.start_flight()), "fetched")
        self.assertEqual(self.calls, 1)

    def test_a_lease_freed_without_news_is_taken_at_the_retry(self) -> None:
        """A holder that died frees the lease without telling anyone: the waiter looks
        again after the retry the lease attempt named, takes it, and fetches."""
        self.db.holders["example.org"] = "other"
        running = self.start_flight()
        del self.db.holders["example.org"]  # its session ended
        self.clock.advance(RETRY_MS / 1000 - 0.001)
        self.assertEqual(self.calls, 0)
        self.clock.advance(0.001)
        self.assertEqual(self.calls, 1)
        self.answer.callback("mine")
        self.assertEqual(self.successResultOf(running), "mine")

    def test_a_stuck_holder_is_waited_for_twice_the_lease_at_most(self) -> None:
        """A holder that keeps the lease but never finishes: after twice the lease the
        waiter fetches without it."""
        self.db.holders["example.org"] = "other"
        running = self.start_flight()
        for _ in range(2 * LEASE_MS // RETRY_MS - 1):
            self.clock.advance(RETRY_MS / 1000)
        self.assertEqual(self.calls, 0)
        self.clock.advance(RETRY_MS / 1000)
        self.assertEqual(self.calls, 1)
        self.answer.callback("mine")
        self.assertEqual(self.successResultOf(running), "mine")
        self.assertEqual(self.db.holders, {"example.org": "other"})  # never taken

    def test_the_lease_is_renewed_while_the_fetch_runs(self) -> None:
        """Every third of the lease, for as long as the fetch runs, and not after."""
        running = self.start_flight()
        for _ in range(3):
            self.clock.advance(LEASE_MS / 3000)
        self.assertEqual(self.db.renewals, 3)
        self.answer.callback("slow")
        self.successResultOf(running)
        self.clock.advance(LEASE_MS / 1000)
        self.assertEqual(self.db.renewals, 3)

    def test_a_database_failure_fetches_without_a_shared_flight(self) -> None:
        """When the database cannot be used for the lease, the fetch goes on alone."""
        self.db.failing = True
        self.answer.callback("alone")
        self.assertEqual(self.successResultOf(self.start_flight()), "alone")
        self.assertEqual(self.calls, 1)
