"""Names our local policy refuses are never sent to any source.

The chain refuses invalid server names and, through ``refuse_reason`` (built by the
wiring from ``federation.ip_range_denylist``/``ip_range_allowlist``), names whose host is
an IP literal in a denied range: no origin fetch, no notary is told about them, and a
traced call says why.
"""

from typing import Mapping

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.config import FederationConfig, parse_config
from keyring_module.fetchers.base import FailureKind
from keyring_module.fetchers.chain import KeyFetcherChain
from keyring_module.fetchers.refusal import denied_ip_literals
from keyring_module.fetchers.trace import FetchTrace
from keyring_module.http.ipfilter import IPRangeFilter
from keyring_module.model import SOURCE_ORIGIN, KeyRequest, StoredKey, notary_source
from keyring_module.storage.memory import InMemoryKeyStore
from keyring_module.wiring import Fetching
from tests.chain_fakes import ScriptedFetcher
from tests.fake_reactors import FakeReactor
from tests.fakes import FakeFederationClient
from tests.utils import key_id, new_signing_key, verify_key_base64

NOTARY = "notary.example"
DENIED = ["10.0.0.1", "[fd00::1]:8448", "127.0.0.1:8448", "[::ffff:192.168.1.1]"]
FETCHED = ["10.example.org", "93.184.215.14:8448", "[2606:4700::1111]"]


def default_policy(allowlist: tuple[str, ...] = ()) -> IPRangeFilter:
    return IPRangeFilter(FederationConfig().ip_range_denylist, allowlist)


class ChainRefusalTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.origin = ScriptedFetcher(SOURCE_ORIGIN, self.clock)
        self.notary = ScriptedFetcher(notary_source(NOTARY), self.clock)
        self.reported: list[str] = []

    def get_keys(
        self, ip_filter: IPRangeFilter, names: list[str], trace: FetchTrace
    ) -> Mapping[str, Mapping[str, StoredKey]]:
        chain = KeyFetcherChain(
            InMemoryKeyStore(),
            self.origin,
            [self.notary],
            self.clock,
            refuse_reason=denied_ip_literals(ip_filter),
        )
        requests = [KeyRequest(name) for name in names]
        result: Mapping[str, Mapping[str, StoredKey]] = self.successResultOf(
            defer.ensureDeferred(
                chain.get_keys(
                    requests, trace=trace, on_server=lambda name, _: self.reported.append(name)
                )
            )
        )
        return result

    def test_denied_ip_literals_reach_no_source(self) -> None:
        """IP literals in denied ranges are asked of neither the origin nor a notary, get
        no keys, are reported, and are traced as refused with the reason; host names
        and public addresses are fetched as usual."""
        trace = FetchTrace()
        keys = self.get_keys(default_policy(), DENIED + FETCHED, trace)
        self.assertEqual(sorted(name for [name] in self.origin.calls), sorted(FETCHED))
        self.assertEqual(self.notary.calls, [sorted(FETCHED)])
        self.assertEqual(sorted(self.reported), sorted(DENIED + FETCHED))
        for name in DENIED:
            self.assertEqual(keys[name], {})
            server = trace.servers[name]
            self.assertEqual(server.asked, [])
            self.assertEqual(
                [(f.source, f.kind) for f in server.failures],
                [
                    (SOURCE_ORIGIN, FailureKind.REFUSED),
                    (notary_source(NOTARY), FailureKind.REFUSED),
                ],
            )
            self.assertIn("is denied by the federation IP ranges", server.failures[0].detail)

    def test_allowlist_is_respected(self) -> None:
        """An allow-listed loopback address is fetched; its neighbour is still refused."""
        trace = FetchTrace()
        self.get_keys(default_policy(("127.0.0.1/32",)), ["127.0.0.1:8448", "127.0.0.2"], trace)
        self.assertEqual(self.origin.calls, [["127.0.0.1:8448"]])
        self.assertEqual(self.notary.calls, [["127.0.0.1:8448"]])
        self.assertEqual(trace.servers["127.0.0.2"].failures[0].kind, FailureKind.REFUSED)

    def test_invalid_names_keep_their_reason(self) -> None:
        """An invalid name is still refused as an invalid server name, with a policy."""
        trace = FetchTrace()
        self.get_keys(default_policy(), ["bad name"], trace)
        self.assertEqual(self.origin.calls, [])
        self.assertEqual(
            {f.detail for f in trace.servers["bad name"].failures}, {"invalid server name"}
        )


class WiredRefusalTests(SynchronousTestCase):
    def test_wired_chains_follow_the_federation_ip_ranges(self) -> None:
        """Both wired chains refuse denied IP literals (no request of any kind goes out
        about them) and respect the configured allowlist."""
        notary_key = new_signing_key("n")
        config = parse_config(
            {
                "signing_key_path": "unused",
                "trusted_key_servers": [
                    {
                        "server_name": NOTARY,
                        "verify_keys": {key_id(notary_key): verify_key_base64(notary_key)},
                    }
                ],
                "federation": {"ip_range_allowlist": ["127.0.0.1/32"]},
            },
            standalone=False,
        )
        client = FakeFederationClient({})  # every request fails, but is recorded
        fetching = Fetching.build(FakeReactor(), config, InMemoryKeyStore(), client=client)
        requests = [KeyRequest(name) for name in ("10.0.0.1:8448", "[fd00::1]", "127.0.0.1:8448")]
        for chain in (fetching.chain, fetching.request_auth_chain):
            self.successResultOf(defer.ensureDeferred(chain.get_keys(requests, use_cache=False)))
        self.assertEqual(
            sorted({(r.method, r.server_name) for r in client.requests}),
            [("GET", "127.0.0.1:8448"), ("POST", NOTARY)],
        )
        for request in client.requests_to(NOTARY):
            assert isinstance(request.body, dict)
            self.assertEqual(list(request.body["server_keys"]), ["127.0.0.1:8448"])
