#!/usr/bin/env bash
# The quick start: set up, pretrain a small GPT on the bundled Shakespeare (about 5 minutes on
# 2 CPU cores), then sample from it. Extra arguments go to `lmforge pretrain`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
BIN="${VIRTUAL_ENV:-${CONDA_PREFIX:-.venv}}/bin"
# --resume: a second run continues (or just re-samples) instead of refusing to overwrite the first
"$BIN/lmforge" pretrain shakespeare --out runs/shakespeare --resume "$@"
"$BIN/lmforge" generate runs/shakespeare "JULIET:" --max-new-tokens 120 --seed 0
