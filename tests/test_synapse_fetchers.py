"""The homeserver's own key lookups through our keyring (``use_module_fetchers``).

* :meth:`Keyring.lookup_keys`, end to end on a ``Clock`` with fake origins;
* :class:`~keyring_module.synapse_fetcher.ModuleKeyFetcher`, with a fake lookup;
* the ``synapse_keyring`` config key, in both modes.

The adapter that puts the fetcher into Synapse is tested in ``test_synapse_adapter``;
real Synapse processes are in ``interop/test_synapse_fetchers.py``.
"""

import contextlib
import logging
from typing import Any, Iterator, Optional

import attr
from signedjson.key import get_verify_key
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.config import SynapseKeyringConfig, parse_config
from keyring_module.errors import ConfigError
from keyring_module.model import SOURCE_ORIGIN, StoredKey
from keyring_module.synapse_fetcher import ModuleKeyFetcher
from tests.test_keyring import DAY_MS, ORIGIN, OURS, KeyringTestCase
from tests.utils import key_id, new_signing_key, verify_key_bytes

# -- Keyring.lookup_keys --------------------------------------------------------------


class LookupKeysTests(KeyringTestCase):
    def lookup(self, server: str, ids: list[str], minimum: int) -> dict[str, StoredKey]:
        d = self.keyring.lookup_keys(server, ids, minimum)
        self.settle()
        result: dict[str, StoredKey] = self.successResultOf(d)
        return result

    def test_fetches_once_then_answers_from_the_store(self) -> None:
        """A key not stored is fetched from the origin; asked again, the store answers."""
        kid = key_id(self.origin_key)
        keys = self.lookup(ORIGIN, [kid], self.now_ms())
        self.assertEqual(keys[kid].verify_key_bytes, verify_key_bytes(self.origin_key))
        self.assertEqual(keys[kid].source, SOURCE_ORIGIN)
        self.assertEqual(self.origin_gets(), 1)
        again: dict[str, StoredKey] = self.successResultOf(
            self.keyring.lookup_keys(ORIGIN, [kid], self.now_ms())
        )
        self.assertEqual(set(again), {kid})  # fired at once: no fetch
        self.assertEqual(self.origin_gets(), 1)

    def test_a_minimum_beyond_the_stored_copy_fetches_again(self) -> None:
        """A stored key valid until before the minimum is refreshed through the chain."""
        kid = key_id(self.origin_key)
        self.lookup(ORIGIN, [kid], self.now_ms())
        self.clock.advance(DAY_MS / 1000 / 2)
        keys = self.lookup(ORIGIN, [kid], self.now_ms() + DAY_MS)
        self.assertEqual(self.origin_gets(), 2)
        self.assertGreaterEqual(keys[kid].valid_until_ts, self.now_ms() + DAY_MS)

    def test_a_failed_fetch_still_returns_the_stored_key(self) -> None:
        """When the refresh fails, the stale stored key is returned (good for older signatures)."""
        kid = key_id(self.origin_key)
        first = self.lookup(ORIGIN, [kid], self.now_ms())[kid]
        self.origin.code = 500
        keys = self.lookup(ORIGIN, [kid], first.valid_until_ts + 1)
        self.assertEqual(keys, {kid: first})
        self.assertEqual(self.origin_gets(), 2)

    def test_a_fetch_past_the_deadline_returns_the_stored_key(self) -> None:
        """An origin that hangs past the keyring's fetch deadline: the stored key is returned."""
        self.build(timeouts=False, fetch_timeout_ms=5_000)
        kid = key_id(self.origin_key)
        first = self.lookup(ORIGIN, [kid], self.now_ms())[kid]
        self.origin.hold = True
        d = self.keyring.lookup_keys(ORIGIN, [kid], first.valid_until_ts + 1)
        self.settle()
        self.assertNoResult(d)
        self.clock.advance(5)
        self.assertEqual(self.successResultOf(d), {kid: first})
        self.origin.release()
        self.settle()

    def test_only_the_wanted_ids_and_never_compromised_keys(self) -> None:
        """Unknown ids are left out; a key listed as compromised is never returned."""
        kid = key_id(self.origin_key)
        self.assertEqual(set(self.lookup(ORIGIN, [kid, "ed25519:nope"], 0)), {kid})
        self.build(compromised=frozenset({verify_key_bytes(self.origin_key)}))
        self.assertEqual(self.lookup(ORIGIN, [kid], 0), {})
        self.assertEqual(self.origin_gets(), 1)  # fetched (it might have been re-keyed)

    def test_own_keys_and_no_ids_need_no_store_or_fetch(self) -> None:
        """Our own keys come from memory; no key ids means an empty answer."""
        own = self.lookup(OURS, [key_id(self.own_key), key_id(self.own_old_key)], 0)
        self.assertEqual(own[key_id(self.own_old_key)].expired_ts, self.own_old_expired_ts)
        self.assertEqual(self.successResultOf(self.keyring.lookup_keys(ORIGIN, [], 0)), {})
        self.assertEqual(self.chain.calls, [])


# -- ModuleKeyFetcher -----------------------------------------------------------------


@attr.s(auto_attribs=True, frozen=True, slots=True)
class FakeFetchKeyResult:
    """Synapse's FetchKeyResult, as far as the fetcher knows it."""

    verify_key: Any
    valid_until_ts: int


def stored(signing_key: Any, valid_until_ts: int, expired_ts: Optional[int] = None) -> StoredKey:
    return StoredKey(
        ORIGIN,
        key_id(signing_key),
        verify_key_bytes(signing_key),
        valid_until_ts,
        expired_ts,
        0,
        SOURCE_ORIGIN,
        "r",
    )


class ModuleKeyFetcherTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.counts: list[str] = []
        self.calls: list[tuple[str, list[str], int]] = []
        self.answer: "defer.Deferred[dict[str, StoredKey]]" = defer.succeed({})
        self.events: list[str] = []

        def lookup(server: str, ids: Any, minimum: int) -> "defer.Deferred[dict[str, StoredKey]]":
            self.events.append("lookup")
            self.calls.append((server, list(ids), minimum))
            return self.answer

        @contextlib.contextmanager
        def detached() -> Iterator[None]:
            self.events.append("detach")
            yield
            self.events.append("reattach")

        def yieldable(d: "defer.Deferred[Any]") -> "defer.Deferred[Any]":
            self.events.append("yieldable")
            return d

        self.fetcher = ModuleKeyFetcher(
            lookup,
            FakeFetchKeyResult,
            self.counts.append,
            self.clock,
            yieldable=yieldable,
            detached=detached,
        )

    def get_keys(self, ids: list[str], minimum: int) -> Any:
        return defer.ensureDeferred(self.fetcher.get_keys(ORIGIN, ids, minimum))

    def test_found_keys_become_fetch_key_results(self) -> None:
        """Each key comes back as FetchKeyResult(VerifyKey, valid_until_ts); old keys with expired_ts."""
        current, old = new_signing_key("c1"), new_signing_key("o1")
        self.answer = defer.succeed(
            {key_id(current): stored(current, 5000), key_id(old): stored(old, 900, 800)}
        )
        results = self.successResultOf(self.get_keys([key_id(current), key_id(old)], 700))
        self.assertEqual(self.calls, [(ORIGIN, [key_id(current), key_id(old)], 700)])
        self.assertEqual(
            results,
            {
                key_id(current): FakeFetchKeyResult(get_verify_key(current), 5000),
                key_id(old): FakeFetchKeyResult(get_verify_key(old), 800),
            },
        )
        vk = results[key_id(current)].verify_key
        self.assertEqual((vk.alg, vk.version), ("ed25519", "c1"))
        self.assertEqual(self.counts, ["found"])

    def test_result_labels(self) -> None:
        """found: all valid until the minimum; stale: some missing or short; not_found: none."""
        key = new_signing_key("c1")
        self.answer = defer.succeed({key_id(key): stored(key, 5000)})
        self.successResultOf(self.get_keys([key_id(key)], 6000))
        self.successResultOf(self.get_keys([key_id(key), "ed25519:other"], 10))
        self.answer = defer.succeed({})
        self.assertEqual(self.successResultOf(self.get_keys(["ed25519:x"], 0)), {})
        self.assertEqual(self.counts, ["stale", "stale", "not_found"])

    def test_a_failed_lookup_answers_nothing_and_is_counted(self) -> None:
        """A failing lookup gives {} (as Synapse's fetchers do), counted as error and logged."""
        self.answer = defer.fail(RuntimeError("store down"))
        with self.assertLogs("keyring_module.synapse_fetcher", logging.WARNING) as logs:
            self.assertEqual(self.successResultOf(self.get_keys(["ed25519:x"], 0)), {})
        self.assertEqual(self.counts, ["error"])
        self.assertIn("store down", "\n".join(logs.output))

    def test_a_key_signedjson_cannot_decode_is_skipped(self) -> None:
        """A stored key of another algorithm is left out (Synapse could not use it)."""
        odd = attr.evolve(stored(new_signing_key("c1"), 5000), key_id="curve99:x")
        self.answer = defer.succeed({"curve99:x": odd})
        self.assertEqual(self.successResultOf(self.get_keys(["curve99:x"], 0)), {})
        self.assertEqual(self.counts, ["not_found"])

    def test_waits_for_the_lookup_started_detached_and_awaited_yieldable(self) -> None:
        """The lookup starts inside the detached context, and only its yieldable form is awaited."""
        key = new_signing_key("c1")
        self.answer = defer.Deferred()
        d = self.get_keys([key_id(key)], 0)
        self.assertNoResult(d)
        self.assertEqual(self.events, ["detach", "lookup", "reattach", "yieldable"])
        self.answer.callback({key_id(key): stored(key, 5000)})
        self.assertEqual(set(self.successResultOf(d)), {key_id(key)})

    def test_shutdown_is_harmless(self) -> None:
        """Synapse calls shutdown() on its fetchers when its keyring stops; ours has nothing to stop."""
        self.fetcher.shutdown()
        self.successResultOf(self.get_keys(["ed25519:x"], 0))


# -- config -------------------------------------------------------------------------------


class SynapseKeyringConfigTests(SynchronousTestCase):
    def test_module_option(self) -> None:
        """Off by default; synapse_keyring.use_module_fetchers: true turns it on."""
        default = parse_config({"signing_key_path": "k"}, standalone=False)
        self.assertEqual(default.synapse_keyring, SynapseKeyringConfig(use_module_fetchers=False))
        on = parse_config(
            {"signing_key_path": "k", "synapse_keyring": {"use_module_fetchers": True}},
            standalone=False,
        )
        self.assertTrue(on.synapse_keyring.use_module_fetchers)
        empty = parse_config({"signing_key_path": "k", "synapse_keyring": None}, standalone=False)
        self.assertFalse(empty.synapse_keyring.use_module_fetchers)

    def test_bad_values(self) -> None:
        """A non-boolean, an unknown key or a non-mapping is refused, naming the key."""
        for block, message in [
            ({"use_module_fetchers": "yes"}, "synapse_keyring.use_module_fetchers: "),
            ({"use_module_fetcher": True}, "synapse_keyring.use_module_fetcher: unknown setting"),
            ([True], "synapse_keyring: "),
        ]:
            with self.assertRaisesRegex(ConfigError, message):
                parse_config({"signing_key_path": "k", "synapse_keyring": block}, standalone=False)

    def test_standalone_refuses_it(self) -> None:
        """A standalone config has no homeserver keyring to change: the key is refused."""
        raw = {
            "server_name": "a.test",
            "signing_key_path": "k",
            "listeners": [{"port": 8448}],
            "synapse_keyring": {"use_module_fetchers": True},
        }
        with self.assertRaisesRegex(ConfigError, "synapse_keyring: not allowed here"):
            parse_config(raw)
