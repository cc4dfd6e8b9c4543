#!/usr/bin/env bash
# Creates .venv with Python 3.11 and installs the project at exactly the versions pinned in
# requirements.lock (the one lock used by local installs, CI and the images).
#   scripts/setup.sh        # runtime only
#   scripts/setup.sh dev    # plus the test and lint tools
# Quick when nothing changed: it reinstalls only when the lock, pyproject.toml or the extras do.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"

python="${PYTHON:-}"
if [ -z "$python" ]; then
  for candidate in python3.11 python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 \
       && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      python="$candidate"; break
    fi
  done
fi
if [ -z "$python" ]; then
  echo "setup: Python 3.11 is required (none found as python3.11, python3 or python; set PYTHON=...)" >&2
  exit 1
fi

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  rm -rf .venv
  "$python" -m venv .venv
fi

stamp=".venv/.installed-$(cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)-${extras:-runtime}"
if [ ! -f "$stamp" ]; then
  target="."
  [ -n "$extras" ] && target=".[$extras]"
  echo "setup: installing $target with the versions pinned in requirements.lock ..." >&2
  .venv/bin/python -m pip install --quiet --disable-pip-version-check \
    --constraint requirements.lock --editable "$target"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
