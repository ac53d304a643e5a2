"""How many servers the notary fetches for one client at once.

Every outbound fetch shares one global cap (``federation.max_concurrent_fetches``), so
without a per-client bound a few queries from one client naming servers that never
answer would hold every slot for the request timeout, and every other fetch (another
client's, or the keyring's own inside Synapse) would be queued or refused. So the
servers being fetched for one client, summed over its queries, never exceed
``notary.max_fetches_per_request``: a query from a client whose budget is used up
fetches only what is left (possibly nothing: it is answered from the store, as when
every ``notary.max_concurrent_requests`` slot is taken).

A client is what :func:`~keyring_module.resources.per_address.client_key` makes of
the request's address (an IPv4 address or an IPv6 /64). A query takes a
:class:`FetchLease` for the servers it will fetch; each unit goes back as soon as the
chain has settled its server, and the rest when the fetch call ends (not when the
query is answered: a fetch goes on after its client gave up or went away). Only
clients with fetches under way have an entry, so the table stays as small as the
fetches in flight::

    >>> budgets = ClientFetchBudgets(max_per_client=100)
    >>> first = budgets.lease("192.0.2.7", 100)
    >>> second = budgets.lease("192.0.2.7", 100)
    >>> first.granted, second.granted, budgets.held_by("192.0.2.7")
    (100, 0, 100)
    >>> first.release(40)  # 40 servers settled
    >>> budgets.lease("192.0.2.7", 100).granted
    40
    >>> budgets.lease("198.51.100.1", 5).granted  # another client
    5
"""

import functools
from typing import Callable, Optional

__all__ = ["ClientFetchBudgets", "FetchLease"]


class FetchLease:
    """Servers one query may fetch for its client, held until they are settled.

    Release is idempotent past what is held: releasing more than is left releases
    what is left.

    Args:
        granted: how many servers the query may fetch.
        give_back: returns units to the client's budget (None: nothing to return).

    Attributes:
        granted: how many servers the query may fetch.
    """

    def __init__(self, granted: int, give_back: Optional[Callable[[int], None]] = None) -> None:
        self.granted = granted
        self._held = granted
        self._give_back = give_back

    @property
    def held(self) -> int:
        """How many of the granted units are not given back yet."""
        return self._held

    def release(self, count: int = 1) -> None:
        """Give ``count`` units back (their servers are settled)."""
        count = min(count, self._held)
        if count <= 0:
            return
        self._held -= count
        if self._give_back is not None:
            self._give_back(count)

    def release_all(self) -> None:
        """Give back every unit still held (the fetch call has ended)."""
        self.release(self._held)

    def split(self, count: int) -> "FetchLease":
        """Move ``count`` of the units held (at most all of them) to a lease of their
        own, given back to the same budget: one part of a query's fetches (its
        background refreshes) may end before or after the others.

        Example:
            >>> lease = FetchLease(5)
            >>> part = lease.split(2)
            >>> part.granted, lease.held
            (2, 3)
        """
        moved = max(0, min(count, self._held))
        self._held -= moved
        return FetchLease(moved, self._give_back if moved else None)


class ClientFetchBudgets:
    """At most ``max_per_client`` servers fetched for one client at once.

    Args:
        max_per_client: ``notary.max_fetches_per_request``.
    """

    def __init__(self, max_per_client: int) -> None:
        self.max_per_client = max(0, max_per_client)
        self._held: dict[str, int] = {}  # only clients with fetches under way

    def __len__(self) -> int:
        """How many clients have fetches under way."""
        return len(self._held)

    def held_by(self, client: Optional[str]) -> int:
        """How many servers are being fetched for ``client`` now."""
        return self._held.get(client, 0) if client is not None else 0

    def lease(self, client: Optional[str], wanted: int) -> FetchLease:
        """Take up to ``wanted`` units of ``client``'s budget.

        Args:
            client: the client's key; None for a client that cannot be told apart
                from others (e.g. behind a reverse proxy): not bounded.
            wanted: how many servers the query would fetch.

        Returns:
            The lease; its ``granted`` may be less than ``wanted``, even 0.
        """
        wanted = max(0, wanted)
        if client is None:
            return FetchLease(wanted)
        held = self._held.get(client, 0)
        granted = min(wanted, max(0, self.max_per_client - held))
        if not granted:
            return FetchLease(0)
        self._held[client] = held + granted
        return FetchLease(granted, functools.partial(self._give_back, client))

    def _give_back(self, client: str, count: int) -> None:
        left = self._held.get(client, 0) - count
        if left > 0:
            self._held[client] = left
        else:
            self._held.pop(client, None)
