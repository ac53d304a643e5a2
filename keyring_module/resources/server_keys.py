"""``GET /_matrix/key/v2/server``: our own published keys.

Example::

    GET /_matrix/key/v2/server HTTP/1.1

    HTTP/1.1 200 OK
    Content-Type: application/json

    {"old_verify_keys":{},"server_name":"notary.example.org",
     "signatures":{"notary.example.org":{"ed25519:a_AbCd":"..."}},
     "valid_until_ts":1700086400000,"verify_keys":{"ed25519:a_AbCd":{"key":"..."}}}

``/server/`` and the deprecated ``/server/{keyId}`` (which SyTest still calls, with the
key id URL-escaped) return the same bytes; the key id is ignored, as it always was.
"""

from twisted.web.resource import Resource
from twisted.web.server import Request

from keyring_module.resources._json import method_not_allowed, unrecognized, write_json_bytes
from keyring_module.signing import ServerKeyPublisher


class ServerKeyResource(Resource):
    """Serves the publisher's ready canonical bytes; no signing or encoding per request."""

    isLeaf = True

    def __init__(self, publisher: ServerKeyPublisher) -> None:
        super().__init__()
        self._publisher = publisher

    def render(self, request: Request) -> bytes:
        # postpath: [] for /server, [b""] for /server/, [key_id] or [key_id, b""] for
        # the deprecated form. Anything deeper is not an endpoint.
        full_postpath = request.postpath or []
        postpath = [p for p in full_postpath if p]
        if len(postpath) > 1 or (len(postpath) == 1 and len(full_postpath) > 2):
            return unrecognized().render(request)
        if request.method == b"HEAD":
            write_json_bytes(request, 200, self._publisher.response_bytes())
            return b""
        if request.method != b"GET":
            return method_not_allowed(request, (b"GET", b"HEAD"))
        return write_json_bytes(request, 200, self._publisher.response_bytes())
