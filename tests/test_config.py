"""Tests for configuration parsing: every kind of bad value names its key path."""

import ipaddress
import os
from typing import Any, Optional

import yaml
from twisted.trial.unittest import SynchronousTestCase

from keyring_module.config import (
    HOUR_MS,
    DatabaseConfig,
    FederationConfig,
    InboundConfig,
    KeyringConfig,
    KeyTrustConfig,
    ListenerConfig,
    LoggingConfig,
    MetricsConfig,
    NotaryConfig,
    OldSigningKey,
    RateLimitConfig,
    TrustedKeyServer,
    parse_config,
    parse_duration_ms,
    parse_size,
)
from keyring_module.config_file import load_config_file
from keyring_module.errors import ConfigError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_CONFIG = os.path.join(REPO_ROOT, "sample_config.yaml")
# 32 zero bytes, unpadded base64: a syntactically valid ed25519 public key.
KEY_B64 = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"


def minimal(**extra: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "server_name": "notary.example.org",
        "signing_key_path": "notary.signing.key",
        "listeners": [{"port": 8080}],
    }
    raw.update(extra)
    return raw


class DurationAndSizeTests(SynchronousTestCase):
    def test_durations(self) -> None:
        """Durations accept unit suffixes and plain milliseconds."""
        cases = {
            "500ms": 500,
            "10s": 10_000,
            "5m": 300_000,
            "1h": HOUR_MS,
            "1d": 24 * HOUR_MS,
            "1w": 7 * 24 * HOUR_MS,
            1500: 1500,
            "250": 250,
        }
        for text, expected in cases.items():
            self.assertEqual(parse_duration_ms(text, ("x",)), expected, text)

    def test_bad_duration_message(self) -> None:
        """A bad duration names the key path and shows the value."""
        with self.assertRaises(ConfigError) as cm:
            parse_config(minimal(federation={"request_timeout": "soon"}))
        self.assertEqual(
            str(cm.exception),
            "federation.request_timeout: expected a duration like \"10s\", got 'soon'",
        )
        self.assertEqual(cm.exception.path, ("federation", "request_timeout"))

    def test_sizes(self) -> None:
        """Sizes accept K/M/G suffixes and plain bytes."""
        self.assertEqual(parse_size("64K", ()), 65536)
        self.assertEqual(parse_size("1M", ()), 1048576)
        self.assertEqual(parse_size("2g", ()), 2 * 1024**3)
        self.assertEqual(parse_size(1234, ()), 1234)
        self.assertRaisesRegex(ConfigError, 'expected a size like "64K"', parse_size, "lots", ())
        self.assertRaisesRegex(ConfigError, "non-negative", parse_size, -1, ())
        self.assertRaisesRegex(ConfigError, "expected a size", parse_size, True, ())


class ConfigErrorTests(SynchronousTestCase):
    def assertConfigError(self, raw: Any, message: str, standalone: bool = True) -> None:
        with self.assertRaises(ConfigError) as cm:
            parse_config(raw, standalone=standalone)
        self.assertIn(message, str(cm.exception))

    def test_unknown_top_level_key(self) -> None:
        """An unknown key is an error naming it."""
        self.assertConfigError(minimal(sever_name="x"), "sever_name: unknown setting")

    def test_unknown_nested_key(self) -> None:
        """An unknown key inside a section names the full path."""
        self.assertConfigError(
            minimal(ratelimit={"origin_bust": 3}), "ratelimit.origin_bust: unknown setting"
        )

    def test_missing_required(self) -> None:
        """Missing required keys are reported by name."""
        raw = minimal()
        del raw["signing_key_path"]
        self.assertConfigError(raw, "signing_key_path: this setting is required")
        raw = minimal()
        del raw["server_name"]
        self.assertConfigError(raw, "server_name: this setting is required")

    def test_no_listeners(self) -> None:
        """Standalone mode needs a listener."""
        self.assertConfigError(minimal(listeners=[]), "listeners: at least one listener")

    def test_bad_server_name(self) -> None:
        """The server name must follow the Matrix grammar."""
        self.assertConfigError(minimal(server_name="bad name!"), "server_name: expected a Matrix")

    def test_key_cap_must_be_positive(self) -> None:
        """federation.max_keys_per_response of 0 or a non-integer is refused by name."""
        for bad in (0, "many"):
            self.assertConfigError(
                minimal(federation={"max_keys_per_response": bad}),
                "federation.max_keys_per_response: expected an integer",
            )

    def test_wrong_types(self) -> None:
        """Each wrong type names the key and the value."""
        self.assertConfigError(
            minimal(federation={"verify_tls": "yes"}),
            "federation.verify_tls: expected true or false, got 'yes'",
        )
        self.assertConfigError(
            minimal(listeners=[{"port": "eighty"}]),
            "listeners.0.port: expected an integer, got 'eighty'",
        )
        self.assertConfigError(
            minimal(listeners=[{"port": 70000}]), "listeners.0.port: expected an integer 0..65535"
        )
        self.assertConfigError(minimal(database=[]), "database: expected a mapping")
        self.assertConfigError(
            minimal(notary={"max_concurrent_requests": 0}),
            "notary.max_concurrent_requests: expected an integer 1..100000, got 0",
        )
        self.assertConfigError(
            minimal(notary={"max_servers_per_request": 0}),
            "notary.max_servers_per_request: expected an integer 1..10000, got 0",
        )

    def test_cache_sizes(self) -> None:
        """Cache sizes are sizes (0 turns a cache off); anything else names the key."""
        self.assertConfigError(
            minimal(notary={"answer_cache_size": "lots"}),
            'notary.answer_cache_size: expected a size like "64K" or "1M", got \'lots\'',
        )
        self.assertConfigError(
            minimal(notary={"cosigned_cache_size": -1}),
            "notary.cosigned_cache_size: expected a non-negative size, got -1",
        )
        self.assertConfigError(
            minimal(database={"cache_size": True}),
            "database.cache_size: expected a size like",
        )
        config = parse_config(minimal(notary={"answer_cache_size": 0}))
        self.assertEqual(config.notary.answer_cache_size, 0)

    def test_tls_listener_needs_files(self) -> None:
        """tls: true without certificate files is refused."""
        self.assertConfigError(
            minimal(listeners=[{"port": 8448, "tls": True}]),
            "listeners.0.tls: tls: true needs tls_certificate_path",
        )

    def test_short_refresh_interval(self) -> None:
        """Publishing keys valid for under an hour is refused."""
        self.assertConfigError(
            minimal(key_refresh_interval="30m"), "key_refresh_interval: must be at least 1h"
        )

    def test_database(self) -> None:
        """Unknown backends and postgres without a DSN are refused."""
        self.assertConfigError(
            minimal(database={"backend": "mysql"}),
            'database.backend: expected "sqlite" or "postgres", got \'mysql\'',
        )
        self.assertConfigError(minimal(database={"backend": "postgres"}), "database.dsn: backend")

    def test_per_server_bounds(self) -> None:
        """Each server needs room for one key and for a key's first-seen and newest copy."""
        self.assertConfigError(
            minimal(database={"max_keys_per_server": 0}),
            "database.max_keys_per_server: expected an integer at least 1, got 0",
        )
        self.assertConfigError(
            minimal(database={"max_responses_per_server": 1}),
            "database.max_responses_per_server: expected an integer at least 2, got 1",
        )
        self.assertConfigError(
            minimal(database={"max_conflicts_per_server": -1}),
            "database.max_conflicts_per_server: expected an integer at least 0, got -1",
        )
        self.assertConfigError(
            minimal(database={"max_response_bytes_per_server": 4}),
            'database.max_response_bytes_per_server: expected a size of at least "64K", got 4',
        )
        self.assertConfigError(
            minimal(database={"max_response_bytes_per_server": "lots"}),
            "database.max_response_bytes_per_server: expected a size like",
        )
        config = parse_config(minimal(database={"max_response_bytes_per_server": "64K"}))
        self.assertEqual(config.database.max_response_bytes_per_server, 64 * 1024)

    def test_trusted_key_servers(self) -> None:
        """Notary entries need a name and valid base64 keys under valid key ids."""
        self.assertConfigError(
            minimal(trusted_key_servers=[{"verify_keys": {"ed25519:a": KEY_B64}}]),
            "trusted_key_servers.0.server_name: this setting is required",
        )
        self.assertConfigError(
            minimal(
                trusted_key_servers=[{"server_name": "n.org", "verify_keys": {"ed25519:a": "zz"}}]
            ),
            "trusted_key_servers.0.verify_keys.ed25519:a: expected an unpadded base64 ed25519",
        )
        self.assertConfigError(
            minimal(
                trusted_key_servers=[{"server_name": "n.org", "verify_keys": {"rsa:a": KEY_B64}}]
            ),
            "trusted_key_servers.0.verify_keys.rsa:a: expected a key id",
        )
        self.assertConfigError(
            minimal(trusted_key_servers=[{"server_name": "n.org", "verify_keys": {}}]),
            "trusted_key_servers.0.verify_keys: at least one notary key",
        )

    def test_compromised_keys_compared_by_bytes(self) -> None:
        """Compromised keys are decoded to bytes, padded or not; junk is refused."""
        unpadded = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAE"
        config = parse_config(minimal(key_trust={"compromised_keys": [unpadded, unpadded + "="]}))
        expected = bytes(31) + b"\x01"
        self.assertEqual(config.key_trust.compromised_keys, (expected, expected))
        self.assertConfigError(
            minimal(key_trust={"compromised_keys": ["not base64!"]}),
            "key_trust.compromised_keys.0: expected an unpadded base64 ed25519",
        )

    def test_ip_ranges(self) -> None:
        """IP ranges must parse."""
        self.assertConfigError(
            minimal(federation={"ip_range_allowlist": ["10.0.0.0/33"]}),
            "federation.ip_range_allowlist.0: expected an IP range",
        )

    def test_fetch_order(self) -> None:
        """Only the two orders of origin and notaries are accepted."""
        self.assertConfigError(
            minimal(key_fetch_order=["origin"]), "key_fetch_order: expected [origin, notaries]"
        )

    def test_backoff_order(self) -> None:
        """The backoff maximum cannot be below the initial backoff."""
        self.assertConfigError(
            minimal(ratelimit={"failure_backoff_initial": "2h"}),
            "ratelimit.failure_backoff_max: must not be shorter",
        )

    def test_old_signing_keys(self) -> None:
        """Old keys need a key and an integer expired_ts."""
        self.assertConfigError(
            minimal(old_signing_keys={"ed25519:old": {"key": KEY_B64}}),
            "old_signing_keys.ed25519:old.expired_ts: this setting is required",
        )

    def test_module_mode_refuses_standalone_keys(self) -> None:
        """Inside Synapse, server_name and listeners come from the homeserver."""
        self.assertConfigError(
            {"signing_key_path": "k", "server_name": "a.org"},
            "server_name: not allowed here",
            standalone=False,
        )
        config = parse_config({"signing_key_path": "k"}, standalone=False)
        self.assertIsNone(config.server_name)
        self.assertEqual(config.listeners, ())

    def test_inbound_limits(self) -> None:
        """Inbound timeouts need at least 1s, the answer budget at least 1M."""
        self.assertConfigError(
            minimal(inbound={"header_timeout": "500ms"}),
            "inbound.header_timeout: must be at least 1s, got '500ms'",
        )
        self.assertConfigError(
            minimal(inbound={"idle_timeout": "soon"}),
            "inbound.idle_timeout: expected a duration like \"10s\", got 'soon'",
        )
        self.assertConfigError(
            minimal(inbound={"max_buffered_response_bytes": "512K"}),
            "inbound.max_buffered_response_bytes: must be at least 1M, got '512K'",
        )
        self.assertConfigError(
            minimal(inbound={"max_connections_per_address": -1}),
            "inbound.max_connections_per_address: expected an integer 0..1000000, got -1",
        )
        self.assertConfigError(
            minimal(inbound={"idle_timout": "1m"}), "inbound.idle_timout: unknown setting"
        )

    def test_module_mode_refuses_inbound(self) -> None:
        """Inside Synapse the homeserver's listeners take the connections: inbound is refused."""
        self.assertConfigError(
            {"signing_key_path": "k", "inbound": {"idle_timeout": "1m"}},
            "inbound: not allowed here: inside Synapse the homeserver's server_name and "
            "listeners (and their connection limits) are used",
            standalone=False,
        )

    def test_query_reads_a_standalone_file_with_inbound(self) -> None:
        """``keyring-module query --config`` leaves a standalone file's inbound section unread."""
        from keyring_module.cli.query import load_query_config

        directory = os.path.abspath(self.mktemp())
        path = write_config(directory, minimal(inbound={"idle_timeout": "2m"}))
        config = load_query_config(path)
        self.assertIsNone(config.server_name)
        self.assertEqual(config.inbound, InboundConfig())

    def test_top_level_not_mapping(self) -> None:
        """A config that is not a mapping is refused."""
        self.assertConfigError(["a"], "expected a mapping")

    def test_bad_yaml_file(self) -> None:
        """A YAML syntax error names the file."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("server_name: [unclosed\n")
        with self.assertRaises(ConfigError) as cm:
            load_config_file(path)
        self.assertIn("is not valid YAML", str(cm.exception))
        with self.assertRaises(ConfigError) as cm:
            load_config_file(path + ".missing")
        self.assertIn("cannot read config file", str(cm.exception))


class SampleConfigTests(SynchronousTestCase):
    def test_sample_config_parses_to_exact_value(self) -> None:
        """sample_config.yaml documents the defaults and parses to exactly them."""
        config = load_config_file(SAMPLE_CONFIG)
        expected = KeyringConfig(
            server_name="localhost:8080",
            data_dir=REPO_ROOT,
            signing_key_path=os.path.join(REPO_ROOT, "notary.signing.key"),
            old_signing_keys=(),
            key_refresh_interval_ms=24 * HOUR_MS,
            listeners=(ListenerConfig(port=8080, bind_addresses=("127.0.0.1",), tls=False),),
            database=DatabaseConfig(
                backend="sqlite",
                path=os.path.join(REPO_ROOT, "keyring.db"),
                dsn=None,
                pool_size=5,
                cache_entries=10000,
                cache_ttl_ms=10_000,
                cache_size=64 * 1024 * 1024,
                max_keys_per_server=1000,
                max_responses_per_server=32,
                max_conflicts_per_server=1000,
                max_response_bytes_per_server=4 * 1024 * 1024,
            ),
            trusted_key_servers=(),
            key_fetch_order=("origin", "notaries"),
            key_trust=KeyTrustConfig(min_agreeing_sources=1, confirm_notary_keys_directly=False),
            federation=FederationConfig(max_keys_per_response=256),
            ratelimit=RateLimitConfig(
                origin_burst=10,
                origin_interval_ms=60_000,
                failure_backoff_initial_ms=30_000,
                failure_backoff_max_ms=HOUR_MS,
                notary_max_concurrent=8,
            ),
            notary=NotaryConfig(
                enabled=True,
                max_servers_per_request=10_000,
                max_request_body=2 * 1024 * 1024,
                max_concurrent_requests=200,
                answer_cache_size=32 * 1024 * 1024,
                cosigned_cache_size=32 * 1024 * 1024,
                max_fetches_per_request=100,
            ),
            inbound=InboundConfig(
                idle_timeout_ms=60_000,
                header_timeout_ms=30_000,
                send_timeout_ms=60_000,
                max_connections_per_address=100,
                max_buffered_response_bytes=64 * 1024 * 1024,
            ),
            metrics=MetricsConfig(enabled=False, port=9100, bind_addresses=("127.0.0.1",)),
            logging=LoggingConfig(level="INFO"),
        )
        self.assertEqual(config, expected)
        # The defaults of the code and of the sample agree.
        with open(SAMPLE_CONFIG, encoding="utf-8") as f:
            sample = parse_config(yaml.safe_load(f))
        self.assertEqual(sample, parse_config(minimal(server_name="localhost:8080")))

    def test_full_config(self) -> None:
        """Every key of the contract is read into its field."""
        config = parse_config(
            minimal(
                old_signing_keys={"ed25519:old": {"key": KEY_B64, "expired_ts": 1000}},
                key_refresh_interval="12h",
                trusted_key_servers=[
                    {"server_name": "matrix.org", "verify_keys": {"ed25519:auto": KEY_B64}}
                ],
                key_fetch_order=["notaries", "origin"],
                key_trust={
                    "min_agreeing_sources": 2,
                    "confirm_notary_keys_directly": True,
                    "compromised_keys": [KEY_B64],
                },
                federation={
                    "verify_tls": False,
                    "ca_file": "ca.pem",
                    "ip_range_denylist": ["10.0.0.0/8"],
                    "ip_range_allowlist": ["10.1.0.0/16"],
                    "request_timeout": "5s",
                    "max_response_size": "256K",
                    "max_keys_per_response": 64,
                },
                ratelimit={
                    "origin_burst": 5,
                    "origin_interval": "30s",
                    "failure_backoff_initial": "10s",
                    "failure_backoff_max": "30m",
                },
                database={
                    "backend": "postgres",
                    "dsn": "dbname=k",
                    "pool_size": 7,
                    "cache_entries": 5,
                    "cache_ttl": "2s",
                    "cache_size": "16M",
                    "max_keys_per_server": 50,
                    "max_responses_per_server": 8,
                    "max_conflicts_per_server": 0,
                    "max_response_bytes_per_server": "1M",
                },
                notary={
                    "enabled": False,
                    "max_servers_per_request": 500,
                    "max_request_body": "256K",
                    "max_concurrent_requests": 7,
                    "answer_cache_size": "8M",
                    "cosigned_cache_size": "4M",
                },
                inbound={
                    "idle_timeout": "2m",
                    "header_timeout": "15s",
                    "send_timeout": "90s",
                    "max_connections_per_address": 0,
                    "max_buffered_response_bytes": "256M",
                },
                metrics={"enabled": True, "port": 9101, "bind_addresses": ["::1"]},
                logging={"level": "warning", "format": "%(message)s", "config_file": "log.yaml"},
                listeners=[
                    {
                        "port": 8448,
                        "bind_addresses": ["0.0.0.0", "::"],
                        "tls": True,
                        "tls_certificate_path": "tls.crt",
                        "tls_private_key_path": "tls.key",
                    }
                ],
            )
        )
        self.assertEqual(
            config.listeners,
            (ListenerConfig(8448, ("0.0.0.0", "::"), True, "tls.crt", "tls.key"),),
        )
        self.assertEqual(config.old_signing_keys, (OldSigningKey("ed25519:old", bytes(32), 1000),))
        self.assertEqual(config.key_refresh_interval_ms, 12 * HOUR_MS)
        self.assertEqual(
            config.trusted_key_servers,
            (TrustedKeyServer("matrix.org", {"ed25519:auto": bytes(32)}),),
        )
        self.assertEqual(config.key_fetch_order, ("notaries", "origin"))
        self.assertEqual(config.key_trust, KeyTrustConfig(2, True, (bytes(32),)))
        self.assertEqual(
            config.federation,
            FederationConfig(
                verify_tls=False,
                ca_file="ca.pem",
                ip_range_denylist=(ipaddress.ip_network("10.0.0.0/8"),),
                ip_range_allowlist=(ipaddress.ip_network("10.1.0.0/16"),),
                request_timeout_ms=5000,
                max_response_size=256 * 1024,
                max_keys_per_response=64,
            ),
        )
        self.assertEqual(config.ratelimit, RateLimitConfig(5, 30_000, 10_000, 30 * 60_000))
        self.assertEqual(
            config.database,
            DatabaseConfig(
                "postgres",
                "keyring.db",
                "dbname=k",
                7,
                5,
                2000,
                16 * 1024 * 1024,
                50,
                8,
                0,
                1024**2,
            ),
        )
        self.assertEqual(
            config.notary, NotaryConfig(False, 500, 256 * 1024, 7, 8 * 1024 * 1024, 4 * 1024 * 1024)
        )
        self.assertEqual(config.inbound, InboundConfig(120_000, 15_000, 90_000, 0, 256 * 1024**2))
        self.assertEqual(config.metrics, MetricsConfig(True, 9101, ("::1",)))
        self.assertEqual(config.logging, LoggingConfig("WARNING", "%(message)s", "log.yaml"))

    def test_left_out_settings_take_the_class_defaults(self) -> None:
        """Left-out, null and empty-address settings get exactly the config classes' defaults."""
        expected = KeyringConfig(
            signing_key_path="notary.signing.key",
            server_name="notary.example.org",
            listeners=(ListenerConfig(port=8080),),
        )
        self.assertEqual(parse_config(minimal()), expected)
        nulls = minimal(
            database=None,
            federation={"ca_file": None, "request_timeout": None},
            logging={"config_file": None},
            key_refresh_interval=None,
            listeners=[{"port": 8080, "bind_addresses": [], "tls": None}],
            metrics={"bind_addresses": []},
        )
        self.assertEqual(parse_config(nulls), expected)

    def test_unknown_key_lists_the_valid_settings(self) -> None:
        """An unknown key's message lists every valid key of its section, and only those."""
        with self.assertRaises(ConfigError) as cm:
            parse_config(minimal(ratelimit={"origin_bust": 3}))
        self.assertEqual(
            str(cm.exception),
            "ratelimit.origin_bust: unknown setting; valid settings here are: "
            "failure_backoff_initial, failure_backoff_max, notary_max_concurrent, origin_burst, "
            "origin_interval",
        )
        with self.assertRaises(ConfigError) as cm:
            parse_config({"signing_key_path": "k", "x": 1}, standalone=False)
        self.assertEqual(
            str(cm.exception),
            "x: unknown setting; valid settings here are: data_dir, database, federation, "
            "key_fetch_order, key_refresh_interval, key_trust, logging, metrics, notary, "
            "old_signing_keys, ratelimit, signing_key_path, synapse_keyring, trusted_key_servers",
        )


def write_config(directory: str, raw: dict[str, Any]) -> str:
    """Write ``raw`` as YAML to ``directory/config.yaml`` and return that path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "config.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(raw, f)
    return path


def with_file_paths(**paths: str) -> dict[str, Any]:
    """A standalone config naming every path setting, with the given values."""
    return minimal(
        signing_key_path=paths["signing_key"],
        listeners=[
            {
                "port": 8448,
                "tls": True,
                "tls_certificate_path": paths["certificate"],
                "tls_private_key_path": paths["private_key"],
            }
        ],
        database={"path": paths["database"]},
        federation={"ca_file": paths["ca_file"]},
        logging={"config_file": paths["logging"]},
    )


def file_paths(config: KeyringConfig) -> dict[str, Optional[str]]:
    """The path settings of ``config``, under the names :func:`with_file_paths` takes."""
    return {
        "signing_key": config.signing_key_path,
        "certificate": config.listeners[0].tls_certificate_path,
        "private_key": config.listeners[0].tls_private_key_path,
        "database": config.database.path,
        "ca_file": config.federation.ca_file,
        "logging": config.logging.config_file,
    }


RELATIVE_PATHS = {
    "signing_key": "keys/notary.signing.key",
    "certificate": "tls/cert.pem",
    "private_key": "tls/key.pem",
    "database": "keyring.db",
    "ca_file": "../shared/ca.pem",
    "logging": "log.yaml",
}


class ConfigFilePathTests(SynchronousTestCase):
    """Relative paths in a config file are relative to the file's folder, resolved at load."""

    def test_relative_paths_are_under_the_config_folder(self) -> None:
        """Every relative path setting of a file in another folder becomes absolute under it."""
        directory = os.path.abspath(self.mktemp())
        path = write_config(directory, with_file_paths(**RELATIVE_PATHS))
        # The config file itself is named relative to the working directory.
        config = load_config_file(os.path.relpath(path))
        expected = {k: os.path.join(directory, v) for k, v in RELATIVE_PATHS.items()}
        self.assertEqual(file_paths(config), expected)
        self.assertTrue(all(os.path.isabs(p) for p in expected.values()))

    def test_default_database_path_is_under_the_config_folder(self) -> None:
        """The default SQLite file lives next to the config file, not in the working directory."""
        directory = os.path.abspath(self.mktemp())
        config = load_config_file(write_config(directory, minimal()))
        self.assertEqual(config.database.path, os.path.join(directory, "keyring.db"))
        self.assertEqual(config.signing_key_path, os.path.join(directory, "notary.signing.key"))

    def test_memory_and_absolute_paths_stay_as_they_are(self) -> None:
        """``:memory:`` and absolute paths are kept exactly."""
        directory = os.path.abspath(self.mktemp())
        absolute = {k: os.path.join("/srv/keyring", v) for k, v in RELATIVE_PATHS.items()}
        absolute["database"] = ":memory:"
        config = load_config_file(write_config(directory, with_file_paths(**absolute)))
        self.assertEqual(file_paths(config), absolute)

    def test_postgres_keeps_the_unused_sqlite_path(self) -> None:
        """With the postgres backend, database.path is not a file of ours and is left alone."""
        directory = os.path.abspath(self.mktemp())
        raw = minimal(database={"backend": "postgres", "dsn": "dbname=k"})
        config = load_config_file(write_config(directory, raw))
        self.assertEqual(config.database.path, "keyring.db")

    def test_module_block_keeps_paths_as_given(self) -> None:
        """A Synapse module's config block (no file) keeps relative paths as written."""
        raw = with_file_paths(**RELATIVE_PATHS)
        del raw["server_name"], raw["listeners"]
        config = parse_config(raw, standalone=False)
        self.assertEqual(config.signing_key_path, RELATIVE_PATHS["signing_key"])
        self.assertEqual(config.database.path, RELATIVE_PATHS["database"])
        self.assertEqual(config.federation.ca_file, RELATIVE_PATHS["ca_file"])
        self.assertEqual(config.logging.config_file, RELATIVE_PATHS["logging"])
