"""Which stored responses of one server to keep: the per-server response bounds.

A server's stored responses are the *copies* its key rows point at: each key's **newest**
copy (the one the notary serves) and its **first-seen** copy (the response its kept bytes
were first stored from; evidence only, never served). After a store, a server may hold
at most ``max_responses`` copies of at most ``max_response_bytes`` bytes in all, of which
copies from notaries (whose stored ``source`` is a notary) at most half of each
(:class:`~keyring_module.storage.limits.StoreLimits`).

When a store would leave more, :func:`keep_within` drops copies in this order, each
kind oldest first, until the bounds hold:

1. first-seen copies that serve no key;
2. copies all of whose keys have expired (an old key's ``expired_ts``, a current key's
   ``valid_until_ts``, before the fetch), those expired longest ago first;
3. copies from notaries;
4. the origin's copies of keys that are still valid.

The response being stored is never dropped, so a server's newest keys are always
served: availability of the newest copies wins over keeping every first-seen copy. A
response from a notary may drop only first-seen copies and copies from notaries: what the
origin gave is never given up for what a notary says. Key rows are never dropped: a key
whose newest copy is dropped keeps its bytes and validity (the keyring still uses it);
the notary has no copy of it to serve until the origin lists it again.
"""

from typing import Callable, Collection, Mapping, Optional

import attr

from keyring_module.model import StoredKey
from keyring_module.storage.limits import StoreLimits, from_notary


@attr.s(auto_attribs=True, frozen=True, slots=True)
class StoredCopy:
    """One stored response of a server, as the bounds see it (without its bytes).

    Attributes:
        valid_until_ts: the response's ``valid_until_ts``.
        fetched_ts: when it was last stored.
        source: who it was last stored from (``origin`` or ``notary:<name>``).
        size: the length of its JSON bytes.
    """

    valid_until_ts: int
    fetched_ts: int
    source: str
    size: int

    @property
    def from_notary(self) -> bool:
        """Whether the copy counts toward the notaries' share of the bounds."""
        return from_notary(self.source)


def usable_until(key: StoredKey) -> int:
    """Until when a key verifies anything: an old key's ``expired_ts``, else the
    ``valid_until_ts`` of its newest copy."""
    return key.valid_until_ts if key.expired_ts is None else key.expired_ts


@attr.s(auto_attribs=True, slots=True)
class _Totals:
    """What a set of copies holds: all of them, and those from notaries."""

    count: int = 0
    size: int = 0
    notary_count: int = 0
    notary_size: int = 0

    @staticmethod
    def of(copies: Mapping[str, StoredCopy]) -> "_Totals":
        totals = _Totals()
        for copy in copies.values():
            totals.add(copy, 1)
        return totals

    def add(self, copy: StoredCopy, sign: int) -> None:
        self.count += sign
        self.size += sign * copy.size
        if copy.from_notary:
            self.notary_count += sign
            self.notary_size += sign * copy.size

    def notaries_within(self, limits: StoreLimits) -> bool:
        return limits.holds(
            self.notary_count, self.notary_size, self.notary_count, self.notary_size
        )

    def within(self, limits: StoreLimits) -> bool:
        return limits.holds(self.count, self.size, self.notary_count, self.notary_size)


def keep_within(
    copies: Mapping[str, StoredCopy],
    keep: str,
    keys: Mapping[str, StoredKey],
    pinned: Collection[str],
    source: str,
    now: int,
    limits: StoreLimits,
) -> Optional[dict[str, StoredCopy]]:
    """The copies to keep after a store so that the server is within its bounds.

    Args:
        copies: the copies the server's rows point at after the store, the stored
            response's included (if anything points at it).
        keep: the id of the response being stored; never dropped.
        keys: the server's readable key rows after the store.
        pinned: copies of rows that cannot be read back; they count as serving
            keys that are still valid.
        source: where the stored response comes from; a notary's may drop only
            first-seen copies and copies from notaries.
        now: the fetch time, against which keys have expired.
        limits: the bounds.

    Returns:
        ``copies`` less the dropped ones (see the module docstring), or None when the
        bounds cannot hold without dropping ``keep`` or what ``source`` may not drop.

    Example:
        >>> limits = StoreLimits(max_keys=9, max_responses=2, max_conflicts=0)
        >>> def key(key_id, response_id, valid_until_ts):
        ...     return StoredKey("a.example", key_id, bytes(32), valid_until_ts, None, 1,
        ...                      "origin", response_id)
        >>> copies = {rid: StoredCopy(ts, 1, "origin", 100)
        ...           for rid, ts in (("r1", 10), ("r2", 20), ("r3", 30))}
        >>> keys = {"ed25519:a": key("ed25519:a", "r1", 10),
        ...         "ed25519:b": key("ed25519:b", "r2", 20),
        ...         "ed25519:c": key("ed25519:c", "r3", 30)}
        >>> sorted(keep_within(copies, "r3", keys, (), "origin", 15, limits))
        ['r2', 'r3']
        >>> keep_within(copies, "r3", keys, (), "notary:n", 15, limits) is None
        True
    """
    totals = _Totals.of(copies)
    if totals.within(limits):
        return dict(copies)
    newest: dict[str, list[StoredKey]] = {}
    for key in keys.values():
        newest.setdefault(key.response_id, []).append(key)

    def rank(response_id: str) -> tuple[int, int, str]:
        copy = copies[response_id]
        serving = newest.get(response_id, [])
        if not serving and response_id not in pinned:
            return (1, copy.valid_until_ts, response_id)
        if serving and response_id not in pinned:
            ends = [usable_until(key) for key in serving]
            if max(ends) < now:
                return (2, max(ends), response_id)
        return (3 if copy.from_notary else 4, copy.valid_until_ts, response_id)

    ranked = sorted(rank(response_id) for response_id in copies if response_id != keep)
    droppable = [
        response_id
        for kind, _, response_id in ranked
        if not from_notary(source) or kind == 1 or copies[response_id].from_notary
    ]
    kept = dict(copies)

    def drop_while(broken: Callable[[], bool], order: list[str]) -> None:
        for response_id in order:
            if not broken():
                return
            if response_id in kept:
                totals.add(kept.pop(response_id), -1)

    # The notaries' share first (dropping only their copies), then the whole bound.
    drop_while(
        lambda: not totals.notaries_within(limits),
        [response_id for response_id in droppable if copies[response_id].from_notary],
    )
    drop_while(lambda: not totals.within(limits), droppable)
    return kept if totals.within(limits) else None
