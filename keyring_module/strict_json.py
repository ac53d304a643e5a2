"""Decoding JSON that a peer sent, strictly.

Python's :func:`json.loads` accepts more than JSON: ``NaN`` and ``Infinity``, numbers
too large for a float (they become ``inf``), and, given bytes, UTF-8-encoded surrogates.
It also raises :class:`RecursionError`, not :class:`ValueError`, on deep nesting.
:func:`loads_strict` refuses all of these with one exception type::

    >>> loads_strict(b'{"a": [1, 2.5]}')
    {'a': [1, 2.5]}
    >>> loads_strict(b'{"a": 1e400}')
    Traceback (most recent call last):
    ...
    ValueError: not JSON: 1e400 is out of range
"""

import json
import math
from typing import Any


def loads_strict(data: bytes) -> Any:
    """Decode UTF-8 JSON text, refusing ``NaN``, infinities and deep nesting.

    Args:
        data: the raw bytes, e.g. a request body.

    Returns:
        The decoded value.

    Raises:
        ValueError: not UTF-8, not JSON, a non-finite number, or nested deeper than the
            parser can go.
    """
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_refuse, parse_float=_finite)
    except RecursionError:
        raise ValueError("not JSON: nested too deeply") from None
    except ValueError as e:
        raise ValueError("not JSON: %s" % (e,)) from None


def _refuse(name: str) -> Any:
    raise ValueError("%s is not JSON" % name)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("%s is out of range" % text[:40])
    return value
