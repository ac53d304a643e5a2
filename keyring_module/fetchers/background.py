"""Work the fetcher chain leaves running after a call returns, tracked and never lost.

A notary's answer that comes after its servers were settled is still checked and
stored, and a direct confirmation goes on after the call that started it. Each such
piece of work is tracked here until it ends, so that tests (and a clean shutdown) can
wait for it, and its failure is logged with its traceback instead of being dropped::

    background = BackgroundWork()
    background.track(defer.ensureDeferred(store_late_answer()), "late answer about example.org")
    await background.wait()
"""

import logging
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

# The chain's lines share the chain's logger, which operators filter on.
logger = logging.getLogger("keyring_module.fetchers.chain")


class BackgroundWork:
    """The Deferreds still running in the background, each logged if it fails."""

    def __init__(self) -> None:
        self._running: set["defer.Deferred[Any]"] = set()

    @property
    def running(self) -> int:
        """How many pieces of work are still running."""
        return len(self._running)

    def track(self, work: "defer.Deferred[Any]", what: str) -> None:
        """Keep ``work`` until it ends; log its failure (``what`` names it in the line).

        ``work``'s result is consumed: add no callbacks to it afterwards.
        """
        self._running.add(work)
        work.addErrback(self._failed, what)
        work.addBoth(self._ended, work)

    async def wait(self) -> None:
        """Wait until the work running now, and any it starts meanwhile, has ended."""
        while self._running:
            await defer.DeferredList(
                [_observe(work) for work in list(self._running)], consumeErrors=True
            )

    @staticmethod
    def _failed(failure: Failure, what: str) -> None:
        logger.error("Background key work failed (%s): %s", what, failure.getTraceback())

    def _ended(self, _: object, work: "defer.Deferred[Any]") -> None:
        self._running.discard(work)


def _observe(work: "defer.Deferred[Any]") -> "defer.Deferred[None]":
    """A new Deferred that fires (with None) when ``work`` ends, leaving its result alone."""
    observer: "defer.Deferred[None]" = defer.Deferred()

    def ended(result: object) -> object:
        observer.callback(None)
        return result

    work.addBoth(ended)
    return observer
