"""Request bodies and size-capped response bodies for the federation client.

:func:`read_body` collects a response body but drops the connection as soon as more
than ``max_size`` bytes arrived (or the declared ``Content-Length`` is already too
big), failing with :class:`~keyring_module.http.ResponseTooLargeError`; an aborted
connection is never returned to the pool. :class:`BytesProducer` sends an in-memory
request body with a known length. :func:`decode_json` decodes a body strictly
(federation answers and ``.well-known``).

Why not treq's body helpers (or Twisted's):

* ``treq.content`` / ``treq.json_content`` and ``twisted.web.client.readBody`` read
  without a bound.
* ``treq.collect`` stops a body whose collector raises with ``loseConnection()``:
  over TLS that sends a close alert and keeps reading (and handing data to the
  collector) until the peer answers it, which a hostile peer never does. The cap needs
  ``abortConnection()``, and it must act on a too-large ``Content-Length`` before any
  body byte arrives, where ``collect`` only sees data.
* treq turns ``bytes`` into a ``FileBodyProducer`` on the global cooperator (the
  global reactor); this producer writes the body in one call on whatever reactor the
  connection runs on.

Example::

    response = await agent.request(b"POST", uri, headers, BytesProducer(b"{}"))
    body = await read_body(response, max_size=1024 * 1024)
"""

from typing import Callable, Optional

from twisted.internet import defer, error
from twisted.internet.interfaces import IConsumer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from zope.interface import implementer

from keyring_module.http import InvalidResponseError, ResponseTooLargeError
from keyring_module.json_codec import loads_strict


@implementer(IBodyProducer)
class BytesProducer:
    """A request body that is already in memory, written at once (no cooperator)."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> "defer.Deferred[None]":
        consumer.write(self._body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        """Nothing to pause: everything was written at once."""

    def resumeProducing(self) -> None:
        """Nothing to resume."""

    def stopProducing(self) -> None:
        """Nothing to stop."""


class _CappedBodyReader(Protocol):
    """Collects a response body, aborting the connection past ``max_size`` bytes.

    With ``keep`` set, fires with the first ``keep`` bytes as soon as they arrived and
    drops the connection (used for error bodies, of which only a prefix is kept).
    """

    def __init__(
        self, deferred: "defer.Deferred[bytes]", max_size: int, keep: Optional[int]
    ) -> None:
        self._deferred = deferred
        self._max_size = max_size
        self._keep = keep
        self._chunks: list[bytes] = []
        self._length = 0

    def dataReceived(self, data: bytes) -> None:
        if self._deferred.called:
            return
        self._chunks.append(data)
        self._length += len(data)
        if self._keep is not None and self._length >= self._keep:
            self._deferred.callback(b"".join(self._chunks)[: self._keep])
            self.abort()
        elif self._length > self._max_size:
            self._deferred.errback(
                ResponseTooLargeError("response body exceeds %d bytes" % self._max_size)
            )
            self.abort()

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        if self._deferred.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._deferred.callback(b"".join(self._chunks))
        else:
            self._deferred.errback(reason)

    def abort(self) -> None:
        """Drop the connection so that nothing more is read (or pooled)."""
        if self.transport is None:
            return
        # ``self.transport`` is Twisted's TransportProxyProducer; its ``_producer`` is
        # the real connection, which can be aborted. Fall back to a plain close.
        producer = getattr(self.transport, "_producer", None)
        abort: Optional[Callable[[], object]] = getattr(producer, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            self.transport.loseConnection()


def read_body(
    response: IResponse, max_size: int, keep: Optional[int] = None
) -> "defer.Deferred[bytes]":
    """Read ``response``'s body, failing with ResponseTooLargeError past ``max_size``.

    Args:
        response: the response whose body to read.
        max_size: the most bytes accepted; more drops the connection.
        keep: if set, stop after this many bytes and return them (error bodies).

    Returns:
        A Deferred firing with the body; cancelling it drops the connection.
    """
    reader: Optional[_CappedBodyReader] = None

    def cancel(_d: "defer.Deferred[bytes]") -> None:
        if reader is not None:
            reader.abort()

    d: "defer.Deferred[bytes]" = defer.Deferred(cancel)
    reader = _CappedBodyReader(d, max_size, keep)
    length = response.length
    if keep is None and length is not UNKNOWN_LENGTH and int(length) > max_size:  # type: ignore[call-overload]
        response.deliverBody(reader)
        reader.abort()
        if not d.called:
            d.errback(
                ResponseTooLargeError(
                    "response Content-Length %d exceeds %d bytes" % (int(length), max_size)  # type: ignore[call-overload]
                )
            )
        return d
    response.deliverBody(reader)
    return d


def decode_json(body: bytes, *, in_worker_thread: bool = False) -> object:
    """Decode a UTF-8 JSON body strictly (no NaN/Infinity).

    With ``in_worker_thread``, big bodies of many tiny values are decoded in a way that
    lets the reactor thread run meanwhile (see :mod:`keyring_module.json_codec`).

    Raises:
        InvalidResponseError: the body is not valid JSON (or nests too deeply to decode).
    """
    try:
        return loads_strict(body, in_worker_thread=in_worker_thread)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InvalidResponseError("response is not valid JSON: %s" % (e,)) from None
