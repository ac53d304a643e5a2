"""The minimum-versions constraints file pins exactly the minimums setup.cfg declares.

``.ci/minimum-constraints.txt`` is what the ``py310-minimums`` tox env and CI install
with, so the suite runs at the declared minimums; this test keeps the two in step.
"""

import configparser
import os
import re

from twisted.trial.unittest import SynchronousTestCase

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONSTRAINTS = os.path.join(".ci", "minimum-constraints.txt")

# "Twisted[tls] >= 26.4.0" -> name, extras, operator, version (and an environment
# marker, e.g. "; platform_python_implementation == 'CPython'", which is left aside)
_REQUIREMENT = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*"
    r"(?P<op>==|>=)\s*(?P<version>[0-9][0-9A-Za-z.]*)\s*(?:;.*)?$"
)


def normalise_name(name: str) -> str:
    """A distribution name as PEP 503 compares them.

    >>> normalise_name("Prometheus_Client")
    'prometheus-client'
    """
    return re.sub(r"[-_.]+", "-", name).lower()


def normalise_version(version: str) -> tuple[int, ...]:
    """A release number without trailing zeros, so that ``0.14`` equals ``0.14.0``.

    >>> normalise_version("0.14") == normalise_version("0.14.0")
    True
    """
    parts = [int(p) for p in version.split(".")]
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def requirement_lines(text: str) -> list[str]:
    """The non-empty, non-comment lines of a requirement list."""
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def parse(line: str, op: str) -> tuple[str, tuple[int, ...]]:
    """``(normalised name, normalised version)`` of a ``name OP version`` line.

    Raises:
        ValueError: the line is not of that form.
    """
    match = _REQUIREMENT.match(line)
    if match is None or match["op"] != op:
        raise ValueError("expected 'name %s version', got %r" % (op, line))
    return normalise_name(match["name"]), normalise_version(match["version"])


def declared_minimums() -> dict[str, tuple[int, ...]]:
    """Every runtime requirement of setup.cfg (install_requires and the postgres
    extra), each of which must have a ``>=`` floor."""
    config = configparser.ConfigParser()
    config.read(os.path.join(REPO_ROOT, "setup.cfg"))
    lines = requirement_lines(config["options"]["install_requires"])
    lines += requirement_lines(config["options.extras_require"]["postgres"])
    return dict(parse(line, ">=") for line in lines)


def pinned_minimums() -> dict[str, tuple[int, ...]]:
    """What the constraints file pins, each line ``name == version``."""
    with open(os.path.join(REPO_ROOT, CONSTRAINTS)) as f:
        return dict(parse(line, "==") for line in requirement_lines(f.read()))


class MinimumConstraintsTests(SynchronousTestCase):
    """setup.cfg, the constraints file and tox.ini agree on the tested minimums."""

    def test_constraints_pin_every_declared_minimum(self) -> None:
        """The constraints file pins each runtime dependency at its declared floor, no more."""
        declared = declared_minimums()
        self.assertIn("twisted", declared)
        self.assertIn("psycopg2-binary", declared)
        self.assertEqual(pinned_minimums(), declared)

    def test_parse_refuses_a_requirement_without_a_floor(self) -> None:
        """A requirement without ``>=`` (so no tested minimum) is refused, not skipped."""
        self.assertEqual(parse("Twisted[tls] >= 26.4.0", ">="), ("twisted", (26, 4)))
        marked = "orjson >= 3.9.0; platform_python_implementation == 'CPython'"
        self.assertEqual(parse(marked, ">="), ("orjson", (3, 9)))
        for line in ("attrs", "attrs > 22.2.0", "attrs ~= 22.2", "attrs >= 22.2.0, < 30"):
            with self.assertRaises(ValueError):
                parse(line, ">=")

    def test_tox_minimums_env_installs_with_the_constraints(self) -> None:
        """The tox env for the minimums installs with this constraints file."""
        config = configparser.ConfigParser(interpolation=None)
        config.read(os.path.join(REPO_ROOT, "tox.ini"))
        env = config["testenv:py310-minimums"]
        self.assertEqual(env["basepython"].strip(), "python3.10")
        self.assertIn("-c {toxinidir}/" + CONSTRAINTS.replace(os.sep, "/"), env["install_command"])
