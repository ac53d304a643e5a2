"""keyring_module against real Synapse processes on 127.0.0.1.

Run with ``KEYRING_SYNAPSE_PYTHON="$(bash .ci/install_synapse.sh | tail -n 1)"
.venv/bin/python -m twisted.trial interop``; see :mod:`interop.harness`.

What runs today:

* Synapse as a notary for OUR keys: it fetches our standalone server's
  ``/_matrix/key/v2/server`` over TLS and re-serves it co-signed (so our ``/server``
  passes Synapse's checks), and our keyring's notary validation accepts its answer.
* Synapse authenticating a request signed with OUR key: it fetches our ``/server``
  directly and checks an ``X-Matrix`` signature with it.
* Synapse as an origin fetched by OUR federation client (``MatrixFederationClient``)
  over TLS, validated by our ``parse_server_keys_response``.
* OUR standalone notary fetching a real Synapse origin over TLS and serving its keys
  co-signed; and a real Synapse whose only ``trusted_key_servers`` entry is our notary
  authenticating a request from another real Synapse through it.
* A real Synapse loading ``keyring_module.KeyringModule``, serving ``/server`` and
  ``/query`` with our code, used as the notary of a second Synapse.

The notary scenarios stop the origin Synapse before the signed request is sent, so
the verifying Synapse cannot fetch the origin's keys directly: a success can only come
through the notary under test.
"""

import time
from typing import Any

from signedjson.key import (
    decode_verify_key_bytes,
    encode_verify_key_base64,
    generate_signing_key,
    get_verify_key,
)
from signedjson.sign import verify_signed_json
from unpaddedbase64 import decode_base64

from interop.harness import (
    KEYRING_MODULE_READY_LINE,
    InteropTestCase,
    KeyringServer,
    LoopbackOnlyResolver,
    SynapseHomeserver,
    TrustedKeyServerSpec,
    file_contains,
    loopback_allowlist,
    reactor,
    report_process_logs,
    send_signed_request,
)
from keyring_module.config import FederationConfig, TrustedKeyServer
from keyring_module.http import TLSError
from keyring_module.http.client import MatrixFederationClient
from keyring_module.signing import key_id_of
from keyring_module.validation import parse_server_keys_response

KEY_QUERY = "/_matrix/key/v2/query"
SERVER_KEYS = "/_matrix/key/v2/server"


def published_verify_key(server_keys: Any, key_id: str) -> Any:
    """The signedjson VerifyKey ``key_id`` from a ``/_matrix/key/v2/server`` body."""
    return decode_verify_key_bytes(key_id, decode_base64(server_keys["verify_keys"][key_id]["key"]))


def without_signatures(obj: Any) -> dict[str, Any]:
    """A copy of a signed JSON object minus its ``signatures``."""
    return {k: v for k, v in obj.items() if k != "signatures"}


def with_wrong_key(notary: KeyringServer) -> TrustedKeyServerSpec:
    """A ``trusted_key_servers`` entry naming ``notary`` with its key id but another key."""
    wrong = encode_verify_key_base64(get_verify_key(generate_signing_key("wrong")))
    return TrustedKeyServerSpec(notary.server_name, {notary.key_id: str(wrong)})


def key_query(server: SynapseHomeserver) -> dict[str, Any]:
    """A POST /key/v2/query body for ``server``'s key, with the minimum Synapse insists on."""
    return {"server_keys": {server.server_name: {server.key_id: {"minimum_valid_until_ts": 0}}}}


class SynapseAsNotaryForOurKeysTests(InteropTestCase):
    """A real Synapse fetches and checks the keys our standalone server publishes."""

    async def fetch_published_keys(
        self, ours: KeyringServer, synapse: SynapseHomeserver
    ) -> tuple[Any, Any]:
        """Both servers' ``/server`` bodies: ours over TLS, Synapse's over plain HTTP."""
        our_keys = await self.get_json_ok(ours.url + SERVER_KEYS)
        self.assertEqual(our_keys["server_name"], ours.server_name)
        self.assertEqual(our_keys["verify_keys"], {ours.key_id: {"key": ours.verify_key_base64}})
        synapse_keys = await self.get_json_ok(synapse.http_url + SERVER_KEYS)
        self.assertEqual(synapse_keys["server_name"], synapse.server_name)
        self.assertEqual(
            synapse_keys["verify_keys"][synapse.key_id], {"key": synapse.verify_key_base64}
        )
        return our_keys, synapse_keys

    @report_process_logs
    async def test_synapse_notarises_our_keys(self) -> None:
        """Synapse's POST /key/v2/query returns our /server exactly, with our signature and Synapse's both valid."""
        ours = await self.start_keyring_server()
        synapse = await self.start_synapse()
        our_keys, synapse_keys = await self.fetch_published_keys(ours, synapse)

        # Synapse 400s without minimum_valid_until_ts, and never fetches without criteria.
        query = {"server_keys": {ours.server_name: {ours.key_id: {"minimum_valid_until_ts": 0}}}}
        result = await self.request_json("POST", synapse.http_url + KEY_QUERY, query)
        self.assertEqual(result.code, 200, result.body[:500])
        entries = result.json()["server_keys"]
        self.assertEqual(
            [e.get("server_name") for e in entries],
            [ours.server_name],
            "Synapse did not return our keys (did its fetch of our /server fail?): %r"
            % (result.body[:500],),
        )
        entry = entries[0]

        # Our origin signature, checked with the key from our /server.
        verify_signed_json(entry, ours.server_name, published_verify_key(our_keys, ours.key_id))
        # Synapse's notary signature, checked with the key from Synapse's /server.
        verify_signed_json(
            entry, synapse.server_name, published_verify_key(synapse_keys, synapse.key_id)
        )
        self.assertEqual(set(entry["signatures"]), {ours.server_name, synapse.server_name})
        # Synapse re-serves what we published, value for value.
        self.assertEqual(without_signatures(entry), without_signatures(our_keys))
        self.assertEqual(
            entry["signatures"][ours.server_name], our_keys["signatures"][ours.server_name]
        )

        # And our own keyring's checks accept the real notary answer.
        notary = TrustedKeyServer(synapse.server_name, {synapse.key_id: bytes(synapse.verify_key)})
        parsed = parse_server_keys_response(entry, ours.server_name, notary=notary)
        self.assertEqual(dict(parsed.verify_keys), {ours.key_id: bytes(ours.verify_key)})
        self.assertEqual(parsed.valid_until_ts, our_keys["valid_until_ts"])

    @report_process_logs
    async def test_synapse_authenticates_requests_signed_with_our_key(self) -> None:
        """Synapse fetches our /server to check X-Matrix requests from us: a forged signature gets 401, ours is accepted."""
        ours = await self.start_keyring_server()
        synapse = await self.start_synapse()

        # Same key id as ours, different key: Synapse must fetch our real key to say no.
        forged_key = generate_signing_key(ours.signing_key.version)
        forged = await send_signed_request(
            self.http, origin=ours.server_name, signing_key=forged_key, destination=synapse
        )
        self.assertEqual(forged.code, 401, forged.body[:500])

        genuine = await send_signed_request(
            self.http, origin=ours.server_name, signing_key=ours.signing_key, destination=synapse
        )
        self.assertNotEqual(
            genuine.code, 401, "Synapse could not verify our signature: %r" % genuine.body[:500]
        )


class OurClientFetchesSynapseTests(InteropTestCase):
    """Our federation client, as the keyring uses it, against a real Synapse origin."""

    def federation_client(self, ca_file: str | None) -> MatrixFederationClient:
        """Our client, checking certificates, allowed to reach 127.0.0.1 and nothing else."""
        config = FederationConfig(
            verify_tls=True,
            ca_file=ca_file,
            ip_range_allowlist=loopback_allowlist(),
            request_timeout_ms=10_000,
        )
        client = MatrixFederationClient(reactor, config, resolver=LoopbackOnlyResolver())
        self.addCleanup(client.close)
        return client

    @report_process_logs
    async def test_our_client_fetches_and_validates_synapse_keys(self) -> None:
        """Our client GETs a real Synapse's /server by its server name over verified TLS, and our validation yields Synapse's real key."""
        synapse = await self.start_synapse(server_host="localhost")
        client = self.federation_client(ca_file=self.ca.cert_path)

        body = await client.get_json(synapse.server_name, SERVER_KEYS)

        response = parse_server_keys_response(body, synapse.server_name)
        self.assertEqual(dict(response.verify_keys), {synapse.key_id: bytes(synapse.verify_key)})
        self.assertGreater(response.valid_until_ts, int(time.time() * 1000))

    @report_process_logs
    async def test_our_client_refuses_an_untrusted_synapse_certificate(self) -> None:
        """Without the test CA in federation.ca_file, our client refuses the real Synapse's certificate with TLSError."""
        synapse = await self.start_synapse(server_host="localhost")
        client = self.federation_client(ca_file=None)

        with self.assertRaises(TLSError):
            await client.get_json(synapse.server_name, SERVER_KEYS)


class NotaryTestCase(InteropTestCase):
    """Shared checks for notary answers about a Synapse origin."""

    async def assert_notarised(
        self, notary_url: str, notary_name: str, notary_key: Any, origin: SynapseHomeserver
    ) -> None:
        """POST /key/v2/query to ``notary_url`` about ``origin``: its /server, co-signed."""
        result = await self.request_json("POST", notary_url + KEY_QUERY, key_query(origin))
        # What the notary fetched: Synapse builds one /server body per listener, so ask
        # the TLS listener the notary uses.
        origin_keys = await self.get_json_ok(origin.tls_url + SERVER_KEYS)
        self.assertEqual(result.code, 200, result.body[:500])
        entries = result.json()["server_keys"]
        self.assertEqual(
            [e.get("server_name") for e in entries],
            [origin.server_name],
            "the notary did not return the origin's keys: %r" % (result.body[:500],),
        )
        entry = entries[0]
        verify_signed_json(entry, origin.server_name, origin.verify_key)
        verify_signed_json(entry, notary_name, notary_key)
        self.assertEqual(set(entry["signatures"]), {origin.server_name, notary_name})
        # Re-served value for value.
        self.assertEqual(without_signatures(entry), without_signatures(origin_keys))
        parsed = parse_server_keys_response(
            entry,
            origin.server_name,
            notary=TrustedKeyServer(notary_name, {key_id_of(notary_key): bytes(notary_key)}),
        )
        self.assertEqual(dict(parsed.verify_keys), {origin.key_id: bytes(origin.verify_key)})

    async def assert_request_verified_only_through(
        self, verifier: SynapseHomeserver, origin: SynapseHomeserver
    ) -> None:
        """Stop ``origin``, then check ``verifier`` still authenticates a request signed by it."""
        assert origin.process is not None
        await origin.process.stop()
        self.assertFalse(origin.process.running())
        result = await send_signed_request(
            self.http,
            origin=origin.server_name,
            signing_key=origin.signing_key,
            destination=verifier,
        )
        self.assertNotEqual(
            result.code,
            401,
            "the verifying Synapse could not get the origin's keys through the notary: %r"
            % (result.body[:500],),
        )


class OurNotaryWithSynapseTests(NotaryTestCase):
    """Our standalone notary between real Synapses."""

    @report_process_logs
    async def test_our_notary_serves_synapse_keys_cosigned(self) -> None:
        """Our notary fetches a real Synapse's /server over TLS and serves it unchanged, with Synapse's signature and ours both valid."""
        ours = await self.start_keyring_server()
        origin = await self.start_synapse()
        await self.assert_notarised(ours.url, ours.server_name, ours.verify_key, origin)

    @report_process_logs
    async def test_synapse_verifies_a_request_through_our_notary(self) -> None:
        """A real Synapse trusting only our notary authenticates a request from a stopped Synapse, but not when it is given a wrong key for our notary."""
        ours = await self.start_keyring_server()
        origin = await self.start_synapse()
        verifier = await self.start_synapse(trusted_key_servers=[ours.as_trusted_key_server()])
        distrustful = await self.start_synapse(trusted_key_servers=[with_wrong_key(ours)])
        # Our notary learns the origin's keys while it is up.
        await self.assert_notarised(ours.url, ours.server_name, ours.verify_key, origin)

        await self.assert_request_verified_only_through(verifier, origin)

        # Control: the same answer, checked against a wrong key for our notary, is refused.
        refused = await send_signed_request(
            self.http,
            origin=origin.server_name,
            signing_key=origin.signing_key,
            destination=distrustful,
        )
        self.assertEqual(refused.code, 401, refused.body[:500])


class KeyringModuleInSynapseTests(NotaryTestCase):
    """A real Synapse loading keyring_module.KeyringModule."""

    @report_process_logs
    async def test_synapse_with_our_module_is_a_notary_for_another_synapse(self) -> None:
        """A Synapse loading our module serves /server and /query with our code, and a second Synapse trusting it authenticates a request from a stopped third one."""
        origin = await self.start_synapse()
        # max_servers_per_request: 1 makes our notary (and not Synapse's) recognisable.
        notary = await self.start_synapse(keyring_module={"notary": {"max_servers_per_request": 1}})
        self.assertTrue(file_contains(notary.log_path, KEYRING_MODULE_READY_LINE))
        verifier = await self.start_synapse(trusted_key_servers=[notary.as_trusted_key_server()])

        # /server, served by our module (it replaces all of /_matrix/key, which the
        # /query probe below shows) with the homeserver's own key and name.
        served = parse_server_keys_response(
            await self.get_json_ok(notary.http_url + SERVER_KEYS), notary.server_name
        )
        self.assertEqual(dict(served.verify_keys), {notary.key_id: bytes(notary.verify_key)})
        # /query is ours: Synapse's own notary would accept two servers in one request.
        two: dict[str, Any] = {"server_keys": {origin.server_name: {}, verifier.server_name: {}}}
        too_many = await self.request_json("POST", notary.http_url + KEY_QUERY, two)
        self.assertEqual(too_many.code, 400, too_many.body[:500])

        await self.assert_notarised(notary.http_url, notary.server_name, notary.verify_key, origin)
        await self.assert_request_verified_only_through(verifier, origin)
