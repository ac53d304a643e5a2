"""The PostgreSQL tests without the driver: skipped with a message saying what is
missing, or failed under ``CI=true`` (no skips in CI), never an import error.

Each case runs ``trial`` in a child process whose ``sys.meta_path`` refuses to import
``psycopg2``, as a virtualenv installed without the ``postgres`` extra would.
"""

import os
import subprocess
import sys
from typing import Mapping

from twisted.trial.unittest import SynchronousTestCase

from tests.storage_writer import POSTGRES_DRIVER_HINT, POSTGRES_DSN_ENV, postgres_driver_missing

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every test that needs a PostgreSQL server or the driver.
POSTGRES_TESTS = [
    "tests.test_storage.PostgresKeyStoreTests",
    "tests.test_storage.PostgresUnavailableTests",
    "tests.test_store_merge.PostgresStoreMergeTests",
]

# The child refuses psycopg2 (and its submodules), then runs trial on argv[1:].
REFUSE_PSYCOPG2 = """
import sys

class RefusePsycopg2:
    def find_spec(self, name, path=None, target=None):
        if name == "psycopg2" or name.startswith("psycopg2."):
            raise ModuleNotFoundError("No module named %r" % name, name=name)
        return None

sys.meta_path.insert(0, RefusePsycopg2())
"""
CHILD = (
    REFUSE_PSYCOPG2
    + """
from twisted.scripts.trial import run
sys.argv = ["trial"] + sys.argv[1:]
run()
"""
)


class PostgresDriverMissingTests(SynchronousTestCase):
    """``trial`` on the PostgreSQL tests in a process where psycopg2 cannot be imported."""

    def run_child(self, env_changes: Mapping[str, str], code: str, *args: str) -> tuple[int, str]:
        """Run ``code`` (with ``args``) without psycopg2; return its exit status and output."""
        env = {k: v for k, v in os.environ.items() if k not in ("CI", POSTGRES_DSN_ENV)}
        env.update(env_changes)
        env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.run(
            [sys.executable, "-c", code, *args],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=120,
        )
        return proc.returncode, proc.stdout.decode("utf-8", "replace")

    def run_trial(self, env_changes: Mapping[str, str], *names: str) -> tuple[int, str]:
        """Run trial on ``names`` without psycopg2; return its exit status and output."""
        temp = os.path.abspath(self.mktemp())
        return self.run_child(env_changes, CHILD, "--temp-directory", temp, *names)

    def test_child_cannot_import_psycopg2(self) -> None:
        """The child process really has no psycopg2 (else the other tests prove nothing)."""
        probe = REFUSE_PSYCOPG2 + (
            "from tests.storage_writer import postgres_driver_missing\n"
            "print(postgres_driver_missing())\n"
            "import psycopg2\n"
        )
        code, out = self.run_child({}, probe)
        self.assertNotEqual(code, 0, out)
        self.assertIn(POSTGRES_DRIVER_HINT, out)
        self.assertIn("ModuleNotFoundError: No module named 'psycopg2'", out)
        if postgres_driver_missing() is None:
            # Where the driver is installed, the child imports it without the blocker:
            # the blocker, not the venv, is what refused it.
            code, out = self.run_child({}, "import psycopg2")
            self.assertEqual(code, 0, out)

    def test_storage_modules_import_without_the_driver(self) -> None:
        """The store test modules import, and only their PostgreSQL tests skip."""
        code, out = self.run_trial(
            {POSTGRES_DSN_ENV: "host=127.0.0.1 dbname=nothing"}, *POSTGRES_TESTS
        )
        self.assertEqual(code, 0, out)
        self.assertNotIn("[ERROR]", out)
        self.assertNotIn("[FAIL]", out)
        self.assertRegex(out, r"PASSED \(skips=\d+\)")
        self.assertIn(POSTGRES_DRIVER_HINT, out)

    def test_missing_driver_and_dsn_are_both_named(self) -> None:
        """Without driver and DSN, the skip message names both."""
        code, out = self.run_trial({}, "tests.test_storage.PostgresKeyStoreTests")
        self.assertEqual(code, 0, out)
        self.assertRegex(out, r"PASSED \(skips=\d+\)")
        self.assertIn(POSTGRES_DRIVER_HINT, out)
        self.assertIn("%s is not set" % POSTGRES_DSN_ENV, out)

    def test_ci_fails_instead_of_skipping(self) -> None:
        """Under ``CI=true`` a missing driver fails every PostgreSQL test: none is skipped."""
        code, out = self.run_trial(
            {"CI": "true", POSTGRES_DSN_ENV: "host=127.0.0.1 dbname=nothing"}, *POSTGRES_TESTS
        )
        self.assertNotEqual(code, 0, out)
        self.assertIn("CI=true but the PostgreSQL tests cannot run: %s" % POSTGRES_DRIVER_HINT, out)
        self.assertNotIn("[SKIPPED]", out)
        self.assertNotIn("[OK]", out)
        self.assertIn("FAILED (", out)
