"""What every fetcher shares: the request value type, the result type, the protocol.

A fetch is asked per server with a :class:`KeyRequest`: which key ids are wanted (an
empty set means "all keys") and how long they must be valid
(``minimum_valid_until_ts``). Fetchers answer with validated responses, each labelled
with where it came from.
"""

from typing import Callable, Iterable, Mapping, Protocol, Sequence

import attr

from keyring_module.model import ServerKeysResponse, StoredKey


@attr.s(auto_attribs=True, frozen=True, slots=True)
class KeyRequest:
    """The keys wanted from one server.

    Attributes:
        server_name: the server whose keys are wanted.
        key_ids: the wanted key ids; empty means "all current keys".
        minimum_valid_until_ts: current keys must have ``valid_until_ts`` at least this
            (inclusive), in ms since the epoch; 0 accepts any copy.
    """

    server_name: str
    key_ids: frozenset[str] = frozenset()
    minimum_valid_until_ts: int = 0


@attr.s(auto_attribs=True, frozen=True, slots=True)
class FetchResult:
    """A validated response and its source (``SOURCE_ORIGIN`` or ``notary_source(name)``)."""

    response: ServerKeysResponse
    source: str


#: A hook told that one server's keys are final: ``report(server_name, keys)`` with all
#: its stored keys (possibly stale or empty: the receiver judges them). The chain calls
#: it per server (``get_keys(on_server=...)``); the keyring's coalescer passes it on.
ServerKeysReport = Callable[[str, Mapping[str, StoredKey]], None]

#: Validated responses by server name: what a fetcher answers.
ResultsByServer = dict[str, list[FetchResult]]


def merge_results(answers: Iterable[Mapping[str, Sequence[FetchResult]]]) -> ResultsByServer:
    """Concatenate several fetchers' (or batches') answers per server, in order."""
    merged: ResultsByServer = {}
    for answer in answers:
        for server_name, results in answer.items():
            merged.setdefault(server_name, []).extend(results)
    return merged


class KeyFetcher(Protocol):
    """Fetches keys for many servers at once from somewhere on the network."""

    async def fetch_keys(self, requests: Mapping[str, KeyRequest]) -> ResultsByServer:
        """Fetch keys for the requested servers.

        Args:
            requests: what is wanted, by server name.

        Returns:
            The validated responses by server name. Servers that could not be reached,
            answered with something invalid or were refused by the limiter are left out;
            this never raises because of one bad server.
        """
        ...


def merge_key_requests(requests: Iterable[KeyRequest]) -> dict[str, KeyRequest]:
    """Merge requests per server: the union of key ids and the highest minimum.

    A request for all keys (empty ``key_ids``) absorbs requests for specific ones.
    """
    merged: dict[str, KeyRequest] = {}
    for request in requests:
        previous = merged.get(request.server_name)
        if previous is None:
            merged[request.server_name] = request
            continue
        all_keys = not previous.key_ids or not request.key_ids
        merged[request.server_name] = KeyRequest(
            server_name=request.server_name,
            key_ids=frozenset() if all_keys else previous.key_ids | request.key_ids,
            minimum_valid_until_ts=max(
                previous.minimum_valid_until_ts, request.minimum_valid_until_ts
            ),
        )
    return merged


def is_satisfied(request: KeyRequest, keys: Mapping[str, StoredKey]) -> bool:
    """Whether stored keys answer a request, so that no fetch is needed.

    For specific key ids, each must be known: a current key with ``valid_until_ts >=
    minimum``, or an old key (``expired_ts`` set), which no fetch can improve. For "all
    keys", at least one current key must be valid until the minimum.
    """
    minimum = request.minimum_valid_until_ts
    if not request.key_ids:
        return any(k.expired_ts is None and k.valid_until_ts >= minimum for k in keys.values())
    for key_id in request.key_ids:
        key = keys.get(key_id)
        if key is None:
            return False
        if key.expired_ts is None and key.valid_until_ts < minimum:
            return False
    return True
