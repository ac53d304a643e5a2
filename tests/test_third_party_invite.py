"""Tests for :mod:`keyring_module.third_party_invite`: the identity server's signature on
a third-party invite's ``signed`` block, checked against the room's invite event."""

import base64
import copy
from typing import Any, Optional

from hypothesis import given, settings
from signedjson.key import generate_signing_key
from signedjson.sign import sign_json
from signedjson.types import SigningKey
from twisted.trial.unittest import SynchronousTestCase
from unpaddedbase64 import encode_base64

from keyring_module.keyring import check_third_party_invite, third_party_invite_token
from keyring_module.third_party_invite import (
    MAX_SIGNATURE_CHECKS,
    ThirdPartyInviteFailure,
)
from tests.hostile_inputs import json_values

INVITER = "@alice:a.test"
INVITEE = "@bob:b.test"
TOKEN = "abc123"
IDENTITY_SERVER = "id.test"


def public_key_text(key: SigningKey, urlsafe: bool = False) -> str:
    """The unpadded base64 public key of ``key``, in the standard or URL-safe alphabet."""
    raw = key.verify_key.encode()
    if urlsafe:
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")
    text: str = encode_base64(raw)
    return text


def signed_block(key: SigningKey, mxid: str = INVITEE, token: str = TOKEN) -> dict[str, Any]:
    """A ``signed`` block as an identity server makes it, signed with ``key``."""
    signed: dict[str, Any] = sign_json({"mxid": mxid, "token": token}, IDENTITY_SERVER, key)
    return signed


def member_event(signed: Any, state_key: str = INVITEE, sender: str = INVITER) -> dict[str, Any]:
    """An ``m.room.member`` invite made from a third-party invite."""
    return {
        "type": "m.room.member",
        "room_id": "!room:a.test",
        "sender": sender,
        "state_key": state_key,
        "origin_server_ts": 1_700_000_000_000,
        "content": {
            "membership": "invite",
            "third_party_invite": {"display_name": "bob", "signed": signed},
        },
    }


def invite_event(
    public_key: Optional[str] = None,
    public_keys: Optional[list[Any]] = None,
    state_key: str = TOKEN,
    sender: str = INVITER,
) -> dict[str, Any]:
    """The room's ``m.room.third_party_invite`` state event listing the given keys."""
    content: dict[str, Any] = {
        "display_name": "b...@b.test",
        "key_validity_url": "https://id.test/_matrix/identity/v2/pubkey/isvalid",
    }
    if public_key is not None:
        content["public_key"] = public_key
    if public_keys is not None:
        content["public_keys"] = public_keys
    return {
        "type": "m.room.third_party_invite",
        "room_id": "!room:a.test",
        "sender": sender,
        "state_key": state_key,
        "content": content,
    }


class ThirdPartyInviteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.identity_key = generate_signing_key("0")
        self.other_key = generate_signing_key("1")
        self.signed = signed_block(self.identity_key)
        self.member = member_event(self.signed)
        self.invite = invite_event(public_key=public_key_text(self.identity_key))

    def reason(
        self, member: Any, invite: Any, expected: Optional[ThirdPartyInviteFailure]
    ) -> Optional[str]:
        """Check and assert the outcome; return the rejection's detail, if any."""
        rejection = check_third_party_invite(member, invite)
        self.assertEqual(None if rejection is None else rejection.reason, expected)
        return None if rejection is None else rejection.detail

    def test_valid_signed_block_is_accepted(self) -> None:
        """A block signed by the key named in ``public_key`` vouches for the invite."""
        self.reason(self.member, self.invite, None)

    def test_key_in_public_keys_list_is_accepted(self) -> None:
        """A key listed only in ``public_keys`` counts, with or without ``public_key``."""
        listed = [{"public_key": public_key_text(self.other_key)}]
        listed.append({"public_key": public_key_text(self.identity_key), "key_validity_url": ""})
        self.reason(self.member, invite_event(public_keys=listed), None)
        only_other = invite_event(public_key=public_key_text(self.other_key), public_keys=listed)
        self.reason(self.member, only_other, None)

    def test_url_safe_public_key_is_accepted(self) -> None:
        """Public keys in the URL-safe alphabet (the spec allows both) are read too."""
        key = next(
            k
            for k in (generate_signing_key(str(i)) for i in range(200))
            if set(public_key_text(k, urlsafe=True)) & set("-_")
        )
        member = member_event(signed_block(key))
        self.reason(member, invite_event(public_key=public_key_text(key, urlsafe=True)), None)

    def test_wrong_mxid_is_refused(self) -> None:
        """A block naming another user than the invited one is refused."""
        member = member_event(signed_block(self.identity_key, mxid="@mallory:b.test"))
        detail = self.reason(member, self.invite, ThirdPartyInviteFailure.MXID_MISMATCH)
        self.assertIn("'@mallory:b.test'", detail or "")

    def test_wrong_token_is_refused(self) -> None:
        """An invite event whose state key is not the block's token is refused."""
        invite = invite_event(public_key=public_key_text(self.identity_key), state_key="other")
        self.reason(self.member, invite, ThirdPartyInviteFailure.TOKEN_MISMATCH)
        member = member_event(signed_block(self.identity_key, token="other"))
        self.reason(member, self.invite, ThirdPartyInviteFailure.TOKEN_MISMATCH)

    def test_other_sender_is_refused(self) -> None:
        """The invite must be sent by whoever sent the third-party invite event."""
        member = member_event(self.signed, sender="@eve:a.test")
        self.reason(member, self.invite, ThirdPartyInviteFailure.SENDER_MISMATCH)

    def test_signature_by_unlisted_key_is_refused(self) -> None:
        """A block signed by a key the invite event does not list is refused."""
        member = member_event(signed_block(self.other_key))
        self.reason(member, self.invite, ThirdPartyInviteFailure.NO_VALID_SIGNATURE)

    def test_tampered_signed_block_is_refused(self) -> None:
        """Changing or adding anything in ``signed`` after signing breaks its signature."""
        for change in (
            lambda s: s.update(extra="field"),
            lambda s: s.update(mxid="@mallory:b.test"),
            lambda s: s.update(token="other"),
        ):
            signed = copy.deepcopy(self.signed)
            change(signed)
            member = member_event(signed, state_key=signed["mxid"])
            invite = invite_event(
                public_key=public_key_text(self.identity_key), state_key=signed["token"]
            )
            self.reason(member, invite, ThirdPartyInviteFailure.NO_VALID_SIGNATURE)

    def test_malformed_base64_is_skipped(self) -> None:
        """A malformed public key is skipped (another listed key may still verify); a
        malformed signature verifies nothing; no usable key at all is its own reason."""
        bad_keys = ["not base64!", public_key_text(self.identity_key) + "=x", "AAAA", 5]
        listed: list[Any] = [{"public_key": k} for k in bad_keys]
        self.reason(
            self.member, invite_event(public_keys=listed), ThirdPartyInviteFailure.NO_PUBLIC_KEYS
        )
        listed.append({"public_key": public_key_text(self.identity_key)})
        self.reason(self.member, invite_event(public_key="*", public_keys=listed), None)

        for signature in ("!" * 86, "A" * 85, "", 7, None):
            signed = copy.deepcopy(self.signed)
            signed["signatures"][IDENTITY_SERVER]["ed25519:0"] = signature
            member = member_event(signed)
            self.reason(member, self.invite, ThirdPartyInviteFailure.NO_VALID_SIGNATURE)

    def test_any_good_signature_is_enough(self) -> None:
        """As the auth rules say, one verifying signature suffices, whatever the server
        name and key id it is filed under and whatever other signatures say."""
        signed = copy.deepcopy(self.signed)
        good = signed["signatures"].pop(IDENTITY_SERVER)["ed25519:0"]
        signed["signatures"] = {
            "elsewhere.test": {"ed25519:bad": "A" * 86},
            "other.test": {"ed25519:whatever": good},
        }
        self.reason(member_event(signed), self.invite, None)

    def test_only_ed25519_signatures_count(self) -> None:
        """A signature under a key id of another algorithm is not tried."""
        signed = copy.deepcopy(self.signed)
        signature = signed["signatures"][IDENTITY_SERVER].pop("ed25519:0")
        signed["signatures"][IDENTITY_SERVER]["rsa:0"] = signature
        self.reason(member_event(signed), self.invite, ThirdPartyInviteFailure.NO_SIGNATURES)

    def test_events_that_are_no_third_party_invite_are_refused(self) -> None:
        """Events missing a part of the third-party invite shape get the reason for it."""
        plain = member_event(self.signed)
        del plain["content"]["third_party_invite"]
        join = member_event(self.signed)
        join["content"]["membership"] = "join"
        no_signed = member_event(None)
        no_token = member_event({"mxid": INVITEE, "signatures": self.signed["signatures"]})
        for member, reason in (
            (plain, ThirdPartyInviteFailure.NOT_THIRD_PARTY_INVITE),
            (join, ThirdPartyInviteFailure.NOT_THIRD_PARTY_INVITE),
            (
                dict(self.member, type="m.room.message"),
                ThirdPartyInviteFailure.NOT_THIRD_PARTY_INVITE,
            ),
            (dict(self.member, content=[]), ThirdPartyInviteFailure.NOT_THIRD_PARTY_INVITE),
            (no_signed, ThirdPartyInviteFailure.MALFORMED_SIGNED),
            (no_token, ThirdPartyInviteFailure.MALFORMED_SIGNED),
        ):
            self.reason(member, self.invite, reason)

    def test_missing_invite_event_is_refused(self) -> None:
        """Without the room's m.room.third_party_invite event nothing vouches for the
        invite; an event of another type does not stand in for it."""
        self.reason(self.member, None, ThirdPartyInviteFailure.NO_INVITE_EVENT)
        other_type = dict(self.invite, type="m.room.member")
        self.reason(self.member, other_type, ThirdPartyInviteFailure.NO_INVITE_EVENT)

    def test_signed_block_canonical_json_cannot_hold_is_refused(self) -> None:
        """A ``signed`` block with NaN cannot have been signed and is refused."""
        signed = copy.deepcopy(self.signed)
        signed["nan"] = float("nan")
        detail = self.reason(
            member_event(signed), self.invite, ThirdPartyInviteFailure.NOT_CANONICAL_JSON
        )
        self.assertIn("canonical JSON", detail or "")

    def test_too_many_checks_are_refused(self) -> None:
        """Keys times signatures beyond the cap are refused, even if one would verify."""
        keys = [{"public_key": encode_base64(bytes([i]) * 32)} for i in range(16)]
        keys.append({"public_key": public_key_text(self.identity_key)})
        signed = copy.deepcopy(self.signed)
        signatures = signed["signatures"][IDENTITY_SERVER]
        for i in range(MAX_SIGNATURE_CHECKS // 16 - 1):  # 16 signatures with the good one
            signatures["ed25519:x%d" % i] = "A" * 86
        self.assertEqual(len(signatures), 16)
        invite = invite_event(public_keys=keys)
        self.reason(member_event(signed), invite, ThirdPartyInviteFailure.TOO_MANY_CHECKS)
        del keys[0]  # 16 keys: exactly at the cap, checked
        self.reason(member_event(signed), invite_event(public_keys=keys), None)

    def test_token_is_read_from_the_member_event(self) -> None:
        """The token names the invite event to look up; shapes without one give None."""
        self.assertEqual(third_party_invite_token(self.member), TOKEN)
        self.assertIsNone(third_party_invite_token(member_event({"token": 5})))
        self.assertIsNone(third_party_invite_token({"content": "x"}))

    @settings(max_examples=200, deadline=None)
    @given(member=json_values(), invite=json_values(), signed=json_values())
    def test_hostile_shapes_never_raise(self, member: Any, invite: Any, signed: Any) -> None:
        """Arbitrary JSON in place of either event or the signed block gives a rejection
        (or acceptance), never an exception."""
        for candidate in (member, member_event(signed)):
            self.assertIsNotNone(check_third_party_invite(candidate, invite))
            token = third_party_invite_token(candidate)
            self.assertTrue(token is None or isinstance(token, str))
