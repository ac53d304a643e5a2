"""Fetch keys directly from their origin: ``GET /_matrix/key/v2/server``.

All keys of a server come in one response, so one fetch per server answers any request
for it. Servers are fetched concurrently, each through the shared per-origin limiter
(single flight, token bucket, backoff, the global cap on fetches in flight), and each
response is validated before it is returned. The limiter keys its bucket and backoff by
the name's network target, so spellings of one host share them, while flights are keyed
by the exact name: every caller's answer is validated against the name it asked about
(an origin's ``server_name`` must match it). One INFO line is logged per origin fetch with its outcome and duration::

    Origin key fetch from example.org: ok (2 keys, valid until 1700000000000) in 35 ms
    Origin key fetch from down.example: unreachable: timeout (no answer within 10s) in 10002 ms

Validation runs through the injected runner (a worker thread in the wiring), so that an
answer with many keys or a big padding never holds up the reactor; the number of keys
one answer may list is capped (``federation.max_keys_per_response``).
"""

import logging
from typing import Awaitable, Mapping, Optional, Union

from twisted.internet import defer

from keyring_module.blocking import BlockingRunner, run_inline
from keyring_module.clock import ReactorClock
from keyring_module.config import DEFAULT_MAX_KEYS_PER_RESPONSE
from keyring_module.fetchers.base import (
    FailureKind,
    FetchResult,
    SourceAnswers,
    SourceFailure,
    run_limited,
)
from keyring_module.fetchers.shared_origin import OriginOutcomeCodec
from keyring_module.http import FederationHttpClient
from keyring_module.json_codec import loads_strict
from keyring_module.metrics import Metrics
from keyring_module.model import SOURCE_ORIGIN, KeyRequest, ServerKeysResponse
from keyring_module.quoting import quote_untrusted
from keyring_module.ratelimit import OriginRateLimiter
from keyring_module.servername import is_valid_server_name
from keyring_module.shared_flights import SharedFlights
from keyring_module.shared_limits import SharedOriginLimits
from keyring_module.storage.errors import StorageError
from keyring_module.validation import is_cheap_to_validate, parse_server_keys_response

logger = logging.getLogger(__name__)

SERVER_KEYS_PATH = "/_matrix/key/v2/server"
#: Answers shared by another process up to this size are decoded and validated on the
#: calling thread; bigger ones in the worker pool.
SHARED_ANSWER_INLINE_BYTES = 16 * 1024


class OriginKeyFetcher:
    """Fetches ``/_matrix/key/v2/server`` from each requested server itself.

    Args:
        client: the federation HTTP client (discovery, TLS, timeouts, size cap).
        limiter: the per-origin limiter shared with every other fetcher.
        clock: used to time fetches.
        metrics: where to count fetch outcomes and durations (optional).
        max_keys_per_response: answers listing more keys than this are invalid.
        run_blocking: where answers too big to validate at once are validated (see
            :func:`~keyring_module.validation.is_cheap_to_validate`); at once on the
            calling thread by default, the worker pool in the wiring.
        shared_flights: when the store is shared with other processes, each fetch (one
            per in-process flight) runs through it, so that one process of those
            sharing the database fetches a name at a time
            (:mod:`~keyring_module.shared_flights`); None fetches directly.
        shared_limits: with ``shared_flights``, the origins' token buckets and backoff
            shared by those processes (:mod:`~keyring_module.shared_limits`): asked
            before each fetch that goes out, told its outcome.
    """

    def __init__(
        self,
        client: FederationHttpClient,
        limiter: OriginRateLimiter,
        clock: ReactorClock,
        metrics: Optional[Metrics] = None,
        *,
        max_keys_per_response: int = DEFAULT_MAX_KEYS_PER_RESPONSE,
        run_blocking: BlockingRunner = run_inline,
        shared_flights: Optional[SharedFlights] = None,
        shared_limits: Optional[SharedOriginLimits] = None,
    ) -> None:
        self._client = client
        self._shared = shared_flights
        self._shared_limits = shared_limits
        self._metrics = metrics
        self._limiter = limiter
        self._clock = clock
        self._max_keys = max_keys_per_response
        self._run_blocking = run_blocking

    @property
    def sources(self) -> tuple[str, ...]:
        """Its answers are labelled ``origin``."""
        return (SOURCE_ORIGIN,)

    async def fetch_keys(self, requests: Mapping[str, KeyRequest]) -> SourceAnswers:
        """Fetch every requested server's keys concurrently.

        Args:
            requests: by server name; key ids and minimum are not sent (an origin
                always answers with all its keys).

        Returns:
            One validated response per server that answered well, and why each of the
            others failed (also logged).
        """
        names = sorted(requests)
        outcomes = await defer.gatherResults(
            [
                defer.ensureDeferred(self._fetch_one(name, requests[name].may_use_reserve))
                for name in names
            ],
            consumeErrors=True,
        )
        answers = SourceAnswers()
        for name, outcome in zip(names, outcomes, strict=True):
            if isinstance(outcome, SourceFailure):
                answers.add_failure(name, outcome)
            else:
                answers.add_result(name, FetchResult(response=outcome, source=SOURCE_ORIGIN))
        return answers

    async def _fetch_one(
        self, server_name: str, may_use_reserve: bool
    ) -> Union[ServerKeysResponse, SourceFailure]:
        """One caller's fetch; concurrent callers share one real fetch (single flight).
        Only a fetch for our own keyring may spend the limiters' reserve."""
        if not is_valid_server_name(server_name):
            logger.info(
                "Not fetching keys from invalid server name %s", quote_untrusted(server_name)
            )
            return SourceFailure(SOURCE_ORIGIN, FailureKind.REFUSED, "invalid server name")
        fetched_here: list[bool] = []  # whether this process fetched (or another did)

        def describe(response: ServerKeysResponse) -> str:
            described = _describe_response(response)
            if self._shared is not None and not fetched_here:
                described += ", fetched by another process"
            return described

        return await run_limited(
            self._limiter if may_use_reserve else self._limiter.keeping_reserve(),
            server_name,
            SOURCE_ORIGIN,
            lambda: self._fetch_shared(server_name, fetched_here, may_use_reserve),
            clock=self._clock,
            log=logger,
            what="Origin key fetch from %s",
            what_args=(server_name,),
            describe=describe,
            on_outcome=self._count,
            flight_key=server_name,
        )

    async def _fetch_shared(
        self, server_name: str, fetched_here: list[bool], may_use_reserve: bool
    ) -> ServerKeysResponse:
        """The in-process flight's fetch: through the shared flight, if any (noting in
        ``fetched_here`` when this process fetches itself)."""
        if self._shared is None:
            return await self._get_and_validate(server_name)

        async def validate_shared(body: bytes) -> ServerKeysResponse:
            if len(body) <= SHARED_ANSWER_INLINE_BYTES:
                return self._validate(loads_strict(body), server_name)
            return await self._run_blocking(
                lambda: self._validate(loads_strict(body, in_worker_thread=True), server_name)
            )

        def fetch() -> Awaitable[ServerKeysResponse]:
            fetched_here.append(True)
            return self._get_within_shared_limits(server_name, may_use_reserve)

        return await self._shared.run(server_name, fetch, OriginOutcomeCodec(validate_shared))

    async def _get_within_shared_limits(
        self, server_name: str, may_use_reserve: bool
    ) -> ServerKeysResponse:
        """The fetch of the process holding the shared flight: within the shared limits,
        reserve included (when the database cannot tell them, within this process's own
        alone)."""
        limits = self._shared_limits
        if limits is None:
            return await self._get_and_validate(server_name)
        try:
            await limits.take(server_name, may_use_reserve=may_use_reserve)
        except StorageError as e:
            logger.warning("Shared limits of %s unknown (%s); fetching", server_name, e)
        try:
            response = await self._get_and_validate(server_name)
        except Exception as e:
            await _record(limits, server_name, e)
            raise
        await _record(limits, server_name, None)
        return response

    async def _get_and_validate(self, server_name: str) -> ServerKeysResponse:
        body = await self._client.get_json(server_name, SERVER_KEYS_PATH)
        if is_cheap_to_validate(body):  # most answers: no thread hop, no pool slot
            return self._validate(body, server_name)
        return await self._run_blocking(lambda: self._validate(body, server_name))

    def _validate(self, body: object, server_name: str) -> ServerKeysResponse:
        return parse_server_keys_response(body, server_name, max_keys=self._max_keys)

    def _count(self, label: str, elapsed_ms: Optional[int]) -> None:
        if self._metrics is None:
            return
        self._metrics.origin_fetches.labels(label).inc()
        if elapsed_ms is not None:
            self._metrics.origin_fetch_seconds.observe(elapsed_ms / 1000)


async def _record(limits: SharedOriginLimits, server_name: str, error: Optional[Exception]) -> None:
    try:
        await limits.record(server_name, error)
    except StorageError as e:
        logger.warning(
            "Could not record the outcome for %s in the shared limits: %s", server_name, e
        )


def _describe_response(response: ServerKeysResponse) -> str:
    return "ok (%d keys, valid until %d)" % (len(response.verify_keys), response.valid_until_ts)
