"""What processes sharing one database coordinate through: the store's side.

Several ``keyring-module serve`` instances (or a module inside Synapse and a standalone
server) may share one database: one PostgreSQL database, or one SQLite file on one
machine. Through it they share

* **one flight per origin**: a lease per server name. The process holding it fetches
  from the origin and writes the outcome (the origin's signed answer, or why it failed)
  to ``origin_flights``; the others wait for that outcome instead of fetching
  themselves (:mod:`keyring_module.shared_flights` runs that protocol on top of a
  :class:`Coordination`);
* **the per-origin token bucket and backoff** (``origin_limits``,
  :mod:`keyring_module.shared_limits`), so that N processes together never reach an
  origin more often than one process may;
* **news of key writes**, so that each process's in-memory caches drop a server's keys
  (and the notary's whole answers naming it) as soon as another process stored new
  ones, instead of serving them until ``database.cache_ttl`` runs out.

Each backend does it its own way:

* PostgreSQL (:mod:`~keyring_module.storage.pg_coordination`): a session advisory lock
  per server name on a dedicated connection (a dead holder's session ends, so its lock
  frees at once), and ``LISTEN``/``NOTIFY`` on the channels the store defines for
  finished flights and key writes: the others learn of them within milliseconds. Lock
  keys and channels are those of the store's schema
  (:mod:`~keyring_module.storage.pg_scope`), so only instances on one schema share;
* SQLite (:mod:`~keyring_module.storage.sqlite_coordination`): a lease row per server
  name with an expiry (renewed while the fetch runs, so a dead holder frees it within
  ``database.flight_lease``), and a poller reading ``PRAGMA data_version`` every
  ``database.poll_interval``: when another process wrote, it reads the ``key_changes``
  feed and wakes the waiting flights;
* the in-memory store, and SQLite's ``:memory:``: nothing to share
  (:data:`NO_COORDINATION`).

All database work runs in the stores' threads, never on the reactor thread.
"""

import uuid
from typing import Callable, Optional, Protocol

import attr
from twisted.internet import defer

#: The ``outcome`` of a successful flight: ``body`` holds the answer.
OUTCOME_OK = "ok"
#: The origin could not be reached (connect, DNS, TLS, timeout): the waiters back off too.
OUTCOME_UNREACHABLE = "unreachable"
#: The origin answered, but not well (an HTTP error, a bad body, invalid keys).
OUTCOME_ANSWERED = "answered"
#: The origin answered well, with an answer too big to keep in the outcome
#: (:data:`~keyring_module.storage.flight_rows.MAX_OUTCOME_BODY_BYTES`): ``detail`` is
#: its response id, and ``body`` is read from the stored responses once the fetching
#: process has stored it (None until then).
OUTCOME_STORED = "stored"
#: An :data:`OUTCOME_STORED` answer the fetching process did not store after all (its
#: trust policy or the store's bounds refused it, or storing failed): nothing to wait
#: for, the waiters take the lease and fetch themselves (one at a time).
OUTCOME_NOT_STORED = "not_stored"

#: What a coordination calls when another process may have changed a server's keys
#: (None: any server's, e.g. after news may have been missed).
KeysChanged = Callable[[Optional[str]], None]


@attr.s(auto_attribs=True, frozen=True, slots=True)
class FlightOutcome:
    """How one shared flight ended, as the holder wrote it for the waiters.

    Attributes:
        finished_ts: when the flight ended (ms).
        finished_by: the :attr:`Coordination.holder_id` of the process that fetched.
        outcome: :data:`OUTCOME_OK`, :data:`OUTCOME_UNREACHABLE`,
            :data:`OUTCOME_ANSWERED`, or (read back) :data:`OUTCOME_STORED` or
            :data:`OUTCOME_NOT_STORED`.
        label: the failure's metric label (``timeout``, ``http_error``, ...); ``ok``.
        detail: the failure's message, for the waiters' logs (:data:`OUTCOME_STORED`
            and :data:`OUTCOME_NOT_STORED`: the answer's response id).
        body: the answer's bytes when ``outcome`` is :data:`OUTCOME_OK` (or
            :data:`OUTCOME_STORED`, once the answer is in the store).

    Example:
        >>> FlightOutcome(5, "a1", OUTCOME_OK, "ok", "", b"{}").ok
        True
        >>> pending = FlightOutcome(5, "a1", OUTCOME_STORED, "ok", "9f86d0...")
        >>> pending.ok, pending.awaits_store
        (False, True)
        >>> FlightOutcome(5, "a1", OUTCOME_NOT_STORED, "ok", "9f86d0...").shares_nothing
        True
    """

    finished_ts: int
    finished_by: str
    outcome: str
    label: str
    detail: str
    body: Optional[bytes] = None

    @property
    def ok(self) -> bool:
        """Whether the flight brought an answer (and it is here to read)."""
        return self.outcome in (OUTCOME_OK, OUTCOME_STORED) and self.body is not None

    @property
    def awaits_store(self) -> bool:
        """Whether the flight brought an answer that is not in the store (yet)."""
        return self.outcome == OUTCOME_STORED and self.body is None

    @property
    def shares_nothing(self) -> bool:
        """Whether the flight left nothing to use: its answer never reached the store
        (:data:`OUTCOME_NOT_STORED`), so a waiter fetches itself, holding the lease."""
        return self.outcome == OUTCOME_NOT_STORED


@attr.s(auto_attribs=True, frozen=True, slots=True)
class LeaseAttempt:
    """The answer to :meth:`Coordination.try_acquire`.

    Attributes:
        acquired: whether this process now holds the server's flight.
        retry_ms: when not acquired, how long until trying again is worth it (the
            rest of the holder's lease, or a short retry where a dead holder's lock
            frees without news).
    """

    acquired: bool
    retry_ms: int = 0


@attr.s(auto_attribs=True, frozen=True, slots=True)
class LimitState:
    """One origin's shared token bucket and failure streak (see
    :mod:`keyring_module.shared_limits`)."""

    tokens: float
    tokens_ts: int
    failures: int = 0
    backoff_until_ts: int = 0


#: Reads an origin's shared limit state, returns the new one and what to answer
#: (run inside the database transaction that holds the row).
LimitUpdate = Callable[[Optional[LimitState]], "tuple[Optional[LimitState], int]"]


class Coordination(Protocol):
    """One process's handle on what the processes sharing its database coordinate.

    Attributes:
        holder_id: this process's name in leases and outcomes (unique per start).
        lease_ms: how long a lease lasts unless renewed (``database.flight_lease``).
        shared: whether anything is shared at all (False for :data:`NO_COORDINATION`).
        on_keys_changed: told of key writes by other processes (set by the wiring).
    """

    holder_id: str
    lease_ms: int
    shared: bool
    on_keys_changed: Optional[KeysChanged]

    async def start(self) -> None:
        """Start listening (PostgreSQL) or polling (SQLite) for news."""
        ...

    async def close(self) -> None:
        """Stop listening or polling, and release every lease held (idempotent)."""
        ...

    async def try_acquire(self, server_name: str) -> LeaseAttempt:
        """Take the server's flight unless another process holds it."""
        ...

    async def renew(self, server_name: str) -> None:
        """Extend the lease held on the server's flight (while its fetch runs)."""
        ...

    async def finish(self, server_name: str, outcome: Optional[FlightOutcome]) -> None:
        """Write the flight's outcome (None: nothing worth sharing), release the
        flight, and wake the waiters."""
        ...

    async def read_outcome(self, server_name: str) -> Optional[FlightOutcome]:
        """The outcome of the server's last shared flight, if any."""
        ...

    async def mark_not_stored(self, server_name: str, response_id: str) -> bool:
        """After this process's attempt to store the answer of its
        :data:`OUTCOME_STORED` outcome: if that outcome is still the server's last and
        the response is not in the store, turn it into :data:`OUTCOME_NOT_STORED` and
        wake the waiters (True); otherwise change nothing (False)."""
        ...

    def watch(self, server_name: str) -> "defer.Deferred[None]":
        """Fires at the next sign that the server's flight may have ended (a
        notification, or another process's write). Cancel it to stop watching."""
        ...

    async def update_limits(self, target: str, update: LimitUpdate) -> int:
        """Run ``update`` on the target's shared limit state atomically (the row is
        locked against the other processes meanwhile) and store what it returns."""
        ...


def new_holder_id() -> str:
    """A name for this process in leases and outcomes: unique per start."""
    return uuid.uuid4().hex[:16]


class NoCoordination:
    """Nothing is shared: the in-memory store, SQLite's ``:memory:``, or a store
    handed in by a test. :attr:`shared` is False, so nothing calls the rest.

    Example:
        >>> NO_COORDINATION.shared
        False
    """

    holder_id = "local"
    lease_ms = 0
    shared = False
    on_keys_changed: Optional[KeysChanged] = None

    async def start(self) -> None:
        """Nothing to start."""

    async def close(self) -> None:
        """Nothing to stop."""

    async def try_acquire(self, server_name: str) -> LeaseAttempt:
        """Always acquired: nobody else to wait for."""
        return LeaseAttempt(True)

    async def renew(self, server_name: str) -> None:
        """Nothing to renew."""

    async def finish(self, server_name: str, outcome: Optional[FlightOutcome]) -> None:
        """Nobody to tell."""

    async def read_outcome(self, server_name: str) -> Optional[FlightOutcome]:
        """No shared outcomes."""
        return None

    async def mark_not_stored(self, server_name: str, response_id: str) -> bool:
        """No shared outcomes."""
        return False

    def watch(self, server_name: str) -> "defer.Deferred[None]":
        """Never fires (nothing else writes)."""
        return defer.Deferred()

    async def update_limits(self, target: str, update: LimitUpdate) -> int:
        """Applied to nothing shared: the answer for a fresh state."""
        return update(None)[1]


#: The coordination of stores that share nothing.
NO_COORDINATION: Coordination = NoCoordination()


def coordination_of(store: object) -> Coordination:
    """The coordination a store offers (:data:`NO_COORDINATION` if none).

    Example:
        >>> coordination_of(object()) is NO_COORDINATION
        True
    """
    found = getattr(store, "coordination", None)
    return found if found is not None else NO_COORDINATION
