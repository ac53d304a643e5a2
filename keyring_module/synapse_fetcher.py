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
do: Synapse uses it for signatures made before it expired. A current key's
``valid_until_ts`` is returned capped at now + 7 days (the spec's rule, which Synapse's
check then applies); an old key's is its ``expired_ts``. A lookup that fails returns
``{}`` (Synapse then rejects what needed the key), and is counted and logged.

**Before our key store is open.** The adapter installs the fetcher when the module is
loaded, before Synapse listens, while our store is still opening. A lookup in that
window waits until the store is ready (:meth:`ModuleKeyFetcher.use`), for at most
``wait_s`` (Synapse's federation ``client_timeout``); if the store is not ready by then,
that lookup, and every later one until the store is ready, is answered at once by
Synapse's own fetchers, asked in Synapse's order as Synapse would (counted as
``delegated``); so are all lookups once the store failed to open
(:meth:`ModuleKeyFetcher.give_up`). So a slow or broken store never fails the homeserver's verification.

This module imports nothing from Synapse: the adapter passes in Synapse's
``FetchKeyResult`` and its logcontext helpers, so the fetcher is tested without Synapse.
"""

import contextlib
import logging
from typing import Any, Callable, ContextManager, Iterable, Mapping, Optional, Sequence

from signedjson.key import decode_verify_key_bytes
from twisted.internet import defer

from keyring_module.clock import DeadlineExceeded, ReactorClock, now_ms, with_deadline
from keyring_module.model import StoredKey
from keyring_module.verify import MAX_KEY_VALIDITY_MS

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
#: Answered by Synapse's own fetchers: our key store was not ready in time, or failed.
DELEGATED = "delegated"

#: How long a lookup waits for our key store by default (Synapse's default federation
#: ``client_timeout``).
DEFAULT_WAIT_S = 60.0


def _same(d: "defer.Deferred[Any]") -> "defer.Deferred[Any]":
    return d


class ModuleKeyFetcher:
    """Answers Synapse's key lookups through our keyring.

    Args:
        lookup: the keyring's :meth:`~keyring_module.keyring.Keyring.lookup_keys`, or
            None until our key store is open (then :meth:`use` gives it).
        make_result: builds Synapse's ``FetchKeyResult`` from a signedjson
            ``VerifyKey`` and a ``valid_until_ts``.
        count: told each lookup's result (``found``, ``stale``, ``not_found``,
            ``error``), e.g. a metric's ``inc``.
        clock: measures how long each lookup took (for the DEBUG line).
        yieldable: wraps the lookup's Deferred before it is awaited (Synapse's
            ``make_deferred_yieldable``; none by default).
        detached: the context our lookup starts in (Synapse's
            ``PreserveLoggingContext``; none by default).
        fallback: Synapse's own fetchers, in Synapse's order: they answer the lookups
            made while ``lookup`` is not ready after ``wait_s``, or after
            :meth:`give_up`.
        wait_s: how long a lookup waits for ``lookup`` to be ready.

    Example::

        fetcher = ModuleKeyFetcher(keyring.lookup_keys, FetchKeyResult, count, reactor)
        keys = await fetcher.get_keys("example.org", ["ed25519:a"], 0)
    """

    def __init__(
        self,
        lookup: Optional[KeyLookup],
        make_result: ResultFactory,
        count: Callable[[str], None],
        clock: ReactorClock,
        *,
        yieldable: Yieldable = _same,
        detached: Detached = contextlib.nullcontext,
        fallback: Sequence[Any] = (),
        wait_s: float = DEFAULT_WAIT_S,
    ) -> None:
        self._lookup = lookup
        self._fallback = tuple(fallback)
        self._wait_s = wait_s
        self._gave_up = False
        self._late = False  # a wait for the store timed out: no more waits
        self._waiters: list["defer.Deferred[bool]"] = []
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
        lookup = self._lookup
        if lookup is None and await self._wait_until_ready():
            lookup = self._lookup
        if lookup is None:
            return await self._delegate(server_name, key_ids, minimum_valid_until_ts)
        try:
            with self._detached():
                d = lookup(server_name, key_ids, minimum_valid_until_ts)
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

    def use(self, lookup: KeyLookup) -> None:
        """Our key store is open: answer through ``lookup`` from now on (lookups
        waiting for it go on with it)."""
        self._lookup = lookup
        self._wake(True)

    def give_up(self) -> None:
        """Our key store will not answer (it failed to open, or is closing at
        shutdown): lookups waiting for it, and any made from now on, are answered by
        Synapse's own fetchers."""
        self._lookup = None
        self._gave_up = True
        self._wake(False)

    def _wake(self, ready: bool) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(ready)

    async def _wait_until_ready(self) -> bool:
        """Whether ``lookup`` became ready within ``wait_s`` (False: gave up, or a
        wait timed out before: the store is late, so nobody waits for it again)."""
        if self._gave_up or self._late:
            return False
        waiter: "defer.Deferred[bool]" = defer.Deferred()
        self._waiters.append(waiter)
        with self._detached():
            bounded = with_deadline(self._clock, waiter, self._wait_s, cancel_work=False)
        try:
            ready: bool = await self._yieldable(bounded)
            return ready
        except DeadlineExceeded:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            if not self._late:
                self._late = True
                logger.warning(
                    "keyring_module's key store not ready after %.0fs: Synapse's own key "
                    "fetchers answer the homeserver's lookups until it is",
                    self._wait_s,
                )
            return False

    async def _delegate(
        self, server_name: str, key_ids: list[str], minimum_valid_until_ts: int
    ) -> dict[str, Any]:
        """Ask Synapse's own fetchers in order, as Synapse's keyring does: each key id
        until one answers it valid until the minimum, keeping the longest-lived answer."""
        self._count(DELEGATED)
        found: dict[str, Any] = {}
        missing = list(key_ids)
        for fetcher in self._fallback:
            if not missing:
                break
            try:
                answered = await fetcher.get_keys(server_name, missing, minimum_valid_until_ts)
            except Exception:
                logger.warning(
                    "Synapse's %s failed for %s", type(fetcher).__name__, server_name, exc_info=True
                )
                continue
            for key_id, result in answered.items():
                known = found.get(key_id)
                if known is None or result.valid_until_ts > known.valid_until_ts:
                    found[key_id] = result
            missing = [
                k
                for k in missing
                if k not in found or found[k].valid_until_ts < minimum_valid_until_ts
            ]
        return found

    def _results(self, stored: Mapping[str, StoredKey]) -> dict[str, Any]:
        results: dict[str, Any] = {}
        cap_ts = now_ms(self._clock) + MAX_KEY_VALIDITY_MS
        for key_id, key in stored.items():
            try:
                verify_key = decode_verify_key_bytes(key_id, key.verify_key_bytes)
            except Exception:
                # Not an ed25519 key: Synapse could not use it either.
                logger.debug("Skipping key %s of %s: unsupported", key_id, key.server_name)
                continue
            if key.expired_ts is not None:
                valid_until_ts = key.expired_ts
            else:  # the spec: the lesser of valid_until_ts and 7 days ahead
                valid_until_ts = min(key.valid_until_ts, cap_ts)
            results[key_id] = self._make_result(verify_key, valid_until_ts)
        return results


def _result_label(results: Mapping[str, Any], key_ids: list[str], minimum: int) -> str:
    if not results:
        return NOT_FOUND
    if all(k in results and results[k].valid_until_ts >= minimum for k in key_ids):
        return FOUND
    return STALE
