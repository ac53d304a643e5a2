"""Matrix timestamps (ms since the epoch) as people read them, for logs and errors."""

#: 9999-12-31T23:59:59.999Z: later times (and negative ones) are shown as numbers.
LAST_ISO_TS_MS = 253402300799999


def format_ts(ts_ms: int) -> str:
    """A ms timestamp as UTC ISO 8601 to the second (the number itself when out of range).

    Example:
        >>> format_ts(1700000000000)
        '2023-11-14T22:13:20Z'
        >>> format_ts(2**62)
        '4611686018427387904'
    """
    import time

    if not 0 <= ts_ms <= LAST_ISO_TS_MS:
        return str(ts_ms)
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts_ms // 1000))
