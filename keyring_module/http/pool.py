"""The outbound connection pool, without Twisted's per-connection log lines.

Twisted's ``HTTPConnectionPool`` builds one ``_HTTP11ClientFactory`` per new
connection, and every factory logs ``Starting factory ...`` and ``Stopping factory
...`` at INFO when its connection opens and closes: two lines per outbound connection
that say nothing an operator can use (our own lines name each fetch and its outcome).
:class:`QuietHTTPConnectionPool` builds the same factory with ``noisy = False``.

Example::

    pool = QuietHTTPConnectionPool(reactor, persistent=True)
    agent = Agent.usingEndpointFactory(reactor, endpoint_factory, pool=pool)
"""

from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory


class QuietHTTP11ClientFactory(_HTTP11ClientFactory):
    """Twisted's HTTP/1.1 client factory, without the start/stop log lines."""

    noisy = False


class QuietHTTPConnectionPool(HTTPConnectionPool):
    """An ``HTTPConnectionPool`` whose connections log nothing when they open or close.

    Example:
        >>> from twisted.internet.task import Clock
        >>> QuietHTTPConnectionPool(Clock())._factory.noisy
        False
    """

    _factory = QuietHTTP11ClientFactory
