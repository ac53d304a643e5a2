"""Base64 as Matrix uses it: unpadded on the wire, padded input tolerated.

Keys are compared by their decoded bytes (never by their text), so a padded config entry
matches a key published unpadded::

    >>> decode_base64_tolerant("AAE") == decode_base64_tolerant("AAE=") == b"\\x00\\x01"
    True
"""

import base64
import binascii
import sys
from typing import Callable, Optional

_decode_strict: Callable[[str], bytes]
if sys.version_info >= (3, 11):
    # One C call (this runs once per signature checked, on the keyring's hot path).
    def _decode_strict(data: str) -> bytes:
        return binascii.a2b_base64(data, strict_mode=True)

else:  # pragma: no cover - Python 3.10

    def _decode_strict(data: str) -> bytes:
        return base64.b64decode(data, validate=True)


def decode_base64_tolerant(value: object) -> Optional[bytes]:
    """Decode standard base64 with or without padding; None if it is not base64."""
    if type(value) is not str:
        return None
    try:
        # Add the missing padding; over-padded input fails ("excess data").
        return _decode_strict(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        return None


#: URL-safe base64 letters and the standard ones they stand for.
_URL_SAFE_TO_STANDARD = str.maketrans("-_", "+/")


def decode_base64_either_alphabet(value: object) -> Optional[bytes]:
    """:func:`decode_base64_tolerant`, also reading the URL-safe alphabet (``-``, ``_``).

    Signatures (signedjson reads both) and third-party invite public keys (the spec
    allows both) come in either alphabet. Strict otherwise: a character of neither
    alphabet, or wrong padding, gives None.

    Example:
        >>> decode_base64_either_alphabet("-_8") == decode_base64_either_alphabet("+/8")
        True
        >>> decode_base64_either_alphabet("+/8!") is None
        True
    """
    raw = decode_base64_tolerant(value)
    if raw is None and type(value) is str and ("-" in value or "_" in value):
        raw = decode_base64_tolerant(value.translate(_URL_SAFE_TO_STANDARD))
    return raw
