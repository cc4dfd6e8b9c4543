#!/usr/bin/env bash
# README command 2: set up and run the whole test suite (unit, integration with real MLflow
# and MLServer processes on free ports, the real-data quality check when the data is there,
# and the Docker stack when an engine is available), then list the 15 slowest tests. Extra
# arguments go to pytest. VENV and PYTHON / PYTHON_VERSION choose the environment and the
# Python, as for scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv}"
scripts/setup.sh dev
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
"$venv/bin/python" --version
status=0
"$venv/bin/python" -m pytest --durations=15 "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "test: pytest collected no tests; that is a failure, not a pass" >&2
fi
exit "$status"
