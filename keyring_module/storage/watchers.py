"""Deferreds waiting for news about a server name, woken by a coordination.

Example:
    >>> watchers = Watchers()
    >>> woken = watchers.watch("example.org")
    >>> watchers.wake("other.example"); woken.called
    False
    >>> watchers.wake("example.org"); woken.called
    True
"""

from twisted.internet import defer
from twisted.python.failure import Failure


class Watchers:
    """Who waits for news of which server; each Deferred fires once, with None."""

    def __init__(self) -> None:
        self._by_name: dict[str, list["defer.Deferred[None]"]] = {}

    def __len__(self) -> int:
        """How many Deferreds wait."""
        return sum(len(waiting) for waiting in self._by_name.values())

    def watch(self, server_name: str) -> "defer.Deferred[None]":
        """A Deferred firing at the next :meth:`wake` of ``server_name`` (or
        :meth:`wake_all`); cancelling it stops watching (it then fires with None too,
        so a cancelled watch nobody waits for logs no unhandled error)."""

        def cancel(waiter: "defer.Deferred[None]") -> None:
            waiting = self._by_name.get(server_name)
            if waiting is not None and waiter in waiting:
                waiting.remove(waiter)
                if not waiting:
                    del self._by_name[server_name]

        waiter: "defer.Deferred[None]" = defer.Deferred(cancel)
        self._by_name.setdefault(server_name, []).append(waiter)
        waiter.addErrback(_stopped_watching)
        return waiter

    def wake(self, server_name: str) -> None:
        """Fire every Deferred watching ``server_name``."""
        for waiter in self._by_name.pop(server_name, []):
            waiter.callback(None)

    def wake_all(self) -> None:
        """Fire every Deferred."""
        by_name, self._by_name = self._by_name, {}
        for waiting in by_name.values():
            for waiter in waiting:
                waiter.callback(None)


def _stopped_watching(failure: Failure) -> None:
    failure.trap(defer.CancelledError)
