"""Direct confirmation of provisional keys follows the per-origin limiter's schedule.

With ``confirm_notary_keys_directly``, a failed confirmation is retried on a reactor
timer when the limiter would let a fetch through (``retry_after_ms``), or after
``confirm_retry_ms`` when it says 0, with no new request needed; the series stops when
the keys are confirmed, no longer provisional, or after a bound, and ``close`` cancels
it. Everything runs on a ``Clock``.
"""

from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.blocking import run_inline
from keyring_module.clock import now_ms
from keyring_module.config import KeyTrustConfig, RateLimitConfig, parse_config
from keyring_module.fetchers.chain import KeyFetcherChain
from keyring_module.fetchers.confirm import MAX_CONFIRM_ATTEMPTS, DirectConfirmations
from keyring_module.fetchers.origin import OriginKeyFetcher
from keyring_module.fetchers.trace import FetchTrace
from keyring_module.http import ConnectError
from keyring_module.model import SOURCE_ORIGIN, KeyRequest, StoredKey, notary_source
from keyring_module.ratelimit import OriginRateLimiter
from keyring_module.storage.memory import InMemoryKeyStore
from keyring_module.wiring import Fetching
from tests.chain_fakes import ScriptedFetcher
from tests.fake_reactors import FakeReactor
from tests.fakes import (
    FakeFederationClient,
    FakeNotaryResource,
    FakeOriginResource,
    RecordedRequest,
)
from tests.storage_writer import make_response
from tests.utils import (
    key_id,
    make_signed_server_keys,
    new_signing_key,
    verify_key_base64,
    verify_key_bytes,
)

NOW_MS = 1_700_000_000_000
DAY_MS = 24 * 60 * 60 * 1000
SERVER = "origin.example"
NOTARY = notary_source("notary.example")
KID = "ed25519:k1"
LIE, TRUTH = b"\x0b" * 32, b"\x0a" * 32
RETRY_MS = 30_000


class ScheduleTestCase(SynchronousTestCase):
    """A notary that lies about SERVER, an origin the test scripts, and a fake limiter
    that lets a fetch through from ``self.open_at_ms`` on."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW_MS / 1000)
        self.store = InMemoryKeyStore()
        self.origin = ScriptedFetcher(SOURCE_ORIGIN, self.clock)  # fails until told
        self.notary = ScriptedFetcher(
            NOTARY, self.clock, {SERVER: make_response(SERVER, NOW_MS + DAY_MS, {KID: LIE})}
        )
        self.open_at_ms = 0

    def retry_after_ms(self, server_name: str) -> int:
        return max(0, self.open_at_ms - now_ms(self.clock))

    def make_chain(self, **kw: Any) -> KeyFetcherChain:
        return KeyFetcherChain(
            self.store,
            self.origin,
            [self.notary],
            self.clock,
            order=("notaries", "origin"),
            trust=KeyTrustConfig(confirm_notary_keys_directly=True),
            retry_after_ms=self.retry_after_ms,
            confirm_retry_ms=RETRY_MS,
            **kw,
        )

    def get_keys(self, chain: KeyFetcherChain) -> dict[str, StoredKey]:
        keys = self.successResultOf(
            defer.ensureDeferred(chain.get_keys([KeyRequest(SERVER, None, NOW_MS)]))
        )
        result: dict[str, StoredKey] = keys[SERVER]
        return result

    def origin_comes_back(self) -> None:
        self.origin.responses[SERVER] = make_response(SERVER, NOW_MS + DAY_MS, {KID: TRUTH})

    def stored_key(self) -> tuple[bytes, str]:
        keys = self.successResultOf(defer.ensureDeferred(self.store.get_server_keys(SERVER)))
        return keys[KID].verify_key_bytes, keys[KID].source


class ConfirmationScheduleTests(ScheduleTestCase):
    def test_retry_when_the_limiter_lets_a_fetch_through(self) -> None:
        """After a failed confirmation the next attempt comes when retry_after_ms says the
        limiter lets a fetch through, with no new get_keys call."""
        self.origin.delay_s = 1  # fails after 1 s
        chain = self.make_chain()
        self.get_keys(chain)
        self.assertEqual(self.origin.calls, [[SERVER]])  # the first attempt, at once
        self.open_at_ms = NOW_MS + 46_000  # backed off after the failure at 1 s
        self.clock.advance(1)
        self.clock.advance(44.999)
        self.assertEqual(len(self.origin.calls), 1)
        self.clock.advance(0.001)
        self.assertEqual(len(self.origin.calls), 2)

    def test_put_off_while_the_limiter_still_refuses(self) -> None:
        """When the retry is due but the limiter would still refuse (another fetch failed
        meanwhile), the attempt waits until it would not."""
        chain = self.make_chain()
        self.get_keys(chain)
        self.open_at_ms = NOW_MS + 40_000
        self.clock.advance(RETRY_MS / 1000)
        self.assertEqual(len(self.origin.calls), 1)
        self.clock.advance(10 - 0.001)
        self.assertEqual(len(self.origin.calls), 1)
        self.clock.advance(0.001)
        self.assertEqual(len(self.origin.calls), 2)

    def test_first_attempt_waits_for_the_limiter(self) -> None:
        """A first confirmation the limiter would refuse now is scheduled for when it
        would not, instead of being refused."""
        self.open_at_ms = NOW_MS + 5_000
        chain = self.make_chain()
        self.get_keys(chain)
        self.assertEqual(self.origin.calls, [])
        self.clock.advance(5)
        self.assertEqual(self.origin.calls, [[SERVER]])

    def test_provisional_key_replaced_within_one_interval(self) -> None:
        """Once the origin is back, the next scheduled attempt replaces the provisional
        key with the origin's (no request needed), within one interval."""
        chain = self.make_chain()
        self.assertEqual(self.get_keys(chain)[KID].verify_key_bytes, LIE)
        self.clock.advance(1)
        self.origin_comes_back()
        self.clock.advance(RETRY_MS / 1000 - 1 - 0.001)
        self.assertEqual(self.stored_key(), (LIE, NOTARY))
        self.clock.advance(0.001)
        self.successResultOf(defer.ensureDeferred(chain.wait_for_confirmations()))
        self.assertEqual(self.stored_key(), (TRUTH, SOURCE_ORIGIN))
        self.assertEqual(len(self.origin.calls), 2)
        self.clock.advance(10 * RETRY_MS / 1000)
        self.assertEqual(len(self.origin.calls), 2)  # confirmed: no more attempts
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_zero_wait_after_a_failure_uses_the_retry_delay(self) -> None:
        """When the limiter says 0 right after a failure (an HTTP error need not back
        off), the retry waits confirm_retry_ms instead of asking again at once."""
        chain = self.make_chain()
        self.get_keys(chain)
        self.clock.advance(RETRY_MS / 1000 - 0.001)
        self.assertEqual(len(self.origin.calls), 1)
        self.clock.advance(0.001)
        self.assertEqual(len(self.origin.calls), 2)

    def test_origin_failed_in_the_call_is_not_asked_again_at_once(self) -> None:
        """Origin first: when the call's own origin fetch failed, the confirmation waits
        as after a failed attempt."""
        self.open_at_ms = NOW_MS + 20_000
        chain = KeyFetcherChain(
            self.store,
            self.origin,
            [self.notary],
            self.clock,
            trust=KeyTrustConfig(confirm_notary_keys_directly=True),
            retry_after_ms=self.retry_after_ms,
            confirm_retry_ms=RETRY_MS,
        )
        self.get_keys(chain)
        self.assertEqual(len(self.origin.calls), 1)  # the call's own fetch
        self.clock.advance(20 - 0.001)
        self.assertEqual(len(self.origin.calls), 1)
        self.clock.advance(0.001)
        self.assertEqual(len(self.origin.calls), 2)

    def test_new_calls_do_not_add_attempts(self) -> None:
        """Calls returning the provisional key while a retry is scheduled start nothing."""
        chain = self.make_chain()
        for _ in range(10):
            self.get_keys(chain)
            self.clock.advance(1)
        self.assertEqual(len(self.origin.calls), 1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_stops_when_no_longer_provisional(self) -> None:
        """A retry finds the key confirmed by some other fetch: no attempt, no timer."""
        chain = self.make_chain()
        self.get_keys(chain)
        origin_answer = make_response(SERVER, NOW_MS + DAY_MS, {KID: TRUTH})
        self.successResultOf(
            defer.ensureDeferred(
                self.store.store_server_keys(
                    origin_answer, SOURCE_ORIGIN, NOW_MS, replace=frozenset({KID})
                )
            )
        )
        self.clock.advance(RETRY_MS / 1000)
        self.assertEqual(len(self.origin.calls), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_gives_up_after_the_bound(self) -> None:
        """After MAX_CONFIRM_ATTEMPTS failed attempts the series ends (logged); a later
        call starts a new one."""
        chain = self.make_chain()
        with self.assertLogs("keyring_module.fetchers.chain", "INFO") as logs:
            self.get_keys(chain)
            for _ in range(MAX_CONFIRM_ATTEMPTS + 2):
                self.clock.advance(RETRY_MS / 1000)
        self.assertEqual(len(self.origin.calls), MAX_CONFIRM_ATTEMPTS)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(any("giving up" in line for line in logs.output))
        self.get_keys(chain)
        self.assertEqual(len(self.origin.calls), MAX_CONFIRM_ATTEMPTS + 1)

    def test_close_cancels_scheduled_attempts(self) -> None:
        """close() cancels the retry timers, and later calls schedule none."""
        chain = self.make_chain()
        self.get_keys(chain)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        chain.close()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.get_keys(chain)
        self.clock.advance(10 * RETRY_MS / 1000)
        self.assertEqual(len(self.origin.calls), 1)

    def test_tracked_servers_are_bounded(self) -> None:
        """At most max_tracked servers have a retry scheduled; the oldest is dropped."""
        confirmed: list[str] = []

        async def confirm(server_name: str, trace: Optional[FetchTrace]) -> bool:
            confirmed.append(server_name)
            return False

        async def still_provisional(server_name: str) -> bool:
            return True

        confirmations = DirectConfirmations(
            self.clock, confirm, still_provisional, retry_ms=RETRY_MS, max_tracked=2
        )
        for name in ("s0.example", "s1.example", "s2.example"):
            confirmations.request(name, None, origin_failed=True)
        self.assertEqual(confirmations.scheduled, 2)
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)
        self.clock.advance(RETRY_MS / 1000)
        self.assertEqual(confirmed, ["s1.example", "s2.example"])


class SwitchableClient(FakeFederationClient):
    """A fake federation client whose servers in ``down`` cannot be connected to."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.down: set[str] = set()

    async def get_json(
        self, server_name: str, path: str, timeout_ms: Optional[int] = None
    ) -> object:
        if server_name in self.down:
            self.requests.append(RecordedRequest("GET", server_name, path))
            raise ConnectError("connection refused by %s" % (server_name,))
        return await super().get_json(server_name, path, timeout_ms)


class LimiterScheduleTests(SynchronousTestCase):
    def test_replaced_within_one_backoff_interval_of_the_origin_coming_back(self) -> None:
        """With the real limiter and an unreachable origin, confirmations follow its
        growing backoff (30 s, then 60 s), and the notary's lie is replaced by the
        origin's key at the first attempt after the origin comes back."""
        clock = Clock()
        clock.advance(NOW_MS / 1000)
        store = InMemoryKeyStore()
        signing_key = new_signing_key("k1")
        origin = FakeOriginResource(signing_key, SERVER, clock)
        client = SwitchableClient({SERVER: origin})
        client.down.add(SERVER)
        config = RateLimitConfig(failure_backoff_initial_ms=RETRY_MS)
        limiter = OriginRateLimiter(clock, config, random=lambda: 0.5)  # no jitter
        lie = make_response(SERVER, NOW_MS + DAY_MS, {key_id(signing_key): LIE})
        chain = KeyFetcherChain(
            store,
            OriginKeyFetcher(client, limiter, clock),
            [ScriptedFetcher(NOTARY, clock, {SERVER: lie})],
            clock,
            order=("notaries", "origin"),
            trust=KeyTrustConfig(confirm_notary_keys_directly=True),
            retry_after_ms=limiter.retry_after_ms,
            confirm_retry_ms=RETRY_MS,
        )
        self.successResultOf(defer.ensureDeferred(chain.get_keys([KeyRequest(SERVER)])))

        def attempts() -> list[float]:
            return [round(t - NOW_MS / 1000, 3) for t in times]

        times: list[float] = []
        original = client.get_json

        async def timed(server_name: str, path: str, timeout_ms: Optional[int] = None) -> object:
            times.append(clock.seconds())
            return await original(server_name, path, timeout_ms)

        client.get_json = timed  # type: ignore[method-assign]
        self.assertEqual(len(client.requests_to(SERVER)), 1)  # the first attempt, failed
        self.assertEqual(limiter.retry_after_ms(SERVER), RETRY_MS)
        for _ in range(30):
            clock.advance(1)
        self.assertEqual(attempts(), [30])  # failed again: backed off for 60 s
        self.assertEqual(limiter.retry_after_ms(SERVER), 60_000)
        clock.advance(5)
        client.down.clear()  # the origin comes back at 35 s
        for _ in range(54):
            clock.advance(1)
        self.assertEqual(attempts(), [30])
        clock.advance(1)
        self.assertEqual(attempts(), [30, 90])  # within one backoff interval of 35 s
        keys = self.successResultOf(defer.ensureDeferred(store.get_server_keys(SERVER)))
        stored = keys[key_id(signing_key)]
        self.assertEqual(
            (stored.verify_key_bytes, stored.source), (verify_key_bytes(signing_key), "origin")
        )
        self.assertEqual(origin.hits, 1)


class WiredConfirmationTests(SynchronousTestCase):
    def test_fetching_close_cancels_the_scheduled_confirmation(self) -> None:
        """Through the wiring, a failed confirmation leaves a retry timer on the reactor,
        and Fetching.close cancels it."""
        reactor = FakeReactor()
        reactor.advance(NOW_MS / 1000)
        notary_key, origin_key = new_signing_key("n"), new_signing_key("k1")
        notary = FakeNotaryResource(
            "notary.example",
            notary_key,
            {SERVER: [make_signed_server_keys(SERVER, [origin_key], NOW_MS + DAY_MS)]},
        )
        config = parse_config(
            {
                "signing_key_path": "unused",
                "key_fetch_order": ["notaries", "origin"],
                "key_trust": {"confirm_notary_keys_directly": True},
                "trusted_key_servers": [
                    {
                        "server_name": "notary.example",
                        "verify_keys": {key_id(notary_key): verify_key_base64(notary_key)},
                    }
                ],
            },
            standalone=False,
        )
        client = FakeFederationClient({"notary.example": notary})  # the origin is down
        fetching = Fetching.build(
            reactor, config, InMemoryKeyStore(), client=client, run_blocking=run_inline
        )
        keys = self.successResultOf(
            defer.ensureDeferred(fetching.chain.get_keys([KeyRequest(SERVER)]))
        )
        self.assertEqual(keys[SERVER][key_id(origin_key)].source, NOTARY)
        self.assertEqual(len(client.requests_to(SERVER)), 1)  # the confirmation, failed
        timers = reactor.getDelayedCalls()
        self.assertEqual(len(timers), 1)
        self.successResultOf(defer.ensureDeferred(fetching.close()))
        self.assertEqual(reactor.getDelayedCalls(), [])
        reactor.advance(config.ratelimit.failure_backoff_max_ms / 1000)
        self.assertEqual(len(client.requests_to(SERVER)), 1)
