"""What lets a key write drop only the cached answers it affects.

The notary keeps whole answers (:class:`~keyring_module.notary.caches.AnswerCache`),
each under the normalised query it answers; a query may name one server (a GET) or
thousands (a POST). When a server's keys change, the answers naming it must go, and
the others may stay:

* :class:`ServerIndex` finds the answer keys naming a server;
* :class:`RecentChanges` remembers, for the last few servers changed, the write
  generation of their last change, so that an answer built on reads made before a
  write (the write landed while it was being built) is kept only if none of its
  servers was written since.

Example:
    >>> index = ServerIndex()
    >>> get_a = (("a.example", (), None),)
    >>> post_ab = (("a.example", (), None), ("b.example", ("ed25519:1",), None))
    >>> index.add(get_a); index.add(post_ab)
    >>> len(index.keys_naming("a.example"))
    2
    >>> index.keys_naming("b.example") == [post_ab]
    True
    >>> index.remove(post_ab); index.keys_naming("b.example")
    []
"""

from typing import Iterator, Optional, Union

from keyring_module.notary.query import AnswerKey

#: What indexing one server of an answer costs in memory (a slot of the index's dict,
#: or of a set when several answers name the server), counted in the answer cache's
#: budget with the answer. Measured with tracemalloc on CPython 3.11: 20 to 50 bytes
#: mostly, about 105 at worst (one server named by thousands of answers, its set just
#: grown).
INDEX_BYTES_PER_SERVER = 128
#: How many changed servers :class:`RecentChanges` remembers; an answer whose build
#: saw more writes than this is not kept (it may have missed one).
MAX_CHANGES_REMEMBERED = 1024


def _names(key: AnswerKey) -> Iterator[str]:
    return (server_key[0] for server_key in key)


class ServerIndex:
    """Which answer keys name each server.

    A server named by one answer costs one dict slot (the key itself is the value); a
    set is made only for servers named by several.
    """

    def __init__(self) -> None:
        self._by_server: dict[str, Union[AnswerKey, set[AnswerKey]]] = {}

    def __len__(self) -> int:
        """How many servers are named by indexed answers."""
        return len(self._by_server)

    def add(self, key: AnswerKey) -> None:
        """Index ``key`` under each server it names (idempotent)."""
        by_server = self._by_server
        for name in _names(key):
            found = by_server.get(name)
            if found is None:
                by_server[name] = key
            elif isinstance(found, set):
                found.add(key)
            elif found != key:
                by_server[name] = {found, key}

    def remove(self, key: AnswerKey) -> None:
        """Stop indexing ``key`` (nothing if it is not indexed)."""
        by_server = self._by_server
        for name in _names(key):
            found = by_server.get(name)
            if found is None:
                continue
            if isinstance(found, set):
                found.discard(key)
                if len(found) == 1:
                    by_server[name] = next(iter(found))
            elif found == key:
                del by_server[name]

    def keys_naming(self, server_name: str) -> list[AnswerKey]:
        """The indexed answer keys naming ``server_name`` (a copy: safe to remove)."""
        found = self._by_server.get(server_name)
        if found is None:
            return []
        if isinstance(found, set):
            return list(found)
        return [found]

    def clear(self) -> None:
        """Forget every answer key."""
        self._by_server.clear()


class RecentChanges:
    """The write generation of the last change of each of the servers changed lately.

    It knows of every change made after :attr:`known_since` (None: of none yet); a
    server forgotten to stay within ``max_names`` moves that point up to its last
    change.

    Example:
        >>> changes = RecentChanges(max_names=2)
        >>> changes.reset(10)
        >>> changes.note("a.example", 11); changes.note("b.example", 12)
        >>> key = (("b.example", (), None),)
        >>> changes.unchanged_since(key, 11), changes.unchanged_since(key, 12)
        (False, True)
        >>> changes.note("c.example", 13)  # a.example is forgotten: known since 11
        >>> changes.known_since, changes.unchanged_since(key, 10)
        (11, False)
    """

    def __init__(self, max_names: int = MAX_CHANGES_REMEMBERED) -> None:
        self._max_names = max(1, max_names)
        # Oldest change first (a server changed again moves to the end).
        self._last_change: dict[str, int] = {}
        self.known_since: Optional[int] = None

    def __len__(self) -> int:
        """How many servers' last changes are remembered."""
        return len(self._last_change)

    def reset(self, generation: int) -> None:
        """Anything may have changed up to ``generation``: known from there on only."""
        self._last_change.clear()
        self.known_since = generation

    def note(self, server_name: str, generation: int) -> None:
        """``server_name``'s keys changed in the write counted as ``generation``."""
        last_change = self._last_change
        last_change.pop(server_name, None)
        last_change[server_name] = generation
        if len(last_change) > self._max_names:
            oldest = next(iter(last_change))
            self.known_since = last_change.pop(oldest)

    def unchanged_since(self, key: AnswerKey, generation: int) -> bool:
        """Whether no server ``key`` names is known to have changed after
        ``generation`` (False when that is not known)."""
        if self.known_since is None or generation < self.known_since:
            return False
        last_change = self._last_change
        return all(last_change.get(name, generation) <= generation for name in _names(key))
