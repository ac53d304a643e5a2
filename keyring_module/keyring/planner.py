"""The key-fetch batch planner (pure) and the per-origin fetch coalescer.

Verifying a batch of events needs keys from many origins. :func:`plan_key_fetches`
turns the batch's key needs (one :class:`KeyNeed` per signer of each object) into at
most one :class:`~keyring_module.model.KeyRequest` per origin: it skips keys the store
already holds in a usable form, and asks each origin once with
``minimum_valid_until_ts`` = the highest time any object in the batch needs the key to
be valid at (the spec's "maximum ``origin_server_ts`` of a batch of events"). After the
fetch, every object is judged against its *own* time by :mod:`keyring_module.verify`.

:class:`KeyFetchCoalescer` then runs plans: requests arriving in the same reactor turn
share one batch, an origin never has two fetches in flight, and each origin's callers
get its keys as soon as that origin is done, whatever the rest of the batch does.

Example:
    >>> plan = plan_key_fetches(
    ...     [KeyNeed("a.org", frozenset({"ed25519:1"}), 5000),
    ...      KeyNeed("a.org", frozenset({"ed25519:1"}), 7000)],
    ...     stored={}, now_ms=6000)
    >>> plan.fetches["a.org"]
    KeyRequest(server_name='a.org', key_ids=frozenset({'ed25519:1'}), minimum_valid_until_ts=7000)
"""

import logging
from typing import Awaitable, Callable, Iterable, Mapping, Optional

import attr
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure

from keyring_module.clock import DeadlineExceeded, ReactorClock, with_deadline
from keyring_module.fetchers.base import ServerKeysReport
from keyring_module.model import KeyRequest, StoredKey
from keyring_module.verify import MAX_KEY_VALIDITY_MS, KeyPurpose, usable_key

logger = logging.getLogger(__name__)


@attr.s(auto_attribs=True, frozen=True, slots=True)
class KeyNeed:
    """Why some of one server's keys are needed: to check its signature on one object.

    Not a request: the planner turns the needs of a batch into at most one
    :class:`~keyring_module.model.KeyRequest` per origin.

    Attributes:
        server_name: the signer.
        signed_with: the ``ed25519:`` key ids it signed with (one usable one is enough);
            empty when it did not sign at all.
        valid_at_ts: when the signature was made: an event's ``origin_server_ts``;
            ignored for ``purpose="request"`` (which needs keys valid now).
        enforce_validity: whether the room enforces ``valid_until_ts`` (v5+).
        purpose: ``"event"`` or ``"request"`` (X-Matrix request authentication).
    """

    server_name: str
    signed_with: frozenset[str]
    valid_at_ts: int
    enforce_validity: bool = True
    purpose: KeyPurpose = "event"

    def minimum_valid_until_ts(self, now_ms: int) -> int:
        """The ``minimum_valid_until_ts`` to ask a fetcher for on this need's behalf."""
        if self.purpose == "request":
            return now_ms
        return self.valid_at_ts if self.enforce_validity else 0

    def beyond_cap(self, now_ms: int) -> bool:
        """Whether no current key can ever satisfy it (the 7-day cap is below its time)."""
        return (
            self.purpose == "event"
            and self.enforce_validity
            and self.valid_at_ts > now_ms + MAX_KEY_VALIDITY_MS
        )


@attr.s(auto_attribs=True, frozen=True, slots=True)
class FetchPlan:
    """What to fetch for a batch of :class:`KeyNeed`.

    Attributes:
        fetches: at most one request per origin, by origin.
        ready: needs met without a fetch: every key id is usable from the store (or,
            for a need beyond the 7-day cap, at least one is: nothing fetched could add
            to it).
        waiting: needs that wait for one of the fetches.
        unsatisfiable: needs no fetch can meet: no signature at all, or an event time
            beyond now + 7 days with nothing usable in the store. They fail at once.
    """

    fetches: Mapping[str, KeyRequest]
    ready: tuple[KeyNeed, ...]
    waiting: tuple[KeyNeed, ...]
    unsatisfiable: tuple[KeyNeed, ...]


def plan_key_fetches(
    needs: Iterable[KeyNeed],
    stored: Mapping[str, Mapping[str, StoredKey]],
    now_ms: int,
) -> FetchPlan:
    """Plan the key fetches for a batch of signature checks.

    A (origin, key_id) is fetched when some need names it and the stored key (if any)
    is not usable for that need; the minimum asked for is the highest needed by those
    needs (0 for rooms v1-v4, now for request authentication).

    Compromised keys are not special here: refetching cannot change a key's bytes,
    so they count as present and are refused at verification.

    Args:
        needs: the batch's key needs.
        stored: keys already held, by server then key id.
        now_ms: the current time.

    Returns:
        The :class:`FetchPlan`.

    Example:
        >>> plan = plan_key_fetches(
        ...     [KeyNeed("a.org", frozenset({"ed25519:1"}), 0, enforce_validity=False)],
        ...     stored={}, now_ms=0)
        >>> plan.fetches["a.org"].minimum_valid_until_ts
        0
    """
    minimums: dict[str, dict[str, int]] = {}
    ready: list[KeyNeed] = []
    waiting: list[KeyNeed] = []
    unsatisfiable: list[KeyNeed] = []
    empty: Mapping[str, StoredKey] = {}

    for need in needs:
        server_keys = stored.get(need.server_name, empty)
        missing = [
            key_id
            for key_id in need.signed_with
            if not _usable_for(server_keys.get(key_id), need, now_ms)
        ]
        if not need.signed_with:
            unsatisfiable.append(need)
        elif not missing:
            ready.append(need)
        elif need.beyond_cap(now_ms):
            # Only an old key with a late enough expired_ts could satisfy it, and old
            # keys do not come back from a fetch: usable now, or never.
            if len(missing) < len(need.signed_with):
                ready.append(need)
            else:
                unsatisfiable.append(need)
        else:
            waiting.append(need)
            minimum = need.minimum_valid_until_ts(now_ms)
            origin_minimums = minimums.setdefault(need.server_name, {})
            for key_id in missing:
                if origin_minimums.get(key_id, -1) < minimum:
                    origin_minimums[key_id] = minimum

    fetches = {
        server_name: KeyRequest(server_name, frozenset(per_key), max(per_key.values()))
        for server_name, per_key in minimums.items()
    }
    return FetchPlan(fetches, tuple(ready), tuple(waiting), tuple(unsatisfiable))


def _usable_for(key: Optional[StoredKey], need: KeyNeed, now_ms: int) -> bool:
    return key is not None and usable_key(
        key,
        need.valid_at_ts,
        now_ms,
        purpose=need.purpose,
        enforce_validity=need.enforce_validity,
    )


#: Fetches one batch of origins, calling the report for each origin as soon as it is
#: done. Origins not reported by the time it returns are done with no keys; raising
#: fails every origin not reported yet.
BatchFetcher = Callable[[dict[str, KeyRequest], ServerKeysReport], Awaitable[None]]

_NO_KEYS: Mapping[str, StoredKey] = {}


@attr.s(auto_attribs=True, slots=True)
class _Batch:
    fetch: KeyRequest
    waiters: list["defer.Deferred[Mapping[str, StoredKey]]"] = attr.Factory(list)


class KeyFetchCoalescer:
    """Coalesces key requests into batches, one in flight per origin.

    * Requests made in the same reactor turn are merged per origin and handed to
      ``fetch`` as one batch (``clock.callLater(0, ...)``).
    * While an origin's fetch is in flight, a request it covers (see
      :meth:`KeyRequest.covers`) shares it; any other waits for the next batch for
      that origin, which starts in the turn after the in-flight one is done.
    * Each origin is done when the fetcher reports it, not when the whole batch is:
      a dead origin does not hold back the live ones fetched with it.
    * Each caller's Deferred fires with the origin's keys when the fetch covering it
      is done, or fails with the batch's error.
    * With ``give_up_after_s``, origins a batch has not reported by then are failed
      with :class:`~keyring_module.clock.DeadlineExceeded` and may be fetched again (a
      hung fetch must not hold an origin for good); the batch's later reports are
      ignored.

    Args:
        clock: the reactor's time interface.
        fetch: runs one batch (see :data:`BatchFetcher`).
        give_up_after_s: how long a batch may hold its origins (None: no limit).

    Example:
        >>> from twisted.internet.task import Clock
        >>> batches = []
        >>> async def fetch(batch, report):
        ...     batches.append(sorted(batch))
        ...     report("a", {})
        >>> clock = Clock()
        >>> coalescer = KeyFetchCoalescer(clock, fetch)
        >>> d1 = coalescer.request(KeyRequest("a", frozenset({"ed25519:1"}), 0))
        >>> d2 = coalescer.request(KeyRequest("b", frozenset({"ed25519:1"}), 0))
        >>> clock.advance(0)
        >>> batches
        [['a', 'b']]
    """

    def __init__(
        self, clock: ReactorClock, fetch: BatchFetcher, give_up_after_s: Optional[float] = None
    ) -> None:
        self._clock = clock
        self._fetch = fetch
        self._give_up_after_s = give_up_after_s
        self._in_flight: dict[str, _Batch] = {}
        self._pending: dict[str, _Batch] = {}
        self._flush_call: Optional[IDelayedCall] = None

    def request(self, key_request: KeyRequest) -> "defer.Deferred[Mapping[str, StoredKey]]":
        """Ask for a fetch; the Deferred fires when a fetch covering it is done.

        Args:
            key_request: what is needed from one origin.

        Returns:
            A Deferred firing with the origin's keys, or failing with the batch's error.
        """
        waiter: "defer.Deferred[Mapping[str, StoredKey]]" = defer.Deferred()
        origin = key_request.server_name
        in_flight = self._in_flight.get(origin)
        if in_flight is not None and in_flight.fetch.covers(key_request):
            in_flight.waiters.append(waiter)
            return waiter
        pending = self._pending.get(origin)
        if pending is None:
            pending = self._pending[origin] = _Batch(key_request)
        else:
            pending.fetch = pending.fetch.merge(key_request)
        pending.waiters.append(waiter)
        if in_flight is None:
            self._schedule_flush()
        return waiter

    def _schedule_flush(self) -> None:
        if self._flush_call is None:
            self._flush_call = self._clock.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        ready = [origin for origin in self._pending if origin not in self._in_flight]
        if not ready:
            return
        batches = {origin: self._pending.pop(origin) for origin in ready}
        self._in_flight.update(batches)
        logger.debug("Fetching keys from %d origin(s): %s", len(batches), ", ".join(batches))

        def report(origin: str, keys: Mapping[str, StoredKey]) -> None:
            self._done(batches, origin, keys)

        work = defer.ensureDeferred(self._run({o: b.fetch for o, b in batches.items()}, report))
        # Logged on the work itself, so that a failure after the give-up deadline (which
        # with_deadline drops) is logged too.
        work.addErrback(_log_batch_failure)
        d = with_deadline(self._clock, work, self._give_up_after_s, cancel_work=False)
        d.addBoth(self._finished, batches)

    async def _run(self, batch: dict[str, KeyRequest], report: ServerKeysReport) -> None:
        await self._fetch(batch, report)

    def _done(
        self,
        batches: Mapping[str, _Batch],
        origin: str,
        outcome: "Mapping[str, StoredKey] | Failure",
    ) -> None:
        """Finish one origin of a batch (once; later reports are ignored)."""
        batch = batches.get(origin)
        if batch is None or self._in_flight.get(origin) is not batch:
            return
        del self._in_flight[origin]
        if origin in self._pending:
            self._schedule_flush()
        for waiter in batch.waiters:
            if waiter.called:  # cancelled by its caller
                continue
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(outcome)

    def _finished(self, result: "None | Failure", batches: Mapping[str, _Batch]) -> None:
        """The batch ended (or its deadline passed): finish the origins it did not report.

        Past the deadline they fail with :class:`DeadlineExceeded` and may be fetched
        again at once; the hung batch's later reports are ignored (see :meth:`_done`).
        """
        if isinstance(result, Failure) and result.check(DeadlineExceeded):
            waiting = [o for o, b in batches.items() if self._in_flight.get(o) is b]
            if waiting:
                logger.warning(
                    "Key fetch still running after %.3gs for %d origin(s) (e.g. %s); "
                    "giving up on it",
                    self._give_up_after_s or 0,
                    len(waiting),
                    waiting[0],
                )
        for origin in list(batches):
            self._done(batches, origin, _NO_KEYS if result is None else result)


def _log_batch_failure(failure: Failure) -> Failure:
    """Log a failed key fetch batch (before or after its give-up deadline); pass it on."""
    logger.warning("Key fetch batch failed: %s", failure.getErrorMessage())
    return failure
