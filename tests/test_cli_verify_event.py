"""Tests for ``keyring-module verify-event`` (:mod:`keyring_module.cli.verify_event`).

Offline (``--key``) runs go through :func:`keyring_module.cli.main` or the pure
:func:`run_offline`; the keyring mode runs on a ``Clock`` against a fake origin through
an injected ``FakeFederationClient``, as ``query``'s tests do. No network.
"""

import io
import json
import sys
from typing import Any, Optional

from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey as NaclSigningKey
from signedjson.sign import sign_json
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase
from unpaddedbase64 import decode_base64, encode_base64

from keyring_module.cli import build_parser, main
from keyring_module.cli.query import DEFAULT_QUERY_CONFIG
from keyring_module.cli.verify_event import (
    VerifyEventOptions,
    VerifyEventUsageError,
    options_from_args,
    report,
    run_offline,
    run_with_keyring,
    stored_keys,
)
from keyring_module.config import parse_config
from keyring_module.errors import KeyVerificationError, VerificationFailure
from keyring_module.eventhashes import event_id_of
from keyring_module.keyring import EventCheck, EventOutcome
from keyring_module.roomversions import ROOM_VERSIONS
from keyring_module.storage.memory import InMemoryKeyStore
from tests.fake_reactors import FakeReactor
from tests.fakes import FakeFederationClient, FakeOriginResource
from tests.hostile_inputs import json_values
from tests.keyring_fixtures import TimeoutClient
from tests.test_event_checks import SPEC_SEED, hash_and_sign
from tests.utils import key_id, new_signing_key, verify_key_base64

#: The spec's minimal signed event ("Signing Events" test vector), written out by hand.
SPEC_EVENT_TEXT = """
{
    "auth_events": [],
    "content": {},
    "depth": 3,
    "hashes": {"sha256": "5jM4wQpv6lnBo7CLIghJuHdW+s2CMBJPUOGOC89ncos"},
    "origin": "domain",
    "origin_server_ts": 1000000,
    "prev_events": [],
    "room_id": "!x:domain",
    "sender": "@a:domain",
    "signatures": {
        "domain": {
            "ed25519:1": "KxwGjPSDEtvnFgU00fwFz+l6d2pJM6XBIaMEn81SXPTRl16AqLAYqfIReFGZlHi5KLjAWbOoMszkwsQma+lYAg"
        }
    },
    "type": "X",
    "unsigned": {"age_ts": 1000000}
}
"""

NOW_MS = 1_700_000_000_000
ORIGIN = "origin.test"


def spec_verify_key() -> str:
    """The spec key's verify key in unpadded base64."""
    return encode_base64(NaclSigningKey(decode_base64(SPEC_SEED)).verify_key.encode())


def message(**fields: Any) -> dict[str, Any]:
    """An unsigned message event from ``@u:origin.test``."""
    event: dict[str, Any] = {
        "type": "m.room.message",
        "room_id": "!r:origin.test",
        "sender": "@u:origin.test",
        "origin_server_ts": NOW_MS - 1000,
        "depth": 5,
        "prev_events": [],
        "auth_events": [],
        "content": {"msgtype": "m.text", "body": "hello"},
    }
    event.update(fields)
    return event


class VerifyEventCase(SynchronousTestCase):
    """Runs the command in process with ``--key`` for a fresh key of ``origin.test``."""

    def setUp(self) -> None:
        self.key = new_signing_key("k1")
        self.key_args = ["--key", ORIGIN, key_id(self.key), verify_key_base64(self.key)]

    def signed(self, version: str, **fields: Any) -> dict[str, Any]:
        return hash_and_sign(message(**fields), version, ORIGIN, self.key)

    def write(self, text: str) -> str:
        """Write ``text`` to a new file; its path."""
        path: str = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def run_main(self, *argv: str) -> tuple[int, str, str]:
        """``keyring-module ARGV`` in process: (exit status, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        code = main(list(argv))
        return code, out.getvalue(), err.getvalue()

    def check(self, event: dict[str, Any], version: str) -> tuple[int, dict[str, Any]]:
        """Run the command with ``--json`` on ``event``: (exit status, the JSON answer)."""
        path = self.write(json.dumps(event))
        argv = ["verify-event", path, "--room-version", version, "--json", *self.key_args]
        code, out, _ = self.run_main(*argv)
        answer: dict[str, Any] = json.loads(out)
        return code, answer

    def results(self, answer: dict[str, Any]) -> list[tuple[str, str]]:
        return [(c["check"], c["result"]) for c in answer["checks"]]


class OfflineTests(VerifyEventCase):
    def test_spec_signing_example_verifies_offline(self) -> None:
        """The spec's signed event, written by hand, verifies with only ``--key`` in v3 and v10."""
        path = self.write(SPEC_EVENT_TEXT)
        key = ["--key", "domain", "ed25519:1", spec_verify_key()]
        for version in ("3", "10"):
            code, out, err = self.run_main("verify-event", path, "--room-version", version, *key)
            self.assertEqual(code, 0, err)
            self.assertIn("result: ok", out)
            self.assertIn("signers: passed (domain)", out)
            self.assertIn("signature of domain: passed (key ed25519:1 %s)" % spec_verify_key(), out)
            self.assertIn("content_hash: passed", out)

    def test_accepted_json_lists_every_check(self) -> None:
        """An accepted v10 event: exit 0 and the JSON shape with every check passed."""
        event = self.signed("10")
        code, answer = self.check(event, "10")
        self.assertEqual(code, 0)
        self.assertEqual(set(answer), {"result", "reason", "checks"})
        self.assertEqual((answer["result"], answer["reason"]), ("ok", None))
        self.assertEqual(
            self.results(answer),
            [
                ("signers", "passed"),
                ("value_rules", "passed"),
                ("signature", "passed"),
                ("event_id", "computed"),
                ("content_hash", "passed"),
            ],
        )
        signature = answer["checks"][2]
        self.assertEqual(signature["server"], ORIGIN)
        self.assertEqual(
            signature["keys"],
            [{"key_id": key_id(self.key), "verify_key": verify_key_base64(self.key)}],
        )
        self.assertEqual(answer["checks"][3]["expected"], event_id_of(event, ROOM_VERSIONS["10"]))

    def test_changed_content_is_redacted(self) -> None:
        """Content changed after signing: exit 3, ``redacted``, the content hash check failed."""
        event = self.signed("10")
        event["content"]["body"] = "changed"
        code, answer = self.check(event, "10")
        self.assertEqual(code, 3)
        self.assertEqual((answer["result"], answer["reason"]), ("redacted", None))
        hash_check, copy_signers = answer["checks"][-2:]
        self.assertEqual((hash_check["check"], hash_check["result"]), ("content_hash", "failed"))
        self.assertEqual(copy_signers["check"], "redacted_copy_signers")
        self.assertEqual((copy_signers["result"], copy_signers["servers"]), ("passed", [ORIGIN]))
        self.assertEqual(answer["checks"][2]["result"], "passed")

    def test_redacted_copy_signers_are_checked(self) -> None:
        """A changed third-party invite (v10) needs no signer itself, but its redacted
        copy, a plain invite, needs the sender's: with that signature it is redacted,
        and the report shows the copy's signature check; without it, rejected there."""
        invite = message(
            type="m.room.member",
            state_key="@bob:b.test",
            content={"membership": "invite", "third_party_invite": {"signed": {}}},
        )
        changed = hash_and_sign(invite, "10", ORIGIN, self.key)
        changed["content"]["displayname"] = "changed"
        code, answer = self.check(changed, "10")
        self.assertEqual(code, 3)
        self.assertEqual(
            self.results(answer)[-3:],
            [
                ("content_hash", "failed"),
                ("redacted_copy_signers", "passed"),
                ("signature", "passed"),
            ],
        )
        self.assertEqual(answer["checks"][0]["servers"], [])
        self.assertEqual(answer["checks"][-1]["server"], ORIGIN)
        code, answer = self.check(dict(changed, signatures={}), "10")
        self.assertEqual((code, answer["reason"]), (1, "not_signed"))
        self.assertEqual(self.results(answer)[-1], ("signature", "failed"))

    def test_event_without_hashes_is_rejected_before_signatures(self) -> None:
        """No ``hashes``: exit 1, ``malformed_event``, the report stops at ``hashes``,
        and the reason on stderr names no server (the event itself is at fault)."""
        event = self.signed("10")
        del event["hashes"]
        path = self.write(json.dumps(event))
        code, out, err = self.run_main(
            "verify-event", path, "--room-version", "10", "--json", *self.key_args
        )
        answer = json.loads(out)
        self.assertEqual((code, answer["reason"]), (1, "malformed_event"))
        self.assertEqual(self.results(answer)[-1], ("hashes", "failed"))
        self.assertNotIn("signature", [c["check"] for c in answer["checks"]])
        self.assertEqual(
            err.strip(), "keyring-module verify-event: rejected: the event has no hashes object"
        )

    def test_bad_signature_is_rejected(self) -> None:
        """A signature that does not verify: exit 1, ``bad_signature``, checks stop there."""
        event = self.signed("10")
        event["depth"] = 6  # kept by redaction: covered by the signature
        code, answer = self.check(event, "10")
        self.assertEqual(code, 1)
        self.assertEqual((answer["result"], answer["reason"]), ("rejected", "bad_signature"))
        self.assertEqual(answer["checks"][-1]["check"], "signature")
        self.assertEqual(answer["checks"][-1]["result"], "failed")
        self.assertEqual(answer["checks"][-1]["reason"], "bad_signature")

    def test_float_rejected_in_v10_judged_by_old_rules_in_v5(self) -> None:
        """A float makes a v10 event rejected (value rules failed) but is fine in v5."""
        code, answer = self.check(self.signed("10", depth=5, content={"n": 50.5}), "10")
        self.assertEqual(code, 1)
        self.assertEqual(answer["reason"], "not_canonical_json")
        self.assertEqual(self.results(answer), [("signers", "passed"), ("value_rules", "failed")])
        code, answer = self.check(self.signed("5", content={"n": 50.5}), "5")
        self.assertEqual(code, 0)
        self.assertIn(("value_rules", "not_applicable"), self.results(answer))

    def test_wrong_event_id_is_rejected(self) -> None:
        """An event id that is not the reference hash: exit 1, ``event_id_mismatch``."""
        event = dict(self.signed("10"), event_id="$not-the-hash")
        code, answer = self.check(event, "10")
        self.assertEqual(code, 1)
        self.assertEqual(answer["reason"], "event_id_mismatch")
        last = answer["checks"][-1]
        self.assertEqual(
            (last["check"], last["result"], last["got"]), ("event_id", "failed", "$not-the-hash")
        )
        self.assertEqual(last["expected"], event_id_of(event, ROOM_VERSIONS["10"]))
        event["event_id"] = last["expected"]
        self.assertEqual(self.check(event, "10")[0], 0)

    def test_a_key_of_another_server_is_no_key(self) -> None:
        """Keys given for another server do not count: rejected, the signature check shows no key."""
        self.key_args = ["--key", "other.test", key_id(self.key), verify_key_base64(self.key)]
        code, answer = self.check(self.signed("10"), "10")
        self.assertEqual(code, 1)
        self.assertEqual(answer["checks"][-1]["keys"], [])
        self.assertEqual(answer["checks"][-1]["result"], "failed")

    def test_event_read_from_standard_input(self) -> None:
        """``-`` reads the event from standard input."""
        event = self.signed("10")
        args = build_parser().parse_args(
            ["verify-event", "-", "--room-version", "10", *self.key_args]
        )
        stdin = io.TextIOWrapper(io.BytesIO(json.dumps(event).encode()))
        options = options_from_args(args, stdin)
        self.assertEqual(options.event, event)
        out = io.StringIO()
        self.assertEqual(run_offline(options, NOW_MS, out=out), 0)
        self.assertIn("result: ok", out.getvalue())

    def test_usage_errors_exit_2_with_a_message(self) -> None:
        """Unknown room version, bad base64 key, missing or non-JSON file: exit 2 and why."""
        good = self.write(json.dumps(self.signed("10")))
        cases = [
            ([good, "--room-version", "99", *self.key_args], "unknown room version '99'"),
            (
                [good, "--room-version", "10", "--key", ORIGIN, "ed25519:k1", "not*base64"],
                "'not*base64' is not a base64 ed25519 verify key",
            ),
            (
                [good, "--room-version", "10", "--key", ORIGIN, "ed25519:k1", "AAAA"],
                "is not a base64 ed25519 verify key (32 bytes)",
            ),
            (
                [good, "--room-version", "10", "--key", ORIGIN, "rsa:1", "A" * 43],
                "'rsa:1' is not an ed25519: key id",
            ),
            ([good + ".missing", "--room-version", "10", *self.key_args], "cannot read"),
            ([self.write("{not json"), "--room-version", "10", *self.key_args], "is not JSON"),
            (
                [self.write("[1, 2]"), "--room-version", "10", *self.key_args],
                "holds no JSON object",
            ),
        ]
        for argv, message_part in cases:
            code, out, err = self.run_main("verify-event", *argv)
            self.assertEqual(code, 2, argv)
            self.assertEqual(out, "")
            self.assertIn(message_part, err)

    def test_a_rejection_the_checks_do_not_explain_is_reported_as_such(self) -> None:
        """A keyring rejection (a timed-out fetch) whose keys later checked out ends the
        report with a failed ``keyring`` check: it never shows only passed checks."""
        event = self.signed("10")
        given = {ORIGIN: {key_id(self.key): decode_base64(verify_key_base64(self.key))}}
        options = VerifyEventOptions(event, ROOM_VERSIONS["10"], given, as_json=True)
        error = KeyVerificationError(ORIGIN, (), VerificationFailure.FETCH_TIMED_OUT, "timeout")
        outcome = EventCheck(EventOutcome.REJECTED, error.reason, error=error)
        out, err = io.StringIO(), io.StringIO()
        keys = stored_keys(given, NOW_MS)
        self.assertEqual(report(options, outcome, keys, NOW_MS, frozenset(), out, err), 1)
        answer = json.loads(out.getvalue())
        self.assertEqual(answer["reason"], "fetch_timed_out")
        self.assertEqual(answer["checks"][-2]["result"], "passed")
        self.assertEqual(
            answer["checks"][-1],
            {
                "check": "keyring",
                "result": "failed",
                "reason": "fetch_timed_out",
                "detail": "timeout",
            },
        )
        self.assertIn("rejected: timeout", err.getvalue())

    def test_key_and_config_cannot_be_combined(self) -> None:
        """``--key`` is the offline mode: together with ``--config`` it is a usage error."""
        args = build_parser().parse_args(
            ["verify-event", "-", "--room-version", "10", "--config", "x.yaml", *self.key_args]
        )
        with self.assertRaises(VerifyEventUsageError) as cm:
            options_from_args(args, io.StringIO("{}"))
        self.assertIn("cannot be used with --config", str(cm.exception))


#: Fields of a signed event worth spoiling: who signs, the hashes and the ids.
HOSTILE_FIELDS = (
    "sender",
    "event_id",
    "room_id",
    "type",
    "state_key",
    "content",
    "hashes",
    "signatures",
    "origin_server_ts",
    "depth",
    "unsigned",
)


class HostileEventTests(SynchronousTestCase):
    key = new_signing_key("k1")

    @settings(max_examples=150, deadline=None)
    @given(
        st.sampled_from(sorted(ROOM_VERSIONS)),
        st.dictionaries(st.sampled_from(HOSTILE_FIELDS), json_values(), max_size=3),
    )
    def test_bad_events_never_crash(self, version: str, spoiled: dict[str, Any]) -> None:
        """Any spoiled event gives an outcome (0, 1 or 3) and a report, as text and JSON,
        whose one failed check (the last) is the outcome's reason."""
        event = dict(hash_and_sign(message(), version, ORIGIN, self.key), **spoiled)
        keys = {ORIGIN: {key_id(self.key): decode_base64(verify_key_base64(self.key))}}
        for as_json in (False, True):
            options = VerifyEventOptions(event, ROOM_VERSIONS[version], keys, as_json=as_json)
            out = io.StringIO()
            code = run_offline(options, NOW_MS, out=out, err=io.StringIO())
            self.assertIn(code, (0, 1, 3))
            if as_json:
                answer = json.loads(out.getvalue())
                self.assertEqual(answer["result"], {0: "ok", 1: "rejected", 3: "redacted"}[code])
                last = answer["checks"][-1]
                failed = [c for c in answer["checks"] if c["result"] == "failed"]
                hash_failed = [c for c in failed if c["check"] == "content_hash"]
                rejections = [c for c in failed if c["check"] != "content_hash"]
                self.assertEqual(rejections, [last] if code == 1 else [])
                if code == 1:  # the re-run steps find the keyring's own reason
                    self.assertNotEqual(last["check"], "keyring")
                    self.assertEqual(last["reason"], answer["reason"])
                if code == 3:
                    self.assertEqual(len(hash_failed), 1)
                    self.assertEqual(last["check"], "redacted_copy_signers")
                if code == 0:
                    self.assertEqual(hash_failed, [])


class KeyringModeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = FakeReactor()
        self.clock.advance(NOW_MS / 1000)
        self.origin_key = new_signing_key("o1")
        self.origin = FakeOriginResource(self.origin_key, ORIGIN, self.clock)
        self.outbound = FakeFederationClient({ORIGIN: self.origin})
        self.store = InMemoryKeyStore()

    def verify(self, event: dict[str, Any], as_json: bool = False) -> tuple[int, str, str]:
        """Run the keyring mode on a v10 ``event``: (exit status, stdout, stderr)."""
        options = VerifyEventOptions(
            event,
            ROOM_VERSIONS["10"],
            config=parse_config(DEFAULT_QUERY_CONFIG, standalone=False),
            as_json=as_json,
        )
        out, err = io.StringIO(), io.StringIO()
        d = defer.ensureDeferred(
            run_with_keyring(
                self.clock,
                options,
                client=TimeoutClient(self.outbound, self.clock),
                store=self.store,
                out=out,
                err=err,
            )
        )
        for _ in range(5):
            self.clock.advance(0)
            self.outbound.flush()
        code = self.successResultOf(d)
        return code, out.getvalue(), err.getvalue()

    def test_keys_fetched_from_the_origin(self) -> None:
        """Without ``--key`` the origin's keys are fetched: accepted, the fetched key shown."""
        event = hash_and_sign(message(), "10", ORIGIN, self.origin_key)
        code, out, err = self.verify(event)
        self.assertEqual(code, 0, err)
        self.assertIn("result: ok", out)
        self.assertIn(
            "signature of %s: passed (key %s %s)"
            % (ORIGIN, key_id(self.origin_key), verify_key_base64(self.origin_key)),
            out,
        )

    def test_changed_content_is_redacted(self) -> None:
        """Through the keyring too, changed content gives exit 3."""
        event = hash_and_sign(message(), "10", ORIGIN, self.origin_key)
        event["content"]["body"] = "changed"
        code, out, _ = self.verify(event)
        self.assertEqual(code, 3)
        self.assertIn("result: redacted", out)
        self.assertIn("content_hash: failed", out)

    def test_signed_by_another_key_is_rejected(self) -> None:
        """An event signed by a key the origin does not publish is rejected with the reason."""
        event = hash_and_sign(message(), "10", ORIGIN, new_signing_key("o1"))
        code, out, err = self.verify(event)
        self.assertEqual(code, 1)
        self.assertIn("result: rejected (bad_signature)", out)
        self.assertIn("signature of %s: failed" % (ORIGIN,), out)
        self.assertIn("rejected:", err)

    def test_unreachable_origin_is_rejected(self) -> None:
        """No keys to be had: rejected, and the signature check shows no usable key."""
        self.outbound = FakeFederationClient({})
        event = hash_and_sign(message(), "10", ORIGIN, self.origin_key)
        code, out, _ = self.verify(event)
        self.assertEqual(code, 1)
        self.assertIn("result: rejected", out)
        self.assertIn("no usable key", out)

    def test_json_shape(self) -> None:
        """``--json`` in the keyring mode has the same three fields."""
        event = hash_and_sign(message(), "10", ORIGIN, self.origin_key)
        code, out, _ = self.verify(event, as_json=True)
        self.assertEqual(code, 0)
        answer = json.loads(out)
        self.assertEqual(set(answer), {"result", "reason", "checks"})
        self.assertEqual(answer["result"], "ok")


class ThirdPartyInviteOptionTests(VerifyEventCase):
    """``--invite-event``: a third-party invite's ``signed`` block against the room's
    ``m.room.third_party_invite`` event."""

    def setUp(self) -> None:
        super().setUp()
        identity_key = new_signing_key("0")
        signed = sign_json({"mxid": "@bob:b.test", "token": "tok"}, "id.test", identity_key)
        self.invite = hash_and_sign(
            message(
                type="m.room.member",
                state_key="@bob:b.test",
                content={
                    "membership": "invite",
                    "third_party_invite": {"display_name": "bob", "signed": signed},
                },
            ),
            "10",
            ORIGIN,
            self.key,
        )
        self.invite_event = message(
            type="m.room.third_party_invite",
            state_key="tok",
            content={"public_key": verify_key_base64(identity_key)},
        )

    def check_with(
        self, event: dict[str, Any], invite_event: Optional[dict[str, Any]]
    ) -> tuple[int, dict[str, Any]]:
        argv = ["verify-event", self.write(json.dumps(event)), "--room-version", "10", "--json"]
        if invite_event is not None:
            argv += ["--invite-event", self.write(json.dumps(invite_event))]
        code, out, _ = self.run_main(*argv, *self.key_args)
        answer: dict[str, Any] = json.loads(out)
        return code, answer

    def test_vouched_invite_passes(self) -> None:
        code, answer = self.check_with(self.invite, self.invite_event)
        self.assertEqual((code, answer["result"]), (0, "ok"))
        self.assertEqual(self.results(answer)[-1], ("third_party_invite", "passed"))

    def test_invite_event_that_does_not_vouch_rejects(self) -> None:
        """A wrong token, or a key that did not sign, rejects with the check's reason."""
        wrong_token = dict(self.invite_event, state_key="other")
        other_key = dict(self.invite_event, content={"public_key": verify_key_base64(self.key)})
        for invite_event, reason in (
            (wrong_token, "token_mismatch"),
            (other_key, "no_valid_signature"),
        ):
            code, answer = self.check_with(self.invite, invite_event)
            self.assertEqual((code, answer["result"], answer["reason"]), (1, "rejected", reason))
            self.assertEqual(self.results(answer)[-1], ("third_party_invite", "failed"))

    def test_without_the_invite_event_it_is_not_checked(self) -> None:
        code, answer = self.check_with(self.invite, None)
        self.assertEqual((code, answer["result"]), (0, "ok"))
        self.assertEqual(self.results(answer)[-1], ("third_party_invite", "not_checked"))
        self.assertIn("--invite-event", answer["checks"][-1]["detail"])

    def test_other_events_need_no_invite_event(self) -> None:
        code, answer = self.check_with(self.signed("10"), None)
        self.assertNotIn("third_party_invite", [c["check"] for c in answer["checks"]])
        code, answer = self.check_with(self.signed("10"), self.invite_event)
        self.assertEqual(
            (code, self.results(answer)[-1]), (0, ("third_party_invite", "not_applicable"))
        )

    def test_redacted_copy_before_v11_is_no_third_party_invite(self) -> None:
        """Changed content: the redacted copy is what goes on, and before room v11 it
        has no ``third_party_invite`` left to check."""
        changed = dict(self.invite, content=dict(self.invite["content"], displayname="x"))
        code, answer = self.check_with(changed, None)
        self.assertEqual((code, answer["result"]), (3, "redacted"))
        self.assertNotIn("third_party_invite", [c["check"] for c in answer["checks"]])

    def test_both_from_standard_input_is_a_usage_error(self) -> None:
        code, _, err = self.run_main(
            "verify-event", "-", "--invite-event", "-", "--room-version", "10", *self.key_args
        )
        self.assertEqual(code, 2)
        self.assertIn("only one of FILE and --invite-event", err)
