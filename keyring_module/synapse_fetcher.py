"""The key fetcher the module puts into the homeserver's own keyring.

With ``synapse_keyring.use_module_fetchers: true``,
:mod:`keyring_module.synapse_adapter` makes a :class:`ModuleKeyFetcher` the only entry
of Synapse's list of key fetchers. Synapse then asks it for every key it needs to
verify events and requests, with the signature Synapse's own fetchers have::

    results = await fetcher.get_keys("example.org", ["ed25519:a"], minimum_valid_until_ts)
    # {"ed25519:a": FetchKeyResult(verify_key, valid_until_ts)}

It answers through :meth:`keyring_module.keyring.Keyring.lookup_keys`: our store first,
then a fetch through our chain (``key_fetch_order``, the module's
``trusted_key_servers``, ``key_trust``, the per-origin limiter, one fetch per origin in
flight). A key not valid until the minimum is still returned, as Synapse's own fetchers
do: Synapse uses it for signatures made before it expired. A lookup that fails returns
``{}`` (Synapse then rejects what needed the key), and is counted and logged.

This module imports nothing from Synapse: the adapter passes in Synapse's
``FetchKeyResult`` and its logcontext helpers, so the fetcher is tested without Synapse.
"""

import contextlib
import logging
from typing import Any, Callable, ContextManager, Iterable, Mapping

from signedjson.key import decode_verify_key_bytes
from twisted.internet import defer

from keyring_module.clock import SecondsClock, now_ms
from keyring_module.model import StoredKey

logger = logging.getLogger(__name__)

#: Looks up keys: :meth:`keyring_module.keyring.Keyring.lookup_keys`.
KeyLookup = Callable[[str, Iterable[str], int], "defer.Deferred[dict[str, StoredKey]]"]
#: Builds Synapse's ``FetchKeyResult(verify_key, valid_until_ts)``.
ResultFactory = Callable[[Any, int], Any]
#: Makes a Deferred safe to await in the caller's logcontext (Synapse's
#: ``make_deferred_yieldable``).
Yieldable = Callable[["defer.Deferred[Any]"], "defer.Deferred[Any]"]
#: A context in which our work starts with no logcontext (Synapse's
#: ``PreserveLoggingContext``), so that nothing of ours runs in the caller's.
Detached = Callable[[], ContextManager[Any]]

#: ``keyring_synapse_key_requests_total`` results.
FOUND = "found"
STALE = "stale"
NOT_FOUND = "not_found"
ERROR = "error"


def _same(d: "defer.Deferred[Any]") -> "defer.Deferred[Any]":
    return d


class ModuleKeyFetcher:
    """Answers Synapse's key lookups through our keyring.

    Args:
        lookup: the keyring's :meth:`~keyring_module.keyring.Keyring.lookup_keys`.
        make_result: builds Synapse's ``FetchKeyResult`` from a signedjson
            ``VerifyKey`` and a ``valid_until_ts``.
        count: told each lookup's result (``found``, ``stale``, ``not_found``,
            ``error``), e.g. a metric's ``inc``.
        clock: measures how long each lookup took (for the DEBUG line).
        yieldable: wraps the lookup's Deferred before it is awaited (Synapse's
            ``make_deferred_yieldable``; none by default).
        detached: the context our lookup starts in (Synapse's
            ``PreserveLoggingContext``; none by default).

    Example::

        fetcher = ModuleKeyFetcher(keyring.lookup_keys, FetchKeyResult, count, reactor)
        keys = await fetcher.get_keys("example.org", ["ed25519:a"], 0)
    """

    def __init__(
        self,
        lookup: KeyLookup,
        make_result: ResultFactory,
        count: Callable[[str], None],
        clock: SecondsClock,
        *,
        yieldable: Yieldable = _same,
        detached: Detached = contextlib.nullcontext,
    ) -> None:
        self._lookup = lookup
        self._make_result = make_result
        self._count = count
        self._clock = clock
        self._yieldable = yieldable
        self._detached = detached

    def __repr__(self) -> str:
        return "<keyring_module ModuleKeyFetcher>"

    async def get_keys(
        self, server_name: str, key_ids: list[str], minimum_valid_until_ts: int
    ) -> dict[str, Any]:
        """The keys of ``server_name`` among ``key_ids``, as Synapse's fetchers answer.

        Args:
            server_name: whose keys.
            key_ids: which ones.
            minimum_valid_until_ts: current keys should be valid until at least this.

        Returns:
            ``{key_id: FetchKeyResult}`` for the keys found (old keys with their
            ``expired_ts`` as ``valid_until_ts``); ``{}`` when the lookup failed.
        """
        start = now_ms(self._clock)
        try:
            with self._detached():
                d = self._lookup(server_name, key_ids, minimum_valid_until_ts)
            stored = await self._yieldable(d)
            results = self._results(stored)
        except defer.CancelledError:
            raise
        except Exception:
            self._count(ERROR)
            logger.warning(
                "Synapse key lookup for %s %s failed", server_name, key_ids, exc_info=True
            )
            return {}
        result = _result_label(results, key_ids, minimum_valid_until_ts)
        self._count(result)
        logger.debug(
            "Synapse key lookup for %s %s (valid until %d): %s in %d ms",
            server_name,
            key_ids,
            minimum_valid_until_ts,
            result,
            now_ms(self._clock) - start,
        )
        return results

    def shutdown(self) -> None:
        """Called by Synapse when its keyring shuts down; there is nothing of ours to
        stop (the module's services close with the reactor)."""

    def _results(self, stored: Mapping[str, StoredKey]) -> dict[str, Any]:
        results: dict[str, Any] = {}
        for key_id, key in stored.items():
            try:
                verify_key = decode_verify_key_bytes(key_id, key.verify_key_bytes)
            except Exception:
                # Not an ed25519 key: Synapse could not use it either.
                logger.debug("Skipping key %s of %s: unsupported", key_id, key.server_name)
                continue
            valid_until_ts = key.expired_ts if key.expired_ts is not None else key.valid_until_ts
            results[key_id] = self._make_result(verify_key, valid_until_ts)
        return results


def _result_label(results: Mapping[str, Any], key_ids: list[str], minimum: int) -> str:
    if not results:
        return NOT_FOUND
    if all(k in results and results[k].valid_until_ts >= minimum for k in key_ids):
        return FOUND
    return STALE
