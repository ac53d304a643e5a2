"""``/_matrix/key/v2/query``: the notary endpoints.

Batch form::

    POST /_matrix/key/v2/query HTTP/1.1
    Content-Type: application/json

    {"server_keys": {"example.org": {"ed25519:abc": {"minimum_valid_until_ts": 1700000000000}},
                     "other.example": {}}}

    HTTP/1.1 200 OK
    Content-Type: application/json

    {"server_keys": [{"server_name": "example.org", "valid_until_ts": ...,
                      "verify_keys": {...}, "old_verify_keys": {...},
                      "signatures": {"example.org": {...}, "notary.example.org": {...}}}]}

Single-server form: ``GET /_matrix/key/v2/query/{serverName}?minimum_valid_until_ts=...``,
and the deprecated ``GET /_matrix/key/v2/query/{serverName}/{keyId}`` (all keys, those
holding ``keyId`` first). An empty key map (or criteria without a minimum) is allowed;
``{"server_keys": {}}`` answers ``{"server_keys": []}`` at once. An ``Authorization: X-Matrix``
header is accepted and ignored.

Bad input is answered with 4xx JSON errors, never a 500: not JSON → 400 ``M_NOT_JSON``;
wrong shapes → 400 ``M_BAD_JSON``; a bad minimum, server name (see
:mod:`~keyring_module.servername`), key id (see :mod:`~keyring_module.keyids`) or too
many servers → 400 ``M_INVALID_PARAM``, whose message shows the bad value escaped and
shortened; a body over ``notary.max_request_body`` → 413 ``M_TOO_LARGE``.

Only queries that must wait for a fetch count toward ``notary.max_concurrent_requests``.
With every slot taken, such a query is answered from the store without fetching; only
one whose every server would be left out (nothing stored) gets 429 ``M_LIMIT_EXCEEDED``
with ``retry_after_ms``. Answers from the store or our own keys, cached and empty
answers are never refused.
"""

import logging
import re
from typing import Any, Callable, Optional

from twisted.web.resource import Resource
from twisted.web.server import Request

from keyring_module.clock import ReactorClock
from keyring_module.config import NotaryConfig
from keyring_module.errors import RequestError
from keyring_module.json_codec import loads_strict
from keyring_module.keyids import is_key_id
from keyring_module.metrics import Metrics
from keyring_module.notary.query import NormalisedQuery
from keyring_module.notary.service import NotaryService, ServerQuery
from keyring_module.quoting import quote_untrusted
from keyring_module.resources._json import (
    method_not_allowed,
    render_async,
    respond_json,
    unrecognized,
)
from keyring_module.servername import is_valid_server_name
from keyring_module.sized_lru import SizedLru

logger = logging.getLogger(__name__)

MAX_TS = 2**63 - 1
#: What a refused (429) caller is told to wait before trying again.
RETRY_AFTER_MS = 1000
#: Bytes kept of recent POST bodies and their parsed questions (the hot path's memo):
#: enough for two of Synapse's 10,000-server batches, each about 0.7 MB of body and
#: 5 MB of parsed question (a key id and a minimum per server).
SEEN_POSTS_BYTES = 16 * 1024 * 1024
_MINIMUM_TEXT_RE = re.compile(rb"[0-9]{1,19}\Z")


def parse_minimum(value: object) -> int:
    """A ``minimum_valid_until_ts`` from JSON: a non-negative integer (not a bool/float)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_TS:
        raise RequestError(
            400,
            "M_INVALID_PARAM",
            "minimum_valid_until_ts must be a non-negative integer, got %s"
            % quote_untrusted(value, max_chars=40),
        )
    return value


def check_server_name(name: str) -> str:
    """Refuse anything that is not a Matrix server name, before any fetch."""
    if not is_valid_server_name(name):
        raise RequestError(400, "M_INVALID_PARAM", "Invalid server name %s" % quote_untrusted(name))
    return name


def check_key_id(key_id: str) -> str:
    """Refuse anything that is not an ASCII ``algorithm:identifier`` key id."""
    if not is_key_id(key_id):
        raise RequestError(400, "M_INVALID_PARAM", "Invalid key id %s" % quote_untrusted(key_id))
    return key_id


def parse_query_body(body: bytes, max_servers: int) -> list[ServerQuery]:
    """Parse and check a ``POST /query`` body into per-server queries.

    A key id outside the grammar (``algorithm:[a-zA-Z0-9_]+``) can name no stored key,
    so it is left out rather than failing the batch: Synapse's perspectives client puts
    the key ids it saw on events into one big query, and one malformed event must not
    cost every other server of the batch its answer. A server all of whose key ids are
    malformed is left out of the answer (it is not asked for all its keys instead).
    """
    try:
        content = loads_strict(body)
    except ValueError:
        raise RequestError(400, "M_NOT_JSON", "Content not JSON.") from None
    if not isinstance(content, dict) or not isinstance(content.get("server_keys"), dict):
        raise RequestError(400, "M_BAD_JSON", '"server_keys" must be an object')
    server_keys: dict[str, Any] = content["server_keys"]
    if len(server_keys) > max_servers:
        raise RequestError(
            400,
            "M_INVALID_PARAM",
            "Too many servers in one query: %d (at most %d)" % (len(server_keys), max_servers),
        )
    queries = []
    for server_name, criteria in server_keys.items():
        check_server_name(server_name)
        if not isinstance(criteria, dict):
            raise RequestError(
                400, "M_BAD_JSON", "Criteria for %s must be an object of key ids" % server_name
            )
        key_criteria: dict[str, Optional[int]] = {}
        for key_id, criterion in criteria.items():
            if not isinstance(criterion, dict):
                raise RequestError(
                    400,
                    "M_BAD_JSON",
                    "Criteria for %s %s must be an object" % (server_name, quote_untrusted(key_id)),
                )
            minimum = criterion.get("minimum_valid_until_ts")
            parsed_minimum = None if minimum is None else parse_minimum(minimum)
            if is_key_id(key_id):
                key_criteria[key_id] = parsed_minimum
        if criteria and not key_criteria:
            logger.debug(
                "Leaving %s out of a key query: no well-formed key id asked for", server_name
            )
            continue
        queries.append(ServerQuery(server_name=server_name, key_criteria=key_criteria))
    return queries


def seen_post_bytes(body: bytes, asked: NormalisedQuery) -> int:
    """What remembering a POST body costs: the body and its parsed question.

    Example:
        >>> from keyring_module.notary.query import normalise_queries
        >>> body = b'{"server_keys":{"a.example":{}}}'
        >>> seen_post_bytes(body, normalise_queries(parse_query_body(body, 10)))
        741
    """
    return len(body) + asked.held_bytes()


def _decode_segment(segment: bytes) -> str:
    try:
        return segment.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(400, "M_INVALID_PARAM", "Path is not UTF-8") from None


class KeyQueryResource(Resource):
    """Serves ``/_matrix/key/v2/query[/{serverName}[/{keyId}]]`` from a NotaryService."""

    isLeaf = True

    def __init__(
        self,
        notary: NotaryService,
        config: NotaryConfig,
        clock: Optional[ReactorClock] = None,
        metrics: Optional[Metrics] = None,
    ) -> None:
        super().__init__()
        self._notary = notary
        self._config = config
        self._clock = clock
        self._metrics = metrics
        self._in_flight = 0  # requests between render and their answer
        # The normal form of POST bodies seen lately, so that a repeated body skips
        # parsing. It holds parsed questions (never answers), bounded in bytes: junk
        # bodies evict each other.
        self._seen_posts: SizedLru[bytes, NormalisedQuery] = SizedLru(
            SEEN_POSTS_BYTES, seen_post_bytes
        )

    def _observer(self, endpoint: str) -> Optional[Callable[[int], None]]:
        """Counts the request and its latency once its status is known."""
        metrics, clock = self._metrics, self._clock
        if metrics is None or clock is None:
            return None
        start = clock.seconds()

        def done(code: int) -> None:
            requests, seconds = metrics.notary_request(endpoint, code)
            requests.inc()
            seconds.observe(clock.seconds() - start)

        return done

    def render(self, request: Request) -> object:
        segments = list(request.postpath or [])
        if segments and segments[-1] == b"":
            segments.pop()  # tolerate one trailing slash
        if len(segments) > 2 or b"" in segments:
            return unrecognized().render(request)
        if not segments:
            if request.method != b"POST":
                return method_not_allowed(request, (b"POST",))
            body = self._read_body(request)
            observer = self._observer("post_query")
            seen = self._seen_posts.get(body) if body is not None else None
            if seen is None:
                return self._render_query(request, lambda: self._parse_post(body), observer)
            cached = self._notary.cached_answer_for(seen)
            if cached is not None:
                # The hot path: a body seen before whose answer is cached, answered with
                # no parsing, coroutine or Deferred.
                rendered = respond_json(request, 200, cached)
                if observer is not None:
                    observer(request.code)
                return rendered
            # Seen before, but its answer is not cached: not parsed again either.
            return self._render_query(request, lambda: seen, observer)
        if request.method != b"GET":
            return method_not_allowed(request, (b"GET",))
        endpoint = "get_query" if len(segments) == 1 else "get_query_key_id"
        return self._render_query(
            request,
            lambda: self._notary.normalise(self._parse_get(request, segments)),
            self._observer(endpoint),
        )

    def _render_query(
        self,
        request: Request,
        parse: Callable[[], NormalisedQuery],
        observer: Optional[Callable[[int], None]],
    ) -> object:
        """Answer the question ``parse`` reads from the request (normalised once).

        A question answered before (the same servers and key ids, however written) is
        answered from the notary's answer cache at once. Otherwise the notary reads the
        store and plans the answer; only a question that must wait for a fetch takes one
        of the ``notary.max_concurrent_requests`` slots. With every slot taken, it is
        answered from the store without fetching (stale copies, servers with nothing
        stored left out), or, when that would leave out every server it asks about,
        refused with 429 ``M_LIMIT_EXCEEDED`` and ``retry_after_ms``. So whatever the
        store or our own keys can answer is never refused.
        """

        async def answer() -> tuple[int, bytes]:
            asked = parse()
            cached = self._notary.cached_answer_for(asked)
            if cached is not None:
                return 200, cached
            plan = await self._notary.plan_for(asked)
            if not plan.waits_for_fetch:
                return 200, await self._notary.answer_plan(asked, plan)
            if self._in_flight >= self._config.max_concurrent_requests:
                plan = plan.without_fetches()
                if not plan.answers_anything:
                    raise RequestError(
                        429,
                        "M_LIMIT_EXCEEDED",
                        "Too many key queries waiting for fetches",
                        retry_after_ms=RETRY_AFTER_MS,
                    )
                return 200, await self._notary.answer_plan(asked, plan)
            self._in_flight += 1
            try:
                return 200, await self._notary.answer_plan(asked, plan)
            finally:
                self._in_flight -= 1

        return render_async(request, answer, observer)

    def _read_body(self, request: Request) -> Optional[bytes]:
        """The request body, or None when it is over ``notary.max_request_body``."""
        limit = self._config.max_request_body
        assert request.content is not None
        body = request.content.read(limit + 1)
        return body if len(body) <= limit else None

    def _parse_post(self, body: Optional[bytes]) -> NormalisedQuery:
        """Parse and normalise a POST body, and remember its normal form."""
        if body is None:
            limit = self._config.max_request_body
            raise RequestError(413, "M_TOO_LARGE", "Request body is larger than %d bytes" % limit)
        asked = self._notary.normalise(parse_query_body(body, self._config.max_servers_per_request))
        if asked.queries:
            self._seen_posts.put(body, asked)
        return asked

    def _parse_get(self, request: Request, segments: list[bytes]) -> list[ServerQuery]:
        server_name = check_server_name(_decode_segment(segments[0]))
        key_id = check_key_id(_decode_segment(segments[1])) if len(segments) == 2 else None
        minimum: Optional[int] = None
        values = (request.args or {}).get(b"minimum_valid_until_ts")
        if values:
            if not _MINIMUM_TEXT_RE.match(values[0]):
                raise RequestError(
                    400,
                    "M_INVALID_PARAM",
                    "minimum_valid_until_ts must be a non-negative integer, got %s"
                    % quote_untrusted(values[0], max_chars=40),
                )
            minimum = parse_minimum(int(values[0]))
        return [
            ServerQuery(server_name=server_name, all_keys_minimum=minimum, preferred_key_id=key_id)
        ]
