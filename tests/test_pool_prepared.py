"""Jobs whose arguments are built at hand-off (WorkerProcessPool.run_prepared)."""

import time
from typing import Any

from twisted.python.failure import Failure

from tests.test_events_in_processes import ProcessTestCase


class RunPreparedTests(ProcessTestCase):
    def test_waiting_jobs_hold_no_arguments(self) -> None:
        """Arguments are built only when a job is handed to the workers: with room for
        one job, queueing three builds one; the others are built as room frees."""
        pool = self.pool(max_in_flight=1)
        built: list[int] = []

        def prepare(n: int) -> Any:
            def build() -> tuple[Any, ...]:
                built.append(n)
                return (0.05 if n == 0 else 0,)

            return build

        ds = [pool.run_prepared(time.sleep, prepare(n)) for n in range(3)]
        self.assertEqual(built, [0])
        self.assertEqual((pool.in_flight, pool.waiting), (1, 2))
        self.assertEqual(self.wait_all(ds), [None, None, None])
        self.assertEqual(built, [0, 1, 2])

    def test_a_failing_prepare_fails_its_job_only(self) -> None:
        """What ``prepare`` raises fails that job; the next jobs still run."""
        pool = self.pool(max_in_flight=1)

        def broken() -> tuple[Any, ...]:
            raise ValueError("cannot encode")

        failed = pool.run_prepared(pow, broken)
        ok = pool.run_prepared(pow, lambda: (2, 4))
        result = self.wait(failed)
        self.assertIsInstance(result, Failure)
        self.assertIsInstance(result.value, ValueError)
        self.assertEqual(self.wait(ok), 16)
