"""``use_module_fetchers`` safety: what the switch refuses, and its start and end.

* the adapter refuses to switch when homeserver.yaml restricts outbound federation in
  ways our fetches could not follow, and says which settings come from the module;
* our fetcher is in place as soon as the module is loaded; lookups made before our
  store is open wait for it, and fall back to Synapse's own fetchers when it is late or
  failed to open;
* at shutdown Synapse's own fetchers are put back before our store closes;
* current keys are returned valid until at most now + 7 days.

Fake Synapse parts only (see ``test_synapse_adapter``); no Synapse is needed.
"""

import logging
from typing import Any, Optional
from unittest import mock

from prometheus_client import CollectorRegistry
from signedjson.key import get_verify_key
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.metrics import Metrics
from keyring_module.storage.errors import StorageError
from keyring_module.synapse_adapter import InstalledFetcher, install_module_fetcher
from keyring_module.synapse_fetcher import DELEGATED, ModuleKeyFetcher
from keyring_module.verify import MAX_KEY_VALIDITY_MS
from keyring_module.wiring import KeyringServices
from tests.test_keyring import ORIGIN
from tests.test_synapse_adapter import (
    FakeHomeserver,
    FakeModuleApi,
    FakePerspectivesKeyFetcher,
    FakeRestrictedTo,
    FakeServerKeyFetcher,
    FakeStoreKeyFetcher,
    FakeSynapseKeyring,
    ModuleOptionHarness,
    fake_parts,
)
from tests.test_synapse_fetchers import FakeFetchKeyResult, stored
from tests.utils import key_id, new_signing_key


class AnsweringFetcher(FakeServerKeyFetcher):
    """One of Synapse's fetchers, answering from a table and recording what it is asked."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, list[str], int]] = []

    async def get_keys(
        self, server_name: str, key_ids: list[str], minimum_valid_until_ts: int
    ) -> dict[str, Any]:
        self.asked.append((server_name, list(key_ids), minimum_valid_until_ts))
        return {k: v for k, v in self.answers.items() if k in key_ids}


class FederationSettingsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.originals: list[Any] = [FakeStoreKeyFetcher(), FakeServerKeyFetcher()]
        self.synapse_keyring = FakeSynapseKeyring(self.originals)
        self.homeserver = FakeHomeserver(self.synapse_keyring)

    def install(self) -> Optional[InstalledFetcher]:
        return install_module_fetcher(
            FakeModuleApi(self.homeserver),
            None,
            Metrics(CollectorRegistry()),
            Clock(),
            load=fake_parts,
            trusted_key_servers=["notary.example.org"],
        )

    def assert_refused(self, why: str) -> None:
        with self.assertLogs("keyring_module", logging.DEBUG) as logs:
            self.assertIsNone(self.install())
        self.assertEqual([r.levelname for r in logs.records], ["ERROR"])
        self.assertIn(why, logs.records[0].getMessage())
        self.assertIn("the homeserver keeps its own key fetchers", logs.records[0].getMessage())
        self.assertIs(self.synapse_keyring._key_fetchers, self.originals)

    def test_a_federation_domain_whitelist_is_refused(self) -> None:
        """With federation_domain_whitelist set (even to no domain), nothing is switched."""
        for whitelist in ({"a.example": True}, {}):
            self.homeserver.config.federation.federation_domain_whitelist = whitelist
            self.assert_refused(
                "has federation_domain_whitelist set in homeserver.yaml, which "
                "keyring_module's key fetches would not follow"
            )

    def test_outbound_federation_restricted_to_is_refused(self) -> None:
        """With outbound federation restricted to some workers, nothing is switched."""
        restricted = FakeRestrictedTo(["federation_sender1"])
        self.homeserver.config.worker.outbound_federation_restricted_to = restricted
        self.assert_refused("has outbound_federation_restricted_to set in homeserver.yaml")

    def test_settings_that_cannot_be_read_are_refused(self) -> None:
        """A config without those settings (another Synapse) is not switched either."""
        del self.homeserver.config.worker.outbound_federation_restricted_to
        self.assert_refused("has no config.worker.outbound_federation_restricted_to")
        self.homeserver.config = None  # type: ignore[assignment]
        self.assert_refused("has no config.federation.federation_domain_whitelist")

    def test_the_switch_names_the_settings_from_the_module(self) -> None:
        """The INFO line says key fetches follow the module's federation settings and
        notaries, not homeserver.yaml's."""
        with self.assertLogs("keyring_module.synapse_adapter", logging.INFO) as logs:
            self.assertIsNotNone(self.install())
        message = logs.records[0].getMessage()
        self.assertIn("not homeserver.yaml", message)
        self.assertIn("federation.ip_range_denylist/ip_range_allowlist", message)
        self.assertIn("federation.verify_tls/ca_file", message)
        self.assertIn("trusted_key_servers (notary.example.org)", message)


class BeforeTheStoreTests(SynchronousTestCase):
    """The fetcher installed with no lookup yet (our store still opening)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.key = new_signing_key("o1")
        self.kid = key_id(self.key)
        self.synapse_answer = FakeFetchKeyResult(get_verify_key(self.key), 123)
        self.synapse_store = AnsweringFetcher({})
        self.synapse_origin = AnsweringFetcher({self.kid: self.synapse_answer})
        self.counts: list[str] = []
        self.fetcher = ModuleKeyFetcher(
            None,
            FakeFetchKeyResult,
            self.counts.append,
            self.clock,
            fallback=[self.synapse_store, self.synapse_origin],
            wait_s=60,
        )

    def get(self) -> "defer.Deferred[dict[str, Any]]":
        return defer.ensureDeferred(self.fetcher.get_keys(ORIGIN, [self.kid], 0))

    def lookup(self, server: str, ids: Any, minimum: int) -> "defer.Deferred[dict[str, Any]]":
        return defer.succeed({self.kid: stored(self.key, 5000)})

    def test_a_lookup_waits_for_the_store_then_uses_it(self) -> None:
        """A lookup made before the store is open waits, and is answered by our keyring."""
        d = self.get()
        self.assertNoResult(d)
        self.fetcher.use(self.lookup)
        found = self.successResultOf(d)
        self.assertEqual(found[self.kid].valid_until_ts, 5000)
        self.assertEqual(self.synapse_origin.asked, [])
        self.assertEqual(self.counts, ["found"])

    def test_a_store_late_past_the_wait_lets_synapse_answer(self) -> None:
        """After wait_s, that lookup and later ones are answered by Synapse's fetchers,
        in their order, until the store is ready."""
        d = self.get()
        self.clock.advance(59)
        self.assertNoResult(d)
        with self.assertLogs("keyring_module.synapse_fetcher", logging.WARNING):
            self.clock.advance(1)
        self.assertEqual(self.successResultOf(d), {self.kid: self.synapse_answer})
        self.assertEqual(len(self.synapse_store.asked), 1)
        self.assertEqual(self.synapse_origin.asked, [(ORIGIN, [self.kid], 0)])
        self.assertEqual(self.counts, [DELEGATED])
        # The store is late: later lookups do not wait again.
        self.assertEqual(self.successResultOf(self.get()), {self.kid: self.synapse_answer})
        self.assertEqual(self.counts, [DELEGATED, DELEGATED])
        self.fetcher.use(self.lookup)  # once it is ready, lookups are ours again
        self.assertEqual(self.successResultOf(self.get())[self.kid].valid_until_ts, 5000)

    def test_synapse_store_answering_stops_the_delegation(self) -> None:
        """A key Synapse's store holds valid until the minimum is not asked further."""
        self.synapse_store.answers = {self.kid: self.synapse_answer}
        self.fetcher.give_up()
        self.assertEqual(self.successResultOf(self.get()), {self.kid: self.synapse_answer})
        self.assertEqual(self.synapse_origin.asked, [])

    def test_giving_up_hands_waiting_and_later_lookups_to_synapse(self) -> None:
        """When the store will not open, waiting lookups and later ones go to Synapse's."""
        d = self.get()
        self.fetcher.give_up()
        self.assertEqual(self.successResultOf(d), {self.kid: self.synapse_answer})
        self.assertEqual(self.successResultOf(self.get()), {self.kid: self.synapse_answer})
        self.assertEqual(self.counts, [DELEGATED, DELEGATED])


class SevenDayCapTests(SynchronousTestCase):
    def test_current_keys_are_capped_old_keys_keep_expired_ts(self) -> None:
        """A current key valid for 30 days is returned valid until now + 7 days; an old
        key keeps its expired_ts."""
        clock = Clock()
        clock.advance(1_700_000_000)
        now = 1_700_000_000_000
        current, old = new_signing_key("c"), new_signing_key("o")
        keys = {
            key_id(current): stored(current, now + 30 * 86_400_000),
            key_id(old): stored(old, now + 30 * 86_400_000, expired_ts=now - 5),
        }
        fetcher = ModuleKeyFetcher(
            lambda s, i, m: defer.succeed(keys), FakeFetchKeyResult, lambda r: None, clock
        )
        found = self.successResultOf(
            defer.ensureDeferred(fetcher.get_keys(ORIGIN, list(keys), now))
        )
        self.assertEqual(found[key_id(current)].valid_until_ts, now + MAX_KEY_VALIDITY_MS)
        self.assertEqual(found[key_id(old)].valid_until_ts, now - 5)


class ModuleLifecycleTests(ModuleOptionHarness):
    """The module with a fake synapse (as in ``ModuleOptionTests``)."""

    async def test_installed_when_loaded_before_the_store_is_open(self) -> None:
        """Right after loading, our fetcher is in place; a lookup then waits for the store."""
        module = self.make_module(True)
        (ours,) = self.synapse_keyring._key_fetchers
        self.assertIsInstance(ours, ModuleKeyFetcher)
        self.assertFalse(module.ready.called)
        kid = key_id(self.key)
        waiting = defer.ensureDeferred(ours.get_keys("hs.example.org", [kid], 0))
        self.assertNoResult(waiting)
        await module.ready
        found = await waiting
        self.assertEqual(found[kid].verify_key, get_verify_key(self.key))

    async def test_shutdown_puts_synapse_fetchers_back_before_closing(self) -> None:
        """At shutdown Synapse's own list is back (the same object) before our store
        closes, and a lookup still reaching our fetcher is answered by Synapse's."""
        module = self.make_module(True)
        await module.ready
        (ours,) = self.synapse_keyring._key_fetchers
        seen: list[Any] = []
        real_close = KeyringServices.close

        async def close(services: KeyringServices) -> None:
            seen.append(self.synapse_keyring._key_fetchers)
            await real_close(services)

        with mock.patch.object(KeyringServices, "close", close):
            await module._close()
        self.assertEqual(len(seen), 1)
        self.assertIs(seen[0], self.fetchers)
        answer = FakeFetchKeyResult("synapse's key", 10)

        async def synapse_answers(*args: Any) -> dict[str, Any]:
            return {"ed25519:x": answer}

        with mock.patch.object(self.fetchers[-1], "get_keys", synapse_answers):
            found = await ours.get_keys(ORIGIN, ["ed25519:x"], 0)
        self.assertEqual(found, {"ed25519:x": answer})

    async def test_a_store_that_fails_to_open_gives_synapse_its_fetchers_back(self) -> None:
        """If the store cannot open, Synapse's own list is back and the ERROR says the
        option is not in effect."""

        async def fail(*args: Any, **kwargs: Any) -> Any:
            raise StorageError("disk on fire")

        with mock.patch("keyring_module.module.KeyringServices.create", fail):
            with self.assertLogs("keyring_module.module", logging.ERROR) as logs:
                module = self.make_module(True)
                with self.assertRaises(StorageError):
                    await module.ready
        self.assertIs(self.synapse_keyring._key_fetchers, self.fetchers)
        message = logs.records[-1].getMessage()
        self.assertIn("synapse_keyring.use_module_fetchers is not in effect", message)
        self.assertIn("Synapse's own key fetchers", message)
        self.assertIn("disk on fire", message)

    def test_restore_leaves_a_list_someone_else_replaced(self) -> None:
        """restore() puts Synapse's list back only if ours is still in place."""
        originals: list[Any] = [FakeStoreKeyFetcher(), FakePerspectivesKeyFetcher()]
        synapse_keyring = FakeSynapseKeyring(originals)
        theirs: list[Any] = []
        installed = InstalledFetcher(mock.Mock(), synapse_keyring, originals, [object()])
        synapse_keyring._key_fetchers = theirs
        self.assertFalse(installed.restore())
        self.assertIs(synapse_keyring._key_fetchers, theirs)
