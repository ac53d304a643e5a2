"""What the fetch layer shares: result types and the two protocols.

* A :class:`KeyFetcher` is one kind of *source* (the origins, or trusted notaries). It is
  asked about many servers at once with :class:`~keyring_module.model.KeyRequest` values
  and answers with :class:`SourceAnswers`: validated responses, each labelled with where
  it came from, and why the servers it has nothing for failed.
* A :class:`KeySource` is what the notary, the keyring and the CLI ask for keys: the
  fetcher chain (:class:`~keyring_module.fetchers.chain.KeyFetcherChain`), which serves
  from the store and fetches only what is missing.
"""

import enum
import logging
from typing import (
    Awaitable,
    Callable,
    Hashable,
    Iterable,
    Mapping,
    Optional,
    Protocol,
    TypeVar,
    Union,
)

import attr
from twisted.internet import defer

from keyring_module.blocking import WorkerPoolBusyError
from keyring_module.clock import SecondsClock, now_ms
from keyring_module.http import FederationRequestError
from keyring_module.model import KeyRequest, ServerKeysResponse, StoredKey
from keyring_module.ratelimit import OriginLimitedError
from keyring_module.validation import InvalidKeyResponseError

T = TypeVar("T")


@attr.s(auto_attribs=True, frozen=True, slots=True)
class FetchResult:
    """A validated response and its source (``SOURCE_ORIGIN`` or ``notary_source(name)``)."""

    response: ServerKeysResponse
    source: str


class FailureKind(enum.Enum):
    """Why a source gave nothing usable about a server."""

    #: The network request failed: timeout, connection or TLS error, HTTP error status,
    #: a body that is too large or not JSON, an address the IP guard denies.
    UNREACHABLE = "unreachable"
    #: The source answered, but what it said about the server was rejected (bad
    #: signature, wrong server name, malformed key...).
    INVALID_RESPONSE = "invalid_response"
    #: Not asked at all: a limiter refused (rate limited, backed off, or busy: too many
    #: fetches in flight), or the server name is not valid.
    REFUSED = "refused"
    #: A notary answered without an entry for the server.
    NOT_IN_ANSWER = "not_in_answer"
    #: The source did not answer within the chain's deadline.
    TIMED_OUT = "timed_out"
    #: An unexpected error (a bug): logged with its traceback.
    ERROR = "error"


@attr.s(auto_attribs=True, frozen=True, slots=True)
class SourceFailure:
    """Why one source gave nothing usable about one server.

    Attributes:
        source: the source (``origin`` or ``notary:<name>``).
        kind: what kind of failure.
        detail: for people, e.g. ``"connect_error (no route to example.org)"``; for
            ``UNREACHABLE`` it starts with the request's outcome label.
    """

    source: str
    kind: FailureKind
    detail: str


@attr.s(auto_attribs=True, slots=True)
class SourceAnswers:
    """What a fetcher found, by server name: validated responses and failures.

    A server may have both (several notaries behind one fetcher, one failing), or
    neither (nothing was asked about it).
    """

    results: dict[str, list[FetchResult]] = attr.Factory(dict)
    failures: dict[str, list[SourceFailure]] = attr.Factory(dict)

    def add_result(self, server_name: str, result: FetchResult) -> None:
        """Record a validated response about ``server_name``."""
        self.results.setdefault(server_name, []).append(result)

    def add_failure(self, server_name: str, failure: SourceFailure) -> None:
        """Record why a source gave nothing usable about ``server_name``."""
        self.failures.setdefault(server_name, []).append(failure)

    def extend(self, other: "SourceAnswers") -> None:
        """Add another fetcher's (or batch's) answers after these, per server."""
        for server_name, results in other.results.items():
            self.results.setdefault(server_name, []).extend(results)
        for server_name, failures in other.failures.items():
            self.failures.setdefault(server_name, []).extend(failures)

    @classmethod
    def failed(cls, server_names: Iterable[str], failure: SourceFailure) -> "SourceAnswers":
        """The same failure for every server asked (a whole request failed)."""
        return cls(failures={name: [failure] for name in server_names})


def merge_answers(answers: Iterable[SourceAnswers]) -> SourceAnswers:
    """Several fetchers' (or batches') answers as one, in order."""
    merged = SourceAnswers()
    for answer in answers:
        merged.extend(answer)
    return merged


#: A hook told that one server's keys are final: ``report(server_name, keys)`` with all
#: its stored keys (possibly stale or empty: the receiver judges them). The chain calls
#: it per server (``get_keys(on_server=...)``); the keyring's coalescer passes it on.
ServerKeysReport = Callable[[str, Mapping[str, StoredKey]], None]


class KeyFetcher(Protocol):
    """Fetches keys for many servers at once from somewhere on the network.

    Attributes:
        sources: the source labels its answers carry (``("origin",)``, or
            ``notary:<name>`` for each notary it asks).
    """

    @property
    def sources(self) -> tuple[str, ...]: ...

    async def fetch_keys(self, requests: Mapping[str, KeyRequest]) -> SourceAnswers:
        """Fetch keys for the requested servers.

        Args:
            requests: what is wanted, by server name.

        Returns:
            The validated responses by server name, and for servers that could not be
            reached, answered with something invalid or were refused by the limiter,
            why. This never raises because of one bad server.
        """
        ...


class KeySource(Protocol):
    """Where the notary, the keyring and the CLI get keys: the fetcher chain."""

    async def get_keys(
        self,
        requests: Iterable[KeyRequest],
        *,
        use_cache: bool = True,
        on_server: Optional[ServerKeysReport] = None,
    ) -> Mapping[str, Mapping[str, StoredKey]]:
        """Every stored key of each requested server, after fetching what the store
        could not answer (``use_cache=False``: fetch anyway). ``on_server(name, keys)``
        is called for each server as soon as its keys are final, before this returns.
        """
        ...


def merge_key_requests(requests: Iterable[KeyRequest]) -> dict[str, KeyRequest]:
    """Merge requests per server (see :meth:`KeyRequest.merge`)."""
    merged: dict[str, KeyRequest] = {}
    for request in requests:
        previous = merged.get(request.server_name)
        merged[request.server_name] = request if previous is None else previous.merge(request)
    return merged


def failure_from_error(source: str, error: Exception) -> SourceFailure:
    """How a failed request to a source is reported.

    Example:
        >>> from keyring_module.http import RequestTimeoutError
        >>> failure_from_error("origin", RequestTimeoutError("no answer within 10s"))
        SourceFailure(source='origin', kind=<FailureKind.UNREACHABLE: 'unreachable'>, \
detail='timeout (no answer within 10s)')
    """
    if isinstance(error, OriginLimitedError):
        detail = "%s, retry in %d ms" % (error.reason, error.retry_after_ms)
        return SourceFailure(source, FailureKind.REFUSED, detail)
    if isinstance(error, (FederationRequestError, WorkerPoolBusyError)):
        detail = "%s (%s)" % (error.outcome, error)
        return SourceFailure(source, FailureKind.UNREACHABLE, detail)
    if isinstance(error, InvalidKeyResponseError):
        return SourceFailure(source, FailureKind.INVALID_RESPONSE, str(error))
    return SourceFailure(source, FailureKind.ERROR, "%s: %s" % (type(error).__name__, error))


def outcome_label(error: Optional[Exception]) -> str:
    """The metric label of a fetch's outcome: ``ok``, the limiter's reason, the
    request's outcome, ``invalid_<reason>`` or ``error``.

    Example:
        >>> from keyring_module.http import RequestTimeoutError
        >>> outcome_label(None), outcome_label(RequestTimeoutError("no answer"))
        ('ok', 'timeout')
    """
    if error is None:
        return "ok"
    if isinstance(error, OriginLimitedError):
        return error.reason
    if isinstance(error, (FederationRequestError, WorkerPoolBusyError)):
        return error.outcome
    if isinstance(error, InvalidKeyResponseError):
        return "invalid_" + error.reason.value
    return "error"


class FetchLimiter(Protocol):
    """What every outbound fetch goes through: the per-origin limiter
    (:class:`~keyring_module.ratelimit.OriginRateLimiter`) or the notary policy
    (:class:`~keyring_module.notary_limiter.NotaryLimiter`)."""

    async def run(
        self, target: str, fetch: Callable[[], Awaitable[T]], *, flight_key: Hashable = None
    ) -> T:
        """Run ``fetch`` for ``target`` unless refused (raising an
        :class:`~keyring_module.ratelimit.OriginLimitedError`), sharing concurrent runs
        with equal ``flight_key``."""
        ...


#: Told the outcome label of each limited fetch and how long it took in ms (None when
#: the limiter refused it), e.g. to count it in a metric.
OutcomeHook = Callable[[str, Optional[int]], None]


async def run_limited(
    limiter: FetchLimiter,
    target: str,
    source: str,
    fetch: Callable[[], Awaitable[T]],
    *,
    clock: SecondsClock,
    log: logging.Logger,
    what: str,
    what_args: tuple[object, ...],
    describe: Callable[[T], str],
    on_outcome: Optional[OutcomeHook] = None,
    flight_key: Hashable = None,
) -> Union[T, SourceFailure]:
    """Run one fetch from a source through the limiter, and log and count it once.

    Each real fetch (concurrent callers share one) logs one line ``<what>: <outcome> in
    <n> ms``: INFO, with ``describe(result)`` or the failure's kind and detail as
    :func:`failure_from_error` reports it, or ERROR with the traceback for an
    unexpected error. A fetch the limiter refuses logs one DEBUG line only (a backed-off
    server may be asked about on every request).

    Args:
        limiter: the shared limiter of that kind of source (origins or notaries).
        target: the server contacted (the limiter's key).
        source: the source label failures carry (``origin`` or ``notary:<name>``).
        fetch: the fetch itself; any error it raises counts as a failure.
        clock: where the duration is measured.
        log: the fetcher's logger.
        what: the log line's start, a %-format (e.g. ``"Origin key fetch from %s"``).
        what_args: its arguments (the target first).
        describe: the outcome of a successful fetch, e.g. ``"ok (2 keys, ...)"``.
        on_outcome: told each outcome's label (:func:`outcome_label`) and duration.
        flight_key: passed to the limiter.

    Returns:
        The fetch's result, or why the source gave nothing.

    Example::

        found = await run_limited(
            limiter, name, "origin", lambda: get(name), clock=reactor, log=logger,
            what="Origin key fetch from %s", what_args=(name,), describe=lambda r: "ok",
        )
        if isinstance(found, SourceFailure):
            ...
    """
    raised: list[Exception] = []

    async def timed() -> T:
        start = now_ms(clock)
        try:
            result = await fetch()
        except Exception as e:
            raised.append(e)
            elapsed_ms = now_ms(clock) - start
            failure = failure_from_error(source, e)
            unexpected = failure.kind is FailureKind.ERROR
            log.log(
                logging.ERROR if unexpected else logging.INFO,
                what + ": %s: %s in %d ms",
                *what_args,
                failure.kind.value,
                failure.detail,
                elapsed_ms,
                exc_info=unexpected,
            )
            if on_outcome is not None:
                on_outcome(outcome_label(e), elapsed_ms)
            raise
        elapsed_ms = now_ms(clock) - start
        log.info(what + ": %s in %d ms", *what_args, describe(result), elapsed_ms)
        if on_outcome is not None:
            on_outcome(outcome_label(None), elapsed_ms)
        return result

    try:
        return await limiter.run(target, timed, flight_key=flight_key)
    except defer.CancelledError:
        # This caller stopped waiting (its deadline passed); a shared fetch goes on.
        return SourceFailure(source, FailureKind.TIMED_OUT, "stopped waiting")
    except OriginLimitedError as e:
        failure = failure_from_error(source, e)
        log.debug(what + " refused: %s", *what_args, failure.detail)
        if on_outcome is not None:
            on_outcome(outcome_label(e), None)
        return failure
    except Exception as e:
        failure = failure_from_error(source, e)
        if failure.kind is FailureKind.ERROR and e not in raised:
            # Not raised by this caller's fetch (logged there): the limiter's, or a
            # shared flight's.
            log.error(what + ": unexpected error", *what_args, exc_info=True)
        return failure
