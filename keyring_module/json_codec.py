"""Strict JSON decoding and canonical JSON encoding that never hog the GIL for long.

CPython's C JSON codec holds the GIL for a whole call. Decoding or encoding a hostile
1 MiB document made of tiny values (``[0,0,0,...]``, ``{"a":{},"b":{},...}``) takes
about 40 ms, and while that runs in a worker thread the reactor thread is stopped too.
So in worker threads (:mod:`keyring_module.blocking`), documents of up to
:data:`FAST_PATH_MAX_VALUES` values go through the C codec (a few milliseconds at most),
and bigger ones through the standard library's pure-Python codec: several times slower,
but it lets other threads take the GIL every few milliseconds
(``sys.getswitchinterval()``). On the reactor thread that would only make the same hold
longer, so there decoding always uses the C codec (:func:`loads_strict` takes the slow
path only when told it runs in a worker thread); what the reactor decodes is bounded
by the caller (e.g. ``notary.max_request_body``). Both paths give exactly the same
results, so callers never notice which one ran. Real key answers hold a few hundred
values; only padded or hostile ones take the slow path.

Example::

    >>> loads_strict(b'{"server_name": "example.org", "valid_until_ts": 1}')
    {'server_name': 'example.org', 'valid_until_ts': 1}
    >>> encode_canonical({"b": 1, "a": [True, None]}, value_count=5)
    b'{"a":[true,null],"b":1}'
"""

import json
import math
import operator
import re
from itertools import accumulate
from json.scanner import py_make_scanner  # type: ignore[attr-defined]  # not in typeshed
from typing import Any, Optional

from canonicaljson import encode_canonical_json, iterencode_canonical_json

#: Documents with at most this many values use the C codec (under ~10 ms each way).
FAST_PATH_MAX_VALUES = 50_000
#: The deepest nesting of arrays and objects accepted from peers (key answers, signed
#: request bodies): no real document needs more, and encoding deeper ones again can
#: exhaust the stack.
MAX_JSON_DEPTH = 100
#: Chunks of the pure-Python encoder joined per C call.
_JOIN_BATCH = 4096
#: A JSON string token (in valid JSON, every quote outside one starts one).
_STRING_TOKEN_RE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
#: Every byte but brackets, to be deleted.
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
#: Opening brackets count 2, closing ones 0: a running sum minus the position (1-based)
#: is then the nesting depth after each bracket.
_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")
#: The escape of a UTF-16 surrogate: the only way JSON text can carry a lone one.
_SURROGATE_ESCAPE_RE = re.compile(rb"\\u[dD][89a-fA-F]")
#: Every escape but that of a lone surrogate: a surrogate pair, an escape other than
#: ``\u``, a ``\u`` escape of no surrogate. Matched left to right, each backslash is
#: read as the start of an escape, as the decoder reads it.
_ESCAPE_BUT_LONE_SURROGATE_RE = re.compile(
    rb"\\(?:u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|[^u]|u(?![dD][89a-fA-F]))"
)


def json_values_upper_bound(body: bytes) -> int:
    """An upper bound on the number of JSON values in ``body``, counted without decoding.

    Every value is the top-level one, the first one in its container, or follows a
    comma; so commas plus opening brackets plus one bounds the count (commas and
    brackets inside strings only make the bound looser).

    Example::

        >>> json_values_upper_bound(b'{"a":[1,2],"b":{}}')
        6
    """
    return body.count(b",") + body.count(b"[") + body.count(b"{") + 1


def loads_strict(
    body: bytes, *, in_worker_thread: bool = False, fast_path_max_values: int = FAST_PATH_MAX_VALUES
) -> Any:
    """Decode a UTF-8 JSON document from a peer, strictly.

    Python's :func:`json.loads` accepts more than JSON: ``NaN`` and ``Infinity``, and
    numbers too large for a float (they become ``inf``); it raises
    :class:`RecursionError` on deep nesting. All of these are refused here with
    :class:`ValueError`.

    Args:
        body: the raw bytes (a request body, an origin's answer).
        in_worker_thread: whether the caller runs in a worker thread: documents of more
            than :data:`FAST_PATH_MAX_VALUES` values are then decoded in a way that lets
            the reactor thread run meanwhile. Leave it False on the reactor thread,
            where the C decoder is simply the fastest. The result and the errors are
            the same either way.
        fast_path_max_values: in a worker thread, documents of more values than this
            take the slow path (a caller whose documents are often big, like notary
            query bodies, lowers it so that no C call holds the GIL long).

    Returns:
        The decoded value.

    Raises:
        ValueError: ``body`` is not UTF-8 (:class:`UnicodeDecodeError`), not JSON
            (``json.JSONDecodeError``), holds a non-finite number, or nests too deeply.

    Example::

        >>> loads_strict(b'{"a": [1, 2.5]}')
        {'a': [1, 2.5]}
        >>> loads_strict(b'{"a": 1e400}')
        Traceback (most recent call last):
        ...
        ValueError: 1e400 is out of range
    """
    text = body.decode("utf-8")
    try:
        if in_worker_thread and json_values_upper_bound(body) > fast_path_max_values:
            return _GilYieldingDecoder().decode(text)
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def nesting_depth_exceeds(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """Whether a valid JSON document nests arrays and objects deeper than ``max_depth``.

    Read from the text with a few byte-level C calls (string tokens removed, brackets
    kept, a running sum), not by walking the decoded value; cheap when the document
    holds few brackets.

    Args:
        body: a document :func:`loads_strict` accepted (for other input the answer
            means nothing).
        max_depth: the deepest nesting allowed; ``[]`` is depth 1.

    Example::

        >>> nesting_depth_exceeds(b'{"a": [[1]], "b": "[[[["}', max_depth=3)
        False
        >>> nesting_depth_exceeds(b'{"a": [[1]], "b": "[[[["}', max_depth=2)
        True
    """
    if body.count(b"[") + body.count(b"{") <= max_depth:
        return False
    steps = _STRING_TOKEN_RE.sub(b"", body).translate(None, _NOT_BRACKETS)
    steps = steps.translate(_BRACKET_STEPS)
    depths = map(operator.sub, accumulate(steps), range(1, len(steps) + 1))
    return max(depths, default=0) > max_depth


def unencodable_part(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> Optional[str]:
    """What keeps a document :func:`loads_strict` accepted from being encoded again as
    (canonical) JSON, or None.

    Two things can: nesting deeper than ``max_depth``, and a string holding a lone
    UTF-16 surrogate, which UTF-8 cannot encode (JSON text can carry one only as an
    escape, e.g. ``\\ud800`` not followed by the escape of a low surrogate). Both are
    read from the text with a few byte-level C calls, without walking the decoded
    value.

    Args:
        body: a document :func:`loads_strict` accepted (for other input the answer
            means nothing).
        max_depth: the deepest nesting allowed.

    Example::

        >>> unencodable_part(b'["\\\\ud83d\\\\ude00", "\\\\\\\\ud800"]') is None
        True
        >>> unencodable_part(b'["\\\\ud800"]')
        'a string is not valid Unicode'
        >>> unencodable_part(b"[[[]]]", max_depth=2)
        'nested deeper than 2 levels'
    """
    if nesting_depth_exceeds(body, max_depth):
        return "nested deeper than %d levels" % max_depth
    if _SURROGATE_ESCAPE_RE.search(body) is not None:
        if b"\\" in _ESCAPE_BUT_LONE_SURROGATE_RE.sub(b"", body):
            return "a string is not valid Unicode"
    return None


def encode_canonical(value: object, value_count: int) -> bytes:
    """Canonical JSON bytes of ``value`` (as :func:`canonicaljson.encode_canonical_json`).

    Args:
        value: a JSON-representable value.
        value_count: how many JSON values it holds (as counted by
            :func:`keyring_module.validation.check_json_types`); above
            :data:`FAST_PATH_MAX_VALUES` the pure-Python encoder is used. Its callers
            (validating and co-signing answers) run in worker threads; on the reactor
            thread (tests, reactors without threads) it is only slower.

    Raises:
        ValueError: ``value`` holds a string that UTF-8 cannot encode (a lone surrogate).
        TypeError: ``value`` holds something that is not JSON.
    """
    if value_count <= FAST_PATH_MAX_VALUES:
        return encode_canonical_json(value)
    # One join of half a million tiny chunks is itself a 40 ms C call: join in batches.
    batches: list[bytes] = []
    batch: list[bytes] = []
    for chunk in iterencode_canonical_json(value):
        batch.append(chunk)
        if len(batch) == _JOIN_BATCH:
            batches.append(b"".join(batch))
            batch.clear()
    batches.append(b"".join(batch))
    return b"".join(batches)


def _reject_constant(name: str) -> object:
    raise ValueError("invalid JSON constant %s" % (name,))


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("%s is out of range" % (text[:40],))
    return value


class _GilYieldingDecoder(json.JSONDecoder):
    """A strict decoder whose scanner is the pure-Python one (strings still use C)."""

    def __init__(self) -> None:
        super().__init__(parse_constant=_reject_constant, parse_float=_finite)
        self.scan_once: Any = py_make_scanner(self)
