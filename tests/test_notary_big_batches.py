"""Big batches and busy notaries: Synapse-sized POSTs, the per-request fetch cap, and
``max_concurrent_requests`` counting only queries that wait for a fetch.

Everything goes through the wiring (:class:`~tests.notary_site.RawNotarySite`), at the
default configuration unless a test says otherwise.
"""

import json
from typing import Any, Mapping, Optional, Sequence

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.clock import now_ms
from keyring_module.config import NotaryConfig, parse_config
from keyring_module.model import SOURCE_ORIGIN
from keyring_module.pacing import COSTLY_ITEMS_PER_SLICE
from keyring_module.resources.tree import build_key_resource, build_root
from keyring_module.validation import parse_server_keys_response
from tests.fakes import DAY_MS, FakeOriginResource, HangingResource
from tests.federation_traffic import synapse_body
from tests.notary_site import NOTARY, RawNotarySite
from tests.utils import key_id, make_signed_server_keys, new_signing_key

QUERY_PATH = b"/_matrix/key/v2/query"
#: The default ``federation.request_timeout``.
REQUEST_TIMEOUT_S = 10
#: The key every seeded server publishes (one key signs them all: it is only a test).
SERVER_KEY = new_signing_key("a_AbCdEf")
SERVER_KEY_ID = key_id(SERVER_KEY)


def server_name(i: int) -> str:
    """The i-th server of a batch, as long as real names tend to be."""
    return "server%05d.example.org" % i


def skipped(site: RawNotarySite, reason: str) -> float:
    """``keyring_notary_fetches_skipped_total`` for ``reason`` (0 when never counted)."""
    value = site.services.metrics.registry.get_sample_value(
        "keyring_notary_fetches_skipped_total", {"reason": reason}
    )
    return value or 0.0


def answered(response: Any) -> dict[str, dict[str, Any]]:
    """The entries of a 200 answer, by server name."""
    return {entry["server_name"]: entry for entry in response.json()["server_keys"]}


class BigBatchTestCase(SynchronousTestCase):
    """Helpers: a notary through the wiring, and servers seeded into its store."""

    def make_site(
        self,
        origins: Optional[Mapping[str, Any]] = None,
        notary: Optional[Mapping[str, Any]] = None,
    ) -> RawNotarySite:
        config = {"notary": dict(notary)} if notary else None
        return RawNotarySite(origins, config)

    def make_site_with_origins(
        self, names: Sequence[str], notary: Optional[Mapping[str, Any]] = None
    ) -> RawNotarySite:
        """A notary whose fake origins ``names`` serve their keys (signed now)."""
        origins = {name: FakeOriginResource(SERVER_KEY, name, Clock()) for name in names}
        site = self.make_site(origins, notary)
        for origin in origins.values():
            origin.clock = site.reactor
        return site

    def seed(
        self,
        site: RawNotarySite,
        names: Sequence[str],
        valid_until_ts: int,
        fetched_ts: Optional[int] = None,
    ) -> None:
        """Store a signed response for each of ``names`` (fetched at ``fetched_ts``,
        now when not given)."""
        fetched = now_ms(site.reactor) if fetched_ts is None else fetched_ts
        for name in names:
            obj = make_signed_server_keys(name, [SERVER_KEY], valid_until_ts)
            response = parse_server_keys_response(obj, name)
            self.successResultOf(
                ensureDeferred(
                    site.services.store.store_server_keys(response, SOURCE_ORIGIN, fetched)
                )
            )

    def seed_expired(self, site: RawNotarySite, names: Sequence[str]) -> None:
        """Store responses that expired a day ago (they need a fetch, but can be served)."""
        now = now_ms(site.reactor)
        self.seed(site, names, now - DAY_MS, now - 2 * DAY_MS)

    def fetched(self, site: RawNotarySite) -> list[str]:
        """The servers the notary asked for keys, in order."""
        return [r.server_name for r in site.client.requests]

    def count_reads(self, site: RawNotarySite) -> list[tuple[str, Any]]:
        """From now on, record each read the notary makes of its store: the method's
        name and its first argument (a server name, or the server names)."""
        reads: list[tuple[str, Any]] = []
        store = site.services.store
        for method in (
            "get_server_keys",
            "get_many_server_keys",
            "get_server_responses",
            "get_many_server_responses",
        ):
            original = getattr(store, method)

            def counting(*args: Any, _name: str = method, _original: Any = original) -> Any:
                reads.append((_name, args[0]))
                return _original(*args)

            self.patch(store, method, counting)
        return reads


class BigBatchTests(BigBatchTestCase):
    def test_ten_thousand_servers_fit_the_defaults(self) -> None:
        """A 10,000-server body from Synapse passes the default body and server ceilings
        (all unknown, it is answered 200 and fetches only max_fetches_per_request)."""
        site = self.make_site()
        names = [server_name(i) for i in range(10_000)]
        body = synapse_body(names, 1_700_000_000_000, SERVER_KEY_ID)
        self.assertGreater(len(body), 800_000)
        response = site.request(b"POST", QUERY_PATH, body)
        assert response is not None
        self.assertEqual(response.code, 200, response.body[:200])
        self.assertEqual(response.json(), {"server_keys": []})
        self.assertEqual(len(self.fetched(site)), NotaryConfig().max_fetches_per_request)
        self.assertEqual(skipped(site, "request_cap"), 10_000 - 100)

    def test_stored_batch_is_answered_with_one_store_read(self) -> None:
        """A batch of stored servers, one key id each, already co-signed, is answered
        with one read of the store for the whole batch and no read per server."""
        site = self.make_site()
        names = [server_name(i) for i in range(60)]
        self.seed(site, names, now_ms(site.reactor) + DAY_MS)
        first = site.request(b"POST", QUERY_PATH, synapse_body(names, 0, SERVER_KEY_ID))
        assert first is not None
        reads = self.count_reads(site)
        # Another question (a different set of servers): no whole answer is cached.
        response = site.request(b"POST", QUERY_PATH, synapse_body(names[1:], 0, SERVER_KEY_ID))
        assert response is not None
        self.assertEqual([name for name, _ in reads], ["get_many_server_keys"])
        entries, before = answered(response), answered(first)
        self.assertEqual(set(entries), set(names[1:]))
        for name in names[1:]:
            self.assertEqual(entries[name], before[name], "the same co-signed bytes")

    def test_stored_responses_are_read_once_per_slice(self) -> None:
        """A batch of stored servers not all co-signed yet reads the stored responses of
        those not co-signed with one store call per answering slice (none per server),
        and answers every server co-signed."""
        site = self.make_site()
        names = [server_name(i) for i in range(2 * COSTLY_ITEMS_PER_SLICE + 10)]
        self.seed(site, names, now_ms(site.reactor) + DAY_MS)
        first = site.request(b"POST", QUERY_PATH, synapse_body(names[:10], 0, SERVER_KEY_ID))
        assert first is not None
        reads = self.count_reads(site)
        response = site.request(b"POST", QUERY_PATH, synapse_body(names, 0, SERVER_KEY_ID))
        assert response is not None
        self.assertEqual(
            [(name, sorted(servers)) for name, servers in reads],
            [
                ("get_many_server_keys", names),
                ("get_many_server_responses", names[10:COSTLY_ITEMS_PER_SLICE]),
                (
                    "get_many_server_responses",
                    names[COSTLY_ITEMS_PER_SLICE : 2 * COSTLY_ITEMS_PER_SLICE],
                ),
                ("get_many_server_responses", names[2 * COSTLY_ITEMS_PER_SLICE :]),
            ],
        )
        entries = answered(response)
        self.assertEqual(sorted(entries), names)
        for name in names:
            self.assertIn(NOTARY, entries[name]["signatures"])
        for name, entry in answered(first).items():
            self.assertEqual(entries[name], entry, "the same co-signed bytes")

    def test_one_invalid_name_still_fails_the_batch(self) -> None:
        """A single invalid server name in a big batch fails the request with 400."""
        site = self.make_site()
        names = [server_name(i) for i in range(2000)] + ["bad name.example"]
        response = site.request(b"POST", QUERY_PATH, synapse_body(names, 0, SERVER_KEY_ID))
        assert response is not None
        self.assertEqual((response.code, response.json()["errcode"]), (400, "M_INVALID_PARAM"))
        self.assertEqual(self.fetched(site), [])


class FetchCapTests(BigBatchTestCase):
    def test_servers_with_nothing_stored_are_fetched_first(self) -> None:
        """With N + k servers needing a fetch, N are fetched (those with nothing stored
        first, then by name), the k others are answered from their stale stored copies
        with no fetch, and the metric counts k."""
        site = self.make_site_with_origins(
            [server_name(i) for i in range(5)], {"max_fetches_per_request": 3}
        )
        unknown = [server_name(3), server_name(4)]
        expired = [server_name(0), server_name(1), server_name(2)]
        self.seed_expired(site, expired)
        body = synapse_body(expired + unknown, now_ms(site.reactor), SERVER_KEY_ID)
        response = site.request(b"POST", QUERY_PATH, body)
        assert response is not None
        self.assertEqual(response.code, 200)
        self.assertEqual(sorted(self.fetched(site)), sorted(unknown + [server_name(0)]))
        self.assertEqual(skipped(site, "request_cap"), 2)
        entries = answered(response)
        self.assertEqual(set(entries), set(expired + unknown), "stale copies are served")
        now = now_ms(site.reactor)
        for name in (server_name(1), server_name(2)):
            self.assertLess(entries[name]["valid_until_ts"], now, "the stale copy")
        for name in unknown + [server_name(0)]:
            self.assertGreater(entries[name]["valid_until_ts"], now, "fetched")

    def test_servers_beyond_the_cap_with_nothing_stored_are_left_out(self) -> None:
        """Servers with nothing stored beyond the cap are left out of the answer, so the
        caller asks their origins itself; those within it are fetched in name order."""
        names = [server_name(i) for i in range(4)]
        site = self.make_site_with_origins(names, {"max_fetches_per_request": 2})
        response = site.request(b"POST", QUERY_PATH, synapse_body(names, 0, SERVER_KEY_ID))
        assert response is not None
        self.assertEqual(set(answered(response)), {server_name(0), server_name(1)})
        self.assertEqual(self.fetched(site), [server_name(0), server_name(1)])
        self.assertEqual(skipped(site, "request_cap"), 2)

    def test_background_refreshes_share_the_cap(self) -> None:
        """Servers past their half-life are served at once; only as many are refreshed in
        the background as the cap has room for after the fetches."""
        site = self.make_site(notary={"max_fetches_per_request": 2})
        now = now_ms(site.reactor)
        names = [server_name(i) for i in range(4)]
        # Valid for another hour, fetched a day ago: past half-life, minimum met.
        self.seed(site, names, now + 3600_000, now - DAY_MS)
        unknown = server_name(9)
        response = site.request(
            b"POST", QUERY_PATH, synapse_body(names + [unknown], now, SERVER_KEY_ID)
        )
        assert response is not None
        self.assertEqual(set(answered(response)), set(names))
        self.assertEqual(self.fetched(site), [unknown, server_name(0)])
        self.assertEqual(skipped(site, "refresh_cap"), 3)
        self.assertEqual(skipped(site, "request_cap"), 0)

    def test_cap_of_zero_never_fetches(self) -> None:
        """``max_fetches_per_request: 0`` answers every query from the store alone."""
        site = self.make_site(notary={"max_fetches_per_request": 0})
        self.seed_expired(site, [server_name(0)])
        response = site.request(b"GET", b"/_matrix/key/v2/query/" + server_name(0).encode())
        assert response is not None
        self.assertEqual(set(answered(response)), {server_name(0)})
        self.assertEqual(self.fetched(site), [])
        self.assertEqual(skipped(site, "request_cap"), 1)

    def test_config_reads_the_cap(self) -> None:
        """``notary.max_fetches_per_request`` is read from the config and bounded."""
        base: dict[str, Any] = {
            "server_name": NOTARY,
            "signing_key_path": "k",
            "listeners": [{"port": 1}],
        }
        parsed = parse_config(dict(base, notary={"max_fetches_per_request": 7}))
        self.assertEqual(parsed.notary.max_fetches_per_request, 7)
        self.assertEqual(parse_config(base).notary.max_fetches_per_request, 100)
        with self.assertRaisesRegex(ValueError, "notary.max_fetches_per_request"):
            parse_config(dict(base, notary={"max_fetches_per_request": -1}))


class BusyNotaryTests(BigBatchTestCase):
    """``max_concurrent_requests`` slots all held by queries about a hanging origin:
    what happens to queries that need a fetch (cacheable queries are answered: see
    ``test_federation_traffic.CacheableQueriesTests``)."""

    def setUp(self) -> None:
        self.site = self.make_site({"hang.test": HangingResource()}, {"max_concurrent_requests": 2})
        self.expired = server_name(7)
        self.seed_expired(self.site, [self.expired])
        self.resource = self.site.services.query_resource()
        assert self.resource is not None
        self.http = StubTreq(
            build_root(build_key_resource(self.site.services.publisher, self.resource))
        )
        self.held = [self.start(b"GET", "/query/hang.test") for _ in range(2)]
        for held in self.held:
            self.assertNoResult(held)
        self.assertEqual(self.resource._in_flight, 2)  # type: ignore[attr-defined]

    def start(self, method: bytes, path: str, body: Optional[bytes] = None) -> "Deferred[Any]":
        d: "Deferred[Any]" = self.http.request(  # type: ignore[attr-defined]
            method.decode(), "https://%s/_matrix/key/v2%s" % (NOTARY, path), data=body
        )
        self.http.flush()
        return d

    def answer(self, method: bytes, path: str, body: Optional[bytes] = None) -> tuple[int, Any]:
        response = self.successResultOf(self.start(method, path, body))
        return response.code, json.loads(self.successResultOf(response.content()))

    def tearDown(self) -> None:
        self.site.reactor.advance(REQUEST_TIMEOUT_S + 1)
        self.http.flush()
        for held in self.held:
            self.assertEqual(self.successResultOf(held).code, 200)

    def test_query_needing_a_fetch_is_answered_from_the_store(self) -> None:
        """A query that needs a fetch, with a stale copy stored, is answered from the
        store without fetching; servers with nothing stored are left out."""
        now = now_ms(self.site.reactor)
        code, body = self.answer(
            b"POST", "/query", synapse_body([self.expired, "unknown.test"], now, SERVER_KEY_ID)
        )
        self.assertEqual(code, 200, body)
        self.assertEqual([e["server_name"] for e in body["server_keys"]], [self.expired])
        self.assertNotIn(self.expired, self.fetched(self.site))
        self.assertEqual(skipped(self.site, "busy"), 2)

    def test_query_with_nothing_stored_gets_429(self) -> None:
        """A query needing a fetch with nothing to answer from gets 429 M_LIMIT_EXCEEDED
        with retry_after_ms, and is answered again once a slot is free."""
        code, body = self.answer(b"GET", "/query/unknown.test")
        self.assertEqual(
            (code, body["errcode"], body["retry_after_ms"]), (429, "M_LIMIT_EXCEEDED", 1000)
        )
        self.assertNotIn("unknown.test", self.fetched(self.site))
        self.site.reactor.advance(REQUEST_TIMEOUT_S + 1)
        self.http.flush()
        code, body = self.answer(b"GET", "/query/unknown.test")
        self.assertEqual((code, body), (200, {"server_keys": []}))
