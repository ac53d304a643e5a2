"""Fake servers and a fake federation client for fetcher tests (no real network).

:class:`FakeFederationClient` implements the ``FederationHttpClient`` protocol by
dispatching on the server name to a ``twisted.web`` resource tree through
``treq.testing.StubTreq``, raising the same ``FederationRequestError`` subclasses as the
real client. :class:`HeldRunner` stands in for a worker thread, holding blocking work
until the test lets it run.
"""

import json
from collections.abc import Sequence
from typing import Any, Callable, Coroutine, Mapping, Optional, TypeVar

import attr
from canonicaljson import encode_canonical_json
from signedjson.types import SigningKey
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from keyring_module.clock import DeadlineExceeded, ReactorClock, now_ms, with_deadline
from keyring_module.http import (
    ConnectError,
    HttpStatusError,
    InvalidResponseError,
    RequestTimeoutError,
)
from tests.utils import make_signed_server_keys, sign_as

DAY_MS = 24 * 60 * 60 * 1000

T = TypeVar("T")


@attr.s(auto_attribs=True, frozen=True, slots=True)
class RecordedRequest:
    """One request made through :class:`FakeFederationClient`."""

    method: str
    server_name: str
    path: str
    body: object = None


class FakeFederationClient:
    """A ``FederationHttpClient`` whose servers are local resource trees.

    Args:
        resources_by_server_name: the resource serving each known server; requests to
            any other server raise ``ConnectError``.
        clock: where ``timeout_s`` runs.
        timeout_s: when given (with ``clock``), a request without an answer by then
            raises ``RequestTimeoutError``, as the real client does at
            ``federation.request_timeout``; otherwise it waits as long as it takes.
    """

    def __init__(
        self,
        resources_by_server_name: Mapping[str, Resource],
        *,
        clock: Optional[ReactorClock] = None,
        timeout_s: Optional[float] = None,
    ) -> None:
        self._stubs: dict[str, Any] = {
            name: StubTreq(resource) for name, resource in resources_by_server_name.items()
        }
        self.requests: list[RecordedRequest] = []
        self._clock = clock
        self._timeout_s = timeout_s

    def requests_to(self, server_name: str) -> list[RecordedRequest]:
        """The requests made to one server, in order."""
        return [r for r in self.requests if r.server_name == server_name]

    def flush(self) -> None:
        """Deliver responses that resources finished asynchronously."""
        for stub in self._stubs.values():
            stub.flush()

    async def get_json(
        self, server_name: str, path: str, timeout_ms: Optional[int] = None
    ) -> object:
        """GET ``path`` from ``server_name`` and decode the JSON body."""
        self.requests.append(RecordedRequest("GET", server_name, path))
        stub = self._stub(server_name)

        async def exchange() -> object:
            response = await stub.get("https://%s%s" % (server_name, path))
            return await self._decode(stub, response)

        return await self._bounded(exchange())

    async def post_json(
        self, server_name: str, path: str, body: object, timeout_ms: Optional[int] = None
    ) -> object:
        """POST ``body`` as JSON to ``server_name`` and decode the JSON answer."""
        self.requests.append(RecordedRequest("POST", server_name, path, body))
        stub = self._stub(server_name)

        async def exchange() -> object:
            response = await stub.post(
                "https://%s%s" % (server_name, path),
                data=encode_canonical_json(body),
                headers={b"Content-Type": [b"application/json"]},
            )
            return await self._decode(stub, response)

        return await self._bounded(exchange())

    async def _bounded(self, exchange: Coroutine[Any, Any, object]) -> object:
        if self._clock is None or self._timeout_s is None:
            return await exchange
        try:
            return await with_deadline(self._clock, exchange, self._timeout_s, cancel_work=True)
        except DeadlineExceeded:
            raise RequestTimeoutError("no answer within %.3gs" % (self._timeout_s,)) from None

    def _stub(self, server_name: str) -> Any:
        stub = self._stubs.get(server_name)
        if stub is None:
            raise ConnectError("no route to %s" % (server_name,))
        return stub

    async def _decode(self, stub: Any, response: Any) -> object:
        content: bytes = await stub.content(response)
        if not 200 <= response.code < 300:
            raise HttpStatusError(response.code, content)
        try:
            return json.loads(content)
        except ValueError as e:
            raise InvalidResponseError("body is not JSON: %s" % (e,)) from None


class _JsonLeaf(Resource):
    isLeaf = True

    def _write_json(self, request: Request, obj: object, code: int = 200) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(obj).encode("utf-8")


class FakeOriginResource(_JsonLeaf):
    """An origin serving its signed ``/_matrix/key/v2/server``.

    Attributes:
        hits: how many times the keys were requested.
        body_override: when set, served (as JSON) instead of the real signed keys.
        raw_body: when set, these bytes are served as they are (e.g. not JSON).
        code: the HTTP status to answer with.
        hold: when True, requests are kept in ``held`` unanswered until ``release()``.
    """

    def __init__(
        self,
        signing_keys: "SigningKey | Sequence[SigningKey]",
        server_name: str,
        clock: ReactorClock,
        valid_for_ms: int = DAY_MS,
    ) -> None:
        super().__init__()
        self.signing_keys: list[SigningKey] = (
            list(signing_keys) if isinstance(signing_keys, Sequence) else [signing_keys]
        )
        self.server_name = server_name
        self.clock = clock
        self.valid_for_ms = valid_for_ms
        self.hits = 0
        self.body_override: object = None
        self.raw_body: Optional[bytes] = None
        self.code = 200
        self.hold = False
        self.held: list[Request] = []

    def keys_json(self) -> dict[str, object]:
        """The signed keys object this origin serves right now."""
        return make_signed_server_keys(
            self.server_name, self.signing_keys, now_ms(self.clock) + self.valid_for_ms
        )

    def render_GET(self, request: Request) -> "bytes | int":
        if request.path not in (b"/_matrix/key/v2/server", b"/_matrix/key/v2/server/"):
            return self._write_json(request, {"errcode": "M_UNRECOGNIZED"}, 404)
        self.hits += 1
        if self.hold:
            self.held.append(request)
            return NOT_DONE_YET
        return self._body(request)

    def release(self) -> None:
        """Answer every held request."""
        held, self.held = self.held, []
        for request in held:
            request.write(self._body(request))
            request.finish()

    def _body(self, request: Request) -> bytes:
        if self.raw_body is not None:
            request.setResponseCode(self.code)
            return self.raw_body
        body = self.body_override if self.body_override is not None else self.keys_json()
        return self._write_json(request, body, self.code)


class HangingResource(_JsonLeaf):
    """A server that accepts every request and never answers."""

    def __init__(self) -> None:
        super().__init__()
        self.hits = 0

    def render_GET(self, request: Request) -> int:
        self.hits += 1
        return NOT_DONE_YET

    render_POST = render_GET


class FakeNotaryResource(_JsonLeaf):
    """A notary answering ``POST /_matrix/key/v2/query`` from a table of origin objects.

    Args:
        server_name: the notary's name.
        signing_key: the key it co-signs each entry with.
        entries: origin-signed key objects by server name; the notary answers with the
            entries of the servers asked about (plus ``extra_entries``), co-signed.

    Attributes:
        bodies: the decoded request bodies received.
        extra_entries: entries always added to the answer (e.g. about unasked servers).
        code: the HTTP status to answer with.
    """

    def __init__(
        self,
        server_name: str,
        signing_key: SigningKey,
        entries: Optional[dict[str, list[dict[str, object]]]] = None,
    ) -> None:
        super().__init__()
        self.server_name = server_name
        self.signing_key = signing_key
        self.entries: dict[str, list[dict[str, object]]] = entries or {}
        self.extra_entries: list[dict[str, object]] = []
        self.bodies: list[Any] = []
        self.code = 200
        self.cosign: Callable[[dict[str, object]], dict[str, object]] = self._cosign

    def _cosign(self, entry: dict[str, object]) -> dict[str, object]:
        return sign_as(entry, self.server_name, self.signing_key)

    def render_POST(self, request: Request) -> bytes:
        if request.path != b"/_matrix/key/v2/query":
            return self._write_json(request, {"errcode": "M_UNRECOGNIZED"}, 404)
        assert request.content is not None
        body = json.loads(request.content.read())
        self.bodies.append(body)
        if self.code != 200:
            return self._write_json(request, {"errcode": "M_UNKNOWN"}, self.code)
        answer = [
            self.cosign(entry)
            for server_name in body["server_keys"]
            for entry in self.entries.get(server_name, [])
        ]
        answer.extend(self.cosign(entry) for entry in self.extra_entries)
        return self._write_json(request, {"server_keys": answer})


class HeldRunner:
    """A blocking-work runner that keeps each job until :meth:`run_all` (a stand-in
    for a worker thread that has not finished yet)."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[[], Any], "defer.Deferred[Any]"]] = []

    def __call__(self, work: Callable[[], T]) -> "defer.Deferred[T]":
        d: defer.Deferred[T] = defer.Deferred()
        self.jobs.append((work, d))
        return d

    def run_all(self) -> None:
        jobs, self.jobs = self.jobs, []
        for work, d in jobs:
            defer.maybeDeferred(work).chainDeferred(d)
