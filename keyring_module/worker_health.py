"""Heartbeats of the worker processes, and ``/health`` across all of them.

With ``workers: N`` (N > 1) every worker writes a small JSON file into the
supervisor's run folder once a second: its pid, the time, and whether its key store
answered (the check ``/health`` runs in one process). A worker's ``/health`` answers
200 only when its own store answers and every worker's file is there, fresh (written
within :data:`HEARTBEAT_STALE_S`) and healthy; otherwise 503 naming the workers at
fault. The supervisor removes a worker's file as soon as the worker ends, so a dead
worker shows at once, and a hung one (no longer writing) within
:data:`HEARTBEAT_STALE_S`.

Example::

    heartbeats = Heartbeats("/tmp/keyring-workers-x/health", workers=2)
    heartbeats.write(0, pid=4242, error=None, now=1700000000.0)
    heartbeats.problems(now=1700000001.0)
    # ['worker 1 is not running']
"""

import json
import os
from typing import Any, Optional

#: How often a worker writes its heartbeat.
HEARTBEAT_INTERVAL_S = 1.0
#: A heartbeat older than this marks its worker unhealthy (hung, or stopped).
HEARTBEAT_STALE_S = 5.0


def metrics_dir(run_dir: str) -> str:
    """The folder of the supervisor's run folder ``run_dir`` where the workers write
    their metrics files (prometheus_client's multiprocess mode).

    Example::

        >>> metrics_dir("/tmp/keyring-workers-x")
        '/tmp/keyring-workers-x/metrics'
    """
    return os.path.join(run_dir, "metrics")


class WorkersUnhealthyError(Exception):
    """Some worker is missing, silent or unhealthy (the message names them)."""


class Heartbeats:
    """The heartbeat files of ``workers`` workers in ``directory``.

    Args:
        directory: a folder only the supervisor and its workers use.
        workers: how many workers there should be (indices ``0..workers-1``).
    """

    def __init__(self, directory: str, workers: int) -> None:
        self.directory = directory
        self.workers = workers

    @classmethod
    def of_run_dir(cls, run_dir: str, workers: int) -> "Heartbeats":
        """The heartbeats in the supervisor's run folder ``run_dir`` (its ``health``
        folder).

        Example::

            >>> Heartbeats.of_run_dir("/tmp/keyring-workers-x", 2).directory
            '/tmp/keyring-workers-x/health'
        """
        return cls(os.path.join(run_dir, "health"), workers)

    def path(self, index: int) -> str:
        """The heartbeat file of worker ``index``."""
        return os.path.join(self.directory, "worker-%d.json" % (index,))

    def write(self, index: int, pid: int, error: Optional[str], now: float) -> None:
        """Record that worker ``index`` (process ``pid``) is alive at ``now`` (seconds
        since the epoch); ``error`` is why its store check failed, or None."""
        path = self.path(index)
        partial = "%s.%d.tmp" % (path, pid)
        with open(partial, "w") as f:
            json.dump({"pid": pid, "ts": now, "error": error}, f)
        os.replace(partial, path)  # readers never see half a file

    def read(self, index: int) -> Optional[dict[str, Any]]:
        """Worker ``index``'s last heartbeat, or None if it has none (or it is unreadable)."""
        try:
            with open(self.path(index)) as f:
                beat = json.load(f)
        except (OSError, ValueError):
            return None
        return beat if isinstance(beat, dict) else None

    def clear(self, index: int) -> None:
        """Remove worker ``index``'s heartbeat (it ended)."""
        try:
            os.remove(self.path(index))
        except FileNotFoundError:
            pass

    def problems(self, now: float) -> list[str]:
        """What is wrong with the workers at ``now``: one line per worker at fault.

        Example::

            >>> import tempfile
            >>> beats = Heartbeats(tempfile.mkdtemp(), workers=2)
            >>> beats.write(0, pid=10, error=None, now=100.0)
            >>> beats.write(1, pid=11, error="database is locked", now=100.0)
            >>> beats.problems(now=101.0)
            ['worker 1: database is locked']
            >>> beats.problems(now=110.0)[0]
            'worker 0 has not reported for 10.0s'
        """
        found = []
        for index in range(self.workers):
            beat = self.read(index)
            if beat is None:
                found.append("worker %d is not running" % (index,))
                continue
            age_s = now - float(beat.get("ts", 0))
            if age_s > HEARTBEAT_STALE_S:
                found.append("worker %d has not reported for %.1fs" % (index, age_s))
            elif beat.get("error"):
                found.append("worker %d: %s" % (index, beat["error"]))
        return found

    def check(self, now: float) -> None:
        """Raise :class:`WorkersUnhealthyError` if :meth:`problems` finds any."""
        found = self.problems(now)
        if found:
            raise WorkersUnhealthyError("; ".join(found))
