"""Forgetting a server's stored keys (``keyring-module keys forget``): what to delete.

The rule, written once and applied by every backend:

* ``forget S`` removes every key row of S and every stored response of S;
* ``forget S KEY_ID...`` removes those key rows, every stored response of S that lists one
  of them (in ``verify_keys`` or ``old_verify_keys``, so the notary never re-serves the
  forgotten key), and every response of S no remaining key row points at any more (as
  its newest or first-seen copy). The other key rows stay; one whose copy was removed
  simply has none, as after a copy is dropped at the server's bounds;
* key ids the store does not hold are ignored; when none of the asked ones is held,
  nothing is removed;
* recorded conflicts stay: they are history, shown by ``keys conflicts``.

After a forget the next lookup of the server finds nothing stored (or not the forgotten
key) and fetches it again.
"""

import logging
from typing import Any, Collection, Optional, Sequence

import attr

from keyring_module.json_codec import loads_strict

logger = logging.getLogger(__name__)


@attr.s(auto_attribs=True, frozen=True, slots=True)
class ForgottenKeys:
    """What a forget removed from the store.

    Attributes:
        server_name: the server.
        key_ids: the key rows removed, sorted.
        response_ids: the stored responses removed, sorted.
    """

    server_name: str
    key_ids: tuple[str, ...] = ()
    response_ids: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.key_ids or self.response_ids)


def listed_key_ids(json_bytes: object) -> frozenset[str]:
    """The key ids a stored response lists (current and old); empty if unreadable.

    Example:
        >>> sorted(listed_key_ids(b'{"verify_keys": {"ed25519:a": {}},'
        ...                       b' "old_verify_keys": {"ed25519:o": {}}}'))
        ['ed25519:a', 'ed25519:o']
        >>> listed_key_ids(b"{not json")
        frozenset()
    """
    if isinstance(json_bytes, memoryview):
        json_bytes = bytes(json_bytes)
    if not isinstance(json_bytes, bytes):
        return frozenset()
    try:
        body = loads_strict(json_bytes, in_worker_thread=True)
    except ValueError:
        return frozenset()
    if not isinstance(body, dict):
        return frozenset()
    found: set[str] = set()
    for section in ("verify_keys", "old_verify_keys"):
        keys = body.get(section)
        if isinstance(keys, dict):
            found.update(k for k in keys if isinstance(k, str))
    return frozenset(found)


def plan_forget(
    server_name: str,
    key_rows: Sequence[Sequence[Any]],
    response_rows: Sequence[Sequence[Any]],
    key_ids: Optional[Collection[str]],
) -> ForgottenKeys:
    """Which rows a forget removes (the rule in the module docstring); pure.

    Args:
        server_name: the server.
        key_rows: all its ``server_keys`` rows (``rows.KEY_COLUMNS`` order; unreadable
            rows count by their key id).
        response_rows: all its stored responses as ``(response_id, json)`` rows.
        key_ids: the key ids to forget, or None for all.

    Example:
        >>> keys = [("s", "ed25519:a", b"", 0, None, 0, "o", "r1", "r1"),
        ...         ("s", "ed25519:b", b"", 0, None, 0, "o", "r2", "r2")]
        >>> responses = [("r1", b'{"verify_keys": {"ed25519:a": {}}}'),
        ...              ("r2", b'{"verify_keys": {"ed25519:b": {}}}')]
        >>> plan_forget("s", keys, responses, ["ed25519:a", "ed25519:zz"])
        ForgottenKeys(server_name='s', key_ids=('ed25519:a',), response_ids=('r1',))
        >>> plan_forget("s", keys, responses, None).response_ids
        ('r1', 'r2')
    """
    held = {str(row[1]): row for row in key_rows if len(row) > 1}
    if key_ids is None:
        return ForgottenKeys(
            server_name,
            tuple(sorted(held)),
            tuple(sorted(str(row[0]) for row in response_rows)),
        )
    forgotten = frozenset(key_ids) & held.keys()
    if not forgotten:
        return ForgottenKeys(server_name)
    remaining = [row for key_id, row in held.items() if key_id not in forgotten]
    referenced = {r for row in remaining for r in row[7:9] if isinstance(r, str)}
    removed = sorted(
        str(response_id)
        for response_id, json_value in response_rows
        if response_id not in referenced or listed_key_ids(json_value) & forgotten
    )
    return ForgottenKeys(server_name, tuple(sorted(forgotten)), tuple(removed))


def log_forgotten(forgotten: ForgottenKeys) -> None:
    """Log what a forget removed (one INFO line), or that it found nothing to remove."""
    if not forgotten:
        logger.info("Forget %s: nothing stored to remove", forgotten.server_name)
        return
    logger.info(
        "Forgot %s: removed key rows [%s] and stored responses [%s]",
        forgotten.server_name,
        ", ".join(forgotten.key_ids),
        ", ".join(forgotten.response_ids),
    )
