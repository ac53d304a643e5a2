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
