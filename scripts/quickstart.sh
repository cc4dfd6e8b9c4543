#!/usr/bin/env bash
# README command 1: set up a fresh machine and run the main job on the bundled sample:
# MLflow tracking server, training, registration, promotion, MLServer, one real inference.
# Extra arguments go to `credit-risk up` (e.g. --data path/to/cs-training.csv). Python 3.12 or
# 3.11, whichever is there (scripts/setup.sh says how it looks, and how to choose).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec "${VENV:-.venv}/bin/credit-risk" up "$@"
