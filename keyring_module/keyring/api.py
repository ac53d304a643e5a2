"""The keyring (requester side): verify signed JSON, events and X-Matrix requests.

:class:`Keyring` checks signatures with keys it holds and fetches the missing ones
through the shared fetcher chain (store, then origins and notaries)::

    keyring = Keyring(own_keys, store, chain, reactor, origin_chain=origin_only_chain)
    await keyring.verify_json_for_server("example.org", signed_json, origin_server_ts)
    results = keyring.verify_events(pdus, room_version="10")      # one Deferred per event
    checks = keyring.check_events(pdus, room_version="10")   # one Deferred[EventCheck] each
    origin = await keyring.verify_request(b"GET", uri, request.requestHeaders, None,
                                          "notary.example.org")

How a batch is verified:

1. one store lookup for every server the batch needs (our own keys need none; the
   threaded path looks up each chunk's servers, mostly from the in-memory cache);
2. every item is checked at once with the stored keys; with a warm cache that is the
   whole job, and the result Deferreds are returned already fired;
3. the items that failed are planned with
   :func:`~keyring_module.keyring.batch.plan_failed_items`: an item whose keys are all
   present and usable failed for good (bad signature), an item beyond the 7-day cap
   fails at once, and the rest wait for at most one fetch per origin, asked with the
   highest ``minimum_valid_until_ts`` any of them needs;
4. fetches go through a :class:`~keyring_module.keyring.planner.KeyFetchCoalescer`, so
   requests made in the same reactor turn share one chain call and an origin never has
   two fetches in flight; the chain reports each origin as soon as it is done, and the
   items waiting for it are judged again, each against its *own* timestamp. A dead
   origin therefore does not delay the live origins fetched with it, except those whose
   own answer was not enough and that go on to the notaries: the notaries are asked
   once per round, after the round's slowest origin or half the chain's timeout,
   whichever comes first.

A fetch that does not finish within ``fetch_timeout_ms`` fails the items waiting for it
(the fetch itself goes on). Backing off dead origins is the job of the chain's limiter:
while an origin is backed off its fetch returns at once with nothing new, so its items
fail in the same reactor turn.

The event methods (:meth:`Keyring.verify_events`, :meth:`Keyring.check_events` and their
``_in_threads`` and ``_in_processes`` forms) live in :mod:`keyring_module.keyring.events`;
they hand their items to this module's batch runner. The threaded and process forms run
the first check in worker threads or processes, chunk by chunk, through a
:data:`~keyring_module.keyring.events.ChunkChecker`; the runner records each chunk's
outcomes on the reactor thread as it comes back.

Request authentication (``X-Matrix``) uses keys valid *now*, never ``old_verify_keys``,
and fetches through ``origin_chain`` only: notaries are not asked (MSC4029).

The signature rules live in :mod:`keyring_module.verify`, the batch items and their
bookkeeping in :mod:`keyring_module.keyring.batch`, and the ``X-Matrix`` header in
:mod:`keyring_module.xmatrix`; this module does the I/O: store lookups, fetches,
deadlines and Deferreds.
"""

import logging
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import attr
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from keyring_module.clock import DeadlineExceeded, ReactorClock, now_ms, with_deadline
from keyring_module.errors import KeyVerificationError, VerificationFailure
from keyring_module.fetchers.base import KeySource, ServerKeysReport
from keyring_module.keyring.batch import (
    FetchOutcome,
    ItemBatch,
    Items,
    JsonItem,
    JsonObject,
    OutcomeCounter,
    WaitingGroup,
    check_items,
    json_items,
    plan_failed_items,
    recheck_group,
    servers_of,
)
from keyring_module.keyring.events import ChunkChecker, EventVerificationMixin
from keyring_module.keyring.planner import BatchFetcher, KeyFetchCoalescer
from keyring_module.metrics import Metrics
from keyring_module.model import FetchPurpose, KeyRequest, StoredKey
from keyring_module.signing import OwnKeys
from keyring_module.storage import KeysByServer, KeyStore
from keyring_module.verify import MAX_KEY_VALIDITY_MS
from keyring_module.xmatrix import signed_request_object

logger = logging.getLogger(__name__)


#: How long items wait for a key fetch before failing. Longer than the default federation
#: request timeout (10 s), so the client's own timeout normally fires first and the
#: limiter records the failure.
DEFAULT_FETCH_TIMEOUT_MS = 30_000

#: ``valid_until_ts`` given to our own current keys (they never need refreshing).
_OWN_KEY_VALID_UNTIL_TS = 2**62

_OWN_KEY_SOURCE = "own"


class Keyring(EventVerificationMixin):
    """Verifies signatures of remote servers, fetching their keys when needed.

    The event methods (:meth:`verify_events`, :meth:`check_events` and their threaded
    forms) come from :class:`~keyring_module.keyring.events.EventVerificationMixin`.

    Args:
        own_keys: our own keys; objects signed by our server are checked with these
            (current and old) and never cause a fetch.
        store: the key store (one lookup per batch, or per chunk in threads).
        chain: the fetcher chain for events and signed JSON (store, origins, notaries).
        clock: the reactor (time, coalescing, fetch deadline).
        compromised_keys: decoded bytes of keys never to trust (the config's
            ``key_trust.compromised_keys``, decoded by the config parser).
        origin_chain: the chain used for request authentication; it must contact only
            origins (MSC4029), e.g. ``KeyFetcherChain(store, origin_fetcher, None, reactor,
            order=("origin",))``. Defaults to ``chain``, which is only right when ``chain``
            has no notaries.
        fetch_timeout_ms: how long items wait for one key fetch before failing.
        metrics: where to count verification outcomes (optional).

    Example::

        keyring = Keyring(own_keys, store, chain, reactor)
        try:
            await keyring.verify_json_for_server("example.org", obj, now_ms)
        except KeyVerificationError as e:
            logger.info("Rejected: %s", e)
    """

    def __init__(
        self,
        own_keys: OwnKeys,
        store: KeyStore,
        chain: KeySource,
        clock: ReactorClock,
        *,
        compromised_keys: frozenset[bytes] = frozenset(),
        origin_chain: Optional[KeySource] = None,
        fetch_timeout_ms: int = DEFAULT_FETCH_TIMEOUT_MS,
        metrics: Optional[Metrics] = None,
    ) -> None:
        self._on_outcome: Optional[OutcomeCounter] = None
        if metrics is not None:
            verified = metrics.verifications.labels("verified")
            failed = metrics.verifications.labels("failed")
            self._on_outcome = lambda ok, count: (verified if ok else failed).inc(count)
        self._own_server_name = own_keys.server_name
        self._own_keys = _own_stored_keys(own_keys)
        self._store = store
        self._clock = clock
        self._compromised = frozenset(compromised_keys)
        self._fetch_timeout_s = fetch_timeout_ms / 1000
        # A chain call that hangs (e.g. on a stuck database) frees its origins after the
        # same deadline the items wait for.
        self._event_fetches = KeyFetchCoalescer(
            clock, self._batch_fetcher(chain), self._fetch_timeout_s
        )
        self._request_fetches = KeyFetchCoalescer(
            clock,
            self._batch_fetcher(origin_chain if origin_chain is not None else chain),
            self._fetch_timeout_s,
        )

    # -- public API -----------------------------------------------------------------

    def verify_json_for_server(
        self, server_name: str, json_object: JsonObject, valid_at_ts: int
    ) -> "defer.Deferred[None]":
        """Check ``server_name``'s signature on ``json_object``, made at ``valid_at_ts``.

        A key counts if it was valid at ``valid_at_ts``: a current key with
        ``min(valid_until_ts, now + 7 days) >= valid_at_ts``, or an old key with
        ``expired_ts >= valid_at_ts``.

        Args:
            server_name: the signer.
            json_object: the signed object.
            valid_at_ts: when the signature was made (ms since the epoch).

        Returns:
            A Deferred firing with None, or failing with :class:`KeyVerificationError`
            (naming the server, the key ids and why).

        Example::

            await keyring.verify_json_for_server("a.org", obj, clock_ms)
        """
        return self.verify_json_objects([(server_name, json_object, valid_at_ts)])[0]

    def verify_json_objects(
        self, requests: Sequence[tuple[str, JsonObject, int]]
    ) -> list["defer.Deferred[None]"]:
        """Check many signed objects at once (see :meth:`verify_json_for_server`).

        Args:
            requests: ``(server_name, json_object, valid_at_ts)`` triples.

        Returns:
            One Deferred per request, in order.

        Example::

            d1, d2 = keyring.verify_json_objects([("a.org", o1, t1), ("b.org", o2, t2)])
        """
        return self._run([json_items(requests, self._compromised)], self._event_fetches)

    def verify_request(
        self,
        method: Union[bytes, str],
        uri: Union[bytes, str],
        headers: Union[Headers, Mapping[Any, Sequence[Any]]],
        body: Optional[bytes],
        destination: str,
    ) -> "defer.Deferred[str]":
        """Authenticate a federation request signed with ``Authorization: X-Matrix``.

        The signed object is ``{"method", "uri", "origin", "destination", "content"}``
        (``content`` only when there is a body). The key must be a current key of the
        origin, valid now; keys are fetched from the origin only, never via notaries.
        Several X-Matrix headers are allowed if they name the same origin; every
        signature made by a usable key must verify. A header naming a destination
        other than ``destination``, or an empty one, is refused (``BAD_REQUEST_AUTH``,
        before any fetch); one without the parameter is accepted (older senders).

        Args:
            method: the HTTP method, e.g. ``b"GET"``.
            uri: the request URI as sent: path and query, e.g. ``b"/_matrix/x?a=b"``.
            headers: the request headers (Twisted ``Headers`` or a dict of lists).
            body: the request body (JSON), or None/empty when there is none.
            destination: our server name, the one the request was addressed to.

        Returns:
            A Deferred firing with the origin's server name, or failing with
            :class:`KeyVerificationError` (a body that canonical JSON cannot represent,
            e.g. with ``NaN`` or nested too deeply, is ``MALFORMED_OBJECT``). It never
            raises: whatever goes wrong is the Deferred's failure.

        Example::

            origin = await keyring.verify_request(
                request.method, request.uri, request.requestHeaders,
                request.content.read(), "our.example.org")
        """
        try:
            origin, signed = signed_request_object(method, uri, headers, body, destination)
            item = JsonItem(origin, signed, now_ms(self._clock), "request", self._compromised)
            d = self._run([([item], {})], self._request_fetches)[0]
        except Exception:
            return defer.fail()  # the exception as it is, e.g. KeyVerificationError
        return d.addCallback(lambda _: origin)

    def lookup_keys(
        self, server_name: str, key_ids: Iterable[str], minimum_valid_until_ts: int
    ) -> "defer.Deferred[dict[str, StoredKey]]":
        """Keys of one server by id: from the store, or fetched when the store cannot
        answer (a key id unknown, or a current key valid until before the minimum).
        A minimum beyond now + 7 days is answered from the store alone: no current key
        can meet it (the spec caps validity at 7 days ahead), so no fetch could help.

        The fetch is shared with the keyring's other fetches (one per origin in flight,
        coalesced per reactor turn, bounded by the fetch timeout) and goes through the whole
        chain: origin, notaries, trust policy, limiters. A key is returned even if it is
        not valid until ``minimum_valid_until_ts`` (the caller may still use it for
        older signatures), and so is a stored key when the fetch fails. Keys listed in
        ``key_trust.compromised_keys`` are never returned.

        Args:
            server_name: whose keys.
            key_ids: the wanted key ids (none: nothing is looked up).
            minimum_valid_until_ts: current keys should be valid until at least this.

        Returns:
            A Deferred firing with ``{key_id: StoredKey}`` for the ids found; it fails
            only when the store fails.

        Example::

            keys = await keyring.lookup_keys("example.org", ["ed25519:a"], now_ms)
        """
        wanted = frozenset(key_ids)
        if not wanted:
            return defer.succeed({})
        if server_name == self._own_server_name:
            return defer.succeed(self._usable(self._own_keys, wanted))
        request = KeyRequest(server_name, wanted, minimum_valid_until_ts)

        async def lookup() -> dict[str, StoredKey]:
            found = await self._store.get_many_server_keys({server_name})
            stored: Mapping[str, StoredKey] = found.get(server_name, {})
            beyond_cap = minimum_valid_until_ts > now_ms(self._clock) + MAX_KEY_VALIDITY_MS
            if not beyond_cap and not request.is_satisfied_by(stored):
                try:
                    stored = await self._fetch(self._event_fetches, request)
                except Exception as e:
                    logger.info("Keyring: keys of %s not fetched: %s", server_name, e)
            return self._usable(stored, wanted)

        return defer.ensureDeferred(lookup())

    def _usable(
        self, keys: Mapping[str, StoredKey], wanted: frozenset[str]
    ) -> dict[str, StoredKey]:
        return {
            key_id: key
            for key_id, key in keys.items()
            if key_id in wanted and key.verify_key_bytes not in self._compromised
        }

    # -- the batch machinery ----------------------------------------------------------

    def _run(
        self,
        parts: Iterable[Items],
        coalescer: KeyFetchCoalescer,
        chunk_checker: Optional[ChunkChecker] = None,
    ) -> list["defer.Deferred[None]"]:
        """Verify items and return one Deferred per item, in order (see
        :meth:`_run_batch`)."""
        return self._run_batch(parts, coalescer, chunk_checker)[1]

    def _run_batch(
        self,
        parts: Iterable[Items],
        coalescer: KeyFetchCoalescer,
        chunk_checker: Optional[ChunkChecker] = None,
    ) -> tuple[ItemBatch, list["defer.Deferred[None]"]]:
        """Verify items; return the batch and one Deferred per item, in order.

        ``parts`` are consecutive slices of the batch (see
        :meth:`~keyring_module.keyring.batch.ItemBatch.extend`). Each part gets its keys
        from the store and its first check, here or through ``chunk_checker`` (in a
        worker thread: the next part is prepared while this one is checked, and its
        outcomes are recorded as soon as it is back). Once every part is checked, the
        items that failed are planned, each part with the keys it was checked with, all
        in one reactor turn: the coalescer merges their fetches into one per origin.
        """
        batch = ItemBatch(self._on_outcome)
        checked_parts: list[_CheckedPart] = []
        checks = [
            self._check_part(batch, batch.extend(part), chunk_checker, checked_parts)
            for part in parts
        ]
        checked: "defer.Deferred[Any]" = (
            checks[0] if len(checks) == 1 else defer.gatherResults(checks, consumeErrors=True)
        )
        checked.addCallback(lambda _: self._plan_fetches(batch, checked_parts, coalescer))
        checked.addErrback(self._fail_all, batch, "checking signatures failed")
        return batch, batch.deferreds()

    def _check_part(
        self,
        batch: ItemBatch,
        live: list[int],
        chunk_checker: Optional[ChunkChecker],
        checked_parts: "list[_CheckedPart]",
    ) -> "defer.Deferred[None]":
        """Look up the keys of one part, check its items and record the outcomes; the
        items that failed are added to ``checked_parts`` with the keys they were
        checked with (a later part may have read newer keys: each failure is planned
        against its own part's read). A store failure fails this part's items only."""
        if not live:
            return defer.succeed(None)
        # Per item, only C loops here: with a warm cache this is the keyring's own work.
        items = batch.items_at(live)
        servers: set[str] = set().union(*map(servers_of, items))
        servers.discard(self._own_server_name)
        lookup: "defer.Deferred[Any]" = (
            defer.ensureDeferred(self._store.get_many_server_keys(servers))
            if servers
            else defer.succeed({})
        )

        def check(stored: Mapping[str, Mapping[str, StoredKey]]) -> Any:
            keys = self._with_own_keys(stored)
            now = now_ms(self._clock)

            def record(outcomes: list[Optional[Failure]]) -> None:
                failed = batch.record_checked(live, outcomes)
                if failed:
                    checked_parts.append(_CheckedPart(failed, keys, now))

            if chunk_checker is None:
                record(check_items(items, keys, now))
                return None
            return chunk_checker(items, keys, now).addCallback(record)

        def lookup_failed(failure: Failure) -> None:
            detail = "key store lookup failed: %s" % (failure.getErrorMessage(),)
            logger.error("Keyring: %s", detail)
            error = Failure(KeyVerificationError("", (), VerificationFailure.STORE_FAILED, detail))
            for i in live:
                batch.resolve(i, error)

        return lookup.addCallbacks(check, lookup_failed)

    def _fail_all(self, failure: Failure, batch: ItemBatch, what: str) -> None:
        if isinstance(failure.value, defer.FirstError):
            failure = failure.value.subFailure
        logger.error("Keyring: %s: %s", what, failure.getErrorMessage())
        batch.fail_unresolved(
            KeyVerificationError(
                "",
                (),
                VerificationFailure.INTERNAL_ERROR,
                "%s: %s" % (what, failure.getErrorMessage()),
            )
        )

    def _plan_fetches(
        self, batch: ItemBatch, checked_parts: "list[_CheckedPart]", coalescer: KeyFetchCoalescer
    ) -> None:
        """Fetch what the failed items wait for; resolve those no fetch can help.

        Each part is planned with the keys it was checked with; their fetches are asked
        in the same reactor turn, so the coalescer merges them into one per origin.
        """
        for part in checked_parts:
            waits = plan_failed_items(
                batch, part.failed, part.keys, part.now, self._own_server_name
            )
            fetched: dict[str, FetchOutcome] = {}
            for origin, (fetch, groups) in waits.items():
                d = self._fetch(coalescer, fetch)
                d.addBoth(self._origin_done, origin, groups, fetched, batch, part.keys)

    def _fetch(
        self, coalescer: KeyFetchCoalescer, fetch: KeyRequest
    ) -> "defer.Deferred[Mapping[str, StoredKey]]":
        return with_deadline(
            self._clock, coalescer.request(fetch), self._fetch_timeout_s, cancel_work=True
        )

    def _origin_done(
        self,
        result: FetchOutcome,
        origin: str,
        groups: list[WaitingGroup],
        fetched: dict[str, FetchOutcome],
        batch: ItemBatch,
        keys: KeysByServer,
    ) -> None:
        if isinstance(result, Failure):
            if result.check(DeadlineExceeded, defer.CancelledError):
                reason = VerificationFailure.FETCH_TIMED_OUT
                detail = "key fetch timed out after %.3gs" % (self._fetch_timeout_s,)
            else:
                reason = VerificationFailure.FETCH_FAILED
                detail = "key fetch failed: %s" % (result.getErrorMessage(),)
            logger.info("Keyring: keys of %s unavailable: %s", origin, detail)
            result = Failure(KeyVerificationError(origin, (), reason, detail))
        fetched[origin] = result
        for group in groups:
            group.waiting_for.discard(origin)
            if not group.waiting_for:
                recheck_group(group, fetched, batch, keys, now_ms(self._clock))

    def _batch_fetcher(self, chain: KeySource) -> BatchFetcher:
        async def fetch(batch: dict[str, KeyRequest], report: ServerKeysReport) -> None:
            # Our own verification: it may spend the limiters' reserve (FetchPurpose).
            own = [attr.evolve(r, purpose=FetchPurpose.OWN) for r in batch.values()]
            keys = await chain.get_keys(own, use_cache=True, on_server=report)
            for origin in batch:  # for a source that does not report (later ones are ignored)
                report(origin, keys.get(origin, {}))

        return fetch

    def _with_own_keys(self, stored: KeysByServer) -> KeysByServer:
        merged = dict(stored)  # never change the store's (possibly cached) answer
        merged[self._own_server_name] = self._own_keys
        return merged


@attr.s(auto_attribs=True, frozen=True, slots=True)
class _CheckedPart:
    """The items of one part that failed their first check, and what they were checked
    with: the keys read for that part and the time."""

    failed: list[tuple[int, Failure]]
    keys: KeysByServer
    now: int


def _own_stored_keys(own_keys: OwnKeys) -> dict[str, StoredKey]:
    server_name = own_keys.server_name
    keys = {
        key_id: StoredKey(
            server_name, key_id, raw, _OWN_KEY_VALID_UNTIL_TS, None, 0, _OWN_KEY_SOURCE, ""
        )
        for key_id, raw in own_keys.verify_keys().items()
    }
    for key_id, old in own_keys.old_verify_keys().items():
        keys[key_id] = StoredKey(
            server_name,
            key_id,
            old.verify_key_bytes,
            old.expired_ts,
            old.expired_ts,
            0,
            _OWN_KEY_SOURCE,
            "",
        )
    return keys
