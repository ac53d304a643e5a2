"""Our /server response is signed on a schedule and served as ready bytes in between,
whatever ``key_refresh_interval`` is (including the smallest allowed, ``1h``)."""

import json
from typing import Any

from signedjson.key import generate_signing_key
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.config import HOUR_MS, parse_config
from keyring_module.resources.tree import build_key_resource, build_root
from keyring_module.signing import OwnKeys, ServerKeyPublisher, publishing_schedule

START_S = 1_700_000_000
MINUTE_MS = 60 * 1000


class CountingOwnKeys(OwnKeys):
    """OwnKeys that count how often the /server object is signed."""

    signed = 0

    def build_server_keys(self, valid_until_ts: int) -> dict[str, Any]:
        self.signed += 1
        return super().build_server_keys(valid_until_ts)


class PublishingScheduleTests(SynchronousTestCase):
    """Requests within the schedule share one signature; after it a fresh one is made."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START_S)
        self.own_keys = CountingOwnKeys("notary.test", [generate_signing_key("a_abc")])

    def make_treq(self, interval_ms: int) -> StubTreq:
        publisher = ServerKeyPublisher(self.own_keys, self.clock, interval_ms)
        return StubTreq(build_root(build_key_resource(publisher)))

    def get_server(self, treq: StubTreq) -> bytes:
        d = treq.request("GET", "http://notary.test/_matrix/key/v2/server")  # type: ignore[attr-defined]
        treq.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        body: bytes = self.successResultOf(response.content())
        return body

    def now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    def check_schedule(self, interval_ms: int, resign_every_ms: int, valid_for_ms: int) -> None:
        """N requests before ``resign_every_ms`` sign once; the next one signs again."""
        treq = self.make_treq(interval_ms)
        first = self.get_server(treq)
        self.assertEqual(self.own_keys.signed, 1)
        self.assertEqual(json.loads(first)["valid_until_ts"], START_S * 1000 + valid_for_ms)
        resign_s = resign_every_ms // 1000
        for k in range(51):  # up to one second before the next signing is due
            self.clock.advance(START_S + (resign_s - 1) * k // 50 - self.clock.seconds())
            body = self.get_server(treq)
            self.assertEqual(body, first)
            # Every served response is valid for at least another hour.
            self.assertGreaterEqual(json.loads(body)["valid_until_ts"], self.now_ms() + HOUR_MS)
        self.assertEqual(self.own_keys.signed, 1, "no signing between scheduled times")
        self.clock.advance(1)
        second = self.get_server(treq)
        self.assertEqual(self.own_keys.signed, 2)
        self.assertEqual(
            json.loads(second)["valid_until_ts"], START_S * 1000 + resign_every_ms + valid_for_ms
        )
        for _ in range(10):
            self.assertEqual(self.get_server(treq), second)
        self.assertEqual(self.own_keys.signed, 2)

    def test_shortest_interval_signs_every_half_hour(self) -> None:
        """With key_refresh_interval 1h the response is signed every 30 minutes (not on every
        request), valid for 90 minutes so that a served one always has an hour left."""
        self.check_schedule(HOUR_MS, 30 * MINUTE_MS, 90 * MINUTE_MS)

    def test_default_interval_signs_every_twelve_hours(self) -> None:
        """With the default interval (1d) the response is signed every 12 hours, valid a day."""
        default_ms = parse_config(
            {"signing_key_path": "k", "server_name": "a.test", "listeners": [{"port": 1}]}
        ).key_refresh_interval_ms
        self.assertEqual(default_ms, 24 * HOUR_MS)
        self.check_schedule(default_ms, 12 * HOUR_MS, 24 * HOUR_MS)

    def test_ninety_minute_interval(self) -> None:
        """An interval between 1h and 2h is stretched just enough to keep an hour of validity."""
        self.check_schedule(90 * MINUTE_MS, 45 * MINUTE_MS, 105 * MINUTE_MS)


class PublishingScheduleValuesTests(SynchronousTestCase):
    """The schedule itself, over the range of intervals."""

    def test_schedule_keeps_an_hour_of_validity(self) -> None:
        """For every interval from 1h to 7d the re-sign period is positive and half the
        interval, and a response is still valid an hour after the next signing is due."""
        for interval_ms in (HOUR_MS, HOUR_MS + 1, 90 * MINUTE_MS, 2 * HOUR_MS, 7 * 24 * HOUR_MS):
            resign_every_ms, valid_for_ms = publishing_schedule(interval_ms)
            self.assertEqual(resign_every_ms, interval_ms // 2)
            self.assertGreaterEqual(valid_for_ms - resign_every_ms, HOUR_MS)
            self.assertGreaterEqual(valid_for_ms, interval_ms)
        # From 2h on the validity is exactly the interval (as configured).
        self.assertEqual(publishing_schedule(2 * HOUR_MS), (HOUR_MS, 2 * HOUR_MS))
