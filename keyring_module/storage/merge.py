"""The store-merge rule: what storing one response does to one server's key rows.

:func:`merge_server_keys` is the rule, written once in Python and free of I/O.
:class:`~keyring_module.storage.memory.InMemoryKeyStore` stores with it, and the trust
policy folds it over a round's accepted answers to see the outcome before anything is
stored (:func:`keyring_module.fetchers.trust.project_keys`). The SQL store
(:mod:`keyring_module.storage.sql`) applies the same function to the rows it reads under
a per-server write lock, so that it stays atomic across processes sharing one database,
and writes back the rows that changed; a property test drives both stores with the same
random calls and compares what they hold.

The rule, for each key id of the response (``verify_keys`` and ``old_verify_keys``; a
current key wins over an old one with the same id, see :func:`key_entries`):

* **new key id** (or a stored row that cannot be read back): the response's key is
  stored;
* **other bytes** than the stored key: a conflict. The first-seen key stays, unless the
  key id is in ``replace`` (a direct fetch overriding a provisional, notary-provided
  key): then the response's key replaces the row, and the conflict names it as the kept
  side and the old key as the rejected one (:func:`store_conflict`);
* **same bytes**: the row is re-pointed at the response when the response is not older
  (:func:`is_not_older`), so a key follows its newest copy and a replayed old fetch
  changes nothing.

Keys the response does not list are never touched: a key the origin stops listing is
never forgotten.

Each key row points at two copies of its key: the **newest** response listing it (the
one the notary serves) and the **first-seen** one, the response in which its kept bytes
were first stored (kept as evidence of where the key came from; a replaced key's
first-seen copy is the replacing response). A server's stored responses are exactly the
copies its key rows point at; every other response of the server is deleted.

The per-server bounds on what storing may add (keys, responses, conflict records) are
applied on top of this rule by :mod:`keyring_module.storage.bounds`; the trust
projection (:func:`keyring_module.fetchers.trust.project_keys`) folds
:func:`merge_server_keys` within the same key bounds
(:meth:`keyring_module.storage.limits.StoreLimits.new_key_room`).
"""

from typing import Collection, Mapping, Optional

import attr

from keyring_module.model import KeyConflict, ServerKeysResponse, StoredKey


@attr.s(auto_attribs=True, frozen=True, slots=True)
class MergedKeys:
    """The outcome of storing one response over one server's key rows.

    Attributes:
        keys: every readable key row of the server after the store, by key id.
        first_seen: the response id of each key's first-seen copy, for every key of
            ``keys``.
        written: the key ids whose row was inserted or changed, in key id order.
        conflicts: the conflicts found, in key id order (each one is recorded once per
            (server, key id, rejected key bytes) by the store).
        refused: new key ids left out because ``new_key_room`` ran out, in key id order.
    """

    keys: dict[str, StoredKey]
    first_seen: dict[str, str]
    written: tuple[str, ...]
    conflicts: tuple[KeyConflict, ...]
    refused: tuple[str, ...] = ()


def merge_server_keys(
    stored: Mapping[str, StoredKey],
    response: ServerKeysResponse,
    source: str,
    fetched_ts: int,
    replace: Collection[str] = (),
    *,
    first_seen: Optional[Mapping[str, str]] = None,
    unreadable: Collection[str] = (),
    new_key_room: Optional[int] = None,
) -> MergedKeys:
    """Apply the store-merge rule (see the module docstring) to one server's key rows.

    Args:
        stored: the server's readable key rows before the store, by key id. Leave out
            rows that cannot be read back: a key id missing here is written anew, which
            is how a corrupt row gets replaced.
        response: the validated response being stored (its ``server_name`` is the
            server of ``stored``).
        source: where it came from (``origin`` or ``notary:<name>``).
        fetched_ts: when it was fetched; also the ``seen_ts`` of the conflicts found.
        replace: key ids for which the response wins over differing stored bytes.
        first_seen: the first-seen copy of stored keys, by key id; a key left out
            (e.g. a row written before first-seen copies were kept) counts its newest
            copy as its first-seen one.
        unreadable: key ids of rows that cannot be read back; writing one of them
            replaces a row, so it needs no ``new_key_room``.
        new_key_room: how many key ids not stored yet may be added (None: any number);
            the others are refused, in key id order.

    Returns:
        The key rows after the store, which of them changed, the conflicts, and the
        refused key ids.

    Example:
        >>> from keyring_module.model import ServerKeysResponse
        >>> def answer(key_bytes, valid_until_ts, key_id="ed25519:k"):
        ...     return ServerKeysResponse(
        ...         "a.example", valid_until_ts, {key_id: key_bytes}, {},
        ...         b'{"v": %d}' % valid_until_ts)
        >>> first = merge_server_keys({}, answer(b"A" * 32, 1000), "notary:n.example", 10)
        >>> first.written
        ('ed25519:k',)
        >>> other = merge_server_keys(first.keys, answer(b"B" * 32, 2000), "origin", 20)
        >>> other.keys["ed25519:k"].verify_key_bytes == b"A" * 32, other.written
        (True, ())
        >>> other.conflicts[0].kept_source, other.conflicts[0].rejected_source
        ('notary:n.example', 'origin')
        >>> confirmed = merge_server_keys(
        ...     first.keys, answer(b"B" * 32, 2000), "origin", 20, replace={"ed25519:k"})
        >>> confirmed.keys["ed25519:k"].source, confirmed.conflicts[0].kept_source
        ('origin', 'origin')
        >>> newer = merge_server_keys(first.keys, answer(b"A" * 32, 3000), "origin", 30)
        >>> newer.first_seen["ed25519:k"] == answer(b"A" * 32, 1000).response_id
        True
        >>> full = merge_server_keys(
        ...     first.keys, answer(b"C" * 32, 3000, "ed25519:n"), "origin", 30, new_key_room=0)
        >>> full.refused, sorted(full.keys)
        (('ed25519:n',), ['ed25519:k'])
    """
    server_name = response.server_name
    response_id = response.response_id
    keys = dict(stored)
    firsts = {
        key_id: (first_seen or {}).get(key_id, key.response_id) for key_id, key in stored.items()
    }
    room = new_key_room
    written: list[str] = []
    conflicts: list[KeyConflict] = []
    refused: list[str] = []
    for key_id, (key_bytes, expired_ts) in sorted(key_entries(response).items()):
        current = keys.get(key_id)
        if current is None and key_id not in unreadable and room is not None:
            if room <= 0:
                refused.append(key_id)
                continue
            room -= 1
        if current is not None and current.verify_key_bytes != key_bytes:
            conflicts.append(
                store_conflict(
                    server_name,
                    key_id,
                    (current.verify_key_bytes, current.source),
                    (key_bytes, source),
                    fetched_ts,
                    replace=key_id in replace,
                )
            )
            if key_id not in replace:
                continue
            current = None  # the replacing bytes are first seen now
        elif current is not None and not is_not_older(
            current.valid_until_ts, current.fetched_ts, response.valid_until_ts, fetched_ts
        ):
            continue
        keys[key_id] = StoredKey(
            server_name=server_name,
            key_id=key_id,
            verify_key_bytes=key_bytes,
            valid_until_ts=response.valid_until_ts,
            expired_ts=expired_ts,
            fetched_ts=fetched_ts,
            source=source,
            response_id=response_id,
        )
        if current is None:
            firsts[key_id] = response_id
        written.append(key_id)
    return MergedKeys(keys, firsts, tuple(written), tuple(conflicts), tuple(refused))


def key_entries(response: ServerKeysResponse) -> dict[str, tuple[bytes, Optional[int]]]:
    """The keys of a response as ``{key_id: (key_bytes, expired_ts)}``.

    ``expired_ts`` is None for ``verify_keys``; a current key wins over an
    ``old_verify_keys`` entry with the same id.
    """
    entries: dict[str, tuple[bytes, Optional[int]]] = {
        key_id: (old.verify_key_bytes, old.expired_ts)
        for key_id, old in response.old_verify_keys.items()
    }
    for key_id, key_bytes in response.verify_keys.items():
        entries[key_id] = (key_bytes, None)
    return entries


def is_not_older(
    stored_valid_until_ts: int, stored_fetched_ts: int, valid_until_ts: int, fetched_ts: int
) -> bool:
    """Whether a key row may be re-pointed at a response with the given timestamps.

    Yes when the new ``valid_until_ts`` is not older than the stored one; on a tie, when
    it was not fetched earlier (so replaying an old fetch never moves ``fetched_ts`` back).

    Example:
        >>> is_not_older(1000, 10, 2000, 5), is_not_older(1000, 10, 1000, 10)
        (True, True)
        >>> is_not_older(2000, 10, 1000, 20), is_not_older(1000, 10, 1000, 5)
        (False, False)
    """
    if valid_until_ts != stored_valid_until_ts:
        return valid_until_ts > stored_valid_until_ts
    return fetched_ts >= stored_fetched_ts


def store_conflict(
    server_name: str,
    key_id: str,
    stored: tuple[bytes, str],
    new: tuple[bytes, str],
    seen_ts: int,
    replace: bool,
) -> KeyConflict:
    """The conflict of storing ``new`` key bytes over differing ``stored`` ones.

    Args:
        server_name: the server of the key.
        key_id: the key id.
        stored: ``(key bytes, source)`` of the stored key row.
        new: ``(key bytes, source)`` of the key in the response being stored.
        seen_ts: when the conflict was seen (the response's ``fetched_ts``).
        replace: whether the new key overrides the stored one
            (``store_server_keys(replace=...)``); then the new key is the kept side.
    """
    kept, rejected = (new, stored) if replace else (stored, new)
    return KeyConflict(
        server_name=server_name,
        key_id=key_id,
        kept_key_bytes=kept[0],
        kept_source=kept[1],
        rejected_key_bytes=rejected[0],
        rejected_source=rejected[1],
        seen_ts=seen_ts,
    )
