"""Tests for :mod:`keyring_module.redaction` and the room version table."""

from typing import Any

import attr
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.redaction import redact_event
from keyring_module.roomversions import REDACTION_RULES_V11, ROOM_VERSIONS, get_room_version

ALL_VERSIONS = [str(n) for n in range(1, 13)]
#: The versions that redact by the v11 rules (room v12 changed nothing).
V11_RULES = ["11", "12"]

_TOP_LEVEL = {
    "event_id": "$ev:a.org",
    "type": "m.room.message",
    "room_id": "!room:a.org",
    "sender": "@alice:a.org",
    "state_key": "",
    "hashes": {"sha256": "aGFzaA"},
    "signatures": {"a.org": {"ed25519:1": "c2ln"}},
    "depth": 5,
    "prev_events": ["$p:a.org"],
    "prev_state": [],
    "auth_events": ["$a:a.org"],
    "origin": "a.org",
    "origin_server_ts": 1234,
    "membership": "join",
}
_V11_DROPPED = {"origin", "membership", "prev_state"}


def make_event(event_type: str, content: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """An event with every protected top-level key, plus ``extra``."""
    event = dict(_TOP_LEVEL, type=event_type, content=content)
    event.update(extra)
    return event


def versions(low: int, high: int = 12) -> list[str]:
    """Room versions ``low`` to ``high`` inclusive, as strings."""
    return [str(n) for n in range(low, high + 1)]


class RedactionTopLevelTests(SynchronousTestCase):
    def test_v1_to_v10_keep_the_protected_top_level_keys(self) -> None:
        """Rooms v1-v10 keep every key of the original protected list, with its value."""
        event = make_event("m.room.message", {"body": "hi"}, unknown="x", unsigned={"age": 1})
        for version in versions(1, 10):
            redacted = redact_event(event, version)
            expected = dict(_TOP_LEVEL, type="m.room.message", content={})
            self.assertEqual(redacted, expected, version)

    def test_v11_drops_origin_membership_and_prev_state(self) -> None:
        """Rooms v11 and v12 no longer protect top-level origin, membership and prev_state."""
        for version in V11_RULES:
            redacted = redact_event(make_event("m.room.message", {}), version)
            for key in _V11_DROPPED:
                self.assertNotIn(key, redacted, version)
            expected_keys = (set(_TOP_LEVEL) - _V11_DROPPED) | {"content"}
            self.assertEqual(set(redacted), expected_keys, version)

    def test_unknown_top_level_keys_and_unsigned_are_dropped(self) -> None:
        """Keys outside the protected list, including ``unsigned`` and ``redacts``, go."""
        event = make_event(
            "m.room.redaction", {}, unsigned={"age_ts": 1}, redacts="$x:a.org", extra=1
        )
        for version in ALL_VERSIONS:
            redacted = redact_event(event, version)
            for key in ("unsigned", "redacts", "extra"):
                self.assertNotIn(key, redacted, version)

    def test_missing_or_non_object_content_becomes_empty(self) -> None:
        """A redacted event always has an object ``content``, even if the input had none."""
        for version in ALL_VERSIONS:
            self.assertEqual(
                redact_event({"type": "m.room.member"}, version),
                {
                    "type": "m.room.member",
                    "content": {},
                },
            )
            event = {"type": "m.room.create", "content": "nope"}
            self.assertEqual(redact_event(event, version)["content"], {}, version)

    def test_input_is_not_modified(self) -> None:
        """Redaction builds a new dict and leaves the event it was given untouched."""
        content = {"membership": "join", "displayname": "A"}
        event = make_event("m.room.member", content, unsigned={"age": 3})
        redact_event(event, "11")
        self.assertEqual(event["content"], {"membership": "join", "displayname": "A"})
        self.assertEqual(event["unsigned"], {"age": 3})
        self.assertIn("origin", event)

    def test_unknown_room_version_is_rejected_listing_known_ones(self) -> None:
        """An unknown room version raises ValueError naming the known versions."""
        with self.assertRaisesRegex(ValueError, r"unknown room version '13'.*1, 2, .*11, 12\)"):
            redact_event(make_event("m.room.message", {}), "13")
        with self.assertRaises(ValueError):  # the unstable precursor of v12
            redact_event(make_event("m.room.message", {}), "org.matrix.hydra.11")
        with self.assertRaises(ValueError):
            redact_event(make_event("m.room.message", {}), "v1")


class RedactionContentTests(SynchronousTestCase):
    def assert_content(
        self,
        event_type: str,
        content: dict[str, Any],
        expected: dict[str, Any],
        room_versions: list[str],
    ) -> None:
        """Redacting an event of ``event_type`` keeps exactly ``expected`` in each version."""
        for version in room_versions:
            redacted = redact_event(make_event(event_type, content), version)
            self.assertEqual(redacted["content"], expected, "room version %s" % version)

    def test_member_keeps_membership_only_before_v9(self) -> None:
        """m.room.member keeps only ``membership`` in rooms v1-v8."""
        content = {
            "membership": "join",
            "displayname": "Alice",
            "avatar_url": "mxc://a/b",
            "join_authorised_via_users_server": "@bob:b.org",
            "third_party_invite": {"display_name": "x", "signed": {"token": "t"}},
        }
        self.assert_content("m.room.member", content, {"membership": "join"}, versions(1, 8))

    def test_member_keeps_join_authorised_via_users_server_from_v9(self) -> None:
        """Rooms v9 and v10 also keep ``join_authorised_via_users_server`` (MSC3375)."""
        content = {
            "membership": "join",
            "displayname": "Alice",
            "join_authorised_via_users_server": "@bob:b.org",
            "third_party_invite": {"signed": {"token": "t"}},
        }
        expected = {"membership": "join", "join_authorised_via_users_server": "@bob:b.org"}
        self.assert_content("m.room.member", content, expected, versions(9, 10))

    def test_member_keeps_third_party_invite_signed_in_v11(self) -> None:
        """Rooms v11 and v12 keep ``third_party_invite`` reduced to its ``signed`` key (MSC3821)."""
        signed = {"mxid": "@c:c.org", "token": "abc", "signatures": {"id.org": {"ed25519:0": "s"}}}
        content = {
            "membership": "invite",
            "displayname": "Carol",
            "third_party_invite": {"display_name": "c...@x", "signed": signed},
        }
        expected = {"membership": "invite", "third_party_invite": {"signed": signed}}
        self.assert_content("m.room.member", content, expected, V11_RULES)

    def test_v11_third_party_invite_without_signed_is_kept_empty(self) -> None:
        """A v11 ``third_party_invite`` object without ``signed`` survives as ``{}``; a non-object one is dropped."""
        self.assert_content(
            "m.room.member",
            {"membership": "invite", "third_party_invite": {"display_name": "x"}},
            {"membership": "invite", "third_party_invite": {}},
            V11_RULES,
        )
        self.assert_content(
            "m.room.member",
            {"membership": "invite", "third_party_invite": "junk"},
            {"membership": "invite"},
            V11_RULES,
        )

    def test_create_keeps_creator_before_v11(self) -> None:
        """m.room.create keeps only ``creator`` in rooms v1-v10."""
        content = {"creator": "@alice:a.org", "room_version": "10", "m.federate": False}
        self.assert_content("m.room.create", content, {"creator": "@alice:a.org"}, versions(1, 10))

    def test_create_keeps_all_content_in_v11(self) -> None:
        """m.room.create keeps its whole ``content`` in rooms v11 and v12 (MSC2176)."""
        content = {"room_version": "11", "m.federate": False, "predecessor": {"room_id": "!o:a"}}
        self.assert_content("m.room.create", content, content, V11_RULES)

    def test_join_rules_keeps_allow_from_v8(self) -> None:
        """m.room.join_rules keeps ``join_rule`` everywhere and ``allow`` from v8."""
        allow = [{"type": "m.room_membership", "room_id": "!space:a.org"}]
        content = {"join_rule": "restricted", "allow": allow, "other": 1}
        self.assert_content(
            "m.room.join_rules", content, {"join_rule": "restricted"}, versions(1, 7)
        )
        self.assert_content(
            "m.room.join_rules", content, {"join_rule": "restricted", "allow": allow}, versions(8)
        )

    def test_power_levels_keeps_invite_only_in_v11(self) -> None:
        """m.room.power_levels keeps the eight classic keys, plus ``invite`` from v11."""
        classic = {
            "ban": 50,
            "events": {"m.room.name": 100},
            "events_default": 0,
            "kick": 50,
            "redact": 50,
            "state_default": 50,
            "users": {"@alice:a.org": 100},
            "users_default": 0,
        }
        content = dict(classic, invite=0, notifications={"room": 50})
        self.assert_content("m.room.power_levels", content, classic, versions(1, 10))
        self.assert_content("m.room.power_levels", content, dict(classic, invite=0), V11_RULES)

    def test_aliases_keeps_aliases_only_in_v1_to_v5(self) -> None:
        """m.room.aliases keeps ``aliases`` in rooms v1-v5 and nothing from v6 (MSC2432)."""
        content = {"aliases": ["#a:a.org"], "x": 1}
        self.assert_content("m.room.aliases", content, {"aliases": ["#a:a.org"]}, versions(1, 5))
        self.assert_content("m.room.aliases", content, {}, versions(6))

    def test_history_visibility_keeps_history_visibility(self) -> None:
        """m.room.history_visibility keeps ``history_visibility`` in every version."""
        content = {"history_visibility": "shared", "x": 1}
        self.assert_content(
            "m.room.history_visibility", content, {"history_visibility": "shared"}, ALL_VERSIONS
        )

    def test_redaction_keeps_content_redacts_only_in_v11(self) -> None:
        """m.room.redaction keeps ``content.redacts`` only from room v11 (MSC2174/MSC2176)."""
        content = {"redacts": "$victim:a.org", "reason": "spam"}
        self.assert_content("m.room.redaction", content, {}, versions(1, 10))
        self.assert_content("m.room.redaction", content, {"redacts": "$victim:a.org"}, V11_RULES)

    def test_other_event_types_lose_all_content(self) -> None:
        """Event types without rules (messages, names, topics) keep no content keys."""
        for event_type in ("m.room.message", "m.room.name", "m.room.topic", "m.room.encrypted"):
            self.assert_content(event_type, {"body": "x", "name": "n"}, {}, ALL_VERSIONS)

    def test_content_keys_absent_from_the_event_are_not_invented(self) -> None:
        """A protected content key missing from the event stays missing after redaction."""
        self.assert_content("m.room.power_levels", {"ban": 50}, {"ban": 50}, ALL_VERSIONS)

    def test_spec_example_v1_member_event(self) -> None:
        """The spec's v1 member event redacts to the protected keys with ``membership``."""
        event = {
            "auth_events": [["$a:matrix.org", {"sha256": "x"}]],
            "content": {"membership": "join", "displayname": "Alice"},
            "depth": 12,
            "event_id": "$a1:example.org",
            "hashes": {"sha256": "thishashcoversallfieldsincasethisisredacted"},
            "origin": "example.org",
            "origin_server_ts": 1404838188000,
            "prev_events": [["$b:matrix.org", {"sha256": "y"}]],
            "room_id": "!UcYsUzyxTGDxLBEvLy:example.org",
            "sender": "@alice:example.org",
            "signatures": {"example.org": {"ed25519:key_version": "sig"}},
            "state_key": "@alice:example.org",
            "type": "m.room.member",
            "unsigned": {"age": 4612},
        }
        expected = dict(event, content={"membership": "join"})
        del expected["unsigned"]
        self.assertEqual(redact_event(event, "1"), expected)


#: The spec's example room id for v12 (pdu_v12): ``!`` + the create event's reference hash.
V12_ROOM_ID = "!Nhcu5BS-UMnFX7hBVfVSoXiD7OgH6iRT-xyIuqDnpYQ"


def v12_pdu(event_type: str, content: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A room v12 PDU shaped like the spec's example (no ``event_id``, hash room id),
    carrying the legacy ``origin`` key and ``unsigned``, plus ``extra``."""
    event: dict[str, Any] = {
        "auth_events": ["$Rqnc-F-dvnEYJTyHq_iKxU2bZ1CI92-kuZq3a5lr5Zg"],
        "content": content,
        "depth": 12,
        "hashes": {"sha256": "thishashcoversallfieldsincasethisisredacted"},
        "origin": "example.com",
        "origin_server_ts": 1404838188000,
        "prev_events": ["$acR1l0raoZnm60CBwAVgqbZqoO_mYU81xysh1u7XcJk"],
        "room_id": V12_ROOM_ID,
        "sender": "@alice:example.com",
        "signatures": {"example.com": {"ed25519:key_version": "c2lnbmF0dXJl"}},
        "type": event_type,
        "unsigned": {"age": 4612},
    }
    event.update(extra)
    return event


def without(event: dict[str, Any], *keys: str) -> dict[str, Any]:
    """``event`` without ``keys``."""
    return {k: v for k, v in event.items() if k not in keys}


class RoomV12RedactionTests(SynchronousTestCase):
    """Room v12 (Matrix 1.16) redacts by the v11 algorithm; its create events lack ``room_id``."""

    def test_create_event_without_room_id(self) -> None:
        """A v12 create event keeps its whole content (``additional_creators``, unknown keys)
        and protected top-level keys; no ``room_id`` is invented, ``origin`` and ``unsigned`` go."""
        content = {
            "room_version": "12",
            "additional_creators": ["@bob:example.org"],
            "m.federate": True,
            "predecessor": {"room_id": "!oldroom:example.org"},
            "type": "m.space",
            "org.example.entropy": "c2FsdA",
        }
        create = without(
            v12_pdu("m.room.create", content, state_key="", depth=1, prev_events=[]), "room_id"
        )
        create["auth_events"] = []
        redacted = redact_event(create, "12")
        self.assertNotIn("room_id", redacted)
        self.assertEqual(redacted, without(create, "origin", "unsigned"))
        self.assertEqual(redacted["content"], content)

    def test_create_event_room_id_is_kept_if_present(self) -> None:
        """A create event that does carry ``room_id`` (which v12 auth rules reject) keeps it,
        so a ``room_id`` added after signing changes what the signature covers."""
        create = v12_pdu("m.room.create", {"room_version": "12"}, state_key="")
        self.assertEqual(redact_event(create, "12")["room_id"], V12_ROOM_ID)

    def test_power_levels(self) -> None:
        """v12 power levels keep the nine protected keys (``invite`` included) and lose
        ``notifications`` and unknown keys; creators, absent from ``users``, are not added."""
        kept = {
            "ban": 50,
            "events": {"m.room.name": 100, "m.room.power_levels": 100},
            "events_default": 0,
            "invite": 50,
            "kick": 50,
            "redact": 50,
            "state_default": 50,
            "users": {"@carol:example.org": 150},
            "users_default": 0,
        }
        content = dict(kept, notifications={"room": 20}, historical=100)
        redacted = redact_event(v12_pdu("m.room.power_levels", content, state_key=""), "12")
        self.assertEqual(redacted["content"], kept)
        self.assertEqual(redacted["room_id"], V12_ROOM_ID)

    def test_member_join_authorised_via_users_server(self) -> None:
        """A v12 restricted join keeps ``membership`` and ``join_authorised_via_users_server``;
        profile fields and ``reason`` go."""
        content = {
            "membership": "join",
            "join_authorised_via_users_server": "@arbiter:resident.example.org",
            "avatar_url": "mxc://example.org/SEsfnsuifSDFSSEF",
            "displayname": "Alice Margatroid",
            "reason": "Looking for support",
        }
        member = v12_pdu("m.room.member", content, state_key="@alice:example.com")
        redacted = redact_event(member, "12")
        expected_content = {
            "membership": "join",
            "join_authorised_via_users_server": "@arbiter:resident.example.org",
        }
        self.assertEqual(
            redacted, dict(without(member, "origin", "unsigned"), content=expected_content)
        )

    def test_plain_message(self) -> None:
        """A v12 message loses all content and keeps the protected top-level keys, room id included."""
        message = v12_pdu("m.room.message", {"body": "hello", "msgtype": "m.text"})
        self.assertEqual(
            redact_event(message, "12"), dict(without(message, "origin", "unsigned"), content={})
        )

    def test_v12_redacts_exactly_like_v11(self) -> None:
        """For every event type with special rules (and one without), v12 and v11 agree."""
        events = [
            make_event("m.room.create", {"room_version": "12", "additional_creators": ["@b:b"]}),
            make_event(
                "m.room.member",
                {
                    "membership": "invite",
                    "third_party_invite": {"display_name": "x", "signed": {"token": "t"}},
                    "displayname": "X",
                },
            ),
            make_event("m.room.join_rules", {"join_rule": "restricted", "allow": [], "x": 1}),
            make_event("m.room.power_levels", {"invite": 0, "users": {}, "notifications": {}}),
            make_event("m.room.history_visibility", {"history_visibility": "joined", "x": 1}),
            make_event("m.room.redaction", {"redacts": "$e", "reason": "r"}, redacts="$e"),
            make_event("m.room.aliases", {"aliases": ["#a:a.org"]}),
            make_event("m.room.topic", {"topic": "t"}),
        ]
        for event in events:
            self.assertEqual(redact_event(event, "12"), redact_event(event, "11"), event["type"])


class RoomVersionTableTests(SynchronousTestCase):
    def test_known_versions_are_one_to_twelve(self) -> None:
        """The table holds exactly room versions 1 to 12."""
        self.assertEqual(list(ROOM_VERSIONS), ALL_VERSIONS)

    def test_flags_per_version(self) -> None:
        """Validity is enforced from v5, event-id signers only in v1/v2, restricted joins from v8."""
        for number in range(1, 13):
            version = get_room_version(str(number))
            self.assertEqual(version.enforce_key_validity, number >= 5, number)
            self.assertEqual(version.event_id_domain_signature_required, number <= 2, number)
            self.assertEqual(version.restricted_join_authorisation, number >= 8, number)

    def test_redaction_rule_names(self) -> None:
        """Versions share a rule set exactly where the spec's redaction algorithm is unchanged."""
        names = [get_room_version(v).redaction_rules for v in ALL_VERSIONS]
        self.assertEqual(names, ["v1"] * 5 + ["v6"] * 2 + ["v8"] + ["v9"] * 2 + ["v11"] * 2)

    def test_v12_signature_rules_match_v11(self) -> None:
        """Room v12 enforces key validity, needs no event-id signer, checks restricted joins
        and redacts by the v11 rules, exactly like v11 (only its room ids differ)."""
        v11, v12 = ROOM_VERSIONS["11"], ROOM_VERSIONS["12"]
        self.assertEqual(attr.evolve(v12, identifier="11", room_id_is_create_event_hash=False), v11)
        self.assertTrue(v12.room_id_is_create_event_hash)
        self.assertTrue(v12.enforce_key_validity)
        self.assertFalse(v12.event_id_domain_signature_required)
        self.assertTrue(v12.restricted_join_authorisation)
        self.assertEqual(v12.redaction_rules, REDACTION_RULES_V11)

    def test_redact_event_accepts_a_room_version_object(self) -> None:
        """``redact_event`` takes a :class:`RoomVersion` as well as its identifier."""
        event = make_event("m.room.member", {"membership": "join", "x": 1})
        self.assertEqual(redact_event(event, ROOM_VERSIONS["11"]), redact_event(event, "11"))
