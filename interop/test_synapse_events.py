"""Our keyring verifies events signed by a real Synapse, in every room version.

:mod:`interop.sign_events`, run by Synapse's python, builds a small room for each room
version 1 to 12 and has Synapse's own code hash and sign its events with a running
homeserver's signing key. Our keyring, built as :class:`KeyringServices` builds it (real
federation client over checked TLS, real per-origin limiter, real fetcher chain, sqlite
store), fetches that homeserver's keys from it once, and then:

* verifies every event, with :meth:`Keyring.verify_events` and (for one version) with
  :meth:`Keyring.verify_events_in_threads`;
* refuses an event in which a field that redaction keeps was changed, and only that event
  of its batch (signatures cover the redacted event);
* still verifies an event in which a field that redaction removes was changed, including
  the fields whose protection depends on the room version (``origin``, the create
  event's content, power levels' ``invite``, ``join_authorised_via_users_server``);
* refuses a v1/v2 event that Synapse signed but whose event id names a server that did not.
"""

import copy
import json
import os
import subprocess
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import yaml
from prometheus_client import CollectorRegistry
from signedjson.key import generate_signing_key
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from interop.harness import (
    InteropTestCase,
    LoopbackOnlyResolver,
    SynapseHomeserver,
    loopback_federation_config,
    reactor,
    report_process_logs,
)
from keyring_module.config import parse_config
from keyring_module.errors import KeyVerificationError, VerificationFailure
from keyring_module.http.client import MatrixFederationClient
from keyring_module.keyring.api import Keyring
from keyring_module.keyring.outcomes import EventOutcome
from keyring_module.metrics import Metrics
from keyring_module.roomversions import ROOM_VERSIONS
from keyring_module.signing import OwnKeys
from keyring_module.wiring import KeyringServices

#: The script Synapse's python runs to sign the events.
SIGN_EVENTS_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sign_events.py")
#: Bound on that script (it takes about a second).
SIGN_EVENTS_TIMEOUT_S = 60.0
#: The server named by the ``foreign_event_id`` events (as in sign_events.py); it signed nothing.
ELSEWHERE = "elsewhere.invalid"
#: Our keyring's own server name (never contacted; nothing it verifies is signed by it).
OUR_SERVER_NAME = "keyring.invalid"
SERVER_KEYS = "/_matrix/key/v2/server"
#: The room version checked again with worker threads.
THREADED_VERSION = "12"

#: How a verification ended: None (verified) or the error's (server, key ids, reason).
Outcome = Optional[tuple[str, tuple[str, ...], VerificationFailure]]


@dataclass(frozen=True)
class Change:
    """A change to one field of a signed event.

    Attributes:
        event: which event of the room (a name from sign_events.py).
        path: the keys leading to the field, e.g. ``("content", "body")``.
        new_value: the field's new value, from its old one.
        kept_by_redaction: whether room version ``n``'s redaction keeps the field, so
            that the signature no longer verifies once it is changed.
    """

    event: str
    path: tuple[str, ...]
    new_value: Callable[[Any], Any]
    kept_by_redaction: Callable[[int], bool]

    def applied_to(self, pdu: dict[str, Any]) -> dict[str, Any]:
        """A changed deep copy of ``pdu``."""
        changed = copy.deepcopy(pdu)
        parent = changed
        for key in self.path[:-1]:
            parent = parent[key]
        parent[self.path[-1]] = self.new_value(parent[self.path[-1]])
        return changed

    def __str__(self) -> str:
        return "%s with %s changed" % (self.event, ".".join(self.path))


def always(version: int) -> bool:
    return True


def never(version: int) -> bool:
    return False


CHANGES = [
    # Kept by every version's redaction: the signature breaks.
    Change("message", ("depth",), lambda depth: depth + 1, always),
    Change("message", ("hashes", "sha256"), lambda _: "A" * 43, always),
    Change("member", ("content", "membership"), lambda _: "leave", always),
    Change("power_levels", ("content", "users_default"), lambda _: 100, always),
    # Removed by every version's redaction (``unsigned`` is never signed): still verifies.
    Change("message", ("content", "body"), lambda _: "changed", never),
    Change("member", ("content", "displayname"), lambda _: "Mallory", never),
    Change("power_levels", ("content", "notifications", "room"), lambda _: 0, never),
    Change("restricted_join", ("content", "displayname"), lambda _: "Mallory", never),
    Change("message", ("unsigned", "age"), lambda age: age + 1000, never),
    # Protected by some versions only.
    Change("message", ("origin",), lambda _: ELSEWHERE, lambda v: v < 11),  # MSC2176
    Change("create", ("content", "m.federate"), lambda _: False, lambda v: v >= 11),  # MSC2176
    Change("power_levels", ("content", "invite"), lambda _: 50, lambda v: v >= 11),  # MSC2176
    Change(
        "restricted_join",
        ("content", "join_authorised_via_users_server"),
        lambda user: user.replace("@u:", "@other:"),  # same server, so the same signer
        lambda v: v >= 9,  # MSC3375
    ),
]


def expected_check(change: Change, version: int) -> EventOutcome:
    """What :meth:`Keyring.check_events` makes of an event with ``change`` applied."""
    if change.kept_by_redaction(version):
        return EventOutcome.REJECTED  # the signature covers the field
    if change.path[0] == "unsigned":
        return EventOutcome.ACCEPTED  # neither signed nor hashed
    return EventOutcome.REDACTED  # signed only through redaction; the content hash differs


async def outcomes(results: Sequence["defer.Deferred[None]"]) -> list[Outcome]:
    """Wait for every verification; any failure other than KeyVerificationError is raised."""
    done = await defer.DeferredList(list(results), consumeErrors=True)
    found: list[Outcome] = []
    for _, result in done:
        if not isinstance(result, Failure):
            found.append(None)
            continue
        error = result.value
        if not isinstance(error, KeyVerificationError):
            result.raiseException()
        found.append((error.server_name, error.key_ids, error.reason))
    return found


class RecordingClient:
    """Our federation client, recording each request as ``(method, server, path)``."""

    def __init__(self, client: MatrixFederationClient) -> None:
        self._client = client
        self.requests: list[tuple[str, str, str]] = []

    async def get_json(
        self, server_name: str, path: str, timeout_ms: Optional[int] = None
    ) -> object:
        self.requests.append(("GET", server_name, path))
        return await self._client.get_json(server_name, path, timeout_ms)

    async def post_json(
        self, server_name: str, path: str, body: object, timeout_ms: Optional[int] = None
    ) -> object:
        self.requests.append(("POST", server_name, path))
        return await self._client.post_json(server_name, path, body, timeout_ms)

    def close(self) -> "defer.Deferred[None]":
        return self._client.close()


class OurKeyringVerifiesSynapseEventsTests(InteropTestCase):
    """Events hashed and signed by Synapse's code, verified by our keyring."""

    maxDiff = None  # show every event's outcome when one differs

    def setUp(self) -> None:
        super().setUp()
        self.threadpool = ThreadPool(minthreads=1, maxthreads=2, name="interop-events")
        self.threadpool.start()
        self.addCleanup(self.threadpool.stop)

    async def sign_with_synapse(self, synapse: SynapseHomeserver) -> dict[str, dict[str, Any]]:
        """Run sign_events.py with Synapse's python and that homeserver's signing key file."""
        with open(synapse.config_path) as f:
            key_file = yaml.safe_load(f)["signing_key_path"]
        argv = [self.synapse_python, SIGN_EVENTS_SCRIPT, key_file, synapse.server_name]
        done: subprocess.CompletedProcess[bytes] = await deferToThreadPool(
            reactor,
            self.threadpool,
            subprocess.run,
            argv,
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=SIGN_EVENTS_TIMEOUT_S,
        )
        self.assertEqual(done.returncode, 0, done.stderr.decode("utf-8", "replace")[-3000:])
        rooms: dict[str, dict[str, Any]] = json.loads(done.stdout)
        return rooms

    async def keyring_for(self) -> tuple[Keyring, RecordingClient]:
        """A real keyring with a sqlite store, whose client reaches 127.0.0.1 only over
        TLS checked against this test's CA (as in OurClientFetchesSynapseTests)."""
        config = parse_config(
            {
                "signing_key_path": "unused",  # our keys are given below
                "database": {
                    "backend": "sqlite",
                    "path": os.path.join(self.new_directory("keyring"), "keyring.db"),
                },
                "federation": loopback_federation_config(self.ca),
            },
            standalone=False,
        )
        client = RecordingClient(
            MatrixFederationClient(reactor, config.federation, resolver=LoopbackOnlyResolver())
        )
        services = await KeyringServices.create(
            reactor,
            config,
            OwnKeys(OUR_SERVER_NAME, [generate_signing_key("k1")]),
            client=client,
            metrics=Metrics(CollectorRegistry()),
        )
        self.addCleanup(services.close)
        return services.keyring, client

    def assert_signed_by(self, synapse: SynapseHomeserver, rooms: dict[str, Any]) -> None:
        """The script signed with the homeserver's key, and built what the tests expect."""
        self.assertEqual(list(rooms), list(ROOM_VERSIONS))
        for version, pdus in rooms.items():
            for name, pdu in pdus.items():
                self.assertEqual(
                    {s: list(keys) for s, keys in pdu["signatures"].items()},
                    {synapse.server_name: [synapse.key_id]},
                    "v%s %s" % (version, name),
                )
            has_event_ids = int(version) <= 2
            self.assertEqual("event_id" in pdus["message"], has_event_ids, version)
            self.assertEqual("foreign_event_id" in pdus, has_event_ids, version)
            self.assertEqual("restricted_join" in pdus, int(version) >= 8, version)
            self.assertEqual("room_id" in pdus["create"], version != "12", version)

    def expect_changes(
        self, synapse: SynapseHomeserver, version: str, pdus: dict[str, Any]
    ) -> list[tuple[str, dict[str, Any], Outcome]]:
        """The room's events as signed, then each changed copy, then the v1/v2 event with
        a foreign event id: ``(label, event, expected outcome)``."""
        invalid = (synapse.server_name, (synapse.key_id,), VerificationFailure.BAD_SIGNATURE)
        batch: list[tuple[str, dict[str, Any], Outcome]] = [
            (name, pdu, None) for name, pdu in pdus.items() if name != "foreign_event_id"
        ]
        for change in CHANGES:
            if change.event in pdus:
                expected = invalid if change.kept_by_redaction(int(version)) else None
                batch.append((str(change), change.applied_to(pdus[change.event]), expected))
        if "foreign_event_id" in pdus:
            not_signed = (ELSEWHERE, (), VerificationFailure.NOT_SIGNED)
            batch.append(("foreign_event_id", pdus["foreign_event_id"], not_signed))
        return batch

    @report_process_logs
    async def test_our_keyring_verifies_events_synapse_signed_in_every_room_version(
        self,
    ) -> None:
        """Events signed by Synapse's own code verify in room versions 1-12 (also in threads), their content hashes and event ids check out (a changed unprotected field comes back redacted); a change to a field redaction keeps breaks only that event, a change to one it removes does not, a v1/v2 event id naming an unsigned server fails; Synapse's keys are fetched once."""
        synapse = await self.start_synapse(server_host="localhost")
        rooms = await self.sign_with_synapse(synapse)
        self.assert_signed_by(synapse, rooms)
        keyring, client = await self.keyring_for()

        # Every event as Synapse signed it (the first batch fetches Synapse's keys).
        for version, pdus in rooms.items():
            signed = {name: pdu for name, pdu in pdus.items() if name != "foreign_event_id"}
            got = await outcomes(keyring.verify_events(list(signed.values()), version))
            self.assertEqual(
                dict(zip(signed, got, strict=True)), dict.fromkeys(signed), "room v%s" % version
            )

        # check_events also checks the content hashes (and v3+ event ids) Synapse wrote:
        # every event as signed is accepted; a change to a field redaction removes makes
        # the event come back redacted (the content hash no longer matches), except in
        # ``unsigned``, which no hash covers; a change redaction keeps is rejected.
        for version, pdus in rooms.items():
            signed = {name: pdu for name, pdu in pdus.items() if name != "foreign_event_id"}
            checks = await defer.gatherResults(keyring.check_events(list(signed.values()), version))
            self.assertEqual(
                {name: check.outcome for name, check in zip(signed, checks, strict=True)},
                dict.fromkeys(signed, EventOutcome.ACCEPTED),
                "room v%s" % version,
            )
            changes = [c for c in CHANGES if c.event in pdus]
            changed = [c.applied_to(pdus[c.event]) for c in changes]
            checks = await defer.gatherResults(keyring.check_events(changed, version))
            self.assertEqual(
                {str(c): check.outcome for c, check in zip(changes, checks, strict=True)},
                {str(c): expected_check(c, int(version)) for c in changes},
                "room v%s" % version,
            )

        # A float or an integer beyond 2^53 - 1 added to a message's content: room v6+
        # reject the event (not canonical JSON); v1-v5 judge it by the old rules (its
        # signatures verify over the redacted event; the content hash differs).
        for version, pdus in rooms.items():
            odd_values = [copy.deepcopy(pdus["message"]) for _ in range(2)]
            odd_values[0]["content"]["ratio"] = 50.5
            odd_values[1]["content"]["count"] = 2**60
            checks = await defer.gatherResults(keyring.check_events(odd_values, version))
            strict = ROOM_VERSIONS[version].strict_canonical_json
            self.assertEqual(strict, int(version) >= 6, version)
            self.assertEqual(
                [(check.outcome, check.reason) for check in checks],
                [
                    (EventOutcome.REJECTED, VerificationFailure.NOT_CANONICAL_JSON)
                    if strict
                    else (EventOutcome.REDACTED, None)
                ]
                * 2,
                "room v%s" % version,
            )

        # The same events with changed copies (and the v1/v2 foreign event id) in one batch.
        for version, pdus in rooms.items():
            batch = self.expect_changes(synapse, version, pdus)
            events = [event for _, event, _ in batch]
            expected = {label: outcome for label, _, outcome in batch}
            got = await outcomes(keyring.verify_events(events, version))
            self.assertEqual(dict(zip(expected, got, strict=True)), expected, "room v%s" % version)

            if version == THREADED_VERSION:  # chunks of 3 events, checked in worker threads
                got = await outcomes(
                    keyring.verify_events_in_threads(
                        events, version, self.threadpool, reactor, chunk_size=3
                    )
                )
                self.assertEqual(
                    dict(zip(expected, got, strict=True)),
                    expected,
                    "room v%s in threads" % version,
                )

        # One fetch of Synapse's keys, made by the first batch, served by Synapse once.
        self.assertEqual(client.requests, [("GET", synapse.server_name, SERVER_KEYS)])
        with open(synapse.log_path, encoding="utf-8") as f:
            served = f.read().count('"GET %s HTTP/1.1"' % (SERVER_KEYS,))
        self.assertEqual(served, 1, "Synapse served its keys %d times" % (served,))
