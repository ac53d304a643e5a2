#!/usr/bin/env bash
# Print the path of a Python X.Y interpreter, for the CI runs on the oldest and the
# newest supported Python; fail with a message saying how to provide one.
#
#   usage: bash .ci/find_python.sh 3.10
#
# Looks for pythonX.Y on PATH, then among pyenv's installed versions (pyenv's shims
# answer only for the versions selected, so the interpreter itself is used). An
# interpreter counts only if it runs and reports version X.Y.
set -euo pipefail
WANT=${1:?usage: find_python.sh X.Y}

works() {
  "$1" -c "import sys; sys.exit(sys.version_info[:2] != tuple(map(int, '$WANT'.split('.'))))" \
    >/dev/null 2>&1
}

if command -v "python$WANT" >/dev/null 2>&1 && works "python$WANT"; then
  command -v "python$WANT"
  exit 0
fi
if command -v pyenv >/dev/null 2>&1; then
  VERSIONS="$(pyenv root)/versions"
  # Newest patch release first.
  for dir in $(ls -d "$VERSIONS/$WANT".* 2>/dev/null | sort -V -r); do
    if works "$dir/bin/python$WANT"; then
      echo "$dir/bin/python$WANT"
      exit 0
    fi
  done
fi
echo "find_python.sh: no Python $WANT found (neither python$WANT on PATH nor a pyenv" \
  "version $WANT.x); install one (e.g. 'pyenv install $WANT' or the distribution's" \
  "python$WANT package)" >&2
exit 1
