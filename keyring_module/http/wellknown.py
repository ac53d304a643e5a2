"""``/.well-known/matrix/server`` lookups with caching (server discovery step 3).

:class:`WellKnownResolver` asks ``https://<name>/.well-known/matrix/server``, follows at
most :data:`MAX_REDIRECTS` redirects (each hop is a fresh fetch, so each goes through the
SSRF guard), and returns the ``m.server`` delegation or None. Results are cached per
server name, by ``Cache-Control: max-age`` or ``Expires`` (default 24 hours, at most 48
hours); failures (network errors, non-200, too large, invalid body) are cached for an
hour, as the Matrix specification recommends.

Example::

    resolver = WellKnownResolver(reactor, fetcher)
    delegated = await resolver.get_delegated_server("example.org")
    # "matrix.example.org:443", or None when there is no (valid) delegation
"""

import collections
import email.utils
import logging
from typing import Mapping, Optional, Protocol
from urllib.parse import urljoin, urlsplit

import attr

from keyring_module.clock import ReactorClock
from keyring_module.http import FederationRequestError, InvalidResponseError
from keyring_module.http.body import decode_json
from keyring_module.quoting import quote_untrusted
from keyring_module.servername import parse_server_name

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 5
MAX_WELL_KNOWN_SIZE = 64 * 1024
DEFAULT_CACHE_SECONDS = 24 * 3600.0
MAX_CACHE_SECONDS = 48 * 3600.0
FAILURE_CACHE_SECONDS = 3600.0
DEFAULT_CACHE_ENTRIES = 10_000

_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})


@attr.s(auto_attribs=True, frozen=True, slots=True)
class FetchedResponse:
    """One HTTP hop: status, headers (lower-cased names) and body."""

    code: int
    headers: Mapping[str, str]
    body: bytes


class WellKnownFetcher(Protocol):
    """Fetches one URL (no redirect following) through the guarded HTTPS agent."""

    async def fetch(self, url: str, max_size: int) -> FetchedResponse:
        """GET ``url``; raise FederationRequestError on any transport failure."""
        ...


class WellKnownLookup(Protocol):
    """What discovery needs from a well-known resolver."""

    async def get_delegated_server(self, server_name: str) -> Optional[str]:
        """The ``m.server`` value for ``server_name``, or None."""
        ...


class _WellKnownFailure(Exception):
    """The lookup failed: the reason is logged, the failure cached."""


class WellKnownResolver:
    """Looks up and caches ``.well-known/matrix/server`` delegations.

    Args:
        clock: supplies the time for cache expiry.
        fetcher: performs single GETs through the SSRF-guarded agent.
        max_entries: cache size bound; the oldest entries are evicted first.
        allow_http: also accept ``http://`` URLs (tests only).

    Example::

        resolver = WellKnownResolver(reactor, fetcher)
        await resolver.get_delegated_server("example.org")
    """

    def __init__(
        self,
        clock: ReactorClock,
        fetcher: WellKnownFetcher,
        max_entries: int = DEFAULT_CACHE_ENTRIES,
        allow_http: bool = False,
    ) -> None:
        self._clock = clock
        self._fetcher = fetcher
        self._max_entries = max_entries
        self._scheme = "http" if allow_http else "https"
        self._allowed_schemes = ("http", "https") if allow_http else ("https",)
        # server name -> (expiry in reactor seconds, delegated server or None)
        self._cache: collections.OrderedDict[str, tuple[float, Optional[str]]] = (
            collections.OrderedDict()
        )

    async def get_delegated_server(self, server_name: str) -> Optional[str]:
        """The delegated server (``m.server``) for ``server_name``, or None.

        Never raises for lookup failures (they mean "no delegation"), but lets a
        cancellation through uncached.

        Args:
            server_name: a hostname without port (discovery step 3 only).
        """
        now = self._clock.seconds()
        cached = self._cache.get(server_name)
        if cached is not None:
            expires, value = cached
            if now < expires:
                return value
            del self._cache[server_name]

        try:
            value, ttl = await self._fetch(server_name)
        except _WellKnownFailure as e:
            logger.debug("No valid .well-known for %s: %s", server_name, e)
            value, ttl = None, FAILURE_CACHE_SECONDS
        if ttl > 0:
            self._store(server_name, value, self._clock.seconds() + ttl)
        return value

    def _store(self, server_name: str, value: Optional[str], expires: float) -> None:
        self._cache[server_name] = (expires, value)
        self._cache.move_to_end(server_name)
        while len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)

    async def _fetch(self, server_name: str) -> tuple[Optional[str], float]:
        url = "%s://%s/.well-known/matrix/server" % (self._scheme, server_name)
        for _hop in range(MAX_REDIRECTS + 1):
            try:
                response = await self._fetcher.fetch(url, MAX_WELL_KNOWN_SIZE)
            except FederationRequestError as e:
                raise _WellKnownFailure("%s: %s" % (url, e)) from None
            if response.code in _REDIRECT_CODES:
                url = self._redirect_target(url, response)
                continue
            if response.code != 200:
                raise _WellKnownFailure("%s answered HTTP %d" % (url, response.code))
            delegated = _parse_body(response.body)
            return delegated, self._cache_seconds(response.headers)
        raise _WellKnownFailure("more than %d redirects" % MAX_REDIRECTS)

    def _redirect_target(self, url: str, response: FetchedResponse) -> str:
        location = response.headers.get("location")
        if not location:
            raise _WellKnownFailure("%s redirected without a Location" % (url,))
        target = urljoin(url, location.strip())
        parts = urlsplit(target)
        if parts.scheme not in self._allowed_schemes or not parts.hostname:
            raise _WellKnownFailure("refusing redirect to %r" % (target,))
        logger.debug("Following .well-known redirect %s -> %s", url, target)
        return target

    def _cache_seconds(self, headers: Mapping[str, str]) -> float:
        """How long a valid answer may be cached, from Cache-Control / Expires."""
        seconds = DEFAULT_CACHE_SECONDS
        directives = _cache_control(headers.get("cache-control", ""))
        if "no-store" in directives or "no-cache" in directives:
            return 0.0
        max_age = directives.get("max-age")
        expires = headers.get("expires")
        if max_age is not None and max_age.isdigit():
            seconds = float(max_age)
        elif expires:
            try:
                expires_at = email.utils.parsedate_to_datetime(expires).timestamp()
            except (TypeError, ValueError):
                expires_at = None  # unparsable: keep the default
            if expires_at is not None:
                seconds = max(0.0, expires_at - self._clock.seconds())
        return min(seconds, MAX_CACHE_SECONDS)


def _cache_control(value: str) -> dict[str, Optional[str]]:
    directives: dict[str, Optional[str]] = {}
    for part in value.split(","):
        name, sep, arg = part.strip().partition("=")
        if name:
            directives[name.strip().lower()] = arg.strip().strip('"') if sep else None
    return directives


def _parse_body(body: bytes) -> str:
    """The ``m.server`` value of a well-known body, or raise _WellKnownFailure."""
    try:
        parsed = decode_json(body)
    except InvalidResponseError as e:
        raise _WellKnownFailure(str(e)) from None
    if not isinstance(parsed, dict):
        raise _WellKnownFailure("body is not a JSON object")
    delegated = parsed.get("m.server")
    if not isinstance(delegated, str) or parse_server_name(delegated) is None:
        raise _WellKnownFailure("invalid m.server %s" % quote_untrusted(delegated))
    return delegated
