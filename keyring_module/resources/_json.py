"""One place that writes JSON answers and ``{"errcode", "error"}`` errors.

Every resource answers through these helpers, so every body is canonical JSON with
``Content-Type: application/json`` and every error has the same shape, e.g.::

    HTTP/1.1 404 Not Found
    Content-Type: application/json

    {"errcode":"M_UNRECOGNIZED","error":"Unrecognized request"}

Answers that may be big (notary answers) go through :func:`respond_json`: up to
:data:`~keyring_module.resources.body_producer.CHUNK_BYTES` they are written at once,
bigger ones piece by piece as the client reads them, counted toward the site's
:class:`~keyring_module.resources.body_producer.SiteResponseBudget`. While that budget
(or the client address's share of it) cannot take a big answer, the answer is 429
``M_LIMIT_EXCEEDED`` with ``retry_after_ms`` instead.
"""

import logging
from typing import Any, Awaitable, Callable, Optional

from canonicaljson import encode_canonical_json
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from keyring_module.errors import RequestError
from keyring_module.resources.body_producer import CHUNK_BYTES, BodyProducer, response_budget_of
from keyring_module.resources.per_address import client_key
from keyring_module.storage.errors import StorageError

logger = logging.getLogger(__name__)

JSON_CONTENT_TYPE = b"application/json"
#: What a client refused for lack of answer budget is told to wait before trying again.
BUDGET_RETRY_AFTER_MS = 1000


def write_json_bytes(request: Request, code: int, body: bytes) -> bytes:
    """Set the status and JSON headers and return ``body`` for ``render_*`` to return."""
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", JSON_CONTENT_TYPE)
    request.setHeader(b"Cache-Control", b"no-cache, no-store, must-revalidate")
    request.setHeader(b"Content-Length", b"%d" % len(body))
    return body


def respond_json(request: Request, code: int, body: bytes) -> object:
    """Answer ``request`` with ``body``; returns what ``render_*`` should return.

    A body up to ``CHUNK_BYTES`` is returned for Twisted to write at once. A bigger one
    is sent piece by piece as the client reads it (the request finishes by itself and
    ``NOT_DONE_YET`` is returned), unless the site's answer budget, or the client
    address's share of it, cannot take it now: then the answer is 429
    ``M_LIMIT_EXCEEDED`` with ``retry_after_ms``. The status actually sent is
    ``request.code`` afterwards.
    """
    if len(body) <= CHUNK_BYTES or request.method == b"HEAD":
        return write_json_bytes(request, code, body)
    budget = response_budget_of(request)
    client = client_key(request.getClientAddress()) if budget is not None else None
    if budget is not None and not budget.can_send(body, client):
        logger.debug(
            "Refused a %d-byte answer: %d bytes of answers are waiting to be read, "
            "%d of them by %s",
            len(body),
            budget.held_bytes,
            budget.held_by(client),
            client,
        )
        return write_error(
            request,
            RequestError(
                429,
                "M_LIMIT_EXCEEDED",
                "Too many answers are waiting to be read",
                retry_after_ms=BUDGET_RETRY_AFTER_MS,
            ),
        )
    write_json_bytes(request, code, body)
    BodyProducer(request, body, budget, client).start()
    return NOT_DONE_YET


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


def finish_with(request: Request, code: int, body: bytes) -> int:
    """Answer an asynchronous request, if the client is still there.

    Returns:
        The status sent (429 when the answer budget refused ``body``), or ``code``
        when the client has gone.
    """
    if request._disconnected or request.finished:
        return code
    rendered = respond_json(request, code, body)
    if isinstance(rendered, bytes):
        request.write(rendered)
        request.finish()
    return request.code


def is_cancellation(error: Optional[BaseException]) -> bool:
    """Whether ``error`` is a cancellation, also when a gathering of Deferreds wrapped it
    (``FirstError``).

    Example:
        >>> is_cancellation(defer.FirstError(Failure(defer.CancelledError()), 0))
        True
        >>> is_cancellation(defer.FirstError(Failure(ValueError("bug")), 0))
        False
    """
    while isinstance(error, defer.FirstError):
        error = error.subFailure.value
    return isinstance(error, defer.CancelledError)


def render_async(
    request: Request,
    handler: Callable[[], Awaitable[tuple[int, bytes]]],
    on_done: Optional[Callable[[int], None]] = None,
) -> object:
    """Run an ``async`` handler returning ``(code, body_bytes)`` for a ``render_*``.

    :class:`RequestError` becomes its JSON error; a failing key store becomes 503
    ``M_UNKNOWN`` (logged in one line); anything else is logged with its traceback and
    becomes 500 ``M_UNKNOWN``, so a bug never leaves a request hanging. When the handler
    finishes without waiting (a cached answer), the answer is written directly, with no
    extra reactor turn. Answers go through :func:`respond_json`; ``on_done(code)`` is
    called with the status sent once it is known.
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
        except Exception as e:
            if is_cancellation(e):
                raise defer.CancelledError() from e  # the client went away
            logger.exception("Error handling %s %r", request.method, request.uri)
            return 500, error_body(RequestError(500, "M_UNKNOWN", "Internal server error"))

    d = defer.ensureDeferred(run())
    if d.called and isinstance(d.result, tuple):
        code, body = d.result
        rendered = respond_json(request, code, body)
        if on_done is not None:
            on_done(request.code)
        return rendered

    def done(outcome: tuple[int, bytes]) -> None:
        code = finish_with(request, *outcome)
        if on_done is not None:
            on_done(code)

    def on_unexpected(f: Failure) -> None:
        if not is_cancellation(f.value):
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
