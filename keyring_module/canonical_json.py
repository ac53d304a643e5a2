"""Canonical JSON for the event checks, two to three times faster for plain JSON values.

Every signature and hash Matrix defines covers canonical JSON (sorted keys, no spaces,
UTF-8). :func:`canonicaljson.encode_canonical_json` writes it with the standard
library's encoder in 7 to 9 us for a 1 KB event; an event check encodes twice (the
bytes its signatures cover and the content hash), so that is a fifth of the check,
next to the ed25519 verification. orjson, a compiled extension, writes the same bytes
in about 3 us, for the values it can be trusted with: dicts, lists, strings, integers within
±(2^53-1), booleans and None, which is all a room v6+ event may hold. Other values it
writes its own way (floats in another notation, NaN as ``null``, datetimes as
strings) or refuses, so:

* :func:`encode_plain` is called only on a value a walk found plain
  (:func:`keyring_module.eventhashes.scan_event_values`);
* what orjson refuses even then (a key that is not a string, a lone surrogate, nesting
  deeper than 255) goes to canonicaljson, which gives the same answer or the same
  error as it always did.

Without orjson (on PyPy, where it is not installed) canonicaljson does it all.
``tests/test_canonical_json_fast.py`` checks with Hypothesis that the two agree byte
for byte on plain values, including keys and strings from the whole of Unicode.

Example:
    >>> encode_plain({"b": [1, True, None], "a": "é"}) == '{"a":"é","b":[1,true,null]}'.encode()
    True
"""

from typing import Any, Callable, Optional

from canonicaljson import encode_canonical_json

try:
    import orjson
except ImportError:  # pragma: no cover - orjson is installed wherever it has a wheel
    orjson = None  # type: ignore[assignment]


def _orjson_dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


#: ``orjson.dumps`` with sorted keys, or None without orjson.
_fast_dumps: Optional[Callable[[Any], bytes]] = _orjson_dumps if orjson is not None else None


def fast_encoder_available() -> bool:
    """Whether plain values are encoded by orjson (else by canonicaljson)."""
    return _fast_dumps is not None


def encode_plain(value: Any) -> bytes:
    """The canonical JSON of ``value``, which must hold only plain JSON values: dicts,
    lists, strings, integers within ±(2^53-1), booleans and None (no floats, no other
    types: those give other bytes).

    Raises:
        TypeError, ValueError, RecursionError: what canonicaljson raises for a value it
            cannot encode (e.g. a lone surrogate in a string).
    """
    dumps = _fast_dumps
    if dumps is not None:
        try:
            return dumps(value)
        except TypeError:  # orjson.JSONEncodeError: canonicaljson decides
            pass
    encoded: bytes = encode_canonical_json(value)
    return encoded
