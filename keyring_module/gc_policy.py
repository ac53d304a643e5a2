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
  been passed, so a collection runs between two pieces of reactor work, and each one
  walks only the objects made since start-up.

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


class ReactorGarbageCollector:
    """Collects from the reactor instead of from whichever thread allocates.

    Args:
        clock: the reactor the checks run on.
        interval_s: how often the counters are looked at.
        gc_module: the ``gc`` module (tests pass a fake one).
    """

    def __init__(
        self, clock: ReactorClock, interval_s: float = DEFAULT_INTERVAL_S, gc_module: Any = gc
    ) -> None:
        self._gc = gc_module
        self._interval_s = interval_s
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
        """Collect the oldest generation whose threshold is passed; returns it, or None.

        Example::

            >>> class FakeGc:
            ...     def get_count(self): return (701, 3, 0)
            ...     def get_threshold(self): return (700, 10, 10)
            ...     def collect(self, generation): print("collect", generation)
            >>> ReactorGarbageCollector(None, gc_module=FakeGc()).collect_due()
            collect 0
            0
        """
        counts = self._gc.get_count()
        thresholds = self._gc.get_threshold()
        for generation in (2, 1, 0):
            if counts[generation] > thresholds[generation]:
                self._gc.collect(generation)
                return generation
        return None
