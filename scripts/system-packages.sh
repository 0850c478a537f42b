#!/usr/bin/env bash
# Install the Debian packages that lmforge's optional features and tests need, when they are missing.
#
#   bash scripts/system-packages.sh         # the packages features need at run time (espeak-ng: `lmforge speech synth`)
#   bash scripts/system-packages.sh test    # ... plus the tests' (chromium + chromedriver: the serve playground test)
#
# Each package is checked first (its command on PATH, or `dpkg -s`), so a second run does nothing. Missing ones
# are installed with apt-get (through sudo when not root), without recommended packages. Where that is not
# possible (no apt-get, or neither root nor sudo) the script names the packages to install and exits 1.
# To add a package, add a `need` line to the right branch below.
set -euo pipefail

MISSING=()

# need PACKAGE [COMMAND]: queue PACKAGE unless COMMAND is on PATH or dpkg knows PACKAGE as installed.
need() {
  local package="$1" command="${2:-}"
  if [ -n "$command" ] && command -v "$command" >/dev/null 2>&1; then
    return 0
  fi
  if command -v dpkg >/dev/null 2>&1 && dpkg -s "$package" 2>/dev/null | grep -q '^Status: install ok installed'; then
    return 0
  fi
  MISSING+=("$package")
}

# Features (run time): espeak-ng speaks the synthetic speech corpus (lmforge speech synth; tests/test_speech_ctc.py).
# (Reading and resampling audio needs no system package: soundfile and soxr bring their own libraries.)
need espeak-ng espeak-ng

if [ "${1:-}" = "test" ]; then
  # tests/test_serve_browser.py drives Debian's chromium headless through selenium with Debian's chromedriver
  need chromium chromium
  need chromium-driver chromedriver
elif [ -n "${1:-}" ]; then
  echo "usage: bash scripts/system-packages.sh [test]" >&2
  exit 2
fi

if [ "${#MISSING[@]}" -eq 0 ]; then
  echo "system-packages: nothing to install"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "system-packages: no apt-get here; install these packages (or your system's equivalents): ${MISSING[*]}" >&2
  exit 1
fi
if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null 2>&1; then
  SUDO=(sudo)
else
  echo "system-packages: not root and no sudo; as root, run: apt-get install ${MISSING[*]}" >&2
  exit 1
fi

echo "system-packages: installing ${MISSING[*]}"
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${MISSING[@]}"
