#!/usr/bin/env bash
# The tiny-world design-space study (issue 7): the paper's 20 adapter position pairs x 2 seeds trained on the tiny base
# model (configs/sweeps/tiny-world-position-pairs.yaml; SPEC=configs/sweeps/tiny-world-study-v3.yaml: x 4 subjects x 3
# seeds on the v3 model), each run evaluated with the tiny world's probe (the
# `tinyworld` metric backend) on configs/sweeps/tiny-world-prompts.txt, then a Type II ANOVA of the metrics on din
# and dout (seed and subject as blocks, their interactions where the design has the df, Holm over the study, a plan
# for detecting PLAN between two design points), written to docs/tiny-world-study/ (report.md, findings.md, PNGs,
# tables, results.csv), or to a fresh folder beside it (docs/tiny-world-study-2, ...) when that exists: replace the
# old folder's generated files by it (keeping its README.md) to update the docs.
#
# Several subjects: a SPEC whose `subject` factor names each subject's folder, class word and class-image folder
#   subject:
#     levels:
#       star: {data_root: assets/tiny-world/sks-star, class_word: star, reg_data_root: outputs/tiny-world-study/class-star}
#       heart: {data_root: assets/tiny-world/<folder>, class_word: heart, reg_data_root: outputs/tiny-world-study/class-heart}
# (and seed levels 0, 1, 2 ...); the analysis takes subject as a block without further settings.
#
#   scripts/tiny_world_study.sh                        # runs from any folder; rerun to continue after a stop
#   PACK=1 scripts/tiny_world_study.sh --parallel 2    # one run per process, two at a time (extra arguments go to
#                                                      # scripts/sweep.py)
#   PYTHON="nice -n 15 .venv/bin/python" SWEEP_DIR=/tmp/sw REPORT_DIR=/tmp/report scripts/tiny_world_study.sh
#   SPEC=configs/sweeps/tiny-world-forms.yaml FACTORS=form SWEEP_DIR=outputs/tiny-world-forms/sweep \
#     REPORT_DIR=docs/tiny-world-forms scripts/tiny_world_study.sh     # the forms at one parameter budget
#
# Resumable: the sweep skips finished runs and retries failed ones, evaluation skips runs already in results.csv, and
# the report is redrawn from the whole table. The runs train packed (scripts/sweep.py --pack: one process, their UNet
# calls in one batch; bench/RESULTS.md has the speed-up) and are evaluated packed (scripts/evaluate.py --pack), which
# gives the numbers of unpacked runs (README, "Packed training"). Settings (environment): PYTHON (default python),
# SPEC, FACTORS (the sweep's factors the ANOVA tests, default "din dout"), PROMPTS, SWEEP_DIR (default
# outputs/tiny-world-study/sweep), REPORT_DIR (default docs/tiny-world-study), EVAL_SEEDS, PLAN (default 0.015, the
# difference the next study should detect), PACK (runs per training process, default auto; 1: one run per process),
# EVAL_PACK (runs sampled together, default 8; 1: one at a time); relative paths are taken from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."  # the sweep file's relative paths are taken from the repository root

PYTHON=${PYTHON:-python}
SPEC=${SPEC:-configs/sweeps/tiny-world-position-pairs.yaml}
FACTORS=${FACTORS:-din dout}
PROMPTS=${PROMPTS:-configs/sweeps/tiny-world-prompts.txt}
SWEEP_DIR=${SWEEP_DIR:-outputs/tiny-world-study/sweep}
REPORT_DIR=${REPORT_DIR:-docs/tiny-world-study}
EVAL_SEEDS=${EVAL_SEEDS:-0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15}
PLAN=${PLAN:-0.015}
PACK=${PACK:-auto}
EVAL_PACK=${EVAL_PACK:-8}

run() { echo "+ $*" >&2; "$@"; }

# The runs and the class images they share belong to one base model: each folder keeps its hash (a hidden file, so
# the class-image folder still holds only images) and a folder made from another base model is refused.
base_model=$(sed -n 's/^ *- *actual_resume=\([^ #]*\).*/\1/p' "$SPEC")
# every class-image folder: the override (reg_data_root=DIR) or a subject level's setting (reg_data_root: DIR)
class_images=$(grep -v '^ *#' "$SPEC" | grep -o 'reg_data_root[=:] *[^ ,}#]*' | sed 's/reg_data_root[=:] *//' | sort -u)
[[ -n $base_model ]] || { echo "error: $SPEC has no 'actual_resume=FILE' override (the base model)" >&2; exit 1; }
[[ -f $base_model ]] || { echo "error: the base model '$base_model' of $SPEC does not exist: train it first, or" \
                               "name another in its actual_resume override" >&2; exit 1; }
digest=$(sha256sum "$base_model" | cut -d' ' -f1)
# shellcheck disable=SC2086  # one folder per line, no spaces in these paths
for dir in "$SWEEP_DIR" $class_images; do
  stamp=$dir/.base-model.sha256
  if [[ -f $stamp && $(cat "$stamp") != "$digest" ]]; then
    echo "error: '$dir' was made from another base model than $base_model: remove $SWEEP_DIR" \
         "${class_images:+and $(echo $class_images) }to start over, or choose other folders" >&2
    exit 1
  fi
done
# shellcheck disable=SC2086
for dir in "$SWEEP_DIR" $class_images; do
  mkdir -p "$dir" && echo "$digest" > "$dir/.base-model.sha256"
done

# $PYTHON unquoted: it may be a command with arguments (nice -n 15 python).
pack=()
[[ $PACK == 1 ]] || pack=(--pack "$PACK")
run $PYTHON scripts/sweep.py "$SPEC" --sweep_dir "$SWEEP_DIR" "${pack[@]}" "$@"
run $PYTHON scripts/evaluate.py "$SWEEP_DIR" --metric tinyworld --prompts "$PROMPTS" --seeds "$EVAL_SEEDS" \
    --steps 25 --scale 5.0 --batch_size 64 --pack "$EVAL_PACK"
# anova.py never overwrites: when REPORT_DIR exists it writes a fresh folder beside it (REPORT_DIR-2, ...) and says
# which; the table goes into that folder too.
echo "+ $PYTHON scripts/anova.py $SWEEP_DIR/results.csv --factors $FACTORS --plan $PLAN --out $REPORT_DIR" >&2
# shellcheck disable=SC2086  # FACTORS is a list of words
report_md=$($PYTHON scripts/anova.py "$SWEEP_DIR/results.csv" --factors $FACTORS --plan "$PLAN" --out "$REPORT_DIR" |
            tee /dev/stderr | sed -n 's/^report in //p')
[[ -n $report_md && -f $report_md ]] || { echo "error: scripts/anova.py did not say where it wrote the report" >&2; exit 1; }
run cp -n "$SWEEP_DIR/results.csv" "$(dirname "$report_md")/results.csv"
echo "report: $report_md"
