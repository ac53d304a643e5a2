"""Helpers for the federation-traffic acceptance tests: real peers' request shapes.

Synapse's perspectives client sends every server it wants keys for in one POST; its
body is built here the same way (one key id and one minimum per server, compact JSON),
and so are the signed key answers a store is filled with beforehand::

    batch = SynapseBatch.build(3000, now_ms)
    body = batch.body()                       # about 270 KB
    responses = batch.signed_responses(batch.server_names[:2900], now_ms + DAY_MS)
    body = synapse_body(["a.example", "b.example"], now_ms, "ed25519:a")
"""

import json
from typing import Any, Mapping, Optional, Sequence, Union

import attr
from signedjson.types import SigningKey
from twisted.internet.task import Clock
from twisted.trial.unittest import FailTest
from twisted.web.resource import Resource

from keyring_module.model import ServerKeysResponse
from keyring_module.validation import parse_server_keys_response
from tests.fakes import FakeOriginResource
from tests.notary_site import RawNotarySite, RawResponse
from tests.utils import key_id, make_signed_server_keys, new_signing_key, verify_key_base64

DAY_MS = 24 * 60 * 60 * 1000


def trusted_notary(server_name: str, signing_key: SigningKey) -> dict[str, Any]:
    """A ``trusted_key_servers`` entry (as written in the YAML) for a notary's key."""
    return {
        "server_name": server_name,
        "verify_keys": {key_id(signing_key): verify_key_base64(signing_key)},
    }


def notary_with_origins(
    origins: Mapping[str, Resource], config: Optional[Mapping[str, Any]] = None
) -> RawNotarySite:
    """A :class:`RawNotarySite` whose fake origins sign with the site's own fake clock."""
    site = RawNotarySite(origins, config)
    for resource in origins.values():
        if isinstance(resource, FakeOriginResource):
            resource.clock = site.reactor
    return site


def server_keys(response: Optional[RawResponse]) -> list[dict[str, Any]]:
    """The ``server_keys`` list of a 200 notary answer.

    Raises:
        FailTest: no answer came, or it was not a 200 (the test fails).
    """
    if response is None:
        raise FailTest("no answer came in time")
    if response.code != 200:
        raise FailTest("answered %d: %r" % (response.code, response.body[:300]))
    entries: list[dict[str, Any]] = response.json()["server_keys"]
    return entries


def verify_keys_by_server(entries: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, str]]:
    """``{server_name: {key_id: base64 key}}`` over every entry of an answer."""
    found: dict[str, dict[str, str]] = {}
    for entry in entries:
        keys = found.setdefault(entry["server_name"], {})
        keys.update({kid: value["key"] for kid, value in entry["verify_keys"].items()})
    return found


def post_body(server_keys: Mapping[str, Any]) -> bytes:
    """A ``POST /_matrix/key/v2/query`` body asking for ``server_keys``."""
    return json.dumps({"server_keys": server_keys}).encode()


def synapse_body(
    server_names: Sequence[str],
    minimum_valid_until_ts: int,
    key_ids: Union[str, Mapping[str, str]],
) -> bytes:
    """A ``POST /_matrix/key/v2/query`` body as Synapse's perspectives client writes
    it: every queued server with the key id it wants and one ``minimum_valid_until_ts``,
    compact JSON (``separators=(",", ":")``).

    Args:
        server_names: the servers, in the order they are asked about.
        minimum_valid_until_ts: the minimum asked for every key.
        key_ids: the key id asked of every server, or each server's own.

    Example:
        >>> synapse_body(["a.example"], 5, "ed25519:k")
        b'{"server_keys":{"a.example":{"ed25519:k":{"minimum_valid_until_ts":5}}}}'
    """
    query = {
        name: {
            key_ids if isinstance(key_ids, str) else key_ids[name]: {
                "minimum_valid_until_ts": minimum_valid_until_ts
            }
        }
        for name in server_names
    }
    return json.dumps({"server_keys": query}, separators=(",", ":")).encode()


@attr.s(auto_attribs=True, frozen=True, slots=True)
class SynapseBatch:
    """Servers and the key id each is asked about, as Synapse's perspectives client
    queues them when it joins a big room.

    Attributes:
        server_names: the servers, in the order they are asked about.
        signing_keys: each server's signing key (its key id is the one asked for).
        minimum_valid_until_ts: the minimum asked for every key.
    """

    server_names: tuple[str, ...]
    signing_keys: Mapping[str, SigningKey]
    minimum_valid_until_ts: int

    @classmethod
    def build(cls, count: int, minimum_valid_until_ts: int) -> "SynapseBatch":
        """``count`` servers named like real homeservers, each with its own key."""
        names = tuple("matrix.homeserver%05d.example.org" % i for i in range(count))
        keys = {name: new_signing_key("a_%05d" % i) for i, name in enumerate(names)}
        return cls(names, keys, minimum_valid_until_ts)

    def body(self) -> bytes:
        """The POST body as Synapse writes it (:func:`synapse_body`), each server asked
        for its own key."""
        key_ids = {name: key_id(key) for name, key in self.signing_keys.items()}
        return synapse_body(self.server_names, self.minimum_valid_until_ts, key_ids)

    def signed_responses(
        self, names: Sequence[str], valid_until_ts: int
    ) -> list[ServerKeysResponse]:
        """Each server's own signed ``/_matrix/key/v2/server`` answer, validated as a
        fetch would validate it, ready for ``KeyStore.store_server_keys``."""
        return [
            parse_server_keys_response(
                make_signed_server_keys(name, [self.signing_keys[name]], valid_until_ts), name
            )
            for name in names
        ]


def unused_clock() -> Clock:
    """A clock for fake origins built before their site (replaced by
    :func:`notary_with_origins`)."""
    return Clock()
