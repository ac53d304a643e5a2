"""What a standalone server answers besides the key API: the federation version, and
``/.well-known/matrix/server`` when ``well_known:`` is set.

Federation testers, and servers resolving our name, ask for these::

    GET /_matrix/federation/v1/version HTTP/1.1

    HTTP/1.1 200 OK
    Content-Type: application/json

    {"server":{"name":"keyring_module","version":"0.1.0"}}

    GET /.well-known/matrix/server HTTP/1.1

    HTTP/1.1 200 OK
    Content-Type: application/json
    Cache-Control: max-age=3600

    {"m.server":"notary.example.org:443"}

Both are ready bytes (nothing is encoded per request) and answer ``GET`` and ``HEAD``;
another method gets 405, a longer path 404 ``M_UNRECOGNIZED``. Without ``well_known:``
the well-known path answers 404 ``M_UNRECOGNIZED`` like any unknown path. Inside
Synapse neither is added: the homeserver serves its own.
"""

from typing import Optional

from canonicaljson import encode_canonical_json
from twisted.web.resource import Resource
from twisted.web.server import Request

import keyring_module
from keyring_module.config_well_known import WellKnownConfig
from keyring_module.resources._json import (
    JSON_CONTENT_TYPE,
    JsonDirectory,
    method_not_allowed,
    unrecognized,
    write_json_bytes,
)

#: The ``server.name`` of the version answer.
SERVER_SOFTWARE_NAME = "keyring_module"
#: How long requesting servers may cache our ``.well-known`` answer (the spec asks them
#: to follow ``Cache-Control``; an hour lets a changed delegation spread soon).
WELL_KNOWN_MAX_AGE_S = 3600


class StaticJsonResource(Resource):
    """Answers ``GET``/``HEAD`` on exactly its path with fixed canonical JSON bytes.

    Args:
        body: the canonical JSON answer.
        cache_control: the ``Cache-Control`` header (None: the JSON helpers' default,
            no caching).
    """

    isLeaf = True

    def __init__(self, body: bytes, cache_control: Optional[bytes] = None) -> None:
        super().__init__()
        self._body = body
        self._cache_control = cache_control

    def render(self, request: Request) -> bytes:
        if any(request.postpath or []):
            return unrecognized().render(request)
        if request.method not in (b"GET", b"HEAD"):
            return method_not_allowed(request, (b"GET", b"HEAD"))
        body = write_json_bytes(request, 200, self._body)
        if self._cache_control is not None:
            request.setHeader(b"Cache-Control", self._cache_control)
        request.setHeader(b"Content-Type", JSON_CONTENT_TYPE)
        return b"" if request.method == b"HEAD" else body


def version_resource() -> StaticJsonResource:
    """``GET /_matrix/federation/v1/version``: our software name and package version.

    Example:
        >>> import json
        >>> json.loads(version_resource()._body)["server"]["name"]
        'keyring_module'
    """
    return StaticJsonResource(
        encode_canonical_json(
            {"server": {"name": SERVER_SOFTWARE_NAME, "version": keyring_module.__version__}}
        )
    )


def well_known_resource(config: WellKnownConfig) -> StaticJsonResource:
    """``GET /.well-known/matrix/server``: the configured delegation."""
    return StaticJsonResource(
        encode_canonical_json(config.document()), b"max-age=%d" % WELL_KNOWN_MAX_AGE_S
    )


def add_federation_basics(root: Resource, well_known: Optional[WellKnownConfig]) -> None:
    """Mount the version (and, when configured, the well-known) resource on a standalone
    root made by :func:`~keyring_module.resources.tree.build_root`."""
    matrix = root.getStaticEntity(b"_matrix")
    if matrix is None:
        matrix = JsonDirectory()
        root.putChild(b"_matrix", matrix)
    federation = JsonDirectory()
    v1 = JsonDirectory()
    matrix.putChild(b"federation", federation)
    federation.putChild(b"v1", v1)
    v1.putChild(b"version", version_resource())
    if well_known is not None:
        dot_well_known = JsonDirectory()
        matrix_dir = JsonDirectory()
        root.putChild(b".well-known", dot_well_known)
        dot_well_known.putChild(b"matrix", matrix_dir)
        matrix_dir.putChild(b"server", well_known_resource(well_known))
