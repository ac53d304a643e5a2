"""``workers:`` and ``serve --workers``, the workers' heartbeats, and the arguments a
worker is started with."""

import contextlib
import io
import os
from typing import Any

from twisted.trial.unittest import TestCase

from keyring_module.cli import build_parser
from keyring_module.config import MAX_WORKERS, parse_config
from keyring_module.errors import ConfigError
from keyring_module.supervisor import remove_stale_run_dirs
from keyring_module.worker import InheritedSocket
from keyring_module.worker import build_parser as worker_parser
from keyring_module.worker_health import HEARTBEAT_STALE_S, Heartbeats, WorkersUnhealthyError


def _config(**more: Any) -> dict[str, Any]:
    return dict(
        {"server_name": "example.org", "signing_key_path": "k.key", "listeners": [{"port": 8}]},
        **more,
    )


class WorkersConfigTests(TestCase):
    """The ``workers`` setting."""

    def test_default_is_one_process(self) -> None:
        """Without ``workers`` the server runs as one process."""
        self.assertEqual(parse_config(_config()).workers, 1)

    def test_accepts_1_to_the_most(self) -> None:
        """``workers`` from 1 to MAX_WORKERS is read as given."""
        self.assertEqual(parse_config(_config(workers=4)).workers, 4)
        self.assertEqual(parse_config(_config(workers=MAX_WORKERS)).workers, MAX_WORKERS)

    def test_refuses_out_of_range_or_not_a_number(self) -> None:
        """0, more than MAX_WORKERS, and non-integers are refused, naming ``workers``."""
        for bad in (0, -1, MAX_WORKERS + 1, "two", 1.5, True):
            with self.assertRaises(ConfigError, msg=repr(bad)) as caught:
                parse_config(_config(workers=bad))
            self.assertEqual(caught.exception.path, ("workers",))

    def test_refused_inside_synapse(self) -> None:
        """``workers`` is standalone-only: a module config holding it is refused."""
        with self.assertRaises(ConfigError) as caught:
            parse_config({"signing_key_path": "k.key", "workers": 2}, standalone=False)
        self.assertIn("workers", str(caught.exception.path) + str(caught.exception))


class ServeWorkersArgumentTests(TestCase):
    """``serve --workers N``."""

    def test_reads_the_number(self) -> None:
        """``--workers 3`` is read as 3, and its absence as None (the config decides)."""
        parser = build_parser()
        self.assertEqual(parser.parse_args(["serve", "-c", "x", "--workers", "3"]).workers, 3)
        self.assertIsNone(parser.parse_args(["serve", "-c", "x"]).workers)

    def test_refuses_out_of_range(self) -> None:
        """0, MAX_WORKERS + 1 and words are usage errors (exit status 2)."""
        for bad in ("0", str(MAX_WORKERS + 1), "many"):
            with (
                self.assertRaises(SystemExit) as caught,
                contextlib.redirect_stderr(io.StringIO()) as err,
            ):
                build_parser().parse_args(["serve", "-c", "x", "--workers", bad])
            self.assertEqual(caught.exception.code, 2)
            self.assertIn("expected 1 to %d" % MAX_WORKERS, err.getvalue())


class WorkerArgumentsTests(TestCase):
    """What the supervisor passes to a worker."""

    def test_sockets_round_trip(self) -> None:
        """A ``--socket`` argument reads back as written, IPv6 addresses included."""
        for inherited in (InheritedSocket(3, 0, "127.0.0.1"), InheritedSocket(7, 2, "::1")):
            self.assertEqual(InheritedSocket.parse(inherited.argument()), inherited)

    def test_worker_command_line(self) -> None:
        """The worker's parser reads every argument the supervisor writes."""
        args = worker_parser().parse_args(
            "--config /c.yaml --index 1 --workers 2 --supervisor 9 --run-dir /r "
            "--socket 3:0:0.0.0.0 --socket 4:0:::".split()
        )
        self.assertEqual((args.index, args.workers, args.supervisor), (1, 2, 9))
        self.assertEqual(
            args.socket, [InheritedSocket(3, 0, "0.0.0.0"), InheritedSocket(4, 0, "::")]
        )


class HeartbeatsTests(TestCase):
    """The heartbeat files behind ``/health`` with workers."""

    def setUp(self) -> None:
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.beats = Heartbeats(self.directory, workers=2)

    def test_all_fresh_and_healthy(self) -> None:
        """Every worker reported recently without error: no problem, check passes."""
        self.beats.write(0, 10, None, 100.0)
        self.beats.write(1, 11, None, 100.5)
        self.assertEqual(self.beats.problems(101.0), [])
        self.beats.check(101.0)

    def test_missing_stale_and_failing_workers_are_named(self) -> None:
        """A worker without a file, one silent for longer than HEARTBEAT_STALE_S, and
        one whose store failed are each named; check raises with all of them."""
        self.beats.write(0, 10, None, 100.0)
        self.assertEqual(self.beats.problems(100.0), ["worker 1 is not running"])
        self.beats.write(1, 11, "database is locked", 100.0)
        self.assertEqual(self.beats.problems(100.0), ["worker 1: database is locked"])
        later = 100.0 + HEARTBEAT_STALE_S + 1
        self.beats.write(1, 11, None, later)
        self.assertEqual(
            self.beats.problems(later), ["worker 0 has not reported for %.1fs" % (later - 100)]
        )
        self.beats.clear(1)
        with self.assertRaises(WorkersUnhealthyError) as caught:
            self.beats.check(later)
        self.assertIn("worker 0 has not reported", str(caught.exception))
        self.assertIn("worker 1 is not running", str(caught.exception))

    def test_a_garbled_file_counts_as_missing(self) -> None:
        """An unreadable heartbeat is treated as no heartbeat, never as a crash."""
        with open(self.beats.path(0), "w") as f:
            f.write("{not json")
        self.beats.write(1, 11, None, 100.0)
        self.assertEqual(self.beats.problems(100.0), ["worker 0 is not running"])
        self.beats.clear(0)
        self.beats.clear(0)  # clearing twice is fine


class StaleRunDirsTests(TestCase):
    """Run folders of killed supervisors are removed at the next start."""

    def test_only_dead_supervisors_folders_are_removed(self) -> None:
        """A folder named after a pid that is gone is removed; one of a live process
        (ours) and unrelated folders are kept."""
        parent = self.mktemp()
        os.makedirs(parent)
        dead = os.path.join(parent, "keyring-workers-999999999-abc")
        live = os.path.join(parent, "keyring-workers-%d-abc" % os.getpid())
        other = os.path.join(parent, "keyring-other-1-abc")
        for path in (dead, live, other):
            os.makedirs(os.path.join(path, "health"))
        self.assertEqual(remove_stale_run_dirs(parent), [dead])
        self.assertFalse(os.path.exists(dead))
        self.assertTrue(os.path.exists(live))
        self.assertTrue(os.path.exists(other))
