"""The standalone metrics listener's ``Site``: ``GET /metrics`` with no access log at INFO.

Prometheus scrapes every few seconds; Twisted's ``Site`` would log an access line for
each scrape at INFO. :class:`MetricsSite` logs them at DEBUG only, as
:class:`~keyring_module.resources.site.KeyServerSite` does for the key listeners.

Example::

    site = build_metrics_site(services.metrics.registry)
    reactor.listenTCP(9100, site, interface="127.0.0.1")

    GET /metrics HTTP/1.1

    HTTP/1.1 200 OK
    Content-Type: text/plain; version=0.0.4; charset=utf-8

    # HELP keyring_notary_requests_total ...
"""

import logging

from prometheus_client import CollectorRegistry
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from keyring_module.resources.site import log_request_at_debug

logger = logging.getLogger(__name__)


class MetricsSite(Site):
    """A ``Site`` that logs requests at DEBUG only and never logs starting or stopping."""

    noisy = False

    def log(self, request: Request) -> None:  # type: ignore[override]
        log_request_at_debug(logger, request)


def build_metrics_site(registry: CollectorRegistry) -> MetricsSite:
    """The metrics listener's site: ``/metrics`` serves ``registry`` in Prometheus text."""
    from prometheus_client.twisted import MetricsResource

    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry=registry))
    return MetricsSite(root)
