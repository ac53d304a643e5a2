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
from typing import Callable, Iterable, Mapping, Optional, Protocol

import attr

from keyring_module.http import FederationRequestError
from keyring_module.model import KeyRequest, ServerKeysResponse, StoredKey
from keyring_module.ratelimit import OriginLimitedError
from keyring_module.validation import InvalidKeyResponseError


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
    #: Not asked at all: the per-server limiter refused (rate limited or backed off), or
    #: the server name is not valid.
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
    if isinstance(error, FederationRequestError):
        detail = "%s (%s)" % (error.outcome, error)
        return SourceFailure(source, FailureKind.UNREACHABLE, detail)
    if isinstance(error, InvalidKeyResponseError):
        return SourceFailure(source, FailureKind.INVALID_RESPONSE, str(error))
    return SourceFailure(source, FailureKind.ERROR, "%s: %s" % (type(error).__name__, error))
