#!/usr/bin/env bash
# Start a throw-away PostgreSQL for the storage tests and benchmark, and print its DSN.
#
# Run as root on Debian 12 (or any Debian/Ubuntu with postgresql-common). Idempotent:
# installs PostgreSQL from the Debian packages if missing, creates (once) a cluster
# "keyringtest" listening only on 127.0.0.1:5433 with trust authentication, starts it,
# creates the database "keyring_test", and prints on the last line of stdout:
#
#     host=127.0.0.1 port=5433 dbname=keyring_test user=postgres
#
# Usage:  export KEYRING_TEST_POSTGRES_DSN="$(.ci/start_postgres.sh | tail -n 1)"
# Stop:   pg_ctlcluster <version> keyringtest stop
set -euo pipefail

CLUSTER=keyringtest
PORT=5433
DBNAME=keyring_test

log() { echo "start_postgres: $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    log "must run as root (it installs packages and manages a cluster)"
    exit 1
fi

if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || ! command -v pg_createcluster >/dev/null; then
    log "installing PostgreSQL from the Debian packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
fi

VERSION="$(ls /usr/lib/postgresql | sort -n | tail -n 1)"
CONF_DIR="/etc/postgresql/${VERSION}/${CLUSTER}"

if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "${VERSION} ${CLUSTER}"; then
    log "creating cluster ${VERSION}/${CLUSTER} on port ${PORT}"
    pg_createcluster "${VERSION}" "${CLUSTER}" -p "${PORT}" -- --auth=trust >&2
fi

# Loopback only, trust authentication (a test database: nothing to protect).
# Rewritten on every run so that a half-configured cluster is repaired.
mkdir -p "${CONF_DIR}/conf.d"
cat >"${CONF_DIR}/conf.d/keyring_test.conf" <<CONF
listen_addresses = '127.0.0.1'
port = ${PORT}
CONF
cat >"${CONF_DIR}/pg_hba.conf" <<HBA
local   all   all                  trust
host    all   all   127.0.0.1/32   trust
HBA
chown -R postgres:postgres "${CONF_DIR}"

STATUS="$(pg_lsclusters -h | awk -v v="${VERSION}" -v c="${CLUSTER}" '$1==v && $2==c {print $4}')"
if [ "${STATUS}" != "online" ]; then
    log "starting cluster ${VERSION}/${CLUSTER}"
    pg_ctlcluster "${VERSION}" "${CLUSTER}" start >&2
else
    pg_ctlcluster "${VERSION}" "${CLUSTER}" reload >&2
fi

for _ in $(seq 1 60); do
    if pg_isready -q -h 127.0.0.1 -p "${PORT}"; then
        break
    fi
    sleep 0.5
done
if ! pg_isready -q -h 127.0.0.1 -p "${PORT}"; then
    log "PostgreSQL did not come up on 127.0.0.1:${PORT}; see /var/log/postgresql/"
    exit 1
fi

PSQL=(psql -X -q -h 127.0.0.1 -p "${PORT}" -U postgres -d postgres -tA)
if [ "$("${PSQL[@]}" -c "SELECT 1 FROM pg_database WHERE datname = '${DBNAME}'")" != "1" ]; then
    log "creating database ${DBNAME}"
    "${PSQL[@]}" -c "CREATE DATABASE ${DBNAME}" >&2
fi

echo "host=127.0.0.1 port=${PORT} dbname=${DBNAME} user=postgres"
