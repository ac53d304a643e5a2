"""Whether a Python logging configuration file can be applied, found without applying
it (no handler opened, no logger touched).

``logging.config_file`` is a ``dictConfig`` YAML file (``.yaml``/``.yml``) or a
``fileConfig`` INI file. Parsing is not enough: ``fileConfig`` fails on a name listed
under ``keys=`` that has no section (with a bare ``KeyError: 'handler_h'``), both fail
on a handler class that cannot be imported and on a log file whose folder is missing.
:func:`logging_config_problem` finds those, in one phrase naming the file::

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "log.ini")
    >>> with open(path, "w") as f:
    ...     _ = f.write("[loggers]\\nkeys=root\\n[handlers]\\nkeys=h\\n[formatters]\\nkeys=\\n"
    ...                 "[logger_root]\\nhandlers=h\\n")
    >>> logging_config_problem(path) == (
    ...     "unusable logging configuration: %s (handler h has no [handler_h] section)" % path)
    True

What cannot be known without running the configuration (``args`` of an INI handler
that are not plain values, e.g. ``(sys.stderr,)``; filters; custom factories' own
checks) is left to ``serve``.
"""

import ast
import configparser
import importlib
import logging
import logging.handlers
import os
from typing import Any, Optional

from keyring_module.file_checks import folder_of, folder_problem


def logging_config_problem(path: str) -> Optional[str]:
    """Why the readable file ``path`` is not a usable logging configuration, or None.

    ``.yaml``/``.yml`` files must hold a ``dictConfig`` mapping (with ``version``);
    others are ``fileConfig`` INI files with ``[loggers]``, ``[handlers]`` and
    ``[formatters]``. Names used must be defined, classes importable, levels known and
    log files' folders writable.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        return "not a logging configuration: %s (%s)" % (path, e)
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            return "not valid YAML: %s (%s)" % (path, " ".join(str(e).split()))
        if not isinstance(loaded, dict) or "version" not in loaded:
            return "not a logging configuration: %s (expected a mapping with version: 1)" % (path,)
        reason = _dict_config_problem(loaded)
    else:
        parser = configparser.RawConfigParser()
        try:
            parser.read_string(text, source=path)
        except configparser.Error as e:
            return "not a logging configuration: %s (%s)" % (path, " ".join(str(e).split()))
        missing = [s for s in ("loggers", "handlers", "formatters") if not parser.has_section(s)]
        if missing:
            return "not a logging configuration: %s (no %s section)" % (
                path,
                ", ".join("[%s]" % s for s in missing),
            )
        reason = _ini_config_problem(parser)
    if reason is None:
        return None
    return "unusable logging configuration: %s (%s)" % (path, reason)


# ---------------------------------------------------------------------------
# Shared
# ---------------------------------------------------------------------------


def resolve_name(name: str, namespace: Optional[object] = None) -> object:
    """The object a dotted name names, importing modules as needed (as ``dictConfig``
    resolves ``class:``); with ``namespace``, a name found in it first (as
    ``fileConfig`` finds ``StreamHandler`` or ``handlers.RotatingFileHandler`` in
    ``logging``).

    Raises:
        ImportError: (or ValueError for an empty name) it names nothing.

    Example:
        >>> resolve_name("logging.handlers.WatchedFileHandler").__name__
        'WatchedFileHandler'
        >>> resolve_name("handlers.RotatingFileHandler", logging).__name__
        'RotatingFileHandler'
    """
    parts = name.strip().split(".")
    if not all(parts):
        raise ValueError("not a dotted name: %r" % (name,))
    if namespace is not None:
        found: object = namespace
        for part in parts:
            if not hasattr(found, part):
                break
            found = getattr(found, part)
        else:
            return found
    found = importlib.import_module(parts[0])
    for index, part in enumerate(parts[1:], start=1):
        if not hasattr(found, part):
            importlib.import_module(".".join(parts[: index + 1]))
        found = getattr(found, part)
    return found


def _class_problem(what: str, name: object, namespace: Optional[object] = None) -> Optional[str]:
    if not isinstance(name, str):
        return "%s: class is not a name: %r" % (what, name)
    try:
        found = resolve_name(name, namespace)
    except (ImportError, AttributeError, ValueError) as e:
        return "%s: class %s cannot be imported (%s)" % (what, name, e)
    if not callable(found):
        return "%s: class %s is not a class" % (what, name)
    return None


def _level_problem(what: str, level: object) -> Optional[str]:
    if isinstance(level, int) or (
        isinstance(level, str) and isinstance(logging.getLevelName(level), int)
    ):
        return None
    return "%s: unknown level %r" % (what, level)


def _log_file_problem(what: str, filename: object) -> Optional[str]:
    if not isinstance(filename, str):
        return None  # not a plain file name: left to serve
    problem = folder_problem(folder_of(filename), writable=True)
    if problem is None and os.path.exists(filename):  # never created here
        try:
            with open(filename, "a"):
                pass
        except OSError as e:
            problem = "cannot open %s (%s)" % (filename, e.strerror)
    return "%s: %s" % (what, problem) if problem else None


def _is_file_handler(cls: object) -> bool:
    return isinstance(cls, type) and issubclass(cls, logging.FileHandler)


def _names(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


# ---------------------------------------------------------------------------
# fileConfig (INI)
# ---------------------------------------------------------------------------


def _ini_config_problem(parser: configparser.RawConfigParser) -> Optional[str]:
    lists = {}
    for kind in ("loggers", "handlers", "formatters"):
        if not parser.has_option(kind, "keys"):
            return "[%s] has no keys" % (kind,)
        lists[kind] = _names(parser.get(kind, "keys"))
    for kind, names in lists.items():
        singular = kind[:-1]
        for name in names:
            if not parser.has_section("%s_%s" % (singular, name)):
                return "%s %s has no [%s_%s] section" % (singular, name, singular, name)
    if "root" not in lists["loggers"]:
        return "[loggers] keys must list root"
    for name in lists["formatters"]:
        section = "formatter_%s" % (name,)
        if parser.has_option(section, "class"):
            problem = _class_problem("[%s]" % section, parser.get(section, "class"))
            if problem:
                return problem
    for name in lists["handlers"]:
        problem = _ini_handler_problem(parser, name, lists)
        if problem:
            return problem
    for name in lists["loggers"]:
        section = "logger_%s" % (name,)
        if name != "root" and not parser.has_option(section, "qualname"):
            return "[%s] has no qualname" % (section,)
        if not parser.has_option(section, "handlers"):
            return "[%s] has no handlers (an empty handlers= will do)" % (section,)
        for handler in _names(parser.get(section, "handlers")):
            if handler not in lists["handlers"]:
                return "[%s] uses handler %s, not listed in [handlers] keys" % (section, handler)
        if parser.has_option(section, "level"):
            problem = _level_problem("[%s]" % section, parser.get(section, "level"))
            if problem:
                return problem
    return None


def _ini_handler_problem(
    parser: configparser.RawConfigParser, name: str, lists: dict[str, list[str]]
) -> Optional[str]:
    section = "handler_%s" % (name,)
    where = "[%s]" % (section,)
    if not parser.has_option(section, "class"):
        return "%s has no class" % (where,)
    class_name = parser.get(section, "class")
    problem = _class_problem(where, class_name, logging)
    if problem:
        return problem
    formatter = parser.get(section, "formatter", fallback="").strip()
    if formatter and formatter not in lists["formatters"]:
        return "%s uses formatter %s, not listed in [formatters] keys" % (where, formatter)
    if parser.has_option(section, "level"):
        problem = _level_problem(where, parser.get(section, "level"))
        if problem:
            return problem
    if _is_file_handler(resolve_name(class_name, logging)):
        try:
            args = ast.literal_eval(parser.get(section, "args", fallback="()"))
            kwargs = ast.literal_eval(parser.get(section, "kwargs", fallback="{}"))
        except (ValueError, SyntaxError):
            return None  # not plain values (e.g. sys.stderr): left to serve
        filename: Any = None
        if isinstance(args, tuple) and args:
            filename = args[0]
        elif isinstance(kwargs, dict):
            filename = kwargs.get("filename")
        return _log_file_problem(where, filename)
    return None


# ---------------------------------------------------------------------------
# dictConfig (YAML)
# ---------------------------------------------------------------------------


def _dict_section(config: dict[Any, Any], kind: str) -> "dict[Any, Any] | str":
    value = config.get(kind) or {}
    if not isinstance(value, dict):
        return "%s is not a mapping" % (kind,)
    for name, entry in value.items():
        if not isinstance(entry, dict):
            return "%s.%s is not a mapping" % (kind, name)
    return value


def _dict_config_problem(config: dict[Any, Any]) -> Optional[str]:
    sections = {}
    for kind in ("formatters", "filters", "handlers", "loggers"):
        section = _dict_section(config, kind)
        if isinstance(section, str):
            return section
        sections[kind] = section
    for name, formatter in sections["formatters"].items():
        class_name = formatter.get("()", formatter.get("class"))
        if class_name is not None and not callable(class_name):
            problem = _class_problem("formatters.%s" % (name,), class_name)
            if problem:
                return problem
    for name, handler in sections["handlers"].items():
        where = "handlers.%s" % (name,)
        if "()" in handler:
            continue  # a factory: what it takes is its own business
        if "class" not in handler:
            return "%s has no class" % (where,)
        problem = _class_problem(where, handler["class"])
        if problem:
            return problem
        formatter = handler.get("formatter")
        if formatter is not None and formatter not in sections["formatters"]:
            return "%s uses formatter %s, not defined under formatters" % (where, formatter)
        if "level" in handler:
            problem = _level_problem(where, handler["level"])
            if problem:
                return problem
        if _is_file_handler(resolve_name(handler["class"])):
            problem = _log_file_problem(where, handler.get("filename"))
            if problem:
                return problem
    loggers = [("loggers.%s" % (name,), entry) for name, entry in sections["loggers"].items()]
    if config.get("root") is not None:
        if not isinstance(config["root"], dict):
            return "root is not a mapping"
        loggers.append(("root", config["root"]))
    for where, logger in loggers:
        handlers = logger.get("handlers") or []
        if not isinstance(handlers, list):
            return "%s.handlers is not a list" % (where,)
        for handler in handlers:
            if handler not in sections["handlers"]:
                return "%s uses handler %s, not defined under handlers" % (where, handler)
        if "level" in logger:
            problem = _level_problem(where, logger["level"])
            if problem:
                return problem
    return None
