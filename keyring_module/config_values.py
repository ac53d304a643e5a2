"""Reading configuration values: durations, sizes, types, and sections with known keys.

Every reader takes the value and its key path and raises
:class:`~keyring_module.errors.ConfigError` naming the path and the bad value, e.g.
``federation.request_timeout: expected a duration like "10s", got 'soon'``.
:class:`Section` reads one mapping and refuses keys nobody asked for.
"""

import ipaddress
import re
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar, Union

from keyring_module.encoding import decode_base64_tolerant
from keyring_module.errors import ConfigError

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
T = TypeVar("T")
Path = tuple[str, ...]

HOUR_MS = 60 * 60 * 1000
KEY_ID_RE = re.compile(r"^ed25519:[a-zA-Z0-9_]+$")

_DURATION_RE = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS_MS = {
    None: 1,
    "ms": 1,
    "s": 1000,
    "m": 60 * 1000,
    "h": HOUR_MS,
    "d": 24 * HOUR_MS,
    "w": 7 * 24 * HOUR_MS,
}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMG]?)B?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def parse_duration_ms(value: object, path: Path) -> int:
    """Parse ``"10s"``/``"5m"``/``"1h"``/``"1d"``/``"250ms"`` or an int of ms."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError("expected a non-negative duration, got %r" % (value,), path)
        return value
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return int(m.group(1)) * _DURATION_UNITS_MS[m.group(2)]
    raise ConfigError('expected a duration like "10s", got %r' % (value,), path)


def parse_size(value: object, path: Path) -> int:
    """Parse ``"64K"``/``"1M"``/``"1G"`` or an int of bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError("expected a non-negative size, got %r" % (value,), path)
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]
    raise ConfigError('expected a size like "64K" or "1M", got %r' % (value,), path)


def as_bool(value: object, path: Path) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError("expected true or false, got %r" % (value,), path)


def as_int(value: object, path: Path, minimum: int = 0, maximum: Optional[int] = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError("expected an integer, got %r" % (value,), path)
    if value < minimum or (maximum is not None and value > maximum):
        bound = "at least %d" % minimum if maximum is None else "%d..%d" % (minimum, maximum)
        raise ConfigError("expected an integer %s, got %r" % (bound, value), path)
    return value


def as_str(value: object, path: Path) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError("expected a non-empty string, got %r" % (value,), path)
    return value


def as_optional_str(value: object, path: Path) -> Optional[str]:
    return None if value is None else as_str(value, path)


def as_port(value: object, path: Path) -> int:
    return as_int(value, path, 0, 65535)


def as_list(value: object, path: Path) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError("expected a list, got %r" % (value,), path)
    return value


def as_str_list(value: object, path: Path) -> tuple[str, ...]:
    return tuple(as_str(v, path + (str(i),)) for i, v in enumerate(as_list(value, path)))


def as_mapping(value: object, path: Path) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError("expected a mapping, got %r" % (value,), path)
    return value


def as_networks(value: object, path: Path) -> tuple[IPNetwork, ...]:
    result = []
    for i, item in enumerate(as_list(value, path)):
        try:
            result.append(ipaddress.ip_network(as_str(item, path + (str(i),)), strict=False))
        except ValueError:
            raise ConfigError(
                'expected an IP range like "10.0.0.0/8" or "fe80::/10", got %r' % (item,),
                path + (str(i),),
            ) from None
    return tuple(result)


def as_verify_key_bytes(value: object, path: Path) -> bytes:
    # Padded base64 is accepted too: keys are compared by their decoded bytes.
    raw = decode_base64_tolerant(as_str(value, path))
    if raw is None or len(raw) != 32:
        raise ConfigError(
            "expected an unpadded base64 ed25519 public key (32 bytes), got %r" % (value,), path
        )
    return raw


def as_key_id(value: str, path: Path) -> str:
    if not KEY_ID_RE.match(value):
        raise ConfigError('expected a key id like "ed25519:a_AbC1", got %r' % (value,), path)
    return value


class Section:
    """Reads one mapping, remembering which keys were used to reject unknown ones."""

    def __init__(self, raw: object, path: Path) -> None:
        self.raw = as_mapping(raw, path)
        self.path = path
        self._seen: set[str] = set()

    def get(self, key: str, parse: Callable[[Any, Path], T], default: T) -> T:
        self._seen.add(key)
        value = self.raw.get(key)
        if value is None:
            return default
        return parse(value, self.path + (key,))

    def require(self, key: str, parse: Callable[[Any, Path], T]) -> T:
        self._seen.add(key)
        if self.raw.get(key) is None:
            raise ConfigError("this setting is required", self.path + (key,))
        return parse(self.raw[key], self.path + (key,))

    def finish(self, forbidden: Sequence[str] = (), why: str = "") -> None:
        for key in self.raw:
            if key in forbidden:
                raise ConfigError("not allowed here: %s" % why, self.path + (str(key),))
            if key not in self._seen:
                raise ConfigError(
                    "unknown setting; valid settings here are: %s" % ", ".join(sorted(self._seen)),
                    self.path + (str(key),),
                )
