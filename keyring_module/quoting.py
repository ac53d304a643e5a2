"""Showing values from outside in log lines and error messages, safely.

A server name, key id or header from a peer may hold anything: a newline that forges a
log line, a lone UTF-16 surrogate that UTF-8 (and so canonical JSON) cannot encode, a
megabyte of text. :func:`quote_untrusted` turns any such value into short, printable,
ASCII-only text that can go into a log line or a JSON error as it is.
"""

#: How much of an outside value is shown by default.
DEFAULT_MAX_CHARS = 64

#: Integers beyond this many bits are not written out (str() of a huge int is slow).
_MAX_INT_BITS = 64


def quote_untrusted(value: object, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """An ASCII-only, escaped and shortened rendering of a value from outside.

    Strings and bytes are shown as Python literals of their first ``max_chars``
    characters (every non-ASCII or non-printable character escaped), followed by
    ``...`` when cut. Small numbers, booleans and None are shown as they are; anything
    else (objects, arrays, huge integers) only by its type, since rendering it could
    be costly or deeply recursive.

    Args:
        value: the value, e.g. a server name or key id that failed validation.
        max_chars: at most this many characters of a string or bytes are shown.

    Returns:
        Text made of printable ASCII characters only.

    Example:
        >>> print(quote_untrusted("ed25519:a\\n\\udc80"))
        'ed25519:a\\n\\udc80'
        >>> print(quote_untrusted("\u00e9" * 100, max_chars=3))
        '\\xe9\\xe9\\xe9'...
        >>> print(quote_untrusted({"a": [1]}), quote_untrusted(2**100), quote_untrusted(7))
        <object> <integer> 7
    """
    if isinstance(value, (str, bytes)):
        shown = ascii(value[:max_chars])
        return shown + "..." if len(value) > max_chars else shown
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if value.bit_length() <= _MAX_INT_BITS else "<integer>"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        return "<object>"
    if isinstance(value, list):
        return "<array>"
    return "<%s>" % type(value).__name__
