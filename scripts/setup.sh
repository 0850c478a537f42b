#!/usr/bin/env bash
# Install lmforge for this checkout.
#
#   bash scripts/setup.sh         # the package and its runtime dependencies
#   bash scripts/setup.sh test    # ... plus the test dependencies (pytest, hypothesis, transformers)
#
# Where: the active virtual environment or conda env if there is one, else ./.venv (created here).
# PyTorch: an installed torch is left alone. Where none is installed, LMFORGE_TORCH is installed
# (default "torch==2.13.0", a CPU build on lmforge's reference machines). Elsewhere, choose your
# own build first, e.g. `pip install torch` inside your environment, or set LMFORGE_TORCH.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ -n "${VIRTUAL_ENV:-}" ]; then
  PY="$VIRTUAL_ENV/bin/python"
elif [ -n "${CONDA_PREFIX:-}" ]; then
  PY="$CONDA_PREFIX/bin/python"
else
  if [ ! -x .venv/bin/python ]; then
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
      || { echo "lmforge needs Python >= 3.10 (python3 is $(python3 --version 2>&1))" >&2; exit 1; }
    python3 -m venv .venv
  fi
  PY=.venv/bin/python
fi

PIP=("$PY" -m pip install --disable-pip-version-check -q)
if "$PY" -c 'import torch' >/dev/null 2>&1; then
  echo "setup: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  echo "setup: installing ${LMFORGE_TORCH:-torch==2.13.0}"
  # shellcheck disable=SC2086  # LMFORGE_TORCH may hold several words (e.g. an index option)
  "${PIP[@]}" ${LMFORGE_TORCH:-torch==2.13.0}
fi

if [ "${1:-}" = "test" ]; then
  bash scripts/system-packages.sh test || echo "setup: continuing without those system packages: the tests that need them skip (and fail in CI)" >&2
  "${PIP[@]}" -e ".[serve,speech,test]"
else
  bash scripts/system-packages.sh || echo "setup: continuing without those system packages: only \`lmforge speech synth\` needs them" >&2
  "${PIP[@]}" -e ".[serve,speech]"
fi
echo "setup: lmforge is installed in $("$PY" -c 'import sys; print(sys.prefix)')"
