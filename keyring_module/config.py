"""Configuration: the YAML contract parsed into frozen attrs values.

The same keys are read in both modes:

* standalone (``keyring-module serve --config PATH``): the whole file, including
  ``server_name`` and ``listeners``;
* inside Synapse (``modules: [{module: keyring_module.KeyringModule, config: {...}}]``):
  everything except ``server_name`` and ``listeners``, which come from the homeserver.

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
    Section,
    as_bool,
    as_int,
    as_key_id,
    as_list,
    as_mapping,
    as_networks,
    as_optional_str,
    as_port,
    as_str,
    as_str_list,
    as_verify_key_bytes,
    parse_duration_ms,
    parse_size,
)
from keyring_module.errors import ConfigError

__all__ = [
    "DEFAULT_IP_RANGE_DENYLIST",
    "HOUR_MS",
    "ConfigError",
    "DatabaseConfig",
    "FederationConfig",
    "KeyringConfig",
    "KeyTrustConfig",
    "ListenerConfig",
    "LoggingConfig",
    "MetricsConfig",
    "NotaryConfig",
    "OldSigningKey",
    "RateLimitConfig",
    "TrustedKeyServer",
    "load_config_file",
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


@attr.s(auto_attribs=True, frozen=True, slots=True)
class RateLimitConfig:
    """The per-origin limiter: burst, steady rate and failure backoff."""

    origin_burst: int = 3
    origin_interval_ms: int = 60_000
    failure_backoff_initial_ms: int = 30_000
    failure_backoff_max_ms: int = HOUR_MS


@attr.s(auto_attribs=True, frozen=True, slots=True)
class NotaryConfig:
    """Inbound ``/_matrix/key/v2/query`` limits."""

    enabled: bool = True
    max_servers_per_request: int = 100
    max_request_body: int = 64 * 1024
    max_concurrent_requests: int = 200


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
class KeyringConfig:
    """The whole configuration. ``server_name``/``listeners`` are standalone-only."""

    signing_key_path: str
    server_name: Optional[str] = None
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
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()


def _parse_listener(raw: object, path: Path) -> ListenerConfig:
    s = Section(raw, path)
    listener = ListenerConfig(
        port=s.require("port", as_port),
        bind_addresses=s.get("bind_addresses", as_str_list, ("127.0.0.1",)) or ("127.0.0.1",),
        tls=s.get("tls", as_bool, False),
        tls_certificate_path=s.get("tls_certificate_path", as_optional_str, None),
        tls_private_key_path=s.get("tls_private_key_path", as_optional_str, None),
    )
    s.finish()
    if listener.tls and not (listener.tls_certificate_path and listener.tls_private_key_path):
        raise ConfigError(
            "tls: true needs tls_certificate_path and tls_private_key_path", path + ("tls",)
        )
    return listener


def _parse_database(raw: object, path: Path) -> DatabaseConfig:
    s = Section(raw, path)

    def backend(value: object, p: Path) -> str:
        if value not in ("sqlite", "postgres"):
            raise ConfigError('expected "sqlite" or "postgres", got %r' % (value,), p)
        return str(value)

    db = DatabaseConfig(
        backend=s.get("backend", backend, "sqlite"),
        path=s.get("path", as_str, "keyring.db"),
        dsn=s.get("dsn", as_optional_str, None),
        pool_size=s.get("pool_size", lambda v, p: as_int(v, p, 1, 100), 5),
        cache_entries=s.get("cache_entries", lambda v, p: as_int(v, p, 0), 10000),
        cache_ttl_ms=s.get("cache_ttl", parse_duration_ms, 10_000),
    )
    s.finish()
    if db.backend == "postgres" and not db.dsn:
        raise ConfigError(
            'backend "postgres" needs a dsn, e.g. "host=127.0.0.1 dbname=keyring user=keyring"',
            path + ("dsn",),
        )
    return db


def _parse_trusted_key_server(raw: object, path: Path) -> TrustedKeyServer:
    s = Section(raw, path)
    name = s.require("server_name", as_str)

    def keys(value: object, p: Path) -> Mapping[str, bytes]:
        return {
            as_key_id(str(k), p + (str(k),)): as_verify_key_bytes(v, p + (str(k),))
            for k, v in as_mapping(value, p).items()
        }

    verify_keys = s.require("verify_keys", keys)
    s.finish()
    if not verify_keys:
        raise ConfigError(
            "at least one notary key is required, so that its answers can be checked",
            path + ("verify_keys",),
        )
    return TrustedKeyServer(server_name=name, verify_keys=verify_keys)


def _parse_old_signing_keys(raw: object, path: Path) -> tuple[OldSigningKey, ...]:
    result = []
    for key_id, entry in as_mapping(raw, path).items():
        p = path + (str(key_id),)
        s = Section(entry, p)
        key = OldSigningKey(
            key_id=as_key_id(str(key_id), p),
            verify_key_bytes=s.require("key", as_verify_key_bytes),
            expired_ts=s.require("expired_ts", lambda v, q: as_int(v, q, 0)),
        )
        s.finish()
        result.append(key)
    return tuple(sorted(result, key=lambda k: k.key_id))


def _parse_fetch_order(value: object, path: Path) -> tuple[str, ...]:
    order = as_str_list(value, path)
    if sorted(order) != ["notaries", "origin"]:
        raise ConfigError(
            "expected [origin, notaries] or [notaries, origin], got %r" % (value,), path
        )
    return order


def _parse_key_trust(raw: object, path: Path) -> KeyTrustConfig:
    s = Section(raw, path)
    kt = KeyTrustConfig(
        min_agreeing_sources=s.get("min_agreeing_sources", lambda v, p: as_int(v, p, 1, 32), 1),
        confirm_notary_keys_directly=s.get("confirm_notary_keys_directly", as_bool, False),
        compromised_keys=s.get(
            "compromised_keys",
            lambda v, p: tuple(
                as_verify_key_bytes(item, p + (str(i),)) for i, item in enumerate(as_list(v, p))
            ),
            (),
        ),
    )
    s.finish()
    return kt


def _parse_federation(raw: object, path: Path) -> FederationConfig:
    s = Section(raw, path)
    default = FederationConfig()
    fed = FederationConfig(
        verify_tls=s.get("verify_tls", as_bool, True),
        ca_file=s.get("ca_file", as_optional_str, None),
        ip_range_denylist=s.get("ip_range_denylist", as_networks, default.ip_range_denylist),
        ip_range_allowlist=s.get("ip_range_allowlist", as_networks, ()),
        request_timeout_ms=s.get("request_timeout", parse_duration_ms, 10_000),
        max_response_size=s.get("max_response_size", parse_size, 1024 * 1024),
    )
    s.finish()
    if fed.request_timeout_ms < 100:
        raise ConfigError("must be at least 100ms", path + ("request_timeout",))
    if fed.max_response_size < 1024:
        raise ConfigError("must be at least 1K", path + ("max_response_size",))
    return fed


def _parse_ratelimit(raw: object, path: Path) -> RateLimitConfig:
    s = Section(raw, path)
    rl = RateLimitConfig(
        origin_burst=s.get("origin_burst", lambda v, p: as_int(v, p, 1), 3),
        origin_interval_ms=s.get("origin_interval", parse_duration_ms, 60_000),
        failure_backoff_initial_ms=s.get("failure_backoff_initial", parse_duration_ms, 30_000),
        failure_backoff_max_ms=s.get("failure_backoff_max", parse_duration_ms, HOUR_MS),
    )
    s.finish()
    if rl.failure_backoff_max_ms < rl.failure_backoff_initial_ms:
        raise ConfigError(
            "must not be shorter than failure_backoff_initial", path + ("failure_backoff_max",)
        )
    return rl


def _parse_notary(raw: object, path: Path) -> NotaryConfig:
    s = Section(raw, path)
    n = NotaryConfig(
        enabled=s.get("enabled", as_bool, True),
        max_servers_per_request=s.get(
            "max_servers_per_request", lambda v, p: as_int(v, p, 1, 10000), 100
        ),
        max_request_body=s.get("max_request_body", parse_size, 64 * 1024),
        max_concurrent_requests=s.get(
            "max_concurrent_requests", lambda v, p: as_int(v, p, 1, 100000), 200
        ),
    )
    s.finish()
    return n


def _parse_metrics(raw: object, path: Path) -> MetricsConfig:
    s = Section(raw, path)
    m = MetricsConfig(
        enabled=s.get("enabled", as_bool, False),
        port=s.get("port", as_port, 9100),
        bind_addresses=s.get("bind_addresses", as_str_list, ("127.0.0.1",)) or ("127.0.0.1",),
    )
    s.finish()
    return m


def _parse_logging(raw: object, path: Path) -> LoggingConfig:
    s = Section(raw, path)

    def level(value: object, p: Path) -> str:
        choices = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
        if not isinstance(value, str) or value.upper() not in choices:
            raise ConfigError("expected one of %s, got %r" % (", ".join(choices), value), p)
        return value.upper()

    lc = LoggingConfig(
        level=s.get("level", level, "INFO"),
        format=s.get("format", as_str, LoggingConfig().format),
        config_file=s.get("config_file", as_optional_str, None),
    )
    s.finish()
    return lc


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


def parse_config(raw: object, standalone: bool = True) -> KeyringConfig:
    """Parse a configuration mapping (already loaded from YAML).

    Args:
        raw: the top-level mapping.
        standalone: True for ``keyring-module serve``; False inside Synapse, where
            ``server_name`` and ``listeners`` come from the homeserver and are refused.

    Raises:
        ConfigError: naming the key path and the problem.
    """
    s = Section(raw, ())
    server_name = s.require("server_name", _server_name) if standalone else None
    listeners: tuple[ListenerConfig, ...] = ()
    if standalone:
        listeners = s.get(
            "listeners",
            lambda v, p: tuple(
                _parse_listener(item, p + (str(i),)) for i, item in enumerate(as_list(v, p))
            ),
            (),
        )
        if not listeners:
            raise ConfigError("at least one listener is required", ("listeners",))

    refresh_ms = s.get("key_refresh_interval", parse_duration_ms, 24 * HOUR_MS)
    if refresh_ms < HOUR_MS:
        raise ConfigError(
            "must be at least 1h, since servers should not publish keys valid for less "
            "than an hour, got %r" % (s.raw.get("key_refresh_interval"),),
            ("key_refresh_interval",),
        )

    config = KeyringConfig(
        server_name=server_name,
        signing_key_path=s.require("signing_key_path", as_str),
        old_signing_keys=s.get("old_signing_keys", _parse_old_signing_keys, ()),
        key_refresh_interval_ms=refresh_ms,
        listeners=listeners,
        database=_parse_database(s.raw.get("database"), ("database",)),
        trusted_key_servers=s.get(
            "trusted_key_servers",
            lambda v, p: tuple(
                _parse_trusted_key_server(item, p + (str(i),))
                for i, item in enumerate(as_list(v, p))
            ),
            (),
        ),
        key_fetch_order=s.get("key_fetch_order", _parse_fetch_order, ("origin", "notaries")),
        key_trust=_parse_key_trust(s.raw.get("key_trust"), ("key_trust",)),
        federation=_parse_federation(s.raw.get("federation"), ("federation",)),
        ratelimit=_parse_ratelimit(s.raw.get("ratelimit"), ("ratelimit",)),
        notary=_parse_notary(s.raw.get("notary"), ("notary",)),
        metrics=_parse_metrics(s.raw.get("metrics"), ("metrics",)),
        logging=_parse_logging(s.raw.get("logging"), ("logging",)),
    )
    for section in (
        "database",
        "key_trust",
        "federation",
        "ratelimit",
        "notary",
        "metrics",
        "logging",
    ):
        s._seen.add(section)
    s.finish(
        forbidden=() if standalone else ("server_name", "listeners"),
        why="inside Synapse the homeserver's server_name and listeners are used",
    )
    return config


def load_config_file(path: str, standalone: bool = True) -> KeyringConfig:
    """Read a YAML file and parse it; YAML syntax errors become ConfigError."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError("cannot read config file %s: %s" % (path, e.strerror)) from None
    except yaml.YAMLError as e:
        raise ConfigError("%s is not valid YAML: %s" % (path, e)) from None
    if raw is None:
        raw = {}
    return parse_config(raw, standalone=standalone)
