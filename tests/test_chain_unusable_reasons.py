"""The chain's "no usable keys" line says why, for each way a server can be left
unanswered after a fetch: the key id asked for is not listed, the keys are expired or
valid until before the minimum (even though the origin answered), the answers were not
trusted, or no source answered."""

import logging
from typing import Optional

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.config import KeyTrustConfig
from keyring_module.fetchers.chain import KeyFetcherChain
from keyring_module.model import SOURCE_ORIGIN, KeyRequest, ServerKeysResponse
from keyring_module.storage.memory import InMemoryKeyStore
from tests.chain_fakes import ScriptedFetcher
from tests.storage_writer import make_response

NOW_MS = 1_700_000_000_000  # 2023-11-14T22:13:20Z
HOUR_MS = 3600 * 1000
SERVER = "origin.example"
KID = "ed25519:k"
KEY = b"\x0a" * 32
CHAIN_LOGGER = "keyring_module.fetchers.chain"


class UnusableReasonTests(SynchronousTestCase):
    """One fetch for one server, whose origin answers as each test says."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW_MS / 1000)
        self.store = InMemoryKeyStore()

    def chain(
        self,
        origin_answer: Optional[ServerKeysResponse],
        trust: Optional[KeyTrustConfig] = None,
    ) -> KeyFetcherChain:
        responses = {SERVER: origin_answer} if origin_answer is not None else {}
        origin = ScriptedFetcher(SOURCE_ORIGIN, self.clock, responses)
        return KeyFetcherChain(
            self.store, origin, None, self.clock, trust=trust or KeyTrustConfig(), timeout_ms=10_000
        )

    def unanswered_lines(self, chain: KeyFetcherChain, request: KeyRequest) -> list[str]:
        """The chain's INFO lines about unanswered servers during one ``get_keys``."""
        with self.assertLogs(CHAIN_LOGGER, logging.INFO) as logs:
            logging.getLogger(CHAIN_LOGGER).info("(start)")
            self.successResultOf(defer.ensureDeferred(chain.get_keys([request])))
        return [r.getMessage() for r in logs.records if "No usable keys" in r.getMessage()]

    def test_answer_fine_for_the_request_logs_nothing(self) -> None:
        """A successful origin fetch that meets the request is not followed by the line."""
        chain = self.chain(make_response(SERVER, NOW_MS + 24 * HOUR_MS, {KID: KEY}))
        self.assertEqual(self.unanswered_lines(chain, KeyRequest(SERVER, None, NOW_MS)), [])

    def test_expired_keys_from_a_live_origin(self) -> None:
        """An origin that answers with keys already expired (as SyTest's does): the line
        says the key expired, when, the minimum, and that the origin did answer."""
        chain = self.chain(make_response(SERVER, NOW_MS - HOUR_MS, {KID: KEY}))
        (line,) = self.unanswered_lines(chain, KeyRequest(SERVER, None, NOW_MS))
        self.assertIn("(1 expired)", line)
        self.assertIn(
            "origin.example: 'ed25519:k' expired at 2023-11-14T21:13:20Z"
            " (the minimum is 2023-11-14T22:13:20Z) (the origin answered)",
            line,
        )
        # The answer was stored all the same (served stale by a notary).
        stored = self.successResultOf(defer.ensureDeferred(self.store.get_server_keys(SERVER)))
        self.assertEqual(stored[KID].valid_until_ts, NOW_MS - HOUR_MS)

    def test_valid_but_before_the_minimum(self) -> None:
        """Keys valid now but not until the minimum asked for are named with both times."""
        chain = self.chain(make_response(SERVER, NOW_MS + HOUR_MS, {KID: KEY}))
        (line,) = self.unanswered_lines(chain, KeyRequest(SERVER, None, NOW_MS + 2 * HOUR_MS))
        self.assertIn("(1 below_minimum)", line)
        self.assertIn(
            "'ed25519:k' valid until 2023-11-14T23:13:20Z, before the minimum"
            " 2023-11-15T00:13:20Z (the origin answered)",
            line,
        )

    def test_key_id_not_listed(self) -> None:
        """A key id the origin does not list is named, with the ones it does list."""
        chain = self.chain(make_response(SERVER, NOW_MS + 24 * HOUR_MS, {KID: KEY}))
        request = KeyRequest(SERVER, frozenset({"ed25519:gone"}), NOW_MS)
        (line,) = self.unanswered_lines(chain, request)
        self.assertIn("(1 missing)", line)
        self.assertIn(
            "key 'ed25519:gone' not listed (known: 'ed25519:k') (the origin answered)", line
        )

    def test_answer_not_trusted(self) -> None:
        """With min_agreeing_sources 2 and only the origin, the line says the answer was
        not trusted and why."""
        chain = self.chain(
            make_response(SERVER, NOW_MS + 24 * HOUR_MS, {KID: KEY}),
            KeyTrustConfig(min_agreeing_sources=2),
        )
        (line,) = self.unanswered_lines(chain, KeyRequest(SERVER, None, NOW_MS))
        self.assertIn("(1 unknown)", line)
        self.assertIn(
            "no key known (not trusted: origin's answer: key ed25519:k has 1 of 2 agreeing"
            " sources)",
            line,
        )

    def test_no_source_answered(self) -> None:
        """When the origin gave nothing, its failure is named."""
        chain = self.chain(None)
        (line,) = self.unanswered_lines(chain, KeyRequest(SERVER, None, NOW_MS))
        self.assertIn("no key known (no source answered: origin not_in_answer ('not known'))", line)

    def test_counts_servers_by_reason(self) -> None:
        """Several unanswered servers are counted by kind; one is shown as the example."""
        store = self.store
        origin = ScriptedFetcher(
            SOURCE_ORIGIN,
            self.clock,
            {
                "a.example": make_response("a.example", NOW_MS - HOUR_MS, {KID: KEY}),
                "b.example": make_response("b.example", NOW_MS - HOUR_MS, {KID: KEY}),
            },
        )
        chain = KeyFetcherChain(store, origin, None, self.clock, timeout_ms=10_000)
        requests = [KeyRequest(n, None, NOW_MS) for n in ("a.example", "b.example", "c.example")]
        with self.assertLogs(CHAIN_LOGGER, logging.INFO) as logs:
            self.successResultOf(defer.ensureDeferred(chain.get_keys(requests)))
        (line,) = [r.getMessage() for r in logs.records if "No usable keys" in r.getMessage()]
        self.assertIn("No usable keys for 3 servers after the fetch (2 expired, 1 unknown)", line)
        self.assertIn("E.g. a.example: 'ed25519:k' expired at", line)
