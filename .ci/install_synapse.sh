#!/usr/bin/env bash
# Install matrix-synapse (from PyPI) into its own virtualenv, for the interop tests.
#
#   usage: bash .ci/install_synapse.sh [VENV_DIR]      (default: .synvenv in the repo root)
#
# It also installs this project (editable) into that venv, so that Synapse can load
# `keyring_module.KeyringModule` from `modules:`. Idempotent: when the venv already
# imports both synapse and keyring_module, nothing is installed again.
# The LAST line printed is the venv's python, e.g.
#   export KEYRING_SYNAPSE_PYTHON="$(bash .ci/install_synapse.sh | tail -n 1)"
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${1:-"$ROOT/.synvenv"}
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac
PY="$VENV/bin/python"

# Importable from outside the source tree, so an editable install is really checked.
importable() {
  [ -x "$PY" ] && (cd / && "$PY" -c 'import synapse.app.homeserver, keyring_module') >/dev/null 2>&1
}

if importable; then
  echo "matrix-synapse $("$PY" -c 'import synapse; print(synapse.__version__)') already installed in $VENV" >&2
else
  if [ ! -x "$PY" ]; then
    echo "== creating virtualenv $VENV" >&2
    python3 -m venv "$VENV"
  fi
  echo "== installing matrix-synapse and keyring_module (editable) into $VENV" >&2
  "$PY" -m pip install -q --disable-pip-version-check --upgrade pip >&2
  # The series keyring_module.synapse_adapter.TESTED_SYNAPSE_VERSIONS names (use_module_fetchers).
  "$PY" -m pip install -q --disable-pip-version-check "matrix-synapse~=1.163.0" >&2
  "$PY" -m pip install -q --disable-pip-version-check -e "$ROOT" >&2
  if ! importable; then
    echo "install_synapse.sh: $PY cannot import synapse and keyring_module after installing" >&2
    exit 1
  fi
  echo "matrix-synapse $("$PY" -c 'import synapse; print(synapse.__version__)') installed in $VENV" >&2
fi
echo "$PY"
