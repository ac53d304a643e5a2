"""Assemble the resource tree.

::

    /_matrix/key/v2/server[/{keyId}]       ServerKeyResource
    /_matrix/key/v2/query[/{server}[/...]] KeyQueryResource (when the notary is enabled)
    /health                                HealthResource (standalone only)

Every other path below ``/_matrix/key`` answers 404 ``M_UNRECOGNIZED`` in JSON. Inside
Synapse the module registers :func:`build_key_resource`'s result at ``/_matrix/key``.
"""

from typing import Optional

from twisted.web.resource import Resource
from twisted.web.server import Request

from keyring_module.errors import RequestError
from keyring_module.resources._json import JsonDirectory, write_error
from keyring_module.resources.server_keys import ServerKeyResource
from keyring_module.signing import ServerKeyPublisher


def build_key_resource(
    publisher: ServerKeyPublisher, query_resource: Optional[Resource] = None
) -> Resource:
    """The resource to mount at ``/_matrix/key``."""
    key = JsonDirectory()
    v2 = JsonDirectory()
    key.putChild(b"v2", v2)
    v2.putChild(b"server", ServerKeyResource(publisher))
    if query_resource is not None:
        v2.putChild(b"query", query_resource)
    return key


def build_root(key_resource: Resource, health_resource: Optional[Resource] = None) -> Resource:
    """The standalone server's root: ``/_matrix/key/...`` and ``/health``."""
    root = JsonDirectory()
    matrix = JsonDirectory()
    root.putChild(b"_matrix", matrix)
    matrix.putChild(b"key", key_resource)
    if health_resource is not None:
        root.putChild(b"health", health_resource)
    return root


class StartingResource(Resource):
    """Stands in for a leaf resource until it is ready (e.g. while the store opens).

    Until ``target`` is set it answers 503 ``M_UNKNOWN`` with ``retry_after_ms``;
    afterwards every request is rendered by ``target``.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.target: Optional[Resource] = None

    def render(self, request: Request) -> object:
        if self.target is None:
            return write_error(
                request,
                RequestError(503, "M_UNKNOWN", "Key service is starting", retry_after_ms=1000),
            )
        return self.target.render(request)
