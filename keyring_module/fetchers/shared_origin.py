"""Origin fetches shared by the processes on one database: the outcomes they share.

The origin fetcher runs each fetch through
:class:`~keyring_module.shared_flights.SharedFlights` with an
:class:`OriginOutcomeCodec`: a successful fetch is shared as the origin's signed answer
(its canonical JSON bytes), which every waiting process validates again against the
name it asked about before using it, exactly as if it had fetched it; a failure is
shared as its kind (unreachable, or answered badly), metric label and message, and
rebuilt as a :class:`SharedFetchUnreachableError` or :class:`SharedFetchAnsweredError`,
so that the per-origin limiter of each waiting process backs off an unreachable origin
(and only that) as the fetching process does::

    flights = SharedFlights(coordination, reactor)
    codec = OriginOutcomeCodec(lambda body: validate(body, "example.org"))
    response = await flights.run("example.org", fetch, codec)
"""

from typing import Awaitable, Callable, Optional

from keyring_module.http import FederationRequestError, InvalidResponseError
from keyring_module.model import ServerKeysResponse
from keyring_module.ratelimit import is_unreachable
from keyring_module.storage.coordination import (
    OUTCOME_ANSWERED,
    OUTCOME_OK,
    OUTCOME_UNREACHABLE,
    FlightOutcome,
)
from keyring_module.validation import InvalidKeyResponseError


class SharedFetchUnreachableError(FederationRequestError):
    """Another process sharing the database could not reach the origin."""

    def __init__(self, label: str, detail: str) -> None:
        super().__init__("%s (fetched by another process)" % (detail,))
        self.outcome = label or "error"


class SharedFetchAnsweredError(InvalidResponseError):
    """The origin answered another process sharing the database, but not well."""

    def __init__(self, label: str, detail: str) -> None:
        super().__init__("%s (fetched by another process)" % (detail,))
        self.outcome = label or "invalid"


def _label(error: BaseException) -> str:
    if isinstance(error, FederationRequestError):
        return str(error.outcome)
    reason = getattr(error, "reason", None)
    value = getattr(reason, "value", None)
    return "invalid_" + value if isinstance(value, str) else "error"


class OriginOutcomeCodec:
    """Writes and reads the outcomes of one server name's origin fetches.

    Args:
        validate: checks an answer read back, as the fetcher checks what it fetched
            (against the name asked about, within ``max_keys_per_response``; off the
            reactor thread when it is big).

    Example:
        >>> from keyring_module.http import ConnectError
        >>> async def validate(body: bytes) -> ServerKeysResponse:
        ...     raise AssertionError("not called")
        >>> codec = OriginOutcomeCodec(validate)
        >>> outcome = codec.encode_error(ConnectError("refused"), 5, "a1")
        >>> outcome.outcome, outcome.label
        ('unreachable', 'connect_error')
        >>> from twisted.internet.defer import ensureDeferred
        >>> ensureDeferred(codec.decode(outcome)).addErrback(
        ...     lambda f: print(f.value.outcome, "-", f.value)
        ... ).result
        connect_error - refused (fetched by another process)
    """

    def __init__(self, validate: Callable[[bytes], Awaitable[ServerKeysResponse]]) -> None:
        self._validate = validate

    def encode(self, result: ServerKeysResponse, finished_ts: int, holder_id: str) -> FlightOutcome:
        """The origin's answer, as its canonical JSON bytes."""
        return FlightOutcome(finished_ts, holder_id, OUTCOME_OK, "ok", "", result.json_bytes)

    def encode_error(
        self, error: BaseException, finished_ts: int, holder_id: str
    ) -> Optional[FlightOutcome]:
        """An unreachable origin, or one that answered badly; None for anything else (a
        limiter's refusal, a bug, our own busy worker pool: nothing about the origin)."""
        if isinstance(error, Exception) and is_unreachable(error):
            kind = OUTCOME_UNREACHABLE
        elif isinstance(error, (FederationRequestError, InvalidKeyResponseError)):
            kind = OUTCOME_ANSWERED
        else:
            return None
        return FlightOutcome(finished_ts, holder_id, kind, _label(error), str(error))

    async def decode(self, outcome: FlightOutcome) -> ServerKeysResponse:
        """The answer, validated again against the name; or the failure, rebuilt.

        Raises:
            SharedFetchUnreachableError: the other process could not reach the origin.
            SharedFetchAnsweredError: the origin answered it badly.
            Exception: what ``validate`` raises for the shared answer.
        """
        if outcome.outcome == OUTCOME_UNREACHABLE:
            raise SharedFetchUnreachableError(outcome.label, outcome.detail)
        if not outcome.ok:
            raise SharedFetchAnsweredError(outcome.label, outcome.detail)
        assert outcome.body is not None
        try:
            return await self._validate(outcome.body)
        except ValueError as e:  # not JSON (loads_strict)
            raise SharedFetchAnsweredError("invalid_json", "shared answer: %s" % (e,)) from e
