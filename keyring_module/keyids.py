"""Key id grammar: ``algorithm:identifier``, ASCII only.

Key ids name signing keys in ``verify_keys``, ``signatures``, notary queries and
``X-Matrix`` headers. The identifier is ``[a-zA-Z0-9_]+``; every key id from outside is
held to that grammar, ASCII only, at most :data:`MAX_KEY_ID_LENGTH` characters, and
anchored with ``\\Z`` (``$`` would also match before a trailing newline).

Example:
    >>> is_key_id("ed25519:a_1"), is_key_id("curve25519:x"), is_ed25519_key_id("curve25519:x")
    (True, True, False)
    >>> is_key_id("ed25519:a_1\\n"), is_key_id("ed25519:\u0661"), is_key_id("ed25519:a.b")
    (False, False, False)
"""

import re

#: Longer key ids are refused: no real server uses them, and they would only cost
#: memory, log space and database index room.
MAX_KEY_ID_LENGTH = 255

#: An ed25519 key id, the only kind we store, verify with and publish.
ED25519_KEY_ID_RE = re.compile(r"ed25519:[a-zA-Z0-9_]{1,%d}\Z" % (MAX_KEY_ID_LENGTH - 8))

#: A key id of any algorithm: ``algorithm:identifier``.
KEY_ID_RE = re.compile(r"[a-zA-Z0-9_]{1,64}:[a-zA-Z0-9_]+\Z")


def is_key_id(value: object) -> bool:
    """Whether ``value`` is a well-formed key id of any algorithm."""
    return (
        isinstance(value, str)
        and len(value) <= MAX_KEY_ID_LENGTH
        and KEY_ID_RE.match(value) is not None
    )


def is_ed25519_key_id(value: object) -> bool:
    """Whether ``value`` is a well-formed ``ed25519:`` key id."""
    return isinstance(value, str) and ED25519_KEY_ID_RE.match(value) is not None
