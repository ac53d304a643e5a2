"""The keyring's metrics in prometheus_client's multiprocess mode, as workers write
them and the supervisor sums them (each "worker" here is a short Python process)."""

import os
import subprocess
import sys

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from twisted.trial.unittest import TestCase

from tests.serve_processes import REPO_ROOT

#: What one "worker" does: count requests, watch gauges, copy them in once.
_WORKER = """
import os, sys
from prometheus_client import CollectorRegistry
from keyring_module.metrics import Metrics
in_flight, backed_off, requests = (int(a) for a in sys.argv[1:])
metrics = Metrics(CollectorRegistry())
metrics.watch_fetch_slots(lambda: in_flight, lambda: 0)
metrics.watch_backed_off(lambda: backed_off)
metrics.notary_request("query", 200)[0].inc(requests)
metrics.refresh_watched()
print(os.getpid())
"""


class MultiprocessMetricsTests(TestCase):
    """Counters sum over every worker; watched gauges over the live ones."""

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def worker(self, in_flight: int, backed_off: int, requests: int) -> int:
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=self.directory, PYTHONPATH=REPO_ROOT)
        out = subprocess.run(
            [sys.executable, "-c", _WORKER, str(in_flight), str(backed_off), str(requests)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return int(out.stdout.strip())

    def scrape(self) -> dict[str, float]:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.directory)
        values: dict[str, float] = {}
        for line in generate_latest(registry).decode().splitlines():
            if line.startswith("keyring_") and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def test_gauges_are_copied_in_and_summed_over_live_workers(self) -> None:
        """Two workers' watched gauges (3 and 4 fetches in flight) read 7; once the
        first is marked dead, 4; their request counters (5 + 6) stay summed."""
        first = self.worker(in_flight=3, backed_off=2, requests=5)
        self.worker(in_flight=4, backed_off=0, requests=6)
        values = self.scrape()
        self.assertEqual(values["keyring_fetches_in_flight"], 7)
        self.assertEqual(values["keyring_origins_backed_off"], 2)
        self.assertEqual(values['keyring_notary_requests_total{code="200",endpoint="query"}'], 11)
        mark_process_dead(first, self.directory)
        values = self.scrape()
        self.assertEqual(values["keyring_fetches_in_flight"], 4)
        self.assertEqual(values["keyring_origins_backed_off"], 0)
        self.assertEqual(values['keyring_notary_requests_total{code="200",endpoint="query"}'], 11)
