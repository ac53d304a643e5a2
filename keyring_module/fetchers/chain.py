"""The fetcher chain: the store first, then origins and notaries in the configured order.

One chain (and one limiter) is shared by the notary service and the keyring, so an origin
sees one fetch no matter which side asked::

    chain = KeyFetcherChain(store, origin_fetcher, notary_fetcher, clock)
    keys = await chain.get_keys([KeyRequest("example.org", frozenset(), now)])
    keys["example.org"]  # {key_id: StoredKey}, possibly stale: the caller judges validity

For each requested server:

1. if the stored keys answer the request (see
   :func:`~keyring_module.fetchers.base.is_satisfied`), no fetch is made;
2. otherwise the fetchers are asked in ``order`` (``("origin", "notaries")`` by default,
   or ``("notaries", "origin")``); only the servers still unanswered go on to the next.
   A request for "all keys" is sent to notaries as a request for the ids of the server's
   stored current keys when there are any, with the request's minimum: Synapse's notary
   never fetches from the origin for empty criteria, but does for named keys;
3. every validated response from any fetcher is stored with its source; invalid responses
   never get this far, so they can never replace good stored keys.

The result holds every stored key of each requested server after the fetches, including
stale ones when nothing better came.
"""

import logging
from typing import Iterable, Mapping, Optional, Sequence, Union

import attr

from keyring_module.clock import ReactorClock, now_ms
from keyring_module.fetchers.base import (
    FetchResult,
    KeyFetcher,
    KeyRequest,
    is_satisfied,
    merge_key_requests,
)
from keyring_module.fetchers.store import StoreKeyFetcher
from keyring_module.model import StoredKey
from keyring_module.storage import KeyStore

logger = logging.getLogger(__name__)

ORIGIN = "origin"
NOTARIES = "notaries"


class KeyFetcherChain:
    """Store, then direct and notary fetchers in the configured order.

    Args:
        store: where keys are cached; every validated response is stored here.
        origin_fetcher: fetches ``/key/v2/server`` from the servers themselves.
        notary_fetcher: asks trusted notaries; None when there are none.
        clock: used for the ``fetched_ts`` of stored responses.
        order: ``("origin", "notaries")`` (default) or ``("notaries", "origin")``, as
            configured by ``key_fetch_order``.
    """

    def __init__(
        self,
        store: KeyStore,
        origin_fetcher: KeyFetcher,
        notary_fetcher: Optional[KeyFetcher],
        clock: ReactorClock,
        order: Sequence[str] = (ORIGIN, NOTARIES),
    ) -> None:
        unknown = set(order) - {ORIGIN, NOTARIES}
        if unknown or len(set(order)) != len(order):
            raise ValueError("order must list origin and/or notaries once each, got %r" % (order,))
        self._store = store
        self._store_fetcher = StoreKeyFetcher(store)
        self._clock = clock
        fetchers = {ORIGIN: origin_fetcher, NOTARIES: notary_fetcher}
        self._stages: list[tuple[str, KeyFetcher]] = [
            (name, fetcher) for name in order if (fetcher := fetchers[name]) is not None
        ]

    async def get_keys(
        self,
        requests: Union[Iterable[KeyRequest], Mapping[str, KeyRequest]],
        *,
        use_cache: bool = True,
    ) -> dict[str, dict[str, StoredKey]]:
        """Get keys for many servers, fetching only what the store cannot answer.

        Args:
            requests: what is wanted; several requests for one server are merged (union
                of key ids, highest minimum).
            use_cache: False sends every requested server to the first fetcher even if
                the stored keys answer the request (e.g. a refresh past half-life); a
                server then goes on to the next fetcher unless the first one returned a
                response and the stored keys answer the request afterwards.

        Returns:
            For every requested server, all its stored keys after the fetches (an empty
            dict if none are known). Keys may be stale; the caller decides validity.
        """
        wanted = merge_key_requests(
            requests.values() if isinstance(requests, Mapping) else requests
        )
        if not wanted:
            return {}
        lookup = await self._store_fetcher.lookup(wanted)
        keys = dict(lookup.keys)
        pending = set(lookup.unsatisfied) if use_cache else set(wanted)
        if pending:
            logger.debug("Key fetch needed for %d of %d servers", len(pending), len(wanted))

        for stage, fetcher in self._stages:
            if not pending:
                break
            asked = {name: wanted[name] for name in sorted(pending)}
            if stage == NOTARIES:
                asked = {name: _notary_request(r, keys.get(name, {})) for name, r in asked.items()}
            results = await fetcher.fetch_keys(asked)
            answered = [name for name in sorted(pending) if results.get(name)]
            for name in answered:
                await self._store_results(name, results[name])
            if answered:
                keys.update(await self._store_fetcher.get_stored_keys(answered))
            for name in answered:
                if is_satisfied(wanted[name], keys.get(name, {})):
                    pending.discard(name)
            logger.debug(
                "After %s: %d servers answered, %d still unanswered",
                stage,
                len(answered),
                len(pending),
            )
        if pending:
            logger.info(
                "No key source answered for %d servers (e.g. %s); using what is stored",
                len(pending),
                sorted(pending)[0],
            )
        return {name: keys.get(name, {}) for name in wanted}

    async def _store_results(self, server_name: str, results: Sequence[FetchResult]) -> None:
        fetched_ts = now_ms(self._clock)
        for result in results:
            try:
                conflicts = await self._store.store_server_keys(
                    result.response, result.source, fetched_ts
                )
            except Exception:
                logger.exception("Could not store keys of %s from %s", server_name, result.source)
                continue
            for conflict in conflicts:
                logger.warning(
                    "Key %s of %s from %s differs from the one first seen from %s; kept the first",
                    conflict.key_id,
                    conflict.server_name,
                    conflict.rejected_source,
                    conflict.kept_source,
                )


def _notary_request(request: KeyRequest, stored: Mapping[str, StoredKey]) -> KeyRequest:
    """Name the stored current key ids in an "all keys" request, so notaries refresh."""
    if request.key_ids:
        return request
    current = frozenset(key_id for key_id, key in stored.items() if key.expired_ts is None)
    return attr.evolve(request, key_ids=current) if current else request
