"""A real Synapse whose own key lookups go through our module (``use_module_fetchers``).

Synapse A loads ``keyring_module.KeyringModule``; Synapse B is a plain Synapse. The tests
send A a federation request signed with B's key (``X-Matrix``), which A must verify
with B's key:

* option on: A gets B's key through our chain (our metrics count the origin fetch and
  the lookups; B serves its key once), a forged signature is still refused, and a
  second request within the key's lifetime needs no fetch;
* option on, B stopped: A still verifies B's request through the notary listed in the
  *module's* ``trusted_key_servers`` (our standalone server, which learnt B's key
  earlier); A's own ``trusted_key_servers`` is empty, so Synapse could not have;
* option off: Synapse fetches B's key itself, as without the module; our counters do
  not move.

A's log must never show a logcontext warning (``Expected logging context ...``); whether
the fetcher keeps Synapse's logcontext rules is checked directly, with Synapse's own
logcontext code, in ``interop/test_synapse_logcontext.py``.
"""

from typing import Any, Mapping, Sequence

from prometheus_client.parser import text_string_to_metric_families
from signedjson.key import generate_signing_key

from interop.harness import (
    InteropTestCase,
    SynapseHomeserver,
    TrustedKeyServerSpec,
    report_process_logs,
    send_signed_request,
)

KEY_QUERY = "/_matrix/key/v2/query"
SERVER_KEYS = "/_matrix/key/v2/server"
#: Logged by our module once the homeserver's keyring uses our fetcher.
INSTALLED_LINE = "keyring now gets keys through keyring_module"
#: Logged by Synapse when a Deferred broke its logcontext rules.
LOGCONTEXT_ERROR = "Expected logging context"
#: Logged by our module when it leaves Synapse's fetchers in place.
NOT_INSTALLED_LINE = "the homeserver keeps its own key fetchers"


def profile_path(verifier: SynapseHomeserver, user: str) -> str:
    """A federation GET that needs the origin's key to be authenticated (404 after)."""
    return "/_matrix/federation/v1/query/profile?user_id=@%s:%s" % (user, verifier.server_name)


def count_in_log(path: str, needle: str) -> int:
    with open(path, encoding="utf8", errors="replace") as f:
        return f.read().count(needle)


class SynapseUsingOurFetchersTests(InteropTestCase):
    """Synapse's own request verification with and without ``use_module_fetchers``."""

    async def start_verifier(
        self, *, use_module_fetchers: bool, notaries: Sequence[TrustedKeyServerSpec] = ()
    ) -> SynapseHomeserver:
        """Synapse A: our module loaded (its notaries: ``notaries``), metrics served, and
        no ``trusted_key_servers`` of its own."""
        verifier = await self.start_synapse(
            keyring_module={
                "synapse_keyring": {"use_module_fetchers": use_module_fetchers},
                "trusted_key_servers": [n.to_config() for n in notaries],
            },
            metrics=True,
        )
        if use_module_fetchers:
            assert verifier.process is not None
            await self._wait_for_line(verifier.process, verifier.log_path, INSTALLED_LINE, 10.0)
        return verifier

    async def metric(self, homeserver: SynapseHomeserver, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples whose labels include ``labels`` (0 if none)."""
        result = await self.request_json("GET", homeserver.metrics_url)
        self.assertEqual(result.code, 200, result.body[:300])
        total = 0.0
        for family in text_string_to_metric_families(result.body.decode("utf8")):
            for sample in family.samples:
                if sample.name == name and _includes(sample.labels, labels):
                    total += sample.value
        return total

    async def assert_verified(self, verifier: SynapseHomeserver, origin: Any, user: str) -> None:
        result = await send_signed_request(
            self.http,
            origin=origin.server_name,
            signing_key=origin.signing_key,
            destination=verifier,
            path=profile_path(verifier, user),
        )
        self.assertNotEqual(
            result.code, 401, "A could not verify B's signature: %r" % (result.body[:500],)
        )

    async def assert_forgery_refused(self, verifier: SynapseHomeserver, origin: Any) -> None:
        """Same key id as B's, another key: A must check with B's real key and say 401."""
        forged = await send_signed_request(
            self.http,
            origin=origin.server_name,
            signing_key=generate_signing_key(origin.signing_key.version),
            destination=verifier,
            path=profile_path(verifier, "forged"),
        )
        self.assertEqual(forged.code, 401, forged.body[:500])

    def assert_clean_log(self, verifier: SynapseHomeserver) -> None:
        self.assertEqual(count_in_log(verifier.log_path, LOGCONTEXT_ERROR), 0)
        self.assertEqual(count_in_log(verifier.log_path, NOT_INSTALLED_LINE), 0)

    @report_process_logs
    async def test_on_fetches_through_our_chain_once(self) -> None:
        """Option on: A verifies B's request with a key fetched by our chain, refuses a forgery, and needs no second fetch."""
        origin = await self.start_synapse()
        verifier = await self.start_verifier(use_module_fetchers=True)
        self.assertEqual(
            count_in_log(verifier.log_path, "(in place of StoreKeyFetcher, ServerKeyFetcher)"),
            1,
        )
        key_fetches_before = count_in_log(origin.log_path, SERVER_KEYS)

        await self.assert_verified(verifier, origin, "first")

        fetched = "Origin key fetch from %s: ok" % (origin.server_name,)
        self.assertEqual(count_in_log(verifier.log_path, fetched), 1)
        self.assertEqual(
            await self.metric(verifier, "keyring_origin_fetches_total", outcome="ok"), 1
        )
        found = await self.metric(verifier, "keyring_synapse_key_requests_total", result="found")
        self.assertGreaterEqual(found, 1)
        self.assertEqual(count_in_log(origin.log_path, SERVER_KEYS) - key_fetches_before, 1)

        await self.assert_forgery_refused(verifier, origin)
        await self.assert_verified(verifier, origin, "second")

        # Both answered from our store: no new fetch, by our count or by B's.
        self.assertEqual(count_in_log(verifier.log_path, fetched), 1)
        self.assertEqual(
            await self.metric(verifier, "keyring_origin_fetches_total", outcome="ok"), 1
        )
        self.assertEqual(count_in_log(origin.log_path, SERVER_KEYS) - key_fetches_before, 1)
        self.assertGreaterEqual(
            await self.metric(verifier, "keyring_synapse_key_requests_total", result="found"),
            found + 2,
        )
        self.assertEqual(
            await self.metric(verifier, "keyring_synapse_key_requests_total", result="error"), 0
        )
        self.assert_clean_log(verifier)

    @report_process_logs
    async def test_on_uses_the_module_notary_when_the_origin_is_down(self) -> None:
        """Option on, B stopped: A verifies B's request through the notary in the module's config."""
        origin = await self.start_synapse()
        notary = await self.start_keyring_server()
        # The notary learns B's key while B is up.
        query: dict[str, Any] = {"server_keys": {origin.server_name: {origin.key_id: {}}}}
        learnt = await self.request_json("POST", notary.url + KEY_QUERY, query)
        self.assertEqual(learnt.code, 200, learnt.body[:500])
        self.assertEqual(
            [e["server_name"] for e in learnt.json()["server_keys"]], [origin.server_name]
        )
        verifier = await self.start_verifier(
            use_module_fetchers=True, notaries=[notary.as_trusted_key_server()]
        )
        assert origin.process is not None
        await origin.process.stop()

        await self.assert_verified(verifier, origin, "via_notary")

        self.assertGreaterEqual(
            await self.metric(
                verifier, "keyring_notary_queries_total", notary=notary.server_name, outcome="ok"
            ),
            1,
        )
        self.assertEqual(
            await self.metric(verifier, "keyring_origin_fetches_total", outcome="ok"), 0
        )
        self.assertGreaterEqual(
            await self.metric(verifier, "keyring_synapse_key_requests_total", result="found"), 1
        )
        await self.assert_forgery_refused(verifier, origin)
        self.assert_clean_log(verifier)

    @report_process_logs
    async def test_off_synapse_fetches_for_itself(self) -> None:
        """Option off (module loaded): Synapse's own fetchers get B's key; our counters stay at zero."""
        origin = await self.start_synapse()
        verifier = await self.start_verifier(use_module_fetchers=False)
        key_fetches_before = count_in_log(origin.log_path, SERVER_KEYS)

        await self.assert_verified(verifier, origin, "first")
        await self.assert_forgery_refused(verifier, origin)

        self.assertEqual(count_in_log(origin.log_path, SERVER_KEYS) - key_fetches_before, 1)
        self.assertEqual(count_in_log(verifier.log_path, INSTALLED_LINE), 0)
        self.assertEqual(await self.metric(verifier, "keyring_synapse_key_requests_total"), 0)
        self.assertEqual(await self.metric(verifier, "keyring_origin_fetches_total"), 0)
        self.assert_clean_log(verifier)


def _includes(labels: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in wanted.items())
