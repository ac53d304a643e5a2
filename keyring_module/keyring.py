"""The keyring (requester side): verify signed JSON, events and X-Matrix requests.

:class:`Keyring` checks signatures with keys it holds and fetches the missing ones
through the shared fetcher chain (store, then origins and notaries)::

    keyring = Keyring(own_keys, store, chain, reactor, origin_chain=origin_only_chain)
    await keyring.verify_json_for_server("example.org", signed_json, origin_server_ts)
    results = keyring.verify_events(pdus, room_version="10")      # one Deferred per event
    origin = await keyring.verify_request(b"GET", uri, request.requestHeaders, None,
                                          "notary.example.org")

How a batch is verified:

1. one store lookup for every server the batch needs (our own keys need none);
2. every item is checked at once with the stored keys; with a warm cache that is the
   whole job, and the result Deferreds are returned already fired;
3. the items that failed are planned with :func:`~keyring_module.planner.plan_key_fetches`:
   an item whose keys are all present and usable failed for good (bad signature), an
   item beyond the 7-day cap fails at once, and the rest wait for at most one fetch per
   origin, asked with the highest ``minimum_valid_until_ts`` any of them needs;
4. fetches go through a :class:`~keyring_module.planner.KeyFetchCoalescer`, so
   requests made in the same reactor turn share one fetch and an origin never has two
   fetches in flight; each item is then judged again against its *own* timestamp.

A fetch that does not finish within ``fetch_timeout_ms`` fails the items waiting for it
(the fetch itself goes on). Backing off dead origins is the job of the chain's limiter:
while an origin is backed off its fetch returns at once with nothing new, so its items
fail in the same reactor turn.

Request authentication (``X-Matrix``) uses keys valid *now*, never ``old_verify_keys``,
and fetches through ``origin_chain`` only: notaries are not asked (MSC4029).
"""

import functools
import json
import logging
import re
from typing import (
    Any,
    Callable,
    Iterable,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    Union,
    cast,
)

import attr
from canonicaljson import encode_canonical_json
from nacl.signing import VerifyKey as NaclVerifyKey
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web.http_headers import Headers

from keyring_module.clock import ReactorClock, now_ms
from keyring_module.errors import KeyVerificationError
from keyring_module.fetchers.base import KeyRequest
from keyring_module.model import StoredKey
from keyring_module.planner import (
    KeyFetchCoalescer,
    OriginFetch,
    VerifyRequest,
    plan_key_fetches,
)
from keyring_module.redaction import REDACTION_RULES, RedactionRules, redact_with_rules
from keyring_module.roomversions import RoomVersion, get_room_version
from keyring_module.servername import is_valid_server_name
from keyring_module.signing import OwnKeys
from keyring_module.storage import KeyStore
from keyring_module.verify import (
    ED25519_PREFIX,
    KeyPurpose,
    decode_base64_tolerant,
    missing_key_ids,
    required_signers,
    usable_key,
    verify_event_signatures,
    verify_signed_json_with_keys,
)

logger = logging.getLogger(__name__)

#: How long items wait for a key fetch before failing. Longer than the default federation
#: request timeout (10 s), so the client's own timeout normally fires first and the
#: limiter records the failure.
DEFAULT_FETCH_TIMEOUT_MS = 30_000

#: ``valid_until_ts`` given to our own current keys (they never need refreshing).
_OWN_KEY_VALID_UNTIL_TS = 2**62

_OWN_KEY_SOURCE = "own"

_SIGNATURE_LENGTH = 64

KeysByServer = Mapping[str, Mapping[str, StoredKey]]
JsonObject = Mapping[str, Any]


class KeySource(Protocol):
    """What the keyring needs from a fetcher chain
    (:class:`~keyring_module.fetchers.chain.KeyFetcherChain`)."""

    async def get_keys(
        self, requests: Sequence[KeyRequest], *, use_cache: bool = True
    ) -> Mapping[str, Mapping[str, StoredKey]]: ...


# ---------------------------------------------------------------------------
# Items: one signed thing to check, and how to check it
# ---------------------------------------------------------------------------


class _Item(Protocol):
    """One object to verify: its signers, a check, and the key needs for the planner."""

    @property
    def servers(self) -> Iterable[str]:
        """The servers whose keys the check reads."""

    def check(self, keys: KeysByServer, now: int) -> None:
        """Raise :class:`KeyVerificationError` unless the object verifies with ``keys``."""

    def requests(self) -> list[VerifyRequest]:
        """The key needs, one per signer (built only when the first check failed)."""


@attr.s(slots=True, auto_attribs=True)
class _JsonItem:
    server_name: str
    json_object: JsonObject
    valid_at_ts: int
    purpose: KeyPurpose
    compromised: frozenset[bytes]

    @property
    def servers(self) -> tuple[str]:
        return (self.server_name,)

    def check(self, keys: KeysByServer, now: int) -> None:
        verify_signed_json_with_keys(
            self.json_object,
            self.server_name,
            keys.get(self.server_name, {}),
            now if self.purpose == "request" else self.valid_at_ts,
            now,
            purpose=self.purpose,
            compromised=self.compromised,
        )

    def requests(self) -> list[VerifyRequest]:
        key_ids = frozenset(missing_key_ids(self.json_object, self.server_name))
        return [VerifyRequest(self.server_name, key_ids, self.valid_at_ts, True, self.purpose)]


@attr.s(slots=True, auto_attribs=True)
class _EventItem:
    """An event to check.

    ``fast_signer`` is set when the event is the common case: its only required signer is
    the sender's server (room v3+, not a third-party-invite invite, not a restricted
    join). Such events are checked by :func:`_verify_event_fast`, which mirrors
    :func:`~keyring_module.verify.verify_event_signatures` for that case; anything it does
    not accept (including every failure) is decided by ``verify_event_signatures``, so
    error reasons and edge cases stay in one place.
    """

    event: JsonObject
    room_version: RoomVersion
    servers: set[str]
    fast_signer: Optional[str]
    compromised: frozenset[bytes]

    def check(self, keys: KeysByServer, now: int) -> None:
        if self.fast_signer is not None and _verify_event_fast(
            self.event,
            self.fast_signer,
            REDACTION_RULES[self.room_version.redaction_rules],
            keys.get(self.fast_signer),
            now,
            self.room_version.enforce_key_validity,
            self.compromised,
        ):
            return
        verify_event_signatures(
            self.event, self.room_version, keys, now, compromised=self.compromised
        )

    def requests(self) -> list[VerifyRequest]:
        ts = self.event["origin_server_ts"]
        enforce = self.room_version.enforce_key_validity
        return [
            VerifyRequest(server, frozenset(missing_key_ids(self.event, server)), ts, enforce)
            for server in sorted(self.servers)
        ]


@functools.lru_cache(maxsize=65536)
def _valid_server_name(server_name: str) -> bool:
    return is_valid_server_name(server_name)


@functools.lru_cache(maxsize=4096)
def _nacl_verify_key(key_bytes: bytes) -> NaclVerifyKey:
    return NaclVerifyKey(key_bytes)


def _fast_signer(event: JsonObject, version: RoomVersion) -> Optional[str]:
    """The sender's server if it is the event's only required signer, else None.

    Mirrors :func:`~keyring_module.verify.required_signers` for the common case; None
    sends the event to ``required_signers`` itself.
    """
    if version.event_id_domain_signature_required:
        return None
    if event.get("type") == "m.room.member":
        content = event.get("content")
        if type(content) is not dict:
            return None
        membership = content.get("membership")
        if membership == "invite" and "third_party_invite" in content:
            return None
        if (
            membership == "join"
            and version.restricted_join_authorisation
            and content.get("join_authorised_via_users_server") is not None
        ):
            return None
    sender = event.get("sender")
    if type(sender) is not str or not sender.startswith("@"):
        return None
    server_name = sender.partition(":")[2]
    return server_name if _valid_server_name(server_name) else None


def _verify_event_fast(
    event: JsonObject,
    server_name: str,
    rules: RedactionRules,
    keys: Optional[Mapping[str, StoredKey]],
    now: int,
    enforce_validity: bool,
    compromised: frozenset[bytes],
) -> bool:
    """True if the sender's signatures on ``event`` verify; False means "not decided
    here" (use ``verify_event_signatures``), never "invalid"."""
    if not keys:
        return False
    ts = event.get("origin_server_ts")
    signatures = event.get("signatures")
    if type(ts) is not int or type(signatures) is not dict:
        return False
    server_signatures = signatures.get(server_name)
    if type(server_signatures) is not dict:
        return False
    to_check = []
    for key_id, signature in server_signatures.items():
        key = keys.get(key_id)
        if (
            key is None
            or type(key_id) is not str
            or not key_id.startswith(ED25519_PREFIX)
            or not usable_key(
                key,
                ts,
                now,
                purpose="event",
                enforce_validity=enforce_validity,
                compromised=compromised,
            )
        ):
            continue
        raw_signature = decode_base64_tolerant(signature)
        if raw_signature is None or len(raw_signature) != _SIGNATURE_LENGTH:
            return False
        to_check.append((key.verify_key_bytes, raw_signature))
    if not to_check:
        return False
    redacted = redact_with_rules(event, rules)
    redacted.pop("signatures", None)
    try:
        message = encode_canonical_json(redacted)
        for key_bytes, raw_signature in to_check:
            _nacl_verify_key(key_bytes).verify(message, raw_signature)
    except Exception:  # bad signature, unencodable event, bad key: let the slow path say
        return False
    return True


def _check_chunk(items: Sequence[_Item], keys: KeysByServer, now: int) -> list[Optional[Failure]]:
    """Check items with the given keys (also run in worker threads): None = verified."""
    outcomes: list[Optional[Failure]] = []
    append = outcomes.append
    for item in items:
        try:
            item.check(keys, now)
        except KeyVerificationError as e:
            append(Failure(e))
        else:
            append(None)
    return outcomes


_UNSET = object()


class _Batch:
    """The items of one call and their results.

    Until :meth:`deferreds` is called, outcomes are only recorded; afterwards each one
    fires its Deferred. This is how a fully cached batch returns Deferreds that are
    already fired, with no callback chain per item.
    """

    __slots__ = ("items", "outcomes", "_deferreds")

    def __init__(self, items: list[_Item]) -> None:
        self.items = items
        self.outcomes: list[object] = [_UNSET] * len(items)
        self._deferreds: Optional[list["defer.Deferred[None]"]] = None

    def resolve(self, index: int, failure: Optional[Failure]) -> None:
        if self.outcomes[index] is not _UNSET:
            return
        self.outcomes[index] = failure
        if self._deferreds is not None:
            d = self._deferreds[index]
            if failure is None:
                d.callback(None)
            else:
                d.errback(failure)

    def unresolved(self) -> list[int]:
        return [i for i, outcome in enumerate(self.outcomes) if outcome is _UNSET]

    def deferreds(self) -> list["defer.Deferred[None]"]:
        result: list["defer.Deferred[None]"] = []
        for outcome in self.outcomes:
            if outcome is _UNSET:
                result.append(defer.Deferred())
            elif outcome is None:
                result.append(defer.succeed(None))
            else:
                result.append(defer.fail(cast(Failure, outcome)))
        self._deferreds = result
        return result


@attr.s(slots=True, auto_attribs=True)
class _Group:
    """Items waiting for the same set of origin fetches."""

    indexes: list[int]
    waiting_for: set[str]


# ---------------------------------------------------------------------------
# X-Matrix
# ---------------------------------------------------------------------------

_X_MATRIX_SCHEME = "x-matrix"
_PARAM_RE = re.compile(
    r'[ \t]*([A-Za-z0-9_.-]+)[ \t]*=[ \t]*(?:"((?:[^"\\]|\\.)*)"|([^",\s]*))[ \t]*(,|$)'
)
_ESCAPE_RE = re.compile(r"\\(.)")


@attr.s(auto_attribs=True, frozen=True, slots=True)
class XMatrixAuthorization:
    """One parsed ``Authorization: X-Matrix ...`` header.

    Attributes:
        origin: the sending server.
        destination: the server the request was meant for, if the header names it.
        key: the key id the signature was made with, e.g. ``ed25519:a_1``.
        sig: the unpadded base64 signature.
    """

    origin: str
    destination: Optional[str]
    key: str
    sig: str


def parse_x_matrix_header(value: Union[bytes, str]) -> XMatrixAuthorization:
    """Parse an ``X-Matrix`` Authorization header value.

    Parameter names are case-insensitive; values may be quoted (with backslash escapes)
    or bare; whitespace around ``,`` and ``=`` is allowed; unknown parameters are ignored.

    Args:
        value: the header value, e.g.
            ``X-Matrix origin="a.org",destination="b.org",key="ed25519:1",sig="AbC"``.

    Returns:
        The parsed header.

    Raises:
        ValueError: not an X-Matrix header, malformed, a parameter repeated, or
            ``origin``, ``key`` or ``sig`` missing or invalid.

    Example:
        >>> parse_x_matrix_header('X-Matrix origin=a.org,Key="ed25519:1",sig="x"').key
        'ed25519:1'
    """
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("header is not UTF-8") from None
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != _X_MATRIX_SCHEME:
        raise ValueError("not an X-Matrix header")
    params: dict[str, str] = {}
    rest = rest.strip()
    pos = 0
    while pos < len(rest):
        match = _PARAM_RE.match(rest, pos)
        if match is None:
            raise ValueError("malformed parameter at %r" % (rest[pos : pos + 20],))
        name = match.group(1).lower()
        quoted, bare = match.group(2), match.group(3)
        param = _ESCAPE_RE.sub(r"\1", quoted) if quoted is not None else bare
        if name in params:
            raise ValueError("parameter %r given twice" % (name,))
        params[name] = param
        pos = match.end()
        if match.group(4) == "," and pos >= len(rest):
            raise ValueError("trailing comma")
    for required in ("origin", "key", "sig"):
        if not params.get(required):
            raise ValueError("missing %r parameter" % (required,))
    origin = params["origin"]
    if not is_valid_server_name(origin):
        raise ValueError("origin %r is not a valid server name" % (origin,))
    destination = params.get("destination")
    return XMatrixAuthorization(origin, destination or None, params["key"], params["sig"])


def _authorization_headers(headers: Union[Headers, Mapping[Any, Sequence[Any]]]) -> list[Any]:
    if isinstance(headers, Headers):
        return list(headers.getRawHeaders(b"Authorization") or [])
    values: list[Any] = []
    for name, header_values in headers.items():
        header_name = name.decode("latin-1") if isinstance(name, bytes) else str(name)
        if header_name.lower() == "authorization":
            if isinstance(header_values, (bytes, str)):
                values.append(header_values)
            else:
                values.extend(header_values)
    return values


def _text(value: Union[bytes, str], what: str) -> str:
    if isinstance(value, str):
        return value
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        raise KeyVerificationError("", (), "%s is not ASCII" % (what,)) from None


# ---------------------------------------------------------------------------
# The keyring
# ---------------------------------------------------------------------------


class Keyring:
    """Verifies signatures of remote servers, fetching their keys when needed.

    Args:
        own_keys: our own keys; objects signed by our server are checked with these
            (current and old) and never cause a fetch.
        store: the key store (one lookup per batch of servers).
        chain: the fetcher chain for events and signed JSON (store, origins, notaries).
        clock: the reactor (time, coalescing, fetch deadline).
        compromised_keys: decoded bytes of keys never to trust (see
            :func:`~keyring_module.verify.compromised_key_bytes`).
        origin_chain: the chain used for request authentication; it must contact only
            origins (MSC4029), e.g. ``KeyFetcherChain(store, origin_fetcher, None, reactor,
            order=("origin",))``. Defaults to ``chain``, which is only right when ``chain``
            has no notaries.
        fetch_timeout_ms: how long items wait for one key fetch before failing.

    Example::

        keyring = Keyring(own_keys, store, chain, reactor)
        try:
            await keyring.verify_json_for_server("example.org", obj, now_ms)
        except KeyVerificationError as e:
            logger.info("Rejected: %s", e)
    """

    def __init__(
        self,
        own_keys: OwnKeys,
        store: KeyStore,
        chain: KeySource,
        clock: ReactorClock,
        *,
        compromised_keys: frozenset[bytes] = frozenset(),
        origin_chain: Optional[KeySource] = None,
        fetch_timeout_ms: int = DEFAULT_FETCH_TIMEOUT_MS,
    ) -> None:
        self._own_server_name = own_keys.server_name
        self._own_keys = _own_stored_keys(own_keys)
        self._store = store
        self._clock = clock
        self._compromised = frozenset(compromised_keys)
        self._fetch_timeout_s = fetch_timeout_ms / 1000
        # Keys returned by the latest fetch per origin, read by the waiters of that fetch
        # in the same reactor turn and forgotten in the next.
        self._fetched: dict[str, Mapping[str, StoredKey]] = {}
        self._event_fetches = KeyFetchCoalescer(clock, self._batch_fetcher(chain))
        self._request_fetches = KeyFetchCoalescer(
            clock, self._batch_fetcher(origin_chain if origin_chain is not None else chain)
        )

    # -- public API -----------------------------------------------------------------

    def verify_json_for_server(
        self, server_name: str, json_object: JsonObject, valid_at_ts: int
    ) -> "defer.Deferred[None]":
        """Check ``server_name``'s signature on ``json_object``, made at ``valid_at_ts``.

        A key counts if it was valid at ``valid_at_ts``: a current key with
        ``min(valid_until_ts, now + 7 days) >= valid_at_ts``, or an old key with
        ``expired_ts >= valid_at_ts``.

        Args:
            server_name: the signer.
            json_object: the signed object.
            valid_at_ts: when the signature was made (ms since the epoch).

        Returns:
            A Deferred firing with None, or failing with :class:`KeyVerificationError`
            (naming the server, the key ids and why).

        Example::

            await keyring.verify_json_for_server("a.org", obj, clock_ms)
        """
        return self.verify_json_objects([(server_name, json_object, valid_at_ts)])[0]

    def verify_json_objects(
        self, requests: Sequence[tuple[str, JsonObject, int]]
    ) -> list["defer.Deferred[None]"]:
        """Check many signed objects at once (see :meth:`verify_json_for_server`).

        Args:
            requests: ``(server_name, json_object, valid_at_ts)`` triples.

        Returns:
            One Deferred per request, in order.

        Example::

            d1, d2 = keyring.verify_json_objects([("a.org", o1, t1), ("b.org", o2, t2)])
        """
        items: list[Optional[_Item]] = []
        errors: dict[int, KeyVerificationError] = {}
        for i, (server_name, json_object, valid_at_ts) in enumerate(requests):
            if not isinstance(json_object, Mapping):
                errors[i] = KeyVerificationError(server_name, (), "not a JSON object")
                items.append(None)
            elif not isinstance(valid_at_ts, int) or isinstance(valid_at_ts, bool):
                errors[i] = KeyVerificationError(server_name, (), "valid_at_ts is not an int")
                items.append(None)
            else:
                items.append(
                    _JsonItem(server_name, json_object, valid_at_ts, "event", self._compromised)
                )
        return self._run(items, errors, self._event_fetches)

    def verify_events(
        self, events: Sequence[JsonObject], room_version: Union[str, RoomVersion]
    ) -> list["defer.Deferred[None]"]:
        """Check every signature each event needs, over the event redacted by
        ``room_version``'s rules, at the event's ``origin_server_ts``.

        Required signers: the sender's server; in room v1/v2 also the server of the
        event id; for restricted joins (v8+) the server of
        ``join_authorised_via_users_server``.

        Args:
            events: the events as received over federation.
            room_version: their room's version (identifier or :class:`RoomVersion`).

        Returns:
            One Deferred per event, in order; with a warm cache they are already fired.

        Raises:
            ValueError: the room version is unknown.

        Example::

            results = keyring.verify_events(pdus, "10")
            outcomes = await defer.DeferredList(results, consumeErrors=True)
        """
        return self._run(*self._event_items(events, room_version), self._event_fetches)

    def verify_events_in_threads(
        self,
        events: Sequence[JsonObject],
        room_version: Union[str, RoomVersion],
        threadpool: ThreadPool,
        reactor: Any,
        *,
        chunk_size: int = 500,
    ) -> list["defer.Deferred[None]"]:
        """Like :meth:`verify_events`, with the signature checks spread over threads.

        After the one store lookup, the events are cut into chunks of ``chunk_size``
        and each chunk is checked in ``threadpool`` (PyNaCl releases the GIL while it
        verifies); events that need a key fetch then continue on the reactor thread as
        in :meth:`verify_events`. Worth it for large batches on several cores.

        Args:
            events: the events as received.
            room_version: their room's version.
            threadpool: a started :class:`~twisted.python.threadpool.ThreadPool`.
            reactor: the reactor to deliver results on (``callFromThread``).
            chunk_size: events per thread job.

        Returns:
            One Deferred per event, in order.

        Example::

            pool = reactor.getThreadPool()
            results = keyring.verify_events_in_threads(pdus, "10", pool, reactor)
        """
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")

        def check(items: list[_Item], keys: KeysByServer, now: int) -> "defer.Deferred[Any]":
            chunks = [items[i : i + chunk_size] for i in range(0, len(items), chunk_size)]
            jobs = [
                deferToThreadPool(reactor, threadpool, _check_chunk, chunk, keys, now)
                for chunk in chunks
            ]
            gathered = defer.gatherResults(jobs, consumeErrors=True)
            gathered.addCallback(lambda parts: [o for part in parts for o in part])
            return gathered

        return self._run(
            *self._event_items(events, room_version), self._event_fetches, first_pass=check
        )

    def verify_request(
        self,
        method: Union[bytes, str],
        uri: Union[bytes, str],
        headers: Union[Headers, Mapping[Any, Sequence[Any]]],
        body: Optional[bytes],
        destination: str,
    ) -> "defer.Deferred[str]":
        """Authenticate a federation request signed with ``Authorization: X-Matrix``.

        The signed object is ``{"method", "uri", "origin", "destination", "content"}``
        (``content`` only when there is a body). The key must be a current key of the
        origin, valid now; keys are fetched from the origin only, never via notaries.
        Several X-Matrix headers are allowed if they name the same origin; every
        signature made by a usable key must verify.

        Args:
            method: the HTTP method, e.g. ``b"GET"``.
            uri: the request URI as sent: path and query, e.g. ``b"/_matrix/x?a=b"``.
            headers: the request headers (Twisted ``Headers`` or a dict of lists).
            body: the request body (JSON), or None/empty when there is none.
            destination: our server name, the one the request was addressed to.

        Returns:
            A Deferred firing with the origin's server name, or failing with
            :class:`KeyVerificationError`.

        Example::

            origin = await keyring.verify_request(
                request.method, request.uri, request.requestHeaders,
                request.content.read(), "our.example.org")
        """
        try:
            origin, signed = self._request_object(method, uri, headers, body, destination)
        except KeyVerificationError as e:
            return defer.fail(e)
        item = _JsonItem(origin, signed, now_ms(self._clock), "request", self._compromised)
        d = self._run([item], {}, self._request_fetches)[0]
        return d.addCallback(lambda _: origin)

    # -- building items ---------------------------------------------------------------

    def _event_items(
        self, events: Sequence[JsonObject], room_version: Union[str, RoomVersion]
    ) -> tuple[list[Optional[_Item]], dict[int, KeyVerificationError]]:
        version = (
            room_version
            if isinstance(room_version, RoomVersion)
            else get_room_version(room_version)
        )
        compromised = self._compromised
        items: list[Optional[_Item]] = []
        errors: dict[int, KeyVerificationError] = {}
        for i, event in enumerate(events):
            fast = _fast_signer(event, version) if type(event) is dict else None
            if fast is not None:
                items.append(_EventItem(event, version, {fast}, fast, compromised))
                continue
            try:
                if not isinstance(event, Mapping):
                    raise ValueError("event is not a JSON object")
                ts = event.get("origin_server_ts")
                if not isinstance(ts, int) or isinstance(ts, bool):
                    raise ValueError("event has no integer origin_server_ts")
                signers = required_signers(event, version)
            except ValueError as e:
                errors[i] = KeyVerificationError("", (), "cannot tell who must sign: %s" % (e,))
                items.append(None)
                continue
            items.append(_EventItem(event, version, signers, fast, compromised))
        return items, errors

    def _request_object(
        self,
        method: Union[bytes, str],
        uri: Union[bytes, str],
        headers: Union[Headers, Mapping[Any, Sequence[Any]]],
        body: Optional[bytes],
        destination: str,
    ) -> tuple[str, dict[str, Any]]:
        auths: list[XMatrixAuthorization] = []
        for value in _authorization_headers(headers):
            text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            if not text.strip().lower().startswith(_X_MATRIX_SCHEME):
                continue
            try:
                auths.append(parse_x_matrix_header(text))
            except ValueError as e:
                raise KeyVerificationError("", (), "bad X-Matrix header: %s" % (e,)) from None
        if not auths:
            raise KeyVerificationError("", (), "no X-Matrix Authorization header")
        origin = auths[0].origin
        signatures: dict[str, str] = {}
        for auth in auths:
            if auth.origin != origin:
                raise KeyVerificationError(origin, (), "X-Matrix headers name different origins")
            if auth.destination is not None and auth.destination != destination:
                raise KeyVerificationError(
                    origin,
                    (auth.key,),
                    "request is for %r, not for us (%r)" % (auth.destination, destination),
                )
            if not auth.key.startswith(ED25519_PREFIX):
                raise KeyVerificationError(origin, (auth.key,), "unsupported key algorithm")
            signatures[auth.key] = auth.sig
        signed: dict[str, Any] = {
            "method": _text(method, "method").upper(),
            "uri": _text(uri, "uri"),
            "origin": origin,
            "destination": destination,
            "signatures": {origin: signatures},
        }
        if body is not None and body.strip():
            try:
                signed["content"] = json.loads(body)
            except ValueError:
                raise KeyVerificationError(origin, tuple(signatures), "body is not JSON") from None
        return origin, signed

    # -- the batch machinery ----------------------------------------------------------

    def _run(
        self,
        items: list[Optional[_Item]],
        errors: Mapping[int, KeyVerificationError],
        coalescer: KeyFetchCoalescer,
        first_pass: Optional[
            Callable[[list[_Item], KeysByServer, int], "defer.Deferred[Any]"]
        ] = None,
    ) -> list["defer.Deferred[None]"]:
        """Verify ``items`` (None where ``errors`` holds the reason) and return results."""
        batch = _Batch(cast(list[_Item], items))
        for i, error in errors.items():
            batch.resolve(i, Failure(error))
        live = batch.unresolved()
        servers: set[str] = set()
        for i in live:
            servers.update(batch.items[i].servers)
        servers.discard(self._own_server_name)

        lookup: "defer.Deferred[Any]" = (
            defer.ensureDeferred(self._store.get_many_server_keys(servers))
            if servers
            else defer.succeed({})
        )

        def first(stored: Mapping[str, Mapping[str, StoredKey]]) -> Any:
            keys = self._with_own_keys(stored)
            now = now_ms(self._clock)
            if first_pass is None:
                self._after_first_pass(
                    batch,
                    live,
                    keys,
                    now,
                    _check_chunk([batch.items[i] for i in live], keys, now),
                    coalescer,
                )
                return None
            checked = first_pass([batch.items[i] for i in live], keys, now)
            checked.addCallback(
                lambda outcomes: self._after_first_pass(batch, live, keys, now, outcomes, coalescer)
            )
            return checked

        lookup.addCallback(first)
        lookup.addErrback(self._fail_all, batch, "key store lookup failed")
        return batch.deferreds()

    def _fail_all(self, failure: Failure, batch: _Batch, what: str) -> None:
        logger.error("Keyring: %s: %s", what, failure.getErrorMessage())
        error = KeyVerificationError("", (), "%s: %s" % (what, failure.getErrorMessage()))
        for i in batch.unresolved():
            batch.resolve(i, Failure(error))

    def _after_first_pass(
        self,
        batch: _Batch,
        live: list[int],
        keys: KeysByServer,
        now: int,
        outcomes: list[Optional[Failure]],
        coalescer: KeyFetchCoalescer,
    ) -> None:
        failed: list[tuple[int, Failure]] = []
        for i, outcome in zip(live, outcomes, strict=True):
            if outcome is None:
                batch.resolve(i, None)
            else:
                failed.append((i, outcome))
        if failed:
            self._plan_failed(batch, failed, keys, now, coalescer)

    def _plan_failed(
        self,
        batch: _Batch,
        failed: list[tuple[int, Failure]],
        keys: KeysByServer,
        now: int,
        coalescer: KeyFetchCoalescer,
    ) -> None:
        """Fail what no fetch can help; wait for fetches for the rest."""
        requests_of: dict[int, list[VerifyRequest]] = {}
        for i, _ in failed:
            requests_of[i] = [
                r for r in batch.items[i].requests() if r.server_name != self._own_server_name
            ]
        plan = plan_key_fetches((r for rs in requests_of.values() for r in rs), keys, now)
        waiting = set(plan.waiting)
        unsatisfiable = set(plan.unsatisfiable)
        groups: dict[frozenset[str], _Group] = {}
        for i, failure in failed:
            requests = requests_of[i]
            beyond = [r for r in requests if r in unsatisfiable and r.key_ids]
            if beyond:
                r = beyond[0]
                batch.resolve(
                    i,
                    Failure(
                        KeyVerificationError(
                            r.server_name,
                            sorted(r.key_ids),
                            "signed at %d, more than 7 days ahead: no key can be valid then"
                            % (r.valid_at_ts,),
                        )
                    ),
                )
                continue
            unsigned = [r for r in requests if r in unsatisfiable]
            if unsigned:
                # No ed25519 signature at all from a required signer: nothing to fetch.
                r = unsigned[0]
                batch.resolve(
                    i,
                    Failure(
                        KeyVerificationError(
                            r.server_name, (), "not signed by %s" % (r.server_name,)
                        )
                    ),
                )
                continue
            origins = frozenset(r.server_name for r in requests if r in waiting)
            if not origins:
                # Every key it names is present and usable: the signature is bad.
                batch.resolve(i, failure)
                continue
            group = groups.get(origins)
            if group is None:
                group = groups[origins] = _Group([], set(origins))
            group.indexes.append(i)

        if not groups:
            return
        waiters: dict[str, list[_Group]] = {}
        for group in groups.values():
            for origin in group.waiting_for:
                waiters.setdefault(origin, []).append(group)
        fetched: dict[str, Union[Mapping[str, StoredKey], Failure]] = {}
        for origin, fetch in plan.fetches.items():
            if origin not in waiters:
                continue
            d = self._fetch(coalescer, fetch)
            d.addBoth(self._origin_done, origin, waiters[origin], fetched, batch, keys)

    def _fetch(
        self, coalescer: KeyFetchCoalescer, fetch: OriginFetch
    ) -> "defer.Deferred[Mapping[str, StoredKey]]":
        origin = fetch.server_name
        d = coalescer.request(fetch)
        d.addTimeout(self._fetch_timeout_s, cast(IReactorTime, self._clock))
        return d.addCallback(lambda _: self._fetched.get(origin, {}))

    def _origin_done(
        self,
        result: Union[Mapping[str, StoredKey], Failure],
        origin: str,
        groups: list[_Group],
        fetched: dict[str, Union[Mapping[str, StoredKey], Failure]],
        batch: _Batch,
        keys: KeysByServer,
    ) -> None:
        if isinstance(result, Failure):
            if result.check(defer.TimeoutError, defer.CancelledError):
                reason = "key fetch timed out after %.3gs" % (self._fetch_timeout_s,)
            else:
                reason = "key fetch failed: %s" % (result.getErrorMessage(),)
            logger.info("Keyring: keys of %s unavailable: %s", origin, reason)
            result = Failure(KeyVerificationError(origin, (), reason))
        fetched[origin] = result
        for group in groups:
            group.waiting_for.discard(origin)
            if not group.waiting_for:
                self._judge_group(group, fetched, batch, keys)

    def _judge_group(
        self,
        group: _Group,
        fetched: Mapping[str, Union[Mapping[str, StoredKey], Failure]],
        batch: _Batch,
        keys: KeysByServer,
    ) -> None:
        """Check a group's items again, with the keys its origins' fetches returned."""
        updated = dict(keys)
        for i in group.indexes:
            item = batch.items[i]
            failure: Optional[Failure] = None
            for server in sorted(item.servers):
                result = fetched.get(server)
                if isinstance(result, Failure):
                    failure = result
                    break
                if result is not None:
                    updated[server] = result
            if failure is None:
                try:
                    item.check(updated, now_ms(self._clock))
                except KeyVerificationError as e:
                    if e.reason.startswith("no usable key"):
                        e = KeyVerificationError(
                            e.server_name,
                            e.key_ids,
                            "%s, even after fetching its keys" % (e.reason,),
                        )
                    failure = Failure(e)
            batch.resolve(i, failure)

    def _batch_fetcher(self, chain: KeySource) -> Callable[[dict[str, OriginFetch]], Any]:
        async def fetch(batch: dict[str, OriginFetch]) -> None:
            requests = [
                KeyRequest(f.server_name, f.key_ids, f.minimum_valid_until_ts)
                for f in batch.values()
            ]
            keys = await chain.get_keys(requests, use_cache=True)
            results = {origin: keys.get(origin, {}) for origin in batch}
            self._fetched.update(results)
            self._clock.callLater(0, self._forget_fetched, results)

        return fetch

    def _forget_fetched(self, results: Mapping[str, Mapping[str, StoredKey]]) -> None:
        for origin, keys in results.items():
            if self._fetched.get(origin) is keys:
                del self._fetched[origin]

    def _with_own_keys(self, stored: KeysByServer) -> KeysByServer:
        merged = dict(stored)  # never change the store's (possibly cached) answer
        merged[self._own_server_name] = self._own_keys
        return merged


def _own_stored_keys(own_keys: OwnKeys) -> dict[str, StoredKey]:
    server_name = own_keys.server_name
    keys = {
        key_id: StoredKey(
            server_name, key_id, raw, _OWN_KEY_VALID_UNTIL_TS, None, 0, _OWN_KEY_SOURCE, ""
        )
        for key_id, raw in own_keys.verify_keys().items()
    }
    for key_id, old in own_keys.old_verify_keys().items():
        keys[key_id] = StoredKey(
            server_name,
            key_id,
            old.verify_key_bytes,
            old.expired_ts,
            old.expired_ts,
            0,
            _OWN_KEY_SOURCE,
            "",
        )
    return keys
