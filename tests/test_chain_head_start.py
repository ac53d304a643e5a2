"""A stage of the chain has a head start of half the timeout, not the whole of it.

With ``key_fetch_order: [origin, notaries]`` a server whose origin hangs is also sent to
the notaries once half the source timeout has passed, while its origin fetch goes on;
the first trusted answer that satisfies it settles it, from either stage, and a later
trusted one is still stored in the background. The same holds for ``[notaries,
origin]``. So a notary query about such a server is answered before the notary
service's own deadline (``request_timeout``, the very timeout each source gets).
"""

from typing import Any, Mapping, Optional, Sequence

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from keyring_module.config import KeyTrustConfig
from keyring_module.fetchers.chain import KeyFetcherChain
from keyring_module.fetchers.settling import HEAD_START_SHARE
from keyring_module.model import SOURCE_ORIGIN, KeyRequest, StoredKey, notary_source
from keyring_module.storage.memory import InMemoryKeyStore
from tests.chain_fakes import ScriptedFetcher
from tests.fakes import FakeNotaryResource, FakeOriginResource, HangingResource
from tests.federation_traffic import (
    notary_with_origins,
    server_keys,
    trusted_notary,
    verify_keys_by_server,
)
from tests.notary_site import START_S
from tests.storage_writer import make_response
from tests.utils import key_id, make_signed_server_keys, new_signing_key, verify_key_base64

NOW_MS = 1_700_000_000_000
DAY_MS = 24 * 60 * 60 * 1000
TIMEOUT_S = 10.0
HEAD_START_S = TIMEOUT_S * HEAD_START_SHARE
SERVER = "origin.example"
KID, KID2 = "ed25519:k", "ed25519:k2"
FROM_ORIGIN, FROM_NOTARY = b"\x0a" * 32, b"\x0b" * 32
NOTARY_SOURCE = notary_source("n1.example")


class HeadStartTests(SynchronousTestCase):
    """An origin and one notary as scripted sources; both hang unless a test says."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW_MS / 1000)
        self.start = self.clock.seconds()
        self.store = InMemoryKeyStore()
        self.origin = ScriptedFetcher(SOURCE_ORIGIN, self.clock, delay_s=None)
        self.notary = ScriptedFetcher(NOTARY_SOURCE, self.clock, delay_s=None)

    def answers(
        self, source: ScriptedFetcher, keys: Mapping[str, bytes], delay_s: Optional[float]
    ) -> None:
        """Let ``source`` answer ``keys`` about the server after ``delay_s`` (None: never)."""
        source.responses[SERVER] = make_response(SERVER, NOW_MS + DAY_MS, keys)
        source.delay_s = delay_s

    def get_keys(
        self, order: Sequence[str] = ("origin", "notaries"), n: int = 1
    ) -> tuple[KeyFetcherChain, "defer.Deferred[dict[str, dict[str, StoredKey]]]"]:
        chain = KeyFetcherChain(
            self.store,
            self.origin,
            [self.notary],
            self.clock,
            order=order,
            trust=KeyTrustConfig(n),
            timeout_ms=int(TIMEOUT_S * 1000),
        )
        request = KeyRequest(SERVER, None, NOW_MS)
        return chain, defer.ensureDeferred(chain.get_keys([request]))

    def elapsed(self) -> float:
        return round(self.clock.seconds() - self.start, 3)

    def served(self, d: "defer.Deferred[dict[str, dict[str, StoredKey]]]") -> dict[str, Any]:
        keys = self.successResultOf(d)[SERVER]
        return {kid: (key.verify_key_bytes, key.source) for kid, key in keys.items()}

    def stored(self) -> dict[str, tuple[bytes, str]]:
        keys = self.successResultOf(defer.ensureDeferred(self.store.get_server_keys(SERVER)))
        return {kid: (key.verify_key_bytes, key.source) for kid, key in keys.items()}

    def test_hanging_origin_answered_by_the_notary_after_half_the_timeout(self) -> None:
        """Origin first: the origin hangs and the notary answers at once, so get_keys
        returns the notary's keys half a timeout after it began, not after the whole."""
        self.answers(self.notary, {KID: FROM_NOTARY}, 0)
        _, d = self.get_keys()
        self.clock.advance(HEAD_START_S - 0.001)
        self.assertNoResult(d)
        self.assertEqual(self.notary.calls, [])
        self.clock.advance(0.001)
        self.assertEqual(self.served(d), {KID: (FROM_NOTARY, NOTARY_SOURCE)})
        self.assertEqual(self.elapsed(), HEAD_START_S)
        self.assertEqual(self.origin.calls, [[SERVER]])  # asked once, still waited for

    def test_hanging_notary_answered_by_the_origin_after_half_the_timeout(self) -> None:
        """Notaries first: the notary hangs and the origin answers at once, so get_keys
        returns the origin's keys half a timeout after it began."""
        self.answers(self.origin, {KID: FROM_ORIGIN}, 0)
        _, d = self.get_keys(order=("notaries", "origin"))
        self.clock.advance(HEAD_START_S - 0.001)
        self.assertNoResult(d)
        self.assertEqual(self.origin.calls, [])
        self.clock.advance(0.001)
        self.assertEqual(self.served(d), {KID: (FROM_ORIGIN, SOURCE_ORIGIN)})

    def test_first_stage_answering_after_the_head_start_still_settles(self) -> None:
        """An origin answering after the head start, while the notary still hangs,
        settles the server at once: the first trusted answer counts, whatever its
        stage."""
        self.answers(self.origin, {KID: FROM_ORIGIN}, HEAD_START_S + 2)
        _, d = self.get_keys()
        self.clock.advance(HEAD_START_S)
        self.assertEqual(self.notary.calls, [[SERVER]])
        self.assertNoResult(d)
        self.clock.advance(2)
        self.assertEqual(self.served(d), {KID: (FROM_ORIGIN, SOURCE_ORIGIN)})
        self.assertEqual(self.elapsed(), HEAD_START_S + 2)

    def test_late_origin_answer_is_stored_in_the_background(self) -> None:
        """The origin's answer that comes after the notary settled the server (before
        the origin's timeout) is still judged and stored: its new key id is added."""
        self.answers(self.notary, {KID: FROM_ORIGIN}, 0)
        self.answers(self.origin, {KID: FROM_ORIGIN, KID2: FROM_NOTARY}, HEAD_START_S + 2)
        chain, d = self.get_keys()
        self.clock.advance(HEAD_START_S)
        self.assertEqual(list(self.served(d)), [KID])
        self.clock.advance(2)
        self.successResultOf(defer.ensureDeferred(chain.wait_for_background()))
        self.assertEqual(self.stored()[KID2], (FROM_NOTARY, SOURCE_ORIGIN))

    def test_unanswered_server_waits_for_the_hanging_origin(self) -> None:
        """When the notary has nothing either, the server is settled only when its
        origin, still asked, times out."""
        self.notary.delay_s = 0  # knows nothing
        _, d = self.get_keys()
        self.clock.advance(TIMEOUT_S - 0.001)
        self.assertNoResult(d)
        self.clock.advance(0.001)
        self.assertEqual(self.served(d), {})

    def test_origins_in_before_the_head_start_go_on_at_once(self) -> None:
        """An origin that fails at once sends its server to the notary at once: the
        head start only bounds the wait for origins still out."""
        self.origin.delay_s = 0  # knows nothing
        self.answers(self.notary, {KID: FROM_NOTARY}, 0)
        _, d = self.get_keys()
        self.assertEqual(self.served(d), {KID: (FROM_NOTARY, NOTARY_SOURCE)})

    def test_agreement_asks_every_source_at_once(self) -> None:
        """N=2 has no stages: origin and notary are asked at once, and two agreeing
        answers settle the server."""
        self.answers(self.origin, {KID: FROM_ORIGIN}, 1)
        self.answers(self.notary, {KID: FROM_ORIGIN}, 2)
        _, d = self.get_keys(n=2)
        self.assertEqual((self.origin.calls, self.notary.calls), ([[SERVER]], [[SERVER]]))
        self.clock.advance(2)
        self.assertEqual(list(self.served(d)), [KID])


class WiredHeadStartTests(SynchronousTestCase):
    """Through the notary's wiring: an origin and a trusted notary, one of them hanging."""

    def query_answered(self, order: Sequence[str]) -> None:
        """Ask about ``origin.test`` with the first source of ``order`` hanging and the
        other answering at once: the answer comes after about half the timeout."""
        notary_key, origin_key = new_signing_key("u1"), new_signing_key("o1")
        entry = make_signed_server_keys("origin.test", [origin_key], (START_S + 86400) * 1000)
        notary = FakeNotaryResource("notary.up", notary_key, {"origin.test": [entry]})
        origin = FakeOriginResource(origin_key, "origin.test", Clock())
        if order[0] == "origin":
            origins: dict[str, Resource] = {"origin.test": HangingResource(), "notary.up": notary}
        else:
            origins = {"origin.test": origin, "notary.up": HangingResource()}
        site = notary_with_origins(
            origins,
            {
                "trusted_key_servers": [trusted_notary("notary.up", notary_key)],
                "key_fetch_order": list(order),
            },
        )
        timeout_s = site.services.config.federation.request_timeout_ms / 1000
        start_s = site.reactor.seconds()
        response = site.request(b"GET", b"/_matrix/key/v2/query/origin.test")
        elapsed_s = site.reactor.seconds() - start_s
        self.assertEqual(
            verify_keys_by_server(server_keys(response)),
            {"origin.test": {key_id(origin_key): verify_key_base64(origin_key)}},
        )
        self.assertLess(elapsed_s, timeout_s)
        self.assertLessEqual(elapsed_s, timeout_s * HEAD_START_SHARE + 1)

    def test_query_about_a_hanging_origin_answered_by_the_notary(self) -> None:
        """Origin first: a query about a server whose origin hangs is answered with the
        trusted notary's copy of its keys before request_timeout."""
        self.query_answered(("origin", "notaries"))

    def test_query_with_a_hanging_notary_answered_by_the_origin(self) -> None:
        """Notaries first: with the trusted notary hanging, a query is answered with the
        origin's keys before request_timeout."""
        self.query_answered(("notaries", "origin"))
