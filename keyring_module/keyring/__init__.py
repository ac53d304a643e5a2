"""The keyring (requester side): verify signed JSON, events and X-Matrix requests.

* :mod:`~keyring_module.keyring.api`: :class:`Keyring`, the API and its I/O (store
  lookups, fetches, deadlines, Deferreds);
* :mod:`~keyring_module.keyring.events`: the keyring's event methods (``verify_events``,
  ``check_events``, inline, in threads or in processes), mixed into :class:`Keyring`;
* :mod:`~keyring_module.keyring.processes`: the worker process pool of the
  ``_in_processes`` methods;
* :mod:`~keyring_module.keyring.batch`: one verification batch, its items and their
  bookkeeping (no I/O);
* :mod:`~keyring_module.keyring.outcomes`: what checking an event comes to (accepted,
  redacted, rejected);
* :mod:`~keyring_module.keyring.planner`: which keys a batch must fetch (pure), and the
  coalescer that asks each origin once per batch.

Third-party invites need no keys from the keyring: the room's invite event names the
identity server's keys. :func:`check_third_party_invite` (from
:mod:`keyring_module.third_party_invite`) checks an invite's ``signed`` block with them.
"""

from keyring_module.keyring.api import Keyring
from keyring_module.keyring.outcomes import EventCheck, EventOutcome
from keyring_module.third_party_invite import (
    ThirdPartyInviteFailure,
    ThirdPartyInviteRejection,
    check_third_party_invite,
    third_party_invite_token,
)

__all__ = [
    "EventCheck",
    "EventOutcome",
    "Keyring",
    "ThirdPartyInviteFailure",
    "ThirdPartyInviteRejection",
    "check_third_party_invite",
    "third_party_invite_token",
]
