"""Tests for :mod:`keyring_module.keyring.api`: the requester-side Keyring, end to end.

Keyring → fetcher chain → OriginKeyFetcher/NotaryKeyFetcher → fake servers, all on a
``Clock`` with no network and no sleeps.
"""

import json
import tracemalloc
from typing import Any, Callable, Iterable, Mapping, Optional, cast

from canonicaljson import encode_canonical_json
from signedjson.sign import sign_json
from signedjson.types import SigningKey
from twisted.internet import defer
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from zope.interface import implementer

from keyring_module.config import OldSigningKey, RateLimitConfig
from keyring_module.errors import KeyVerificationError, VerificationFailure
from keyring_module.eventhashes import event_id_of
from keyring_module.fetchers.base import ServerKeysReport
from keyring_module.fetchers.chain import KeyFetcherChain
from keyring_module.fetchers.notary_client import NotaryKeyFetcher
from keyring_module.fetchers.origin import OriginKeyFetcher
from keyring_module.json_codec import MAX_JSON_DEPTH
from keyring_module.keyring.api import Keyring
from keyring_module.model import SOURCE_ORIGIN, FetchPurpose, KeyRequest, StoredKey
from keyring_module.ratelimit import OriginRateLimiter
from keyring_module.redaction import redact_event
from keyring_module.roomversions import ROOM_VERSIONS
from keyring_module.signing import OwnKeys
from keyring_module.storage.memory import InMemoryKeyStore
from keyring_module.validation import parse_server_keys_response
from keyring_module.verify import MAX_KEY_VALIDITY_MS
from keyring_module.xmatrix import parse_x_matrix_header, signed_request_object
from tests.fakes import (
    FakeFederationClient,
    FakeNotaryResource,
    FakeOriginResource,
    HangingResource,
)
from tests.keyring_fixtures import REQUEST_TIMEOUT_S, TimeoutClient
from tests.utils import (
    key_id,
    make_signed_server_keys,
    make_trusted_key_server,
    new_signing_key,
    sign_as,
    verify_key_bytes,
)

START_S = 1_700_000_000
DAY_MS = 24 * 60 * 60 * 1000
OURS = "ours.test"
ORIGIN = "origin.test"
OTHER = "other.test"
THIRD = "third.test"
DEAD = "dead.test"
NOTARY = "notary.test"
TIMEOUT_MS = int(REQUEST_TIMEOUT_S * 1000)


class RecordingChain:
    """Wraps a chain and records every ``get_keys`` call."""

    def __init__(self, chain: KeyFetcherChain) -> None:
        self.chain = chain
        self.calls: list[tuple[list[KeyRequest], bool]] = []

    async def get_keys(
        self,
        requests: Iterable[KeyRequest],
        *,
        use_cache: bool = True,
        on_server: Optional[ServerKeysReport] = None,
    ) -> Mapping[str, Mapping[str, StoredKey]]:
        requests = list(requests)
        self.calls.append((requests, use_cache))
        return await self.chain.get_keys(requests, use_cache=use_cache, on_server=on_server)


def sign_event(event: dict[str, Any], server_name: str, key: SigningKey, version: str) -> None:
    """Add ``server_name``'s signature over the redacted event, in place."""
    redacted = redact_event(event, version)
    redacted.pop("signatures", None)
    signed = sign_json(redacted, server_name, key)
    event.setdefault("signatures", {}).setdefault(server_name, {}).update(
        signed["signatures"][server_name]
    )


def reason_of(d: "defer.Deferred[None]") -> Optional[tuple[VerificationFailure, str]]:
    """None for a success, else the KeyVerificationError's reason and detail (consuming
    the failure)."""
    outcome: list[Optional[tuple[VerificationFailure, str]]] = []

    def failed(f: Failure) -> None:
        error = f.trap(KeyVerificationError) and f.value
        assert isinstance(error, KeyVerificationError)
        outcome.append((error.reason, error.detail))

    d.addCallbacks(lambda _: outcome.append(None), failed)
    assert outcome, "the Deferred has not fired"
    return outcome[0]


class KeyringTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START_S)
        self.origin_key = new_signing_key("o1")
        self.other_key = new_signing_key("t1")
        self.third_key = new_signing_key("h1")
        self.notary_key = new_signing_key("n1")
        self.origin = FakeOriginResource(self.origin_key, ORIGIN, self.clock)
        self.other = FakeOriginResource(self.other_key, OTHER, self.clock)
        self.third = FakeOriginResource(self.third_key, THIRD, self.clock)
        self.dead = HangingResource()
        self.notary = FakeNotaryResource(NOTARY, self.notary_key)
        self.resources: dict[str, Any] = {
            ORIGIN: self.origin,
            OTHER: self.other,
            THIRD: self.third,
            DEAD: self.dead,
            NOTARY: self.notary,
        }
        self.own_key = new_signing_key("own1")
        self.own_old_key = new_signing_key("own0")
        self.own_old_expired_ts = self.now_ms() - DAY_MS
        self.own_keys = OwnKeys(
            OURS,
            [self.own_key],
            [
                OldSigningKey(
                    key_id(self.own_old_key),
                    verify_key_bytes(self.own_old_key),
                    self.own_old_expired_ts,
                )
            ],
        )
        self.build()

    def build(
        self,
        *,
        timeouts: bool = True,
        compromised: frozenset[bytes] = frozenset(),
        fetch_timeout_ms: int = 30_000,
    ) -> None:
        self.outbound = FakeFederationClient(self.resources)
        client: Any = TimeoutClient(self.outbound, self.clock) if timeouts else self.outbound
        self.store = InMemoryKeyStore()
        self.limiter = OriginRateLimiter(self.clock, RateLimitConfig(), random=lambda: 0.5)
        origin_fetcher = OriginKeyFetcher(client, self.limiter, self.clock)
        notary_fetcher = NotaryKeyFetcher(
            client, [make_trusted_key_server(NOTARY, self.notary_key)], self.limiter, self.clock
        )
        self.chain = RecordingChain(
            KeyFetcherChain(self.store, origin_fetcher, notary_fetcher, self.clock)
        )
        self.origin_chain = RecordingChain(
            KeyFetcherChain(self.store, origin_fetcher, None, self.clock, order=("origin",))
        )
        self.keyring = Keyring(
            self.own_keys,
            self.store,
            self.chain,
            self.clock,
            compromised_keys=compromised,
            origin_chain=self.origin_chain,
            fetch_timeout_ms=fetch_timeout_ms,
        )

    # -- helpers -------------------------------------------------------------------

    def now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    def settle(self) -> None:
        """Run every reactor turn and deliver every fake response that is ready."""
        for _ in range(6):
            self.clock.advance(0)
            self.outbound.flush()

    def origin_gets(self, server_name: str = ORIGIN) -> int:
        return len([r for r in self.outbound.requests_to(server_name) if r.method == "GET"])

    def signed(self, server_name: str, key: SigningKey, **fields: Any) -> dict[str, Any]:
        obj: dict[str, Any] = {"hello": "world", **fields}
        return sign_as(obj, server_name, key)

    def event(
        self,
        version: str,
        sender_server: str = ORIGIN,
        key: Optional[SigningKey] = None,
        ts: Optional[int] = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """A signed m.room.message event from ``@alice:<sender_server>``."""
        event: dict[str, Any] = {
            "type": "m.room.message",
            "room_id": "!room:hub.test",
            "sender": "@alice:%s" % sender_server,
            "origin_server_ts": self.now_ms() if ts is None else ts,
            "content": {"msgtype": "m.text", "body": "hello"},
            "depth": 3,
            "prev_events": [],
            "auth_events": [],
            "hashes": {"sha256": "x"},
            "unsigned": {"age": 5},
        }
        event.update(fields)
        sign_event(event, sender_server, key or self.origin_key, version)
        return event

    def ok(self, d: "defer.Deferred[Any]") -> Any:
        self.settle()
        return self.successResultOf(d)

    def fails(
        self, d: "defer.Deferred[Any]", reason: Optional[VerificationFailure] = None
    ) -> KeyVerificationError:
        """The KeyVerificationError ``d`` failed with, whose reason is ``reason`` if given."""
        self.settle()
        failure: Failure = self.failureResultOf(d, KeyVerificationError)
        error = failure.value
        assert isinstance(error, KeyVerificationError)
        if reason is not None:
            self.assertIs(error.reason, reason, str(error))
        return error


class VerifyJsonTests(KeyringTestCase):
    def test_valid_object_fetches_once_then_uses_the_cache(self) -> None:
        """A correctly signed object verifies after one origin fetch; the next needs none."""
        obj = self.signed(ORIGIN, self.origin_key)
        self.ok(self.keyring.verify_json_for_server(ORIGIN, obj, self.now_ms()))
        self.assertEqual(self.origin_gets(), 1)
        d = self.keyring.verify_json_for_server(ORIGIN, obj, self.now_ms())
        self.assertIsNone(self.successResultOf(d))  # already fired: no reactor turn needed
        self.assertEqual(self.origin_gets(), 1)

    def test_bad_signature_names_server_key_and_reason(self) -> None:
        """A tampered object fails with the server, the key id and "invalid signature"."""
        obj = self.signed(ORIGIN, self.origin_key)
        obj["hello"] = "tampered"
        error = self.fails(
            self.keyring.verify_json_for_server(ORIGIN, obj, self.now_ms()),
            VerificationFailure.BAD_SIGNATURE,
        )
        self.assertEqual(error.server_name, ORIGIN)
        self.assertEqual(error.key_ids, (key_id(self.origin_key),))
        self.assertEqual(error.detail, "invalid signature")

    def test_unsigned_object_fails_without_a_fetch(self) -> None:
        """An object not signed by the server fails at once and fetches nothing."""
        obj = self.signed(OTHER, self.other_key)
        error = self.fails(
            self.keyring.verify_json_for_server(ORIGIN, obj, self.now_ms()),
            VerificationFailure.NOT_SIGNED,
        )
        self.assertIn("not signed by origin.test", error.detail)
        self.assertEqual(self.outbound.requests, [])

    def test_unknown_key_id_fails_after_fetch(self) -> None:
        """A key id the origin does not publish fails after the fetch, saying so."""
        stranger = new_signing_key("zz")
        obj = self.signed(ORIGIN, stranger)
        error = self.fails(
            self.keyring.verify_json_for_server(ORIGIN, obj, self.now_ms()),
            VerificationFailure.NO_USABLE_KEY,
        )
        self.assertEqual(error.key_ids, ("ed25519:zz",))
        self.assertIn("no usable key", error.detail)
        self.assertIn("even after fetching", error.detail)
        self.assertEqual(self.origin_gets(), 1)

    def test_wrong_key_under_published_key_id_fails(self) -> None:
        """A signature made by another key under the origin's key id is invalid."""
        impostor = new_signing_key("o1")  # same key id, different key
        obj = self.signed(ORIGIN, impostor)
        error = self.fails(
            self.keyring.verify_json_for_server(ORIGIN, obj, self.now_ms()),
            VerificationFailure.BAD_SIGNATURE,
        )
        self.assertEqual(error.detail, "invalid signature")

    def test_non_object_fails(self) -> None:
        """Something that is not a JSON object fails at once."""
        error = self.fails(
            self.keyring.verify_json_for_server(ORIGIN, ["x"], self.now_ms()),  # type: ignore[arg-type]
            VerificationFailure.MALFORMED_OBJECT,
        )
        self.assertEqual(error.detail, "not a JSON object")

    def test_unreachable_origin_fails(self) -> None:
        """An origin nobody can reach (and no notary knows) fails the object."""
        key = new_signing_key("u1")
        obj = self.signed("unknown.test", key)
        error = self.fails(
            self.keyring.verify_json_for_server("unknown.test", obj, self.now_ms()),
            VerificationFailure.NO_USABLE_KEY,
        )
        self.assertEqual(error.server_name, "unknown.test")
        self.assertIn("no usable key", error.detail)

    def test_results_in_request_order(self) -> None:
        """verify_json_objects answers each request in order, failures in place."""
        good = self.signed(ORIGIN, self.origin_key)
        bad = dict(good, hello="bad")
        other = self.signed(OTHER, self.other_key)
        now = self.now_ms()
        results = self.keyring.verify_json_objects(
            [(ORIGIN, good, now), (ORIGIN, bad, now), (OTHER, other, now)]
        )
        self.settle()
        self.assertIsNone(self.successResultOf(results[0]))
        self.failureResultOf(results[1], KeyVerificationError)
        self.assertIsNone(self.successResultOf(results[2]))

    def test_compromised_key_is_refused(self) -> None:
        """A key on the compromised list is never used, even with a valid signature."""
        self.build(compromised=frozenset({verify_key_bytes(self.origin_key)}))
        obj = self.signed(ORIGIN, self.origin_key)
        error = self.fails(
            self.keyring.verify_json_for_server(ORIGIN, obj, self.now_ms()),
            VerificationFailure.NO_USABLE_KEY,
        )
        self.assertIn("no usable key", error.detail)


class ValidityTests(KeyringTestCase):
    def test_valid_until_ts_is_inclusive(self) -> None:
        """A key counts at exactly valid_until_ts, and not one millisecond later."""
        valid_until = self.now_ms() + DAY_MS
        obj = self.signed(ORIGIN, self.origin_key)
        self.ok(self.keyring.verify_json_for_server(ORIGIN, obj, valid_until))
        error = self.fails(
            self.keyring.verify_json_for_server(ORIGIN, obj, valid_until + 1),
            VerificationFailure.NO_USABLE_KEY,
        )
        self.assertIn("no usable key", error.detail)

    def test_old_key_expired_ts_is_inclusive(self) -> None:
        """An old key counts for events up to and including its expired_ts."""
        old = new_signing_key("old")
        expired_ts = self.now_ms() - 1000
        self.origin.body_override = make_signed_server_keys(
            ORIGIN,
            [self.origin_key],
            self.now_ms() + DAY_MS,
            old_keys={key_id(old): (verify_key_bytes(old), expired_ts)},
        )
        obj = self.signed(ORIGIN, old)
        self.ok(self.keyring.verify_json_for_server(ORIGIN, obj, expired_ts))
        error = self.fails(
            self.keyring.verify_json_for_server(ORIGIN, obj, expired_ts + 1),
            VerificationFailure.NO_USABLE_KEY,
        )
        self.assertIn("no usable key", error.detail)

    def test_seven_day_cap(self) -> None:
        """Beyond now + 7 days fails fast with no fetch; exactly now + 7 days verifies."""
        self.origin.valid_for_ms = 30 * DAY_MS
        obj = self.signed(ORIGIN, self.origin_key)
        cap = self.now_ms() + MAX_KEY_VALIDITY_MS
        error = self.fails(
            self.keyring.verify_json_for_server(ORIGIN, obj, cap + 1),
            VerificationFailure.BEYOND_KEY_VALIDITY,
        )
        self.assertIn("more than 7 days ahead", error.detail)
        self.assertEqual(self.outbound.requests, [])
        self.ok(self.keyring.verify_json_for_server(ORIGIN, obj, cap))
        self.assertEqual(self.origin_gets(), 1)

    def test_room_v4_ignores_valid_until_ts_but_v5_does_not(self) -> None:
        """An event after the key's valid_until_ts verifies in room v4 but not in v5."""
        ts = self.now_ms() + 2 * DAY_MS  # the origin's keys are valid for one day
        (d4,) = self.keyring.verify_events([self.event("4", ts=ts)], "4")
        self.ok(d4)
        (d5,) = self.keyring.verify_events([self.event("5", ts=ts)], "5")
        self.assertIn("no usable key", self.fails(d5, VerificationFailure.NO_USABLE_KEY).detail)


class OwnKeyTests(KeyringTestCase):
    def test_own_current_key_needs_no_fetch(self) -> None:
        """Objects and events signed by our own current key verify with zero requests."""
        obj = self.signed(OURS, self.own_key)
        self.assertIsNone(
            self.successResultOf(self.keyring.verify_json_for_server(OURS, obj, self.now_ms()))
        )
        (d,) = self.keyring.verify_events([self.event("10", OURS, self.own_key)], "10")
        self.assertIsNone(self.successResultOf(d))
        self.settle()
        self.assertEqual(self.outbound.requests, [])
        self.assertEqual(self.chain.calls, [])

    def test_own_old_key_counts_until_its_expiry(self) -> None:
        """Our old key verifies objects up to its expired_ts, without any request."""
        obj = self.signed(OURS, self.own_old_key)
        self.ok(self.keyring.verify_json_for_server(OURS, obj, self.own_old_expired_ts))
        error = self.fails(
            self.keyring.verify_json_for_server(OURS, obj, self.own_old_expired_ts + 1),
            VerificationFailure.NO_USABLE_KEY,
        )
        self.assertIn("no usable key", error.detail)
        self.assertEqual(self.outbound.requests, [])

    def test_own_bad_signature_fails_without_fetch(self) -> None:
        """A bad signature claiming to be ours fails at once, with no request."""
        obj = self.signed(OURS, new_signing_key("own1"))
        error = self.fails(
            self.keyring.verify_json_for_server(OURS, obj, self.now_ms()),
            VerificationFailure.BAD_SIGNATURE,
        )
        self.assertEqual(error.detail, "invalid signature")
        self.assertEqual(self.outbound.requests, [])


class EventTests(KeyringTestCase):
    def test_room_v1_needs_the_event_id_server_too(self) -> None:
        """In room v1 the event id's server must sign as well as the sender's."""
        event = self.event("1", event_id="$abc:other.test")
        (d,) = self.keyring.verify_events([event], "1")
        error = self.fails(d)
        self.assertEqual(error.server_name, OTHER)
        sign_event(event, OTHER, self.other_key, "1")
        (d,) = self.keyring.verify_events([event], "1")
        self.ok(d)

    def test_room_v2_needs_the_event_id_server_too(self) -> None:
        """Room v2 has the same rule as v1."""
        event = self.event("2", event_id="$abc:other.test")
        (d,) = self.keyring.verify_events([event], "2")
        self.assertEqual(self.fails(d).server_name, OTHER)

    def test_room_v3_and_later_need_only_the_sender(self) -> None:
        """From room v3 on only the sender's server signs; an event_id field must be the
        event's reference hash (its server is never asked to sign)."""
        for version in ("3", "6", "10", "11"):
            event = self.event(version)
            with_id = dict(event, event_id=event_id_of(event, ROOM_VERSIONS[version]))
            wrong_id = dict(event, event_id="$abc:other.test")
            d, d_with_id, d_wrong = self.keyring.verify_events([event, with_id, wrong_id], version)
            self.ok(d)
            self.ok(d_with_id)
            self.fails(d_wrong, VerificationFailure.EVENT_ID_MISMATCH)

    def test_restricted_join_needs_the_authorising_server(self) -> None:
        """A v8+ join via another user's server needs that server's signature too."""
        for version in ("8", "10"):
            event = self.event(
                version,
                type="m.room.member",
                state_key="@alice:origin.test",
                content={
                    "membership": "join",
                    "join_authorised_via_users_server": "@bob:third.test",
                },
            )
            (d,) = self.keyring.verify_events([event], version)
            self.assertEqual(self.fails(d).server_name, THIRD)
            sign_event(event, THIRD, self.third_key, version)
            (d,) = self.keyring.verify_events([event], version)
            self.ok(d)

    def test_join_authoriser_ignored_before_v8(self) -> None:
        """Before room v8 the authorising server's signature is not required."""
        event = self.event(
            "7",
            type="m.room.member",
            state_key="@alice:origin.test",
            content={"membership": "join", "join_authorised_via_users_server": "@bob:third.test"},
        )
        (d,) = self.keyring.verify_events([event], "7")
        self.ok(d)

    def test_change_to_a_redacted_field_keeps_the_signature_valid(self) -> None:
        """Signatures cover the redacted event: changing the message body keeps them valid."""
        event = self.event("10")
        event["content"] = {"msgtype": "m.text", "body": "changed after signing"}
        event["unsigned"] = {"age": 99}
        (d,) = self.keyring.verify_events([event], "10")
        self.ok(d)

    def test_change_to_a_preserved_field_breaks_the_signature(self) -> None:
        """Changing a field redaction preserves (membership, timestamp) breaks the signature."""
        member = self.event(
            "10",
            type="m.room.member",
            state_key="@alice:origin.test",
            content={"membership": "join", "displayname": "Alice"},
        )
        member["content"] = {"membership": "leave", "displayname": "Alice"}
        stamped = self.event("10")
        stamped["origin_server_ts"] += 1
        results = self.keyring.verify_events([member, stamped], "10")
        self.assertEqual(
            self.fails(results[0], VerificationFailure.BAD_SIGNATURE).detail, "invalid signature"
        )
        self.assertEqual(
            self.fails(results[1], VerificationFailure.BAD_SIGNATURE).detail, "invalid signature"
        )

    def test_each_event_is_judged_at_its_own_timestamp(self) -> None:
        """In one batch, an event inside the key's validity passes and a later one fails."""
        valid_until = self.now_ms() + DAY_MS
        early = self.event("10", ts=valid_until)
        late = self.event("10", ts=valid_until + 1)
        results = self.keyring.verify_events([early, late], "10")
        self.ok(results[0])
        self.assertIn(
            "no usable key", self.fails(results[1], VerificationFailure.NO_USABLE_KEY).detail
        )

    def test_one_bad_event_fails_alone(self) -> None:
        """Unsigned, garbage, unknown-key and wrong-key events fail; the rest of the batch passes."""
        good = [self.event("10", ts=self.now_ms() - i) for i in range(3)]
        unsigned = self.event("10")
        del unsigned["signatures"]
        garbage = self.event("10")
        garbage["signatures"][ORIGIN][key_id(self.origin_key)] = "!!not base64!!"
        unknown = self.event("10", key=new_signing_key("nope"))
        wrong = self.event("10", key=new_signing_key("o1"))
        malformed = {"type": "m.room.message", "sender": "not-a-user"}
        batch = [good[0], unsigned, good[1], garbage, unknown, wrong, malformed, good[2]]
        results = self.keyring.verify_events(batch, "10")
        self.settle()
        outcomes = [reason_of(d) for d in results]
        self.assertEqual(outcomes[0], None)
        self.assertEqual(outcomes[2], None)
        self.assertEqual(outcomes[7], None)
        self.assertEqual(outcomes[1], (VerificationFailure.NOT_SIGNED, "not signed by origin.test"))
        self.assertEqual(
            outcomes[3], (VerificationFailure.MALFORMED_SIGNATURE, "malformed signature")
        )
        unknown_reason, unknown_detail = outcomes[4] or (None, "")
        self.assertIs(unknown_reason, VerificationFailure.NO_USABLE_KEY)
        self.assertIn("even after fetching", unknown_detail)
        self.assertEqual(outcomes[5], (VerificationFailure.BAD_SIGNATURE, "invalid signature"))
        malformed_reason, malformed_detail = outcomes[6] or (None, "")
        self.assertIs(malformed_reason, VerificationFailure.MALFORMED_EVENT)
        self.assertIn("cannot tell who must sign", malformed_detail)
        self.assertEqual(self.origin_gets(), 1)

    def test_unknown_room_version_raises(self) -> None:
        """An unknown room version is a programming error, raised at once."""
        self.assertRaises(ValueError, self.keyring.verify_events, [], "99")

    def test_malformed_timestamp_fails_alone(self) -> None:
        """An event whose ``origin_server_ts`` is not an integer fails up front; the rest of the batch verifies."""
        good = self.event("10")
        text_ts = self.event("10")
        text_ts["origin_server_ts"] = "1"
        bool_ts = self.event("10", ts=True)
        other = self.event("10", ts=self.now_ms() - 1)
        results = self.keyring.verify_events([good, text_ts, bool_ts, other], "10")
        self.settle()
        outcomes = [reason_of(d) for d in results]
        self.assertEqual(outcomes[0], None)
        self.assertEqual(outcomes[3], None)
        for outcome in outcomes[1:3]:
            self.assertEqual(
                outcome,
                (
                    VerificationFailure.MALFORMED_EVENT,
                    "cannot tell who must sign: event has no integer origin_server_ts",
                ),
            )


class FetchTests(KeyringTestCase):
    def test_same_turn_requests_are_coalesced_with_the_highest_minimum(self) -> None:
        """Requests in one reactor turn make one fetch, asking for the highest time."""
        obj = self.signed(ORIGIN, self.origin_key)
        now = self.now_ms()
        d1 = self.keyring.verify_json_for_server(ORIGIN, obj, now - 5000)
        d2 = self.keyring.verify_json_for_server(ORIGIN, obj, now + 5000)
        d3 = self.keyring.verify_events([self.event("10", ts=now)], "10")[0]
        self.settle()
        for d in (d1, d2, d3):
            self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.origin_gets(), 1)
        self.assertEqual(len(self.chain.calls), 1)
        requests, use_cache = self.chain.calls[0]
        self.assertEqual(
            requests,
            # Marked as ours: the keyring's fetches may spend the limiter's reserve.
            [
                KeyRequest(
                    ORIGIN, frozenset({key_id(self.origin_key)}), now + 5000, FetchPurpose.OWN
                )
            ],
        )
        self.assertTrue(use_cache)

    def test_in_flight_fetch_is_shared(self) -> None:
        """A request made while a covering fetch is in flight waits for that fetch."""
        self.origin.hold = True
        obj = self.signed(ORIGIN, self.origin_key)
        now = self.now_ms()
        d1 = self.keyring.verify_json_for_server(ORIGIN, obj, now)
        self.settle()
        self.assertEqual(self.origin.hits, 1)
        d2 = self.keyring.verify_json_for_server(ORIGIN, obj, now - 1000)
        self.settle()
        self.assertNoResult(d1)
        self.assertNoResult(d2)
        self.origin.release()
        self.settle()
        self.assertIsNone(self.successResultOf(d1))
        self.assertIsNone(self.successResultOf(d2))
        self.assertEqual(self.origin.hits, 1)
        self.assertEqual(len(self.chain.calls), 1)

    def test_ten_thousand_events_from_100_origins_make_100_requests(self) -> None:
        """A cold batch of 10,000 events from 100 origins asks each origin exactly once."""
        keys = {"o%03d.test" % i: new_signing_key("k%d" % i) for i in range(100)}
        for name, key in keys.items():
            self.resources[name] = FakeOriginResource(key, name, self.clock)
        self.build()
        names = sorted(keys)
        events = []
        for i in range(10_000):
            name = names[i % 100]
            event = {
                "type": "m.room.message",
                "room_id": "!big:hub.test",
                "sender": "@u%d:%s" % (i, name),
                "origin_server_ts": self.now_ms() - i,
                "content": {"body": "x" * 20},
                "depth": i,
                "prev_events": [],
                "auth_events": [],
                "hashes": {"sha256": "x"},
            }
            sign_event(event, name, keys[name], "10")
            events.append(event)
        results = self.keyring.verify_events(events, "10")
        self.settle()
        gets = [r for r in self.outbound.requests if r.method == "GET"]
        self.assertEqual(len(gets), 100)
        self.assertEqual({r.server_name for r in gets}, set(names))
        self.assertEqual(len(self.chain.calls), 1)
        self.assertEqual(self.successResultOf(defer.gatherResults(results)), [None] * len(events))

    def test_dead_origin_fails_within_timeout_then_fast_while_backed_off(self) -> None:
        """Events of a dead origin fail at the request timeout, then at once while it is backed off."""
        dead_key = new_signing_key("d1")
        live = self.event("10")
        dead = self.event("10", DEAD, dead_key)
        live_d, dead_d = self.keyring.verify_events([live, dead], "10")
        self.settle()
        self.clock.advance(TIMEOUT_MS / 1000 - 0.001)
        self.settle()
        self.assertNoResult(dead_d)
        self.clock.advance(0.001)
        self.settle()
        self.assertIn("no usable key", self.fails(dead_d, VerificationFailure.NO_USABLE_KEY).detail)
        self.assertIsNone(self.successResultOf(live_d))
        self.assertEqual(self.dead.hits, 1)

        # Backed off: the next attempt fails within the same turn, without a request.
        (again,) = self.keyring.verify_events([dead], "10")
        self.settle()
        self.assertIn("no usable key", self.fails(again, VerificationFailure.NO_USABLE_KEY).detail)
        self.assertEqual(self.dead.hits, 1)

        # Once the backoff (30 s after the first failure) has passed, it is tried again.
        self.clock.advance(30)
        (later,) = self.keyring.verify_events([dead], "10")
        self.settle()
        self.assertNoResult(later)
        self.assertEqual(self.dead.hits, 2)
        self.clock.advance(TIMEOUT_MS / 1000)
        self.fails(later)

    def test_dead_origin_does_not_delay_live_origins_of_its_batch(self) -> None:
        """A batch with a dead origin and live ones: the live origins' events (and their
        JSON objects) are answered as soon as their own fetches are done, in one chain call
        and one notary POST for the dead origin only."""
        dead_key = new_signing_key("d1")
        live = self.event("10")
        other = self.event("10", OTHER, self.other_key)
        dead = self.event("10", DEAD, dead_key)
        live_d, dead_d, other_d = self.keyring.verify_events([live, dead, other], "10")
        (json_d,) = self.keyring.verify_json_objects(
            [(THIRD, self.signed(THIRD, self.third_key), self.now_ms())]
        )
        self.settle()
        self.assertIsNone(self.successResultOf(live_d))
        self.assertIsNone(self.successResultOf(other_d))
        self.assertIsNone(self.successResultOf(json_d))
        self.assertNoResult(dead_d)
        self.assertEqual(len(self.chain.calls), 1)
        self.assertEqual(self.notary.bodies, [])

        self.clock.advance(TIMEOUT_MS / 1000)
        self.settle()
        self.assertIn("no usable key", self.fails(dead_d, VerificationFailure.NO_USABLE_KEY).detail)
        # Only the server that needed it was asked of the notary.
        self.assertEqual(len(self.notary.bodies), 1)
        self.assertEqual(set(self.notary.bodies[0]["server_keys"]), {DEAD})

    def test_keyring_deadline_bounds_a_hanging_fetch(self) -> None:
        """Without a client timeout, waiting items still fail at the keyring's deadline."""
        self.build(timeouts=False, fetch_timeout_ms=5000)
        (d,) = self.keyring.verify_events([self.event("10", DEAD, new_signing_key("d1"))], "10")
        self.settle()
        self.clock.advance(4.999)
        self.assertNoResult(d)
        self.clock.advance(0.001)
        error = self.fails(d, VerificationFailure.FETCH_TIMED_OUT)
        self.assertEqual(error.server_name, DEAD)
        self.assertIn("timed out", error.detail)

    def test_notary_answers_when_the_origin_is_down(self) -> None:
        """For events, a notary is asked when the origin fails (the chain's fallback)."""
        dead_key = new_signing_key("d1")
        self.notary.entries[DEAD] = [
            make_signed_server_keys(DEAD, [dead_key], self.now_ms() + DAY_MS)
        ]
        obj = self.signed(DEAD, dead_key)
        d = self.keyring.verify_json_for_server(DEAD, obj, self.now_ms())
        self.settle()
        self.clock.advance(TIMEOUT_MS / 1000)
        self.ok(d)
        self.assertEqual(len(self.notary.bodies), 1)

    def test_threaded_checks_give_the_same_results(self) -> None:
        """verify_events_in_threads answers like verify_events (inline thread pool)."""
        good = self.event("10")
        bad = self.event("10")
        bad["origin_server_ts"] += 1
        events = [good, bad] * 5
        expected = self.keyring.verify_events(events, "10")
        self.settle()
        results = self.keyring.verify_events_in_threads(
            events, "10", cast(Any, InlineThreadPool()), InlineReactor(), chunk_size=3
        )
        self.settle()
        for want, got in zip(expected, results, strict=True):
            self.assertEqual(type(want.result), type(got.result))
            want.addErrback(lambda f: None)
            got.addErrback(lambda f: None)

    def test_threaded_cold_batch_fetches_once_per_origin_across_chunks(self) -> None:
        """Chunks are looked up and checked one by one, but the items that need keys are
        planned together: one chain call, one request per origin, every event verified."""
        events = [self.event("10"), self.event("10", OTHER, self.other_key)] * 4
        results = self.keyring.verify_events_in_threads(
            events, "10", cast(Any, InlineThreadPool()), InlineReactor(), chunk_size=3
        )
        self.settle()
        self.assertEqual(self.successResultOf(defer.gatherResults(results)), [None] * 8)
        self.assertEqual(len(self.chain.calls), 1)
        self.assertEqual((self.origin_gets(ORIGIN), self.origin_gets(OTHER)), (1, 1))

    def test_threaded_empty_batch(self) -> None:
        """No events, no Deferreds, no lookups."""
        pool = cast(Any, InlineThreadPool())
        self.assertEqual(self.keyring.verify_events_in_threads([], "10", pool, InlineReactor()), [])

    def test_threaded_unknown_room_version_raises(self) -> None:
        """As for verify_events, an unknown room version is the caller's error."""
        pool = cast(Any, InlineThreadPool())
        with self.assertRaises(ValueError):
            self.keyring.verify_events_in_threads([self.event("10")], "99", pool, InlineReactor())

    def test_threaded_check_error_fails_the_batch_with_a_reason(self) -> None:
        """A worker job that raises (a bug, not a bad signature) fails its items with a
        reason instead of leaving them unresolved."""
        events = [self.event("10")] * 3
        self.ok(self.keyring.verify_events(events, "10")[0])  # warm the store

        class BrokenPool:
            def callInThreadWithCallback(self, on_result: Any, f: Any, *a: Any, **kw: Any) -> None:
                try:
                    raise RuntimeError("worker died")
                except RuntimeError:
                    on_result(False, Failure())

        with self.assertLogs("keyring_module.keyring.api", "ERROR"):
            results = self.keyring.verify_events_in_threads(
                events, "10", cast(Any, BrokenPool()), InlineReactor(), chunk_size=2
            )
            self.settle()
        for d in results:
            error = self.fails(d, VerificationFailure.INTERNAL_ERROR)
            self.assertIn("checking signatures failed: worker died", error.detail)

    def test_store_failure_fails_every_item_with_a_reason(self) -> None:
        """A failing key store fails the whole batch, in both paths, with the reason."""

        async def broken(server_names: Any) -> Any:
            raise RuntimeError("database is down")

        self.patch(self.store, "get_many_server_keys", broken)
        events = [self.event("10"), self.event("10", OTHER, self.other_key)]
        with self.assertLogs("keyring_module.keyring.api", "ERROR"):
            plain = self.keyring.verify_events(events, "10")
            threaded = self.keyring.verify_events_in_threads(
                events, "10", cast(Any, InlineThreadPool()), InlineReactor(), chunk_size=1
            )
        for d in plain + threaded:
            self.assertIn(
                "key store lookup failed: database is down",
                self.fails(d, VerificationFailure.STORE_FAILED).detail,
            )


class GatedLookups:
    """Holds the store's first ``n`` ``get_many_server_keys`` calls until the test opens
    their gates (the real read happens then); later calls go straight through."""

    def __init__(self, store: Any, n: int) -> None:
        real = store.get_many_server_keys
        self.gates: list["defer.Deferred[None]"] = []

        async def gated(names: Any) -> Any:
            if len(self.gates) < n:
                gate: "defer.Deferred[None]" = defer.Deferred()
                self.gates.append(gate)
                await gate
            return await real(names)

        store.get_many_server_keys = gated


class ThreadedPartsTests(KeyringTestCase):
    """verify_events_in_threads looks up and checks each chunk on its own."""

    def store_keys(self, server: str, key: SigningKey) -> None:
        response = parse_server_keys_response(
            make_signed_server_keys(server, [key], self.now_ms() + DAY_MS), server
        )
        self.successResultOf(
            defer.ensureDeferred(
                self.store.store_server_keys(response, SOURCE_ORIGIN, self.now_ms())
            )
        )

    def verify_in_chunks_of_one(self, events: list[dict[str, Any]]) -> list[Any]:
        return self.keyring.verify_events_in_threads(
            events, "10", cast(Any, InlineThreadPool()), InlineReactor(), chunk_size=1
        )

    def test_a_failure_is_planned_with_the_keys_it_was_checked_with(self) -> None:
        """Chunk 1 reads before the origin's keys are stored, chunk 2 after (another fetch
        stored them in between): chunk 1's event is still fetched for and verified, not
        taken for a bad signature because chunk 2 saw the key."""
        gates = GatedLookups(self.store, 2)
        d1, d2 = self.verify_in_chunks_of_one([self.event("10"), self.event("10")])
        gates.gates[0].callback(None)  # chunk 1 reads: nothing stored yet
        self.store_keys(ORIGIN, self.origin_key)
        gates.gates[1].callback(None)  # chunk 2 reads: the key is there
        self.settle()
        self.assertIsNone(reason_of(d2))
        self.assertIsNone(reason_of(d1))

    def test_a_chunk_store_failure_fails_that_chunk_only(self) -> None:
        """A failed lookup fails its own chunk; the next chunk is looked up, fetched for
        and verified as usual, and nothing is fetched for the failed chunk."""
        gates = GatedLookups(self.store, 2)
        d1, d2 = self.verify_in_chunks_of_one(
            [self.event("10"), self.event("10", OTHER, self.other_key)]
        )
        with self.assertLogs("keyring_module.keyring.api", "ERROR"):
            gates.gates[0].errback(RuntimeError("transient"))
        gates.gates[1].callback(None)
        self.settle()
        self.assertEqual(
            reason_of(d1), (VerificationFailure.STORE_FAILED, "key store lookup failed: transient")
        )
        self.assertIsNone(reason_of(d2))
        asked = [r.server_name for calls, _ in self.chain.calls for r in calls]
        self.assertEqual(asked, [OTHER])

    def test_chunks_needing_one_origin_share_one_fetch(self) -> None:
        """Failures of several chunks are planned in one turn: one fetch per origin."""
        events = [self.event("10", ts=self.now_ms() - n) for n in range(4)]
        results = self.verify_in_chunks_of_one(events)
        self.settle()
        self.assertEqual([reason_of(d) for d in results], [None] * 4)
        self.assertEqual(self.origin_gets(ORIGIN), 1)
        self.assertEqual(len(self.chain.calls), 1)


class SilentChain:
    """A key source that answers only through its return value (no ``on_server``)."""

    def __init__(self, chain: Any) -> None:
        self.chain = chain

    async def get_keys(
        self, requests: Any, *, use_cache: bool = True, on_server: Any = None
    ) -> Any:
        return await self.chain.get_keys(requests, use_cache=use_cache)


class KeySourceTests(KeyringTestCase):
    def test_a_source_that_only_returns_keys_is_enough(self) -> None:
        """The keys a source returns reach the waiting items even if it never reports."""
        keyring = Keyring(self.own_keys, self.store, SilentChain(self.chain), self.clock)
        self.ok(keyring.verify_json_for_server(ORIGIN, self.signed(ORIGIN, self.origin_key), 0))

    def test_a_failing_fetch_fails_its_items_as_fetch_failed(self) -> None:
        """A chain call that raises fails the items waiting for it with FETCH_FAILED
        (not a timeout, not a missing key), naming the error."""

        class BrokenChain:
            async def get_keys(self, requests: Any, **kw: Any) -> Any:
                raise RuntimeError("resolver exploded")

        keyring = Keyring(self.own_keys, self.store, BrokenChain(), self.clock)
        with self.assertLogs("keyring_module.keyring.planner", "WARNING"):
            d = keyring.verify_json_for_server(ORIGIN, self.signed(ORIGIN, self.origin_key), 0)
            error = self.fails(d, VerificationFailure.FETCH_FAILED)
        self.assertEqual(error.server_name, ORIGIN)
        self.assertEqual(error.detail, "key fetch failed: resolver exploded")

    def test_a_hung_fetch_frees_its_origin_at_the_deadline(self) -> None:
        """A chain call that never returns fails its items at the keyring's deadline and
        no longer holds the origin: the next request starts a new fetch."""
        calls: list[Any] = []

        class HungChain:
            async def get_keys(self, requests: Any, **kw: Any) -> Any:
                calls.append(requests)
                await defer.Deferred()  # never fires

        keyring = Keyring(self.own_keys, self.store, HungChain(), self.clock, fetch_timeout_ms=5000)
        obj = self.signed(ORIGIN, self.origin_key)
        first = keyring.verify_json_for_server(ORIGIN, obj, 0)
        self.settle()
        with self.assertLogs("keyring_module.keyring.planner", "WARNING"):
            self.clock.advance(5)
        self.assertIn("timed out", self.fails(first, VerificationFailure.FETCH_TIMED_OUT).detail)
        second = keyring.verify_json_for_server(ORIGIN, obj, 0)
        self.settle()
        self.assertNoResult(second)
        self.assertEqual(len(calls), 2)
        with self.assertLogs("keyring_module.keyring.planner", "WARNING"):
            self.clock.advance(5)
        self.fails(second)


class InlineThreadPool:
    """A thread pool that runs each job at once on the calling thread."""

    def callInThreadWithCallback(self, on_result: Any, f: Any, *args: Any, **kw: Any) -> None:
        try:
            result = f(*args, **kw)
        except Exception:
            on_result(False, Failure())
        else:
            on_result(True, result)


@implementer(IReactorFromThreads)
class InlineReactor:
    """``callFromThread`` that calls at once."""

    def callFromThread(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None:
        callable(*args, **kwargs)


def x_matrix(
    origin: str,
    key: SigningKey,
    method: str,
    uri: str,
    destination: str,
    content: Any = None,
    *,
    header_destination: Optional[str] = None,
) -> str:
    """An Authorization header value signing a request at test time."""
    obj: dict[str, Any] = {
        "method": method,
        "uri": uri,
        "origin": origin,
        "destination": destination,
    }
    if content is not None:
        obj["content"] = content
    signed = sign_json(obj, origin, key)
    sig = signed["signatures"][origin][key_id(key)]
    dest = header_destination if header_destination is not None else destination
    return 'X-Matrix origin="%s",destination="%s",key="%s",sig="%s"' % (
        origin,
        dest,
        key_id(key),
        sig,
    )


class VerifyRequestTests(KeyringTestCase):
    URI = "/_matrix/federation/v1/send/123?x=1"

    def setUp(self) -> None:
        super().setUp()
        # The notary knows the origin's keys: if request auth used notaries, it would work.
        self.notary.entries[ORIGIN] = [
            make_signed_server_keys(ORIGIN, [self.origin_key], self.now_ms() + DAY_MS)
        ]

    def verify(self, header: str, body: Optional[bytes] = None, method: bytes = b"PUT") -> Any:
        headers = Headers({b"Authorization": [header.encode()]})
        return self.keyring.verify_request(method, self.URI.encode(), headers, body, OURS)

    def test_valid_request_returns_the_origin(self) -> None:
        """A correctly signed request is attributed to its origin, fetched directly."""
        content = {"pdus": [], "edus": [{"edu_type": "m.typing"}]}
        header = x_matrix(ORIGIN, self.origin_key, "PUT", self.URI, OURS, content)
        self.assertEqual(self.ok(self.verify(header, encode_canonical_json(content))), ORIGIN)
        self.assertEqual(self.origin_gets(), 1)
        self.assertEqual(self.notary.bodies, [])
        self.assertEqual(self.chain.calls, [])
        self.assertEqual(len(self.origin_chain.calls), 1)

    def test_dict_headers_and_unquoted_params_are_accepted(self) -> None:
        """Headers as a dict of lists, bare values and upper-case names parse."""
        header = x_matrix(ORIGIN, self.origin_key, "GET", self.URI, OURS)
        header = header.replace('origin="origin.test"', "ORIGIN=origin.test")
        headers = {"authorization": [header]}
        d = self.keyring.verify_request("GET", self.URI, headers, None, OURS)
        self.assertEqual(self.ok(d), ORIGIN)

    def test_tampered_body_fails(self) -> None:
        """Changing the body after signing makes the signature invalid."""
        header = x_matrix(ORIGIN, self.origin_key, "PUT", self.URI, OURS, {"a": 1})
        error = self.fails(self.verify(header, b'{"a": 2}'), VerificationFailure.BAD_SIGNATURE)
        self.assertEqual(error.detail, "invalid signature")

    def test_wrong_destination_fails_without_fetch(self) -> None:
        """A header naming another destination is refused before any fetch."""
        header = x_matrix(
            ORIGIN, self.origin_key, "PUT", self.URI, OURS, header_destination="else.test"
        )
        error = self.fails(self.verify(header), VerificationFailure.BAD_REQUEST_AUTH)
        self.assertIn("not for us", error.detail)
        self.assertEqual(self.outbound.requests, [])

    def test_empty_destination_fails_without_fetch(self) -> None:
        """A header whose destination is present but empty is refused, quoted or bare,
        before any fetch, even though its signature is good."""
        header = x_matrix(ORIGIN, self.origin_key, "PUT", self.URI, OURS, header_destination="")
        self.assertIn('destination=""', header)
        for value in (header, header.replace('destination=""', "destination=")):
            error = self.fails(self.verify(value), VerificationFailure.BAD_REQUEST_AUTH)
            self.assertIn("destination is empty", error.detail)
        self.assertEqual(self.outbound.requests, [])

    def test_header_without_destination_is_accepted(self) -> None:
        """A header that leaves destination out (older senders) still authenticates."""
        header = x_matrix(ORIGIN, self.origin_key, "PUT", self.URI, OURS)
        header = header.replace('destination="%s",' % OURS, "")
        self.assertNotIn("destination", header)
        self.assertEqual(self.ok(self.verify(header)), ORIGIN)

    def test_bad_signature_fails(self) -> None:
        """A signature over a different method does not verify."""
        header = x_matrix(ORIGIN, self.origin_key, "GET", self.URI, OURS)
        error = self.fails(self.verify(header, method=b"PUT"), VerificationFailure.BAD_SIGNATURE)
        self.assertEqual(error.detail, "invalid signature")

    def test_expired_key_fails_for_requests(self) -> None:
        """Request auth needs a key valid now: an expired current key is refused."""
        self.origin.valid_for_ms = -1000
        header = x_matrix(ORIGIN, self.origin_key, "GET", self.URI, OURS)
        error = self.fails(self.verify(header, method=b"GET"), VerificationFailure.NO_USABLE_KEY)
        self.assertIn("no usable key", error.detail)
        # The same key still verifies an object signed while it was valid.
        obj = self.signed(ORIGIN, self.origin_key)
        self.ok(self.keyring.verify_json_for_server(ORIGIN, obj, self.now_ms() - 2000))

    def test_old_key_is_refused_for_requests(self) -> None:
        """Keys from old_verify_keys never authenticate requests, even before expired_ts."""
        old = new_signing_key("old")
        self.origin.body_override = make_signed_server_keys(
            ORIGIN,
            [self.origin_key],
            self.now_ms() + DAY_MS,
            old_keys={key_id(old): (verify_key_bytes(old), self.now_ms() + DAY_MS)},
        )
        header = x_matrix(ORIGIN, old, "GET", self.URI, OURS)
        error = self.fails(self.verify(header, method=b"GET"), VerificationFailure.NO_USABLE_KEY)
        self.assertIn("no usable key", error.detail)

    def test_own_server_requests_use_own_keys(self) -> None:
        """A request signed by our own current key verifies with no request; old keys don't."""
        header = x_matrix(OURS, self.own_key, "GET", self.URI, OURS)
        self.assertEqual(self.ok(self.verify(header, method=b"GET")), OURS)
        header = x_matrix(OURS, self.own_old_key, "GET", self.URI, OURS)
        self.fails(self.verify(header, method=b"GET"))
        self.assertEqual(self.outbound.requests, [])

    def test_notaries_are_never_asked_for_request_auth(self) -> None:
        """With the origin unreachable, request auth fails rather than ask a notary."""
        del self.resources[ORIGIN]
        self.build()
        header = x_matrix(ORIGIN, self.origin_key, "GET", self.URI, OURS)
        error = self.fails(self.verify(header, method=b"GET"), VerificationFailure.NO_USABLE_KEY)
        self.assertIn("no usable key", error.detail)
        self.assertEqual(self.notary.bodies, [])
        self.assertEqual([r.server_name for r in self.outbound.requests], [ORIGIN])

    def test_missing_or_malformed_header_fails(self) -> None:
        """No X-Matrix header, or one without a signature, fails at once."""
        d = self.keyring.verify_request(b"GET", b"/x", Headers(), None, OURS)
        self.assertIn("no X-Matrix", self.fails(d, VerificationFailure.NO_REQUEST_AUTH).detail)
        error = self.fails(
            self.verify('X-Matrix origin="origin.test",key="ed25519:o1"'),
            VerificationFailure.BAD_REQUEST_AUTH,
        )
        self.assertIn("missing 'sig'", error.detail)
        self.assertEqual(self.outbound.requests, [])

    def test_body_that_is_not_json_fails(self) -> None:
        """A body that is not JSON cannot be part of a signed request."""
        header = x_matrix(ORIGIN, self.origin_key, "PUT", self.URI, OURS)
        self.assertEqual(
            self.fails(self.verify(header, b"{nope"), VerificationFailure.MALFORMED_OBJECT).detail,
            "body is not JSON",
        )

    def test_bodies_canonical_json_cannot_hold_fail_without_raising(self) -> None:
        """Bodies nested too deeply (even beyond the parser's stack), with NaN or
        infinities, or with a lone surrogate give a failed Deferred, never an exception,
        and cause no fetch."""
        header = x_matrix(ORIGIN, self.origin_key, "PUT", self.URI, OURS)
        for body in (
            b"[" * 100_000 + b"]" * 100_000,
            b'{"a": ' + b"[" * 101 + b"]" * 101 + b"}",
            b'{"a": NaN}',
            b'{"a": [Infinity]}',
            b'{"a": -Infinity}',
            b'{"a": 1e400}',
            b'{"a": "\\ud800"}',
            b'{"\\udfff": 1}',
        ):
            d = self.verify(header, body)
            self.fails(d, VerificationFailure.MALFORMED_OBJECT)
        self.assertEqual(self.outbound.requests, [])

    def test_body_at_the_depth_limit_is_checked(self) -> None:
        """A body nested exactly MAX_JSON_DEPTH levels is an ordinary body."""
        content: Any = 1
        for _ in range(MAX_JSON_DEPTH):
            content = [content]
        header = x_matrix(ORIGIN, self.origin_key, "PUT", self.URI, OURS, content)
        self.assertEqual(self.ok(self.verify(header, encode_canonical_json(content))), ORIGIN)

    def test_bad_header_values_fail_without_fetch(self) -> None:
        """A key that is no ASCII key id, or a destination that is no server name, fails
        as BAD_REQUEST_AUTH before any fetch, and the detail shows them escaped."""
        for header, fragment in (
            ('X-Matrix origin=origin.test,key="ed25519:o1\n",sig="s"', "'ed25519:o1\\n'"),
            ('X-Matrix origin=origin.test,key="ed25519:\u0661",sig="s"', "'ed25519:\\u0661'"),
            ('X-Matrix origin=origin.test,key="ed25519:a.b",sig="s"', "'ed25519:a.b'"),
            (
                'X-Matrix origin=origin.test,key="ed25519:o1",sig="s",destination="ours.test\n"',
                "'ours.test\\n'",
            ),
        ):
            # A dict of headers: Twisted's Headers would turn the newline into a space.
            d = self.keyring.verify_request(b"GET", b"/x", {"Authorization": [header]}, None, OURS)
            error = self.fails(d, VerificationFailure.BAD_REQUEST_AUTH)
            self.assertIn(fragment, error.detail)
            self.assertTrue(error.detail.isascii() and error.detail.isprintable(), error.detail)
        self.assertEqual(self.outbound.requests, [])

    def test_unexpected_errors_are_a_failed_deferred(self) -> None:
        """Even headers of the wrong type give a failed Deferred rather than raise."""
        headers: Any = {"Authorization": 5}
        d = self.keyring.verify_request(b"GET", b"/x", headers, None, OURS)
        self.failureResultOf(d, TypeError)


class ParseXMatrixTests(SynchronousTestCase):
    def test_quoted_unquoted_and_case_insensitive(self) -> None:
        """Parameter names ignore case, values may be bare or quoted with escapes."""
        auth = parse_x_matrix_header(
            'x-matrix  Origin=a.test , KEY="ed25519:k", sig = "a\\"b",destination=b.test'
        )
        self.assertEqual(
            (auth.origin, auth.key, auth.sig, auth.destination),
            ("a.test", "ed25519:k", 'a"b', "b.test"),
        )

    def test_destination_is_optional(self) -> None:
        """Old senders leave destination out."""
        auth = parse_x_matrix_header(b'X-Matrix origin=a.test,key="ed25519:k",sig="s"')
        self.assertIsNone(auth.destination)

    def test_empty_destination_is_present(self) -> None:
        """An empty destination, quoted or bare, is kept as present (""), not as missing."""
        for value in (
            'X-Matrix origin=a.test,key="ed25519:k",sig="s",destination=""',
            'X-Matrix origin=a.test,key="ed25519:k",sig="s",destination=',
        ):
            self.assertEqual(parse_x_matrix_header(value).destination, "", value)

    def test_errors(self) -> None:
        """Other schemes, repeats, garbage, bad origins and missing params are refused."""
        for value, fragment in [
            ('Bearer origin=a.test,key="ed25519:k",sig="s"', "not an X-Matrix"),
            ('X-Matrix origin=a.test,origin=b.test,key="k",sig="s"', "twice"),
            ('X-Matrix origin=a.test,key="ed25519:k",sig="s",', "trailing comma"),
            ('X-Matrix origin=a.test key="ed25519:k"', "malformed"),
            ('X-Matrix origin="bad name!",key="ed25519:k",sig="s"', "not a valid server name"),
            ('X-Matrix origin=a.test,sig="s"', "missing 'key'"),
            ('X-Matrix origin=a.test,key="ed25519:k\n",sig="s"', "not a valid key id"),
            ('X-Matrix origin=a.test,key="k",sig="s"', "not a valid key id"),
            ('X-Matrix origin=a.test,key="ed25519:k",sig="s",destination="b c"', "destination"),
            ('X-Matrix origin="a.test\n",key="ed25519:k",sig="s"', "'a.test\\n'"),
            ('X-Matrix origin="\u202ea.test",key="ed25519:k",sig="s"', "'\\u202ea.test'"),
        ]:
            with self.assertRaises(ValueError) as cm:
                parse_x_matrix_header(value)
            self.assertIn(fragment, str(cm.exception), value)


class SignedRequestObjectTests(SynchronousTestCase):
    def test_each_refusal_has_its_reason(self) -> None:
        """Requests that cannot be checked are refused with the reason a caller can map to
        a response: no X-Matrix header, a bad one, or a request that is not well formed."""
        good = 'X-Matrix origin=a.test,key="ed25519:k",sig="s"'
        table: list[tuple[list[str], bytes, Optional[bytes], VerificationFailure, str]] = [
            ([], b"/x", None, VerificationFailure.NO_REQUEST_AUTH, "no X-Matrix"),
            (["Bearer abc"], b"/x", None, VerificationFailure.NO_REQUEST_AUTH, "no X-Matrix"),
            (
                ['X-Matrix origin=a.test,sig="s"'],
                b"/x",
                None,
                VerificationFailure.BAD_REQUEST_AUTH,
                "missing 'key'",
            ),
            (
                [good, 'X-Matrix origin=b.test,key="ed25519:k",sig="s"'],
                b"/x",
                None,
                VerificationFailure.BAD_REQUEST_AUTH,
                "different origins",
            ),
            (
                ['X-Matrix origin=a.test,key="ed25519:k",sig="s",destination=else.test'],
                b"/x",
                None,
                VerificationFailure.BAD_REQUEST_AUTH,
                "not for us",
            ),
            (
                ['X-Matrix origin=a.test,key="ed25519:k",sig="s",destination=""'],
                b"/x",
                None,
                VerificationFailure.BAD_REQUEST_AUTH,
                "destination is empty",
            ),
            (
                [good, 'X-Matrix origin=a.test,key="ed25519:j",sig="s",destination='],
                b"/x",
                None,
                VerificationFailure.BAD_REQUEST_AUTH,
                "destination is empty",
            ),
            (
                ['X-Matrix origin=a.test,key="rsa:k",sig="s"'],
                b"/x",
                None,
                VerificationFailure.BAD_REQUEST_AUTH,
                "algorithm",
            ),
            ([good], "/\u00e9".encode(), None, VerificationFailure.MALFORMED_OBJECT, "not ASCII"),
            ([good], b"/x", b"{nope", VerificationFailure.MALFORMED_OBJECT, "not JSON"),
        ]
        for headers, uri, body, reason, fragment in table:
            with self.assertRaises(KeyVerificationError) as cm:
                signed_request_object(b"PUT", uri, {"Authorization": headers}, body, OURS)
            self.assertIs(cm.exception.reason, reason, headers)
            self.assertIn(fragment, cm.exception.detail, headers)

    def test_body_is_checked_from_its_text_not_walked(self) -> None:
        """A body of many tiny values is checked for canonical JSON from its text: beyond
        its decoded value, checking allocates less than the body's own size (walking
        the value allocated per value)."""
        header = 'X-Matrix origin=a.test,key="ed25519:k",sig="s"'
        for body in (
            json.dumps([0] * 200_000).encode(),
            json.dumps([[] for _ in range(100_000)]).encode(),
        ):
            tracemalloc.start()
            try:
                _, signed = signed_request_object(
                    b"PUT", b"/x", {"Authorization": [header]}, body, OURS
                )
                kept, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            self.assertEqual(signed["content"], json.loads(body))
            self.assertLess(peak - kept, 2 * len(body))
