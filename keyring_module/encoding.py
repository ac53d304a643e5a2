"""Base64 as Matrix uses it: unpadded on the wire, padded input tolerated.

Keys are compared by their decoded bytes (never by their text), so a padded config entry
matches a key published unpadded::

    >>> decode_base64_tolerant("AAE") == decode_base64_tolerant("AAE=") == b"\\x00\\x01"
    True
"""

import base64
import binascii
from typing import Optional


def decode_base64_tolerant(value: object) -> Optional[bytes]:
    """Decode standard base64 with or without padding; None if it is not base64."""
    if not isinstance(value, str):
        return None
    try:
        # Add the missing padding; over-padded input fails ("excess data").
        return base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
