"""Tests for :func:`keyring_module.keyring.signers.signer_tuple`: the fast path for a
plain sender gives exactly what the general rules (``required_signers``) give."""

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.keyring import signers as signers_module
from keyring_module.keyring.batch import event_items
from keyring_module.keyring.signers import signer_tuple
from keyring_module.roomversions import ROOM_VERSIONS
from keyring_module.verify import required_signers

_SERVERS = ["a.org", "b.org:8448", "[::1]", "1.2.3.4", "", "bad name", "-x.org", "a.org."]
_LOCALPARTS = ["u", "alice", ""]


def _identifier(sigil: str) -> st.SearchStrategy[object]:
    """Identifiers with a valid or invalid server, a wrong or no sigil, or not a str."""
    return st.one_of(
        st.builds(
            lambda s, local, server: "%s%s:%s" % (s, local, server),
            st.sampled_from([sigil, sigil, sigil, "#", ""]),
            st.sampled_from(_LOCALPARTS),
            st.sampled_from(_SERVERS),
        ),
        st.sampled_from([sigil + "nocolon", None, 7, ["@u:a.org"], {"x": 1}]),
    )


_CONTENT_KEYS = st.sampled_from(
    ["membership", "third_party_invite", "join_authorised_via_users_server", "body"]
)


def _content_value(key: str) -> st.SearchStrategy[object]:
    if key == "membership":
        return st.sampled_from(["join", "invite", "leave", "knock", None, 3])
    if key == "join_authorised_via_users_server":
        return _identifier("@")
    return st.sampled_from([{}, {"signed": {}}, None, "x"])


_CONTENT = st.one_of(
    st.dictionaries(_CONTENT_KEYS, st.none(), max_size=4).flatmap(
        lambda keys: st.fixed_dictionaries({k: _content_value(k) for k in keys})
    ),
    st.sampled_from([None, "not an object", ["list"], 5]),
)

_OPTIONAL_FIELDS = {
    "sender": _identifier("@"),
    "event_id": _identifier("$"),
    "type": st.sampled_from(["m.room.member", "m.room.message", "m.room.create", None, 1]),
    "content": _CONTENT,
}

EVENTS = st.fixed_dictionaries(
    {},
    optional=_OPTIONAL_FIELDS,  # type: ignore[arg-type]
)


def _general(event: dict[str, Any], version_id: str) -> object:
    """What the general rules say: the sorted signers, or that they raise."""
    try:
        return tuple(sorted(required_signers(event, ROOM_VERSIONS[version_id])))
    except ValueError as e:
        return ("raises", str(e))


def _fast(event: dict[str, Any], version_id: str) -> object:
    try:
        return signer_tuple(event, ROOM_VERSIONS[version_id])
    except ValueError as e:
        return ("raises", str(e))


class SignerTupleTests(SynchronousTestCase):
    """``signer_tuple`` against ``required_signers``."""

    def setUp(self) -> None:
        signers_module._by_sender.clear()
        self.addCleanup(signers_module._by_sender.clear)

    @settings(max_examples=400, deadline=None, database=None)
    @given(EVENTS, st.sampled_from(sorted(ROOM_VERSIONS)))
    def test_agrees_with_the_general_rules(self, event: dict[str, Any], version_id: str) -> None:
        """On any event and room version, the fast path gives the general rules' sorted
        signers (or the same error), the first time and again from its memo."""
        expected = _general(event, version_id)
        self.assertEqual(_fast(event, version_id), expected)
        self.assertEqual(_fast(event, version_id), expected)  # memoised sender

    def test_plain_senders_share_one_tuple(self) -> None:
        """Events from one sender that need it alone share one tuple, across event
        types and member events without special content."""
        v10 = ROOM_VERSIONS["10"]
        message = {"sender": "@u:a.org", "type": "m.room.message"}
        join = {"sender": "@u:a.org", "type": "m.room.member", "content": {"membership": "join"}}
        first = signer_tuple(message, v10)
        self.assertEqual(first, ("a.org",))
        self.assertIs(signer_tuple(join, v10), first)
        self.assertIs(signer_tuple(dict(message), ROOM_VERSIONS["3"]), first)

    def test_special_events_take_the_general_rules(self) -> None:
        """A restricted join, a third-party invite and a v1 event (which the memo must
        not answer) get their own signers even after the sender was memoised."""
        v10 = ROOM_VERSIONS["10"]
        sender = "@u:a.org"
        signer_tuple({"sender": sender, "type": "m.room.message"}, v10)
        restricted = {
            "sender": sender,
            "type": "m.room.member",
            "content": {"membership": "join", "join_authorised_via_users_server": "@r:c.org"},
        }
        self.assertEqual(signer_tuple(restricted, v10), ("a.org", "c.org"))
        invite = {
            "sender": sender,
            "type": "m.room.member",
            "content": {"membership": "invite", "third_party_invite": {"signed": {}}},
        }
        self.assertEqual(signer_tuple(invite, v10), ())
        v1_event = {"sender": sender, "event_id": "$e:b.org", "type": "m.room.message"}
        self.assertEqual(signer_tuple(v1_event, ROOM_VERSIONS["1"]), ("a.org", "b.org"))

    def test_invalid_senders_are_not_memoised(self) -> None:
        """A sender with no valid server name raises every time and is never kept."""
        event = {"sender": "@u:bad name", "type": "m.room.message"}
        for _ in range(2):
            with self.assertRaises(ValueError):
                signer_tuple(event, ROOM_VERSIONS["10"])
        self.assertEqual(signers_module._by_sender, {})

    def test_memo_is_bounded(self) -> None:
        """Past ``MAX_REMEMBERED_SENDERS`` the memo starts afresh, and answers stay
        right."""
        self.patch(signers_module, "MAX_REMEMBERED_SENDERS", 3)
        v10 = ROOM_VERSIONS["10"]
        for n in range(10):
            event = {"sender": "@u%d:s%d.org" % (n, n), "type": "m.room.message"}
            self.assertEqual(signer_tuple(event, v10), ("s%d.org" % n,))
            self.assertLessEqual(len(signers_module._by_sender), 3)

    def test_long_senders_are_not_memoised(self) -> None:
        """A sender longer than a user id may be is answered but never kept, so hostile
        events cannot make the memo hold big strings."""
        sender = "@" + "u" * 10_000 + ":a.org"
        event = {"sender": sender, "type": "m.room.message"}
        self.assertEqual(signer_tuple(event, ROOM_VERSIONS["10"]), ("a.org",))
        self.assertEqual(signers_module._by_sender, {})

    def test_event_items_keep_the_shared_tuple(self) -> None:
        """``event_items`` gives each event the signers ``signer_tuple`` gives, and a
        missing ``origin_server_ts`` or bool timestamp is still refused."""
        v10 = ROOM_VERSIONS["10"]
        events: list[dict[str, Any]] = [
            {"sender": "@u:a.org", "type": "m.room.message", "origin_server_ts": 1},
            {"sender": "@v:a.org", "type": "m.room.message", "origin_server_ts": 2},
            {"sender": "@u:a.org", "type": "m.room.message", "origin_server_ts": True},
            {"sender": "@u:a.org", "type": "m.room.message"},
        ]
        items, errors = event_items(events, v10, frozenset())
        self.assertEqual(sorted(errors), [2, 3])
        first, second = items[0], items[1]
        assert first is not None and second is not None
        self.assertEqual(list(first.servers), ["a.org"])
        self.assertIs(first.servers, signer_tuple(events[0], v10))
