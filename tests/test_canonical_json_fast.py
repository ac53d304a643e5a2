"""The fast canonical-JSON encoder writes exactly canonicaljson's bytes on plain values.

:func:`keyring_module.canonical_json.encode_plain` uses orjson for values the event
checks found plain (:func:`keyring_module.eventhashes.scan_values`); a single byte of
difference would reject every authentic event that holds such a value, or accept bytes
nobody signed. So these compare it with canonicaljson on generated values: keys and
strings from the whole of Unicode (astral characters, which sort differently in UTF-16,
control characters, lone surrogates), integers at the edges of the safe range, deep
nesting; and check that what orjson refuses falls back to canonicaljson's answer.
"""

import sys
from typing import Any

from canonicaljson import encode_canonical_json
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from keyring_module import canonical_json
from keyring_module.canonical_json import encode_plain, fast_encoder_available
from keyring_module.eventhashes import MAX_SAFE_INTEGER, ValueScan, scan_values

# Every code point, surrogates included (decoded JSON may hold lone ones: "\ud800").
ANY_CHAR = st.characters(min_codepoint=0, max_codepoint=sys.maxunicode)
TEXT = st.text(ANY_CHAR, max_size=12) | st.sampled_from(
    ["", "a", "A", "é", "\u2028", "\x7f", "\x00", "\ud800", "\U0001f600", "\uffff", "\ue000"]
)
SAFE_INT = st.integers(-MAX_SAFE_INTEGER, MAX_SAFE_INTEGER) | st.sampled_from(
    [0, -1, MAX_SAFE_INTEGER, -MAX_SAFE_INTEGER, 2**31, -(2**31), 2**32]
)
PLAIN_LEAF = st.none() | st.booleans() | SAFE_INT | TEXT
PLAIN = st.recursive(
    PLAIN_LEAF,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(TEXT, children, max_size=5),
    max_leaves=40,
)


def canonical_or_error(value: Any) -> Any:
    """canonicaljson's bytes, or the type of the error it raises."""
    try:
        return encode_canonical_json(value)
    except (TypeError, ValueError, RecursionError) as e:
        return type(e)


def plain_or_error(value: Any) -> Any:
    try:
        return encode_plain(value)
    except (TypeError, ValueError, RecursionError) as e:
        return type(e)


class FastEncoderTests(SynchronousTestCase):
    def test_orjson_is_installed(self) -> None:
        # The suite runs with the fast path; without it these tests would compare
        # canonicaljson with itself.
        self.assertTrue(fast_encoder_available())

    @settings(max_examples=1000, deadline=None)
    @given(PLAIN)
    def test_same_bytes_as_canonicaljson(self, value: Any) -> None:
        self.assertEqual(scan_values(value), ValueScan.PLAIN)
        self.assertEqual(plain_or_error(value), canonical_or_error(value))

    @settings(max_examples=300, deadline=None)
    @given(st.dictionaries(TEXT, PLAIN, min_size=2, max_size=12))
    def test_key_order_is_code_point_order(self, value: dict[str, Any]) -> None:
        self.assertEqual(plain_or_error(value), canonical_or_error(value))

    def test_astral_keys_sort_after_the_private_use_area(self) -> None:
        # UTF-16 order would put U+1F600 (a surrogate pair) before U+E000.
        value = {"\U0001f600": 1, "\ue000": 2, "z": 3}
        self.assertEqual(encode_plain(value), '{"z":3,"\ue000":2,"\U0001f600":1}'.encode())

    def test_escapes(self) -> None:
        value = {"s": '\x00\x01\x08\t\n\x0c\r\x1f"\\/\x7f\u2028'}
        self.assertEqual(encode_plain(value), encode_canonical_json(value))
        self.assertEqual(
            encode_plain(value),
            b'{"s":"\\u0000\\u0001\\b\\t\\n\\f\\r\\u001f\\"\\\\/\x7f\xe2\x80\xa8"}',
        )

    def test_what_orjson_refuses_goes_to_canonicaljson(self) -> None:
        # A key that is not a string (a Python caller's dict): canonicaljson's answer.
        self.assertEqual(encode_plain({2: "a", 1: "b"}), b'{"1":"b","2":"a"}')
        self.assertEqual(plain_or_error({1: "a", "b": 2}), TypeError)  # unsortable: as before
        # Deeper than orjson nests: canonicaljson writes it.
        deep: Any = "x"
        for _ in range(300):
            deep = [deep]
        self.assertEqual(encode_plain(deep), encode_canonical_json(deep))
        # A lone surrogate: canonicaljson's error (UTF-8 cannot carry it).
        with self.assertRaises(UnicodeEncodeError):
            encode_plain({"a": "\ud800"})
        with self.assertRaises(UnicodeEncodeError):
            encode_canonical_json({"a": "\ud800"})

    def test_without_orjson_canonicaljson_encodes(self) -> None:
        self.patch(canonical_json, "_fast_dumps", None)
        self.assertFalse(fast_encoder_available())
        value = {"b": [1, True, None], "a": "é"}
        self.assertEqual(encode_plain(value), encode_canonical_json(value))

    def test_fast_path_is_taken(self) -> None:
        # The fast encoder really is what runs on plain values (not a silent fallback).
        calls: list[Any] = []
        real = canonical_json._fast_dumps
        assert real is not None

        def counting(value: Any) -> bytes:
            calls.append(value)
            return real(value)

        self.patch(canonical_json, "_fast_dumps", counting)
        self.assertEqual(encode_plain({"a": 1}), b'{"a":1}')
        self.assertEqual(calls, [{"a": 1}])


class ScanValuesTests(SynchronousTestCase):
    """Which values count as plain: only those the fast encoder writes exactly."""

    def test_floats_and_unsafe_integers(self) -> None:
        for value in (1.0, float("nan"), 2**53, -(2**53), [{"a": [0.5]}]):
            self.assertEqual(scan_values(value), ValueScan.NON_CANONICAL, value)

    def test_other_types_are_not_plain(self) -> None:
        class Text(str):
            pass

        class Number(int):
            pass

        values: list[Any] = [(1, 2), {"a": Text("x")}, [Number(3)], {"a": frozenset()}]
        for value in values:
            self.assertEqual(scan_values(value), ValueScan.OTHER_TYPES, value)
        # ... and a float inside them is still found.
        self.assertEqual(scan_values((1, [2.5])), ValueScan.NON_CANONICAL)

    @given(PLAIN, st.integers(0, 3))
    def test_one_float_anywhere_is_found(self, value: Any, depth: int) -> None:
        wrapped: Any = [value, 1.5]
        for _ in range(depth):
            wrapped = {"k": wrapped}
        self.assertEqual(scan_values(wrapped), ValueScan.NON_CANONICAL)
