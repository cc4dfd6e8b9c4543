#!/usr/bin/env bash
# Creates the virtual environment with Python 3.12 or 3.11 and installs the project at exactly
# the versions pinned in requirements.lock (the one lock used by local installs, CI and the images).
#   scripts/setup.sh        # runtime only
#   scripts/setup.sh dev    # plus the test and lint tools
# Quick when nothing changed: it reinstalls only when the lock, pyproject.toml or the extras do.
#
# Which Python: $PYTHON if set; else 3.12, else 3.11, found as python3.12 / python3.11,
# python3 or python on PATH, or among pyenv's installed versions (which need not be on PATH:
# a pyenv shim that cannot run without PYENV_VERSION is skipped); PYTHON_VERSION=3.11 asks
# for that version alone. An existing environment of another version is rebuilt. $VENV names
# the environment (default .venv), so that a second one can sit beside it (CI keeps one per
# Python version).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
venv="${VENV:-.venv}"
supported="3.12 3.11"  # preferred first; pyproject.toml's requires-python says the same
wanted="${PYTHON_VERSION:-$supported}"
if [[ " $supported " != *" ${wanted%% *} "* ]]; then
  echo "setup: PYTHON_VERSION=$wanted: Python 3.12 or 3.11 is required" >&2
  exit 1
fi

# "X.Y <path of the real interpreter>" of a command that runs, or nothing.
describe() {
  "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2], sys.executable)' 2>/dev/null || true
}

# The interpreter of version $1 (X.Y), if one is installed and runs.
find_python() {
  local version="$1" candidate found installed
  for candidate in "python$version" python3 python; do
    command -v "$candidate" >/dev/null 2>&1 || continue
    found="$(describe "$candidate")"
    if [ "${found%% *}" = "$version" ]; then
      echo "${found#* }"
      return 0
    fi
  done
  command -v pyenv >/dev/null 2>&1 || return 1
  # The newest installed patch release of this version.
  installed="$(pyenv versions --bare --skip-aliases 2>/dev/null | grep -E "^${version//./\\.}\.[0-9]+$" \
    | sort -t. -k3,3n | tail -n 1)" || true
  [ -n "$installed" ] || return 1
  candidate="$(pyenv prefix "$installed" 2>/dev/null)/bin/python$version"
  found="$(describe "$candidate")"
  [ "${found%% *}" = "$version" ] || return 1
  echo "${found#* }"
}

if [ -n "${PYTHON:-}" ]; then
  found="$(describe "$PYTHON")"
  version="${found%% *}"
  if [ -z "$found" ] || [[ " $supported " != *" $version "* ]]; then
    echo "setup: PYTHON=$PYTHON is ${version:-not a working Python}; Python 3.12 or 3.11 is required" >&2
    exit 1
  fi
  python="${found#* }"
else
  python=""
  for version in $wanted; do
    if python="$(find_python "$version")"; then
      break
    fi
    python=""
  done
  if [ -z "$python" ]; then
    echo "setup: Python ${wanted// / or } is required (none found as python3.X, python3, python" \
      "or a pyenv version; set PYTHON=/path/to/python3.12)" >&2
    exit 1
  fi
fi

current="$(describe "$venv/bin/python")"
if [ "${current%% *}" != "$version" ]; then
  [ -e "$venv" ] && echo "setup: $venv is Python ${current%% *}, not $version: rebuilding it" >&2
  rm -rf "$venv"
  echo "setup: creating $venv with Python $version ($python)" >&2
  "$python" -m venv "$venv"
fi

stamp="$venv/.installed-$(cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)-${extras:-runtime}"
if [ ! -f "$stamp" ]; then
  target="."
  [ -n "$extras" ] && target=".[$extras]"
  echo "setup: installing $target into $venv with the versions pinned in requirements.lock ..." >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    --constraint requirements.lock --editable "$target"
  rm -f "$venv"/.installed-*
  touch "$stamp"
fi
