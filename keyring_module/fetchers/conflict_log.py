"""Key conflict WARNING lines, rate-limited per server.

An origin that re-keys thousands of ``old_verify_keys`` on every forced refetch would
otherwise write thousands of WARNING lines each time. :class:`ConflictLog` writes at most
``max_lines`` conflict lines per server in each ``window_ms``, and once per batch (one
stored round of a server) a single summary line of how many it left out::

    log = ConflictLog(clock)
    for conflict in conflicts:
        log.report(conflict)  # a WARNING line, or counted as suppressed
    log.flush("example.org")  # "... 9990 more key conflicts of example.org not logged ..."

The metric (``keyring_key_conflicts_total``) and the ``on_conflict`` hook still see every
conflict; only the log lines are limited. Memory stays bounded: a server's window is
forgotten once it has ended, and at most ``max_servers`` windows are kept.
"""

import logging
from collections import OrderedDict

import attr
from unpaddedbase64 import encode_base64

from keyring_module.clock import SecondsClock, now_ms
from keyring_module.model import KeyConflict

logger = logging.getLogger(__name__)

#: Conflict lines logged per server in one window.
CONFLICT_LINES_PER_WINDOW = 10
#: How long a server's window lasts.
CONFLICT_LOG_WINDOW_MS = 10 * 60_000
#: How many servers' windows are remembered (the oldest are forgotten first).
MAX_CONFLICT_LOG_SERVERS = 10_000


@attr.s(auto_attribs=True, slots=True)
class _Window:
    started_ts: int
    logged: int = 0
    suppressed: int = 0


class ConflictLog:
    """Writes key conflict WARNING lines, at most ``max_lines`` per server per window.

    Args:
        clock: where the time comes from.
        max_lines: conflict lines per server per window.
        window_ms: the window's length.
        max_servers: how many servers' windows are remembered.
        log: the logger to write to (the chain passes its own).
    """

    def __init__(
        self,
        clock: SecondsClock,
        max_lines: int = CONFLICT_LINES_PER_WINDOW,
        window_ms: int = CONFLICT_LOG_WINDOW_MS,
        max_servers: int = MAX_CONFLICT_LOG_SERVERS,
        log: logging.Logger = logger,
    ) -> None:
        self._clock = clock
        self._log = log
        self._max_lines = max_lines
        self._window_ms = window_ms
        self._max_servers = max_servers
        self._windows: OrderedDict[str, _Window] = OrderedDict()

    def report(self, conflict: KeyConflict) -> None:
        """Log one conflict, or count it for the server's next summary line."""
        now = now_ms(self._clock)
        self._forget_ended(now)
        window = self._windows.get(conflict.server_name)
        if window is None or now >= window.started_ts + self._window_ms:
            # A new window (newest last); what the old one left out is still summarised.
            window = _Window(now, suppressed=0 if window is None else window.suppressed)
            self._windows.pop(conflict.server_name, None)
            self._windows[conflict.server_name] = window
            while len(self._windows) > self._max_servers:
                self._windows.popitem(last=False)
        if window.logged >= self._max_lines:
            window.suppressed += 1
            return
        window.logged += 1
        self._log.warning(
            "Key conflict for %s %s: kept %s from %s, rejected %s from %s",
            conflict.server_name,
            conflict.key_id,
            encode_base64(conflict.kept_key_bytes),
            conflict.kept_source,
            encode_base64(conflict.rejected_key_bytes),
            conflict.rejected_source,
        )

    def flush(self, server_name: str) -> None:
        """Log one summary line for the server's conflicts left out since the last flush."""
        window = self._windows.get(server_name)
        if window is None or not window.suppressed:
            return
        self._log.warning(
            "%d more key conflicts of %s not logged (at most %d lines per server every %d s)",
            window.suppressed,
            server_name,
            self._max_lines,
            self._window_ms // 1000,
        )
        window.suppressed = 0

    def tracked_servers(self) -> int:
        """How many servers' windows are remembered."""
        return len(self._windows)

    def _forget_ended(self, now: int) -> None:
        """Drop windows that have ended and have nothing left to summarise (oldest first)."""
        while self._windows:
            oldest = next(iter(self._windows.values()))
            if now < oldest.started_ts + self._window_ms or oldest.suppressed:
                return
            self._windows.popitem(last=False)
