#!/usr/bin/env bash
# Regenerates requirements.lock from pyproject.toml: every package, runtime and test tools,
# at one exact version, for every Python the project supports (3.11 and 3.12, by markers)
# and any platform the images may run on (x86_64 and arm64 Linux).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv}"
scripts/setup.sh
"$venv/bin/python" -m pip install --quiet "uv==0.13.8"
"$venv/bin/uv" pip compile pyproject.toml --extra dev --universal --python-version 3.11 \
  --no-header --no-annotate --output-file requirements.lock
echo "lock: requirements.lock regenerated; run scripts/setup.sh dev to install it" >&2
