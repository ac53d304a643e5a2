"""One place that writes JSON answers and ``{"errcode", "error"}`` errors.

Every resource answers through these helpers, so every body is canonical JSON with
``Content-Type: application/json`` and every error has the same shape, e.g.::

    HTTP/1.1 404 Not Found
    Content-Type: application/json

    {"errcode":"M_UNRECOGNIZED","error":"Unrecognized request"}
"""

import logging
from typing import Any, Awaitable, Callable, Optional

from canonicaljson import encode_canonical_json
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from keyring_module.errors import RequestError
from keyring_module.storage.errors import StorageError

logger = logging.getLogger(__name__)

JSON_CONTENT_TYPE = b"application/json"


def write_json_bytes(request: Request, code: int, body: bytes) -> bytes:
    """Set the status and JSON headers and return ``body`` for ``render_*`` to return."""
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", JSON_CONTENT_TYPE)
    request.setHeader(b"Cache-Control", b"no-cache, no-store, must-revalidate")
    request.setHeader(b"Content-Length", b"%d" % len(body))
    return body


#: The body of last resort, for an error that cannot be written otherwise.
FALLBACK_ERROR_BODY = b'{"errcode":"M_UNKNOWN","error":"Internal server error"}'


def error_body(error: RequestError) -> bytes:
    """The canonical JSON body of an error, with ``retry_after_ms`` when set.

    Never fails: text that UTF-8 cannot encode (a lone surrogate echoed from a
    request) is escaped, and anything else that cannot be encoded gives
    :data:`FALLBACK_ERROR_BODY`, so every error gets an answer.

    Example:
        >>> print(error_body(RequestError(400, "M_INVALID_PARAM", "Bad id \\udc80")).decode())
        {"errcode":"M_INVALID_PARAM","error":"Bad id \\\\udc80"}
    """
    try:
        body: dict[str, Any] = {
            "errcode": _encodable(error.errcode),
            "error": _encodable(error.msg),
        }
        if error.retry_after_ms is not None:
            body["retry_after_ms"] = error.retry_after_ms
        return encode_canonical_json(body)
    except Exception:
        logger.exception("Cannot encode the error %s", ascii(error)[:200])
        return FALLBACK_ERROR_BODY


def _encodable(text: str) -> str:
    """``text`` with whatever UTF-8 cannot encode written as backslash escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def write_error(request: Request, error: RequestError) -> bytes:
    """Render ``error`` as its JSON body; returns the bytes for ``render_*``."""
    return write_json_bytes(request, error.code, error_body(error))


def finish_with(request: Request, code: int, body: bytes) -> None:
    """Write a complete answer to an asynchronous request, if the client is still there."""
    if request._disconnected or request.finished:
        return
    request.write(write_json_bytes(request, code, body))
    request.finish()


def render_async(
    request: Request,
    handler: Callable[[], Awaitable[tuple[int, bytes]]],
    on_done: Optional[Callable[[int], None]] = None,
) -> object:
    """Run an ``async`` handler returning ``(code, body_bytes)`` for a ``render_*``.

    :class:`RequestError` becomes its JSON error; a failing key store becomes 503
    ``M_UNKNOWN`` (logged in one line); anything else is logged with its traceback and
    becomes 500 ``M_UNKNOWN``, so a bug never leaves a request hanging. When the handler
    finishes without waiting (a cached answer), the body is returned directly, with no
    extra reactor turn. ``on_done(code)`` is called once the status is known.
    """

    async def run() -> tuple[int, bytes]:
        try:
            return await handler()
        except RequestError as e:
            return e.code, error_body(e)
        except StorageError as e:
            # The database is down or broken: say so plainly, without a traceback.
            logger.error("Key store unavailable for %s %r: %s", request.method, request.uri, e)
            return 503, error_body(
                RequestError(503, "M_UNKNOWN", "Key store unavailable", retry_after_ms=5000)
            )
        except defer.CancelledError:
            raise  # the client went away
        except Exception:
            logger.exception("Error handling %s %r", request.method, request.uri)
            return 500, error_body(RequestError(500, "M_UNKNOWN", "Internal server error"))

    d = defer.ensureDeferred(run())
    if d.called and isinstance(d.result, tuple):
        code, body = d.result
        if on_done is not None:
            on_done(code)
        return write_json_bytes(request, code, body)

    def done(outcome: tuple[int, bytes]) -> None:
        if on_done is not None:
            on_done(outcome[0])
        finish_with(request, *outcome)

    def on_unexpected(f: Failure) -> None:
        if not f.check(defer.CancelledError):
            logger.error("Unhandled error rendering %r: %s", request.uri, f.getTraceback())

    d.addCallback(done)
    d.addErrback(on_unexpected)
    request.notifyFinish().addErrback(lambda _: d.cancel())
    return NOT_DONE_YET


class ErrorResource(Resource):
    """Answers every request (and every child path) with one JSON error."""

    isLeaf = True

    def __init__(self, error: RequestError) -> None:
        super().__init__()
        self._error = error

    def render(self, request: Request) -> bytes:
        return write_error(request, self._error)


def unrecognized() -> ErrorResource:
    """404 ``M_UNRECOGNIZED`` for unknown paths."""
    return ErrorResource(RequestError(404, "M_UNRECOGNIZED", "Unrecognized request"))


def method_not_allowed(request: Request, allowed: tuple[bytes, ...]) -> bytes:
    """405 ``M_UNRECOGNIZED`` with an ``Allow`` header."""
    request.setHeader(b"Allow", b", ".join(allowed))
    return write_error(request, RequestError(405, "M_UNRECOGNIZED", "Unrecognized request"))


class JsonDirectory(Resource):
    """A path segment whose unknown children answer 404 ``M_UNRECOGNIZED`` in JSON.

    Twisted's default answer for a missing child is an HTML page; the Matrix API
    standards want a JSON ``M_UNRECOGNIZED`` error.
    """

    def getChild(self, path: bytes, request: Request) -> Resource:
        return unrecognized()

    def render(self, request: Request) -> bytes:
        return unrecognized().render(request)
