#!/usr/bin/env bash
# Set up seqrank on a fresh Debian/Ubuntu machine: system packages (when root), a venv, and the Python packages.
# torch is pinned first so pip takes the CPU wheel instead of a multi-GB CUDA build; newer torch also works.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SEQRANK_VENV:-.venv}"
TORCH_SPEC="${SEQRANK_TORCH:-torch==2.13.0}"

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  # redis-server: the Redis history-store tests; prometheus: the metrics/alert-rule tests.
  missing=""
  for pkg in redis-server prometheus; do dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"; done
  if [ -n "$missing" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
fi

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
"$VENV/bin/python" -m pip install -q -e ".[dev,bench]"
echo "seqrank installed in $VENV (activate with: . $VENV/bin/activate)"
