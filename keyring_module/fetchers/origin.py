"""Fetch keys directly from their origin: ``GET /_matrix/key/v2/server``.

All keys of a server come in one response, so one fetch per server answers any request
for it. Servers are fetched concurrently, each through the shared per-origin limiter
(single flight, token bucket, backoff), and each response is validated before it is
returned. One INFO line is logged per origin fetch with its outcome and duration::

    Origin key fetch from example.org: ok (2 keys, valid until 1700000000000) in 35 ms
    Origin key fetch from down.example: timeout in 10002 ms
"""

import logging
from typing import Mapping, Optional

from twisted.internet import defer

from keyring_module.clock import ReactorClock, now_ms
from keyring_module.fetchers.base import FetchResult, KeyRequest
from keyring_module.http import FederationHttpClient, FederationRequestError
from keyring_module.model import SOURCE_ORIGIN, ServerKeysResponse
from keyring_module.ratelimit import OriginLimitedError, OriginRateLimiter
from keyring_module.servername import is_valid_server_name
from keyring_module.validation import InvalidKeyResponseError, parse_server_keys_response

logger = logging.getLogger(__name__)

SERVER_KEYS_PATH = "/_matrix/key/v2/server"


class OriginKeyFetcher:
    """Fetches ``/_matrix/key/v2/server`` from each requested server itself.

    Args:
        client: the federation HTTP client (discovery, TLS, timeouts, size cap).
        limiter: the per-origin limiter shared with every other fetcher.
        clock: used to time fetches.
        timeout_ms: optional per-request timeout passed to the client (its default
            otherwise).
    """

    def __init__(
        self,
        client: FederationHttpClient,
        limiter: OriginRateLimiter,
        clock: ReactorClock,
        timeout_ms: Optional[int] = None,
    ) -> None:
        self._client = client
        self._limiter = limiter
        self._clock = clock
        self._timeout_ms = timeout_ms

    async def fetch_keys(self, requests: Mapping[str, KeyRequest]) -> dict[str, list[FetchResult]]:
        """Fetch every requested server's keys concurrently.

        Args:
            requests: by server name; key ids and minimum are not sent (an origin
                always answers with all its keys).

        Returns:
            One validated response per server that answered well; failed servers are
            left out (and logged).
        """
        names = sorted(requests)
        outcomes = await defer.gatherResults(
            [defer.ensureDeferred(self._fetch_one(name)) for name in names],
            consumeErrors=True,
        )
        return {
            name: [FetchResult(response=response, source=SOURCE_ORIGIN)]
            for name, response in zip(names, outcomes, strict=True)
            if response is not None
        }

    async def _fetch_one(self, server_name: str) -> Optional[ServerKeysResponse]:
        start = now_ms(self._clock)
        response: Optional[ServerKeysResponse] = None
        try:
            if not is_valid_server_name(server_name):
                outcome = "invalid server name"
            else:
                response = await self._limiter.run(
                    server_name, lambda: self._get_and_validate(server_name)
                )
                outcome = "ok (%d keys, valid until %d)" % (
                    len(response.verify_keys),
                    response.valid_until_ts,
                )
        except OriginLimitedError as e:
            outcome = "%s, retry in %d ms" % (e.reason, e.retry_after_ms)
        except InvalidKeyResponseError as e:
            outcome = "invalid response (%s)" % (e,)
        except FederationRequestError as e:
            outcome = "%s (%s)" % (e.outcome, e)
        except Exception:
            logger.exception("Unexpected error fetching keys from %s", server_name)
            outcome = "unexpected error"
        logger.info(
            "Origin key fetch from %s: %s in %d ms",
            server_name,
            outcome,
            now_ms(self._clock) - start,
        )
        return response

    async def _get_and_validate(self, server_name: str) -> ServerKeysResponse:
        body = await self._client.get_json(server_name, SERVER_KEYS_PATH, self._timeout_ms)
        return parse_server_keys_response(body, server_name)
