"""Prometheus metrics: what an operator needs to see the notary and the keyring at work.

Standalone, they are served on ``metrics.bind_addresses``/``metrics.port`` at
``/metrics`` when ``metrics.enabled``; inside Synapse they are registered in the
homeserver's registry (prometheus_client's default one) and appear on its metrics
listener. With ``workers: N`` (N > 1) each worker writes its values into the
supervisor's folder (prometheus_client's multiprocess mode) and the supervisor serves
their sum; the gauges that are read at each scrape in one process are copied in by
each worker every second (:meth:`Metrics.refresh_watched`) and summed over the live
workers (the oldest served age: their most). Every metric name starts with ``keyring_``:

==============================================  =============================================
``keyring_notary_requests_total``               notary requests by ``endpoint``, ``code``
``keyring_notary_request_seconds``              notary request latency by ``endpoint``
``keyring_notary_answers_total``                per queried server: ``fresh`` (cache),
                                                ``refresh`` (cache, refreshed in background),
                                                ``fetched`` (fetched first), ``stale``
                                                (a needed fetch or refresh failed or was
                                                skipped, last stored served), ``miss``
                                                (nothing to serve), ``self`` (our own keys)
``keyring_notary_truncated_answers_total``      notary answers that reached their byte cap
                                                (32 MiB of entries; the servers beyond it
                                                were left out)
``keyring_notary_fetches_skipped_total``        per queried server, fetches not made, by
                                                ``reason``: ``request_cap`` (beyond
                                                ``notary.max_fetches_per_request``),
                                                ``refresh_cap`` (a background refresh
                                                beyond it, or beyond the refreshes in
                                                flight), ``busy`` (every
                                                ``notary.max_concurrent_requests`` slot
                                                taken), ``client_cap`` (the client's
                                                address had its share of fetches going),
                                                ``backed_off`` (the origin limiter
                                                would refuse it; no notaries configured),
                                                ``refused`` (our own policy refuses the
                                                name, e.g. a denied IP literal)
``keyring_notary_served_age_seconds``           age (since fetched) of responses served
``keyring_notary_oldest_served_age_seconds``    oldest response served in the last 5-10 min
``keyring_origin_fetches_total``                origin fetches by ``outcome``: ``ok``,
                                                ``timeout``, ``tls_error``, ``denied`` (SSRF
                                                guard), ``connect_error``, ``http_error``,
                                                ``too_large``, ``invalid_json``,
                                                ``rate_limited``, ``backed_off``,
                                                ``workers_busy`` (our worker pool was full),
                                                ``busy`` (the global cap's queue was full),
                                                ``invalid_<reason>`` (bad key response)
``keyring_origin_fetch_seconds``                origin fetch duration
``keyring_origins_backed_off``                  origins currently backed off after failures
``keyring_notary_queries_total``                queries to upstream notaries by ``notary``,
                                                ``outcome`` (the labels above)
``keyring_notary_backoffs_total``               upstream notaries backed off, by ``notary``
``keyring_notaries_backed_off``                 upstream notaries currently backed off
``keyring_fetches_in_flight``                   outbound fetches holding a slot of the cap
``keyring_fetches_queued``                      outbound fetches waiting for a slot
``keyring_keys_stored_total``                   responses stored, by ``source`` kind
``keyring_key_conflicts_total``                 conflicting keys seen (first-seen kept)
``keyring_verifications_total``                 keyring checks by ``result``: ``verified``,
                                                ``failed`` (JSON, events, requests)
``keyring_synapse_key_requests_total``          the homeserver's own key lookups answered
                                                by us (``synapse_keyring.
                                                use_module_fetchers``), by ``result``:
                                                ``found`` (every key, valid until the
                                                minimum), ``stale`` (some key missing or
                                                not valid until the minimum, some
                                                returned), ``not_found`` (none), ``error``
                                                (the lookup failed; none returned),
                                                ``delegated`` (answered by Synapse's own
                                                fetchers: our store was not open in time)
==============================================  =============================================
"""

import enum
from typing import Any, Callable, Optional

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from keyring_module.clock import SecondsClock

#: ``keyring_notary_oldest_served_age_seconds`` covers the current and previous window.
OLDEST_WINDOW_SECONDS = 300


LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
)
AGE_BUCKETS = (60, 600, 3600, 6 * 3600, 12 * 3600, 86400, 7 * 86400, 30 * 86400, 365 * 86400)


class AnswerResult(enum.Enum):
    """How the notary answered one queried server. Each ``.value`` is a ``result`` label
    of ``keyring_notary_answers_total``, a documented contract: values never change.

    Example:
        >>> AnswerResult.FETCHED.value
        'fetched'
    """

    #: From stored keys, as they were.
    FRESH = "fresh"
    #: From stored keys, refreshed in the background.
    REFRESH = "refresh"
    #: Fetched first, then answered.
    FETCHED = "fetched"
    #: A needed fetch or background refresh failed, did not satisfy the query or was
    #: skipped: the last stored copy was served.
    STALE = "stale"
    #: Nothing to serve: the server is left out of the answer.
    MISS = "miss"
    #: Our own keys.
    SELF = "self"


class SkippedFetch(enum.Enum):
    """Why the notary answered a server from the store without the fetch it needed.
    Each ``.value`` is a ``reason`` label of ``keyring_notary_fetches_skipped_total``.

    Example:
        >>> SkippedFetch.REQUEST_CAP.value
        'request_cap'
    """

    #: Beyond ``notary.max_fetches_per_request``.
    REQUEST_CAP = "request_cap"
    #: A background refresh beyond ``notary.max_fetches_per_request``, or beyond the
    #: background refreshes in flight at once (a quarter of
    #: ``federation.max_concurrent_fetches``).
    REFRESH_CAP = "refresh_cap"
    #: Every ``notary.max_concurrent_requests`` slot was taken.
    BUSY = "busy"
    #: The client's address already had ``notary.max_fetches_per_request`` servers
    #: being fetched or refreshed for its other queries.
    CLIENT_CAP = "client_cap"
    #: The per-origin limiter would have refused it (no trusted notaries configured).
    BACKED_OFF = "backed_off"
    #: Our own policy refuses to fetch for the name (e.g. a denied IP literal).
    REFUSED = "refused"


class Metrics:
    """The keyring's metrics, registered in one registry.

    Args:
        registry: where to register; the process-wide default registry when None (that
            is also the one Synapse exposes). Tests pass a fresh ``CollectorRegistry``.
    """

    def __init__(self, registry: Optional[CollectorRegistry] = None) -> None:
        self.registry = registry if registry is not None else REGISTRY
        r = self.registry
        self.notary_requests = Counter(
            "keyring_notary_requests", "Notary requests", ["endpoint", "code"], registry=r
        )
        self.notary_request_seconds = Histogram(
            "keyring_notary_request_seconds",
            "Notary request latency",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._answer_children: dict[AnswerResult, Any] = {}
        self._request_children: dict[tuple[str, int], tuple[Any, Any]] = {}
        self.notary_answers = Counter(
            "keyring_notary_answers", "How each queried server was answered", ["result"], registry=r
        )
        self.notary_truncated_answers = Counter(
            "keyring_notary_truncated_answers",
            "Notary answers that reached their byte cap (the servers beyond it left out)",
            registry=r,
        )
        self.notary_fetches_skipped = Counter(
            "keyring_notary_fetches_skipped",
            "Fetches a notary query did not make (answered from the store instead)",
            ["reason"],
            registry=r,
        )
        self.served_age_seconds = Histogram(
            "keyring_notary_served_age_seconds",
            "Age of served responses since they were fetched",
            buckets=AGE_BUCKETS,
            registry=r,
        )
        self._clock: Optional[SecondsClock] = None
        self._window = 0
        self._oldest_current_s = 0.0
        self._oldest_previous_s = 0.0
        oldest = Gauge(
            "keyring_notary_oldest_served_age_seconds",
            "Oldest response served in the current and previous 5-minute windows",
            registry=r,
            multiprocess_mode="livemax",
        )
        self._watched: list[tuple[Gauge, Callable[[], float]]] = []
        self._watch(oldest, self._oldest_served)
        self.origin_fetches = Counter(
            "keyring_origin_fetches", "Origin key fetches by outcome", ["outcome"], registry=r
        )
        self.origin_fetch_seconds = Histogram(
            "keyring_origin_fetch_seconds",
            "Origin key fetch duration",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._backed_off = Gauge(
            "keyring_origins_backed_off",
            "Origins backed off after failures",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.notary_queries = Counter(
            "keyring_notary_queries",
            "Queries to upstream notaries by outcome",
            ["notary", "outcome"],
            registry=r,
        )
        self.notary_backoffs = Counter(
            "keyring_notary_backoffs", "Upstream notaries backed off", ["notary"], registry=r
        )
        self._notaries_backed_off = Gauge(
            "keyring_notaries_backed_off",
            "Upstream notaries currently backed off",
            registry=r,
            multiprocess_mode="livesum",
        )
        self._fetches_in_flight = Gauge(
            "keyring_fetches_in_flight",
            "Outbound fetches holding a slot",
            registry=r,
            multiprocess_mode="livesum",
        )
        self._fetches_queued = Gauge(
            "keyring_fetches_queued",
            "Outbound fetches waiting for a slot",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.keys_stored = Counter(
            "keyring_keys_stored", "Key responses stored, by source kind", ["source"], registry=r
        )
        self.key_conflicts = Counter(
            "keyring_key_conflicts", "Conflicting keys seen (first-seen kept)", registry=r
        )
        self.verifications = Counter(
            "keyring_verifications", "Signature verifications by result", ["result"], registry=r
        )
        self.synapse_key_requests = Counter(
            "keyring_synapse_key_requests",
            "The homeserver's own key lookups answered by the module, by result",
            ["result"],
            registry=r,
        )

    def notary_answer(self, result: AnswerResult) -> Any:
        """The ``keyring_notary_answers_total`` child for ``result`` (cached: hot path)."""
        child = self._answer_children.get(result)
        if child is None:
            child = self._answer_children[result] = self.notary_answers.labels(result.value)
        return child

    def notary_request(self, endpoint: str, code: int) -> tuple[Any, Any]:
        """The request counter and latency children for (endpoint, code) (cached)."""
        key = (endpoint, code)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.notary_requests.labels(endpoint, str(code)),
                self.notary_request_seconds.labels(endpoint),
            )
        return children

    def watch_backed_off(self, count: Callable[[], int]) -> None:
        """Report ``count()`` (e.g. the limiter's backed-off origins) at each scrape."""
        self._watch(self._backed_off, lambda: float(count()))

    def watch_notaries_backed_off(self, count: Callable[[], int]) -> None:
        """Report ``count()`` (the notary limiter's backed-off notaries) at each scrape."""
        self._watch(self._notaries_backed_off, lambda: float(count()))

    def watch_fetch_slots(self, in_use: Callable[[], int], waiting: Callable[[], int]) -> None:
        """Report the global cap's slots in use and waiters at each scrape."""
        self._watch(self._fetches_in_flight, lambda: float(in_use()))
        self._watch(self._fetches_queued, lambda: float(waiting()))

    def _watch(self, gauge: Gauge, read: Callable[[], float]) -> None:
        # Read at each scrape; worker processes' scrapes happen elsewhere (in the
        # supervisor), so refresh_watched() also copies the value in, for them.
        gauge.set_function(read)
        self._watched = [(g, f) for g, f in self._watched if g is not gauge]
        self._watched.append((gauge, read))

    def refresh_watched(self) -> None:
        """Store the current value of every watched gauge.

        In one process the gauges are read at each scrape and this changes nothing
        seen. In a worker (prometheus_client's multiprocess mode, where the supervisor
        scrapes the values the workers wrote) a worker calls it every second, so the
        supervisor serves values at most a second old: summed over the live workers,
        or (``keyring_notary_oldest_served_age_seconds``) their most.
        """
        for gauge, read in self._watched:
            gauge.set(read())

    def notary_backed_off(self, notary: str, delay_ms: int) -> None:
        """Count one backoff of an upstream notary (a hook of the notary limiter)."""
        self.notary_backoffs.labels(notary).inc()

    def use_clock(self, clock: SecondsClock) -> None:
        """Read time from ``clock`` (the reactor) for the windowed gauges."""
        self._clock = clock

    def served_response(self, age_seconds: float) -> None:
        """Record the age of one served response."""
        age = max(0.0, age_seconds)
        self.served_age_seconds.observe(age)
        self._roll_window()
        if age > self._oldest_current_s:
            self._oldest_current_s = age

    def _roll_window(self) -> None:
        if self._clock is None:
            return
        window = int(self._clock.seconds() // OLDEST_WINDOW_SECONDS)
        if window != self._window:
            self._oldest_previous_s = self._oldest_current_s if window == self._window + 1 else 0.0
            self._oldest_current_s = 0.0
            self._window = window

    def _oldest_served(self) -> float:
        self._roll_window()
        return max(self._oldest_previous_s, self._oldest_current_s)


_shared: Optional[Metrics] = None


def shared_metrics() -> Metrics:
    """The process-wide metrics in the default registry (created once)."""
    global _shared
    if _shared is None:
        _shared = Metrics()
    return _shared
