"""logging.config_file must be usable, not just parse: check-config finds what
``fileConfig``/``dictConfig`` would fail on, without applying it, and serve (through
``setup_logging``) says the same instead of a bare ``KeyError: 'handler_h'``."""

import logging
import os

from twisted.trial.unittest import SynchronousTestCase

from keyring_module.config import LoggingConfig
from keyring_module.errors import ConfigError
from keyring_module.logconfig import setup_logging
from keyring_module.logging_checks import logging_config_problem

GOOD_INI = """\
[loggers]
keys=root,keyring
[handlers]
keys=console,file
[formatters]
keys=plain
[logger_root]
level=INFO
handlers=console
[logger_keyring]
qualname=keyring_module
handlers=file
[handler_console]
class=StreamHandler
args=(sys.stderr,)
formatter=plain
[handler_file]
class=handlers.RotatingFileHandler
args=(%(logfile)r, "a", 1000000, 3)
[formatter_plain]
format=%%(levelname)s %%(message)s
"""

GOOD_YAML = """\
version: 1
formatters:
  plain: {format: "%(levelname)s %(message)s"}
handlers:
  console: {class: logging.StreamHandler, formatter: plain, level: INFO}
  file: {class: logging.handlers.WatchedFileHandler, filename: %(logfile)s}
loggers:
  keyring_module: {handlers: [file], level: DEBUG}
root: {handlers: [console], level: WARNING}
"""


class LoggingCheckTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.logfile = os.path.join(self.directory, "keyring.log")

    def problem(self, name: str, text: str) -> "str | None":
        path = os.path.join(self.directory, name)
        with open(path, "w") as f:
            f.write(text)
        self.path = path
        problem = logging_config_problem(path)
        self.assertFalse(os.path.exists(self.logfile), "a log file was opened")
        return problem

    def unusable(self, reason: str) -> str:
        return "unusable logging configuration: %s (%s)" % (self.path, reason)

    def test_good_files(self) -> None:
        self.assertIsNone(
            self.problem("log.ini", GOOD_INI.replace("%(logfile)r", repr(self.logfile)))
        )
        self.assertIsNone(self.problem("log.yaml", GOOD_YAML.replace("%(logfile)s", self.logfile)))

    def test_ini_names_without_sections(self) -> None:
        ini = GOOD_INI.replace("%(logfile)r", repr(self.logfile))
        cases = [
            (
                ini.replace("[handler_file]", "[handler_other]"),
                "handler file has no [handler_file] section",
            ),
            (
                ini.replace("[logger_keyring]", "[logger_x]"),
                "logger keyring has no [logger_keyring] section",
            ),
            (
                ini.replace("[formatter_plain]", "[formatter_x]"),
                "formatter plain has no [formatter_plain] section",
            ),
            (ini.replace("keys=root,keyring", "keys=keyring"), "[loggers] keys must list root"),
            (
                ini.replace("handlers=console\n", "handlers=nope\n"),
                "[logger_root] uses handler nope, not listed in [handlers] keys",
            ),
            (
                ini.replace("formatter=plain", "formatter=fancy"),
                "[handler_console] uses formatter fancy, not listed in [formatters] keys",
            ),
            (ini.replace("qualname=keyring_module\n", ""), "[logger_keyring] has no qualname"),
            (ini.replace("level=INFO", "level=LOUD"), "[logger_root]: unknown level 'LOUD'"),
        ]
        for text, reason in cases:
            self.assertEqual(self.problem("log.ini", text), self.unusable(reason))

    def test_ini_classes_and_files(self) -> None:
        ini = GOOD_INI.replace("%(logfile)r", repr(self.logfile))
        problem = self.problem("log.ini", ini.replace("class=StreamHandler", "class=NoSuchHandler"))
        assert problem is not None
        self.assertTrue(
            problem.startswith(
                self.unusable("[handler_console]: class NoSuchHandler cannot be imported")[:-1]
            ),
            problem,
        )
        missing = os.path.join(self.directory, "no", "keyring.log")
        self.assertEqual(
            self.problem("log.ini", GOOD_INI.replace("%(logfile)r", repr(missing))),
            self.unusable("[handler_file]: folder not found: %s" % (os.path.dirname(missing),)),
        )

    def test_yaml(self) -> None:
        good = GOOD_YAML.replace("%(logfile)s", self.logfile)
        missing = os.path.join(self.directory, "no", "keyring.log")
        cases = [
            (
                GOOD_YAML.replace("%(logfile)s", missing),
                "handlers.file: folder not found: %s" % (os.path.dirname(missing),),
            ),
            (
                good.replace("handlers: [console]", "handlers: [nope]"),
                "root uses handler nope, not defined under handlers",
            ),
            (
                good.replace("formatter: plain", "formatter: fancy"),
                "handlers.console uses formatter fancy, not defined under formatters",
            ),
            (
                good.replace("level: DEBUG", "level: LOUD"),
                "loggers.keyring_module: unknown level 'LOUD'",
            ),
        ]
        for text, reason in cases:
            self.assertEqual(self.problem("log.yaml", text), self.unusable(reason))
        problem = self.problem("log.yaml", good.replace("logging.StreamHandler", "logging.NoSuch"))
        assert problem is not None
        self.assertIn("handlers.console: class logging.NoSuch cannot be imported", problem)
        problem = self.problem(
            "log.yaml", good.replace("logging.StreamHandler", "no_such_module.H")
        )
        assert problem is not None
        self.assertIn("handlers.console: class no_such_module.H cannot be imported", problem)

    def test_setup_logging_says_the_same(self) -> None:
        """setup_logging (serve, keys) reports the problem in check-config's words and
        leaves logging as it was."""
        text = GOOD_INI.replace("%(logfile)r", repr(self.logfile)).replace(
            "[handler_file]", "[handler_other]"
        )
        problem = self.problem("log.ini", text)
        root = logging.getLogger()
        handlers = list(root.handlers)
        with self.assertRaises(ConfigError) as caught:
            setup_logging(LoggingConfig(config_file=self.path))
        self.assertEqual(str(caught.exception), "logging.config_file: %s" % (problem,))
        self.assertEqual(root.handlers, handlers)
