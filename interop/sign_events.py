"""Sign Matrix events with Synapse's own code, for :mod:`interop.test_synapse_events`.

Run by *Synapse's* python (``$KEYRING_SYNAPSE_PYTHON``), never imported by ours::

    $KEYRING_SYNAPSE_PYTHON interop/sign_events.py SIGNING_KEY_FILE SERVER_NAME

``SIGNING_KEY_FILE`` is a homeserver's ``signing_key_path`` and ``SERVER_NAME`` its
``server_name``. For every room version 1 to 12 in Synapse's ``KNOWN_ROOM_VERSIONS``,
it writes the PDUs of a small room created by ``@u:SERVER_NAME``, by name:

* ``create``: ``m.room.create`` (no ``room_id`` in v12, whose room id is the create
  event's id with ``!``; ``creator`` only before v11; ``m.federate``, which redaction
  keeps from v11 only);
* ``member``: ``@u``'s join, with a ``displayname`` (never kept by redaction);
* ``power_levels``: with ``invite`` (kept from v11) and ``notifications`` (never kept);
* ``message``: an ``m.room.message``, with the top-level ``origin`` older servers send
  (kept by redaction before v11);
* ``restricted_join`` (v8+): ``@joiner``'s join authorised by ``@u``, on the same server
  (``join_authorised_via_users_server`` is kept from v9);
* ``foreign_event_id`` (v1, v2): a message whose event id names ``elsewhere.invalid``,
  which did not sign it.

The event dicts are written here; Synapse's ``add_hashes_and_signatures`` hashes and
signs them (over the version's redacted form), ``make_event_from_dict`` parses them and
``get_pdu_json`` serialises them as sent over federation. v1/v2 events get event ids
``$<name>.v<version>:SERVER_NAME`` and reference each other by ``[id, {sha256: ...}]``;
later versions by the ids Synapse derives from the reference hashes.

Output (stdout): ``{"<room version>": {"<name>": <pdu>, ...}, ...}``.
"""

import json
import sys
import time
from typing import Any

from signedjson.key import read_signing_keys
from synapse.api.room_versions import KNOWN_ROOM_VERSIONS, EventFormatVersions, RoomVersion
from synapse.crypto.event_signing import add_hashes_and_signatures, compute_event_reference_hash
from synapse.events import make_event_from_dict
from unpaddedbase64 import encode_base64

#: The room versions both Synapse and keyring_module know (Synapse also has unstable ones).
ROOM_VERSIONS = [str(n) for n in range(1, 13)]
#: A server that signs nothing (``.invalid`` is reserved: it can never resolve).
ELSEWHERE = "elsewhere.invalid"


class Room:
    """A linear room DAG whose events ``@u:<server_name>``'s server signs as they are added."""

    def __init__(self, room_version: RoomVersion, server_name: str, signing_key: Any) -> None:
        self.room_version = room_version
        self.server_name = server_name
        self.signing_key = signing_key
        self.now = int(time.time() * 1000)
        self.room_id: str | None = (
            None if room_version.msc4291_room_ids_as_hashes else ("!room:" + server_name)
        )
        self.pdus: dict[str, Any] = {}
        self.prev: list[Any] = []  # prev_events of the next event
        self.state: list[Any] = []  # auth_events of the next event
        self.depth = 0

    def add(self, name: str, fields: dict[str, Any], event_id_server: str = "") -> None:
        """Complete ``fields`` into a PDU, have Synapse hash and sign it, keep it as ``name``."""
        v1_ids = self.room_version.event_format == EventFormatVersions.ROOM_V1_V2
        self.depth += 1
        event: dict[str, Any] = {
            "sender": "@u:" + self.server_name,
            "origin_server_ts": self.now,
            "depth": self.depth,
            "prev_events": list(self.prev),
            "auth_events": list(self.state),
            "unsigned": {"age_ts": self.now},
            **fields,
        }
        if self.room_id is not None:
            event["room_id"] = self.room_id
        if v1_ids:
            event["event_id"] = "$%s.v%s:%s" % (
                name,
                self.room_version.identifier,
                event_id_server or self.server_name,
            )
        add_hashes_and_signatures(self.room_version, event, self.server_name, self.signing_key)
        signed = make_event_from_dict(event, self.room_version)
        self.pdus[name] = signed.get_pdu_json(self.now)

        if v1_ids:
            _, digest = compute_event_reference_hash(signed)
            reference: Any = [signed.event_id, {"sha256": encode_base64(digest)}]
        else:
            reference = signed.event_id
        self.prev = [reference]
        if fields["type"] == "m.room.create" and self.room_id is None:
            self.room_id = "!" + signed.event_id[1:]  # MSC4291: not an auth event either
        elif "state_key" in fields:
            self.state.append(reference)


def sign_room(room_version: RoomVersion, server_name: str, signing_key: Any) -> dict[str, Any]:
    """The PDUs of one room (see the module docstring), by name."""
    version = room_version.identifier
    creator = "@u:" + server_name
    room = Room(room_version, server_name, signing_key)
    create_content: dict[str, Any] = {"room_version": version, "m.federate": True}
    if int(version) < 11:
        create_content["creator"] = creator
    room.add("create", {"type": "m.room.create", "state_key": "", "content": create_content})
    room.add(
        "member",
        {
            "type": "m.room.member",
            "state_key": creator,
            "content": {"membership": "join", "displayname": "U"},
        },
    )
    room.add(
        "power_levels",
        {
            "type": "m.room.power_levels",
            "state_key": "",
            "content": {
                "users": {creator: 100},
                "users_default": 0,
                "events": {"m.room.name": 50},
                "invite": 0,
                "notifications": {"room": 50},
            },
        },
    )
    message = {"type": "m.room.message", "content": {"msgtype": "m.text", "body": "hello"}}
    room.add("message", {**message, "origin": server_name})
    if room_version.restricted_join_rule:
        joiner = "@joiner:" + server_name
        room.add(
            "restricted_join",
            {
                "type": "m.room.member",
                "state_key": joiner,
                "sender": joiner,
                "content": {
                    "membership": "join",
                    "displayname": "Joiner",
                    "join_authorised_via_users_server": creator,
                },
            },
        )
    if room_version.event_format == EventFormatVersions.ROOM_V1_V2:
        room.add("foreign_event_id", message, event_id_server=ELSEWHERE)
    return room.pdus


def main(signing_key_file: str, server_name: str) -> None:
    with open(signing_key_file) as f:
        signing_key = read_signing_keys(f)[0]
    rooms = {
        version: sign_room(KNOWN_ROOM_VERSIONS[version], server_name, signing_key)
        for version in ROOM_VERSIONS
        if version in KNOWN_ROOM_VERSIONS
    }
    json.dump(rooms, sys.stdout)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: sign_events.py SIGNING_KEY_FILE SERVER_NAME")
    main(sys.argv[1], sys.argv[2])
