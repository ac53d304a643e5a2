"""Two ``keyring-module serve`` instances on one database, in their own processes.

Real processes, real HTTP on 127.0.0.1, a fake origin serving HTTPS from the test's
reactor, and one PostgreSQL schema (``KEYRING_TEST_POSTGRES_DSN``) or one SQLite file
shared by the two instances. The origin holds its answers until the test releases them,
so that every query arrives while the first fetch is still in flight.
"""

import os
import time
from typing import Any, Callable

from twisted.internet import defer, task

from tests.fakes import FakeOriginResource
from tests.serve_processes import (
    ServeInstance,
    ServeProcessesCase,
    instance_config,
    query,
    served_key_ids,
)
from tests.storage_writer import postgres_test_schema
from tests.utils import key_id, new_signing_key

#: Concurrent queries in the single-flight tests, spread over the two instances.
QUERIES = 200
#: The lease of the SQLite kill test.
SQLITE_LEASE_S = 2


class _TwoInstances(ServeProcessesCase):
    """Helpers: a fake origin, two instances on one database, queries in bulk."""

    def database(self) -> dict[str, Any]:
        raise NotImplementedError

    async def two_instances(self, **database: Any) -> tuple[ServeInstance, ServeInstance]:
        """Two instances on the test's database (started one after the other)."""
        config = instance_config(self.origins.ca_file, dict(self.database(), **database))
        first = await ServeInstance.start(
            self, self.reactor, os.path.join(self.directory, "a"), config
        )
        second = await ServeInstance.start(
            self, self.reactor, os.path.join(self.directory, "b"), config
        )
        return first, second

    async def wait_until(self, what: str, check: Callable[[], bool], seconds: float) -> float:
        """Wait until ``check()`` holds (looking every 10 ms); returns how long it took."""
        started = time.monotonic()
        while not check():
            if time.monotonic() - started > seconds:
                self.fail("%s: not within %.1fs" % (what, seconds))
            await task.deferLater(self.clock, 0.01, lambda: None)
        return time.monotonic() - started

    async def sleep(self, seconds: float) -> None:
        await task.deferLater(self.clock, seconds, lambda: None)

    async def one_fetch_for_many_queries(self) -> None:
        """QUERIES queries for an uncached origin, half to each instance, while the
        origin holds its answer: it is asked once, and every query gets its key."""
        first, second = await self.two_instances()
        origin = self.origins.start()
        origin.hold = True
        name = origin.server_name
        queries = [
            defer.ensureDeferred(query(self.reactor, self.pool, (first, second)[i % 2].port, name))
            for i in range(QUERIES)
        ]
        await self.wait_until("the first fetch", lambda: origin.hits >= 1, 30)
        await self.sleep(1.5)  # both instances have every query waiting by now
        self.assertEqual(origin.hits, 1)
        origin.release()
        answers = await defer.gatherResults(queries, consumeErrors=True)
        want = {key_id(origin.signing_keys[0])}
        for code, answer in answers:
            self.assertEqual(code, 200, answer)
            self.assertEqual(served_key_ids(answer, name), want)
        self.assertEqual(origin.hits, 1)

    async def killed_holder_releases(self, within_s: float) -> None:
        """The instance holding the origin's flight is SIGKILLed while the origin holds
        its answer; the other instance's waiting query takes the flight over within
        ``within_s``, fetches, and gets the key."""
        first, second = await self.two_instances()
        origin = self.origins.start()
        origin.hold = True
        name = origin.server_name
        defer.ensureDeferred(query(self.reactor, self.pool, first.port, name)).addErrback(
            lambda f: None  # its instance is killed: the query fails
        )
        await self.wait_until("the first fetch", lambda: origin.hits == 1, 30)
        waiting = defer.ensureDeferred(query(self.reactor, self.pool, second.port, name))
        await self.sleep(1.0)
        self.assertEqual(origin.hits, 1)  # the second instance waits for the first
        first.kill()
        took_s = await self.wait_until("the second fetch", lambda: origin.hits == 2, within_s)
        self.assertLess(took_s, within_s)
        origin.held.pop(0)  # the killed instance's request: its connection is gone
        origin.release()
        code, answer = await waiting
        self.assertEqual(code, 200, answer)
        self.assertEqual(served_key_ids(answer, name), {key_id(origin.signing_keys[0])})

    async def new_key_seen_elsewhere(self, within_s: float) -> float:
        """A key fetched through one instance is served by the other (which had the
        origin's older key cached, for an hour) within ``within_s`` of the first
        instance's answer, without the second asking the origin; returns how long."""
        first, second = await self.two_instances(cache_ttl="1h")
        origin: FakeOriginResource = self.origins.start("k1")
        name = origin.server_name
        old_key = key_id(origin.signing_keys[0])
        code, answer = await query(self.reactor, self.pool, second.port, name)
        self.assertEqual((code, served_key_ids(answer, name)), (200, {old_key}))
        await self.sleep(2.5)  # that outcome is too old to be reused for the next fetch
        origin.signing_keys = [new_signing_key("k2")]
        new_key = key_id(origin.signing_keys[0])
        code, answer = await query(self.reactor, self.pool, first.port, name, [new_key])
        answered = time.monotonic()
        self.assertEqual(code, 200, answer)
        self.assertIn(new_key, served_key_ids(answer, name))
        self.assertEqual(origin.hits, 2)
        while True:
            code, answer = await query(self.reactor, self.pool, second.port, name)
            took_s = time.monotonic() - answered
            self.assertEqual(code, 200, answer)
            if new_key in served_key_ids(answer, name):
                break
            if took_s > 5:
                self.fail("the second instance still serves only %s" % (old_key,))
        self.assertEqual(origin.hits, 2)  # served from the store, not fetched again
        self.assertLess(took_s, within_s)
        return took_s

    async def one_bucket_for_both(self) -> None:
        """With ``origin_burst: 1``, an origin fetched through one instance is not
        fetched again through the other (whose own bucket is full) until a token comes
        back: the instances spend one shared bucket."""
        config = instance_config(
            self.origins.ca_file, self.database(), ratelimit={"origin_burst": 1}
        )
        first = await ServeInstance.start(
            self, self.reactor, os.path.join(self.directory, "a"), config
        )
        second = await ServeInstance.start(
            self, self.reactor, os.path.join(self.directory, "b"), config
        )
        origin = self.origins.start("k1")
        name = origin.server_name
        code, answer = await query(self.reactor, self.pool, first.port, name)
        self.assertEqual((code, origin.hits), (200, 1))
        await self.sleep(2.5)  # that outcome is too old to be reused
        origin.signing_keys = [new_signing_key("k2")]
        code, answer = await query(
            self.reactor, self.pool, second.port, name, [key_id(origin.signing_keys[0])]
        )
        self.assertEqual(code, 200, answer)
        self.assertEqual(origin.hits, 1)
        self.assertTrue(
            any("rate_limited" in line for line in second.output), "\n".join(second.output)
        )


class PostgresTwoInstancesTests(_TwoInstances):
    """Two instances on one PostgreSQL database."""

    def database(self) -> dict[str, Any]:
        dsn, _ = postgres_test_schema(self)
        return {"backend": "postgres", "dsn": dsn}

    async def test_one_fetch_for_200_queries_across_two_instances(self) -> None:
        """200 concurrent queries for one uncached origin, half through each instance,
        reach the origin exactly once; every query is answered with its key."""
        await self.one_fetch_for_many_queries()

    async def test_killed_holder_frees_the_flight(self) -> None:
        """SIGKILL of the instance fetching an origin frees its advisory lock: the
        other instance's waiting flight fetches itself well within the lease."""
        await self.killed_holder_releases(within_s=5.0)

    async def test_a_key_fetched_by_one_is_served_by_the_other_within_100_ms(self) -> None:
        """After one instance fetched and stored a new key, the other serves it within
        100 ms (NOTIFY drops its cached keys and answers), not after cache_ttl."""
        await self.new_key_seen_elsewhere(within_s=0.1)

    async def test_the_instances_spend_one_token_bucket(self) -> None:
        """One origin bucket for both instances (burst 1: the second is refused)."""
        await self.one_bucket_for_both()


class SqliteTwoInstancesTests(_TwoInstances):
    """Two instances on one SQLite file."""

    def database(self) -> dict[str, Any]:
        path = os.path.join(self.directory, "keyring.db")
        return {
            "backend": "sqlite",
            "path": path,
            "flight_lease": "%ds" % SQLITE_LEASE_S,
            "poll_interval": "50ms",
        }

    async def test_one_fetch_for_200_queries_across_two_instances(self) -> None:
        """200 concurrent queries for one uncached origin, half through each instance
        on one SQLite file, reach the origin exactly once."""
        await self.one_fetch_for_many_queries()

    async def test_killed_holder_frees_the_flight(self) -> None:
        """SIGKILL of the instance fetching an origin: its lease row runs out (it is
        not renewed any more), and the other instance fetches within the lease."""
        await self.killed_holder_releases(within_s=SQLITE_LEASE_S + 1.5)

    async def test_a_key_fetched_by_one_is_served_by_the_other_within_a_poll(self) -> None:
        """After one instance stored a new key, the other serves it within about one
        poll interval (50 ms here; a second at most on a loaded machine), not after
        cache_ttl."""
        await self.new_key_seen_elsewhere(within_s=1.0)

    async def test_the_instances_spend_one_token_bucket(self) -> None:
        """One origin bucket for both instances (burst 1: the second is refused)."""
        await self.one_bucket_for_both()
