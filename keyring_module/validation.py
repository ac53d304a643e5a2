"""Parse and check ``/_matrix/key/v2/server`` objects (pure functions, no I/O).

One function, :func:`parse_server_keys_response`, turns the decoded JSON an origin (or
a notary, for each entry of ``server_keys``) sent into a
:class:`~keyring_module.model.ServerKeysResponse`, or raises
:class:`InvalidKeyResponseError` saying why not. The rules:

* the object is a JSON object with no floats anywhere and every integer inside the
  canonical JSON range ``[-(2**53)+1, 2**53-1]``;
* ``server_name`` equals the server we asked about;
* ``valid_until_ts`` is an integer;
* ``verify_keys`` and ``old_verify_keys`` hold at most ``max_keys`` entries together
  (``federation.max_keys_per_response``);
* ``verify_keys`` maps key ids to ``{"key": base64}``; every key id must be ASCII
  ``algorithm:[a-zA-Z0-9_]+`` (:mod:`keyring_module.keyids`), keys of algorithms other
  than ``ed25519`` are then skipped, each ed25519 key decodes to
  32 bytes and carries a valid self-signature, and there is at least one;
* ``old_verify_keys`` (optional) maps key ids to ``{"key", "expired_ts"}`` (no signature
  needed for those);
* with ``notary`` given, the object also carries a valid signature by one of the notary's
  configured keys.

The ``reason`` of each error is an :class:`InvalidKeyResponseReason`, whose value is a
short, stable label usable as a metric label.

The work is linear in the size of the object: the signed part (the object without
``signatures`` and ``unsigned``) is encoded once and every signature is checked against
those bytes. Each check still hashes those bytes, so the key cap bounds the total; and
big objects are encoded in a way that lets other threads run (see
:mod:`keyring_module.json_codec`), so that a worker thread can do all of this without
stopping the reactor.
"""

import enum
from typing import Any, Iterator, Mapping, Optional, Sequence

from keyring_module.config import DEFAULT_MAX_KEYS_PER_RESPONSE, TrustedKeyServer
from keyring_module.encoding import decode_base64_tolerant
from keyring_module.errors import KeyLookupError, describe_key_ids
from keyring_module.json_codec import MAX_JSON_DEPTH, encode_canonical
from keyring_module.keyids import is_ed25519_key_id, is_key_id
from keyring_module.model import OldVerifyKey, ServerKeysResponse
from keyring_module.quoting import quote_untrusted
from keyring_module.verify import check_signature

#: Integers outside this range cannot be represented in canonical JSON.
CANONICAL_INT_MIN = -(2**53) + 1
CANONICAL_INT_MAX = 2**53 - 1

ED25519 = "ed25519"
ED25519_KEY_LENGTH = 32

_UNSIGNED_FIELDS = ("signatures", "unsigned")
_PLAIN_SCALAR_TYPES = (str, bool, type(None))
#: An answer with at most this many JSON values and keys is validated on the reactor
#: thread (about a millisecond); anything bigger goes to a worker thread.
CHEAP_MAX_VALUES = 2048
CHEAP_MAX_KEYS = 8


class InvalidKeyResponseReason(enum.Enum):
    """Why a key response was rejected. Each ``.value`` is a stable label: the origin
    fetch metric counts it as the outcome ``invalid_<value>``.

    Example:
        >>> InvalidKeyResponseReason.WRONG_SERVER_NAME.value
        'wrong_server_name'
    """

    #: Not a JSON object, a field of the wrong type, a non-string key, nesting too deep.
    BAD_TYPE = "bad_type"
    #: An integer outside the canonical JSON range.
    INT_OUT_OF_RANGE = "int_out_of_range"
    #: A float anywhere (canonical JSON has none).
    FLOAT_NOT_ALLOWED = "float_not_allowed"
    #: A required field is missing.
    MISSING_FIELD = "missing_field"
    #: ``server_name`` is not the server we asked about.
    WRONG_SERVER_NAME = "wrong_server_name"
    #: A key id that does not match ``algorithm:[a-zA-Z0-9_]+`` (ASCII, at most 255).
    BAD_KEY_ID = "bad_key_id"
    #: A key that is not base64 of 32 bytes.
    BAD_KEY_LENGTH = "bad_key_length"
    #: A verify key without a valid signature by itself (or no signatures by the server).
    BAD_SELF_SIGNATURE = "bad_self_signature"
    #: No ed25519 verify key at all.
    NO_VERIFY_KEYS = "no_verify_keys"
    #: An entry from a notary without a valid signature by one of its configured keys.
    BAD_NOTARY_SIGNATURE = "bad_notary_signature"
    #: More keys (``verify_keys`` plus ``old_verify_keys``) than ``max_keys`` allows.
    TOO_MANY_KEYS = "too_many_keys"


class InvalidKeyResponseError(KeyLookupError):
    """A key response was rejected.

    Attributes:
        reason: why, e.g. :attr:`InvalidKeyResponseReason.WRONG_SERVER_NAME`.
        message: a human readable explanation of what was wrong.

    Example:
        >>> str(InvalidKeyResponseError(InvalidKeyResponseReason.NO_VERIFY_KEYS, "none"))
        'no_verify_keys: none'
    """

    def __init__(self, reason: InvalidKeyResponseReason, message: str) -> None:
        super().__init__("%s: %s" % (reason.value, message))
        self.reason = reason
        self.message = message


def is_cheap_to_validate(
    obj: object, max_values: int = CHEAP_MAX_VALUES, max_keys: int = CHEAP_MAX_KEYS
) -> bool:
    """Whether validating ``obj`` costs so little that it may run on the reactor thread.

    Looks at no more than ``max_values`` JSON values, so the look itself is cheap: an
    answer with more values, or with more than ``max_keys`` keys (each one a signature
    check over the whole answer), is for a worker thread. Real answers (one current key,
    a few old ones, a few hundred values) are cheap.

    Example::

        >>> is_cheap_to_validate({"verify_keys": {"ed25519:a": {"key": "x"}}})
        True
        >>> is_cheap_to_validate({"padding": [[]] * 10_000})
        False
    """
    if isinstance(obj, dict):
        keys = sum(
            len(obj[field])
            for field in ("verify_keys", "old_verify_keys")
            if isinstance(obj.get(field), dict)
        )
        if keys > max_keys:
            return False
    seen = 0
    stack: list[object] = [obj]
    while stack:
        item = stack.pop()
        seen += 1
        if seen > max_values:
            return False
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def check_json_types(value: object) -> int:
    """Check that a decoded JSON value is representable as canonical JSON.

    Walks the whole value: objects (with string keys), arrays, strings, booleans, null
    and integers in the canonical range are allowed; floats are not.

    Args:
        value: the decoded JSON value.

    Returns:
        How many JSON values ``value`` holds, itself included.

    Example::

        >>> check_json_types({"a": [1, "x"], "b": None})
        5
        >>> check_json_types({"a": [0, 0.5]})
        Traceback (most recent call last):
        ...
        keyring_module.validation.InvalidKeyResponseError: float_not_allowed: floats are not allowed in canonical JSON, found 0.5 at 'a.1'

    Raises:
        InvalidKeyResponseError: ``FLOAT_NOT_ALLOWED``, ``INT_OUT_OF_RANGE`` or
            ``BAD_TYPE`` (a non-JSON value, a non-string key, or nesting deeper than
            :data:`~keyring_module.json_codec.MAX_JSON_DEPTH`); the message says where.
    """
    # Depth first, last child first, without recursion (a hostile deeply nested body
    # cannot blow the stack) and allocating nothing per plain scalar, so that walking a
    # big answer is cheap and triggers no garbage collection. The path of a value is
    # only put together for an error message: building it for every container would
    # copy a long key once per value below it (quadratic in the answer's size).
    count = 1
    children = _check_value(value, 0, [], None)
    if children is None:
        return count
    # One frame per open container: its remaining (key, child) pairs, and its own key
    # in its parent; the children's depth is the number of frames.
    stack: list[tuple[Iterator[tuple[object, object]], object]] = [(children, None)]
    while stack:
        children = stack[-1][0]
        depth = len(stack)
        for key, child in children:
            count += 1
            if depth <= MAX_JSON_DEPTH and (
                type(child) in _PLAIN_SCALAR_TYPES
                or (isinstance(child, int) and CANONICAL_INT_MIN <= child <= CANONICAL_INT_MAX)
            ):
                continue
            grandchildren = _check_value(child, depth, stack, key)
            if grandchildren is not None:
                stack.append((grandchildren, key))
                break
        else:
            stack.pop()
    return count


def _check_value(
    item: object,
    depth: int,
    stack: Sequence[tuple[object, object]],
    key: object,
) -> Optional[Iterator[tuple[object, object]]]:
    """Check one value itself; for an object or array, return its (key, child) pairs,
    last first (the walk's order), to be checked in turn.

    ``stack`` and ``key`` say where ``item`` sits (see :func:`_path_of`); they are
    only read to write an error message.
    """
    if depth > MAX_JSON_DEPTH:
        raise InvalidKeyResponseError(
            InvalidKeyResponseReason.BAD_TYPE,
            "JSON nested deeper than %d levels at %s"
            % (MAX_JSON_DEPTH, _show_path(_path_of(stack, key))),
        )
    if isinstance(item, bool) or item is None or isinstance(item, str):
        return None
    if isinstance(item, int):
        if not CANONICAL_INT_MIN <= item <= CANONICAL_INT_MAX:
            raise InvalidKeyResponseError(
                InvalidKeyResponseReason.INT_OUT_OF_RANGE,
                "integer %s at %s is outside the canonical JSON range"
                % (quote_untrusted(item), _show_path(_path_of(stack, key))),
            )
        return None
    if isinstance(item, float):
        raise InvalidKeyResponseError(
            InvalidKeyResponseReason.FLOAT_NOT_ALLOWED,
            "floats are not allowed in canonical JSON, found %r at %s"
            % (item, _show_path(_path_of(stack, key))),
        )
    if isinstance(item, dict):
        for child_key in item:
            if not isinstance(child_key, str):
                raise InvalidKeyResponseError(
                    InvalidKeyResponseReason.BAD_TYPE,
                    "non-string object key %s at %s"
                    % (quote_untrusted(child_key), _show_path(_path_of(stack, key))),
                )
        return reversed(item.items())
    if isinstance(item, list):
        return zip(reversed(range(len(item))), reversed(item), strict=True)
    raise InvalidKeyResponseError(
        InvalidKeyResponseReason.BAD_TYPE,
        "%s at %s is not a JSON value" % (type(item).__name__, _show_path(_path_of(stack, key))),
    )


def _path_of(stack: Sequence[tuple[object, object]], key: object) -> str:
    """The dotted path of the value under ``key`` in the innermost container of
    ``stack`` (the root itself when ``stack`` is empty), e.g. ``"verify_keys.a.key"``."""
    if not stack:
        return ""
    path = ""
    for _, frame_key in stack[1:]:  # the first frame is the root, under no key
        path = _join(path, str(frame_key))
    return _join(path, str(key))


def decode_key_base64(text: object, where: str) -> bytes:
    """Decode a base64 ed25519 public key (unpadded or padded) to exactly 32 bytes.

    Args:
        text: the ``key`` value from the JSON.
        where: the JSON path of the value, for the error message.

    Raises:
        InvalidKeyResponseError: ``BAD_TYPE`` if it is not a string, ``BAD_KEY_LENGTH``
            if it is not valid base64 of 32 bytes.
    """
    if not isinstance(text, str):
        raise InvalidKeyResponseError(
            InvalidKeyResponseReason.BAD_TYPE,
            "%s must be a base64 string, got %s" % (where, type(text).__name__),
        )
    # The one base64 rule for keys, as in the configuration (config_values).
    raw = decode_base64_tolerant(text)
    if raw is None or len(raw) != ED25519_KEY_LENGTH:
        raise InvalidKeyResponseError(
            InvalidKeyResponseReason.BAD_KEY_LENGTH,
            "%s is not base64 of a %d-byte ed25519 key: %s"
            % (where, ED25519_KEY_LENGTH, quote_untrusted(text)),
        )
    return raw


def parse_server_keys_response(
    obj: object,
    expected_server_name: str,
    notary: Optional[TrustedKeyServer] = None,
    *,
    max_keys: int = DEFAULT_MAX_KEYS_PER_RESPONSE,
) -> ServerKeysResponse:
    """Validate a ``/_matrix/key/v2/server`` object and extract its keys.

    Pure and thread-safe: it only reads ``obj``, so it may run in a worker thread.

    Args:
        obj: the decoded JSON (from the origin, or one ``server_keys`` entry of a notary).
        expected_server_name: the server whose keys we asked for.
        notary: when the object came through a notary, that notary; its signature is
            then required too.
        max_keys: the most entries ``verify_keys`` and ``old_verify_keys`` may hold
            together (``federation.max_keys_per_response``).

    Returns:
        The validated response. Its ``json_bytes`` is the canonical JSON of ``obj`` with
        ``signatures`` reduced to the origin's own entry; everything else (unknown fields,
        ``unsigned``) is kept as received.

    Raises:
        InvalidKeyResponseError: with its :class:`InvalidKeyResponseReason` and a message
            saying why.
    """
    if not isinstance(obj, dict):
        raise InvalidKeyResponseError(
            InvalidKeyResponseReason.BAD_TYPE,
            "key response must be a JSON object, got %s" % type(obj).__name__,
        )
    _check_key_count(obj, max_keys)
    value_count = check_json_types(obj)

    server_name = _require(obj, "server_name", str, "")
    if server_name != expected_server_name:
        raise InvalidKeyResponseError(
            InvalidKeyResponseReason.WRONG_SERVER_NAME,
            "response is for %s but we asked about %s"
            % (quote_untrusted(server_name), quote_untrusted(expected_server_name)),
        )
    valid_until_ts = _require(obj, "valid_until_ts", int, "")

    signatures = _require(obj, "signatures", dict, "")
    own_signatures = signatures.get(server_name)
    if not isinstance(own_signatures, dict) or not own_signatures:
        raise InvalidKeyResponseError(
            InvalidKeyResponseReason.BAD_SELF_SIGNATURE,
            "no signatures by %s on its own keys" % (server_name,),
        )

    signed_bytes = _signed_bytes(obj, value_count)
    verify_keys: dict[str, bytes] = {}
    for key_id, entry in _require(obj, "verify_keys", dict, "").items():
        where = "verify_keys.%s" % key_id
        if not _is_ed25519_key_id(key_id, where):
            continue
        key_bytes = decode_key_base64(_require(_as_object(entry, where), "key", str, where), where)
        _check_self_signature(signed_bytes, own_signatures, server_name, key_id, key_bytes)
        verify_keys[key_id] = key_bytes
    if not verify_keys:
        raise InvalidKeyResponseError(
            InvalidKeyResponseReason.NO_VERIFY_KEYS,
            "%s published no ed25519 verify keys" % (server_name,),
        )

    old_verify_keys: dict[str, OldVerifyKey] = {}
    old_entries = obj.get("old_verify_keys")
    if old_entries is not None:
        if not isinstance(old_entries, dict):
            raise InvalidKeyResponseError(
                InvalidKeyResponseReason.BAD_TYPE,
                "old_verify_keys must be an object, got %s" % _type_name(old_entries),
            )
        for key_id, entry in old_entries.items():
            where = "old_verify_keys.%s" % key_id
            if not _is_ed25519_key_id(key_id, where):
                continue
            fields = _as_object(entry, where)
            old_verify_keys[key_id] = OldVerifyKey(
                verify_key_bytes=decode_key_base64(_require(fields, "key", str, where), where),
                expired_ts=_require(fields, "expired_ts", int, where),
            )

    if notary is not None:
        _check_notary_signature(signed_bytes, signatures, notary)

    stripped = dict(obj)
    stripped["signatures"] = {server_name: own_signatures}
    try:
        json_bytes = encode_canonical(stripped, value_count)
    except ValueError:
        # A lone surrogate outside the signed part (in "unsigned" or a signature entry).
        raise InvalidKeyResponseError(
            InvalidKeyResponseReason.BAD_TYPE,
            "the response holds a string that cannot be encoded as UTF-8",
        ) from None
    return ServerKeysResponse(
        server_name=server_name,
        valid_until_ts=valid_until_ts,
        verify_keys=verify_keys,
        old_verify_keys=old_verify_keys,
        json_bytes=json_bytes,
    )


def _check_key_count(obj: Mapping[str, Any], max_keys: int) -> None:
    """Refuse more than ``max_keys`` keys before any per-key work is done."""
    count = sum(
        len(obj[field])
        for field in ("verify_keys", "old_verify_keys")
        if isinstance(obj.get(field), dict)
    )
    if count > max_keys:
        raise InvalidKeyResponseError(
            InvalidKeyResponseReason.TOO_MANY_KEYS,
            "the response lists %d keys (verify_keys plus old_verify_keys); at most %d are"
            " accepted" % (count, max_keys),
        )


def _signed_bytes(obj: Mapping[str, Any], value_count: int) -> Optional[bytes]:
    """The bytes every signature covers: ``obj`` without ``signatures`` and ``unsigned``,
    as canonical JSON; None if they cannot be encoded (then no signature verifies)."""
    signed = {field: value for field, value in obj.items() if field not in _UNSIGNED_FIELDS}
    try:
        return encode_canonical(signed, value_count)
    except ValueError:
        return None


def _show_path(path: str) -> str:
    """A JSON path for an error message: its keys come from outside, so quoted."""
    return quote_untrusted(path, max_chars=120) if path else "/"


def _join(path: str, key: str) -> str:
    return key if not path else path + "." + key


def _type_name(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _as_object(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise InvalidKeyResponseError(
            InvalidKeyResponseReason.BAD_TYPE,
            "%s must be an object, got %s" % (where, _type_name(value)),
        )
    return value


def _require(obj: Mapping[str, Any], field: str, kind: type, where: str) -> Any:
    """The value of a required field, checked to be of ``kind`` (bool is no int)."""
    name = _join(where, field)
    if field not in obj:
        raise InvalidKeyResponseError(
            InvalidKeyResponseReason.MISSING_FIELD, "%s is missing" % name
        )
    value = obj[field]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidKeyResponseError(
            InvalidKeyResponseReason.BAD_TYPE,
            "%s must be of type %s, got %s" % (name, _type_name(kind()), _type_name(value)),
        )
    return value


def _is_ed25519_key_id(key_id: str, where: str) -> bool:
    """True for a well-formed ed25519 key id; False for other algorithms (skipped).

    Every key id must be ASCII ``algorithm:[a-zA-Z0-9_]+`` (see
    :mod:`keyring_module.keyids`), whatever its algorithm.
    """
    is_ed25519 = key_id.startswith(ED25519 + ":")
    if not (is_ed25519_key_id(key_id) if is_ed25519 else is_key_id(key_id)):
        raise InvalidKeyResponseError(
            InvalidKeyResponseReason.BAD_KEY_ID,
            "%s: key id %s does not match algorithm:[a-zA-Z0-9_]+"
            % (where.split(".", 1)[0], quote_untrusted(key_id)),
        )
    return is_ed25519


def _signature_is_valid(signed_bytes: Optional[bytes], signature: object, key_bytes: bytes) -> bool:
    """Whether ``signature`` by the ed25519 key ``key_bytes`` covers ``signed_bytes``:
    the keyring's own check (:func:`~keyring_module.verify.check_signature`, strict
    base64 of 64 bytes), on bytes encoded once."""
    return signed_bytes is not None and check_signature(signed_bytes, key_bytes, signature) is None


def _check_self_signature(
    signed_bytes: Optional[bytes],
    own_signatures: Mapping[str, Any],
    server_name: str,
    key_id: str,
    key_bytes: bytes,
) -> None:
    signature = own_signatures.get(key_id)
    if signature is None:
        raise InvalidKeyResponseError(
            InvalidKeyResponseReason.BAD_SELF_SIGNATURE,
            "%s has no signature by its key %s" % (server_name, key_id),
        )
    if not _signature_is_valid(signed_bytes, signature, key_bytes):
        raise InvalidKeyResponseError(
            InvalidKeyResponseReason.BAD_SELF_SIGNATURE,
            "the signature by %s with %s does not verify" % (server_name, key_id),
        )


def _check_notary_signature(
    signed_bytes: Optional[bytes], all_signatures: Mapping[str, Any], notary: TrustedKeyServer
) -> None:
    signatures = all_signatures.get(notary.server_name)
    if not isinstance(signatures, dict):
        raise InvalidKeyResponseError(
            InvalidKeyResponseReason.BAD_NOTARY_SIGNATURE,
            "the entry is not signed by notary %s" % notary.server_name,
        )
    for key_id, key_bytes in notary.verify_keys.items():
        if _signature_is_valid(signed_bytes, signatures.get(key_id), key_bytes):
            return
    raise InvalidKeyResponseError(
        InvalidKeyResponseReason.BAD_NOTARY_SIGNATURE,
        "no valid signature by a configured key of notary %s (signed with: %s; configured: %s)"
        % (
            notary.server_name,
            describe_key_ids(signatures),
            describe_key_ids(notary.verify_keys),
        ),
    )
