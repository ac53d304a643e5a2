"""Per-server bounds: how much one server can make the key store hold.

An origin that uses a new key id on every fetch, or re-keys thousands of
``old_verify_keys`` on every forced refetch, must not grow the store (or every answer
about it) without bound. :func:`store_response` applies the store-merge rule
(:func:`~keyring_module.storage.merge.merge_server_keys`) within the bounds of
:class:`StoreLimits` (``database.max_keys_per_server``, ``max_responses_per_server``,
``max_conflicts_per_server``). Every backend stores through it, so they all follow the
same rules (a property test compares them).

Nothing stored is ever given up for something new; at a bound, the new things are
refused:

* **keys**: a key id not stored yet is refused once the server has ``max_keys`` key
  rows (in key id order within one response);
* **responses**: a server's stored responses are the copies its key rows point at, the
  newest and the first-seen copy of each key id (see :mod:`~keyring_module.storage.merge`).
  When storing a response would leave more than ``max_responses`` of them, and more than
  before, the response's new key ids are refused; if that is still too many, the
  response is not stored at all: no row changes (an override included) and its
  conflicts are reported against the stored keys. So the newest and the first-seen
  copy of every stored key id stay;
* **conflicts** are recorded once per (server, key id, rejected key bytes), and only
  while the server has fewer than ``max_conflicts`` records: the oldest records stay
  (:func:`record_within_cap`). Every conflict found is still returned (for the logs and
  the metric).

A hostile origin at a bound only hurts itself: its new keys are not learned, while
"first seen wins" and "never forget" still hold for everything stored. A server holds at
most ``max_responses`` responses of at most ``federation.max_response_size`` each, and
an "all keys" answer about it holds at most that many.

The price: a server that lists its old keys in ``old_verify_keys`` needs one stored
response per key change plus one (each key's first-seen copy, and the newest), one that
does not list them up to two per key change. At the response bound its keys may also
stop being refreshed (a newer copy that would add a stored response is refused), so the
defaults are far above how often real servers change keys.
"""

from typing import Callable, Collection, Iterable, Mapping, TypeVar

import attr

from keyring_module.config import DatabaseConfig
from keyring_module.model import KeyConflict, ServerKeysResponse, StoredKey
from keyring_module.storage.merge import MergedKeys, merge_server_keys

T = TypeVar("T")


@attr.s(auto_attribs=True, frozen=True, slots=True)
class StoreLimits:
    """How much one server may hold in the store.

    Attributes:
        max_keys: key rows (key ids) per server.
        max_responses: stored responses per server (at least 2: a key's first-seen and
            newest copy).
        max_conflicts: conflict records per server.
    """

    max_keys: int
    max_responses: int
    max_conflicts: int

    @staticmethod
    def from_config(config: DatabaseConfig) -> "StoreLimits":
        """The limits of the ``database:`` section.

        Example:
            >>> StoreLimits.from_config(DatabaseConfig(max_keys_per_server=5)).max_keys
            5
        """
        return StoreLimits(
            max_keys=config.max_keys_per_server,
            max_responses=config.max_responses_per_server,
            max_conflicts=config.max_conflicts_per_server,
        )


#: The limits of a default ``database:`` section.
DEFAULT_STORE_LIMITS = StoreLimits.from_config(DatabaseConfig())


@attr.s(auto_attribs=True, frozen=True, slots=True)
class StoredServer:
    """What the store holds for one server before a write.

    Attributes:
        keys: the readable key rows, by key id.
        first_seen: the first-seen copy of readable keys, by key id (a key left out
            counts its newest copy as its first-seen one).
        unreadable: the key ids of rows that cannot be read back, each with the response
            ids the row still points at (kept until the row is replaced).
    """

    keys: Mapping[str, StoredKey] = attr.Factory(dict)
    first_seen: Mapping[str, str] = attr.Factory(dict)
    unreadable: Mapping[str, frozenset[str]] = attr.Factory(dict)

    def copies(self) -> frozenset[str]:
        """The response ids the server's rows point at: its stored responses."""
        return _copies(self.keys, self.first_seen, self.unreadable.values())


@attr.s(auto_attribs=True, frozen=True, slots=True)
class StoreOutcome:
    """What storing one response within the bounds does to one server.

    Attributes:
        merged: the key rows after the store, which changed, the conflicts found and
            the key ids refused.
        copies: the response ids the server's rows point at after the store; the
            server's other responses are deleted.
        response_refused: whether the response was left out whole because the server
            has too many stored responses.
    """

    merged: MergedKeys
    copies: frozenset[str]
    response_refused: bool = False


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
        stored: the server's rows before the store.
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
        >>> limits = StoreLimits(max_keys=10, max_responses=2, max_conflicts=10)
        >>> def store(stored, response):
        ...     return store_response(stored, response, "origin", 1, limits=limits)
        >>> def after(outcome):
        ...     return StoredServer(outcome.merged.keys, outcome.merged.first_seen)
        >>> first = store(StoredServer(), answer(1000, "ed25519:a", "ed25519:b"))
        >>> newer = store(after(first), answer(2000, "ed25519:a", "ed25519:b"))
        >>> len(newer.copies)  # the first-seen and the newest copy of both keys
        2
        >>> only_new = store(after(newer), answer(3000, "ed25519:c"))
        >>> only_new.merged.refused, only_new.merged.written, only_new.response_refused
        (('ed25519:c',), (), False)
        >>> subset = store(after(newer), answer(3000, "ed25519:a", "ed25519:c"))
        >>> subset.merged.refused, subset.merged.written, subset.response_refused
        (('ed25519:c',), (), True)
    """
    before = len(stored.copies())

    def merge(replace: Collection[str], new_key_room: int) -> StoreOutcome:
        merged = merge_server_keys(
            stored.keys,
            response,
            source,
            fetched_ts,
            replace,
            first_seen=stored.first_seen,
            unreadable=stored.unreadable.keys(),
            new_key_room=new_key_room,
        )
        still_unreadable = (
            refs for key_id, refs in stored.unreadable.items() if key_id not in merged.keys
        )
        return StoreOutcome(merged, _copies(merged.keys, merged.first_seen, still_unreadable))

    def fits(outcome: StoreOutcome) -> bool:
        return len(outcome.copies) <= max(limits.max_responses, before)

    room = max(0, limits.max_keys - len(stored.keys) - len(stored.unreadable))
    outcome = merge(replace, room)
    if fits(outcome):
        return outcome
    without_new = merge(replace, 0)
    if fits(without_new):  # every new key id of the response refused
        return without_new
    # Not stored at all: the conflicts are those of a response that changes nothing.
    nothing = MergedKeys(
        keys=dict(stored.keys),
        first_seen={
            key_id: stored.first_seen.get(key_id, key.response_id)
            for key_id, key in stored.keys.items()
        },
        written=(),
        conflicts=merge((), 0).merged.conflicts,
        refused=without_new.merged.refused,
    )
    return StoreOutcome(nothing, stored.copies(), response_refused=True)


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


def _copies(
    keys: Mapping[str, StoredKey],
    first_seen: Mapping[str, str],
    unreadable_refs: Iterable[frozenset[str]],
) -> frozenset[str]:
    copies = {key.response_id for key in keys.values()}
    copies.update(first_seen.get(key_id, key.response_id) for key_id, key in keys.items())
    for refs in unreadable_refs:
        copies.update(refs)
    return frozenset(copies)
