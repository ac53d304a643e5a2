"""What a notary query asks: :class:`ServerQuery` per server, and the normalised form
that whole cached answers are kept under.

Two requests that ask the same thing share one cached answer. So the answer cache is
keyed by what was asked, never by the request's bytes: the order of servers and of key
ids, the whitespace of a POST body, query parameters we do not know and the
``minimum_valid_until_ts`` values make no new entry. The key holds only parsed server
names and key ids, in a fixed order (servers sorted, then key ids sorted)::

    >>> asked = normalise_queries([
    ...     ServerQuery("b.example", {"ed25519:2": 5, "ed25519:1": None}),
    ...     ServerQuery("a.example", all_keys_minimum=7),
    ... ])
    >>> asked.key
    (('a.example', (), None), ('b.example', ('ed25519:1', 'ed25519:2'), None))
    >>> asked.minimums  # per server of the key: the highest minimum given (None: none)
    (7, 5)

The minimums stay out of the key: a cached answer instead records, per server, the
highest minimum it meets (the earliest ``valid_until_ts`` of the keys it was judged
by), and answers a later query only if none of that query's minimums is higher.

The notary answers questions about itself from its own keys whatever key ids they name,
so given its own name, that server's part of the key is the name alone: junk key ids
make no new entry::

    >>> normalise_queries(
    ...     [ServerQuery("notary.example", {"ed25519:junk1": None})],
    ...     own_server_name="notary.example",
    ... ).key
    (('notary.example', (), None),)
"""

from operator import attrgetter
from typing import Mapping, Optional, Sequence

import attr

#: One server of an answer key: (server name, sorted key ids or () for all keys,
#: the deprecated form's preferred key id or None).
ServerKey = tuple[str, tuple[str, ...], Optional[str]]
#: What a query asks, normalised: one :data:`ServerKey` per server, sorted by name.
AnswerKey = tuple[ServerKey, ...]

# What the objects of a query hold in memory besides the characters of its names
# (figures measured with tracemalloc, rounded up): per server of an answer key (its
# tuples and string objects); per server of a normalised query besides its key (the
# ServerQuery and its criteria dict); per key id asked (its string and dict slot); and
# per normalised query (the object and its three tuples).
ANSWER_KEY_BYTES_PER_SERVER = 150
QUERY_BYTES_PER_SERVER = 250
QUERY_BYTES_PER_KEY_ID = 64
NORMALISED_QUERY_BYTES = 300


def answer_key_bytes(key: AnswerKey) -> int:
    """About how many bytes an answer key holds.

    Example:
        >>> answer_key_bytes((("a.example", ("ed25519:1",), None),))
        168
    """
    names = sum(len(server) + sum(map(len, key_ids)) for server, key_ids, _ in key)
    return names + ANSWER_KEY_BYTES_PER_SERVER * len(key)


@attr.s(auto_attribs=True, frozen=True, slots=True)
class ServerQuery:
    """What one server's entry of a notary query asks for.

    Attributes:
        server_name: the server whose keys are wanted.
        key_criteria: key id -> ``minimum_valid_until_ts`` (None when not given). Empty
            means "all keys", judged with ``all_keys_minimum``.
        all_keys_minimum: the minimum of an all-keys query (None when not given).
        preferred_key_id: the deprecated ``GET /query/{server}/{keyId}`` form: all keys
            are answered, and responses holding this key come first.
    """

    server_name: str
    key_criteria: Mapping[str, Optional[int]] = attr.ib(factory=dict)
    all_keys_minimum: Optional[int] = None
    preferred_key_id: Optional[str] = None

    def highest_minimum(self) -> Optional[int]:
        """The highest ``minimum_valid_until_ts`` this query gives (None if it gives none).

        Example:
            >>> ServerQuery("a.example", {"ed25519:1": 5, "ed25519:2": None}).highest_minimum()
            5
        """
        given = [m for m in self.key_criteria.values() if m is not None]
        if self.all_keys_minimum is not None:
            given.append(self.all_keys_minimum)
        return max(given) if given else None


@attr.s(auto_attribs=True, frozen=True, slots=True)
class NormalisedQuery:
    """A whole query in its normal form.

    Attributes:
        queries: the per-server queries, sorted by server name (the answer's order).
        key: what is asked (no minimums), the answer cache's key.
        minimums: per server of ``key``, its highest minimum (None when none is given).
    """

    queries: tuple[ServerQuery, ...]
    key: AnswerKey
    minimums: tuple[Optional[int], ...]

    def held_bytes(self) -> int:
        """About how many bytes this object holds, parsed queries included.

        Example:
            >>> normalise_queries([ServerQuery("a.example", {"ed25519:1": 5})]).held_bytes()
            782
        """
        key_ids = sum(len(q.key_criteria) for q in self.queries)
        return (
            answer_key_bytes(self.key)
            + NORMALISED_QUERY_BYTES
            + QUERY_BYTES_PER_SERVER * len(self.queries)
            + QUERY_BYTES_PER_KEY_ID * key_ids
        )


_by_server_name = attrgetter("server_name")


def normalise_queries(
    queries: Sequence[ServerQuery], own_server_name: Optional[str] = None
) -> NormalisedQuery:
    """Put a query in its normal form (see the module docstring).

    It runs for every notary request whose body was not seen lately, so it is one plain
    loop.

    Args:
        queries: one per server.
        own_server_name: the notary's own name: what is asked about it does not change
            its answer, so its part of the key is the name alone.
    """
    ordered = sorted(queries, key=_by_server_name)
    key: list[ServerKey] = []
    minimums: list[Optional[int]] = []
    for q in ordered:
        if q.server_name == own_server_name:
            key.append((q.server_name, (), None))
        else:
            key.append((q.server_name, tuple(sorted(q.key_criteria)), q.preferred_key_id))
        minimums.append(q.highest_minimum())
    return NormalisedQuery(tuple(ordered), tuple(key), tuple(minimums))
