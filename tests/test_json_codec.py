"""Tests for keyring_module.json_codec: both paths give the C codec's results."""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from canonicaljson import encode_canonical_json
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from keyring_module import json_codec
from keyring_module.json_codec import (
    FAST_PATH_MAX_VALUES,
    encode_canonical,
    json_values_upper_bound,
    loads_strict,
    nesting_depth_exceeds,
    unencodable_part,
)
from keyring_module.validation import check_json_types

# Canonical-JSON values: no floats, integers in range, any encodable text.
json_values: Any = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53) + 1, 2**53 - 1)
    | st.text(),  # without lone surrogates, which UTF-8 cannot encode
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=5), children, max_size=5)
    ),
    max_leaves=30,
)


@contextmanager
def slow_path() -> Iterator[None]:
    """Send every document decoded inside down the pure-Python path."""
    saved = json_codec.FAST_PATH_MAX_VALUES
    json_codec.FAST_PATH_MAX_VALUES = 0
    try:
        yield
    finally:
        json_codec.FAST_PATH_MAX_VALUES = saved


# Values whose strings hold what confuses a reader of JSON text: brackets, quotes,
# backslashes, and characters written as escapes (astral ones as surrogate pairs, lone
# surrogates).
tricky_text = st.text(
    st.sampled_from('[]{}"\\u/') | st.characters(blacklist_categories=()), max_size=6
)
tricky_values: Any = st.recursive(
    st.none() | st.integers(-5, 5) | tricky_text,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(tricky_text, children, max_size=3)
    ),
    max_leaves=20,
)


def depth_of(value: object) -> int:
    """How deeply arrays and objects nest in ``value`` (``[]`` is 1)."""
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    return 0


def utf8_encodable(value: object) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def record_slow_decodes(test: SynchronousTestCase) -> list[str]:
    """A list that gets one entry each time a document is decoded on the slow
    (GIL-yielding) path, for the rest of ``test``."""
    calls: list[str] = []
    real_init = json_codec._GilYieldingDecoder.__init__

    def recording_init(decoder: json.JSONDecoder) -> None:
        calls.append("slow")
        real_init(decoder)  # type: ignore[arg-type]

    test.patch(json_codec._GilYieldingDecoder, "__init__", recording_init)
    return calls


class JsonCodecTests(SynchronousTestCase):
    @settings(max_examples=100, deadline=None)
    @given(json_values)
    def test_value_bound_is_an_upper_bound(self, value: object) -> None:
        """The byte-count bound is never below the real number of values."""
        for body in (encode_canonical_json(value), json.dumps(value, indent=1).encode()):
            self.assertGreaterEqual(json_values_upper_bound(body), check_json_types(value))

    @settings(max_examples=100, deadline=None)
    @given(json_values)
    def test_slow_paths_match_the_c_codec(self, value: object) -> None:
        """Pure-Python decoding and encoding give exactly what the C codec gives."""
        body = json.dumps(value, indent=1).encode()
        fast = loads_strict(body)
        self.assertEqual(fast, value)
        self.assertEqual(
            encode_canonical(value, FAST_PATH_MAX_VALUES), encode_canonical_json(value)
        )
        self.assertEqual(
            encode_canonical(value, FAST_PATH_MAX_VALUES + 1), encode_canonical_json(value)
        )
        with slow_path():
            self.assertEqual(loads_strict(body, in_worker_thread=True), fast)

    @settings(max_examples=300, deadline=None)
    @given(tricky_values, st.booleans(), st.integers(0, 4))
    def test_depth_read_from_the_text(self, value: object, indent: bool, limit: int) -> None:
        """The nesting depth read from a document's text is the decoded value's."""
        body = json.dumps(value, indent=1 if indent else None).encode("ascii")
        self.assertEqual(nesting_depth_exceeds(body, limit), depth_of(value) > limit)

    @settings(max_examples=300, deadline=None)
    @given(tricky_values, st.booleans())
    def test_lone_surrogates_found_in_the_text(self, value: object, indent: bool) -> None:
        """A document is found to hold a lone surrogate exactly when its decoded value
        cannot be encoded as UTF-8; every other document is fine (depth allowing)."""
        body = json.dumps(value, indent=1 if indent else None).encode("ascii")
        self.assertEqual(loads_strict(body), value)
        expected = None if utf8_encodable(value) else "a string is not valid Unicode"
        self.assertEqual(unencodable_part(body, max_depth=100), expected)

    def test_depth_limit(self) -> None:
        """A document nested exactly to the limit passes; one level more does not, even
        with brackets in its strings and padding around."""
        for levels, problem in ((100, None), (101, "nested deeper than 100 levels")):
            body = b'{"a": "[[[[", "b": ' + b"[" * (levels - 1) + b'"]]]]"' + b"]" * (levels - 1)
            body += b', "c": [' + b"[], " * 500 + b"0]}"
            self.assertEqual(unencodable_part(body), problem)

    def test_big_document_takes_the_slow_path_in_a_worker_thread(self) -> None:
        """In a worker thread, a document with more values than the fast path allows is
        decoded without the C scanner; on the reactor thread (the default) with it."""
        body = json.dumps({"pad": [0] * FAST_PATH_MAX_VALUES}).encode()
        calls = record_slow_decodes(self)
        self.assertEqual(
            loads_strict(body, in_worker_thread=True), {"pad": [0] * FAST_PATH_MAX_VALUES}
        )
        self.assertEqual(calls, ["slow"])
        self.assertEqual(loads_strict(b"[0]", in_worker_thread=True), [0])
        self.assertEqual(calls, ["slow"])
        self.assertEqual(loads_strict(body), {"pad": [0] * FAST_PATH_MAX_VALUES})
        self.assertEqual(calls, ["slow"])

    def test_both_paths_refuse_the_same_bodies(self) -> None:
        """NaN, Infinity, bad JSON and bad UTF-8 fail on either path with the same errors."""
        bad_bodies = [b"NaN", b'{"a": -Infinity}', b"[1,", b'"\xff"', b'{"a" 1}', b"[1] x"]
        fast = [type(self.assertRaises(ValueError, loads_strict, body)) for body in bad_bodies]
        with slow_path():
            slow = [
                type(self.assertRaises(ValueError, loads_strict, body, in_worker_thread=True))
                for body in bad_bodies
            ]
        self.assertEqual(slow, fast)

    def test_unencodable_string_raises_value_error_on_both_paths(self) -> None:
        """A lone surrogate cannot be encoded as UTF-8 by either encoder."""
        for count in (1, FAST_PATH_MAX_VALUES + 1):
            self.assertRaises(ValueError, encode_canonical, {"a": "\ud800"}, count)
