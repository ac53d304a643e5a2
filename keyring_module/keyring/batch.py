"""One verification batch of the keyring: its items, their checks, and what becomes of
the items that fail the first check. No I/O and no clock here: the
:class:`~keyring_module.keyring.Keyring` looks keys up, fetches them and says when.

An item is one signed thing (a JSON object or an event) and knows how to check itself
with the keys held, through :mod:`keyring_module.verify` (the only place for the
signature rules)::

    items, errors = event_items(events, "10", frozenset())   # None where errors say why
    outcomes = check_items([i for i in items if i is not None], keys, now)  # None = ok

The items that failed are then sorted by :func:`plan_failed_items`: those no fetch can
help are resolved at once, the rest are grouped by the origin fetches they wait for and
checked again by :func:`recheck_group` once those fetches are done.
"""

from collections.abc import Iterable, Mapping, Sequence
from operator import attrgetter
from typing import Any, Callable, Optional, Protocol, Union, cast

import attr
from twisted.internet import defer
from twisted.python.failure import Failure

from keyring_module.errors import KeyVerificationError, VerificationFailure
from keyring_module.keyring.planner import KeyNeed, plan_key_fetches
from keyring_module.keyring.signers import signer_tuple
from keyring_module.model import KeyRequest, StoredKey
from keyring_module.roomversions import RoomVersion, get_room_version
from keyring_module.storage import KeysByServer
from keyring_module.verify import (
    KeyPurpose,
    signing_key_ids,
    verify_event_signers,
    verify_signed_json_with_keys,
)

JsonObject = Mapping[str, Any]


class VerifyItem(Protocol):
    """One object to verify: its signers, a check, and the key needs for the planner."""

    @property
    def servers(self) -> Iterable[str]:
        """The servers whose keys the check reads."""

    def check(self, keys: KeysByServer, now: int) -> None:
        """Raise :class:`KeyVerificationError` unless the object verifies with ``keys``."""

    def key_needs(self) -> list[KeyNeed]:
        """The key needs, one per signer (built only when the first check failed)."""


@attr.s(slots=True, auto_attribs=True)
class JsonItem:
    """A signed JSON object, or a request's signed object (``purpose="request"``:
    checked with keys valid now rather than at ``valid_at_ts``)."""

    server_name: str
    json_object: JsonObject
    valid_at_ts: int
    purpose: KeyPurpose
    compromised: frozenset[bytes]

    @property
    def servers(self) -> tuple[str]:
        return (self.server_name,)

    def check(self, keys: KeysByServer, now: int) -> None:
        verify_signed_json_with_keys(
            self.json_object,
            self.server_name,
            keys.get(self.server_name, {}),
            self.valid_at_ts,  # unused for "request": those keys must be valid now
            now,
            purpose=self.purpose,
            compromised=self.compromised,
        )

    def key_needs(self) -> list[KeyNeed]:
        key_ids = frozenset(signing_key_ids(self.json_object, self.server_name))
        return [KeyNeed(self.server_name, key_ids, self.valid_at_ts, True, self.purpose)]


@attr.s(slots=True, auto_attribs=True)
class EventItem:
    """An event and its required signers (``servers``, from
    :func:`~keyring_module.verify.required_signers`), checked by
    :func:`~keyring_module.verify.verify_event_signers`; a check that passes leaves in
    ``redacted`` the redacted copy to use when the content hash differs (else None)."""

    event: JsonObject
    room_version: RoomVersion
    servers: tuple[str, ...]  # sorted; a tuple of str, which the cyclic GC stops tracking
    compromised: frozenset[bytes]
    redacted: Optional[dict[str, Any]] = None

    def check(self, keys: KeysByServer, now: int) -> None:
        try:
            self.redacted = verify_event_signers(
                self.event,
                self.room_version,
                self.servers,
                keys,
                now,
                compromised=self.compromised,
            )
        except KeyVerificationError as e:
            self.note_failure(e)
            raise

    def note_failure(self, e: KeyVerificationError) -> None:
        """Learn from a failed check (here or in a worker process) which signers the
        event needs."""
        if (
            e.reason is VerificationFailure.NO_USABLE_KEY
            and e.server_name
            and e.server_name not in self.servers
        ):
            # Only the redacted copy needs this signer (an invite whose
            # ``third_party_invite`` redaction drops): its signature covers the same
            # bytes, so require it from now on and let the planner fetch its keys.
            self.servers = tuple(sorted((*self.servers, e.server_name)))

    def key_needs(self) -> list[KeyNeed]:
        ts = self.event["origin_server_ts"]
        enforce = self.room_version.enforce_key_validity
        return [
            KeyNeed(server, frozenset(signing_key_ids(self.event, server)), ts, enforce)
            for server in self.servers
        ]


#: Items to check, None where the errors (by index) say why an input cannot be checked.
Items = tuple[list[Optional[VerifyItem]], dict[int, KeyVerificationError]]


#: An item's required signers (``item.servers``), for C-level loops over many items.
servers_of = attrgetter("servers")


def json_items(
    requests: Sequence[tuple[str, JsonObject, int]], compromised: frozenset[bytes]
) -> Items:
    """One item per ``(server_name, json_object, valid_at_ts)``."""
    items: list[Optional[VerifyItem]] = []
    errors: dict[int, KeyVerificationError] = {}
    for i, (server_name, json_object, valid_at_ts) in enumerate(requests):
        if not isinstance(json_object, Mapping):
            errors[i] = KeyVerificationError(
                server_name, (), VerificationFailure.MALFORMED_OBJECT, "not a JSON object"
            )
            items.append(None)
        elif not isinstance(valid_at_ts, int) or isinstance(valid_at_ts, bool):
            errors[i] = KeyVerificationError(
                server_name, (), VerificationFailure.MALFORMED_OBJECT, "valid_at_ts is not an int"
            )
            items.append(None)
        else:
            items.append(JsonItem(server_name, json_object, valid_at_ts, "event", compromised))
    return items, errors


def event_items(
    events: Sequence[JsonObject],
    room_version: Union[str, RoomVersion],
    compromised: frozenset[bytes],
) -> Items:
    """One item per event; an event that cannot be checked at all (not an object, no
    integer ``origin_server_ts``, bad signer identifiers) gets an error instead.

    Raises:
        ValueError: the room version is unknown.
    """
    version = get_room_version(room_version)
    items: list[Optional[VerifyItem]] = []
    append = items.append
    errors: dict[int, KeyVerificationError] = {}
    for i, event in enumerate(events):
        # The per-event step of every batch, kept lean: exact types are tested first.
        try:
            if type(event) is not dict and not isinstance(event, Mapping):
                raise ValueError("event is not a JSON object")
            ts = event.get("origin_server_ts")
            if type(ts) is not int and (not isinstance(ts, int) or isinstance(ts, bool)):
                raise ValueError("event has no integer origin_server_ts")
            signers = signer_tuple(event, version)
        except ValueError as e:
            errors[i] = KeyVerificationError(
                "", (), VerificationFailure.MALFORMED_EVENT, "cannot tell who must sign: %s" % (e,)
            )
            append(None)
            continue
        append(EventItem(event, version, signers, compromised))
    return items, errors


def check_items(
    items: Sequence[VerifyItem], keys: KeysByServer, now: int
) -> list[Optional[Failure]]:
    """Check items with the given keys (also run in worker threads): None = verified."""
    outcomes: list[Optional[Failure]] = []
    append = outcomes.append
    for item in items:
        try:
            item.check(keys, now)
        except KeyVerificationError as e:
            append(Failure(e))
        else:
            append(None)
    return outcomes


_UNSET = object()

#: Counts outcomes: ``(verified, how_many)``, e.g. a metrics hook.
OutcomeCounter = Callable[[bool, int], None]


class ItemBatch:
    """The items of one call and their results.

    Items are added in parts (:meth:`extend`); until :meth:`deferreds` is called,
    outcomes are only recorded, afterwards each one fires its Deferred. This is how a
    fully cached batch returns Deferreds that are already fired, with no callback chain
    per item.
    """

    __slots__ = ("items", "outcomes", "_deferreds", "_on_outcome")

    def __init__(self, on_outcome: Optional[OutcomeCounter] = None) -> None:
        self.items: list[VerifyItem] = []
        self.outcomes: list[object] = []
        self._deferreds: Optional[list["defer.Deferred[None]"]] = None
        self._on_outcome = on_outcome

    def extend(self, items: Items) -> list[int]:
        """Add a part of the batch: its items (None where its errors say why it cannot be
        checked; those are resolved now). Returns the indexes of the items to check."""
        part, errors = items
        offset = len(self.items)
        self.items.extend(cast(list[VerifyItem], part))
        self.outcomes.extend([_UNSET] * len(part))
        if not errors:
            return list(range(offset, offset + len(part)))
        for i, error in errors.items():
            self.resolve(offset + i, Failure(error))
        return [offset + i for i, item in enumerate(part) if item is not None]

    def items_at(self, indexes: Sequence[int]) -> list[VerifyItem]:
        """The items at ``indexes`` (ascending, as :meth:`extend` returns them): a
        slice when they are consecutive, the common case.

        Example::

            live = batch.extend(event_items(events, "10", frozenset()))
            items = batch.items_at(live)
        """
        if indexes and indexes[-1] - indexes[0] + 1 == len(indexes):
            return self.items[indexes[0] : indexes[-1] + 1]
        return list(map(self.items.__getitem__, indexes))

    def resolve(self, index: int, failure: Optional[Failure]) -> None:
        """Record item ``index``'s outcome (None = verified); later calls are ignored."""
        if self.outcomes[index] is not _UNSET:
            return
        self.outcomes[index] = failure
        if self._on_outcome is not None:
            self._on_outcome(failure is None, 1)
        if self._deferreds is not None:
            d = self._deferreds[index]
            if failure is None:
                d.callback(None)
            else:
                d.errback(failure)

    def record_checked(
        self, indexes: Sequence[int], outcomes: Sequence[Optional[Failure]]
    ) -> list[tuple[int, Failure]]:
        """Record the outcomes of a first check: items that verified are resolved (and
        counted in one go); the failed ones are returned as ``(index, failure)`` for
        :func:`plan_failed_items`, still unresolved.

        This is the per-item step of every batch, kept lean: with a warm cache it is
        most of the keyring's own work besides the signature checks.
        """
        failed: list[tuple[int, Failure]] = []
        deferreds = self._deferreds
        stored = self.outcomes
        verified = 0
        for i, outcome in zip(indexes, outcomes, strict=True):
            if stored[i] is not _UNSET:
                continue  # already resolved (e.g. the whole batch failed meanwhile)
            if outcome is not None:
                failed.append((i, outcome))
            else:
                stored[i] = None
                verified += 1
                if deferreds is not None:
                    deferreds[i].callback(None)
        if verified and self._on_outcome is not None:
            self._on_outcome(True, verified)
        return failed

    def unresolved(self) -> list[int]:
        """The indexes of the items with no outcome yet."""
        return [i for i, outcome in enumerate(self.outcomes) if outcome is _UNSET]

    def fail_unresolved(self, error: KeyVerificationError) -> None:
        """Fail every item that has no outcome yet with ``error``."""
        for i in self.unresolved():
            self.resolve(i, Failure(error))

    def deferreds(self) -> list["defer.Deferred[None]"]:
        """One Deferred per item, already fired for the items resolved so far."""
        outcomes = self.outcomes
        result: list["defer.Deferred[None]"]
        if outcomes.count(_UNSET) == len(outcomes):  # all pending (checked elsewhere)
            new = defer.Deferred
            result = [new() for _ in outcomes]
            self._deferreds = result
            return result
        result = []
        for outcome in outcomes:
            if outcome is _UNSET:
                result.append(defer.Deferred())
            elif outcome is None:
                result.append(defer.succeed(None))
            else:
                result.append(defer.fail(cast(Failure, outcome)))
        self._deferreds = result
        return result


@attr.s(slots=True, auto_attribs=True)
class WaitingGroup:
    """Items waiting for the same set of origin fetches."""

    indexes: list[int]
    waiting_for: set[str]


#: Failures no key can change: the event is at fault whatever keys we fetch, or the
#: check itself failed (e.g. its worker process died).
FINAL_FAILURES = frozenset(
    {
        VerificationFailure.INTERNAL_ERROR,
        VerificationFailure.NOT_CANONICAL_JSON,
        VerificationFailure.EVENT_ID_MISMATCH,
        VerificationFailure.ROOM_ID_MISMATCH,
        VerificationFailure.MALFORMED_EVENT,
    }
)

#: What a fetch gave: the origin's keys, or why there are none.
FetchOutcome = Union[Mapping[str, StoredKey], Failure]


def plan_failed_items(
    batch: ItemBatch,
    failed: list[tuple[int, Failure]],
    keys: KeysByServer,
    now: int,
    own_server_name: str,
) -> dict[str, tuple[KeyRequest, list[WaitingGroup]]]:
    """Resolve the failed items no fetch can help; group the rest by what they wait for.

    An item fails for good when the event itself is at fault whatever the keys
    (:data:`FINAL_FAILURES`: not canonical JSON, a wrong event or room id, a malformed
    event) or its check could not run (``INTERNAL_ERROR``, e.g. its worker process
    died), when a
    signer's timestamp is beyond the 7-day cap, when a required signer did not sign at
    all, or when every key it names is present and usable (the signature is bad). Our
    own server is never fetched.

    Args:
        batch: the batch; hopeless items are resolved in it.
        failed: ``(index, failure)`` of each item that failed the first check.
        keys: the keys that check used.
        now: the current time (ms).
        own_server_name: our server name.

    Returns:
        Per origin to fetch, the fetch and the groups waiting for it (in plan order).
    """
    needs_of: dict[int, list[KeyNeed]] = {}
    for i, failure in failed:
        if isinstance(failure.value, KeyVerificationError) and failure.value.reason in (
            FINAL_FAILURES
        ):
            batch.resolve(i, failure)
            continue
        needs_of[i] = [r for r in batch.items[i].key_needs() if r.server_name != own_server_name]
    plan = plan_key_fetches((r for rs in needs_of.values() for r in rs), keys, now)
    waiting = set(plan.waiting)
    unsatisfiable = set(plan.unsatisfiable)
    groups: dict[frozenset[str], WaitingGroup] = {}
    for i, failure in failed:
        needs = needs_of.get(i)
        if needs is None:
            continue  # resolved above
        beyond = [r for r in needs if r in unsatisfiable and r.signed_with]
        if beyond:
            r = beyond[0]
            error = KeyVerificationError(
                r.server_name,
                sorted(r.signed_with),
                VerificationFailure.BEYOND_KEY_VALIDITY,
                "signed at %d, more than 7 days ahead: no key can be valid then" % (r.valid_at_ts,),
            )
            batch.resolve(i, Failure(error))
            continue
        unsigned = [r for r in needs if r in unsatisfiable]
        if unsigned:
            # No ed25519 signature at all from a required signer: nothing to fetch.
            r = unsigned[0]
            error = KeyVerificationError(
                r.server_name,
                (),
                VerificationFailure.NOT_SIGNED,
                "not signed by %s" % (r.server_name,),
            )
            batch.resolve(i, Failure(error))
            continue
        origins = frozenset(r.server_name for r in needs if r in waiting)
        if not origins:
            # Every key it names is present and usable: the signature is bad.
            batch.resolve(i, failure)
            continue
        group = groups.get(origins)
        if group is None:
            group = groups[origins] = WaitingGroup([], set(origins))
        group.indexes.append(i)

    waiters: dict[str, list[WaitingGroup]] = {}
    for group in groups.values():
        for origin in group.waiting_for:
            waiters.setdefault(origin, []).append(group)
    return {
        origin: (fetch, waiters[origin])
        for origin, fetch in plan.fetches.items()
        if origin in waiters
    }


def recheck_group(
    group: WaitingGroup,
    fetched: Mapping[str, FetchOutcome],
    batch: ItemBatch,
    keys: KeysByServer,
    now: int,
) -> None:
    """Check a group's items again, with the keys its origins' fetches returned, and
    resolve them (a failed fetch fails the items that needed it)."""
    updated = dict(keys)
    for i in group.indexes:
        item = batch.items[i]
        failure: Optional[Failure] = None
        for server in sorted(item.servers):
            result = fetched.get(server)
            if isinstance(result, Failure):
                failure = result
                break
            if result is not None:
                updated[server] = result
        if failure is None:
            try:
                item.check(updated, now)
            except KeyVerificationError as e:
                if e.reason is VerificationFailure.NO_USABLE_KEY:
                    e = KeyVerificationError(
                        e.server_name,
                        e.key_ids,
                        e.reason,
                        "%s, even after fetching its keys" % (e.detail,),
                    )
                failure = Failure(e)
        batch.resolve(i, failure)
