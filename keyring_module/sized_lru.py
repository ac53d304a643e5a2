"""``SizedLru``: a least-recently-used map bounded by the bytes its values hold.

The notary's answer and co-signed caches and the store's in-memory key cache all hold
bytes that a peer decides the size of (an origin's answer may be up to
``federation.max_response_size``), so counting entries bounds nothing: each is bounded
by the bytes it actually holds instead, plus a small fixed cost per entry, so that
many tiny entries are bounded too. A value bigger than the whole budget is not kept::

    >>> cache = SizedLru(3 * ENTRY_OVERHEAD_BYTES + 30, lambda name, value: len(value))
    >>> for name in ("a", "b", "c"):
    ...     cache.put(name, b"x" * 10)
    True
    True
    True
    >>> cache.get("a")  # now the most recently used
    b'xxxxxxxxxx'
    >>> cache.put("d", b"y" * 10)  # over the budget: "b", the least recently used, goes
    True
    >>> sorted(cache), cache.total_bytes == 3 * ENTRY_OVERHEAD_BYTES + 30
    (['a', 'c', 'd'], True)
    >>> cache.put("e", b"z" * 10_000)  # bigger than the budget: not kept
    False
"""

from collections import OrderedDict
from typing import Callable, Generic, Hashable, Iterator, Optional, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: What an entry costs besides the bytes ``size_of`` measures: the map slot, the key and
#: the value's own object (a rough, fixed figure).
ENTRY_OVERHEAD_BYTES = 200


class SizedLru(Generic[K, V]):
    """A map that drops its least recently used entries to stay within a byte budget.

    Args:
        max_bytes: the budget: the sum of ``size_of(key, value) + ENTRY_OVERHEAD_BYTES``
            over the entries never exceeds it. 0 keeps nothing.
        size_of: the bytes an entry holds (e.g. the length of a ``bytes`` value).
        max_entries: an optional bound on the number of entries too.
        on_evict: called with ``(key, value)`` for each entry dropped to stay within
            the bounds (not for :meth:`pop`, :meth:`clear` or a replaced value), so that
            an owner can forget what else it keeps about the entry.
    """

    def __init__(
        self,
        max_bytes: int,
        size_of: Callable[[K, V], int],
        max_entries: Optional[int] = None,
        on_evict: Optional[Callable[[K, V], None]] = None,
    ) -> None:
        self._max_bytes = max(0, max_bytes)
        self._max_entries = max_entries
        self._size_of = size_of
        self._on_evict = on_evict
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._total_bytes = 0

    def __len__(self) -> int:
        """How many entries are kept."""
        return len(self._entries)

    def __iter__(self) -> Iterator[K]:
        """The keys, least recently used first."""
        return iter(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    @property
    def max_bytes(self) -> int:
        """The byte budget."""
        return self._max_bytes

    @property
    def total_bytes(self) -> int:
        """The bytes the entries hold now, overhead included (never above the budget)."""
        return self._total_bytes

    def get(self, key: K) -> Optional[V]:
        """The value under ``key`` (now the most recently used), or None."""
        found = self._entries.get(key)
        if found is None:
            return None
        self._entries.move_to_end(key)
        return found[0]

    def peek(self, key: K) -> Optional[V]:
        """The value under ``key``, or None, leaving the order as it is."""
        found = self._entries.get(key)
        return None if found is None else found[0]

    def put(self, key: K, value: V) -> bool:
        """Keep ``value`` under ``key`` as the most recently used entry.

        A value already under ``key`` is replaced; putting the same (changed) value
        again measures it again. Least recently used entries are dropped until the
        budget holds.

        Returns:
            Whether the value is kept (False when it alone is over the budget; then
            nothing is kept under ``key``).
        """
        self.pop(key)
        size = self._size_of(key, value) + ENTRY_OVERHEAD_BYTES
        if size > self._max_bytes or self._max_entries == 0:
            return False
        self._entries[key] = (value, size)
        self._total_bytes += size
        while self._total_bytes > self._max_bytes or (
            self._max_entries is not None and len(self._entries) > self._max_entries
        ):
            dropped_key, (dropped_value, dropped_size) = self._entries.popitem(last=False)
            self._total_bytes -= dropped_size
            if self._on_evict is not None:
                self._on_evict(dropped_key, dropped_value)
        return True

    def pop(self, key: K) -> Optional[V]:
        """Remove and return the value under ``key`` (None if there is none)."""
        found = self._entries.pop(key, None)
        if found is None:
            return None
        self._total_bytes -= found[1]
        return found[0]

    def clear(self) -> None:
        """Drop every entry."""
        self._entries.clear()
        self._total_bytes = 0
