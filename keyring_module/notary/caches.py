"""The notary's two caches, which keep the hot path free of signing and encoding.

Both are bounded by the bytes they hold (``notary.cosigned_cache_size`` and
``notary.answer_cache_size``), not by entry counts: an origin's answer may be as big as
``federation.max_response_size``.

* :class:`CoSigner` adds our one signature to a stored origin response and keeps the
  co-signed canonical bytes per response (content-addressed: a changed response has a
  new id, so nothing needs invalidating; responses no longer served age out).
* :class:`AnswerCache` keeps whole answers, keyed by the normalised query
  (:mod:`~keyring_module.notary.query`), until a store write, the earliest half-life
  involved, or a few seconds pass; expired entries are dropped as time goes on, not
  only when they are asked for again.
"""

import heapq
import logging
from typing import Optional

import attr

from keyring_module.blocking import BlockingRunner, WorkerPoolBusyError, run_inline
from keyring_module.metrics import AnswerResult
from keyring_module.model import StoredResponse
from keyring_module.notary.query import AnswerKey, NormalisedQuery
from keyring_module.signing import OwnKeys
from keyring_module.sized_lru import SizedLru

logger = logging.getLogger(__name__)

#: What one server of an answer key costs besides its names (tuple and string objects).
ANSWER_KEY_BYTES_PER_SERVER = 150


def _blob_size(response_id: str, blob: bytes) -> int:
    return len(blob)


#: Stored responses bigger than this are co-signed in a worker thread: decoding and
#: encoding a padded or hostile one (up to ``federation.max_response_size``) must not
#: hold the reactor.
SIGN_IN_THREAD_BYTES = 64 * 1024


class CoSigner:
    """Adds our one signature to stored responses; caches the results per response.

    Args:
        own_keys: our keys; the primary key co-signs.
        max_bytes: how many bytes of co-signed responses to keep (least recently used
            go first); 0 signs every time.
        runner: where responses over :data:`SIGN_IN_THREAD_BYTES` are signed (the
            worker pool; tests run them inline). A response the pool refuses (too busy)
            is left out of that answer.
    """

    def __init__(
        self, own_keys: OwnKeys, max_bytes: int, runner: BlockingRunner = run_inline
    ) -> None:
        self._own_keys = own_keys
        self._runner = runner
        self._cache: SizedLru[str, bytes] = SizedLru(max_bytes, _blob_size)

    @property
    def max_bytes(self) -> int:
        """The byte budget."""
        return self._cache.max_bytes

    @property
    def total_bytes(self) -> int:
        """The bytes the cache holds now."""
        return self._cache.total_bytes

    async def cosign(self, response: StoredResponse) -> Optional[bytes]:
        """The response's canonical bytes with our signature added; None if unusable."""
        cached = self._cache.get(response.response_id)
        if cached is not None:
            return cached
        if len(response.json_bytes) > SIGN_IN_THREAD_BYTES:
            try:
                signed = await self._runner(lambda: self._sign(response))
            except WorkerPoolBusyError as e:  # left out of this answer only
                logger.info(
                    "Leaving out stored response %s of %s: %s",
                    response.response_id,
                    response.server_name,
                    e,
                )
                return None
        else:
            signed = self._sign(response)
        if signed is not None:
            self._cache.put(response.response_id, signed)
        return signed

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


@attr.s(auto_attribs=True, frozen=True, slots=True)
class CachedAnswer:
    """A whole answer body, good until ``expires_ms`` or the next store write.

    Attributes:
        body: the answer's bytes.
        expires_ms: when it is no longer good (the earliest half-life involved, or a
            few seconds).
        generation: the store's write generation it was built on.
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
    names = sum(len(server) + sum(map(len, key_ids)) for server, key_ids, _ in key)
    return len(answer.body) + names + ANSWER_KEY_BYTES_PER_SERVER * len(key)


class AnswerCache:
    """Whole answers, keyed by normalised query, bounded in bytes (LRU).

    Args:
        max_bytes: how many bytes of answers (and their keys) to keep; 0 keeps none.
    """

    def __init__(self, max_bytes: int) -> None:
        self._entries: SizedLru[AnswerKey, CachedAnswer] = SizedLru(max_bytes, _answer_size)
        self._generation: Optional[int] = None
        # (expires_ms, sequence, key) per put, earliest first: what to drop when.
        self._expiries: list[tuple[int, int, AnswerKey]] = []
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

    def get(self, query: NormalisedQuery, now_ms: int, generation: int) -> Optional[CachedAnswer]:
        """The answer kept for this query, if it is still good and meets its minimums.

        Args:
            query: the query, normalised.
            now_ms: the current time.
            generation: the store's write generation now; a different one than the
                answers were built on drops them all.
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
                one is not kept.
        """
        self._drop_outdated(now_ms, generation)
        if entry.generation != generation or entry.expires_ms <= now_ms:
            return
        if self._entries.put(key, entry):
            self._puts += 1
            heapq.heappush(self._expiries, (entry.expires_ms, self._puts, key))

    def _drop_outdated(self, now_ms: int, generation: int) -> None:
        """Drop every answer if the store was written since, and expired answers."""
        if generation != self._generation:
            self._generation = generation
            self._entries.clear()
            self._expiries.clear()
            return
        while self._expiries and self._expiries[0][0] <= now_ms:
            _, _, key = heapq.heappop(self._expiries)
            entry = self._entries.peek(key)
            if entry is not None and entry.expires_ms <= now_ms:
                self._entries.pop(key)
