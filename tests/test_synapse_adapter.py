"""The adapter that puts our fetcher into Synapse's keyring, against fake Synapse parts.

It swaps the fetcher list whole when everything looks as tested, and otherwise logs one
ERROR naming the Synapse version and leaves the list untouched (the same object, the
same fetchers). The module is driven with a fake ``synapse`` package in ``sys.modules``
(or none importable). No Synapse is needed; real Synapse processes are in
``interop/test_synapse_fetchers.py``.
"""

import contextlib
import logging
import os
import re
import subprocess
import sys
from typing import Any, Optional
from unittest import mock

import attr
from prometheus_client import REGISTRY, CollectorRegistry
from signedjson.key import get_verify_key, write_signing_keys
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from keyring_module import KeyringModule
from keyring_module.metrics import Metrics
from keyring_module.model import StoredKey
from keyring_module.synapse_adapter import (
    TESTED_SYNAPSE_VERSIONS,
    InstalledFetcher,
    SynapseParts,
    install_module_fetcher,
    is_tested_version,
    load_synapse_parts,
)
from keyring_module.synapse_fetcher import ModuleKeyFetcher
from tests.test_keyring import ORIGIN
from tests.test_synapse_fetchers import FakeFetchKeyResult, stored
from tests.utils import key_id, new_signing_key

TESTED = TESTED_SYNAPSE_VERSIONS[0] + ".2"


# -- the adapter, with fake Synapse parts ------------------------------------------------


class FakeStoreKeyFetcher:
    async def get_keys(
        self, server_name: str, key_ids: list[str], minimum_valid_until_ts: int
    ) -> dict[str, Any]:
        return {}

    def shutdown(self) -> None:
        pass


class FakePerspectivesKeyFetcher(FakeStoreKeyFetcher):
    pass


class FakeServerKeyFetcher(FakeStoreKeyFetcher):
    pass


class FakeSynapseKeyring:
    def __init__(self, fetchers: list[Any]) -> None:
        self._key_fetchers = fetchers

    async def _inner_fetch_key_request(self, request: Any) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for fetcher in self._key_fetchers:
            found.update(
                await fetcher.get_keys(request.server_name, request.key_ids, request.minimum)
            )
        return found


@attr.s(auto_attribs=True)
class FakeRequest:
    server_name: str
    key_ids: list[str]
    minimum: int


@attr.s(auto_attribs=True)
class FakeRestrictedTo:
    instances: Optional[list[str]] = None


@attr.s(auto_attribs=True)
class FakeFederationConfig:
    federation_domain_whitelist: Optional[dict[str, bool]] = None
    client_timeout_ms: int = 60_000


@attr.s(auto_attribs=True)
class FakeWorkerConfig:
    outbound_federation_restricted_to: FakeRestrictedTo = attr.Factory(FakeRestrictedTo)


@attr.s(auto_attribs=True)
class FakeHomeserverConfig:
    """The parts of Synapse's HomeServerConfig the adapter reads."""

    federation: FakeFederationConfig = attr.Factory(FakeFederationConfig)
    worker: FakeWorkerConfig = attr.Factory(FakeWorkerConfig)


@attr.s(auto_attribs=True)
class FakeHomeserver:
    keyring: Any
    config: FakeHomeserverConfig = attr.Factory(FakeHomeserverConfig)

    def get_keyring(self) -> Any:
        return self.keyring


@attr.s(auto_attribs=True)
class FakeModuleApi:
    _hs: Any


def fake_parts(version: str = TESTED, **changes: Any) -> SynapseParts:
    parts = SynapseParts(
        version=version,
        keyring_class=FakeSynapseKeyring,
        store_fetcher=FakeStoreKeyFetcher,
        perspectives_fetcher=FakePerspectivesKeyFetcher,
        server_fetcher=FakeServerKeyFetcher,
        fetch_key_result=FakeFetchKeyResult,
        make_deferred_yieldable=lambda d: d,
        preserve_logging_context=contextlib.nullcontext,
    )
    return attr.evolve(parts, **changes)


class FakeKeyring:
    """Our keyring's lookup_keys, answering from a table."""

    def __init__(self, keys: dict[str, StoredKey]) -> None:
        self.keys = keys

    def lookup_keys(
        self, server_name: str, key_ids: Any, minimum: int
    ) -> "defer.Deferred[dict[str, StoredKey]]":
        return defer.succeed({k: v for k, v in self.keys.items() if k in key_ids})


class AdapterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.origin_key = new_signing_key("o1")
        self.originals: list[Any] = [
            FakeStoreKeyFetcher(),
            FakePerspectivesKeyFetcher(),
            FakeServerKeyFetcher(),
        ]
        self.fetchers: list[Any] = list(self.originals)
        self.synapse_keyring = FakeSynapseKeyring(self.fetchers)
        self.api = FakeModuleApi(FakeHomeserver(self.synapse_keyring))
        self.metrics = Metrics(CollectorRegistry())
        self.ours = FakeKeyring({key_id(self.origin_key): stored(self.origin_key, 5000)})

    def install(self, parts: SynapseParts, api: Any = None) -> Optional[InstalledFetcher]:
        return install_module_fetcher(
            self.api if api is None else api,
            self.ours,  # type: ignore[arg-type]
            self.metrics,
            Clock(),
            load=lambda: parts,
        )

    def assert_refused(self, parts: SynapseParts, why: str, api: Any = None) -> None:
        """One ERROR naming the version and ``why``; the same list, the same fetchers."""
        with self.assertLogs("keyring_module", logging.DEBUG) as logs:
            self.assertFalse(self.install(parts, api))
        self.assertEqual([r.levelname for r in logs.records], ["ERROR"])
        message = logs.records[0].getMessage()
        self.assertIn("Synapse %s" % (parts.version,), message)
        self.assertIn(why, message)
        self.assertIn("keeps its own key fetchers", message)
        self.assertIs(self.synapse_keyring._key_fetchers, self.fetchers)
        self.assertEqual(self.fetchers, self.originals)

    def requests_counted(self, result: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "keyring_synapse_key_requests_total", {"result": result}
        )
        return 0.0 if value is None else value

    def test_swaps_the_whole_list_for_one_fetcher_of_ours(self) -> None:
        """A tested Synapse's list is replaced by a new list holding only our fetcher, which answers with FetchKeyResult."""
        with self.assertLogs("keyring_module.synapse_adapter", logging.INFO) as logs:
            self.assertTrue(self.install(fake_parts()))
        new = self.synapse_keyring._key_fetchers
        self.assertIsNot(new, self.fetchers)
        self.assertEqual(self.fetchers, self.originals)  # the old list itself is not changed
        self.assertEqual([type(f) for f in new], [ModuleKeyFetcher])
        self.assertIn("FakeStoreKeyFetcher, FakePerspectivesKeyFetcher", logs.output[0])

        kid = key_id(self.origin_key)
        request = FakeRequest(ORIGIN, [kid], 100)
        found = self.successResultOf(
            defer.ensureDeferred(self.synapse_keyring._inner_fetch_key_request(request))
        )
        self.assertEqual(found, {kid: FakeFetchKeyResult(get_verify_key(self.origin_key), 5000)})
        self.assertEqual(self.requests_counted("found"), 1)

    def test_a_list_without_perspectives_is_swapped_too(self) -> None:
        """Synapse builds no perspectives fetcher without trusted_key_servers: [store, server] is expected too."""
        del self.fetchers[1]
        self.assertTrue(self.install(fake_parts()))
        self.assertEqual([type(f) for f in self.synapse_keyring._key_fetchers], [ModuleKeyFetcher])

    def test_an_untested_version_is_left_alone(self) -> None:
        """Another Synapse release: one ERROR naming it and the tested ones; nothing changed."""
        self.assert_refused(
            fake_parts("1.164.0"),
            "Synapse 1.164.0 is not a tested version: the homeserver keeps its own key "
            "fetchers (tested with Synapse 1.163)",
        )
        self.assert_refused(fake_parts("garbage"), "is not a tested version")

    def test_a_missing_fetcher_list_is_left_alone(self) -> None:
        """A keyring without _key_fetchers (renamed): one ERROR, nothing set on it."""
        del self.synapse_keyring._key_fetchers
        with self.assertLogs("keyring_module", logging.DEBUG) as logs:
            self.assertFalse(self.install(fake_parts()))
        self.assertEqual([r.levelname for r in logs.records], ["ERROR"])
        self.assertIn("has no _key_fetchers list", logs.output[0])
        self.assertFalse(hasattr(self.synapse_keyring, "_key_fetchers"))

    def test_a_tuple_of_fetchers_is_left_alone(self) -> None:
        """A fetcher collection that is not a list is a different Synapse."""
        self.fetchers = self.synapse_keyring._key_fetchers = tuple(self.originals)  # type: ignore[assignment]
        self.originals = tuple(self.originals)  # type: ignore[assignment]
        self.assert_refused(fake_parts(), "has no _key_fetchers list")

    def test_a_different_get_keys_signature_is_left_alone(self) -> None:
        """A fetcher whose get_keys takes other parameters, or is not async: one ERROR, untouched."""

        class Renamed(FakeServerKeyFetcher):
            async def get_keys(  # type: ignore[override]
                self, server_name: str, key_ids: list[str], minimum_ts: int
            ) -> dict[str, Any]:
                return {}

        class NotAsync(FakeServerKeyFetcher):
            def get_keys(  # type: ignore[override]
                self, server_name: str, key_ids: list[str], minimum_valid_until_ts: int
            ) -> dict[str, Any]:
                return {}

        self.fetchers[2] = self.originals[2] = Renamed()
        self.assert_refused(
            fake_parts(server_fetcher=Renamed),
            "Renamed.get_keys takes (server_name, key_ids, minimum_ts), not "
            "(server_name, key_ids, minimum_valid_until_ts)",
        )
        self.fetchers[2] = self.originals[2] = NotAsync()
        self.assert_refused(fake_parts(server_fetcher=NotAsync), "NotAsync.get_keys is not async")

    def test_unexpected_fetchers_are_left_alone(self) -> None:
        """A list already changed (another module, or ours installed twice) is not touched."""
        self.fetchers.insert(1, object())
        self.originals.insert(1, self.fetchers[1])
        self.assert_refused(
            fake_parts(),
            "fetchers are [FakeStoreKeyFetcher, object, FakePerspectivesKeyFetcher, "
            "FakeServerKeyFetcher], not Synapse's own",
        )

    def test_another_keyring_class_or_result_type_is_left_alone(self) -> None:
        """A keyring of another class, or a FetchKeyResult with other fields: one ERROR each."""

        class OtherKeyring:
            pass

        self.assert_refused(fake_parts(keyring_class=OtherKeyring), "not Synapse's Keyring")

        @attr.s(auto_attribs=True)
        class OtherResult:
            key: Any
            valid_until_ts: int

        self.assert_refused(
            fake_parts(fetch_key_result=OtherResult),
            "FetchKeyResult does not take (verify_key, valid_until_ts)",
        )

    def test_no_homeserver_is_left_alone(self) -> None:
        """A ModuleApi without the homeserver: one ERROR."""
        self.assert_refused(fake_parts(), "no homeserver with get_keyring()", api=object())

    def test_a_failing_check_is_left_alone(self) -> None:
        """An unexpected error while checking (get_keyring raising) is one ERROR, never a crash."""

        class Broken:
            config = FakeHomeserverConfig()

            def get_keyring(self) -> Any:
                raise RuntimeError("not set up")

        self.assert_refused(fake_parts(), "could not be checked", api=FakeModuleApi(Broken()))


def patch_modules(test: SynchronousTestCase, modules: dict[str, Any]) -> None:
    """Make ``modules`` importable (None: not importable) for the test's duration."""
    patcher = mock.patch.dict(sys.modules, modules)
    patcher.start()
    test.addCleanup(patcher.stop)


class LoadSynapseTests(SynchronousTestCase):
    def test_no_synapse_is_one_error(self) -> None:
        """Without an importable synapse, installing logs one ERROR (version unknown) and returns False."""
        patch_modules(self, {"synapse": None})
        with self.assertLogs("keyring_module", logging.DEBUG) as logs:
            installed = install_module_fetcher(
                FakeModuleApi(FakeHomeserver(FakeSynapseKeyring([]))),
                FakeKeyring({}),  # type: ignore[arg-type]
                Metrics(CollectorRegistry()),
                Clock(),
            )
        self.assertFalse(installed)
        self.assertEqual([r.levelname for r in logs.records], ["ERROR"])
        self.assertIn("Synapse unknown cannot import", logs.records[0].getMessage())

    def test_load_names_what_is_missing(self) -> None:
        """A synapse package without the keyring module fails to load with a clear reason."""
        fake = type(sys)("synapse")
        fake.__version__ = "9.9.9"  # type: ignore[attr-defined]
        fake.__path__ = []  # type: ignore[attr-defined]
        patch_modules(self, {"synapse": fake})
        with self.assertRaisesRegex(Exception, "cannot import"):
            load_synapse_parts()

    def test_tested_versions(self) -> None:
        """major.minor decides; whatever follows the version is ignored."""
        self.assertTrue(is_tested_version("1.163.0"))
        self.assertTrue(is_tested_version("1.163.2 (b=main,63cd9ea)"))
        self.assertFalse(is_tested_version("1.16"))
        self.assertFalse(is_tested_version("1.1630.0"))
        self.assertFalse(is_tested_version("unknown"))


# -- the module, with a fake synapse package ---------------------------------------------


@attr.s(auto_attribs=True)
class RecordingHomeserver:
    """The homeserver as the module sees it: the reactor and the keyring."""

    keyring: Any
    keyring_asked: int = 0
    config: FakeHomeserverConfig = attr.Factory(FakeHomeserverConfig)

    def get_reactor(self) -> Any:
        return reactor

    def get_keyring(self) -> Any:
        self.keyring_asked += 1
        return self.keyring


@attr.s(auto_attribs=True)
class RecordingModuleApi:
    server_name: str
    _hs: RecordingHomeserver
    resources: dict[str, Any] = attr.ib(factory=dict)

    def register_web_resource(self, path: str, resource: Any) -> None:
        self.resources[path] = resource


def fake_synapse_modules(version: str) -> dict[str, Any]:
    """``sys.modules`` entries for a fake Synapse with the names the adapter imports."""
    modules: dict[str, Any] = {}
    for name in [
        "synapse",
        "synapse.crypto",
        "synapse.crypto.keyring",
        "synapse.logging",
        "synapse.logging.context",
        "synapse.storage",
        "synapse.storage.keys",
    ]:
        module = modules[name] = type(sys)(name)
        module.__path__ = []
    modules["synapse"].__version__ = version
    keyring = modules["synapse.crypto.keyring"]
    keyring.Keyring = FakeSynapseKeyring
    keyring.StoreKeyFetcher = FakeStoreKeyFetcher
    keyring.PerspectivesKeyFetcher = FakePerspectivesKeyFetcher
    keyring.ServerKeyFetcher = FakeServerKeyFetcher
    modules["synapse.logging.context"].PreserveLoggingContext = contextlib.nullcontext
    modules["synapse.logging.context"].make_deferred_yieldable = lambda d: d
    modules["synapse.storage.keys"].FetchKeyResult = FakeFetchKeyResult
    return modules


class ModuleOptionHarness(TestCase):
    """Builds a module on a fake homeserver (no tests of its own)."""

    def make_module(self, option: Optional[bool], version: Optional[str] = TESTED) -> Any:
        """A module on a homeserver whose keyring has Synapse's two default fetchers,
        with a fake synapse importable (or none, when ``version`` is None)."""
        patch_modules(self, fake_synapse_modules(version) if version else {"synapse": None})
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.key = new_signing_key("a_hs")
        key_path = os.path.join(directory, "homeserver.signing.key")
        with open(key_path, "w") as f:
            write_signing_keys(f, [self.key])
        raw: dict[str, Any] = {
            "signing_key_path": key_path,
            "database": {"backend": "sqlite", "path": os.path.join(directory, "keyring.db")},
        }
        if option is not None:
            raw["synapse_keyring"] = {"use_module_fetchers": option}
        self.fetchers = [FakeStoreKeyFetcher(), FakeServerKeyFetcher()]
        self.synapse_keyring = FakeSynapseKeyring(self.fetchers)
        self.homeserver = RecordingHomeserver(self.synapse_keyring)
        api = RecordingModuleApi("hs.example.org", self.homeserver)
        module = KeyringModule(KeyringModule.parse_config(raw), api)  # type: ignore[arg-type]
        self.addCleanup(module._close)
        return module


class ModuleOptionTests(ModuleOptionHarness):
    async def test_on_swaps_once_the_store_is_open(self) -> None:
        """With the option on, once ready the homeserver's keyring asks our keyring, and the lookups are counted."""
        before = REGISTRY.get_sample_value(
            "keyring_synapse_key_requests_total", {"result": "found"}
        )
        module = self.make_module(True)
        await module.ready
        (ours,) = self.synapse_keyring._key_fetchers
        self.assertIsInstance(ours, ModuleKeyFetcher)
        self.assertEqual(
            [type(f) for f in self.fetchers], [FakeStoreKeyFetcher, FakeServerKeyFetcher]
        )
        kid = key_id(self.key)
        found = await ours.get_keys("hs.example.org", [kid], 0)
        self.assertEqual(found[kid].verify_key, get_verify_key(self.key))
        after = REGISTRY.get_sample_value("keyring_synapse_key_requests_total", {"result": "found"})
        self.assertEqual((after or 0) - (before or 0), 1)

    async def test_off_by_default_touches_nothing(self) -> None:
        """Without the option (or with it false) the homeserver's keyring is never even looked at."""
        for option in (None, False):
            module = self.make_module(option)
            await module.ready
            self.assertEqual(self.homeserver.keyring_asked, 0)
            self.assertIs(self.synapse_keyring._key_fetchers, self.fetchers)

    async def test_on_without_synapse_logs_one_error_and_still_serves(self) -> None:
        """With the option on but no importable Synapse, one ERROR; the module still gets ready."""
        with self.assertLogs("keyring_module.synapse_adapter", logging.DEBUG) as logs:
            module = self.make_module(True, version=None)
            await module.ready
        self.assertEqual([r.levelname for r in logs.records], ["ERROR"])
        self.assertIsNotNone(module.keyring)
        self.assertIs(self.synapse_keyring._key_fetchers, self.fetchers)

    async def test_on_with_an_untested_synapse_leaves_it_alone(self) -> None:
        """An untested Synapse version: one ERROR naming it; Synapse's fetchers stay."""
        with self.assertLogs("keyring_module.synapse_adapter", logging.DEBUG) as logs:
            module = self.make_module(True, version="1.170.0")
            await module.ready
        self.assertEqual([r.levelname for r in logs.records], ["ERROR"])
        self.assertIn("Synapse 1.170.0 is not a tested version", logs.records[0].getMessage())
        self.assertIs(self.synapse_keyring._key_fetchers, self.fetchers)


class TestedVersionsTests(SynchronousTestCase):
    def test_ci_installs_a_tested_synapse(self) -> None:
        """The Synapse series CI installs for the interop tests is one the adapter accepts."""
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(os.path.join(root, ".ci", "install_synapse.sh")) as f:
            script = f.read()
        match = re.search(r'"matrix-synapse~=(\d+\.\d+)\.0"', script)
        assert match is not None, "install_synapse.sh does not pin a matrix-synapse series"
        self.assertIn(match.group(1), TESTED_SYNAPSE_VERSIONS)

    def test_the_adapter_imports_synapse_only_when_loading(self) -> None:
        """Importing the adapter (as the doctests and this file do) imports no synapse module."""
        code = (
            "import sys, keyring_module.synapse_adapter\n"
            "assert not [m for m in sys.modules if m == 'synapse' or m.startswith('synapse.')]\n"
        )
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=root)
