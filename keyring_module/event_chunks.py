"""Event checks as plain data, for worker processes: what crosses the process boundary.

A worker process runs :func:`check_event_chunk` on one chunk of events; only plain data
goes in and comes out, and nothing here imports Twisted, so a worker starts quickly.
The parent encodes a chunk's events with :func:`encode_events` and its keys with
:func:`chunk_keys` (only the keys of the servers the chunk's events need), and turns
each :data:`ChunkOutcome` back into what the keyring records with
:func:`outcome_error`::

    events_blob = encode_events(events)            # ("marshal", b"...")
    keys = chunk_keys(keys_by_server, {"a.org"})   # {"a.org": (("ed25519:1", b"...", ...),)}
    outcomes = check_event_chunk("10", events_blob, [("a.org",)] * len(events), keys, now_ms)
    # per event: None (accepted), a dict (the redacted copy to use) or an error tuple

What goes in, per chunk: the room version's identifier, the events as received, each
event's required signers, the keys as tuples of plain values and bytes, the time, and
the compromised keys. What comes out, per event: None, the redacted copy, or
``(server_name, key_ids, reason, detail)``.

The events travel as one :mod:`marshal` blob: JSON values (dicts, lists, strings, ints
of any size, floats, booleans, None) survive it exactly, so the worker checks what the
caller gave, and encoding costs the parent, whose single core is what limits the
throughput, about a tenth of pickling the same dicts (about 1 us against 9 us per 1 KB
event; the worker decodes in about 5 us). Events marshal cannot encode (a ``Mapping``
that is not a dict, nesting deeper than it allows) are pickled instead.

Example:
    >>> from keyring_module.model import StoredKey
    >>> key = StoredKey("a.org", "ed25519:1", b"k" * 32, 5, None, 1, "origin", "r1")
    >>> keys = chunk_keys({"a.org": {"ed25519:1": key}, "b.org": {}}, ["a.org"])
    >>> keys == {"a.org": (("ed25519:1", b"k" * 32, 5, None),)}
    True
    >>> outcome_error(("a.org", ("ed25519:1",), "bad_signature", "invalid signature")).reason
    <VerificationFailure.BAD_SIGNATURE: 'bad_signature'>
"""

import contextlib
import gc
import marshal
import pickle
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Optional, Union

from keyring_module.errors import KeyVerificationError, VerificationFailure
from keyring_module.model import StoredKey
from keyring_module.roomversions import get_room_version
from keyring_module.verify import verify_event_signers

#: One key as sent to a worker: ``(key_id, verify_key_bytes, valid_until_ts,
#: expired_ts)``; the rest of a :class:`~keyring_module.model.StoredKey` (when and
#: where it was fetched) does not matter to a check.
KeyTuple = tuple[str, bytes, int, Optional[int]]

#: The keys a chunk needs, by server.
ChunkKeys = dict[str, tuple[KeyTuple, ...]]

#: A failed check as sent back: ``(server_name, key_ids, reason value, detail)``.
ErrorTuple = tuple[str, tuple[str, ...], str, str]

#: One event's outcome: None (accepted), the redacted copy to use (the content hash
#: differs), or why it failed.
ChunkOutcome = Union[None, dict[str, Any], ErrorTuple]


#: A chunk's events, encoded: ``("marshal", blob)`` or ``("pickle", blob)``.
EncodedEvents = tuple[str, bytes]


def encode_events(events: Sequence[Mapping[str, Any]]) -> Optional[EncodedEvents]:
    """Events as one blob for a worker: marshal, else pickle; None if neither can
    encode them (e.g. nested deeper than both allow): check those where they are.

    Example:
        >>> decode_events(encode_events([{"n": 1.5, "big": 2**60}]))
        [{'n': 1.5, 'big': 1152921504606846976}]
    """
    try:
        return "marshal", marshal.dumps(list(events))
    except ValueError:  # a type marshal does not know (exactly), or nested too deep
        pass
    try:
        return "pickle", pickle.dumps(list(events), pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError, RecursionError):
        return None


def decode_events(encoded: EncodedEvents) -> list[Any]:
    """:func:`encode_events` undone (in the worker)."""
    how, blob = encoded
    events: list[Any] = marshal.loads(blob) if how == "marshal" else pickle.loads(blob)
    return events


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic GC (if it runs) for the block: the worker's own process."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def chunk_keys(keys: Mapping[str, Mapping[str, StoredKey]], servers: Iterable[str]) -> ChunkKeys:
    """The keys of ``servers`` (those a chunk's events need), as plain tuples.

    Args:
        keys: the keys held, by server then key id.
        servers: the servers whose keys to send; servers with no keys are left out.

    Returns:
        ``{server: ((key_id, verify_key_bytes, valid_until_ts, expired_ts), ...)}``.
    """
    sent: ChunkKeys = {}
    for server in servers:
        held = keys.get(server)
        if held:
            sent[server] = tuple(
                (key_id, k.verify_key_bytes, k.valid_until_ts, k.expired_ts)
                for key_id, k in held.items()
            )
    return sent


def stored_keys(keys: ChunkKeys) -> dict[str, dict[str, StoredKey]]:
    """:func:`chunk_keys` undone, in the worker: the keys by server then key id."""
    return {
        server: {
            key_id: StoredKey(server, key_id, raw, valid_until_ts, expired_ts, 0, "", "")
            for key_id, raw, valid_until_ts, expired_ts in tuples
        }
        for server, tuples in keys.items()
    }


def check_event_chunk(
    room_version_id: str,
    encoded_events: EncodedEvents,
    signers: Sequence[tuple[str, ...]],
    keys: ChunkKeys,
    now_ms: int,
    compromised: frozenset[bytes] = frozenset(),
) -> list[ChunkOutcome]:
    """Check a chunk of events (run in a worker process): the first check of
    :class:`~keyring_module.keyring.batch.EventItem`, with plain data in and out. The
    cyclic GC of the process is paused meanwhile.

    Args:
        room_version_id: the events' room version, e.g. ``"10"``.
        encoded_events: the events (:func:`encode_events`), each with an integer
            ``origin_server_ts``.
        signers: per event, its required signers (sorted).
        keys: the keys the chunk needs (:func:`chunk_keys`).
        now_ms: the current time.
        compromised: decoded bytes of keys never to trust.

    Returns:
        One :data:`ChunkOutcome` per event, in order.
    """
    version = get_room_version(room_version_id)
    held = stored_keys(keys)
    outcomes: list[ChunkOutcome] = []
    append = outcomes.append
    # Decoding makes thousands of containers at once, which would set off collections
    # that walk them all (twice the decoding cost), and the checks a few more; the
    # chunk makes no garbage cycles worth collecting before it is done.
    with gc_paused():
        events = decode_events(encoded_events)
        for event, servers in zip(events, signers, strict=True):
            try:
                append(
                    verify_event_signers(
                        event, version, servers, held, now_ms, compromised=compromised
                    )
                )
            except KeyVerificationError as e:
                append((e.server_name, e.key_ids, e.reason.value, e.detail))
    return outcomes


def outcome_error(error: ErrorTuple) -> KeyVerificationError:
    """The :class:`~keyring_module.errors.KeyVerificationError` a worker sent back as a
    tuple."""
    server_name, key_ids, reason, detail = error
    return KeyVerificationError(server_name, key_ids, VerificationFailure(reason), detail)
