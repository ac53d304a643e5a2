"""Tests for :mod:`keyring_module.redaction` and the room version table."""

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from keyring_module.redaction import redact_event
from keyring_module.roomversions import ROOM_VERSIONS, get_room_version

ALL_VERSIONS = [str(n) for n in range(1, 12)]

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


def versions(low: int, high: int = 11) -> list[str]:
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
        """Room v11 no longer protects top-level origin, membership and prev_state."""
        redacted = redact_event(make_event("m.room.message", {}), "11")
        for key in _V11_DROPPED:
            self.assertNotIn(key, redacted)
        expected_keys = (set(_TOP_LEVEL) - _V11_DROPPED) | {"content"}
        self.assertEqual(set(redacted), expected_keys)

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
        with self.assertRaisesRegex(ValueError, r"unknown room version '12'.*1, 2, .*11"):
            redact_event(make_event("m.room.message", {}), "12")
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
        """Room v11 keeps ``third_party_invite`` reduced to its ``signed`` key (MSC3821)."""
        signed = {"mxid": "@c:c.org", "token": "abc", "signatures": {"id.org": {"ed25519:0": "s"}}}
        content = {
            "membership": "invite",
            "displayname": "Carol",
            "third_party_invite": {"display_name": "c...@x", "signed": signed},
        }
        expected = {"membership": "invite", "third_party_invite": {"signed": signed}}
        self.assert_content("m.room.member", content, expected, ["11"])

    def test_v11_third_party_invite_without_signed_is_kept_empty(self) -> None:
        """A v11 ``third_party_invite`` object without ``signed`` survives as ``{}``; a non-object one is dropped."""
        self.assert_content(
            "m.room.member",
            {"membership": "invite", "third_party_invite": {"display_name": "x"}},
            {"membership": "invite", "third_party_invite": {}},
            ["11"],
        )
        self.assert_content(
            "m.room.member",
            {"membership": "invite", "third_party_invite": "junk"},
            {"membership": "invite"},
            ["11"],
        )

    def test_create_keeps_creator_before_v11(self) -> None:
        """m.room.create keeps only ``creator`` in rooms v1-v10."""
        content = {"creator": "@alice:a.org", "room_version": "10", "m.federate": False}
        self.assert_content("m.room.create", content, {"creator": "@alice:a.org"}, versions(1, 10))

    def test_create_keeps_all_content_in_v11(self) -> None:
        """m.room.create keeps its whole ``content`` in room v11 (MSC2176)."""
        content = {"room_version": "11", "m.federate": False, "predecessor": {"room_id": "!o:a"}}
        self.assert_content("m.room.create", content, content, ["11"])

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
        self.assert_content("m.room.power_levels", content, dict(classic, invite=0), ["11"])

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
        self.assert_content("m.room.redaction", content, {"redacts": "$victim:a.org"}, ["11"])

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


class RoomVersionTableTests(SynchronousTestCase):
    def test_known_versions_are_one_to_eleven(self) -> None:
        """The table holds exactly room versions 1 to 11."""
        self.assertEqual(list(ROOM_VERSIONS), ALL_VERSIONS)

    def test_flags_per_version(self) -> None:
        """Validity is enforced from v5, event-id signers only in v1/v2, restricted joins from v8."""
        for number in range(1, 12):
            version = get_room_version(str(number))
            self.assertEqual(version.enforce_key_validity, number >= 5, number)
            self.assertEqual(version.event_id_domain_signature_required, number <= 2, number)
            self.assertEqual(version.restricted_join_authorisation, number >= 8, number)

    def test_redaction_rule_names(self) -> None:
        """Versions share a rule set exactly where the spec's redaction algorithm is unchanged."""
        names = [get_room_version(v).redaction_rules for v in ALL_VERSIONS]
        self.assertEqual(names, ["v1"] * 5 + ["v6"] * 2 + ["v8"] + ["v9"] * 2 + ["v11"])

    def test_redact_event_accepts_a_room_version_object(self) -> None:
        """``redact_event`` takes a :class:`RoomVersion` as well as its identifier."""
        event = make_event("m.room.member", {"membership": "join", "x": 1})
        self.assertEqual(redact_event(event, ROOM_VERSIONS["11"]), redact_event(event, "11"))
