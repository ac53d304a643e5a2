"""The notary's two caches, which keep the hot path free of signing and encoding.

* :class:`CoSigner` adds our one signature to a stored origin response and keeps the
  co-signed canonical bytes per response (content-addressed: a changed response has a
  new id, so nothing needs invalidating).
* :class:`AnswerCache` keeps whole answers to repeated identical queries, until a store
  write, the earliest half-life involved, or a few seconds pass.
"""

import json
import logging
from collections import OrderedDict
from typing import Optional

import attr
from canonicaljson import encode_canonical_json

from keyring_module.metrics import AnswerResult
from keyring_module.model import StoredResponse
from keyring_module.signing import OwnKeys

logger = logging.getLogger(__name__)


class CoSigner:
    """Adds our one signature to stored responses; caches the results per response.

    Args:
        own_keys: our keys; the primary key co-signs.
        max_entries: how many co-signed responses to keep (least recently used go).
    """

    def __init__(self, own_keys: OwnKeys, max_entries: int = 10000) -> None:
        self._own_keys = own_keys
        self._max_entries = max_entries
        self._cache: OrderedDict[str, bytes] = OrderedDict()

    def cosign(self, response: StoredResponse) -> Optional[bytes]:
        """The response's canonical bytes with our signature added; None if unusable."""
        cached = self._cache.get(response.response_id)
        if cached is not None:
            self._cache.move_to_end(response.response_id)
            return cached
        signed = self._sign(response)
        if signed is not None:
            self._cache[response.response_id] = signed
            if len(self._cache) > self._max_entries:
                self._cache.popitem(last=False)
        return signed

    def _sign(self, response: StoredResponse) -> Optional[bytes]:
        try:
            obj = json.loads(response.json_bytes)
        except ValueError:
            obj = None
        if not isinstance(obj, dict) or not isinstance(obj.get("signatures", {}), dict):
            logger.warning(
                "Skipping unreadable stored response %s of %s",
                response.response_id,
                response.server_name,
            )
            return None
        return encode_canonical_json(self._own_keys.sign(obj))


@attr.s(auto_attribs=True, frozen=True, slots=True)
class CachedAnswer:
    """A whole answer body, good until ``expires_ms`` or the next store write."""

    body: bytes
    expires_ms: int
    generation: int
    results: tuple[tuple[AnswerResult, int], ...]  # (how answered, how many servers)


class AnswerCache:
    """Whole answers to repeated identical queries (LRU, bounded)."""

    def __init__(self, max_entries: int = 1024) -> None:
        self._max_entries = max_entries
        self._entries: OrderedDict[bytes, CachedAnswer] = OrderedDict()

    def get(self, key: bytes, now_ms: int, generation: int) -> Optional[CachedAnswer]:
        """The answer under ``key`` if it is still good, else None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if generation < 0 or entry.generation != generation or now_ms >= entry.expires_ms:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: bytes, entry: CachedAnswer) -> None:
        """Keep ``entry`` (only when the store can report its writes)."""
        if entry.generation < 0 or self._max_entries <= 0:
            return
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
