"""Reading a configuration file: YAML, then relative paths made absolute once.

Relative paths in a config file are relative to the file's folder, except the data
paths (``signing_key_path`` and the SQLite ``database.path``), which are relative to
``data_dir`` (itself relative to the file's folder, and by default that folder). After
:func:`load_config_file` every path in the config is absolute, so nothing else resolves
paths. A Synapse module's ``config:`` block has no file: its paths are relative to the
working directory, and its data paths to ``data_dir`` when it is given
(:func:`resolve_data_paths`)::

    config = load_config_file("/etc/keyring/keyring.yaml")
    config.signing_key_path   # '/etc/keyring/notary.signing.key'
    # with data_dir: /var/lib/keyring in the file:
    config.signing_key_path   # '/var/lib/keyring/notary.signing.key'
"""

import os
from typing import Collection, Optional

import attr

from keyring_module.config import KeyringConfig, parse_config
from keyring_module.errors import ConfigError

_SQLITE_IN_MEMORY = ":memory:"


def resolve_path(base_dir: str, path: str) -> str:
    """``path`` itself if absolute, else ``path`` under ``base_dir``.

    Example::

        >>> resolve_path("/etc/keyring", "keys/notary.signing.key")
        '/etc/keyring/keys/notary.signing.key'
        >>> resolve_path("/etc/keyring", "/var/lib/keyring/keyring.db")
        '/var/lib/keyring/keyring.db'
    """
    return path if os.path.isabs(path) else os.path.join(base_dir, path)


def _resolve_optional_path(base_dir: str, path: Optional[str]) -> Optional[str]:
    return None if path is None else resolve_path(base_dir, path)


def resolve_data_paths(config: KeyringConfig, data_dir: str) -> KeyringConfig:
    """The same config with its relative data paths made relative to ``data_dir``.

    The data paths are the ones the server writes: ``signing_key_path`` (created when
    missing) and ``database.path`` (SQLite only, and never ``:memory:``). ``data_dir``
    is kept in the result.

    Example::

        >>> config = parse_config({"signing_key_path": "k.key"}, standalone=False)
        >>> resolved = resolve_data_paths(config, "/var/lib/keyring")
        >>> resolved.signing_key_path, resolved.database.path, resolved.data_dir
        ('/var/lib/keyring/k.key', '/var/lib/keyring/keyring.db', '/var/lib/keyring')
    """
    database = config.database
    if database.backend == "sqlite" and database.path != _SQLITE_IN_MEMORY:
        database = attr.evolve(database, path=resolve_path(data_dir, database.path))
    return attr.evolve(
        config,
        data_dir=data_dir,
        signing_key_path=resolve_path(data_dir, config.signing_key_path),
        database=database,
    )


def resolve_relative_paths(config: KeyringConfig, base_dir: str) -> KeyringConfig:
    """The same config with every relative file path made absolute.

    ``data_dir`` resolves under ``base_dir`` (and is ``base_dir`` when not given); the
    data paths, ``signing_key_path`` and ``database.path`` (SQLite only, and never
    ``:memory:``), resolve under ``data_dir``. The other paths, each listener's
    ``tls_certificate_path``/``tls_private_key_path``, ``federation.ca_file`` and
    ``logging.config_file``, resolve under ``base_dir``. Absolute paths stay as they are.

    Example::

        >>> config = parse_config({"signing_key_path": "k.key"}, standalone=False)
        >>> resolved = resolve_relative_paths(config, "/etc/keyring")
        >>> resolved.signing_key_path, resolved.database.path
        ('/etc/keyring/k.key', '/etc/keyring/keyring.db')
        >>> config = parse_config(
        ...     {"signing_key_path": "k.key", "data_dir": "/var/lib/keyring"}, standalone=False)
        >>> resolve_relative_paths(config, "/etc/keyring").signing_key_path
        '/var/lib/keyring/k.key'
    """
    data_dir = os.path.normpath(resolve_path(base_dir, config.data_dir or "."))
    config = resolve_data_paths(config, data_dir)
    listeners = tuple(
        attr.evolve(
            listener,
            tls_certificate_path=_resolve_optional_path(base_dir, listener.tls_certificate_path),
            tls_private_key_path=_resolve_optional_path(base_dir, listener.tls_private_key_path),
        )
        for listener in config.listeners
    )
    return attr.evolve(
        config,
        listeners=listeners,
        federation=attr.evolve(
            config.federation,
            ca_file=_resolve_optional_path(base_dir, config.federation.ca_file),
        ),
        logging=attr.evolve(
            config.logging,
            config_file=_resolve_optional_path(base_dir, config.logging.config_file),
        ),
    )


def load_config_file(
    path: str, standalone: bool = True, *, ignore: Collection[str] = ()
) -> KeyringConfig:
    """Read a YAML file and parse it, with relative paths made relative to its folder
    (data paths to ``data_dir``, see :func:`resolve_relative_paths`).

    Args:
        path: the YAML file.
        standalone: as for :func:`parse_config`.
        ignore: top-level keys to leave unread (e.g. ``keyring-module query`` reads a
            standalone config and a module's block alike, without ``server_name`` and
            ``listeners``).

    Raises:
        ConfigError: the file cannot be read, is not valid YAML, sets a key twice in
            one mapping (:mod:`keyring_module.yaml_strict`), or is not a valid
            configuration.
    """
    import yaml

    from keyring_module.yaml_strict import load_yaml_strict

    try:
        with open(path, encoding="utf-8") as f:
            raw = load_yaml_strict(f, path)
    except OSError as e:
        raise ConfigError("cannot read config file %s: %s" % (path, e.strerror)) from None
    except yaml.YAMLError as e:
        raise ConfigError("%s is not valid YAML: %s" % (path, e)) from None
    if raw is None:
        raw = {}
    if ignore and isinstance(raw, dict):
        raw = {key: value for key, value in raw.items() if key not in ignore}
    config = parse_config(raw, standalone=standalone)
    return resolve_relative_paths(config, os.path.dirname(os.path.abspath(path)))
