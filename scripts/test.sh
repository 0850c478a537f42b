#!/usr/bin/env bash
# Set up with the test dependencies, check formatting and lint (ruff), run the whole test suite.
# Extra arguments go to pytest.
# The suite must pass on any CPU and thread count; to see other rounding on this machine, run it as e.g.
#   OMP_NUM_THREADS=1 MKL_CBWR=COMPATIBLE ONEDNN_MAX_CPU_ISA=SSE41 ATEN_CPU_CAPABILITY=default bash scripts/test.sh
# (MKL's compatible path without SIMD kernels: it reproduced the AMD EPYC failure of issue 11 on an Intel CPU).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh test
PY="${VIRTUAL_ENV:-${CONDA_PREFIX:-.venv}}/bin/python"
# the formatter and the linter first (settings in pyproject.toml): a quick, clear failure
"$PY" -m ruff format --check --quiet . || { echo "ruff: run '$PY -m ruff format .' and commit" >&2; exit 1; }
"$PY" -m ruff check --quiet .
"$PY" -m pytest -q "$@"
