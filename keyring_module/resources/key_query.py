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
With every slot taken, or with the queries holding one already holding
:data:`WAITING_QUERIES_MAX_BYTES` (their bodies and parsed questions), such a query is
answered from the store without fetching; only one whose every server would be left out
(nothing stored) gets 429 ``M_LIMIT_EXCEEDED`` with ``retry_after_ms``. Answers from the
store or our own keys, cached and empty answers are never refused.

One client (an IPv4 address or an IPv6 /64, see
:func:`~keyring_module.resources.per_address.client_key`; inside Synapse, the address
Synapse gives the request) has at most ``notary.max_fetches_per_request`` servers
fetched or refreshed in the background at once, over all its queries
(:mod:`~keyring_module.notary.client_budget`). A query from a client with less left
fetches and refreshes only that many, fetches first (the rest are answered from the
store), and with nothing left it is answered as when every slot is taken. So a
few queries from one client naming servers that never answer cannot hold the global
fetch cap (``federation.max_concurrent_fetches``) against everyone else. A standalone
server with no per-address connection cap (``inbound.max_connections_per_address: 0``,
as behind a reverse proxy, where every client has the proxy's address) has no
per-client fetch budget either.

Big bodies (over :data:`PARSE_IN_THREAD_BYTES`) are parsed in the worker pool, so that
reading a 10,000-server batch does not hold the reactor; when the pool is full, such a
body gets 429 ``M_LIMIT_EXCEEDED`` with ``retry_after_ms`` (a body seen lately is not
parsed again, so a repeated question is still answered). A server asked for more than
:data:`MAX_KEY_IDS_PER_SERVER` key ids is asked for all its keys instead (with the
highest minimum given): the answer holds every key it asked for, and neither the
request nor the fetches it leads to carry thousands of key ids.
"""

import functools
import io
import logging
import re
from typing import Any, Awaitable, Callable, Optional

from twisted.web.resource import Resource
from twisted.web.server import Request

from keyring_module.blocking import BlockingRunner, WorkerPoolBusyError, run_inline
from keyring_module.clock import ReactorClock
from keyring_module.config import NotaryConfig
from keyring_module.errors import RequestError
from keyring_module.json_codec import loads_strict
from keyring_module.keyids import is_key_id
from keyring_module.metrics import Metrics, SkippedFetch
from keyring_module.notary.client_budget import ClientFetchBudgets, FetchLease
from keyring_module.notary.query import NormalisedQuery
from keyring_module.notary.service import NotaryService, ServerQuery
from keyring_module.quoting import quote_untrusted
from keyring_module.resources._json import (
    method_not_allowed,
    render_async,
    respond_json,
    unrecognized,
)
from keyring_module.resources.per_address import fetch_client_of
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
#: POST bodies longer than this are parsed in the worker pool: a 10,000-server body
#: (about 0.9 MB) takes 100 ms or more to decode and check.
PARSE_IN_THREAD_BYTES = 64 * 1024
#: Bodies of more JSON values than this are decoded in the worker pool in a way that
#: lets the reactor thread take the GIL every few milliseconds (see
#: :func:`~keyring_module.json_codec.loads_strict`); the C decoder holds it for the
#: whole call (about 20 ms for a 10,000-server body of 30,000 values).
FAST_PARSE_MAX_VALUES = 5000
#: Key ids one server of a POST may name; with more it is asked for all its keys.
#: Synapse asks for the one or two key ids it saw on events.
MAX_KEY_IDS_PER_SERVER = 32
#: The bytes (bodies and parsed questions) that queries holding a
#: ``notary.max_concurrent_requests`` slot may hold in all; a query that would go
#: over it is answered as if every slot were taken (from the store, without fetching).
#: About eight waiting 10,000-server batches.
WAITING_QUERIES_MAX_BYTES = 64 * 1024 * 1024
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


def parse_query_body(
    body: bytes, max_servers: int, *, in_worker_thread: bool = False
) -> list[ServerQuery]:
    """Parse and check a ``POST /query`` body into per-server queries.

    A key id outside the grammar (``algorithm:[a-zA-Z0-9_]+``) can name no stored key,
    so it is left out rather than failing the batch: Synapse's perspectives client puts
    the key ids it saw on events into one big query, and one malformed event must not
    cost every other server of the batch its answer. A server all of whose key ids are
    malformed is left out of the answer (it is not asked for all its keys instead). A
    server naming more than :data:`MAX_KEY_IDS_PER_SERVER` well-formed key ids is asked
    for all its keys, with the highest minimum given (a peer whose events carry many
    key ids must not cost the batch its answer either).

    Args:
        body: the request body.
        max_servers: ``notary.max_servers_per_request``.
        in_worker_thread: whether this runs in a worker thread (see
            :func:`~keyring_module.json_codec.loads_strict`).

    Example:
        >>> body = b'{"server_keys": {"a.example": {"ed25519:1": {}}}}'
        >>> parse_query_body(body, 10)
        [ServerQuery(server_name='a.example', key_criteria={'ed25519:1': None}, \
all_keys_minimum=None, preferred_key_id=None)]
    """
    try:
        content = loads_strict(
            body, in_worker_thread=in_worker_thread, fast_path_max_values=FAST_PARSE_MAX_VALUES
        )
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
        if len(key_criteria) > MAX_KEY_IDS_PER_SERVER:
            queries.append(_all_keys_query(server_name, key_criteria))
            continue
        queries.append(ServerQuery(server_name=server_name, key_criteria=key_criteria))
    return queries


def _all_keys_query(server_name: str, key_criteria: dict[str, Optional[int]]) -> ServerQuery:
    """A query for all of a server's keys in place of one naming too many key ids."""
    logger.debug(
        "Asking for all keys of %s: %d key ids asked for (at most %d)",
        server_name,
        len(key_criteria),
        MAX_KEY_IDS_PER_SERVER,
    )
    minimums = [m for m in key_criteria.values() if m is not None]
    return ServerQuery(server_name=server_name, all_keys_minimum=max(minimums, default=None))


def seen_post_bytes(body: bytes, asked: NormalisedQuery) -> int:
    """What remembering a POST body costs: the body and its parsed question.

    Example:
        >>> from keyring_module.notary.query import normalise_queries
        >>> body = b'{"server_keys":{"a.example":{}}}'
        >>> seen_post_bytes(body, normalise_queries(parse_query_body(body, 10)))
        741
    """
    return len(body) + asked.held_bytes()


async def _ready(asked: NormalisedQuery) -> NormalisedQuery:
    """A question already parsed, as a parser gives it."""
    return asked


def _decode_segment(segment: bytes) -> str:
    try:
        return segment.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(400, "M_INVALID_PARAM", "Path is not UTF-8") from None


class KeyQueryResource(Resource):
    """Serves ``/_matrix/key/v2/query[/{serverName}[/{keyId}]]`` from a NotaryService.

    Args:
        notary: answers the queries.
        config: the ``notary:`` section (body and batch limits, waiting slots).
        clock: times the requests for the metrics (with ``metrics``).
        metrics: where requests are counted (optional).
        runner: where bodies over :data:`PARSE_IN_THREAD_BYTES` are parsed (the worker
            pool; tests run them inline).
    """

    isLeaf = True

    def __init__(
        self,
        notary: NotaryService,
        config: NotaryConfig,
        clock: Optional[ReactorClock] = None,
        metrics: Optional[Metrics] = None,
        runner: BlockingRunner = run_inline,
    ) -> None:
        super().__init__()
        self._notary = notary
        self._config = config
        self._clock = clock
        self._metrics = metrics
        self._runner = runner
        self._in_flight = 0  # requests waiting for a fetch
        self._in_flight_bytes = 0  # what they hold: bodies and parsed questions
        # Servers being fetched per client, within notary.max_fetches_per_request.
        self.fetch_budgets = ClientFetchBudgets(config.max_fetches_per_request)
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
            body_bytes = len(body) if body is not None else 0
            if seen is None:
                parse = functools.partial(self._parse_post, body)
                return self._render_query(request, parse, observer, body_bytes)
            cached = self._notary.cached_answer_for(seen)
            if cached is not None:
                # The hot path: a body seen before whose answer is cached, answered with
                # no parsing, coroutine or Deferred.
                rendered = respond_json(request, 200, cached)
                if observer is not None:
                    observer(request.code)
                return rendered
            # Seen before, but its answer is not cached: not parsed again either.
            return self._render_query(
                request, functools.partial(_ready, seen), observer, body_bytes, cache_checked=True
            )
        if request.method != b"GET":
            return method_not_allowed(request, (b"GET",))
        endpoint = "get_query" if len(segments) == 1 else "get_query_key_id"
        return self._render_query(
            request,
            functools.partial(self._parse_get, request, segments),
            self._observer(endpoint),
        )

    def _render_query(
        self,
        request: Request,
        parse: Callable[[], Awaitable[NormalisedQuery]],
        observer: Optional[Callable[[int], None]],
        body_bytes: int = 0,
        *,
        cache_checked: bool = False,
    ) -> object:
        """Answer the question ``parse`` reads from the request (normalised once).

        ``cache_checked``: the caller has just looked the question up in the answer
        cache, in vain (it is not looked up again).

        A question answered before (the same servers and key ids, however written) is
        answered from the notary's answer cache at once. Otherwise the notary reads the
        store and plans the answer; only a question that must wait for a fetch takes one
        of the ``notary.max_concurrent_requests`` slots. With every slot taken, it is
        answered from the store without fetching (stale copies, servers with nothing
        stored left out), or, when that would leave out every server it asks about,
        refused with 429 ``M_LIMIT_EXCEEDED`` and ``retry_after_ms``. So whatever the
        store or our own keys can answer is never refused. The same holds when the
        questions holding a slot already hold :data:`WAITING_QUERIES_MAX_BYTES` (a
        question holds ``body_bytes``, its body, and its parsed form), and when the
        request's client has no fetches left (see
        :func:`~keyring_module.resources.per_address.fetch_client_of`); with some
        left, it fetches only that many. Background refreshes (which take no slot)
        take the client's share too: beyond it, a server is served as stored, with no
        refresh.
        """

        async def answer() -> tuple[int, bytes]:
            asked = await parse()
            cached = None if cache_checked else self._notary.cached_answer_for(asked)
            if cached is not None:
                return 200, cached
            plan = await self._notary.plan_for(asked)
            refusal: Optional[str] = None
            held = body_bytes + asked.held_bytes()
            if plan.waits_for_fetch and (
                self._in_flight >= self._config.max_concurrent_requests
                or self._in_flight_bytes + held > WAITING_QUERIES_MAX_BYTES
            ):
                plan = plan.without_fetches()
                refusal = "Too many key queries waiting for fetches"
            lease: Optional[FetchLease] = None
            if plan.budget_wanted:
                # Fetches and background refreshes both take the client's share.
                lease = self.fetch_budgets.lease(fetch_client_of(request), plan.budget_wanted)
                waited = plan.waits_for_fetch
                plan = plan.with_fetch_budget(lease.granted, SkippedFetch.CLIENT_CAP)
                if waited and not plan.waits_for_fetch:
                    refusal = "Too many key fetches under way for this client"
            if not plan.waits_for_fetch:
                if refusal is not None and not plan.answers_anything:
                    if lease is not None:
                        lease.release_all()
                    raise RequestError(
                        429, "M_LIMIT_EXCEEDED", refusal, retry_after_ms=RETRY_AFTER_MS
                    )
                return 200, await self._notary.answer_plan(asked, plan, lease)
            self._in_flight += 1
            self._in_flight_bytes += held
            try:
                return 200, await self._notary.answer_plan(asked, plan, lease)
            finally:
                self._in_flight -= 1
                self._in_flight_bytes -= held

        return render_async(request, answer, observer)

    def _read_body(self, request: Request) -> Optional[bytes]:
        """The request body, or None when it is over ``notary.max_request_body``.

        The request lets go of its copy (a query may wait for a fetch a while).
        """
        limit = self._config.max_request_body
        assert request.content is not None
        body = request.content.read(limit + 1)
        request.content.close()
        request.content = io.BytesIO()
        return body if len(body) <= limit else None

    async def _parse_post(self, body: Optional[bytes]) -> NormalisedQuery:
        """Parse and normalise a POST body (a big one in the worker pool), and remember
        its normal form."""
        if body is None:
            limit = self._config.max_request_body
            raise RequestError(413, "M_TOO_LARGE", "Request body is larger than %d bytes" % limit)
        max_servers = self._config.max_servers_per_request
        if len(body) <= PARSE_IN_THREAD_BYTES:
            asked = self._notary.normalise(parse_query_body(body, max_servers))
        else:
            normalise = self._notary.normalise
            try:
                asked = await self._runner(
                    lambda: normalise(parse_query_body(body, max_servers, in_worker_thread=True))
                )
            except WorkerPoolBusyError:
                logger.info("Refused a %d-byte key query: the worker pool is full", len(body))
                raise RequestError(
                    429,
                    "M_LIMIT_EXCEEDED",
                    "Too busy to read a query this big",
                    retry_after_ms=RETRY_AFTER_MS,
                ) from None
        if asked.queries:
            self._seen_posts.put(body, asked)
        return asked

    async def _parse_get(self, request: Request, segments: list[bytes]) -> NormalisedQuery:
        """The question of a GET."""
        return self._notary.normalise(self._parse_get_queries(request, segments))

    def _parse_get_queries(self, request: Request, segments: list[bytes]) -> list[ServerQuery]:
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
