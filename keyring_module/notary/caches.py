"""The notary's two caches, which keep the hot path free of signing and encoding.

Both are bounded by the bytes they hold (``notary.cosigned_cache_size`` and
``notary.answer_cache_size``), not by entry counts: an origin's answer may be as big as
``federation.max_response_size``.

* :class:`CoSigner` adds our one signature to a stored origin response and keeps the
  co-signed canonical bytes per response (content-addressed: a changed response has a
  new id, so nothing needs invalidating; responses no longer served age out). A big
  response is signed once however many requests want it at the same time.
* :class:`AnswerCache` keeps whole answers, keyed by the normalised query
  (:mod:`~keyring_module.notary.query`), until a key write of one of the servers they
  name, the earliest half-life involved, or a few seconds pass; expired entries are
  dropped as time goes on, not only when they are asked for again.
"""

import functools
import heapq
import logging
from contextvars import ContextVar
from typing import Callable, Optional, Sequence, TypeVar

import attr
from twisted.internet import defer
from twisted.python.failure import Failure

from keyring_module.blocking import BlockingRunner, WorkerPoolBusyError, run_inline
from keyring_module.clock import ReactorClock
from keyring_module.metrics import AnswerResult
from keyring_module.model import StoredResponse
from keyring_module.notary.answer_index import INDEX_BYTES_PER_SERVER, RecentChanges, ServerIndex
from keyring_module.notary.query import AnswerKey, NormalisedQuery, answer_key_bytes
from keyring_module.pacing import pause, slices
from keyring_module.signing import OwnKeys
from keyring_module.sized_lru import SizedLru

T = TypeVar("T")

logger = logging.getLogger(__name__)


def _blob_size(response_id: str, blob: bytes) -> int:
    return len(blob)


#: A stored response at most this big may be co-signed on the reactor thread. Co-signing
#: costs about 0.1 µs per byte of a response padded with many small JSON values (the worst
#: kind: an 8 KiB one about 1 ms), much less for a normal 300 to 500 byte one (0.06 ms).
INLINE_SIGN_BYTES = 8 * 1024
#: The bytes of the responses one signing round co-signs on the reactor thread, at most
#: (about 2 ms at worst); the round's other misses are signed in worker jobs.
INLINE_ROUND_BYTES = 16 * 1024
#: Stored responses bigger than this are co-signed in a worker job of their own, shared
#: by every request wanting them at the same time (up to ``federation.max_response_size``).
SIGN_ALONE_BYTES = 64 * 1024
#: Responses per worker job co-signing the misses of a signing round.
SIGNING_BATCH = 32


def split_for_reactor(
    responses: Sequence[StoredResponse],
) -> tuple[list[StoredResponse], list[StoredResponse]]:
    """The responses to co-sign on the reactor thread and the rest (for worker jobs),
    each in the order given: those of at most :data:`INLINE_SIGN_BYTES`, while their
    total stays within :data:`INLINE_ROUND_BYTES`.

    Example:
        >>> def response(size):
        ...     return StoredResponse(str(size), "a", 0, 0, "origin", b"x" * size)
        >>> on_reactor, rest = split_for_reactor(
        ...     [response(s) for s in (500, 9000, 8000, 8000, 400)]
        ... )
        >>> [len(r.json_bytes) for r in on_reactor], [len(r.json_bytes) for r in rest]
        ([500, 8000, 400], [9000, 8000])
    """
    on_reactor: list[StoredResponse] = []
    rest: list[StoredResponse] = []
    total = 0
    for response in responses:
        size = len(response.json_bytes)
        if size <= INLINE_SIGN_BYTES and total + size <= INLINE_ROUND_BYTES:
            on_reactor.append(response)
            total += size
        else:
            rest.append(response)
    return on_reactor, rest


class CoSigner:
    """Adds our one signature to stored responses; caches the results per response.

    Where a response is signed depends on what it costs, which grows with its bytes (a
    response padded with many small values, kept and re-served as the origin sent it,
    costs about 7 ms per 56 KB): only responses of at most :data:`INLINE_SIGN_BYTES` are
    ever signed on the reactor thread. A bigger one is signed by ``runner``; one over
    :data:`SIGN_ALONE_BYTES` (or any over :data:`INLINE_SIGN_BYTES` asked for outside a
    signing round) in a job of its own, and while it is being signed every other request
    for it waits for that same signing (single flight), so concurrent misses cost one job
    and one copy of the result. Only the signings in progress are tracked.

    A big batch may miss thousands of responses at once (the co-signed cache was
    cleared, or the batch names servers never answered before): signing them one by one
    on the reactor thread would hold it for seconds. :meth:`cosign_together` collects
    the misses of many answers started together (a :class:`_SigningRound`) and signs
    the small ones on the reactor thread up to :data:`INLINE_ROUND_BYTES` in all (see
    :func:`split_for_reactor`), the others in worker jobs of :data:`SIGNING_BATCH`.

    When the pool refuses a job (too busy), no request fails: a response over
    :data:`INLINE_SIGN_BYTES` is left out of that answer (the requester asks its origin
    itself); the small ones of a refused batch are signed on the reactor thread,
    :data:`INLINE_ROUND_BYTES` at a time with a reactor turn in between.

    Args:
        own_keys: our keys; the primary key co-signs.
        max_bytes: how many bytes of co-signed responses to keep (least recently used
            go first); 0 signs every time.
        runner: where responses over :data:`INLINE_SIGN_BYTES` are signed (the worker
            pool; tests run them inline).
        clock: the reactor, for the turns given between the parts of a refused batch
            signed on the reactor thread; None gives no turn (a one-off signer).
    """

    def __init__(
        self,
        own_keys: OwnKeys,
        max_bytes: int,
        runner: BlockingRunner = run_inline,
        clock: Optional[ReactorClock] = None,
    ) -> None:
        self._own_keys = own_keys
        self._runner = runner
        self._clock = clock
        self._cache: SizedLru[str, bytes] = SizedLru(max_bytes, _blob_size)
        # Per response being signed by the runner: the requests waiting for it.
        self._signing: dict[str, list["defer.Deferred[Optional[bytes]]"]] = {}

    @property
    def max_bytes(self) -> int:
        """The byte budget."""
        return self._cache.max_bytes

    @property
    def total_bytes(self) -> int:
        """The bytes the cache holds now."""
        return self._cache.total_bytes

    def is_cached(self, response_id: str) -> bool:
        """Whether the co-signed bytes of a response are cached (not counted as a use)."""
        return response_id in self._cache

    def cached(self, response_id: str) -> Optional[bytes]:
        """The co-signed bytes of a response, if they are cached (no signing)."""
        return self._cache.get(response_id)

    async def cosign(self, response: StoredResponse) -> Optional[bytes]:
        """The response's canonical bytes with our signature added; None if unusable."""
        cached = self._cache.get(response.response_id)
        if cached is not None:
            return cached
        size = len(response.json_bytes)
        signing_round = _current_round.get()
        if size > SIGN_ALONE_BYTES or (signing_round is None and size > INLINE_SIGN_BYTES):
            try:
                return await self._signed_by_runner(response)
            except WorkerPoolBusyError as e:  # left out of this answer only
                _log_left_out([response], e)
                return None
        if signing_round is not None:
            return await signing_round.add(response)
        signed = self._sign(response)
        if signed is not None:
            self._cache.put(response.response_id, signed)
        return signed

    def cosign_together(
        self, start: Callable[[], list["defer.Deferred[T]"]]
    ) -> list["defer.Deferred[T]"]:
        """Call ``start``, which starts answers (Deferreds) that call :meth:`cosign`, and
        sign the cache misses they meet together; the started answers.

        Whenever every answer of the round not yet finished waits for a signing, the
        misses collected are signed: small ones on the reactor thread, up to
        :data:`INLINE_ROUND_BYTES` in all, the others in worker jobs of
        :data:`SIGNING_BATCH` each, one after another (see :class:`CoSigner` for a job
        the pool refuses). Answers that first wait
        for something else (a store read) join the round when they get to signing.
        Each answer goes on as soon as its response is signed.

        Example::

            started = cosigner.cosign_together(
                lambda: [defer.ensureDeferred(answer(s)) for s in servers]
            )
            answers = await defer.gatherResults(started)
        """
        signing_round = _SigningRound(self)
        token = _current_round.set(signing_round)  # inherited by the answers started
        try:
            started = start()
        finally:
            _current_round.reset(token)
        signing_round.watch(started)
        return started

    async def sign_collected(
        self, collected: list[tuple[StoredResponse, "defer.Deferred[Optional[bytes]]"]]
    ) -> None:
        """Sign what a round of :meth:`cosign_together` collected (each response once)
        and hand each waiter its result; if signing fails, every waiter left fails too."""
        waiters: dict[str, list["defer.Deferred[Optional[bytes]]"]] = {}
        responses: list[StoredResponse] = []
        for response, waiter in collected:
            if response.response_id not in waiters:
                waiters[response.response_id] = []
                responses.append(response)
            waiters[response.response_id].append(waiter)
        on_reactor, to_workers = split_for_reactor(responses)
        try:
            self._deliver(on_reactor, self._sign_all(on_reactor), waiters)
            for first, last in slices(len(to_workers), SIGNING_BATCH):
                batch = to_workers[first:last]
                try:
                    signed = await self._runner(functools.partial(self._sign_all, batch))
                except WorkerPoolBusyError as e:
                    signed = await self._sign_refused(batch, e)
                self._deliver(batch, signed, waiters)
        except BaseException:
            failure = Failure()
            for left in waiters.values():
                for waiter in left:
                    if not waiter.called:
                        waiter.errback(failure)
            raise

    async def _sign_refused(
        self, batch: Sequence[StoredResponse], refusal: WorkerPoolBusyError
    ) -> list[Optional[bytes]]:
        """What a batch the pool refused comes to: the responses of at most
        :data:`INLINE_SIGN_BYTES` signed on the reactor thread, :data:`INLINE_ROUND_BYTES`
        at a time, each on a reactor turn of its own; None for the others (left out)."""
        signed: dict[str, Optional[bytes]] = {}
        small = [r for r in batch if len(r.json_bytes) <= INLINE_SIGN_BYTES]
        left_out = [r for r in batch if len(r.json_bytes) > INLINE_SIGN_BYTES]
        if left_out:
            _log_left_out(left_out, refusal)
        while small:
            if self._clock is not None:
                await pause(self._clock)  # after what this round signed on the reactor
            part, small = split_for_reactor(small)
            for response in part:
                signed[response.response_id] = self._sign(response)
        return [signed.get(r.response_id) for r in batch]

    def _deliver(
        self,
        responses: Sequence[StoredResponse],
        signed: Sequence[Optional[bytes]],
        waiters: dict[str, list["defer.Deferred[Optional[bytes]]"]],
    ) -> None:
        """Cache what was signed and fire its waiters (not those cancelled meanwhile)."""
        for response, blob in zip(responses, signed, strict=True):
            if blob is not None:
                self._cache.put(response.response_id, blob)
            for waiter in waiters.pop(response.response_id):
                if not waiter.called:
                    waiter.callback(blob)

    @property
    def signings_in_flight(self) -> int:
        """How many responses the runner is signing now."""
        return len(self._signing)

    def _signed_by_runner(self, response: StoredResponse) -> "defer.Deferred[Optional[bytes]]":
        """The result of the one runner job signing ``response``, started if need be.

        Each caller gets a Deferred of its own, so a caller that is cancelled (its
        client went away) leaves the job and the other callers alone.
        """
        waiter: "defer.Deferred[Optional[bytes]]" = defer.Deferred()
        waiters = self._signing.get(response.response_id)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._signing[response.response_id] = [waiter]
        job = self._runner(lambda: self._sign(response))
        job.addBoth(self._signing_done, response.response_id)
        return waiter

    def _signing_done(self, result: "Optional[bytes] | Failure", response_id: str) -> None:
        waiters = self._signing.pop(response_id, [])
        if isinstance(result, bytes):
            self._cache.put(response_id, result)
        for waiter in waiters:
            if waiter.called:
                continue  # cancelled
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    def _sign_all(self, responses: Sequence[StoredResponse]) -> list[Optional[bytes]]:
        """:meth:`_sign` each (also in a worker thread)."""
        return [self._sign(r) for r in responses]

    def _sign(self, response: StoredResponse) -> Optional[bytes]:
        """Co-sign (also in a worker thread: it touches nothing shared but the log)."""
        try:
            return self._own_keys.cosign_canonical(response.json_bytes)
        except ValueError:
            logger.warning(
                "Skipping unreadable stored response %s of %s",
                response.response_id,
                response.server_name,
            )
            return None


def _log_left_out(responses: Sequence[StoredResponse], refusal: WorkerPoolBusyError) -> None:
    """Log the stored responses left out of their answers: the pool refused to sign them."""
    logger.info(
        "Leaving out %d stored responses (e.g. %s of %s): %s",
        len(responses),
        responses[0].response_id,
        responses[0].server_name,
        refusal,
    )


class _SigningRound:
    """The answers one :meth:`CoSigner.cosign_together` started, and the signings they
    wait for.

    It signs what it collected once every answer not finished waits for a signing
    (collected, or being signed): none of them can add another miss before then.
    """

    def __init__(self, cosigner: CoSigner) -> None:
        self._cosigner = cosigner
        self._unfinished: Optional[int] = None  # None: still starting
        self._collected: list[tuple[StoredResponse, "defer.Deferred[Optional[bytes]]"]] = []
        self._being_signed = 0

    def add(self, response: StoredResponse) -> "defer.Deferred[Optional[bytes]]":
        """Collect a miss; fires with the co-signed bytes (None if unusable)."""
        waiter: "defer.Deferred[Optional[bytes]]" = defer.Deferred()
        signed: "defer.Deferred[Optional[bytes]]" = defer.Deferred()
        signed.addBoth(self._signed, waiter)
        self._collected.append((response, signed))
        self._maybe_sign()
        return waiter

    def watch(self, answers: list["defer.Deferred[T]"]) -> None:
        """Count the answers started; sign whenever all left wait for signings."""
        self._unfinished = len(answers)
        for answer in answers:
            answer.addBoth(self._answer_finished)
        self._maybe_sign()

    def _answer_finished(self, result: T) -> T:
        assert self._unfinished is not None
        self._unfinished -= 1
        self._maybe_sign()
        return result

    def _signed(self, result: object, waiter: "defer.Deferred[Optional[bytes]]") -> None:
        self._being_signed -= 1
        if waiter.called:
            return  # cancelled: its answer has gone
        if isinstance(result, Failure):
            waiter.errback(result)
        else:
            waiter.callback(result)  # type: ignore[arg-type]

    def _maybe_sign(self) -> None:
        if self._unfinished is None or not self._collected:
            return
        if len(self._collected) + self._being_signed < self._unfinished:
            return  # some answer may still add a miss
        collected, self._collected = self._collected, []
        self._being_signed += len(collected)
        d = defer.ensureDeferred(self._cosigner.sign_collected(collected))
        d.addErrback(lambda _: None)  # the waiters got the failure


#: The signing round the running answer belongs to (set by cosign_together).
_current_round: ContextVar[Optional[_SigningRound]] = ContextVar(
    "keyring_module_signing_round", default=None
)


@attr.s(auto_attribs=True, frozen=True, slots=True)
class CachedAnswer:
    """A whole answer body, good until ``expires_ms`` or the next key write of one of
    the servers it names.

    Attributes:
        body: the answer's bytes.
        expires_ms: when it is no longer good (the earliest half-life involved, or a
            few seconds).
        generation: the store's write generation it was built on (read before the
            store was).
        results: (how answered, how many servers), for the metrics of a reuse.
        met_minimums: per server of its key, the highest ``minimum_valid_until_ts``
            it meets.
    """

    body: bytes
    expires_ms: int
    generation: int
    results: tuple[tuple[AnswerResult, int], ...]
    met_minimums: tuple[int, ...]

    def meets(self, minimums: tuple[Optional[int], ...]) -> bool:
        """Whether this answer meets a query's minimums (per server of the same key).

        Example:
            >>> answer = CachedAnswer(b"", 0, 0, (), met_minimums=(10, 20))
            >>> answer.meets((None, 20)), answer.meets((11, None))
            (True, False)
        """
        return all(
            m is None or m <= met for m, met in zip(minimums, self.met_minimums, strict=True)
        )


def _answer_size(key: AnswerKey, answer: CachedAnswer) -> int:
    return len(answer.body) + answer_key_bytes(key) + INDEX_BYTES_PER_SERVER * len(key)


@attr.s(auto_attribs=True, slots=True, order=True)
class _Expiry:
    """When the answer under ``key`` expires (the order is by time, then by put)."""

    expires_ms: int
    sequence: int
    #: None once the answer is gone (evicted or replaced): the heap keeps no dropped key.
    key: Optional[AnswerKey] = attr.ib(eq=False, order=False)


#: The expiry heap is rebuilt from the live answers once it holds more than twice as
#: many items as there are answers, plus this many.
EXPIRY_HEAP_SLACK = 64


class AnswerCache:
    """Whole answers, keyed by normalised query, bounded in bytes (LRU).

    Expired answers are dropped in time order through a heap of expiry times. An answer
    evicted to stay within the budget lets go of its key at once (an answer key may
    name 10,000 servers), and the heap is rebuilt from the live answers when it has
    grown to more than twice their number, so what the cache holds stays within about
    its budget.

    A key write drops only the answers naming its server: the store tells
    :meth:`changed` which server each write was about (its own writes, and those other
    processes sharing the database told of; see
    :meth:`~keyring_module.storage.cache.CachedKeyStore.add_write_listener`), and the
    answers are indexed by the servers they name (:mod:`~keyring_module.notary.answer_index`).
    A write it was not told of (the store's ``write_generation`` moved on by itself,
    or was told "any server", e.g. when news from other processes may have been
    missed) drops every answer, as does a store that tells nothing. An answer built on
    reads made before a write is kept only if none of its servers was written since.

    Example:
        >>> from keyring_module.notary.query import ServerQuery, normalise_queries
        >>> cache = AnswerCache(1 << 20)
        >>> a, ab = (normalise_queries([ServerQuery(n) for n in names])
        ...          for names in (["a.example"], ["a.example", "b.example"]))
        >>> b = normalise_queries([ServerQuery("b.example")])
        >>> for asked in (a, ab, b):
        ...     cache.put(asked.key, CachedAnswer(b"{}", 5000, 0, (), (0,) * len(asked.key)), 0, 0)
        >>> cache.changed("a.example", 1)  # a write of a.example's keys
        >>> [cache.get(asked, 0, 1) is not None for asked in (a, ab, b)]
        [False, False, True]
        >>> cache.get(b, 0, 2) is None  # a write nobody told of: all dropped
        True

    Args:
        max_bytes: how many bytes of answers (and their keys, and their index
            entries) to keep; 0 keeps none.
    """

    def __init__(self, max_bytes: int) -> None:
        self._entries: SizedLru[AnswerKey, CachedAnswer] = SizedLru(
            max_bytes, _answer_size, on_evict=self._forget
        )
        # The store's write generation up to which every write is accounted for.
        self._generation: Optional[int] = None
        # The answers naming each server, and the servers written lately.
        self._index = ServerIndex()
        self._changes = RecentChanges()
        # One item per put, earliest expiry first: what to drop when.
        self._expiries: list[_Expiry] = []
        # The heap item of each answer kept.
        self._expiry_of: dict[AnswerKey, _Expiry] = {}
        self._puts = 0

    def __len__(self) -> int:
        """How many answers are kept."""
        return len(self._entries)

    @property
    def max_bytes(self) -> int:
        """The byte budget."""
        return self._entries.max_bytes

    @property
    def total_bytes(self) -> int:
        """The bytes the cache holds now."""
        return self._entries.total_bytes

    @property
    def expiry_items(self) -> int:
        """How many items the expiry heap holds (live answers and dropped ones)."""
        return len(self._expiries)

    def get(self, query: NormalisedQuery, now_ms: int, generation: int) -> Optional[CachedAnswer]:
        """The answer kept for this query, if it is still good and meets its minimums.

        Args:
            query: the query, normalised.
            now_ms: the current time.
            generation: the store's write generation now; a different one than the
                cache was last told of (:meth:`changed`) drops every answer.
        """
        self._drop_outdated(now_ms, generation)
        entry = self._entries.get(query.key)
        if entry is None or not entry.meets(query.minimums):
            return None
        return entry

    def put(self, key: AnswerKey, entry: CachedAnswer, now_ms: int, generation: int) -> None:
        """Keep ``entry`` under ``key``, unless it is already out of date.

        Args:
            key: the normalised query it answers.
            entry: the answer.
            now_ms: the current time.
            generation: the store's write generation now; an entry built on an earlier
                one is kept only if none of its servers is known to have been written
                since.
        """
        self._drop_outdated(now_ms, generation)
        if entry.expires_ms <= now_ms:
            return
        if entry.generation != generation and not self._changes.unchanged_since(
            key, entry.generation
        ):
            return
        self._drop(key)  # a replaced answer
        if not self._entries.put(key, entry):
            return
        self._index.add(key)
        self._puts += 1
        item = _Expiry(entry.expires_ms, self._puts, key)
        heapq.heappush(self._expiries, item)
        self._expiry_of[key] = item
        if len(self._expiries) > 2 * len(self._entries) + EXPIRY_HEAP_SLACK:
            self._expiries = [i for i in self._expiries if i.key is not None]
            heapq.heapify(self._expiries)

    def changed(self, server_name: Optional[str], generation: int) -> None:
        """The store counted a write of ``server_name``'s keys as ``generation`` (None:
        maybe any server's): drop the answers naming it (every answer when
        ``server_name`` is None, or when a write before it was not told).

        This is a store's write listener (see
        :meth:`~keyring_module.storage.cache.CachedKeyStore.add_write_listener`).
        """
        if server_name is None or self._generation is None or generation != self._generation + 1:
            self._drop_all(generation)
            return
        self._generation = generation
        self._changes.note(server_name, generation)
        for key in self._index.keys_naming(server_name):
            self._drop(key)

    @property
    def indexed_servers(self) -> int:
        """How many servers the kept answers name (the index's size)."""
        return len(self._index)

    def _drop(self, key: AnswerKey) -> None:
        """Drop the answer under ``key``, if any."""
        if self._entries.pop(key) is not None:
            self._forget(key)

    def _forget(self, key: AnswerKey, entry: Optional[CachedAnswer] = None) -> None:
        """The answer under ``key`` is gone: its heap item no longer holds the key, and
        the index no longer names it."""
        item = self._expiry_of.pop(key, None)
        if item is not None:
            item.key = None
        self._index.remove(key)

    def _drop_all(self, generation: int) -> None:
        """Drop every answer: anything may have changed up to ``generation``."""
        self._generation = generation
        self._entries.clear()
        self._expiries.clear()
        self._expiry_of.clear()
        self._index.clear()
        self._changes.reset(generation)

    def _drop_outdated(self, now_ms: int, generation: int) -> None:
        """Drop every answer if the store was written since without telling
        :meth:`changed`, and expired answers."""
        if generation != self._generation:
            self._drop_all(generation)
            return
        while self._expiries and self._expiries[0].expires_ms <= now_ms:
            key = heapq.heappop(self._expiries).key
            if key is not None:
                self._drop(key)
