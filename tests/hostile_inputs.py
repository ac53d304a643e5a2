"""Hypothesis strategies for hostile input: server names, key ids, JSON values and bodies.

The tricky characters are the ones that broke things before: lone surrogates (UTF-8,
and so canonical JSON, cannot encode them), NUL and line breaks, Unicode digits that
``str.isdigit()`` accepts (superscript, Arabic-Indic, fullwidth), bidi controls, and the
separators of the grammars themselves. Every strategy also draws from any code point.
"""

import json
from typing import Any

from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

TRICKY_CHARACTERS = (
    "\x00",
    "\n",
    "\r",
    "\t",
    " ",
    "\ud800",
    "\udfff",
    "\u00b2",
    "\u0664",
    "\uff18",
    "\u202e",
    "\ufeff",
    "\u00e9",
    "\U0001f600",
    "%",
    "[",
    "]",
    ":",
    ".",
    "-",
    "_",
    "/",
    "\\",
    '"',
    ",",
    "=",
    "@",
    "$",
)

#: Numbers ``str.isdigit()`` accepts that are not ASCII: superscript, Arabic-Indic,
#: fullwidth, and ASCII digits followed by a line break.
UNICODE_DIGITS = ("\u00b9\u00b2", "\u0668\u0664\u0664\u0668", "\uff18\uff14", "8448\n")

#: Stands for a deeply nested array in :func:`json_bytes` (a Python value that deep
#: could not be encoded by ``json.dumps`` itself).
DEEP = "\x00deep-nesting-goes-here\x00"

_LABELS = ("xn--bcher-kva", "xn--zz", "XN--80AK6AA92E", "localhost", "r3---sn", "origin")


def hostile_text(min_size: int = 0, max_size: int = 20) -> SearchStrategy[str]:
    """Text of plain letters, tricky characters and any code point (surrogates too)."""
    alphabet = (
        st.sampled_from(TRICKY_CHARACTERS)
        | st.sampled_from("abcxyz019")
        | st.characters(exclude_categories=())
    )
    return st.text(alphabet, min_size=min_size, max_size=max_size)


def _spliced(base: SearchStrategy[str]) -> SearchStrategy[str]:
    """``base`` values, some with hostile text put in at some position."""

    def splice(text: str, extra: str, at: int) -> str:
        at = len(text) if at < 0 else min(at, len(text))
        return text[:at] + extra + text[at:]

    extra = st.sampled_from(TRICKY_CHARACTERS) | hostile_text(1, 3)
    return (
        base
        | st.builds(splice, base, extra, st.integers(0, 80))
        | st.builds(lambda text, end: text + end, base, st.sampled_from(TRICKY_CHARACTERS[:12]))
    )


def server_name_like() -> SearchStrategy[str]:
    """Names near the valid ones: hostnames, IPv4 and IPv6 literals, ports, some with a
    hostile part spliced in."""
    label = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,8}[a-zA-Z0-9])?", fullmatch=True)
    hostname = st.lists(label | st.sampled_from(_LABELS), min_size=1, max_size=4).map(".".join)
    ipv4 = st.from_regex(r"[0-9]{1,4}(\.[0-9]{1,4}){3}", fullmatch=True)
    ipv6 = st.ip_addresses(v=6).map(lambda address: "[%s]" % address)
    odd_hosts = ["[fe80::1%eth0]", "[::1", "::1", ".", "1.2.3.\u00b9", "\u0661.2.3.4"]
    host = hostname | ipv4 | ipv6 | st.sampled_from(odd_hosts)
    port = (
        st.sampled_from(["", ":8448", ":0", ":65536", ":08448", ":"])
        | st.integers(-5, 99999).map(lambda n: ":%d" % n)
        | st.sampled_from(UNICODE_DIGITS).map(lambda digits: ":" + digits)
    )
    return _spliced(st.builds(lambda h, p: h + p, host, port))


def key_id_like() -> SearchStrategy[str]:
    """Key ids near the valid ones (``ed25519:abc``), some hostile."""
    identifier = st.from_regex(r"[a-zA-Z0-9_]{1,12}", fullmatch=True)
    algorithm = st.sampled_from(["ed25519", "curve25519", "ED25519", "", "ed25519:x"])
    valid_like = st.builds(lambda a, i: "%s:%s" % (a, i), algorithm, identifier)
    return _spliced(valid_like) | hostile_text(max_size=12) | st.just("ed25519:" + "a" * 300)


def json_values(max_leaves: int = 12) -> SearchStrategy[Any]:
    """Any decoded JSON value, with hostile strings, huge integers, NaN and infinities."""
    leaves = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.sampled_from([2**53, -(2**53), 2**63, 10**40])
        | st.floats()
        | hostile_text()
        | st.just(DEEP)
    )
    return st.recursive(
        leaves,
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(hostile_text(max_size=8), children, max_size=4)
        ),
        max_leaves=max_leaves,
    )


def json_bytes(value: Any, ascii_only: bool, depth: int) -> bytes:
    """``value`` as JSON text, as a hostile peer could send it.

    Args:
        value: the value; each :data:`DEEP` string in it becomes an array nested
            ``depth`` levels deep.
        ascii_only: escape non-ASCII as ``\\uXXXX`` (lone surrogates then arrive as
            escapes); otherwise they are written raw, lone surrogates as the invalid
            UTF-8 bytes a careless encoder produces.
        depth: how deep :data:`DEEP` is nested.
    """
    text = json.dumps(value, ensure_ascii=ascii_only, allow_nan=True)
    deep_literal = json.dumps(DEEP, ensure_ascii=ascii_only)
    text = text.replace(deep_literal, "[" * depth + "]" * depth)
    return text.encode("utf-8", "surrogatepass")


def hostile_json_bytes(value: SearchStrategy[Any]) -> SearchStrategy[bytes]:
    """Values from ``value`` written by :func:`json_bytes`, with some nested deeply."""
    return st.builds(
        json_bytes,
        value,
        st.booleans(),
        st.sampled_from([1, 50, 101, 900, 990, 5000, 100_000]),
    )
