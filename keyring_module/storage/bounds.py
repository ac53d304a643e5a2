"""Per-server bounds: how much one server can make the key store hold.

An origin that uses a new key id on every fetch, or re-keys thousands of
``old_verify_keys`` on every forced refetch, must not grow the store (or every answer
about it) without bound; a lying trusted notary must not be able to fill a server's
bounds so that the origin's own keys are refused. :func:`store_response` applies the
store-merge rule (:func:`~keyring_module.storage.merge.merge_server_keys`) within the
bounds of :class:`~keyring_module.storage.limits.StoreLimits`
(``database.max_keys_per_server``, ``max_responses_per_server``,
``max_response_bytes_per_server``, ``max_conflicts_per_server``). Every backend stores
through it, so they all follow the same rules (a property test compares them).

* **keys** are never given up: a key id not stored yet is refused once the server has
  ``max_keys`` key rows, or, for a response from a notary, once it has ``max_keys // 2``
  rows learned from notaries (in key id order within one response). So notaries can
  never take the room the origin's own new keys need;
* **responses**: the server's stored responses are the newest and the first-seen copy
  of each key id (:mod:`~keyring_module.storage.merge`), bounded in number and bytes,
  with notaries' copies in at most half (:mod:`~keyring_module.storage.copies`). Only the
  newest copies are served, so they come first: at a bound, first-seen copies are
  dropped, then copies of long expired keys, then notaries' copies, and (for a response
  from the origin) the origin's oldest copies, never the response being stored. A server
  that regenerates its key on every restart therefore keeps having its latest key
  stored and served, however often it restarts. A response is refused whole only when
  it cannot fit even so (from the origin: when it alone is bigger than
  ``max_response_bytes``; from a notary: also when the origin's copies fill the rest):
  then no row changes (an override included) and its conflicts are reported against
  the stored keys;
* **conflicts** are recorded once per (server, key id, rejected key bytes), and only
  while the server has fewer than ``max_conflicts`` records: the oldest records stay
  (:func:`record_within_cap`). Every conflict found is still returned (for the logs and
  the metric).

A hostile origin at a bound only hurts itself: its new key ids are refused once it has
``max_keys`` of them, and its answers push out its own older copies. A server holds at
most ``max_responses`` responses of at most ``max_response_bytes`` in all, and an "all
keys" answer about it holds at most that many.
"""

from typing import Callable, Collection, Iterable, Mapping, TypeVar

import attr

from keyring_module.model import KeyConflict, ServerKeysResponse, StoredKey
from keyring_module.storage.copies import StoredCopy, keep_within
from keyring_module.storage.limits import DEFAULT_STORE_LIMITS, StoreLimits
from keyring_module.storage.merge import MergedKeys, key_entries, merge_server_keys

__all__ = [
    "DEFAULT_STORE_LIMITS",
    "StoreLimits",
    "StoreOutcome",
    "StoredCopy",
    "StoredServer",
    "conflicts_by_server",
    "record_within_cap",
    "store_response",
]

T = TypeVar("T")


@attr.s(auto_attribs=True, frozen=True, slots=True)
class StoredServer:
    """What the store holds for one server before a write.

    Attributes:
        keys: the readable key rows, by key id.
        first_seen: the first-seen copy of readable keys, by key id (a key left out
            counts its newest copy as its first-seen one).
        unreadable: the key ids of rows that cannot be read back, each with the response
            ids the row still points at (kept until the row is replaced).
        responses: the server's stored responses, by response id. A copy a row points
            at that is not here was dropped at a bound (see
            :mod:`~keyring_module.storage.copies`).
    """

    keys: Mapping[str, StoredKey] = attr.Factory(dict)
    first_seen: Mapping[str, str] = attr.Factory(dict)
    unreadable: Mapping[str, frozenset[str]] = attr.Factory(dict)
    responses: Mapping[str, StoredCopy] = attr.Factory(dict)

    def copies(self) -> frozenset[str]:
        """The stored responses the server's rows point at: its copies."""
        pointed = _pointed_at(self.keys, self.first_seen, self.unreadable.values())
        return pointed.intersection(self.responses)


@attr.s(auto_attribs=True, frozen=True, slots=True)
class StoreOutcome:
    """What storing one response within the bounds does to one server.

    Attributes:
        merged: the key rows after the store, which changed, the conflicts found and
            the key ids refused.
        responses: the server's stored responses after the store, by response id (the
            copies its rows point at, within the bounds).
        dropped: the ids of the server's stored responses to delete: those no row
            points at any more, and those dropped at a bound.
        evicted: the ones of ``dropped`` that a row still points at (dropped at a
            bound).
        stores_response: whether the response's row is to be written (it is a copy
            now, and not an older fetch of a stored one).
        response_refused: whether the response was left out whole because the server's
            bounds cannot hold it.
    """

    merged: MergedKeys
    responses: Mapping[str, StoredCopy]
    dropped: frozenset[str] = frozenset()
    evicted: frozenset[str] = frozenset()
    stores_response: bool = False
    response_refused: bool = False

    @property
    def copies(self) -> frozenset[str]:
        """The ids of the server's stored responses after the store."""
        return frozenset(self.responses)


def store_response(
    stored: StoredServer,
    response: ServerKeysResponse,
    source: str,
    fetched_ts: int,
    replace: Collection[str] = (),
    limits: StoreLimits = DEFAULT_STORE_LIMITS,
) -> StoreOutcome:
    """Apply the store-merge rule to one server within the bounds (module docstring).

    Args:
        stored: the server's rows and stored responses before the store.
        response: the validated response being stored.
        source: where it came from (``origin`` or ``notary:<name>``).
        fetched_ts: when it was fetched.
        replace: key ids for which the response wins over differing stored bytes.
        limits: the bounds.

    Returns:
        The outcome; ``merged.refused`` lists the new key ids left out.

    Example:
        >>> from keyring_module.model import ServerKeysResponse
        >>> def answer(valid_until_ts, *key_ids):
        ...     keys = {key_id: key_id.encode().ljust(32, b".") for key_id in key_ids}
        ...     json_bytes = b'{"v": %d}' % valid_until_ts
        ...     return ServerKeysResponse("a.example", valid_until_ts, keys, {}, json_bytes)
        >>> limits = StoreLimits(max_keys=3, max_responses=2, max_conflicts=10)
        >>> def store(stored, response, source="origin"):
        ...     return store_response(stored, response, source, 1500, limits=limits)
        >>> def after(outcome):
        ...     return StoredServer(outcome.merged.keys, outcome.merged.first_seen,
        ...                         responses=outcome.responses)
        >>> first = store(StoredServer(), answer(1000, "ed25519:a"))
        >>> newer = store(after(first), answer(2000, "ed25519:a"))
        >>> len(newer.copies)  # the first-seen and the newest copy of ed25519:a
        2
        >>> rotated = store(after(newer), answer(3000, "ed25519:b"))
        >>> rotated.merged.written, len(rotated.copies), len(rotated.evicted)  # first-seen out
        (('ed25519:b',), 2, 1)
        >>> notary = store(after(rotated), answer(4000, "ed25519:n"), "notary:n")
        >>> notary.response_refused, notary.merged.refused  # the origin's copies fill it
        (True, ('ed25519:n',))
    """
    room = limits.new_key_room(stored.keys, len(stored.unreadable), source)
    merged = merge_server_keys(
        stored.keys,
        response,
        source,
        fetched_ts,
        replace,
        first_seen=stored.first_seen,
        unreadable=stored.unreadable.keys(),
        new_key_room=room,
    )
    unreadable = [refs for key_id, refs in stored.unreadable.items() if key_id not in merged.keys]
    pointed = _pointed_at(merged.keys, merged.first_seen, unreadable)
    copies = {rid: copy for rid, copy in stored.responses.items() if rid in pointed}
    response_id = response.response_id
    earlier = stored.responses.get(response_id)
    stores_response = response_id in pointed and (
        earlier is None or earlier.fetched_ts <= fetched_ts
    )
    if stores_response:
        copies[response_id] = StoredCopy(
            response.valid_until_ts, fetched_ts, source, len(response.json_bytes)
        )
    pinned = frozenset(rid for refs in unreadable for rid in refs)
    kept = keep_within(copies, response_id, merged.keys, pinned, source, fetched_ts, limits)
    if kept is not None:
        return StoreOutcome(
            merged,
            kept,
            dropped=frozenset(stored.responses).difference(kept),
            evicted=frozenset(copies).difference(kept),
            stores_response=stores_response,
        )
    # Not stored at all: the conflicts are those of a response that changes nothing,
    # i.e. those found, with an override's sides turned back.
    nothing = MergedKeys(
        keys=dict(stored.keys),
        first_seen={
            key_id: stored.first_seen.get(key_id, key.response_id)
            for key_id, key in stored.keys.items()
        },
        written=(),
        conflicts=tuple(_not_replaced(c) if c.key_id in replace else c for c in merged.conflicts),
        refused=tuple(sorted(k for k in key_entries(response) if k not in stored.keys)),
    )
    return StoreOutcome(nothing, dict(stored.responses), response_refused=True)


def _not_replaced(conflict: KeyConflict) -> KeyConflict:
    """The conflict of an override (the new key kept) as if the stored key had stayed."""
    return attr.evolve(
        conflict,
        kept_key_bytes=conflict.rejected_key_bytes,
        kept_source=conflict.rejected_source,
        rejected_key_bytes=conflict.kept_key_bytes,
        rejected_source=conflict.kept_source,
    )


def record_within_cap(
    conflicts: Iterable[T],
    recorded: int,
    max_conflicts: int,
    insert: Callable[[T], bool],
) -> int:
    """Record conflicts in order while the server has fewer than ``max_conflicts``.

    Args:
        conflicts: the conflicts of one server to record.
        recorded: how many conflict records the server has now.
        max_conflicts: the bound.
        insert: records one conflict; returns False when it was recorded already
            (same server, key id and rejected key bytes), which takes no room.

    Returns:
        How many new records were made.

    Example:
        >>> seen = set()
        >>> def insert(c):
        ...     new = c not in seen
        ...     seen.add(c)
        ...     return new
        >>> record_within_cap(["a", "a", "b", "c"], recorded=0, max_conflicts=2, insert=insert)
        2
        >>> sorted(seen)
        ['a', 'b']
    """
    made = 0
    for conflict in conflicts:
        if recorded + made >= max_conflicts:
            break
        if insert(conflict):
            made += 1
    return made


def conflicts_by_server(conflicts: Iterable[KeyConflict]) -> list[tuple[str, list[KeyConflict]]]:
    """Conflicts grouped per server, in server name order (each group in given order).

    Example:
        >>> c = KeyConflict("b.example", "ed25519:k", b"", "origin", b"", "notary:n", 1)
        >>> [(name, len(group)) for name, group in conflicts_by_server([c, c])]
        [('b.example', 2)]
    """
    groups: dict[str, list[KeyConflict]] = {}
    for conflict in conflicts:
        groups.setdefault(conflict.server_name, []).append(conflict)
    return sorted(groups.items())


def _pointed_at(
    keys: Mapping[str, StoredKey],
    first_seen: Mapping[str, str],
    unreadable_refs: Iterable[frozenset[str]],
) -> frozenset[str]:
    """The response ids the rows point at (newest and first-seen copies), stored or not."""
    copies = {key.response_id for key in keys.values()}
    copies.update(first_seen.get(key_id, key.response_id) for key_id, key in keys.items())
    for refs in unreadable_refs:
        copies.update(refs)
    return frozenset(copies)
