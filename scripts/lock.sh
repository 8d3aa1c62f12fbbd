#!/usr/bin/env bash
# Refresh the hash-pinned lock files in scripts/lock/ from pyproject.toml and the *.in files beside them
# (docs/operations.md, "Reproducible image and lock files"). Run it after any change to pyproject.toml's dependencies
# or extras:
#   bash scripts/lock.sh                      keep every existing pin; add or drop only what the inputs changed
#   bash scripts/lock.sh --upgrade            move every package to its newest release
#   bash scripts/lock.sh --upgrade-package X  move only X (repeatable)
# The locks target CPython 3.11 on manylinux x86_64 (the image and CI), whatever machine runs this:
#   runtime.txt      pyproject.toml's dependencies less torch; torch's own dependencies are in it      (the image)
#   torch-VARIANT.txt  torch as torch-VARIANT.in pins it (the one place its version is set), plus what that build
#                    alone needs: cpu (the image's default and scripts/setup.sh), cu130 (PyPI's CUDA 13.0 build)
#   build.txt        pip and the build tools, installed first                        (the image, scripts/setup.sh)
#   dev.txt          runtime.txt's pins plus the dev and bench extras, less torch                (scripts/setup.sh)
#   uv.txt           the locking tool itself
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=scripts/lock
PYPI=https://pypi.org/simple
# The +cpu wheel is not on PyPI. Where /opt/wheels holds a copy of the PyTorch CPU index's wheel (the same file, the
# same sha256) it is used; elsewhere the index itself.
cpu_wheel=$(sed -nE 's/^torch==([^ ]+)$/torch-\1-/p' "$LOCK/torch-cpu.in")
if compgen -G "/opt/wheels/${cpu_wheel}*.whl" >/dev/null; then
  cpu_source=(--find-links /opt/wheels)
else
  cpu_source=(--extra-index-url https://download.pytorch.org/whl/cpu)
fi

# uv from its own hash-checked lock, in a tool venv outside the project.
tools="${SEQRANK_LOCK_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/seqrank-lock-tools}"
uv_pin=$(grep -oE '^uv==[^ ]+' "$LOCK/uv.txt")
if ! [ -x "$tools/bin/uv" ] || [ "uv==$("$tools/bin/uv" --version | cut -d' ' -f2)" != "$uv_pin" ]; then
  python3 -m venv --clear "$tools"
  "$tools/bin/python" -m pip install -q --require-hashes --no-deps --only-binary=:all: -r "$LOCK/uv.txt"
fi
uv="$tools/bin/uv"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# --no-config and no UV_* environment: only the arguments below decide the result.
for var in $(env | grep -oE '^UV_[A-Z_]+' || true); do unset "$var"; done
compile() {
  "$uv" pip compile --no-config --quiet --no-progress --generate-hashes --python-version 3.11 \
    --python-platform x86_64-manylinux_2_28 --index-url "$PYPI" --custom-compile-command "bash scripts/lock.sh" "$@"
}
# A first line saying what the file is for (the input's first comment, or the text given); uv writes the rest.
label() {
  { echo "# seqrank lock: $2"; grep -v '^# seqrank lock: ' "$1"; } >"$work/labelled" && mv "$work/labelled" "$1"
}
about() { sed -nE '1s/^# //p' "$1"; }

compile "$LOCK/uv.in" -o "$LOCK/uv.txt" "$@"
label "$LOCK/uv.txt" "$(about "$LOCK/uv.in")"

compile pyproject.toml -c "$LOCK/torch-cpu.in" "${cpu_source[@]}" --no-emit-package=torch -o "$LOCK/runtime.txt" "$@"
label "$LOCK/runtime.txt" "the image's dependencies, pyproject.toml's less torch (in torch-VARIANT.txt)."

compile "$LOCK/build.in" -c "$LOCK/runtime.txt" -o "$LOCK/build.txt" "$@"
label "$LOCK/build.txt" "$(about "$LOCK/build.in")"

# A torch lock names only what runtime.txt does not, so that runtime.txt + torch-VARIANT.txt names each package once.
mapfile -t in_runtime < <(grep -oE '^[A-Za-z0-9._-]+==' "$LOCK/runtime.txt" | sed -E 's/^(.*)==$/--no-emit-package=\1/')
for input in "$LOCK"/torch-*.in; do
  variant=$(basename "$input" .in)
  source=()
  [ "$variant" = torch-cpu ] && source=("${cpu_source[@]}")
  compile "$input" -c "$LOCK/runtime.txt" "${source[@]}" "${in_runtime[@]}" -o "$LOCK/$variant.txt" "$@"
  label "$LOCK/$variant.txt" "$(about "$input")"
done

compile pyproject.toml --extra dev --extra bench -c "$LOCK/runtime.txt" -c "$LOCK/torch-cpu.in" "${cpu_source[@]}" \
  --no-emit-package=torch -o "$LOCK/dev.txt" "$@"
label "$LOCK/dev.txt" "runtime.txt's pins plus the dev and bench extras, less torch (torch-cpu.txt)."
echo "locked in $LOCK/: $(grep -cE '^[A-Za-z0-9]' "$LOCK/runtime.txt") runtime and $(grep -cE '^[A-Za-z0-9]' \
  "$LOCK/dev.txt") dev packages; $(cat "$LOCK"/torch-*.txt | grep -oE '^torch==[^ ]+' | tr '\n' ' ')"
