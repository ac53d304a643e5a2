"""Configuration: the YAML contract parsed into frozen attrs values.

The same keys are read in both modes:

* standalone (``keyring-module serve --config PATH``): the whole file, including
  ``server_name`` and ``listeners``;
* inside Synapse (``modules: [{module: keyring_module.KeyringModule, config: {...}}]``):
  everything except ``server_name``, ``listeners``, ``inbound`` and ``well_known``,
  which are the homeserver's, plus ``synapse_keyring``, which only a module has.

Every problem raises :class:`~keyring_module.errors.ConfigError` naming the key path
and showing the bad value, e.g.::

    federation.request_timeout: expected a duration like "10s", got 'soon'

Durations accept ``"500ms"``, ``"10s"``, ``"5m"``, ``"1h"``, ``"1d"``, ``"1w"`` or an
integer number of milliseconds; sizes accept ``"64K"``, ``"1M"``, ``"1G"`` or bytes.
"""

import ipaddress
from typing import Mapping, Optional

import attr

from keyring_module.config_values import (
    HOUR_MS,
    IPNetwork,
    Path,
    Setting,
    as_bool,
    as_key_id,
    as_mapping,
    as_networks,
    as_port,
    as_str,
    as_str_list,
    as_verify_key_bytes,
    int_in,
    list_of,
    parse_duration_ms,
    parse_size,
    read_section,
    section_reader,
)
from keyring_module.config_well_known import WellKnownConfig, parse_well_known
from keyring_module.errors import ConfigError

__all__ = [
    "DEFAULT_IP_RANGE_DENYLIST",
    "DEFAULT_MAX_KEYS_PER_RESPONSE",
    "HOUR_MS",
    "MODULE_ONLY_SETTINGS",
    "STANDALONE_ONLY_SETTINGS",
    "ConfigError",
    "DatabaseConfig",
    "FederationConfig",
    "InboundConfig",
    "KeyringConfig",
    "KeyTrustConfig",
    "ListenerConfig",
    "LoggingConfig",
    "MetricsConfig",
    "NotaryConfig",
    "OldSigningKey",
    "RateLimitConfig",
    "SynapseKeyringConfig",
    "TrustedKeyServer",
    "WellKnownConfig",
    "parse_config",
    "parse_duration_ms",
    "parse_size",
]

# Ranges an origin may never make us connect to (SSRF guard), unless allow-listed.
DEFAULT_IP_RANGE_DENYLIST: tuple[str, ...] = (
    "0.0.0.0/8",  # "this" network / unspecified
    "10.0.0.0/8",  # private
    "100.64.0.0/10",  # CGNAT shared address space
    "127.0.0.0/8",  # loopback
    "169.254.0.0/16",  # link-local
    "172.16.0.0/12",  # private
    "192.0.0.0/24",  # IETF protocol assignments
    "192.0.2.0/24",  # documentation (TEST-NET-1)
    "192.88.99.0/24",  # deprecated 6to4 relay anycast
    "192.168.0.0/16",  # private
    "198.18.0.0/15",  # benchmarking
    "198.51.100.0/24",  # documentation (TEST-NET-2)
    "203.0.113.0/24",  # documentation (TEST-NET-3)
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, and 255.255.255.255 broadcast
    "::/128",  # unspecified
    "::1/128",  # loopback
    "::ffff:0:0/96",  # IPv4-mapped (the embedded IPv4 is checked separately too)
    "64:ff9b::/96",  # NAT64 well-known prefix
    "64:ff9b:1::/48",  # NAT64 local-use
    "100::/64",  # discard-only
    "2001::/23",  # IETF protocol assignments (Teredo, benchmarking, ORCHID ...)
    "2001:db8::/32",  # documentation
    "2002::/16",  # 6to4
    "3fff::/20",  # documentation
    "fc00::/7",  # unique-local
    "fe80::/10",  # link-local
    "fec0::/10",  # deprecated site-local
    "ff00::/8",  # multicast
)

# The most keys (verify_keys plus old_verify_keys) one key answer may list. Real servers
# publish one current key and a handful of old ones; every current key costs one
# signature check over the whole answer, so this bounds the work an answer can cause.
DEFAULT_MAX_KEYS_PER_RESPONSE = 256


# ---------------------------------------------------------------------------
# Value types
# ---------------------------------------------------------------------------


@attr.s(auto_attribs=True, frozen=True, slots=True)
class ListenerConfig:
    """One standalone HTTP(S) listener (``listeners:`` entry)."""

    port: int
    bind_addresses: tuple[str, ...] = ("127.0.0.1",)
    tls: bool = False
    tls_certificate_path: Optional[str] = None
    tls_private_key_path: Optional[str] = None


@attr.s(auto_attribs=True, frozen=True, slots=True)
class DatabaseConfig:
    """Where keys and origin responses are stored (``database:``)."""

    backend: str = "sqlite"
    path: str = "keyring.db"
    dsn: Optional[str] = None
    pool_size: int = 5
    cache_entries: int = 10000
    cache_ttl_ms: int = 10_000
    cache_size: int = 64 * 1024 * 1024
    max_keys_per_server: int = 1000
    max_responses_per_server: int = 32
    max_conflicts_per_server: int = 1000
    max_response_bytes_per_server: int = 4 * 1024 * 1024
    # Processes sharing the database: how long a flight's lease lasts unless renewed
    # (a dead SQLite holder holds the others back this long at most), and how often
    # SQLite is looked at for other processes' writes.
    flight_lease_ms: int = 10_000
    poll_interval_ms: int = 100


@attr.s(auto_attribs=True, frozen=True, slots=True)
class TrustedKeyServer:
    """A notary we ask for keys, and the keys its answers must be signed with."""

    server_name: str
    verify_keys: Mapping[str, bytes]  # key id -> 32 raw ed25519 public key bytes


@attr.s(auto_attribs=True, frozen=True, slots=True)
class OldSigningKey:
    """One of our own retired keys, published in ``old_verify_keys``."""

    key_id: str
    verify_key_bytes: bytes
    expired_ts: int


@attr.s(auto_attribs=True, frozen=True, slots=True)
class KeyTrustConfig:
    """How many sources must agree before an indirectly learned key is trusted."""

    min_agreeing_sources: int = 1
    confirm_notary_keys_directly: bool = False
    compromised_keys: tuple[bytes, ...] = ()  # raw public key bytes never to trust


@attr.s(auto_attribs=True, frozen=True, slots=True)
class FederationConfig:
    """Outbound HTTP to origins and notaries."""

    verify_tls: bool = True
    ca_file: Optional[str] = None
    ip_range_denylist: tuple[IPNetwork, ...] = attr.ib(
        factory=lambda: tuple(ipaddress.ip_network(r) for r in DEFAULT_IP_RANGE_DENYLIST)
    )
    ip_range_allowlist: tuple[IPNetwork, ...] = ()
    request_timeout_ms: int = 10_000
    max_response_size: int = 1024 * 1024
    max_keys_per_response: int = DEFAULT_MAX_KEYS_PER_RESPONSE
    # Outbound fetches (origins and notaries) in flight at once; more wait in a queue.
    max_concurrent_fetches: int = 256


@attr.s(auto_attribs=True, frozen=True, slots=True)
class RateLimitConfig:
    """The per-origin limiter (burst, steady rate, failure backoff) and the per-notary
    cap on concurrent queries (notaries share the backoff bounds)."""

    origin_burst: int = 10
    origin_interval_ms: int = 60_000
    failure_backoff_initial_ms: int = 30_000
    failure_backoff_max_ms: int = HOUR_MS
    notary_max_concurrent: int = 8


@attr.s(auto_attribs=True, frozen=True, slots=True)
class NotaryConfig:
    """Inbound ``/_matrix/key/v2/query`` limits.

    The ceilings fit Synapse's perspectives client, which sends every queued server in
    one POST: 10,000 servers of about 90 bytes each (a key id and a minimum) are about
    0.9 MB, so ``max_request_body`` is twice that. ``max_fetches_per_request`` bounds how
    many servers of one request may be fetched (the rest are answered from the store);
    ``max_concurrent_requests`` counts only requests waiting for a fetch.
    """

    enabled: bool = True
    max_servers_per_request: int = 10_000
    max_request_body: int = 2 * 1024 * 1024
    max_concurrent_requests: int = 200
    answer_cache_size: int = 32 * 1024 * 1024
    cosigned_cache_size: int = 32 * 1024 * 1024
    max_fetches_per_request: int = 100


@attr.s(auto_attribs=True, frozen=True, slots=True)
class InboundConfig:
    """Limits on the standalone server's inbound connections (``inbound:``).

    None of the timeouts is reset by traffic: a client sending one byte at a time gains
    nothing. ``max_connections_per_address`` 0 means no cap.
    """

    idle_timeout_ms: int = 60_000
    header_timeout_ms: int = 30_000
    send_timeout_ms: int = 60_000
    max_connections_per_address: int = 100
    max_buffered_response_bytes: int = 64 * 1024 * 1024


@attr.s(auto_attribs=True, frozen=True, slots=True)
class MetricsConfig:
    """Prometheus metrics listener (standalone)."""

    enabled: bool = False
    port: int = 9100
    bind_addresses: tuple[str, ...] = ("127.0.0.1",)


@attr.s(auto_attribs=True, frozen=True, slots=True)
class LoggingConfig:
    """Log level and format, or a Python logging config file (``logging:``)."""

    level: str = "INFO"
    format: str = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    config_file: Optional[str] = None


@attr.s(auto_attribs=True, frozen=True, slots=True)
class SynapseKeyringConfig:
    """What the module changes in the homeserver's own keyring (``synapse_keyring:``,
    module only).

    ``use_module_fetchers``: the homeserver's own key lookups (event and request
    verification) go through our fetcher chain instead of Synapse's fetchers.
    """

    use_module_fetchers: bool = False


@attr.s(auto_attribs=True, frozen=True, slots=True)
class KeyringConfig:
    """The whole configuration. ``server_name``/``listeners``/``inbound``/``well_known``
    are standalone-only."""

    signing_key_path: str
    server_name: Optional[str] = None
    # The folder relative data paths (signing key, SQLite file) resolve against.
    data_dir: Optional[str] = None
    old_signing_keys: tuple[OldSigningKey, ...] = ()
    key_refresh_interval_ms: int = 24 * HOUR_MS
    listeners: tuple[ListenerConfig, ...] = ()
    database: DatabaseConfig = DatabaseConfig()
    trusted_key_servers: tuple[TrustedKeyServer, ...] = ()
    key_fetch_order: tuple[str, ...] = ("origin", "notaries")
    key_trust: KeyTrustConfig = KeyTrustConfig()
    federation: FederationConfig = attr.ib(factory=FederationConfig)
    ratelimit: RateLimitConfig = RateLimitConfig()
    notary: NotaryConfig = NotaryConfig()
    inbound: InboundConfig = InboundConfig()
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()
    well_known: Optional[WellKnownConfig] = None
    synapse_keyring: SynapseKeyringConfig = SynapseKeyringConfig()
    #: Standalone: processes serving the listeners (``workers:``; 1 is one process,
    #: no supervisor; see :mod:`keyring_module.supervisor`).
    workers: int = 1


# ---------------------------------------------------------------------------
# Readers: YAML value -> config value, each naming its key path in errors
# ---------------------------------------------------------------------------


def _bind_addresses(value: object, path: Path) -> Optional[tuple[str, ...]]:
    # An empty list means "not given": the class default (loopback) applies.
    return as_str_list(value, path) or None


_LISTENER_SETTINGS = {
    "port": Setting(as_port, required=True),
    "bind_addresses": Setting(_bind_addresses),
    "tls": Setting(as_bool),
    "tls_certificate_path": Setting(as_str),
    "tls_private_key_path": Setting(as_str),
}


def _parse_listener(raw: object, path: Path) -> ListenerConfig:
    listener = ListenerConfig(**read_section(raw, path, _LISTENER_SETTINGS))
    if listener.tls and not (listener.tls_certificate_path and listener.tls_private_key_path):
        raise ConfigError(
            "tls: true needs tls_certificate_path and tls_private_key_path", path + ("tls",)
        )
    return listener


def _database_backend(value: object, path: Path) -> str:
    if value not in ("sqlite", "postgres"):
        raise ConfigError('expected "sqlite" or "postgres", got %r' % (value,), path)
    return str(value)


#: The least ``database.max_response_bytes_per_server``: a real key answer is about 1 KB,
#: and a tiny bound written by mistake (``4`` for ``"4M"``) would refuse every answer.
MIN_RESPONSE_BYTES_PER_SERVER = 64 * 1024


def _response_bytes_per_server(value: object, path: Path) -> int:
    size = parse_size(value, path)
    if size < MIN_RESPONSE_BYTES_PER_SERVER:
        raise ConfigError('expected a size of at least "64K", got %r' % (value,), path)
    return size


def _flight_lease(value: object, path: Path) -> int:
    lease_ms = parse_duration_ms(value, path)
    if not 1000 <= lease_ms <= 300_000:
        raise ConfigError('expected a duration from "1s" to "5m", got %r' % (value,), path)
    return lease_ms


def _poll_interval(value: object, path: Path) -> int:
    interval_ms = parse_duration_ms(value, path)
    if not 10 <= interval_ms <= 60_000:
        raise ConfigError('expected a duration from "10ms" to "60s", got %r' % (value,), path)
    return interval_ms


_DATABASE_SETTINGS = {
    "backend": Setting(_database_backend),
    "path": Setting(as_str),
    "dsn": Setting(as_str),
    "pool_size": Setting(int_in(1, 100)),
    "cache_entries": Setting(int_in(0)),
    "cache_ttl": Setting(parse_duration_ms, "cache_ttl_ms"),
    "cache_size": Setting(parse_size),
    "max_keys_per_server": Setting(int_in(1)),
    "max_responses_per_server": Setting(int_in(2)),
    "max_conflicts_per_server": Setting(int_in(0)),
    "max_response_bytes_per_server": Setting(_response_bytes_per_server),
    "flight_lease": Setting(_flight_lease, "flight_lease_ms"),
    "poll_interval": Setting(_poll_interval, "poll_interval_ms"),
}


def _parse_database(raw: object, path: Path) -> DatabaseConfig:
    db = DatabaseConfig(**read_section(raw, path, _DATABASE_SETTINGS))
    if db.backend == "postgres" and not db.dsn:
        raise ConfigError(
            'backend "postgres" needs a dsn, e.g. "host=127.0.0.1 dbname=keyring user=keyring"',
            path + ("dsn",),
        )
    return db


def _notary_verify_keys(value: object, path: Path) -> Mapping[str, bytes]:
    keys = {
        as_key_id(str(k), path + (str(k),)): as_verify_key_bytes(v, path + (str(k),))
        for k, v in as_mapping(value, path).items()
    }
    if not keys:
        raise ConfigError(
            "at least one notary key is required, so that its answers can be checked", path
        )
    return keys


_TRUSTED_KEY_SERVER_SETTINGS = {
    "server_name": Setting(as_str, required=True),
    "verify_keys": Setting(_notary_verify_keys, required=True),
}


_OLD_SIGNING_KEY_SETTINGS = {
    "key": Setting(as_verify_key_bytes, "verify_key_bytes", required=True),
    "expired_ts": Setting(int_in(0), required=True),
}


def _parse_old_signing_keys(raw: object, path: Path) -> tuple[OldSigningKey, ...]:
    result = []
    for key_id, entry in as_mapping(raw, path).items():
        p = path + (str(key_id),)
        checked_key_id = as_key_id(str(key_id), p)
        result.append(
            OldSigningKey(
                key_id=checked_key_id, **read_section(entry, p, _OLD_SIGNING_KEY_SETTINGS)
            )
        )
    return tuple(sorted(result, key=lambda k: k.key_id))


def _parse_fetch_order(value: object, path: Path) -> tuple[str, ...]:
    order = as_str_list(value, path)
    if sorted(order) != ["notaries", "origin"]:
        raise ConfigError(
            "expected [origin, notaries] or [notaries, origin], got %r" % (value,), path
        )
    return order


_KEY_TRUST_SETTINGS = {
    "min_agreeing_sources": Setting(int_in(1, 32)),
    "confirm_notary_keys_directly": Setting(as_bool),
    "compromised_keys": Setting(list_of(as_verify_key_bytes)),
}


def _request_timeout_ms(value: object, path: Path) -> int:
    timeout_ms = parse_duration_ms(value, path)
    if timeout_ms < 100:
        raise ConfigError("must be at least 100ms", path)
    return timeout_ms


def _max_response_size(value: object, path: Path) -> int:
    size = parse_size(value, path)
    if size < 1024:
        raise ConfigError("must be at least 1K", path)
    return size


_FEDERATION_SETTINGS = {
    "verify_tls": Setting(as_bool),
    "ca_file": Setting(as_str),
    "ip_range_denylist": Setting(as_networks),
    "ip_range_allowlist": Setting(as_networks),
    "request_timeout": Setting(_request_timeout_ms, "request_timeout_ms"),
    "max_response_size": Setting(_max_response_size),
    "max_keys_per_response": Setting(int_in(1)),
    "max_concurrent_fetches": Setting(int_in(1, 100000)),
}


_RATELIMIT_SETTINGS = {
    "origin_burst": Setting(int_in(1)),
    "origin_interval": Setting(parse_duration_ms, "origin_interval_ms"),
    "failure_backoff_initial": Setting(parse_duration_ms, "failure_backoff_initial_ms"),
    "failure_backoff_max": Setting(parse_duration_ms, "failure_backoff_max_ms"),
    "notary_max_concurrent": Setting(int_in(1, 10000)),
}


def _parse_ratelimit(raw: object, path: Path) -> RateLimitConfig:
    rl = RateLimitConfig(**read_section(raw, path, _RATELIMIT_SETTINGS))
    if rl.failure_backoff_max_ms < rl.failure_backoff_initial_ms:
        raise ConfigError(
            "must not be shorter than failure_backoff_initial", path + ("failure_backoff_max",)
        )
    return rl


_NOTARY_SETTINGS = {
    "enabled": Setting(as_bool),
    "max_servers_per_request": Setting(int_in(1, 10000)),
    "max_request_body": Setting(parse_size),
    "max_fetches_per_request": Setting(int_in(0, 10000)),
    "max_concurrent_requests": Setting(int_in(1, 100000)),
    "answer_cache_size": Setting(parse_size),
    "cosigned_cache_size": Setting(parse_size),
}


def _inbound_timeout_ms(value: object, path: Path) -> int:
    timeout_ms = parse_duration_ms(value, path)
    if timeout_ms < 1000:
        raise ConfigError("must be at least 1s, got %r" % (value,), path)
    return timeout_ms


def _max_buffered_response_bytes(value: object, path: Path) -> int:
    size = parse_size(value, path)
    if size < 1024 * 1024:
        raise ConfigError("must be at least 1M, got %r" % (value,), path)
    return size


_INBOUND_SETTINGS = {
    "idle_timeout": Setting(_inbound_timeout_ms, "idle_timeout_ms"),
    "header_timeout": Setting(_inbound_timeout_ms, "header_timeout_ms"),
    "send_timeout": Setting(_inbound_timeout_ms, "send_timeout_ms"),
    "max_connections_per_address": Setting(int_in(0, 1_000_000)),
    "max_buffered_response_bytes": Setting(_max_buffered_response_bytes),
}


_METRICS_SETTINGS = {
    "enabled": Setting(as_bool),
    "port": Setting(as_port),
    "bind_addresses": Setting(_bind_addresses),
}


def _log_level(value: object, path: Path) -> str:
    choices = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    if not isinstance(value, str) or value.upper() not in choices:
        raise ConfigError("expected one of %s, got %r" % (", ".join(choices), value), path)
    return value.upper()


_LOGGING_SETTINGS = {
    "level": Setting(_log_level),
    "format": Setting(as_str),
    "config_file": Setting(as_str),
}


def _server_name(value: object, path: Path) -> str:
    # Imported lazily to keep this module's import graph small.
    from keyring_module.servername import is_valid_server_name

    name = as_str(value, path)
    if not is_valid_server_name(name):
        raise ConfigError(
            'expected a Matrix server name like "example.org" or "example.org:8448", got %r'
            % (value,),
            path,
        )
    return name


def _key_refresh_interval_ms(value: object, path: Path) -> int:
    interval_ms = parse_duration_ms(value, path)
    if interval_ms < HOUR_MS:
        raise ConfigError(
            "must be at least 1h, since servers should not publish keys valid for less "
            "than an hour, got %r" % (value,),
            path,
        )
    return interval_ms


#: The most ``workers`` (and ``serve --workers``): one process per core is the useful
#: most; beyond 64 a typo (``640``) is more likely than a host that needs them.
MAX_WORKERS = 64


# The top level in both modes; standalone adds server_name, listeners and inbound.
_MODULE_SETTINGS = {
    "data_dir": Setting(as_str),
    "signing_key_path": Setting(as_str, required=True),
    "old_signing_keys": Setting(_parse_old_signing_keys),
    "key_refresh_interval": Setting(_key_refresh_interval_ms, "key_refresh_interval_ms"),
    "database": Setting(_parse_database),
    "trusted_key_servers": Setting(
        list_of(section_reader(TrustedKeyServer, _TRUSTED_KEY_SERVER_SETTINGS))
    ),
    "key_fetch_order": Setting(_parse_fetch_order),
    "key_trust": Setting(section_reader(KeyTrustConfig, _KEY_TRUST_SETTINGS)),
    "federation": Setting(section_reader(FederationConfig, _FEDERATION_SETTINGS)),
    "ratelimit": Setting(_parse_ratelimit),
    "notary": Setting(section_reader(NotaryConfig, _NOTARY_SETTINGS)),
    "metrics": Setting(section_reader(MetricsConfig, _METRICS_SETTINGS)),
    "logging": Setting(section_reader(LoggingConfig, _LOGGING_SETTINGS)),
}
_STANDALONE_SETTINGS = {
    "server_name": Setting(_server_name, required=True),
    "listeners": Setting(list_of(_parse_listener)),
    "inbound": Setting(section_reader(InboundConfig, _INBOUND_SETTINGS)),
    "well_known": Setting(parse_well_known),
    "workers": Setting(int_in(1, MAX_WORKERS)),
    **_MODULE_SETTINGS,
}
_SYNAPSE_KEYRING_SETTINGS = {"use_module_fetchers": Setting(as_bool)}
_MODULE_ONLY = {
    "synapse_keyring": Setting(section_reader(SynapseKeyringConfig, _SYNAPSE_KEYRING_SETTINGS)),
}
#: Top-level keys only a standalone config has: inside Synapse the homeserver's own
#: server name and listeners (and so its connections and .well-known) are used.
STANDALONE_ONLY_SETTINGS = ("server_name", "listeners", "inbound", "well_known", "workers")
#: Top-level keys only a module config has: they change the homeserver itself.
MODULE_ONLY_SETTINGS = tuple(_MODULE_ONLY)


def parse_config(raw: object, standalone: bool = True) -> KeyringConfig:
    """Parse a configuration mapping (already loaded from YAML).

    Settings left out get the defaults of the config classes. Paths are kept as given:
    :func:`load_config_file` makes them relative to the file, while a Synapse module's
    ``config:`` block (no file) keeps them relative to the working directory.

    Args:
        raw: the top-level mapping.
        standalone: True for ``keyring-module serve``; False inside Synapse, where
            ``server_name``, ``listeners`` and ``inbound`` are the homeserver's and are
            refused. ``synapse_keyring`` is read only then (a standalone config that
            has it is refused: there is no homeserver to change).

    Raises:
        ConfigError: naming the key path and the problem.

    Example::

        >>> config = parse_config({"signing_key_path": "k.key"}, standalone=False)
        >>> config.signing_key_path, config.database.path, config.ratelimit.origin_burst
        ('k.key', 'keyring.db', 10)
    """
    if not standalone:
        values = read_section(
            raw,
            (),
            {**_MODULE_SETTINGS, **_MODULE_ONLY},
            forbidden=STANDALONE_ONLY_SETTINGS,
            why="inside Synapse the homeserver's server_name and listeners (and their "
            "connection limits) are used, and it serves its own .well-known",
        )
        return KeyringConfig(**values)
    values = read_section(
        raw,
        (),
        _STANDALONE_SETTINGS,
        forbidden=MODULE_ONLY_SETTINGS,
        why="it changes the homeserver's own keyring: set it in the module's config inside Synapse",
    )
    if not values.get("listeners"):
        raise ConfigError("at least one listener is required", ("listeners",))
    return KeyringConfig(**values)
