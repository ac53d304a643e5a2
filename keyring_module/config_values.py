"""Reading configuration values: durations, sizes, types, and sections with known keys.

Every reader takes the value and its key path and raises
:class:`~keyring_module.errors.ConfigError` naming the path and the bad value, e.g.
``federation.request_timeout: expected a duration like "10s", got 'soon'``.
:func:`read_section` reads the keys present in one mapping (each described by a
:class:`Setting`) and refuses the others.
"""

import ipaddress
import re
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar, Union

import attr

from keyring_module.encoding import decode_base64_tolerant
from keyring_module.errors import ConfigError
from keyring_module.keyids import is_ed25519_key_id

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
T = TypeVar("T")
Path = tuple[str, ...]
Reader = Callable[[Any, Path], Any]

HOUR_MS = 60 * 60 * 1000

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


def as_port(value: object, path: Path) -> int:
    return as_int(value, path, 0, 65535)


def as_list(value: object, path: Path) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError("expected a list, got %r" % (value,), path)
    return value


def int_in(minimum: int = 0, maximum: Optional[int] = None) -> Callable[[Any, Path], int]:
    """A reader of integers in ``minimum..maximum`` (no upper bound when None)."""

    def read_int(value: object, path: Path) -> int:
        return as_int(value, path, minimum, maximum)

    return read_int


def list_of(read: Callable[[Any, Path], T]) -> Callable[[Any, Path], tuple[T, ...]]:
    """A reader of lists whose items are each read by ``read`` (at ``path.<index>``).

    Example::

        >>> list_of(as_port)([80, "x"], ("ports",))
        Traceback (most recent call last):
        ...
        keyring_module.errors.ConfigError: ports.1: expected an integer, got 'x'
    """

    def read_list(value: object, path: Path) -> tuple[T, ...]:
        return tuple(read(item, path + (str(i),)) for i, item in enumerate(as_list(value, path)))

    return read_list


def as_str_list(value: object, path: Path) -> tuple[str, ...]:
    return list_of(as_str)(value, path)


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
    """An ed25519 key id (grammar in :mod:`keyring_module.keyids`)."""
    if not is_ed25519_key_id(value):
        raise ConfigError('expected a key id like "ed25519:a_AbC1", got %r' % (value,), path)
    return value


@attr.s(auto_attribs=True, frozen=True, slots=True)
class Setting:
    """How one YAML key of a section is read.

    Attributes:
        reader: turns the YAML value into the attribute's value, raising ConfigError.
            It may return None to mean "not given" (e.g. an empty address list), so that
            the config class's default applies.
        attribute: the config class attribute it fills; empty means the key's own name.
        required: leaving the key out (or null) is an error.
    """

    reader: Reader
    attribute: str = ""
    required: bool = False


def read_section(
    raw: object,
    path: Path,
    settings: Mapping[str, Setting],
    forbidden: Sequence[str] = (),
    why: str = "",
) -> dict[str, Any]:
    """Read the keys present in one mapping into keyword arguments for its config class.

    Keys left out or null are left out of the result, so that the config class's own
    defaults fill them in: each default is written once, in the class.

    Args:
        raw: the section's YAML value (None reads as an empty mapping).
        path: the section's key path, for error messages.
        settings: YAML key -> how to read it, in the order to read them.
        forbidden: keys refused here (with ``why``) instead of being unknown.
        why: the reason shown for a forbidden key.

    Returns:
        attribute name -> parsed value, for the keys given.

    Raises:
        ConfigError: a bad value, a missing required key, or a key not in ``settings``
            (the message lists the valid ones).

    Example::

        >>> settings = {"port": Setting(as_port, required=True), "tls": Setting(as_bool)}
        >>> read_section({"port": 8448}, ("listeners", "0"), settings)
        {'port': 8448}
        >>> read_section({"port": 8448, "tsl": True}, ("listeners", "0"), settings)
        Traceback (most recent call last):
        ...
        keyring_module.errors.ConfigError: listeners.0.tsl: unknown setting; valid settings here are: port, tls
    """
    section = as_mapping(raw, path)
    values: dict[str, Any] = {}
    for key, setting in settings.items():
        if section.get(key) is None:
            if setting.required:
                raise ConfigError("this setting is required", path + (key,))
            continue
        value = setting.reader(section[key], path + (key,))
        if value is not None:
            values[setting.attribute or key] = value
    for key in section:
        if key in forbidden:
            raise ConfigError("not allowed here: %s" % why, path + (str(key),))
        if key not in settings:
            raise ConfigError(
                "unknown setting; valid settings here are: %s" % ", ".join(sorted(settings)),
                path + (str(key),),
            )
    return values


def section_reader(
    config_class: Callable[..., T], settings: Mapping[str, Setting]
) -> Callable[[Any, Path], T]:
    """A reader of one mapping into ``config_class``, whose defaults fill in the rest.

    Example::

        >>> import attr
        >>> @attr.s(auto_attribs=True)
        ... class Listener:
        ...     port: int
        ...     tls: bool = False
        >>> read_listener = section_reader(Listener, {"port": Setting(as_port, required=True)})
        >>> read_listener({"port": 8448}, ("listeners", "0"))
        Listener(port=8448, tls=False)
    """

    def read(value: object, path: Path) -> T:
        return config_class(**read_section(value, path, settings))

    return read
