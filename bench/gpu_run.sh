#!/usr/bin/env bash
# The GPU check on a lent device machine (torch, Lightning, transformers, peft there; no omegaconf, diffusers or
# open_clip_torch, and no network), in two steps:
#
#   bash bench/gpu_run.sh wheels    # here: those packages as wheels in .whl/ (ignored by git), at the versions this
#                                   # checkout's Python has, and a check that the tree + wheels fit the 64 MiB limit
#   bash bench/gpu_run.sh command   # prints the device tool's `run` call: carry [".whl"], timeout_s 600, command
#                                   #   bash bench/gpu_run.sh there
#   bash bench/gpu_run.sh there     # (on the device machine) install the wheels into /tmp/site, run
#                                   # bench/gpu_check.py (<= 8 min), copy bench/RESULTS.md and the log to $OUT
#
# Afterwards, here: copy the returned RESULTS.md over bench/RESULTS.md (it is this file plus the new section),
# review the rows and commit them.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
PACKAGES=(omegaconf diffusers open_clip_torch ftfy wcwidth)  # what the device image lacks (KINDS.md's package list)
LIMIT=$((64 * 1024 * 1024))

version() { "$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

travelling_bytes() {  # tracked + untracked-not-ignored files, plus the carried .whl/
  { git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null || true
    find .whl -type f -exec stat -c %s {} + 2>/dev/null || true; } | awk '{s += $1} END {print s + 0}'
}

case "${1:-}" in
  wheels)
    rm -rf .whl && mkdir -p .whl
    specs=()
    for p in "${PACKAGES[@]}"; do specs+=("$p==$(version "$p")"); done
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform any -d .whl "${specs[@]}"
    ls -l .whl
    bytes=$(travelling_bytes)
    echo "travels: $((bytes / 1024 / 1024)) MiB of the 64 MiB limit (tree + .whl)"
    [ "$bytes" -le "$LIMIT" ] || { echo "error: over the limit: ignore or move large untracked files"; exit 1; }
    ;;
  command)
    echo 'run(carry=[".whl"], timeout_s=600, command="bash bench/gpu_run.sh there")'
    ;;
  there)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    status=0
    python3 bench/gpu_check.py --device cuda --size sd --budget "${BUDGET:-420}" 2>&1 | tee "${OUT:-.}/gpu_check.log" \
      || status=$?
    [ -z "${OUT:-}" ] || cp bench/RESULTS.md "$OUT/RESULTS.md"
    exit "$status"
    ;;
  *)
    sed -n '2,15p' "$0"
    exit 2
    ;;
esac
