"""Fetch keys through trusted notaries: ``POST /_matrix/key/v2/query``.

Each configured notary is asked in parallel; per notary the servers are split into
batches of ``batch_size``. The request body always carries ``minimum_valid_until_ts``
for each wanted key id (Synapse's notary refuses criteria without it)::

    {"server_keys": {"example.org": {"ed25519:abc": {"minimum_valid_until_ts": 1700000000000}},
                     "other.example": {}}}

A server for which no specific key id is wanted gets the empty criteria ``{}`` ("all
keys", spec N3). Note that Synapse's notary answers such criteria from its cache only and
never fetches for them, so callers that know the key ids should pass them.

Each entry of the answer ``{"server_keys": [...]}`` is validated on its own: it needs the
origin's self-signatures and a signature by one of the notary's configured keys. A bad
entry drops only itself; entries about servers we did not ask about are ignored (only
counted, in one log line per answer), and a repeated entry is used once.

The entries of one answer are validated together through the injected runner (a worker
thread in the wiring); each may list at most ``federation.max_keys_per_response`` keys.

Each notary is contacted through the notary limiter
(:class:`~keyring_module.notary_limiter.NotaryLimiter`: a cap on concurrent queries per
notary and backoff when it fails or answers 429, no token bucket), so a flood of lookups
does not become a flood on a notary either: one ``fetch_keys`` call is one limiter
flight per notary (all its batches together). Each query's outcome is counted in
``keyring_notary_queries_total``.

**Queries about one server are rate limited too.** A notary is the fallback when an
origin is refused or fails, so without a bound of their own, forced refetches of one
server (a notary client raising ``minimum_valid_until_ts`` on every request) would all
be relayed to the notaries once the origin's bucket is empty. With a
``per_server_limiter`` (the wiring gives each notary fetcher one: an
:class:`~keyring_module.ratelimit.OriginRateLimiter` of its own, with the origins'
``origin_burst`` and ``origin_interval`` but none of their state), each query sent
about a server spends one of that server's tokens (keyed by its network target, like
the origin's bucket). A server with no token left is left out of the query and reported
refused (``rate_limited``); when no server is left, nothing is sent and the query is
counted as ``rate_limited``. As for origins, the last tokens of each server's bucket
are kept for requests of our own keyring (:attr:`~keyring_module.model.FetchPurpose.OWN`),
so the notary's load cannot use up the fallback our own verification needs. Tokens are
spent only when a query is sent, so a query
refused by the notary limiter (backed off, busy) or joined while in flight costs none.

**Single flight ignores the minimum.** Concurrent queries to one notary about the same
servers and key ids share one flight, whatever their ``minimum_valid_until_ts``: the
body carries the first caller's minimums, so a caller that joined with a higher one may
get an answer that does not satisfy it. The chain judges every answer against its own
request, so that caller is served what is stored (or nothing) instead of a second query.
"""

import logging
from typing import AbstractSet, Mapping, Optional, Sequence, Union

import attr
from twisted.internet import defer

from keyring_module.blocking import BlockingRunner, run_inline
from keyring_module.clock import ReactorClock
from keyring_module.config import DEFAULT_MAX_KEYS_PER_RESPONSE, TrustedKeyServer
from keyring_module.fetchers.base import (
    FailureKind,
    FetchLimiter,
    FetchResult,
    SourceAnswers,
    SourceFailure,
    failure_from_error,
    merge_answers,
    run_limited,
)
from keyring_module.http import FederationHttpClient, FederationRequestError
from keyring_module.metrics import Metrics
from keyring_module.model import KeyRequest, ServerKeysResponse, notary_source
from keyring_module.ratelimit import OriginRateLimiter, RateLimitedError
from keyring_module.validation import (
    InvalidKeyResponseError,
    InvalidKeyResponseReason,
    parse_server_keys_response,
)

logger = logging.getLogger(__name__)

KEY_QUERY_PATH = "/_matrix/key/v2/query"


def build_query_body(requests: Sequence[KeyRequest]) -> dict[str, object]:
    """The JSON body of one ``POST /_matrix/key/v2/query`` batch.

    Every wanted key id gets ``{"minimum_valid_until_ts": int}``; a request for all keys
    (``key_ids`` None) becomes the empty criteria ``{}``.
    """
    return {
        "server_keys": {
            request.server_name: {
                key_id: {"minimum_valid_until_ts": request.minimum_valid_until_ts}
                for key_id in sorted(request.key_ids or ())
            }
            for request in requests
        }
    }


@attr.s(auto_attribs=True, slots=True)
class NotaryEntries:
    """What one notary answer said about the servers asked (see
    :func:`validate_notary_entries`).

    Attributes:
        valid: per server asked, its distinct valid entries (one per response id), in
            the order received.
        invalid: per server asked, why its first invalid entry was rejected.
        more_invalid: per server asked, how many more of its entries were invalid.
        skipped: entries about servers not asked, or naming no server.
        duplicates: valid entries that repeated one already kept.
    """

    valid: dict[str, list[ServerKeysResponse]] = attr.Factory(dict)
    invalid: dict[str, InvalidKeyResponseError] = attr.Factory(dict)
    more_invalid: dict[str, int] = attr.Factory(dict)
    skipped: int = 0
    duplicates: int = 0


def validate_notary_entries(
    entries: Sequence[object],
    asked: AbstractSet[str],
    notary: TrustedKeyServer,
    max_keys: int = DEFAULT_MAX_KEYS_PER_RESPONSE,
) -> NotaryEntries:
    """Validate each entry of a notary's answer on its own (pure; fit for a thread).

    Only what concerns the servers asked is kept, so that what is left for the reactor
    is bounded by the batch, never by the size of the answer: entries about other
    servers are only counted, a repeated valid entry (same server, same response id) is
    kept once, and a server's invalid entries are kept as the first one's error and a
    count.

    Args:
        entries: the ``server_keys`` array as received.
        asked: the servers the batch asked about.
        notary: the notary that answered, whose signature each entry needs.
        max_keys: the most keys one entry may list.

    Returns:
        The valid and invalid entries per server asked, and what was left out.

    Example:
        >>> found = validate_notary_entries([0, {"server_name": "b.org"}], {"a.org"}, None)
        >>> found.valid, found.skipped
        ({}, 2)
    """
    found = NotaryEntries()
    seen: set[tuple[str, str]] = set()
    for entry in entries:
        server_name = entry.get("server_name") if isinstance(entry, dict) else None
        if not isinstance(server_name, str) or server_name not in asked:
            found.skipped += 1
            continue
        try:
            response = parse_server_keys_response(
                entry, server_name, notary=notary, max_keys=max_keys
            )
        except InvalidKeyResponseError as e:
            if server_name in found.invalid:
                found.more_invalid[server_name] = found.more_invalid.get(server_name, 0) + 1
            else:
                found.invalid[server_name] = e
            continue
        if (server_name, response.response_id) in seen:
            found.duplicates += 1
            continue
        seen.add((server_name, response.response_id))
        found.valid.setdefault(server_name, []).append(response)
    return found


class NotaryKeyFetcher:
    """Asks trusted notaries (perspectives servers) for other servers' keys.

    Args:
        client: the federation HTTP client.
        trusted_key_servers: the notaries to ask, with the keys their answers must carry.
        limiter: the notary limiter shared by the notary fetchers; keyed by the
            notary's name.
        clock: used to time queries.
        batch_size: the most servers asked about in one POST.
        metrics: where to count query outcomes (optional).
        max_keys_per_response: entries listing more keys than this are invalid.
        run_blocking: where each answer's entries are validated; at once on the
            calling thread by default, the worker pool in the wiring.
        per_server_limiter: counts the queries sent about each server (a token bucket
            per network target, see above); no such bound when None.
    """

    def __init__(
        self,
        client: FederationHttpClient,
        trusted_key_servers: Sequence[TrustedKeyServer],
        limiter: FetchLimiter,
        clock: ReactorClock,
        batch_size: int = 100,
        *,
        metrics: Optional[Metrics] = None,
        max_keys_per_response: int = DEFAULT_MAX_KEYS_PER_RESPONSE,
        run_blocking: BlockingRunner = run_inline,
        per_server_limiter: Optional[OriginRateLimiter] = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1, got %d" % batch_size)
        self._client = client
        self._notaries = tuple(trusted_key_servers)
        self._limiter = limiter
        self._clock = clock
        self._batch_size = batch_size
        self._metrics = metrics
        self._max_keys = max_keys_per_response
        self._run_blocking = run_blocking
        self._per_server_limiter = per_server_limiter

    @property
    def sources(self) -> tuple[str, ...]:
        """Its answers are labelled ``notary:<name>``, one label per notary asked."""
        return tuple(notary_source(n.server_name) for n in self._notaries)

    async def fetch_keys(self, requests: Mapping[str, KeyRequest]) -> SourceAnswers:
        """Ask every notary about the requested servers and merge their answers.

        Returns:
            The validated entries by server name, from all notaries, and per server why
            each notary gave nothing usable about it. Never raises because of one notary.
        """
        if not requests or not self._notaries:
            return SourceAnswers()
        answers = await defer.gatherResults(
            [
                defer.ensureDeferred(self._query_notary(notary, requests))
                for notary in self._notaries
            ],
            consumeErrors=True,
        )
        return merge_answers(answers)

    async def _query_notary(
        self, notary: TrustedKeyServer, requests: Mapping[str, KeyRequest]
    ) -> SourceAnswers:
        source = notary_source(notary.server_name)
        refused = self._out_of_tokens(source, requests, spend=False)
        asking = {n: r for n, r in requests.items() if n not in refused.failures}
        if not asking:
            logger.debug(
                "Notary key query to %s for %d servers refused: rate_limited",
                notary.server_name,
                len(requests),
            )
            self._count(notary, "rate_limited")
            return refused
        answers = await run_limited(
            self._limiter,
            notary.server_name,
            source,
            lambda: self._post_batches(notary, asking),
            clock=self._clock,
            log=logger,
            what="Notary key query to %s for %d servers",
            what_args=(notary.server_name, len(asking)),
            describe=lambda found: "ok (%d of %d servers)" % (len(found.results), len(asking)),
            on_outcome=lambda label, _elapsed_ms: self._count(notary, label),
            flight_key=frozenset((r.server_name, r.key_ids) for r in asking.values()),
        )
        if isinstance(answers, SourceFailure):
            answers = SourceAnswers.failed(asking, answers)
        # A new object: the flight's answers are shared with everyone who joined it.
        return merge_answers([answers, refused]) if refused.failures else answers

    def _out_of_tokens(
        self, source: str, requests: Mapping[str, KeyRequest], *, spend: bool
    ) -> SourceAnswers:
        """The servers with no token left for a query about them, as refusals; with
        ``spend``, each of the others spends one."""
        refused = SourceAnswers()
        limiter = self._per_server_limiter
        if limiter is None:
            return refused
        for name, request in requests.items():
            own = request.may_use_reserve
            wait = (
                limiter.take_token(name, may_use_reserve=own)
                if spend
                else limiter.retry_after_ms(name, may_use_reserve=own)
            )
            if wait:
                refused.add_failure(name, failure_from_error(source, RateLimitedError(name, wait)))
        return refused

    def _count(self, notary: TrustedKeyServer, label: str) -> None:
        if self._metrics is not None:
            self._metrics.notary_queries.labels(notary.server_name, label).inc()

    async def _post_batches(
        self, notary: TrustedKeyServer, requests: Mapping[str, KeyRequest]
    ) -> SourceAnswers:
        """Send all batches in parallel; raise only if every batch failed.

        Each server asked about spends a token first; one whose last token went to
        another query meanwhile is left out and reported refused.
        """
        source = notary_source(notary.server_name)
        refused = self._out_of_tokens(source, requests, spend=True)
        if refused.failures:
            requests = {n: r for n, r in requests.items() if n not in refused.failures}
            if not requests:
                return refused
        ordered = [requests[name] for name in sorted(requests)]
        batches = [
            ordered[i : i + self._batch_size] for i in range(0, len(ordered), self._batch_size)
        ]
        outcomes = await defer.gatherResults(
            [defer.ensureDeferred(self._try_post_batch(notary, batch)) for batch in batches],
            consumeErrors=True,
        )
        errors = [outcome for outcome in outcomes if isinstance(outcome, Exception)]
        if errors and len(errors) == len(batches):
            raise errors[0]
        answers = refused
        for batch, outcome in zip(batches, outcomes, strict=True):
            if isinstance(outcome, Exception):
                names = [request.server_name for request in batch]
                answers.extend(SourceAnswers.failed(names, failure_from_error(source, outcome)))
            else:
                answers.extend(outcome)
        return answers

    async def _try_post_batch(
        self, notary: TrustedKeyServer, batch: Sequence[KeyRequest]
    ) -> Union[SourceAnswers, Exception]:
        try:
            return await self._post_batch(notary, batch)
        except (FederationRequestError, InvalidKeyResponseError) as e:
            logger.warning(
                "A batch of %d servers in the key query to notary %s failed: %s",
                len(batch),
                notary.server_name,
                e,
            )
            return e

    async def _post_batch(
        self, notary: TrustedKeyServer, batch: Sequence[KeyRequest]
    ) -> SourceAnswers:
        body = await self._client.post_json(
            notary.server_name, KEY_QUERY_PATH, build_query_body(batch)
        )
        entries = body.get("server_keys") if isinstance(body, dict) else None
        if not isinstance(entries, list):
            raise InvalidKeyResponseError(
                InvalidKeyResponseReason.BAD_TYPE,
                "notary %s answered without a server_keys array" % (notary.server_name,),
            )
        asked = frozenset(request.server_name for request in batch)
        found = await self._run_blocking(
            lambda: validate_notary_entries(entries, asked, notary, self._max_keys)
        )
        if found.skipped or found.duplicates:
            logger.info(
                "Ignoring %d entries from notary %s about servers not asked, and %d "
                "repeated entries",
                found.skipped,
                notary.server_name,
                found.duplicates,
            )
        source = notary_source(notary.server_name)
        answers = SourceAnswers()
        for server_name in sorted(asked):
            for response in found.valid.get(server_name, ()):
                answers.add_result(server_name, FetchResult(response, source))
            error = found.invalid.get(server_name)
            if error is not None:
                more = found.more_invalid.get(server_name, 0)
                logger.warning(
                    "Dropping keys of %s from notary %s: %s%s",
                    server_name,
                    notary.server_name,
                    error,
                    " (and %d more invalid entries about it)" % (more,) if more else "",
                )
                answers.add_failure(server_name, failure_from_error(source, error))
            elif server_name not in found.valid:
                answers.add_failure(
                    server_name,
                    SourceFailure(source, FailureKind.NOT_IN_ANSWER, "no entry for the server"),
                )
        return answers
