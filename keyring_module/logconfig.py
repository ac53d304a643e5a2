"""Logging set-up for the standalone server and the CLI (``logging:`` in the config).

Either a level and a format::

    logging:
      level: INFO
      format: "%(asctime)s %(levelname)s %(name)s: %(message)s"

or a Python logging configuration file (``.yaml``/``.yml`` for ``dictConfig``, anything
else for ``fileConfig``)::

    logging:
      config_file: "/etc/keyring/log.yaml"

Twisted's own log events are routed to the standard ``logging`` module too, its
start/stop chatter at DEBUG (:mod:`keyring_module.twisted_logs`).
"""

import logging
import logging.config
import sys

from twisted.logger import STDLibLogObserver, globalLogBeginner

from keyring_module.config import LoggingConfig
from keyring_module.errors import ConfigError
from keyring_module.twisted_logs import ChatterDemotingObserver


def setup_logging(config: LoggingConfig, config_file_path: "str | None" = None) -> None:
    """Configure the root logger from ``config`` and send Twisted's logs to it.

    Args:
        config: the parsed ``logging:`` section.
        config_file_path: ``config.config_file`` resolved against the config's folder.
    """
    path = config_file_path or config.config_file
    if path:
        from keyring_module.file_checks import file_problem
        from keyring_module.logging_checks import logging_config_problem

        # Checked first, so that what the logging module would fail on is said in the
        # words check-config uses, not as a bare KeyError.
        problem = file_problem(path) or logging_config_problem(path)
        if problem:
            raise ConfigError(problem, ("logging", "config_file"))
        try:
            if path.endswith((".yaml", ".yml")):
                import yaml

                with open(path, encoding="utf-8") as f:
                    logging.config.dictConfig(yaml.safe_load(f))
            else:
                logging.config.fileConfig(path, disable_existing_loggers=False)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(
                "cannot use logging config file %s: %s" % (path, e), ("logging", "config_file")
            ) from None
    else:
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(config.format))
        root.addHandler(handler)
        root.setLevel(config.level)
    globalLogBeginner.beginLoggingTo(
        [ChatterDemotingObserver(STDLibLogObserver())], redirectStandardIO=False
    )
