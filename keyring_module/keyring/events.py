"""The keyring's event methods: check events' signatures and hashes, inline or in threads.

:class:`EventVerificationMixin` gives :class:`~keyring_module.keyring.api.Keyring` its
four event entry points; the batch they run (store lookups, fetches, deadlines) is the
keyring's own::

    results = keyring.verify_events(pdus, room_version="10")      # one Deferred per event
    checks = keyring.check_events(pdus, room_version="10")   # one Deferred[EventCheck] each
    checks = keyring.check_events_in_threads(pdus, "10", reactor.getThreadPool(), reactor)
    checks = keyring.check_events_in_processes(pdus, "10", worker_pool)

:meth:`~EventVerificationMixin.verify_events_in_threads` and
:meth:`~EventVerificationMixin.check_events_in_threads` run the first check in worker
threads, chunk by chunk, through a :data:`ChunkChecker`; the keyring records each chunk's
outcomes on the reactor thread as it comes back. The ``_in_processes`` forms do the same
in the worker processes of a :class:`~keyring_module.keyring.processes.WorkerProcessPool`,
sending each chunk as plain data (:mod:`keyring_module.event_chunks`).

Which signatures an event needs and its items live in
:mod:`keyring_module.keyring.batch`, what checking it comes to in
:mod:`keyring_module.keyring.outcomes`.
"""

import logging
from operator import attrgetter
from typing import Any, Callable, Iterable, Optional, Protocol, Sequence, Union, cast

from twisted.internet import defer
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from keyring_module.errors import KeyVerificationError, VerificationFailure
from keyring_module.event_chunks import (
    ChunkOutcome,
    check_event_chunk,
    chunk_keys,
    encode_events,
    outcome_error,
)
from keyring_module.keyring.batch import (
    EventItem,
    ItemBatch,
    Items,
    JsonObject,
    VerifyItem,
    check_items,
    event_items,
    servers_of,
)
from keyring_module.keyring.chunking import shrinking_chunks
from keyring_module.keyring.outcomes import EventCheck, as_event_check
from keyring_module.keyring.planner import KeyFetchCoalescer
from keyring_module.keyring.processes import WorkerProcessPool
from keyring_module.roomversions import RoomVersion, get_room_version
from keyring_module.storage import KeysByServer

logger = logging.getLogger(__name__)

#: The smallest chunk ``*_in_processes`` cut by default: a job's round trip to a worker
#: costs about as much as checking a few events, so smaller jobs would waste it.
MIN_DEFAULT_CHUNK_SIZE = 100

#: Checks one chunk of items elsewhere (e.g. in a worker thread); fires with the outcomes.
ChunkChecker = Callable[
    [list[VerifyItem], KeysByServer, int], "defer.Deferred[list[Optional[Failure]]]"
]


class EventBatchRunner(Protocol):
    """What the event methods need from the keyring they are mixed into: the keys never
    to trust, the coalescer for event key fetches, and the batch runner
    (:meth:`Keyring._run_batch <keyring_module.keyring.api.Keyring._run_batch>`)."""

    _compromised: frozenset[bytes]
    _event_fetches: KeyFetchCoalescer

    def _run_batch(
        self,
        parts: Iterable[Items],
        coalescer: KeyFetchCoalescer,
        chunk_checker: Optional[ChunkChecker] = None,
    ) -> tuple[ItemBatch, list["defer.Deferred[None]"]]: ...


class EventVerificationMixin:
    """The event methods of :class:`~keyring_module.keyring.api.Keyring`.

    Mixed into a class that satisfies :class:`EventBatchRunner` (mypy checks it at every
    call, through the ``self`` type).

    Example::

        class Keyring(EventVerificationMixin):
            ...  # sets _compromised and _event_fetches, defines _run_batch

        checks = keyring.check_events(pdus, "10")
    """

    def verify_events(
        self: "EventBatchRunner",
        events: Sequence[JsonObject],
        room_version: Union[str, RoomVersion],
    ) -> list["defer.Deferred[None]"]:
        """Check each event as :meth:`check_events` does; a rejected event fails its
        Deferred, an accepted **or redacted** one fires it with None.

        A redacted event (signatures fine, content hash different) is not rejected by
        the spec: the receiver goes on with the redacted copy. This method cannot give
        that copy, so it succeeds as it always did for events whose signatures verify;
        callers that must act on the content hash use :meth:`check_events`.

        Required signers: the sender's server; in room v1/v2 also the server of the
        event id; for restricted joins (v8+) the server of
        ``join_authorised_via_users_server``.

        Args:
            events: the events as received over federation.
            room_version: their room's version (identifier or :class:`RoomVersion`).

        Returns:
            One Deferred per event, in order; with a warm cache they are already fired.
            Failures are :class:`KeyVerificationError` with the reason of
            :attr:`EventCheck.reason`.

        Raises:
            ValueError: the room version is unknown.

        Example::

            results = keyring.verify_events(pdus, "10")
            outcomes = await defer.DeferredList(results, consumeErrors=True)
        """
        return self._run_batch(
            [event_items(events, room_version, self._compromised)], self._event_fetches
        )[1]

    def check_events(
        self: "EventBatchRunner",
        events: Sequence[JsonObject],
        room_version: Union[str, RoomVersion],
    ) -> list["defer.Deferred[EventCheck]"]:
        """Check events' signatures and hashes, one :class:`EventCheck` per event.

        Per event, in this order (spec: "Validating hashes and signatures on received
        events"): in room v6+ the canonical-JSON value rules (no float, no integer
        outside ±(2^53-1), anywhere); every required signature over the redacted
        event, at its ``origin_server_ts`` (keys fetched as needed, one fetch per
        origin for the batch); where ids are hashes (v3+), an ``event_id`` the event
        carries against its reference hash, and in v12 a create event's ``room_id``;
        then the content hash (``hashes.sha256``): if it differs, is missing or is
        malformed, the outcome is ``REDACTED`` with the redacted copy to use.

        Args:
            events: the events as received over federation.
            room_version: their room's version (identifier or :class:`RoomVersion`).

        Returns:
            One Deferred per event, in order, that never fails: accepted, redacted (with
            :attr:`EventCheck.redacted_event`) or rejected (with
            :attr:`EventCheck.reason`). With a warm cache they are already fired.

        Raises:
            ValueError: the room version is unknown.

        Example::

            for event, d in zip(pdus, keyring.check_events(pdus, "10")):
                check = await d
                if check.outcome is EventOutcome.REJECTED:
                    logger.info("dropped: %s", check.reason.value)
                else:
                    handle(check.event_to_use(event))
        """
        batch, deferreds = self._run_batch(
            [event_items(events, room_version, self._compromised)], self._event_fetches
        )
        return _event_checks(batch, deferreds)

    def verify_events_in_threads(
        self: "EventBatchRunner",
        events: Sequence[JsonObject],
        room_version: Union[str, RoomVersion],
        threadpool: ThreadPool,
        reactor: IReactorFromThreads,
        *,
        chunk_size: int = 500,
    ) -> list["defer.Deferred[None]"]:
        """Like :meth:`verify_events`, with the checks spread over threads.

        The events are cut into chunks of ``chunk_size``. On the reactor thread each
        chunk is prepared (signers worked out, keys looked up) and handed to
        ``threadpool``, where it is checked (PyNaCl releases the GIL while it verifies)
        while the next chunk is prepared; each chunk's results are delivered as soon
        as it is back. Events that need a key fetch then continue on the reactor thread
        as in :meth:`verify_events`, with one fetch per origin for the whole batch.
        Worth it for large batches on several cores.

        Args:
            events: the events as received.
            room_version: their room's version.
            threadpool: a started :class:`~twisted.python.threadpool.ThreadPool`.
            reactor: the reactor to deliver results on (``callFromThread``).
            chunk_size: events per thread job.

        Returns:
            One Deferred per event, in order.

        Example::

            pool = reactor.getThreadPool()
            results = keyring.verify_events_in_threads(pdus, "10", pool, reactor)
        """
        return _events_in_threads(self, events, room_version, threadpool, reactor, chunk_size)[1]

    def check_events_in_threads(
        self: "EventBatchRunner",
        events: Sequence[JsonObject],
        room_version: Union[str, RoomVersion],
        threadpool: ThreadPool,
        reactor: IReactorFromThreads,
        *,
        chunk_size: int = 500,
    ) -> list["defer.Deferred[EventCheck]"]:
        """:meth:`check_events` with the checks spread over threads, as
        :meth:`verify_events_in_threads` does.

        Example::

            checks = keyring.check_events_in_threads(pdus, "10", pool, reactor)
        """
        batch, deferreds = _events_in_threads(
            self, events, room_version, threadpool, reactor, chunk_size
        )
        return _event_checks(batch, deferreds)

    def verify_events_in_processes(
        self: "EventBatchRunner",
        events: Sequence[JsonObject],
        room_version: Union[str, RoomVersion],
        pool: WorkerProcessPool,
        *,
        chunk_size: Optional[int] = None,
    ) -> list["defer.Deferred[None]"]:
        """Like :meth:`verify_events`, with the checks spread over worker processes.

        As :meth:`verify_events_in_threads`, but each chunk is checked in one of
        ``pool``'s processes, so the checks use every core and not only what the GIL
        leaves free. The keys stay on the reactor: each chunk is looked up there, and
        the worker gets the chunk's events, their required signers and the keys of
        those signers only, as plain data; events that need a key fetch continue on the
        reactor thread, with one fetch per origin for the whole batch. If a chunk's
        worker dies and the chunk kills a fresh worker again when run on its own (see
        :class:`~keyring_module.keyring.processes.WorkerProcessPool`), its events fail
        with ``INTERNAL_ERROR``; the other chunks are not affected.

        Args:
            events: the events as received (JSON values: they are pickled).
            room_version: their room's version.
            pool: a started :class:`~keyring_module.keyring.processes.WorkerProcessPool`.
            chunk_size: events per job (default: chunks that shrink as the batch
                goes, so that the workers finish together, each of at least
                :data:`MIN_DEFAULT_CHUNK_SIZE` events but the last: see
                :mod:`keyring_module.keyring.chunking`); at most
                ``pool.max_chunk_size``.

        Returns:
            One Deferred per event, in order; they fire on the reactor thread.

        Raises:
            ValueError: the room version is unknown, or ``chunk_size`` is below 1.

        Example::

            pool = WorkerProcessPool(reactor)
            await pool.start()
            results = keyring.verify_events_in_processes(pdus, "10", pool)
        """
        return _events_in_processes(self, events, room_version, pool, chunk_size)[1]

    def check_events_in_processes(
        self: "EventBatchRunner",
        events: Sequence[JsonObject],
        room_version: Union[str, RoomVersion],
        pool: WorkerProcessPool,
        *,
        chunk_size: Optional[int] = None,
    ) -> list["defer.Deferred[EventCheck]"]:
        """:meth:`check_events` with the checks spread over worker processes, as
        :meth:`verify_events_in_processes` does.

        Example::

            checks = keyring.check_events_in_processes(pdus, "10", pool)
        """
        batch, deferreds = _events_in_processes(self, events, room_version, pool, chunk_size)
        return _event_checks(batch, deferreds)


def _events_in_processes(
    runner: EventBatchRunner,
    events: Sequence[JsonObject],
    room_version: Union[str, RoomVersion],
    pool: WorkerProcessPool,
    chunk_size: Optional[int],
) -> tuple[ItemBatch, list["defer.Deferred[None]"]]:
    """Cut ``events`` into chunks checked in ``pool``'s processes; return the batch and
    one Deferred per event, in order."""
    total = len(events)
    if chunk_size is None:
        smallest = min(MIN_DEFAULT_CHUNK_SIZE, pool.max_chunk_size)
        bounds = shrinking_chunks(total, pool.max_workers, smallest, pool.max_chunk_size)
    elif chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    else:
        size = min(chunk_size, pool.max_chunk_size)
        bounds = [(start, min(total, start + size)) for start in range(0, total, size)]
    version = get_room_version(room_version)
    compromised = runner._compromised

    def check_in_process(
        items: list[VerifyItem], keys: KeysByServer, now: int
    ) -> "defer.Deferred[list[Optional[Failure]]]":
        chunk = cast(list[EventItem], items)

        def job_arguments() -> tuple[Any, ...]:
            # Built when the pool hands the job over, so that chunks waiting for room
            # hold no encoded copy. Per event, only C loops (map, set.union): this
            # runs on the reactor thread.
            encoded = encode_events(list(map(_event_of, chunk)))
            if encoded is None:
                raise _CannotEncode()
            signers = list(map(servers_of, chunk))
            keys_sent = chunk_keys(keys, set().union(*signers))
            return (version.identifier, encoded, signers, keys_sent, now, compromised)

        def failed(failure: Failure) -> list[Optional[Failure]]:
            if failure.check(_CannotEncode):  # nothing can carry them: check them here
                return check_items(items, keys, now)
            return _chunk_failed(failure, len(chunk))

        d = pool.run_prepared(check_event_chunk, job_arguments)
        return d.addCallbacks(_record_outcomes, failed, callbackArgs=(chunk,))

    parts = (event_items(events[start:end], version, compromised) for start, end in bounds)
    return runner._run_batch(parts, runner._event_fetches, chunk_checker=check_in_process)


def _record_outcomes(
    outcomes: list[ChunkOutcome], items: list[EventItem]
) -> list[Optional[Failure]]:
    """A worker's outcomes for a chunk, recorded on its items as
    :meth:`EventItem.check` would (the redacted copy, a signer only it needs).

    Outcomes that are None (accepted, the common case) are already what the keyring
    records, and the items they belong to keep ``redacted=None``: only the others are
    looked at, and when there are none the worker's list is returned as it is.
    """
    if len(outcomes) != len(items):
        raise ValueError("%d outcomes for %d events" % (len(outcomes), len(items)))
    if outcomes.count(None) == len(outcomes):
        return cast(list[Optional[Failure]], outcomes)
    results: list[Optional[Failure]] = [None] * len(outcomes)
    for i, outcome in enumerate(outcomes):
        if outcome is None:
            continue
        item = items[i]
        if isinstance(outcome, dict):
            item.redacted = outcome
        else:
            error = outcome_error(outcome)
            item.note_failure(error)
            results[i] = Failure(error)
    return results


_event_of = attrgetter("event")


class _CannotEncode(Exception):
    """Neither marshal nor pickle can carry a chunk's events to a worker."""


def _chunk_failed(failure: Failure, size: int) -> list[Optional[Failure]]:
    """The outcomes of a chunk whose worker job failed: ``INTERNAL_ERROR`` for each of
    its events (final: no key fetch follows)."""
    logger.error("Keyring: checking %d events in a worker process failed: %s", size, failure.value)
    error = KeyVerificationError(
        "",
        (),
        VerificationFailure.INTERNAL_ERROR,
        "checking in a worker process failed: %s" % (failure.getErrorMessage(),),
    )
    return [Failure(error)] * size


def _events_in_threads(
    runner: EventBatchRunner,
    events: Sequence[JsonObject],
    room_version: Union[str, RoomVersion],
    threadpool: ThreadPool,
    reactor: IReactorFromThreads,
    chunk_size: int,
) -> tuple[ItemBatch, list["defer.Deferred[None]"]]:
    """Cut ``events`` into chunks checked in ``threadpool``; return the batch and one
    Deferred per event, in order."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")

    def check_in_thread(
        items: list[VerifyItem], keys: KeysByServer, now: int
    ) -> "defer.Deferred[list[Optional[Failure]]]":
        return deferToThreadPool(reactor, threadpool, check_items, items, keys, now)

    version = get_room_version(room_version)
    parts = (
        event_items(events[start : start + chunk_size], version, runner._compromised)
        for start in range(0, len(events), chunk_size)
    )
    return runner._run_batch(parts, runner._event_fetches, chunk_checker=check_in_thread)


def _event_checks(
    batch: ItemBatch, deferreds: list["defer.Deferred[None]"]
) -> list["defer.Deferred[EventCheck]"]:
    """One :class:`EventCheck` Deferred per event of ``batch``."""
    return [
        as_event_check(d, item if isinstance(item, EventItem) else None)
        for d, item in zip(deferreds, batch.items, strict=True)
    ]
