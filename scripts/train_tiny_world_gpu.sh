#!/usr/bin/env bash
# Train the v3 tiny base model (configs/tiny-world/train-base-v3-gpu.yaml: f = 4 autoencoder, 16x16 latents, min-SNR-gamma
# loss) into a fresh folder and measure it with scripts/tiny_world_report.py, in one command, writing what comes back
# under $OUT. Made for a lent GPU machine (torch there; no omegaconf, ftfy or open_clip, no network), and runs anywhere.
#
#   bash scripts/train_tiny_world_gpu.sh wheels          # here, once: bench/gpu_run.sh wheels (the missing packages
#                                                        # as wheels in .whl/, and a check that tree + wheels fit 64 MiB)
#   device run: carry [".whl"], timeout_s 600, command "bash scripts/train_tiny_world_gpu.sh there"
#   bash scripts/train_tiny_world_gpu.sh join DIR M.safetensors  # here: the model from the returned parts in DIR,
#                                                                # checked against their SHA256SUMS
#
# `there` (also `run`, the same without installing wheels) takes KEY=VALUE overrides of the training config after it
# (tests/test_tiny_world.py runs it with tiny step counts on the CPU). Environment:
#   RUN            the fresh folder to train in (default logs/tiny-base-v3-<date>); it must not exist
#   REPORT_ARGS    arguments of tiny_world_report.py (default "--no_dreambooth": the probe, the autoencoder and the
#                  base model's quality, ~1.5 min; the DreamBooth runs, 3 per seed, would not fit the 10-minute
#                  command: run them on the CPU with the joined model)
#   TRAIN_TIMEOUT  seconds the training may take before it is stopped (default 480; the recipe estimates ~6 min)
#   SKIP_REPORT=1  train and package only (the CPU smoke test: the report's fixed cost is minutes on 2 cores)
#   OUT            where the results go (default $RUN/out): train.log, report.log, report.tar.gz (Markdown, JSON,
#                  figures), the model in parts under 16 MiB (model.safetensors.part-aa, -ab, ...), SHA256SUMS;
#                  at most 8 files, as the device machine returns
# The shipped model (models/ldm/tiny-sd-v1/) and the demo config are not touched: v3 ships once it is measured.
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=configs/tiny-world/train-base-v3-gpu.yaml
MODEL_CONFIG=configs/tiny-world/tiny-sd-v1-f4.yaml
PYTHON=${PYTHON:-python3}

train_and_report() {
  RUN=${RUN:-logs/tiny-base-v3-$(date +%Y%m%d-%H%M%S)}
  [ ! -e "$RUN" ] || { echo "error: RUN '$RUN' exists; nothing is overwritten: choose a new folder" >&2; exit 2; }
  mkdir -p "$RUN"
  OUT=${OUT:-$RUN/out}
  mkdir -p "$OUT"
  OUT=$(cd "$OUT" && pwd)
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
  {
    echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%FT%TZ), $(nproc) cores"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    echo "config $CONFIG, overrides: $*"
  } >"$OUT/train.log" 2>&1
  status=0
  start=$(date +%s)
  timeout --signal=INT "${TRAIN_TIMEOUT:-480}" "$PYTHON" scripts/train_tiny_base.py --config "$CONFIG" \
    "work_dir=$RUN/work" "out=$RUN/model.safetensors" "$@" >>"$OUT/train.log" 2>&1 || status=$?
  echo "training: exit $status after $(($(date +%s) - start)) s" | tee -a "$OUT/train.log"
  if [ "$status" -ne 0 ]; then
    tail -n 30 "$OUT/train.log"
    exit "$status"
  fi
  split -b 15M -d -a 2 "$RUN/model.safetensors" "$OUT/model.safetensors.part-"
  (cd "$RUN" && sha256sum model.safetensors) >"$OUT/SHA256SUMS"
  [ "${SKIP_REPORT:-0}" = 0 ] || exit 0
  start=$(date +%s)
  # shellcheck disable=SC2086  # REPORT_ARGS is a list of arguments
  "$PYTHON" scripts/tiny_world_report.py --outdir "$RUN/report" --config "$MODEL_CONFIG" \
    --ckpt "$RUN/model.safetensors" ${REPORT_ARGS:---no_dreambooth} >"$OUT/report.log" 2>&1 || status=$?
  echo "report: exit $status after $(($(date +%s) - start)) s" | tee -a "$OUT/report.log"
  [ ! -d "$RUN/report" ] || (cd "$RUN/report" \
    && find . -maxdepth 1 -type f \( -name '*.md' -o -name '*.json' -o -name '*.png' \) -print0 \
    | tar -czf "$OUT/report.tar.gz" --null -T -)
  cat "$RUN/report/tiny-world-report.md" 2>/dev/null || tail -n 30 "$OUT/report.log"
  exit "$status"
}

case "${1:-}" in
  wheels)  # the GPU check's wheels (a superset of what training needs): one place that knows the device image
    exec bash bench/gpu_run.sh wheels
    ;;
  there)
    shift
    ls .whl/*.whl >/dev/null 2>&1 || { echo "error: no wheels in .whl/: run 'wheels' here and carry .whl" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
    PYTHON=python3 train_and_report "$@"
    ;;
  run)
    shift
    train_and_report "$@"
    ;;
  join)
    dir=${2:?usage: join DIR MODEL.safetensors (DIR: the returned files)}
    model=${3:?usage: join DIR MODEL.safetensors (DIR: the returned files)}
    [ ! -e "$model" ] || { echo "error: $model exists; nothing is overwritten: choose a new path" >&2; exit 2; }
    cat "$dir"/model.safetensors.part-* >"$model.tmp"
    expected=$(awk '{print $1}' "$dir/SHA256SUMS")
    actual=$(sha256sum "$model.tmp" | awk '{print $1}')
    if [ "$expected" != "$actual" ]; then
      rm -f "$model.tmp"
      echo "error: the parts do not add up to the model (sha256 $actual, expected $expected)" >&2
      exit 1
    fi
    mv "$model.tmp" "$model"
    echo "$model: sha256 $actual, as trained"
    ;;
  *)
    sed -n '2,22p' "$0"
    exit 2
    ;;
esac
