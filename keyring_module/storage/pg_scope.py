"""What instances on one PostgreSQL schema share: their advisory lock keys and channels.

PostgreSQL's advisory locks and ``LISTEN``/``NOTIFY`` channels belong to the database,
not to a schema. Two deployments on two schemas of one database (a staging and a
production notary, each with its own ``search_path``) would otherwise take each
other's flight and write locks and hear each other's news. So every lock key and
channel name is derived from the schema the store's tables are in
(``current_schema()``, read once, the first time the store uses the database):
instances on one schema share them, instances on two schemas share nothing.

* **Lock keys** are two 32-bit halves, ``pg_advisory_xact_lock(class, hashtext(name))``:
  the class is derived from the lock's kind and the schema (the first 4 bytes of
  ``SHA-256(kind NUL schema)``), the second half is the name, as before.
* **Channels** are ``keyring_module_flights_`` and ``keyring_module_keys_`` followed by
  12 hex digits of ``SHA-256(schema)``: at most 35 ASCII bytes, well within an
  identifier's 63.
* On the schema ``public`` (PostgreSQL's default) they are the fixed keys and channels
  of earlier versions. That does not make mixed versions work (an earlier version
  cannot read every outcome a newer one writes): an upgrade stops every instance
  sharing the database before starting the new version.

The migration lock stays database-wide: it must also hold between versions, and it only
makes migrations on two schemas take turns.

Example:
    >>> staging, production = SchemaScope.of("staging"), SchemaScope.of("production")
    >>> staging.flight_lock_class != production.flight_lock_class
    True
    >>> staging.flights_channel
    'keyring_module_flights_e919a7536439'
    >>> SchemaScope.of("public").keys_channel
    'keyring_module_keys'
"""

import hashlib
import re

import attr

# The fixed lock classes and channels of the schema ``public`` (see the module docstring).
#: The first half of each server's write lock ("keys" in ASCII).
SERVER_LOCK_CLASS = 0x6B657973
#: The first half of each server name's flight lock ("flig"), held by the process
#: fetching from that origin for all instances.
FLIGHT_LOCK_CLASS = 0x666C6967
#: The first half of each origin's shared-limits lock ("lims").
LIMITS_LOCK_CLASS = 0x6C696D73
#: The channel a shared flight's outcome is announced on (payload: the server name).
FLIGHTS_CHANNEL = "keyring_module_flights"
#: The channel every store of a server's keys is announced on (payload: the server name).
KEYS_CHANNEL = "keyring_module_keys"

#: The schema whose keys and channels are the fixed ones above.
DEFAULT_SCHEMA = "public"
#: Hex digits of the schema's hash in a channel name.
CHANNEL_HASH_DIGITS = 12
#: What a channel name may be: unquoted it is the same identifier.
_CHANNEL = re.compile(r"^[a-z0-9_]{1,63}$")


def lock_class(kind: str, schema: str) -> int:
    """A signed 32-bit lock class for one kind of lock on one schema.

    Example:
        >>> lock_class("flig", "staging") == lock_class("flig", "staging")
        True
        >>> -(2**31) <= lock_class("flig", "staging") < 2**31
        True
    """
    digest = hashlib.sha256(("%s\0%s" % (kind, schema)).encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big", signed=True)


def channel_name(prefix: str, schema: str) -> str:
    """``prefix`` followed by a short hash of the schema.

    Example:
        >>> channel_name("keyring_module_keys", "staging")
        'keyring_module_keys_e919a7536439'
    """
    digest = hashlib.sha256(schema.encode("utf-8")).hexdigest()
    return "%s_%s" % (prefix, digest[:CHANNEL_HASH_DIGITS])


def quote_identifier(name: str) -> str:
    """``name`` as a quoted SQL identifier (as in ``LISTEN "name"``).

    Example:
        >>> quote_identifier('a"b')
        '"a""b"'
    """
    return '"%s"' % name.replace('"', '""')


def quote_literal(text: str) -> str:
    """``text`` as an SQL string literal.

    Example:
        >>> quote_literal("it's")
        "'it''s'"
    """
    return "'%s'" % text.replace("'", "''")


@attr.s(auto_attribs=True, frozen=True, slots=True)
class SchemaScope:
    """The lock classes and channels of the instances on one schema.

    Attributes:
        schema: the schema's name, as ``current_schema()`` gives it.
        server_lock_class: the first half of each server's write lock.
        flight_lock_class: the first half of each server name's flight lock.
        limits_lock_class: the first half of each origin's shared-limits lock.
        flights_channel: where finished flights are announced.
        keys_channel: where stores of a server's keys are announced.
    """

    schema: str
    server_lock_class: int
    flight_lock_class: int
    limits_lock_class: int
    flights_channel: str
    keys_channel: str

    @classmethod
    def of(cls, schema: str) -> "SchemaScope":
        """The scope of the instances whose tables are in ``schema``."""
        if schema == DEFAULT_SCHEMA:
            return cls(
                schema,
                SERVER_LOCK_CLASS,
                FLIGHT_LOCK_CLASS,
                LIMITS_LOCK_CLASS,
                FLIGHTS_CHANNEL,
                KEYS_CHANNEL,
            )
        return cls(
            schema,
            lock_class("keys", schema),
            lock_class("flig", schema),
            lock_class("lims", schema),
            channel_name(FLIGHTS_CHANNEL, schema),
            channel_name(KEYS_CHANNEL, schema),
        )

    def __attrs_post_init__(self) -> None:
        for channel in (self.flights_channel, self.keys_channel):
            if not _CHANNEL.match(channel):
                raise ValueError("not a plain channel name: %r" % (channel,))

    @property
    def channels(self) -> tuple[str, str]:
        """Both channels, as ``LISTEN`` needs them."""
        return (self.flights_channel, self.keys_channel)

    # -- statements (``?``: the server name or target) ---------------------------------

    @property
    def server_lock(self) -> str:
        """Takes one server's write lock until the transaction ends."""
        return "SELECT pg_advisory_xact_lock(%d, hashtext(?))" % self.server_lock_class

    @property
    def try_flight_lock(self) -> str:
        """Tries to take one server name's flight lock for the session."""
        return "SELECT pg_try_advisory_lock(%d, hashtext(?))" % self.flight_lock_class

    @property
    def flight_unlock(self) -> str:
        """Gives one server name's flight lock back."""
        return "SELECT pg_advisory_unlock(%d, hashtext(?))" % self.flight_lock_class

    @property
    def limits_lock(self) -> str:
        """Takes one origin's shared-limits lock until the transaction ends."""
        return "SELECT pg_advisory_xact_lock(%d, hashtext(?))" % self.limits_lock_class

    @property
    def notify_flight(self) -> str:
        """Announces a server name's finished flight."""
        return "SELECT pg_notify(%s, ?)" % quote_literal(self.flights_channel)

    @property
    def notify_keys(self) -> str:
        """Announces a store of a server's keys."""
        return "SELECT pg_notify(%s, ?)" % quote_literal(self.keys_channel)

    def listen_statements(self) -> list[str]:
        """``LISTEN`` on both channels."""
        return ["LISTEN %s" % quote_identifier(channel) for channel in self.channels]
