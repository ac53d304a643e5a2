"""Acceptance tests: the notary's sources under federation traffic as real peers send it.

Trusted upstream notaries (dead origins they know, a hanging one beside an honest one,
a lie they tell while the origin is down) and the local IP policy, through the whole
wiring (:class:`~tests.notary_site.RawNotarySite`) with fake servers and a fake reactor.
Origins that are not given a fake server refuse the connection at once.
"""

from typing import Any

from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.backoff import BACKOFF_JITTER
from tests.fakes import FakeNotaryResource, FakeOriginResource, HangingResource
from tests.federation_traffic import (
    DAY_MS,
    notary_with_origins,
    post_body,
    server_keys,
    trusted_notary,
    verify_keys_by_server,
)
from tests.notary_site import START_S, RawNotarySite
from tests.utils import key_id, make_signed_server_keys, new_signing_key, verify_key_base64

QUERY = b"/_matrix/key/v2/query"
UPSTREAM = "upstream.test"
START_MS = START_S * 1000


def origin_entry(server_name: str, signing_key: Any) -> dict[str, Any]:
    """The origin-signed keys a notary holds for ``server_name``, valid for a day."""
    return make_signed_server_keys(server_name, [signing_key], START_MS + DAY_MS)


class DeadOriginsTests(SynchronousTestCase):
    """A trusted notary answers for origins that are down."""

    def test_eight_queries_in_a_row_about_dead_origins_are_all_served(self) -> None:
        """8 one-server queries in a row, a second apart, about 8 dead origins the
        trusted notary knows, are all served with the notary's copy of their keys."""
        upstream_key = new_signing_key("u1")
        keys = {"dead%d.test" % i: new_signing_key("d%d" % i) for i in range(8)}
        upstream = FakeNotaryResource(
            UPSTREAM, upstream_key, {name: [origin_entry(name, key)] for name, key in keys.items()}
        )
        site = notary_with_origins(
            {UPSTREAM: upstream}, {"trusted_key_servers": [trusted_notary(UPSTREAM, upstream_key)]}
        )
        served = []
        for name, key in keys.items():
            entries = server_keys(site.request(b"GET", QUERY + b"/" + name.encode()))
            if verify_keys_by_server(entries) == {name: {key_id(key): verify_key_base64(key)}}:
                served.append(name)
            site.reactor.advance(1)
        self.assertEqual(served, list(keys))


class HangingNotaryTests(SynchronousTestCase):
    """With ``min_agreeing_sources: 1`` the first trusted answer settles a server."""

    def answered_as_fast_as_the_honest_notary(self, hanging_first: bool) -> None:
        hanging_key, honest_key, origin_key = (new_signing_key(v) for v in ("h1", "t1", "o1"))
        hanging = HangingResource()
        honest = FakeNotaryResource(
            "honest.test", honest_key, {"origin.test": [origin_entry("origin.test", origin_key)]}
        )
        notaries = [
            trusted_notary("hanging.test", hanging_key),
            trusted_notary("honest.test", honest_key),
        ]
        site = notary_with_origins(
            {"hanging.test": hanging, "honest.test": honest},
            {
                "trusted_key_servers": notaries if hanging_first else notaries[::-1],
                "key_trust": {"min_agreeing_sources": 1},
            },
        )
        start_s = site.reactor.seconds()
        response = site.request(b"POST", QUERY, post_body({"origin.test": {}}))
        elapsed_s = site.reactor.seconds() - start_s

        self.assertEqual(
            verify_keys_by_server(server_keys(response)),
            {"origin.test": {key_id(origin_key): verify_key_base64(origin_key)}},
        )
        self.assertEqual((hanging.hits, len(honest.bodies)), (1, 1), "both notaries were asked")
        timeout_s = site.services.config.federation.request_timeout_ms / 1000
        self.assertLessEqual(elapsed_s, 1, "request_timeout is %gs" % timeout_s)

    def test_hanging_notary_listed_first(self) -> None:
        """With the hanging notary listed first and the origin down, the honest
        notary's answer is served as soon as it is in, not at the request timeout."""
        self.answered_as_fast_as_the_honest_notary(hanging_first=True)

    def test_hanging_notary_listed_second(self) -> None:
        """With the honest notary listed first and the origin down, its answer is
        served as soon as it is in, without waiting for the hanging one."""
        self.answered_as_fast_as_the_honest_notary(hanging_first=False)


class ProvisionalKeyTests(SynchronousTestCase):
    """``key_trust.confirm_notary_keys_directly``: confirmation follows the limiter."""

    def test_a_lie_is_replaced_within_one_backoff_after_the_origin_comes_back(self) -> None:
        """A key a notary lied about while the origin was down is replaced by the
        origin's real key within ``failure_backoff_initial`` (plus jitter) of the
        origin's failure, with no further query asking for it."""
        upstream_key = new_signing_key("u1")
        real_key, liar_key = new_signing_key("o1"), new_signing_key("o1")  # one key id
        liar = FakeNotaryResource(
            UPSTREAM, upstream_key, {"origin.test": [origin_entry("origin.test", liar_key)]}
        )
        site = notary_with_origins(
            {UPSTREAM: liar},
            {
                "trusted_key_servers": [trusted_notary(UPSTREAM, upstream_key)],
                "key_trust": {"confirm_notary_keys_directly": True},
            },
        )
        kid = key_id(real_key)
        failed_at_s = site.reactor.seconds()
        lie = verify_keys_by_server(server_keys(site.request(b"GET", QUERY + b"/origin.test")))
        self.assertEqual(lie, {"origin.test": {kid: verify_key_base64(liar_key)}})

        site.reactor.advance(1)
        origin = FakeOriginResource(real_key, "origin.test", site.reactor)
        bring_back(site, "origin.test", origin)
        backoff_s = site.services.config.ratelimit.failure_backoff_initial_ms / 1000
        deadline_s = failed_at_s + backoff_s * (1 + BACKOFF_JITTER) + 1
        while origin.hits == 0 and site.reactor.seconds() < deadline_s:
            site.reactor.advance(1)
            site.deliver()

        self.assertGreater(origin.hits, 0, "the origin was asked within one backoff, unprompted")
        site.deliver()
        served = verify_keys_by_server(server_keys(site.request(b"GET", QUERY + b"/origin.test")))
        self.assertEqual(served, {"origin.test": {kid: verify_key_base64(real_key)}})


class IpPolicyTests(SynchronousTestCase):
    """Names the local policy refuses are never sent to notaries."""

    def names_sent_to_the_notary(self, config: dict[str, Any], names: list[str]) -> set[str]:
        upstream_key = new_signing_key("u1")
        upstream = FakeNotaryResource(UPSTREAM, upstream_key)
        site = notary_with_origins(
            {UPSTREAM: upstream},
            {"trusted_key_servers": [trusted_notary(UPSTREAM, upstream_key)], **config},
        )
        response = site.request(b"POST", QUERY, post_body({name: {} for name in names}))
        self.assertEqual(server_keys(response), [])
        return {name for body in upstream.bodies for name in body["server_keys"]}

    def test_denied_ip_literals_are_never_sent_to_notaries(self) -> None:
        """IP literals in denied ranges (``10.0.0.1``, ``[fd00::1]:8448``) asked about
        in a POST never reach the trusted notary; a public IP literal and a host name
        asked with them do."""
        sent = self.names_sent_to_the_notary(
            {}, ["10.0.0.1", "[fd00::1]:8448", "93.184.215.14:8448", "gone.test"]
        )
        self.assertEqual(sent, {"93.184.215.14:8448", "gone.test"})

    def test_allow_listed_ranges_are_sent(self) -> None:
        """An IP literal in a range carved out by ``ip_range_allowlist`` is asked of the
        notary like any other name, so the refusal follows the configured policy."""
        sent = self.names_sent_to_the_notary(
            {"federation": {"ip_range_allowlist": ["10.0.0.0/8"]}}, ["10.0.0.1", "[fd00::1]:8448"]
        )
        self.assertEqual(sent, {"10.0.0.1"})


def bring_back(site: RawNotarySite, server_name: str, resource: Any) -> None:
    """Make a server that refused connections answer from ``resource`` from now on."""
    site.client._stubs[server_name] = StubTreq(resource)
