"""The Twisted ``Site`` used by the standalone server.

Two things differ from Twisted's defaults:

* request bodies are capped while they arrive (``notary.max_request_body``): a larger
  body gets 413 ``M_TOO_LARGE`` and the connection is closed, nothing is buffered;
* no access-log line per request at INFO (only at DEBUG), so a busy notary's log stays
  readable.
"""

import io
import logging
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from keyring_module.errors import RequestError
from keyring_module.resources._json import error_body

logger = logging.getLogger(__name__)


class SizeLimitedRequest(Request):
    """A request that refuses bodies larger than its site's ``max_request_body``."""

    def gotLength(self, length: int | None) -> None:
        limit = self._limit()
        if length is not None and length > limit:
            self._refuse_too_large(limit)
            return
        super().gotLength(length)
        self._body_bytes = 0

    def process(self) -> None:
        if getattr(self, "_refused", False):
            return  # the 413 answer was already written and the connection is closing
        super().process()

    def handleContentChunk(self, data: bytes) -> None:
        if getattr(self, "_refused", False):
            return
        self._body_bytes = getattr(self, "_body_bytes", 0) + len(data)
        limit = self._limit()
        if self._body_bytes > limit:
            self._refuse_too_large(limit)
            return
        super().handleContentChunk(data)

    def _limit(self) -> int:
        site = getattr(self.channel, "site", None)
        return int(getattr(site, "max_request_body", 64 * 1024))

    def _refuse_too_large(self, limit: int) -> None:
        self._refused = True
        self.content = io.BytesIO()
        body = error_body(
            RequestError(413, "M_TOO_LARGE", "Request body is larger than %d bytes" % limit)
        )
        logger.info("Refused a request body over %d bytes", limit)
        # Answer directly on the transport (the request has not been parsed yet) and
        # close the connection, so the rest of the body is never read.
        transport = self.channel.transport if self.channel is not None else None
        if transport is None:
            return
        transport.write(
            b"HTTP/1.1 413 Payload Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Connection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        transport.loseConnection()


class KeyServerSite(Site):
    """A ``Site`` with the request body cap and a quiet access log."""

    requestFactory = SizeLimitedRequest
    noisy = False

    def __init__(self, resource: Resource, max_request_body: int, **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.max_request_body = max_request_body
        # Our POST bodies are JSON: skip Twisted's form parsing (it costs ~50 µs a request).
        self._parsePOSTFormSubmission = False

    def log(self, request: Request) -> None:  # type: ignore[override]
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "%s %s %r -> %d",
                request.getClientAddress(),
                request.method.decode("ascii", "replace"),
                request.uri,
                request.code,
            )
