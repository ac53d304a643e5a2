"""When the notary may answer from its store: pure policy, no I/O and no clock.

Per stored key asked about, given the query's ``minimum_valid_until_ts`` (if any):

1. a minimum was given and the stored ``valid_until_ts >= minimum``: answer at once
   (:attr:`Verdict.FRESH`); past half of the entry's lifetime
   (``now >= fetched + (valid_until - fetched) / 2``) also refresh it in the background
   (:attr:`Verdict.REFRESH`);
2. no minimum: the minimum is *now*, and the entry must also be before its half-life;
   otherwise fetch first;
3. otherwise, or with nothing stored, fetch first (:attr:`Verdict.FETCH`).

A query about several keys gets the worst verdict of its keys; an "all keys" query is
judged by the best current key stored::

    verdict = judge_query(query, stored_keys, now_ms)
    if verdict is Verdict.FETCH:
        ...  # fetch (bounded by the request timeout), then answer, stale if need be
"""

import enum
from collections.abc import Mapping
from typing import Optional, Protocol

from keyring_module.model import StoredKey


class Verdict(enum.Enum):
    """Whether stored keys answer a query as they are.

    Example:
        >>> Verdict.REFRESH.value
        'refresh'
    """

    #: Answer from the store.
    FRESH = "fresh"
    #: Answer from the store now, and refresh it in the background.
    REFRESH = "refresh"
    #: Fetch first, then answer (from the last stored copy if the fetch fails).
    FETCH = "fetch"


class JudgedQuery(Protocol):
    """What a verdict reads of a query
    (:class:`~keyring_module.notary.service.ServerQuery` is one)."""

    @property
    def key_criteria(self) -> Mapping[str, Optional[int]]:
        """Key id -> ``minimum_valid_until_ts`` (None when not given); empty for all keys."""

    @property
    def all_keys_minimum(self) -> Optional[int]:
        """The minimum of an all-keys query (None when not given)."""


def half_life_ts(key: StoredKey) -> int:
    """When half of a stored key's lifetime (from fetch to ``valid_until_ts``) is over.

    Example:
        >>> half_life_ts(StoredKey("x", "ed25519:a", b"k" * 32, 3000, None, 1000, "origin", "r"))
        2000
    """
    return key.fetched_ts + (key.valid_until_ts - key.fetched_ts) // 2


def judge_key(key: Optional[StoredKey], minimum: Optional[int], now: int) -> Verdict:
    """Whether a stored key answers a query as it is (see the module docstring).

    Args:
        key: the stored key, None when nothing is stored.
        minimum: the query's ``minimum_valid_until_ts`` for it, None when not given.
        now: the current time (ms).

    Returns:
        The verdict.

    Example:
        >>> key = StoredKey("x", "ed25519:a", b"k" * 32, 3000, None, 1000, "origin", "r")
        >>> judge_key(key, 3000, 1999), judge_key(key, 3000, 2000), judge_key(key, 3001, 0)
        (<Verdict.FRESH: 'fresh'>, <Verdict.REFRESH: 'refresh'>, <Verdict.FETCH: 'fetch'>)
    """
    if key is None:
        return Verdict.FETCH
    before_half_life = now < half_life_ts(key)
    if minimum is None:
        if key.valid_until_ts >= now and before_half_life:
            return Verdict.FRESH
        return Verdict.FETCH
    if key.valid_until_ts >= minimum:
        return Verdict.FRESH if before_half_life else Verdict.REFRESH
    return Verdict.FETCH


def _relevant_keys(query: JudgedQuery, keys: Mapping[str, StoredKey]) -> list[Optional[StoredKey]]:
    """The stored keys a query is judged by: the asked-for ones, or the best current one."""
    if query.key_criteria:
        return [keys.get(k) for k in query.key_criteria]
    current = [k for k in keys.values() if k.expired_ts is None]
    return [max(current, key=lambda k: (k.valid_until_ts, k.fetched_ts), default=None)]


def fresh_until_ms(query: JudgedQuery, keys: Mapping[str, StoredKey]) -> Optional[int]:
    """Until when a :attr:`Verdict.FRESH` verdict holds: the earliest half-life of the
    keys judged (None when none of them is stored)."""
    half_lives = [half_life_ts(k) for k in _relevant_keys(query, keys) if k is not None]
    return min(half_lives) if half_lives else None


def met_minimum(query: JudgedQuery, keys: Mapping[str, StoredKey]) -> Optional[int]:
    """The highest ``minimum_valid_until_ts`` the stored keys meet for this query: the
    earliest ``valid_until_ts`` of the keys judged (None when none of them is stored).

    While :func:`fresh_until_ms` has not passed, a :attr:`Verdict.FRESH` verdict holds
    for the same query with any minimums up to this.

    Example:
        >>> from keyring_module.notary.query import ServerQuery
        >>> a = StoredKey("x", "ed25519:a", b"k" * 32, 3000, None, 1000, "origin", "r")
        >>> b = StoredKey("x", "ed25519:b", b"k" * 32, 5000, None, 1000, "origin", "r")
        >>> keys = {"ed25519:a": a, "ed25519:b": b}
        >>> met_minimum(ServerQuery("x"), keys)  # all keys: judged by the best current one
        5000
        >>> met_minimum(ServerQuery("x", {"ed25519:a": None, "ed25519:b": None}), keys)
        3000
    """
    valid_until = [k.valid_until_ts for k in _relevant_keys(query, keys) if k is not None]
    return min(valid_until) if valid_until else None


#: Verdicts from worst to best: a query gets the worst verdict of its keys.
_WORST_FIRST = (Verdict.FETCH, Verdict.REFRESH, Verdict.FRESH)


def judge_query(query: JudgedQuery, keys: Mapping[str, StoredKey], now: int) -> Verdict:
    """Combine the verdicts of every key a query asks about: the worst one wins.

    Args:
        query: the query about one server.
        keys: that server's stored keys, by key id.
        now: the current time (ms).

    Returns:
        The verdict for the whole query.
    """
    if query.key_criteria:
        verdicts = {judge_key(keys.get(k), m, now) for k, m in query.key_criteria.items()}
    else:
        (best,) = _relevant_keys(query, keys)
        verdicts = {judge_key(best, query.all_keys_minimum, now)}
    return next(v for v in _WORST_FIRST if v in verdicts)
