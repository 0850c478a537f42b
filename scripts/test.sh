#!/usr/bin/env bash
# Set up with the test dependencies and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh test
PY="${VIRTUAL_ENV:-${CONDA_PREFIX:-.venv}}/bin/python"
"$PY" -m pytest -q "$@"
