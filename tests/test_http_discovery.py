"""Tests for server discovery: .well-known (with caching and redirects), SRV and 8448."""

import random
from typing import Optional

from twisted.internet import defer
from twisted.internet import reactor as global_reactor
from twisted.internet.task import Clock
from twisted.names import dns
from twisted.names.error import DNSServerError
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.http import ConnectError, InvalidServerNameError, discovery
from keyring_module.http.discovery import (
    LazySrvResolver,
    ResolvedServer,
    ServerResolver,
    SrvTarget,
    order_srv_targets,
)
from keyring_module.http.wellknown import (
    FAILURE_CACHE_SECONDS,
    MAX_REDIRECTS,
    FetchedResponse,
    WellKnownResolver,
)
from tests.fake_reactors import MemoryNetworkReactor
from tests.tls_helpers import (
    FakeSrvResolver,
    FakeWellKnownFetcher,
    SrvRecord,
    json_response,
)

WK = "https://example.org/.well-known/matrix/server"
HOUR = 3600.0


def redirect(location: str, code: int = 302) -> FetchedResponse:
    return FetchedResponse(code, {"location": location}, b"")


class WellKnownResolverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.fetcher = FakeWellKnownFetcher()
        self.resolver = WellKnownResolver(self.clock, self.fetcher)

    def lookup(self, name: str = "example.org") -> Optional[str]:
        d = defer.ensureDeferred(self.resolver.get_delegated_server(name))
        return self.successResultOf(d)

    def test_valid_delegation(self) -> None:
        """A 200 JSON object with a valid m.server yields that delegation."""
        self.fetcher.answers[WK] = json_response(b'{"m.server": "matrix.example.org:443"}')
        self.assertEqual(self.lookup(), "matrix.example.org:443")
        self.assertEqual(self.fetcher.fetched, [WK])

    def test_bad_bodies_count_as_no_delegation(self) -> None:
        """Non-JSON, non-objects, missing/non-string/invalid m.server and NaN all give None."""
        bodies = [
            b"not json",
            b"[1, 2]",
            b'"matrix.example.org"',
            b"{}",
            b'{"m.server": 42}',
            b'{"m.server": "bad name!"}',
            b'{"m.server": "host:99999"}',
            b'{"m.server": "x", "n": NaN}',
            b"\xff\xfe{}",
        ]
        for i, body in enumerate(bodies):
            name = "bad%d.example" % i
            url = "https://%s/.well-known/matrix/server" % name
            self.fetcher.answers[url] = json_response(body)
            self.assertIsNone(self.lookup(name), body)

    def test_deeply_nested_body_counts_as_no_delegation(self) -> None:
        """A body nested too deeply for the JSON decoder is a cached failure, not an error."""
        self.fetcher.answers[WK] = json_response(b"[" * 60_000 + b"]" * 60_000)
        self.assertIsNone(self.lookup())
        self.assertIsNone(self.lookup())
        self.assertEqual(self.fetcher.fetched, [WK])

    def test_non_200_and_errors_count_as_no_delegation(self) -> None:
        """A 404, a 500 or a transport error means no delegation."""
        self.fetcher.answers["https://a.example/.well-known/matrix/server"] = FetchedResponse(
            500, {}, b"{}"
        )
        self.fetcher.answers["https://b.example/.well-known/matrix/server"] = ConnectError(
            "refused"
        )
        self.assertIsNone(self.lookup("a.example"))
        self.assertIsNone(self.lookup("b.example"))
        self.assertIsNone(self.lookup("c.example"))  # unknown URL: 404

    def test_follows_redirects(self) -> None:
        """Relative and absolute redirects are followed to the final answer."""
        self.fetcher.answers[WK] = redirect("/elsewhere", 301)
        self.fetcher.answers["https://example.org/elsewhere"] = redirect(
            "https://cdn.example.net/wk", 308
        )
        self.fetcher.answers["https://cdn.example.net/wk"] = json_response(
            b'{"m.server": "m.example.org"}'
        )
        self.assertEqual(self.lookup(), "m.example.org")
        self.assertEqual(
            self.fetcher.fetched,
            [WK, "https://example.org/elsewhere", "https://cdn.example.net/wk"],
        )

    def test_redirects_are_bounded(self) -> None:
        """Exactly MAX_REDIRECTS hops are followed; one more makes the lookup fail."""
        for n in range(MAX_REDIRECTS + 1):
            self.fetcher.answers["https://ok.example/%d" % n] = redirect(
                "https://ok.example/%d" % (n + 1)
            )
        self.fetcher.answers["https://ok.example/.well-known/matrix/server"] = redirect(
            "https://ok.example/1"
        )
        self.fetcher.answers["https://ok.example/%d" % MAX_REDIRECTS] = json_response(
            b'{"m.server": "m.ok.example"}'
        )
        self.assertEqual(self.lookup("ok.example"), "m.ok.example")

        for n in range(MAX_REDIRECTS + 2):
            self.fetcher.answers["https://loop.example/%d" % n] = redirect(
                "https://loop.example/%d" % (n + 1)
            )
        self.fetcher.answers["https://loop.example/.well-known/matrix/server"] = redirect(
            "https://loop.example/1"
        )
        self.fetcher.answers["https://loop.example/%d" % (MAX_REDIRECTS + 1)] = json_response(
            b'{"m.server": "m.loop.example"}'
        )
        self.fetcher.fetched.clear()
        self.assertIsNone(self.lookup("loop.example"))
        self.assertEqual(len(self.fetcher.fetched), MAX_REDIRECTS + 1)

    def test_refuses_insecure_or_empty_redirects(self) -> None:
        """A redirect to http:// or without Location ends the lookup with no delegation."""
        self.fetcher.answers[WK] = redirect("http://example.org/wk")
        self.assertIsNone(self.lookup())
        self.assertEqual(self.fetcher.fetched, [WK])
        self.fetcher.answers["https://e.example/.well-known/matrix/server"] = FetchedResponse(
            302, {}, b""
        )
        self.assertIsNone(self.lookup("e.example"))

    def test_default_cache_is_24_hours(self) -> None:
        """Without cache headers a result is reused for 24 hours, then fetched again."""
        self.fetcher.answers[WK] = json_response(b'{"m.server": "one.example"}')
        self.assertEqual(self.lookup(), "one.example")
        self.fetcher.answers[WK] = json_response(b'{"m.server": "two.example"}')
        self.clock.advance(24 * HOUR - 1)
        self.assertEqual(self.lookup(), "one.example")
        self.clock.advance(2)
        self.assertEqual(self.lookup(), "two.example")
        self.assertEqual(len(self.fetcher.fetched), 2)

    def test_cache_control_max_age_is_honoured(self) -> None:
        """``max-age=600`` keeps the answer for exactly 600 seconds."""
        self.fetcher.answers[WK] = json_response(
            b'{"m.server": "one.example"}', cache_control="public, max-age=600"
        )
        self.lookup()
        self.clock.advance(599)
        self.lookup()
        self.assertEqual(len(self.fetcher.fetched), 1)
        self.clock.advance(2)
        self.lookup()
        self.assertEqual(len(self.fetcher.fetched), 2)

    def test_cache_is_capped_at_48_hours(self) -> None:
        """A huge max-age is capped at 48 hours."""
        self.fetcher.answers[WK] = json_response(
            b'{"m.server": "one.example"}', cache_control="max-age=31536000"
        )
        self.lookup()
        self.clock.advance(48 * HOUR - 1)
        self.lookup()
        self.assertEqual(len(self.fetcher.fetched), 1)
        self.clock.advance(2)
        self.lookup()
        self.assertEqual(len(self.fetcher.fetched), 2)

    def test_expires_header_is_honoured(self) -> None:
        """Without max-age, ``Expires`` (relative to the clock) sets the lifetime."""
        from email.utils import formatdate

        expires = formatdate(self.clock.seconds() + 2 * HOUR, usegmt=True)
        self.fetcher.answers[WK] = json_response(b'{"m.server": "one.example"}', expires=expires)
        self.lookup()
        self.clock.advance(2 * HOUR - 1)
        self.lookup()
        self.assertEqual(len(self.fetcher.fetched), 1)
        self.clock.advance(2)
        self.lookup()
        self.assertEqual(len(self.fetcher.fetched), 2)

    def test_no_store_is_not_cached(self) -> None:
        """``Cache-Control: no-store`` answers are used but fetched again next time."""
        self.fetcher.answers[WK] = json_response(
            b'{"m.server": "one.example"}', cache_control="no-store"
        )
        self.assertEqual(self.lookup(), "one.example")
        self.assertEqual(self.lookup(), "one.example")
        self.assertEqual(len(self.fetcher.fetched), 2)

    def test_failures_are_cached_for_an_hour(self) -> None:
        """A failed lookup is not retried for an hour, then is."""
        self.assertIsNone(self.lookup())
        self.fetcher.answers[WK] = json_response(b'{"m.server": "late.example"}')
        self.clock.advance(FAILURE_CACHE_SECONDS - 1)
        self.assertIsNone(self.lookup())
        self.assertEqual(len(self.fetcher.fetched), 1)
        self.clock.advance(2)
        self.assertEqual(self.lookup(), "late.example")

    def test_cancelled_lookup_is_not_cached(self) -> None:
        """Cancelling a lookup in flight caches nothing, so the next call fetches again."""
        pending: defer.Deferred[FetchedResponse] = defer.Deferred()
        self.fetcher.answers[WK] = pending
        d = defer.ensureDeferred(self.resolver.get_delegated_server("example.org"))
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.fetcher.answers[WK] = json_response(b'{"m.server": "after.example"}')
        self.assertEqual(self.lookup(), "after.example")

    def test_cache_is_bounded(self) -> None:
        """With max_entries=2 the oldest entry is evicted and fetched again."""
        resolver = WellKnownResolver(self.clock, self.fetcher, max_entries=2)
        for name in ("a.example", "b.example", "c.example", "b.example", "a.example"):
            self.successResultOf(defer.ensureDeferred(resolver.get_delegated_server(name)))
        self.assertEqual(
            [u.split("/")[2] for u in self.fetcher.fetched],
            ["a.example", "b.example", "c.example", "a.example"],
        )


class SrvOrderingTests(SynchronousTestCase):
    def test_priority_order(self) -> None:
        """Lower priority values come first regardless of weight or input order."""
        records = [
            SrvTarget("c.example", 3, 20, 100),
            SrvTarget("a.example", 1, 0, 0),
            SrvTarget("b.example", 2, 10, 5),
        ]
        ordered = order_srv_targets(records, random.Random(1))
        self.assertEqual([h for h, _ in ordered], ["a.example", "b.example", "c.example"])

    def test_weighted_choice_within_priority(self) -> None:
        """Within one priority the pick follows the weights (RFC 2782 running sums)."""

        class FixedRandom(random.Random):
            # The values are set after construction: on Python 3.10, Random's __new__
            # seeds from the constructor's first argument, and a list is no seed.
            values: list[int]

            def randint(self, a: int, b: int) -> int:
                return self.values.pop(0)

        def fixed_random(values: list[int]) -> FixedRandom:
            rng = FixedRandom()
            rng.values = values
            return rng

        records = [SrvTarget("light.example", 1, 0, 10), SrvTarget("heavy.example", 2, 0, 90)]
        # running sums: light 10, heavy 100. A pick of 50 selects heavy first.
        ordered = order_srv_targets(records, fixed_random([50, 0]))
        self.assertEqual([h for h, _ in ordered], ["heavy.example", "light.example"])
        ordered = order_srv_targets(records, fixed_random([5, 0]))
        self.assertEqual([h for h, _ in ordered], ["light.example", "heavy.example"])

    def test_weights_shape_the_distribution(self) -> None:
        """Over many draws a 90-weight target is first far more often than a 10-weight one."""
        records = [SrvTarget("light.example", 1, 0, 10), SrvTarget("heavy.example", 2, 0, 90)]
        rng = random.Random(42)
        heavy_first = sum(
            order_srv_targets(records, rng)[0][0] == "heavy.example" for _ in range(1000)
        )
        self.assertTrue(800 < heavy_first < 980, heavy_first)


class ServerResolverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.fetcher = FakeWellKnownFetcher()
        self.srv = FakeSrvResolver()
        self.resolver = ServerResolver(
            WellKnownResolver(self.clock, self.fetcher), self.srv, random.Random(0)
        )

    def resolve(self, name: str) -> ResolvedServer:
        return self.successResultOf(defer.ensureDeferred(self.resolver.resolve(name)))

    def well_known(self, name: str, delegated: str) -> None:
        url = "https://%s/.well-known/matrix/server" % name
        self.fetcher.answers[url] = json_response(b'{"m.server": "%s"}' % delegated.encode())

    def srv_records(self, name: str, records: list[SrvRecord]) -> None:
        self.srv.records[name] = records

    def test_ipv4_literal(self) -> None:
        """Step 1: an IPv4 literal is used directly on 8448, with no lookups."""
        self.assertEqual(
            self.resolve("192.0.2.7"),
            ResolvedServer("192.0.2.7", "192.0.2.7", (("192.0.2.7", 8448),)),
        )
        self.assertEqual(
            self.resolve("192.0.2.7:8449"),
            ResolvedServer("192.0.2.7:8449", "192.0.2.7", (("192.0.2.7", 8449),)),
        )
        self.assertEqual((self.fetcher.fetched, self.srv.lookups), ([], []))

    def test_ipv6_literal(self) -> None:
        """Step 1: an IPv6 literal keeps brackets in Host and drops them for TLS/connect."""
        self.assertEqual(
            self.resolve("[2001:db8::1]"),
            ResolvedServer("[2001:db8::1]", "2001:db8::1", (("2001:db8::1", 8448),)),
        )
        self.assertEqual(
            self.resolve("[2001:db8::1]:443"),
            ResolvedServer("[2001:db8::1]:443", "2001:db8::1", (("2001:db8::1", 443),)),
        )
        self.assertEqual((self.fetcher.fetched, self.srv.lookups), ([], []))

    def test_hostname_with_port(self) -> None:
        """Step 2: an explicit port skips .well-known and SRV; Host includes the port."""
        self.assertEqual(
            self.resolve("example.org:8449"),
            ResolvedServer("example.org:8449", "example.org", (("example.org", 8449),)),
        )
        self.assertEqual((self.fetcher.fetched, self.srv.lookups), ([], []))

    def test_delegated_ip_literal(self) -> None:
        """Step 3.1: a delegated IP literal is used with its port or 8448, cert for the IP."""
        self.well_known("example.org", "192.0.2.9")
        self.assertEqual(
            self.resolve("example.org"),
            ResolvedServer("192.0.2.9", "192.0.2.9", (("192.0.2.9", 8448),)),
        )
        self.well_known("v6.example", "[2001:db8::9]:8000")
        self.assertEqual(
            self.resolve("v6.example"),
            ResolvedServer("[2001:db8::9]:8000", "2001:db8::9", (("2001:db8::9", 8000),)),
        )
        self.assertEqual(self.srv.lookups, [])

    def test_delegated_hostname_with_port(self) -> None:
        """Step 3.2: a delegated host with port is used as is, without SRV."""
        self.well_known("example.org", "matrix.example.net:443")
        self.srv_records("_matrix-fed._tcp.matrix.example.net", [(0, 0, 9999, "x.example")])
        self.assertEqual(
            self.resolve("example.org"),
            ResolvedServer(
                "matrix.example.net:443", "matrix.example.net", (("matrix.example.net", 443),)
            ),
        )
        self.assertEqual(self.srv.lookups, [])

    def test_delegated_hostname_uses_matrix_fed_srv(self) -> None:
        """Step 3.3: a delegated host without port is looked up via _matrix-fed._tcp."""
        self.well_known("example.org", "matrix.example.net")
        self.srv_records("_matrix-fed._tcp.matrix.example.net", [(0, 0, 8443, "fed.example.net.")])
        self.srv_records("_matrix._tcp.matrix.example.net", [(0, 0, 1111, "old.example.net")])
        self.assertEqual(
            self.resolve("example.org"),
            ResolvedServer(
                "matrix.example.net", "matrix.example.net", (("fed.example.net", 8443),)
            ),
        )
        self.assertEqual(self.srv.lookups, ["_matrix-fed._tcp.matrix.example.net"])

    def test_delegated_hostname_falls_back_to_deprecated_srv(self) -> None:
        """Step 3.4: without _matrix-fed, the deprecated _matrix._tcp record is used."""
        self.well_known("example.org", "matrix.example.net")
        self.srv_records("_matrix._tcp.matrix.example.net", [(0, 0, 1111, "old.example.net")])
        self.assertEqual(self.resolve("example.org").targets, (("old.example.net", 1111),))
        self.assertEqual(
            self.srv.lookups,
            ["_matrix-fed._tcp.matrix.example.net", "_matrix._tcp.matrix.example.net"],
        )

    def test_delegated_hostname_without_srv_uses_8448(self) -> None:
        """Step 3.5: no SRV for the delegated host means <delegated>:8448."""
        self.well_known("example.org", "matrix.example.net")
        self.assertEqual(
            self.resolve("example.org"),
            ResolvedServer(
                "matrix.example.net", "matrix.example.net", (("matrix.example.net", 8448),)
            ),
        )

    def test_no_well_known_uses_srv_of_server_name(self) -> None:
        """Step 4: without delegation, SRV of the server name gives the targets."""
        self.srv_records("_matrix-fed._tcp.example.org", [(0, 0, 443, "m.example.org")])
        self.assertEqual(
            self.resolve("example.org"),
            ResolvedServer("example.org", "example.org", (("m.example.org", 443),)),
        )

    def test_no_well_known_deprecated_srv(self) -> None:
        """Step 4 (deprecated): _matrix._tcp is used when _matrix-fed._tcp is absent."""
        self.srv_records("_matrix._tcp.example.org", [(0, 0, 8000, "legacy.example.org")])
        self.assertEqual(self.resolve("example.org").targets, (("legacy.example.org", 8000),))

    def test_nothing_found_uses_8448(self) -> None:
        """Step 5: no delegation and no SRV means <hostname>:8448."""
        self.assertEqual(
            self.resolve("example.org"),
            ResolvedServer("example.org", "example.org", (("example.org", 8448),)),
        )
        self.assertEqual(
            self.srv.lookups, ["_matrix-fed._tcp.example.org", "_matrix._tcp.example.org"]
        )

    def test_invalid_delegation_falls_back_to_srv(self) -> None:
        """An invalid m.server is ignored and the server name's own SRV is used."""
        self.well_known("example.org", "not a name")
        self.srv_records("_matrix-fed._tcp.example.org", [(0, 0, 443, "m.example.org")])
        self.assertEqual(self.resolve("example.org").targets, (("m.example.org", 443),))

    def test_srv_targets_follow_priority(self) -> None:
        """SRV targets are tried lowest priority first."""
        self.srv_records(
            "_matrix-fed._tcp.example.org",
            [(20, 0, 3, "third.example"), (0, 5, 1, "first.example"), (10, 5, 2, "second.example")],
        )
        self.assertEqual(
            self.resolve("example.org").targets,
            (("first.example", 1), ("second.example", 2), ("third.example", 3)),
        )

    def test_invalid_srv_targets_are_dropped(self) -> None:
        """SRV targets that break the server name rules are never used; with none left,
        discovery goes on as if there were no record."""
        bad = ["bad\nname.example", "xn--zz.example", "under_score.example", "1.2.3", "a..b"]
        self.srv_records(
            "_matrix-fed._tcp.example.org",
            [(0, 0, 1, target) for target in bad] + [(5, 0, 2, "good.example")],
        )
        self.assertEqual(self.resolve("example.org").targets, (("good.example", 2),))
        self.srv_records("_matrix-fed._tcp.example.net", [(0, 0, 1, t) for t in bad])
        self.assertEqual(self.resolve("example.net").targets, (("example.net", 8448),))

    def test_srv_dot_target_means_unavailable(self) -> None:
        """A lone SRV target of "." means the service is unavailable: ConnectError."""
        self.srv_records("_matrix-fed._tcp.example.org", [(0, 0, 0, ".")])
        d = defer.ensureDeferred(self.resolver.resolve("example.org"))
        self.failureResultOf(d, ConnectError)

    def test_srv_server_failure_falls_through(self) -> None:
        """A DNS server failure on SRV is treated like no record."""
        self.srv.errors["_matrix-fed._tcp.example.org"] = DNSServerError("SERVFAIL")
        self.srv_records("_matrix._tcp.example.org", [(0, 0, 8000, "legacy.example.org")])
        self.assertEqual(self.resolve("example.org").targets, (("legacy.example.org", 8000),))

    def test_invalid_server_name(self) -> None:
        """An invalid server name fails before any lookup."""
        for name in ("", "bad name", "example.org:0", "[::1", "a..b"):
            d = defer.ensureDeferred(self.resolver.resolve(name))
            self.failureResultOf(d, InvalidServerNameError)
        self.assertEqual((self.fetcher.fetched, self.srv.lookups), ([], []))

    def test_well_known_result_is_cached_across_resolutions(self) -> None:
        """Two resolutions within the cache lifetime fetch .well-known once."""
        self.well_known("example.org", "matrix.example.net:443")
        self.resolve("example.org")
        self.resolve("example.org")
        self.assertEqual(len(self.fetcher.fetched), 1)


class LazySrvResolverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryNetworkReactor()
        resolv_conf = self.mktemp()
        with open(resolv_conf, "w") as f:
            f.write("nameserver 192.0.2.53\n")
        self.patch(discovery, "RESOLV_CONF_PATH", resolv_conf)
        # Anything sent through the global reactor instead would open a real socket.
        self.patch(global_reactor, "listenUDP", self.fail_global)
        self.patch(global_reactor, "callLater", self.fail_global)

    def fail_global(self, *args: object, **kwargs: object) -> None:
        self.fail("the global reactor was used")

    def test_construction_creates_nothing(self) -> None:
        """Building the lazy resolver neither creates a DNS client nor schedules anything."""
        lazy = LazySrvResolver(self.reactor)
        self.assertFalse(lazy.created)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.reactor.udp_ports, [])

    def test_lookup_runs_on_the_given_reactor(self) -> None:
        """An SRV lookup sends its query and gets its answer through the injected reactor."""
        lazy = LazySrvResolver(self.reactor)
        d = lazy.lookupService("_matrix-fed._tcp.example.org")
        self.assertTrue(lazy.created)
        [port] = self.reactor.udp_ports
        [(datagram, address)] = port.sent
        self.assertEqual(address, ("192.0.2.53", 53))
        query = dns.Message()
        query.fromStr(datagram)
        self.assertEqual(
            [(q.name.name, q.type) for q in query.queries],
            [(b"_matrix-fed._tcp.example.org", dns.SRV)],
        )

        answer = dns.Message(id=query.id, answer=True)
        answer.queries = query.queries
        answer.answers = [
            dns.RRHeader(
                name=b"_matrix-fed._tcp.example.org",
                type=dns.SRV,
                payload=dns.Record_SRV(10, 5, 8443, b"matrix.example.org"),
            )
        ]
        port.protocol.datagramReceived(answer.toStr(), ("192.0.2.53", 53))
        answers, _authority, _additional = self.successResultOf(d)
        self.assertEqual(
            [(a.payload.target.name, a.payload.port) for a in answers],
            [(b"matrix.example.org", 8443)],
        )
