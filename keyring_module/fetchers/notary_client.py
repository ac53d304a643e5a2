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
flight per notary (all its batches together), and identical concurrent queries share
one flight. Each query's outcome is counted in ``keyring_notary_queries_total``.
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
        answers = await run_limited(
            self._limiter,
            notary.server_name,
            notary_source(notary.server_name),
            lambda: self._post_batches(notary, requests),
            clock=self._clock,
            log=logger,
            what="Notary key query to %s for %d servers",
            what_args=(notary.server_name, len(requests)),
            describe=lambda found: "ok (%d of %d servers)" % (len(found.results), len(requests)),
            on_outcome=lambda label, _elapsed_ms: self._count(notary, label),
            flight_key=frozenset(requests.values()),
        )
        if isinstance(answers, SourceFailure):
            return SourceAnswers.failed(requests, answers)
        return answers

    def _count(self, notary: TrustedKeyServer, label: str) -> None:
        if self._metrics is not None:
            self._metrics.notary_queries.labels(notary.server_name, label).inc()

    async def _post_batches(
        self, notary: TrustedKeyServer, requests: Mapping[str, KeyRequest]
    ) -> SourceAnswers:
        """Send all batches in parallel; raise only if every batch failed."""
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
        source = notary_source(notary.server_name)
        answers = SourceAnswers()
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
