"""The start-up checks: every problem ``serve`` would meet before it listens, found
without listening.

``keyring-module check-config`` and ``keyring-module serve`` run the same checks, and the
Synapse module runs the ones that apply to it from its ``parse_config``, so a config
that passes ``check-config`` does not fail at start for a file, a folder, a TLS
certificate, a CA bundle, a logging config or a key id, and each problem reads the same
everywhere: one line, ``path.to.key: problem``, all of them at once::

    $ keyring-module check-config --config /etc/keyring/config.yaml
    keyring-module: signing_key_path: folder not writable: /etc/keyring (Read-only file system)
    keyring-module: listeners.0.tls_certificate_path: file not found: /etc/keyring/cert.pem
    $ echo $?
    1

What is checked:

* ``data_dir`` is a folder (if not, the files in it are not checked further);
  ``signing_key_path`` is a readable key file whose key ids
  are not also ``old_signing_keys`` ids, or (standalone, where it is created) its
  folder exists and is writable; inside Synapse it must exist.
* every TLS listener's certificate (chain) and private key are readable PEM and match.
* SQLite: the database's folder exists and is writable (SQLite writes its journal
  next to the file) and an existing file is readable and writable and, unless empty,
  an SQLite database (its first bytes say so). PostgreSQL: the
  driver is installed. The database is not connected to: a database that is down at
  check time may be up at start, and the reverse; ``serve`` reports that itself
  (``database: ...``).
* ``federation.ca_file`` is readable and holds at least one PEM certificate.
* ``logging.config_file`` (standalone) is readable, parses (YAML mapping with a
  ``version`` for ``.yaml``/``.yml``, otherwise an INI file with ``[loggers]``,
  ``[handlers]`` and ``[formatters]``) and can be applied: names used are defined,
  handler and formatter classes import, levels are known, log files' folders are
  writable (:mod:`keyring_module.logging_checks`; it is not applied).
* no two listen addresses (of the listeners and the metrics listener) overlap on one
  port: the same address, ``0.0.0.0`` and any IPv4 address, ``::`` and any IPv6
  address, and ``::`` and any IPv4 address while ``net.ipv6.bindv6only`` is 0
  (Linux's default, where ``::`` listens on IPv4 too).

``check-config`` also warns, without failing, about a listener port below
``net.ipv4.ip_unprivileged_port_start`` when it runs without root or
``CAP_NET_BIND_SERVICE`` (:func:`startup_warnings`).

What is not checked: whether a port is free (only binding tells), and what a user
other than the one running the check may do: run it as the user ``serve`` runs as.
Writability is probed by creating and removing an empty file, so the answer is the
operating system's (read-only mounts and root included), not a guess from mode bits.
"""

import os
import sys
from typing import IO, Optional, Sequence

from keyring_module.config import KeyringConfig, ListenerConfig
from keyring_module.config_values import Path
from keyring_module.errors import ConfigError
from keyring_module.file_checks import file_problem, folder_of, folder_problem
from keyring_module.logging_checks import logging_config_problem
from keyring_module.server_tls import TLSFilesError, load_tls_server_context

__all__ = [
    "StartupProblems",
    "check_startup",
    "report_problems",
    "startup_problems",
    "startup_warnings",
]

_SQLITE_IN_MEMORY = ":memory:"
#: The first bytes of every SQLite 3 database file.
_SQLITE_HEADER = b"SQLite format 3\0"


class StartupProblems(ConfigError):
    """Every start-up problem found, each a :class:`ConfigError` naming its key.

    ``str()`` is one ``path.to.key: problem`` line per problem.

    Example:
        >>> error = StartupProblems([ConfigError("file not found: /x", ("federation", "ca_file"))])
        >>> str(error)
        'federation.ca_file: file not found: /x'
    """

    def __init__(self, problems: Sequence[ConfigError]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


def check_startup(config: KeyringConfig, *, standalone: bool = True) -> None:
    """Run every start-up check.

    Args:
        config: a parsed config whose paths are as they will be opened (after
            :func:`~keyring_module.config_file.load_config_file` for a file).
        standalone: ``serve`` (True) or the Synapse module (False), where the signing
            key must exist and listeners and logging are the homeserver's.

    Raises:
        StartupProblems: listing every problem found.
    """
    problems = startup_problems(config, standalone=standalone)
    if problems:
        raise StartupProblems(problems)


def startup_problems(config: KeyringConfig, *, standalone: bool = True) -> list[ConfigError]:
    """Every problem :func:`check_startup` would raise, in the config's order.

    Example:
        >>> from keyring_module.config import parse_config
        >>> config = parse_config(
        ...     {"signing_key_path": "/nowhere/k.key", "database": {"path": ":memory:"}},
        ...     standalone=False,
        ... )
        >>> [str(p) for p in startup_problems(config, standalone=False)]
        ['signing_key_path: file not found: /nowhere/k.key']
    """
    problems: list[ConfigError] = []
    broken_data_dir = None
    if config.data_dir is not None:
        problem = folder_problem(config.data_dir, writable=False)
        if problem:
            problems.append(ConfigError(problem, ("data_dir",)))
            broken_data_dir = os.path.join(os.path.abspath(config.data_dir), "")

    def in_broken_data_dir(path: str) -> bool:
        # The data_dir line says it all for the files in it.
        return broken_data_dir is not None and os.path.abspath(path).startswith(broken_data_dir)

    if not in_broken_data_dir(config.signing_key_path):
        problems.extend(_signing_key_problems(config, standalone))
    if standalone:
        for index, listener in enumerate(config.listeners):
            problems.extend(_listener_problems(listener, ("listeners", str(index))))
        problems.extend(_address_clashes(config))
    if config.database.backend != "sqlite" or not in_broken_data_dir(config.database.path):
        problems.extend(_database_problems(config))
    if config.federation.ca_file is not None:
        problems.extend(_ca_file_problems(config.federation.ca_file))
    if standalone and config.logging.config_file is not None:
        problems.extend(_logging_file_problems(config.logging.config_file))
    return problems


def startup_warnings(config: KeyringConfig) -> list[ConfigError]:
    """What may stop ``serve`` but cannot be known here, for ``check-config`` to print
    without failing: a listener port that needs privilege this user lacks (the service
    may be given ``CAP_NET_BIND_SERVICE`` by its unit;
    :mod:`keyring_module.privileged_ports`)."""
    from keyring_module.privileged_ports import (
        may_bind_privileged_ports,
        privileged_port_warning,
        unprivileged_port_start,
    )

    start, may_bind = unprivileged_port_start(), may_bind_privileged_ports()
    places: list[tuple[Path, int]] = [
        (("listeners", str(i)), listener.port) for i, listener in enumerate(config.listeners)
    ]
    if config.metrics.enabled:
        places.append((("metrics",), config.metrics.port))
    warnings = []
    for path, port in places:
        warning = privileged_port_warning(port, start, may_bind)
        if warning:
            warnings.append(ConfigError(warning, path))
    return warnings


def report_problems(
    problems: Sequence[ConfigError], out: Optional[IO[str]] = None, prog: str = "keyring-module"
) -> None:
    """Print one ``prog: path.to.key: problem`` line per problem (to stderr by default),
    the way every other config error of the command line is printed."""
    stream = out if out is not None else sys.stderr
    for problem in problems:
        print("%s: %s" % (prog, problem), file=stream)


# ---------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------


def _signing_key_problems(config: KeyringConfig, standalone: bool) -> list[ConfigError]:
    from keyring_module.signing import OwnKeys, load_signing_keys

    path = config.signing_key_path
    where = ("signing_key_path",)
    if not os.path.lexists(path) and standalone:
        # serve creates the file: its folder must exist and be writable.
        problem = folder_problem(folder_of(path), writable=True)
        return [ConfigError(problem, where)] if problem else []
    problem = file_problem(path)
    if problem:
        return [ConfigError(problem, where)]
    try:
        keys = load_signing_keys(path)
        OwnKeys(config.server_name or "", keys, config.old_signing_keys)
    except ConfigError as e:
        return [e]
    return []


def _listener_problems(listener: ListenerConfig, path: Path) -> list[ConfigError]:
    if not listener.tls:
        return []
    assert listener.tls_certificate_path and listener.tls_private_key_path
    try:
        load_tls_server_context(
            listener.tls_certificate_path, listener.tls_private_key_path, setting_path=path
        )
    except TLSFilesError as e:
        return list(e.problems)
    return []


def _address_clashes(config: KeyringConfig) -> list[ConfigError]:
    """Two listen sockets whose addresses overlap on one port: the later would fail to
    listen (see :mod:`keyring_module.listen_addresses`)."""
    from keyring_module import listen_addresses

    dual_stack = listen_addresses.ipv6_dual_stack()
    used: list[tuple[str, int, str]] = []  # (address, port, setting), in bind order
    problems = []
    places: list[tuple[Path, int, tuple[str, ...]]] = [
        (("listeners", str(i)), listener.port, listener.bind_addresses)
        for i, listener in enumerate(config.listeners)
    ]
    if config.metrics.enabled:
        places.append((("metrics",), config.metrics.port, config.metrics.bind_addresses))
    for path, port, addresses in places:
        if port == 0:  # any free port: never a clash
            continue
        for address in addresses:
            for used_address, used_port, first in used:
                if used_port != port:
                    continue
                reason = listen_addresses.clash_reason(address, used_address, dual_stack)
                if reason == "the same address":
                    problems.append(
                        ConfigError("%s port %d is also used by %s" % (address, port, first), path)
                    )
                    break
                if reason is not None:
                    problems.append(
                        ConfigError(
                            "%s port %d clashes with %s port %d of %s (%s)"
                            % (address, port, used_address, port, first, reason),
                            path,
                        )
                    )
                    break
            used.append((address, port, ".".join(path)))
    return problems


def _database_problems(config: KeyringConfig) -> list[ConfigError]:
    database = config.database
    if database.backend == "postgres":
        from keyring_module.storage.errors import StorageError
        from keyring_module.storage.postgres import postgres_dialect

        try:
            postgres_dialect()
        except StorageError as e:
            return [ConfigError(str(e), ("database",))]
        return []
    if database.path == _SQLITE_IN_MEMORY:
        return []
    where = ("database", "path")
    # SQLite writes its journal (and WAL files) next to the database file.
    problem = folder_problem(folder_of(database.path), writable=True)
    if problem is None and os.path.exists(database.path):
        problem = file_problem(database.path)
        if problem is None:
            try:
                with open(database.path, "r+b") as f:
                    header = f.read(len(_SQLITE_HEADER))
            except OSError as e:
                problem = "file not writable: %s (%s)" % (database.path, e.strerror)
            else:
                # An empty file is a new database to SQLite; anything else must be one.
                if header and header != _SQLITE_HEADER:
                    problem = "not an SQLite database: %s" % (database.path,)
    return [ConfigError(problem, where)] if problem else []


def _ca_file_problems(path: str) -> list[ConfigError]:
    from keyring_module.http import TLSError
    from keyring_module.http.tls import load_pem_certificates

    where = ("federation", "ca_file")
    problem = file_problem(path)
    if problem:
        return [ConfigError(problem, where)]
    try:
        load_pem_certificates(path)
    except TLSError as e:
        return [ConfigError(str(e), where)]
    return []


def _logging_file_problems(path: str) -> list[ConfigError]:
    where = ("logging", "config_file")
    problem = file_problem(path) or logging_config_problem(path)
    return [ConfigError(problem, where)] if problem else []
