"""What checking an event comes to: accepted, accepted but redacted, or rejected.

:meth:`~keyring_module.keyring.Keyring.check_events` gives one :class:`EventCheck` per
event (the spec's "Validating hashes and signatures on received events"):

* ``ACCEPTED``: every required signature verifies, the ids derived from the event
  match, and its content hash is right: use the event as received;
* ``REDACTED``: the signatures are fine but the content hash differs (or is missing or
  malformed): the spec says we were given a redacted copy, so use
  :attr:`EventCheck.redacted_event`, the event redacted by its room version's rules;
* ``REJECTED``: :attr:`EventCheck.reason` says why (a
  :class:`~keyring_module.errors.VerificationFailure`: a bad or missing signature,
  ``not_canonical_json``, ``event_id_mismatch``, ``room_id_mismatch``, a failed key
  fetch, ...).

Example:
    >>> check = EventCheck(EventOutcome.REJECTED, VerificationFailure.EVENT_ID_MISMATCH)
    >>> check.outcome.value, check.reason.value, check.event_to_use({"type": "x"})
    ('rejected', 'event_id_mismatch', None)
    >>> EventCheck(EventOutcome.ACCEPTED).event_to_use({"type": "x"})
    {'type': 'x'}
"""

import enum
from typing import Any, Mapping, Optional

import attr
from twisted.internet import defer
from twisted.python.failure import Failure

from keyring_module.errors import KeyVerificationError, VerificationFailure
from keyring_module.keyring.batch import EventItem


class EventOutcome(enum.Enum):
    """The three outcomes of checking an event; each ``.value`` is a stable label."""

    ACCEPTED = "ok"
    REDACTED = "redacted"
    REJECTED = "rejected"


@attr.s(auto_attribs=True, frozen=True, slots=True)
class EventCheck:
    """The outcome of checking one event.

    Attributes:
        outcome: accepted, redacted or rejected.
        reason: why it was rejected (None otherwise).
        redacted_event: the redacted copy to use instead of the event (``REDACTED``
            only; None otherwise).
        error: the :class:`~keyring_module.errors.KeyVerificationError` of a
            rejection (server, key ids, detail for people), None otherwise.
    """

    outcome: EventOutcome
    reason: Optional[VerificationFailure] = None
    redacted_event: Optional[dict[str, Any]] = None
    error: Optional[KeyVerificationError] = None

    def event_to_use(self, event: Mapping[str, Any]) -> Optional[Mapping[str, Any]]:
        """The event to go on with: ``event`` if accepted, the redacted copy if
        redacted, None if rejected."""
        if self.outcome is EventOutcome.ACCEPTED:
            return event
        return self.redacted_event


#: The outcome of an event whose checks all passed.
ACCEPTED = EventCheck(EventOutcome.ACCEPTED)


def as_event_check(
    verified: "defer.Deferred[None]", item: Optional[EventItem]
) -> "defer.Deferred[EventCheck]":
    """Turn one event's verification Deferred into a Deferred that never fails.

    Args:
        verified: fires with None when the event's checks passed, or fails with
            :class:`~keyring_module.errors.KeyVerificationError`.
        item: the event's batch item (None for an event that could not be checked at
            all, whose Deferred fails); once it passed, its ``redacted`` is the copy to
            use, or None if the content hash matched.

    Returns:
        A Deferred firing with the :class:`EventCheck` (anything other than a
        ``KeyVerificationError`` becomes ``INTERNAL_ERROR``).
    """

    def passed(_: None) -> EventCheck:
        redacted = item.redacted if item is not None else None
        if redacted is None:
            return ACCEPTED
        return EventCheck(EventOutcome.REDACTED, redacted_event=redacted)

    def failed(failure: Failure) -> EventCheck:
        error = failure.value
        if not isinstance(error, KeyVerificationError):
            error = KeyVerificationError(
                "", (), VerificationFailure.INTERNAL_ERROR, failure.getErrorMessage()
            )
        return EventCheck(EventOutcome.REJECTED, error.reason, error=error)

    return verified.addCallbacks(passed, failed)
