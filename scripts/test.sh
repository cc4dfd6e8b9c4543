#!/usr/bin/env bash
# README command 2: set up and run the whole test suite (unit, integration with real MLflow
# and MLServer processes on free ports, the real-data quality check when the data is there,
# and the Docker stack when an engine is available). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
.venv/bin/ruff check .
.venv/bin/ruff format --check .
status=0
.venv/bin/python -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "test: pytest collected no tests; that is a failure, not a pass" >&2
fi
exit "$status"
