"""The database schema as portable DDL constants, and ordered migrations.

The DDL is written once for SQLite and PostgreSQL: the only difference, the type of
binary columns (``BLOB`` vs ``BYTEA``), is the ``{bytes}`` placeholder that the dialect
fills in (see :meth:`keyring_module.storage.sql.Dialect.ddl`). Timestamps are BIGINT
milliseconds since the epoch.

The ``schema_version`` table holds one row: the version of the last migration applied.
At start-up every migration newer than it runs, in order, in one transaction; a database
whose version is newer than :data:`SCHEMA_VERSION` is refused.
"""

from typing import Sequence

CREATE_SCHEMA_VERSION = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
SELECT_SCHEMA_VERSION = "SELECT version FROM schema_version"
INSERT_SCHEMA_VERSION = "INSERT INTO schema_version (version) VALUES (?)"
UPDATE_SCHEMA_VERSION = "UPDATE schema_version SET version = ?"

# Each distinct origin response, stored once per distinct canonical JSON bytes.
# response_id is the hex SHA-256 of json.
CREATE_SERVER_KEY_RESPONSES = """
CREATE TABLE IF NOT EXISTS server_key_responses (
    response_id TEXT NOT NULL PRIMARY KEY,
    server_name TEXT NOT NULL,
    valid_until_ts BIGINT NOT NULL,
    fetched_ts BIGINT NOT NULL,
    source TEXT NOT NULL,
    json {bytes} NOT NULL
)
"""
CREATE_SERVER_KEY_RESPONSES_SERVER_NAME_INDEX = """
CREATE INDEX IF NOT EXISTS server_key_responses_server_name
    ON server_key_responses (server_name)
"""

# One row per (server, key id): the key bytes first seen and the newest response
# that lists it. expired_ts is NULL for a current key (verify_keys).
CREATE_SERVER_KEYS = """
CREATE TABLE IF NOT EXISTS server_keys (
    server_name TEXT NOT NULL,
    key_id TEXT NOT NULL,
    verify_key {bytes} NOT NULL,
    valid_until_ts BIGINT NOT NULL,
    expired_ts BIGINT,
    fetched_ts BIGINT NOT NULL,
    source TEXT NOT NULL,
    response_id TEXT NOT NULL,
    PRIMARY KEY (server_name, key_id)
)
"""

# Version 2: each key row also points at its first-seen copy (the response in which its
# kept bytes were first stored). NULL, in rows written before (or by an older process),
# means "the newest copy is the first-seen one" everywhere, so the column is only added:
# no UPDATE rewrites the table (on PostgreSQL that would hold an exclusive lock on all of
# server_keys while it rewrites every row).
ADD_SERVER_KEYS_FIRST_RESPONSE_ID = "ALTER TABLE server_keys ADD COLUMN first_response_id TEXT"

# Keys rejected because the same (server, key id) was first seen with other bytes;
# each distinct rejected key is recorded once (and at most database.max_conflicts_per_server
# per server).
CREATE_KEY_CONFLICTS = """
CREATE TABLE IF NOT EXISTS key_conflicts (
    server_name TEXT NOT NULL,
    key_id TEXT NOT NULL,
    kept_key {bytes} NOT NULL,
    kept_source TEXT NOT NULL,
    rejected_key {bytes} NOT NULL,
    rejected_source TEXT NOT NULL,
    seen_ts BIGINT NOT NULL,
    PRIMARY KEY (server_name, key_id, rejected_key)
)
"""

# Version 3: what instances sharing the database coordinate through
# (:mod:`keyring_module.storage.coordination`).
# One row per server name fetched from its origin by a shared flight: who holds the
# flight and until when (the SQLite lease; PostgreSQL holds an advisory lock instead),
# and the last flight's outcome, which the instances that waited for it use instead of
# fetching again. ``outcome`` is NULL while no flight has finished.
CREATE_ORIGIN_FLIGHTS = """
CREATE TABLE IF NOT EXISTS origin_flights (
    server_name TEXT NOT NULL PRIMARY KEY,
    holder TEXT,
    lease_until_ts BIGINT NOT NULL,
    finished_ts BIGINT NOT NULL,
    finished_by TEXT,
    outcome TEXT,
    error_class TEXT,
    detail TEXT,
    body {bytes}
)
"""
# The change feed of SQLite databases: one row per store of a server's keys, read by
# the other processes' pollers to expire their cached copies (PostgreSQL sends a
# NOTIFY instead). Old rows are deleted as new ones come.
CREATE_KEY_CHANGES = """
CREATE TABLE IF NOT EXISTS key_changes (
    seq INTEGER NOT NULL PRIMARY KEY,
    server_name TEXT NOT NULL
)
"""
# The per-origin token bucket and backoff shared by the instances (keyed by network
# target, like the in-process limiter).
CREATE_ORIGIN_LIMITS = """
CREATE TABLE IF NOT EXISTS origin_limits (
    target TEXT NOT NULL PRIMARY KEY,
    tokens DOUBLE PRECISION NOT NULL,
    tokens_ts BIGINT NOT NULL,
    failures INTEGER NOT NULL,
    backoff_until_ts BIGINT NOT NULL
)
"""

#: Ordered migrations: (version reached, statements). Never edit a released entry;
#: append a new one instead.
MIGRATIONS: Sequence[tuple[int, Sequence[str]]] = (
    (
        1,
        (
            CREATE_SERVER_KEY_RESPONSES,
            CREATE_SERVER_KEY_RESPONSES_SERVER_NAME_INDEX,
            CREATE_SERVER_KEYS,
            CREATE_KEY_CONFLICTS,
        ),
    ),
    (2, (ADD_SERVER_KEYS_FIRST_RESPONSE_ID,)),
    (3, (CREATE_ORIGIN_FLIGHTS, CREATE_KEY_CHANGES, CREATE_ORIGIN_LIMITS)),
)

#: The newest schema version this code knows.
SCHEMA_VERSION = MIGRATIONS[-1][0]
