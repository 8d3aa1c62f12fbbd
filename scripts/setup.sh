#!/usr/bin/env bash
# Set up seqrank on a fresh Debian/Ubuntu machine: system packages (when root), a venv, and the Python packages from
# the hash-pinned locks in scripts/lock/ (refresh: bash scripts/lock.sh), so CI tests exactly what the image ships.
# torch is the CPU build pinned in scripts/lock/torch-cpu.txt. SEQRANK_TORCH (a pip requirement, e.g. torch==2.14.1)
# installs another torch instead; that leaves the lock for torch only (and whatever torch itself then requires).
# SEQRANK_VENV picks the venv (default .venv); running again on an existing venv installs only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SEQRANK_VENV:-.venv}"
TORCH_SPEC="${SEQRANK_TORCH:-}"
LOCK=scripts/lock
# The locks target CPython 3.11.
PYTHON="${SEQRANK_PYTHON:-$(command -v python3.11 || command -v python3)}"

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  # redis-server: the Redis history-store tests; prometheus: the metrics/alert-rule tests; g++ (and, for Debian's own
  # python3, its headers): hnswlib ships no wheels, so pip builds it; python3-venv: Debian's python3 needs it for venvs.
  packages="redis-server prometheus"
  case "$PYTHON" in /usr/bin/*) packages="$packages python3-venv python3-dev" ;; esac
  missing=""
  for pkg in $packages; do dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"; done
  command -v g++ >/dev/null || missing="$missing g++"
  if [ -n "$missing" ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
install() { "$VENV/bin/python" -m pip install -q --require-hashes "$@"; }
# pip and the build tools first; then the rest builds against them (--no-build-isolation), hash-checked as well.
install -r "$LOCK/build.txt"
if [ -z "$TORCH_SPEC" ]; then
  install --no-build-isolation -r "$LOCK/dev.txt" -r "$LOCK/torch-cpu.txt"
else
  install --no-build-isolation -r "$LOCK/dev.txt"
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
fi
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
echo "seqrank installed in $VENV (activate with: . $VENV/bin/activate)"
