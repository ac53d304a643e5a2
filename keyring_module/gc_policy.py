"""Garbage collection driven by the reactor, for the standalone server.

Python's cyclic collector runs whenever enough container objects were allocated, in
whichever thread allocated them. When a worker thread decodes a hostile answer made of
hundreds of thousands of tiny containers, that thread starts collections of the oldest
generation, which walk every object of the process while holding the GIL, and so hold
the reactor thread for tens of milliseconds. Synapse avoids this for the homeserver the
same way as :class:`ReactorGarbageCollector` does for ``keyring-module serve``:

* what start-up allocated is frozen (``gc.freeze()``): it lives as long as the process
  and is never walked again;
* automatic collection is turned off;
* every ``interval_s`` the reactor collects the oldest generation whose threshold has
  been passed and whose last collection is at least its minimum interval ago (1 s,
  10 s and 30 s for generations 0, 1 and 2, as in Synapse), so a collection runs
  between two pieces of reactor work, each one walks only the objects made since
  start-up, and a burst of allocations cannot make the reactor collect the oldest
  generation over and over.

Inside Synapse the homeserver's own collection policy applies, so the module does not
use this. Example::

    collector = ReactorGarbageCollector(reactor)
    reactor.callWhenRunning(collector.start)
    ...
    collector.stop()      # automatic collection again
"""

import gc
import logging
from typing import Any, Optional, cast

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from keyring_module.clock import ReactorClock

logger = logging.getLogger(__name__)

#: How often the reactor looks at the collector's counters.
DEFAULT_INTERVAL_S = 0.1
#: The least time between two collections of generations 0, 1 and 2 (Synapse's figures).
DEFAULT_MIN_SECONDS_BETWEEN_COLLECTIONS = (1.0, 10.0, 30.0)
# A tick may come a hair early (float arithmetic on clock times).
_CLOCK_SLACK_SECONDS = 1e-6


class ReactorGarbageCollector:
    """Collects from the reactor instead of from whichever thread allocates.

    Args:
        clock: the reactor the checks run on (and whose time the intervals are read from).
        interval_s: how often the counters are looked at.
        gc_module: the ``gc`` module (tests pass a fake one).
        min_seconds_between: per generation (0, 1, 2), the least time between two of
            its collections; a generation over its threshold sooner waits (and a
            younger one due may be collected instead).
    """

    def __init__(
        self,
        clock: ReactorClock,
        interval_s: float = DEFAULT_INTERVAL_S,
        gc_module: Any = gc,
        min_seconds_between: tuple[float, float, float] = DEFAULT_MIN_SECONDS_BETWEEN_COLLECTIONS,
    ) -> None:
        self._gc = gc_module
        self._clock = clock
        self._interval_s = interval_s
        self._min_seconds_between = min_seconds_between
        # When each generation was last collected (never, at first).
        self._last_collected_s: list[Optional[float]] = [None, None, None]
        self._loop = LoopingCall(self.collect_due)
        self._loop.clock = cast(IReactorTime, clock)  # Clock and the reactor provide it

    def start(self) -> None:
        """Freeze what exists, turn automatic collection off, and start the checks."""
        self._gc.freeze()
        self._gc.disable()
        self._loop.start(self._interval_s, now=False)

    def stop(self) -> None:
        """Stop the checks and turn automatic collection on again."""
        if self._loop.running:
            self._loop.stop()
        self._gc.enable()

    def collect_due(self) -> Optional[int]:
        """Collect the oldest generation that is due; returns it, or None.

        A generation is due when its count is over its threshold and its last
        collection is at least its minimum interval ago.

        Example::

            >>> from twisted.internet.task import Clock
            >>> class FakeGc:
            ...     def get_count(self): return (701, 3, 0)
            ...     def get_threshold(self): return (700, 10, 10)
            ...     def collect(self, generation): print("collect", generation)
            >>> collector = ReactorGarbageCollector(Clock(), gc_module=FakeGc())
            >>> collector.collect_due()
            collect 0
            0
            >>> collector.collect_due() is None  # generation 0 again only after 1 s
            True
        """
        counts = self._gc.get_count()
        thresholds = self._gc.get_threshold()
        now_s = self._clock.seconds()
        for generation in (2, 1, 0):
            if counts[generation] <= thresholds[generation]:
                continue
            last_s = self._last_collected_s[generation]
            min_seconds = self._min_seconds_between[generation]
            if last_s is not None and now_s - last_s + _CLOCK_SLACK_SECONDS < min_seconds:
                continue
            self._gc.collect(generation)
            self._last_collected_s[generation] = self._clock.seconds()
            return generation
        return None
