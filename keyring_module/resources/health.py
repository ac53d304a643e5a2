"""``GET /health``: 200 while the key store answers, 503 otherwise.

Example::

    GET /health HTTP/1.1

    HTTP/1.1 200 OK
    Content-Type: application/json

    {"status":"ok"}
"""

import logging
from typing import Awaitable, Callable

from canonicaljson import encode_canonical_json
from twisted.web.resource import Resource
from twisted.web.server import Request

from keyring_module.resources._json import method_not_allowed, render_async

logger = logging.getLogger(__name__)


class HealthResource(Resource):
    """Runs ``check`` (e.g. a trivial store query) on each request."""

    isLeaf = True

    def __init__(self, check: Callable[[], Awaitable[None]]) -> None:
        super().__init__()
        self._check = check

    def render_GET(self, request: Request) -> object:
        async def handle() -> tuple[int, bytes]:
            try:
                await self._check()
            except Exception as e:
                logger.warning("Health check failed: %s", e)
                return 503, encode_canonical_json({"status": "unavailable", "error": str(e)})
            return 200, encode_canonical_json({"status": "ok"})

        return render_async(request, handle)

    def render(self, request: Request) -> object:
        if request.method not in (b"GET",):
            return method_not_allowed(request, (b"GET",))
        return super().render(request)
