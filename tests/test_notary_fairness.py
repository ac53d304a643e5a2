"""Who gets the notary's outbound fetches: one client's share of the global cap, and
dead origins taking their turn behind servers never tried.

Everything goes through the wiring (:class:`~tests.notary_site.RawNotarySite`), at the
default configuration unless a test says otherwise.
"""

from typing import Any, Mapping, Optional, cast

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyRequest

from keyring_module.clock import now_ms
from keyring_module.config import InboundConfig
from keyring_module.fetch_slots import FetchSlots
from keyring_module.notary.attempts import FetchAttempts, target_key
from keyring_module.notary.client_budget import ClientFetchBudgets
from keyring_module.resources.key_query import KeyQueryResource
from keyring_module.resources.per_address import fetch_client_of
from keyring_module.resources.site import KeyServerSite
from keyring_module.servername import network_target
from tests.fakes import FakeOriginResource, HangingResource
from tests.federation_traffic import synapse_body
from tests.notary_site import OpenRequest, RawNotarySite, request_bytes
from tests.test_notary_big_batches import (
    QUERY_PATH,
    REQUEST_TIMEOUT_S,
    SERVER_KEY,
    SERVER_KEY_ID,
    BigBatchTestCase,
    server_name,
    skipped,
)

#: The default ``notary.max_fetches_per_request``.
MAX_FETCHES = 100
ATTACKER, OTHER = "192.0.2.7", "198.51.100.9"
LIVE = "live.example"


def hanging_names(count: int) -> list[str]:
    """``count`` servers whose origins accept a request and never answer."""
    return ["h%04d.attacker.example" % i for i in range(count)]


class ClientFetchBudgetTests(BigBatchTestCase):
    """One client address has at most ``max_fetches_per_request`` servers fetched at once."""

    def make_hanging_site(
        self, hanging: list[str], config: Optional[Mapping[str, Any]] = None
    ) -> RawNotarySite:
        """A notary (fetches time out as with the real client) whose origins ``hanging``
        never answer, and whose origin ``live.example`` serves its keys."""
        origins: dict[str, Resource] = {name: HangingResource() for name in hanging}
        live = FakeOriginResource(SERVER_KEY, LIVE, Clock())
        origins[LIVE] = live
        site = RawNotarySite(origins, config, request_timeouts=True)
        live.clock = site.reactor
        return site

    def post(self, site: RawNotarySite, names: list[str], client_host: str) -> OpenRequest:
        """A Synapse-like POST about ``names`` from ``client_host``, left open."""
        body = synapse_body(names, now_ms(site.reactor), SERVER_KEY_ID)
        return site.open(request_bytes(b"POST", QUERY_PATH, body), client_host)

    def budgets(self, site: RawNotarySite) -> ClientFetchBudgets:
        resource = site.query_resource
        assert isinstance(resource, KeyQueryResource)
        return resource.fetch_budgets

    def slots(self, site: RawNotarySite) -> FetchSlots:
        slots = site.services.fetching.fetch_slots
        assert slots is not None
        return slots

    def test_one_client_holds_at_most_its_share_of_the_global_cap(self) -> None:
        """One address's 3 POSTs of 100 hanging names hold at most 100 fetch slots (the
        two over its share are refused at once: nothing stored), and a second address's
        query about a live origin is fetched and answered at once."""
        hanging = hanging_names(300)
        site = self.make_hanging_site(hanging)
        held = [self.post(site, hanging[i * 100 : (i + 1) * 100], ATTACKER) for i in range(3)]
        slots = self.slots(site)
        self.assertEqual((slots.in_use, slots.waiting), (MAX_FETCHES, 0))
        self.assertIsNone(held[0].response())
        for refused in held[1:]:
            response = refused.response()
            assert response is not None
            self.assertEqual(response.code, 429)
            self.assertEqual(response.json()["errcode"], "M_LIMIT_EXCEEDED")

        other = self.post(site, [LIVE], OTHER)
        response = other.response()
        assert response is not None, "answered without waiting"
        self.assertEqual(response.code, 200)
        self.assertEqual([e["server_name"] for e in response.json()["server_keys"]], [LIVE])
        for request in held + [other]:
            request.close()

    def test_a_client_with_part_of_its_share_left_fetches_that_many(self) -> None:
        """After a query fetching 60 hanging servers, the same address's query naming 100
        others fetches 40 of them and is answered; the other 60 count as ``client_cap``."""
        hanging = hanging_names(160)
        site = self.make_hanging_site(hanging)
        first = self.post(site, hanging[:60], ATTACKER)
        second = self.post(site, hanging[60:], ATTACKER)
        self.assertEqual(self.slots(site).in_use, MAX_FETCHES)
        self.assertEqual(len(site.client.requests), MAX_FETCHES)
        self.assertEqual(skipped(site, "client_cap"), 60)
        site.reactor.advance(REQUEST_TIMEOUT_S)
        site.deliver()
        response = second.response()
        assert response is not None
        self.assertEqual((response.code, response.json()), (200, {"server_keys": []}))
        first.close()
        second.close()

    def test_the_share_comes_back_when_the_fetches_end(self) -> None:
        """Once a client's fetches have timed out, its next query fetches again, and the
        per-client table holds nobody."""
        hanging = hanging_names(200)
        site = self.make_hanging_site(hanging)
        first = self.post(site, hanging[:100], ATTACKER)
        site.reactor.advance(REQUEST_TIMEOUT_S)
        site.deliver()
        self.assertIsNotNone(first.response())
        budgets = self.budgets(site)
        self.assertEqual(len(budgets), 0)
        second = self.post(site, hanging[100:], ATTACKER)
        self.assertEqual(len(site.client.requests), 200)
        self.assertEqual(budgets.held_by(ATTACKER), MAX_FETCHES)
        first.close()
        second.close()

    def test_a_settled_server_gives_its_unit_back_at_once(self) -> None:
        """A query about 99 hanging servers and a live one holds 99 units once the live
        one is answered, so the same client can have one more server fetched."""
        hanging = hanging_names(100)
        site = self.make_hanging_site(hanging)
        first = self.post(site, hanging[:99] + [LIVE], ATTACKER)
        budgets = self.budgets(site)
        self.assertEqual(budgets.held_by(ATTACKER), 99)
        second = self.post(site, hanging[99:], ATTACKER)
        self.assertEqual(budgets.held_by(ATTACKER), MAX_FETCHES)
        self.assertEqual(len(site.client.requests), MAX_FETCHES + 1)
        first.close()
        second.close()

    def test_a_client_that_goes_away_keeps_holding_its_fetches(self) -> None:
        """Closing the connection does not give the share back while the fetches it
        started still run: the same address cannot start 100 more at once."""
        hanging = hanging_names(200)
        site = self.make_hanging_site(hanging)
        self.post(site, hanging[:100], ATTACKER).close()
        again = self.post(site, hanging[100:], ATTACKER)
        response = again.response()
        assert response is not None
        self.assertEqual(response.code, 429)
        self.assertEqual(len(site.client.requests), MAX_FETCHES)
        again.close()

    def test_ipv6_clients_share_a_budget_per_64(self) -> None:
        """Two addresses in one IPv6 /64 share one budget; an address in another /64
        has its own."""
        hanging = hanging_names(300)
        site = self.make_hanging_site(hanging)
        held = [self.post(site, hanging[:100], "2001:db8:1:2::1")]
        held.append(self.post(site, hanging[100:200], "2001:db8:1:2:ffff::9"))
        refused = held[-1].response()
        assert refused is not None
        self.assertEqual(refused.code, 429)
        held.append(self.post(site, hanging[200:], "2001:db8:1:3::1"))
        self.assertIsNone(held[-1].response())
        self.assertEqual(len(site.client.requests), 200)
        for request in held:
            request.close()

    def test_no_per_address_budget_without_a_per_address_connection_cap(self) -> None:
        """With ``inbound.max_connections_per_address: 0`` (behind a reverse proxy every
        client has one address), one address's queries are not held to one share."""
        hanging = hanging_names(200)
        site = self.make_hanging_site(hanging, {"inbound": {"max_connections_per_address": 0}})
        held = [self.post(site, hanging[i * 100 : (i + 1) * 100], ATTACKER) for i in range(2)]
        self.assertEqual(len(site.client.requests), 200)
        self.assertEqual(skipped(site, "client_cap"), 0)
        for request in held:
            request.close()


class DeadOriginsTakeTheirTurnTests(BigBatchTestCase):
    """Servers needing a fetch are fetched never-tried first, then least recently tried."""

    dead = [server_name(0), server_name(1)]  # nothing serves them: connection refused
    live = [server_name(2), server_name(3)]

    def test_a_repeated_batch_reaches_the_live_servers(self) -> None:
        """Two dead servers sorting first and two live ones after, a budget of 2, and
        batches an hour apart (the limiter has forgotten the dead ones): the second
        batch fetches the live ones, and they are answered."""
        site = self.make_site_with_origins(self.live, {"max_fetches_per_request": 2})
        body = synapse_body(self.dead + self.live, 0, SERVER_KEY_ID)
        first = site.request(b"POST", QUERY_PATH, body)
        assert first is not None and first.code == 200
        self.assertEqual(self.fetched(site), self.dead)
        site.reactor.advance(3600)
        second = site.request(b"POST", QUERY_PATH, body)
        assert second is not None and second.code == 200
        self.assertEqual(self.fetched(site)[2:], self.live)
        served = [e["server_name"] for e in second.json()["server_keys"]]
        self.assertEqual(served, self.live)

    def test_the_least_recently_tried_go_first_once_all_were_tried(self) -> None:
        """Four dead servers and a budget of 2, batches an hour apart: the first two by
        name, then the two never tried, then the two tried longest ago, in turn."""
        site = self.make_site({}, {"max_fetches_per_request": 2})
        names = [server_name(i) for i in range(4)]
        for _ in range(4):
            self.assertIsNotNone(
                site.request(b"POST", QUERY_PATH, synapse_body(names, 0, SERVER_KEY_ID))
            )
            site.reactor.advance(3600)
        self.assertEqual(self.fetched(site), names + names)


class RefreshBudgetTests(BigBatchTestCase):
    """Background refreshes take their client's share and at most a quarter of the
    global fetch cap."""

    def past_half_life_site(
        self, names: list[str], config: Optional[Mapping[str, Any]] = None
    ) -> RawNotarySite:
        """A notary whose origins ``names`` hang, with a copy of each stored that meets
        any minimum up to a day from now but is past its half-life."""
        site = RawNotarySite({n: HangingResource() for n in names}, config, request_timeouts=True)
        now = now_ms(site.reactor)
        self.seed(site, names, now + 86_400_000, now - 3 * 86_400_000)
        return site

    def post(self, site: RawNotarySite, names: list[str], client_host: str) -> None:
        """A Synapse-like POST about ``names`` from ``client_host``, answered at once."""
        body = synapse_body(names, now_ms(site.reactor), SERVER_KEY_ID)
        pending = site.open(request_bytes(b"POST", QUERY_PATH, body), client_host)
        response = pending.response()
        assert response is not None and response.code == 200, response
        self.assertEqual(len(response.json()["server_keys"]), len(names))
        pending.close()

    def test_refreshes_count_against_the_client_share(self) -> None:
        """Three POSTs from one client about 100 stored servers each, past half-life,
        refresh only the first POST's 100 (held in the client's share until they end;
        the others are served as stored, counted ``client_cap``); another client still
        refreshes its own."""
        names = hanging_names(400)
        site = self.past_half_life_site(names, {"federation": {"max_concurrent_fetches": 1000}})
        resource = site.query_resource
        assert isinstance(resource, KeyQueryResource)
        notary = site.services.notary
        assert notary is not None
        for i in range(3):
            self.post(site, names[i * 100 : (i + 1) * 100], ATTACKER)
        self.assertEqual(notary.refreshing, frozenset(names[:100]))
        self.assertEqual(resource.fetch_budgets.held_by(ATTACKER), MAX_FETCHES)
        self.assertEqual(skipped(site, "client_cap"), 200)
        self.post(site, names[300:], OTHER)
        self.assertEqual(len(notary.refreshing), 200)
        self.assertEqual(resource.fetch_budgets.held_by(OTHER), 100)
        site.reactor.advance(3 * REQUEST_TIMEOUT_S)  # every refresh has given up
        self.assertEqual(notary.refreshing, frozenset())
        self.assertEqual(len(resource.fetch_budgets), 0)

    def test_refreshes_hold_at_most_a_quarter_of_the_global_cap(self) -> None:
        """At the default ``federation.max_concurrent_fetches`` (256), three clients'
        POSTs about 100 servers past half-life each refresh 64 servers in all; each
        client holds its share only for the refreshes started."""
        names = hanging_names(300)
        site = self.past_half_life_site(names)
        resource = site.query_resource
        assert isinstance(resource, KeyQueryResource)
        notary = site.services.notary
        assert notary is not None
        clients = [ATTACKER, OTHER, "203.0.113.5"]
        for i, client in enumerate(clients):
            self.post(site, names[i * 100 : (i + 1) * 100], client)
        self.assertEqual(len(notary.refreshing), 64)
        self.assertEqual(skipped(site, "refresh_cap"), 300 - 64)
        held = [resource.fetch_budgets.held_by(c) for c in clients]
        self.assertEqual(held, [64, 0, 0])


class RefusedNamesTests(BigBatchTestCase):
    """Names our own policy refuses spend none of a request's fetch budget."""

    def test_denied_ip_literals_leave_the_budget_to_others(self) -> None:
        """With a budget of 1, five denied IP literals sorting first (one with an expired
        copy, served stale) are not fetched, counted ``refused``; the live server after
        them is fetched and answered."""
        live = server_name(0)
        site = self.make_site_with_origins([live], {"max_fetches_per_request": 1})
        denied = ["10.0.0.%d" % i for i in range(1, 6)]
        self.seed_expired(site, denied[:1])
        response = site.request(
            b"POST", QUERY_PATH, synapse_body(denied + [live], 0, SERVER_KEY_ID)
        )
        assert response is not None and response.code == 200
        self.assertEqual(self.fetched(site), [live])
        self.assertEqual(skipped(site, "refused"), 5)
        self.assertEqual(skipped(site, "request_cap"), 0)
        served = [e["server_name"] for e in response.json()["server_keys"]]
        self.assertEqual(sorted(served), sorted([denied[0], live]))


class ClientFetchBudgetsTests(SynchronousTestCase):
    """The per-client table: shares, give-backs, and only clients with fetches in it."""

    def test_a_client_gets_what_is_left_of_its_share(self) -> None:
        """Leases of one client never hold more than the share together; another client
        has its own share; a client that cannot be told apart is not bounded."""
        budgets = ClientFetchBudgets(max_per_client=10)
        self.assertEqual(budgets.lease("a", 7).granted, 7)
        self.assertEqual(budgets.lease("a", 7).granted, 3)
        self.assertEqual(budgets.lease("a", 7).granted, 0)
        self.assertEqual(budgets.lease("b", 7).granted, 7)
        self.assertEqual(budgets.lease(None, 1000).granted, 1000)
        self.assertEqual((budgets.held_by("a"), budgets.held_by(None), len(budgets)), (10, 0, 2))

    def test_units_come_back_one_by_one_and_then_all(self) -> None:
        """Released units go back to the client's share; releasing past what is held
        gives back nothing more; a client with nothing held leaves the table."""
        budgets = ClientFetchBudgets(max_per_client=10)
        lease = budgets.lease("a", 4)
        other = budgets.lease("a", 6)
        lease.release()
        self.assertEqual((lease.held, budgets.held_by("a")), (3, 9))
        lease.release_all()
        lease.release_all()
        lease.release(5)
        self.assertEqual(budgets.held_by("a"), 6)
        other.release_all()
        self.assertEqual(len(budgets), 0)
        self.assertEqual(budgets.lease("a", 20).granted, 10)


class FetchClientTests(SynchronousTestCase):
    """Which client a query's fetches are counted under."""

    def request(self, address: Any, site: Optional[KeyServerSite] = None) -> Request:
        """A request from ``address`` received by ``site`` (None: a site not ours)."""
        request = DummyRequest([b""])
        request.client = address
        if site is not None:
            request.site = site  # type: ignore[attr-defined]
        return cast(Request, request)

    def test_ipv4_address_or_ipv6_64(self) -> None:
        """An IPv4 client is its address; an IPv6 client is its /64 (also on a site
        that is not ours, such as Synapse's)."""
        self.assertEqual(
            fetch_client_of(self.request(IPv4Address("TCP", "192.0.2.7", 1))), "192.0.2.7"
        )
        self.assertEqual(
            fetch_client_of(self.request(IPv6Address("TCP", "2001:db8:1:2:aaaa::1", 1))),
            "2001:db8:1:2::/64",
        )

    def test_not_bounded_when_clients_cannot_be_told_apart(self) -> None:
        """A site counting no connections per address, or an address without a host,
        gives no client (not bounded)."""
        site = KeyServerSite(Resource(), 1024, InboundConfig(max_connections_per_address=0))
        self.assertIsNone(fetch_client_of(self.request(IPv4Address("TCP", "192.0.2.7", 1), site)))
        self.assertIsNone(fetch_client_of(self.request(None)))
        capped = KeyServerSite(Resource(), 1024, InboundConfig())
        self.assertEqual(
            fetch_client_of(self.request(IPv4Address("TCP", "192.0.2.7", 1), capped)),
            "192.0.2.7",
        )


class FetchAttemptsTests(SynchronousTestCase):
    """The notary's memory of when it last tried each network target."""

    def test_spellings_of_one_target_share_an_entry(self) -> None:
        """Case, a trailing dot and a zero-padded port are one target; an explicit
        default port is another (it is not delegated)."""
        attempts = FetchAttempts()
        attempts.tried(["Example.ORG.", "h.example:08448"], 5)
        self.assertEqual(attempts.last_tried_ms("example.org"), 5)
        self.assertEqual(attempts.last_tried_ms("h.example:8448"), 5)
        self.assertIsNone(attempts.last_tried_ms("example.org:8448"))
        self.assertEqual(len(attempts), 2)

    def test_a_retry_moves_a_target_to_the_back(self) -> None:
        """Trying a remembered target again updates its time and keeps it longest; the
        target tried longest ago is forgotten first."""
        attempts = FetchAttempts(max_entries=2)
        attempts.tried(["a.example"], 1)
        attempts.tried(["b.example"], 2)
        attempts.tried(["a.example"], 3)
        attempts.tried(["c.example"], 4)
        self.assertEqual(
            [attempts.last_tried_ms(n) for n in ("a.example", "b.example", "c.example")],
            [3, None, 4],
        )

    def test_bounded_by_entries(self) -> None:
        """However many servers are tried, at most ``max_entries`` are remembered."""
        attempts = FetchAttempts(max_entries=100)
        attempts.tried(("s%d.example" % i for i in range(1000)), 1)
        self.assertEqual(len(attempts), 100)
        self.assertEqual(attempts.last_tried_ms("s999.example"), 1)
        self.assertIsNone(attempts.last_tried_ms("s0.example"))

    @settings(max_examples=300, derandomize=True, database=None, deadline=None)
    @given(
        st.from_regex(r"\A(?:[a-zA-Z0-9-]{1,6}\.){0,3}[a-zA-Z0-9-]{1,6}\.?(?::0*[0-9]{1,5})?\Z")
        | st.from_regex(r"\A(?:[0-9]{1,3}\.){3}[0-9]{1,3}(?::[0-9]{1,5})?\Z")
    )
    def test_key_is_the_network_target(self, name: str) -> None:
        """The shortcut key of a name is the hash of its network target."""
        self.assertEqual(target_key(name), hash(network_target(name)))
