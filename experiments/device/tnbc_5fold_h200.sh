#!/usr/bin/env bash
# TNBC 5-fold cross-validation of the paper model (Table 1's TNBC row) on one NVIDIA H200, sized to
# fit one 10-minute device call. Run from anywhere; results go to $OUT:
#
#   bash experiments/device/tnbc_5fold_h200.sh          # with the run tool: timeout_s=600
#   STEPS=600 BUDGET_S=540 bash experiments/device/tnbc_5fold_h200.sh  # the paper's 40 epochs
#
# Writes under $OUT: table1.md / table1.json (our mean +- std beside the paper's), per fold
# fold_k/{eval_test_image.json,metrics.jsonl,config.json,cv_fold_runs.jsonl}, cv_summary.{md,json},
# nvidia-smi before / during (every 5 s) / after, timing.txt (seconds per phase), reproduce.log,
# pip.log, env.txt. Checkpoints (~350 MB each) stay on the machine (they would not come back).
#
# The machine has jax, flax, optax, orbax-checkpoint and scikit-image but NOT ml-collections,
# tensorflow-datasets, array-record (and their small dependencies): they are installed offline from
# wheels/ at the repository root (WHEELS_DIR to change). Fill it on the dev machine, for the
# device's Python (check `python3 -V` there; 3.11 assumed below) and platform:
#
#   pip download -d wheels --no-deps --only-binary=:all: --python-version 3.11 \
#       --platform manylinux2014_x86_64 \
#       'ml-collections>=1.1,<2' 'tensorflow-datasets>=4.9.10,<4.10' 'array-record>=0.8,<0.9' \
#       dm-tree immutabledict tensorflow-metadata googleapis-common-protos termcolor toml wrapt \
#       six roifile importlib_resources zipp tqdm
#   pip wheel -w wheels --no-deps promise    # promise ships only an sdist (pure Python)
#
# (--no-deps on purpose: those are the modules a run imports beyond what the machine has, measured
# with a TNBC smoke run; tensorflow-datasets' declared pyarrow / simple-parsing / requests are not
# imported by this project and are left out, ~60 MB less. The install below uses --no-deps too and
# then checks the imports.) wheels/ must travel with the working tree: leave it untracked and not
# git-ignored, or git-ignore it and pass carry=["wheels"] to the run tool (64 MiB in all).
#
# Sizing (one call: 600 s; this script stops training BUDGET_S=480 s after it began, so that the
# table and the copies are written in time; a stopped fold checkpoints, the table shows the finished
# folds, and a rerun on a machine that kept ROOT would resume):
#   paper schedule: 40 epochs x 15 steps (30 training images x 4 crops of 256 / batch 8) = 600
#     steps per fold; one train step of the paper model (ResNet-50, FPN 256, seg stride 2, CAMs,
#     batch 8 at 256) = 4.6 TFLOP (experiments/benchmarks/model_cpu.txt).
#   H200 bf16 dense peak ~990 TFLOP/s; this small-batch conv net will not reach the 200-400 TFLOP/s
#     of large matmuls: assume 100 TFLOP/s (~10% of peak) -> 0.046 s per step (0.023 s at 200).
#     The input pipeline is not the limit: 13 ms per TNBC batch on one busy CPU core, measured.
#   fixed costs, pessimistic: wheels 15 s + TFDS preparation of TNBC 10 s + 5 fold processes x 15 s
#     (start, imports, CUDA) 75 s + compiles 180 s (train step ~90 s and eval forward ~30 s on
#     fold 0; ~15 s a fold after, from the persistent compilation cache) + validation every 5
#     epochs and the test fold, ~3 s each, 5 x 5 x 3 = 75 s + checkpoints ~40 s + final reports
#     25 s = ~420 s.
#   STEPS=250 per fold (16.7 epochs, 42% of the paper's 600; warm-up 100, cosine decay to 250):
#     5 x 250 x 0.046 = 58 s of steps (29 s at 200 TFLOP/s) -> ~478 s in all at the pessimistic
#     figures, within BUDGET_S; ~5-6 min if the compiles take what they usually do. STEPS=600 adds
#     80-160 s of steps: try it (with BUDGET_S=540) when a first run's timing.txt shows the room.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
: "${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT"

PYTHON="${PYTHON:-python3}"
STEPS="${STEPS:-250}"
BUDGET_S="${BUDGET_S:-480}"  # reproduce.py gets SIGTERM this many seconds after the script began
FOLDS="${FOLDS:-0,1,2,3,4}"
WHEELS_DIR="${WHEELS_DIR:-$REPO/wheels}"
ROOT="${ROOT:-/tmp/donuseg_reproduce}"  # fold dirs with checkpoints: not under $OUT
export DONUSEG_TFDS_DIR="${DONUSEG_TFDS_DIR:-/tmp/donuseg_tfds}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/donuseg_jax_cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [[ -z "${DONUSEG_DATA_ROOT:-}" ]]; then
  for candidate in "$REPO/shared/data" "$REPO/../shared/data"; do
    if [[ -d "$candidate/tnbc" ]]; then DONUSEG_DATA_ROOT="$(cd "$candidate" && pwd)"; break; fi
  done
fi
export DONUSEG_DATA_ROOT="${DONUSEG_DATA_ROOT:-$REPO/shared/data}"

START=$(date +%s)
TIMING="$OUT/timing.txt"
phase() {  # phase NAME: seconds since the start, appended to timing.txt
  echo "$1 $(( $(date +%s) - START )) s" | tee -a "$TIMING"
}
echo "start $(date -u +%FT%TZ) steps=$STEPS folds=$FOLDS budget=${BUDGET_S}s" > "$TIMING"

{
  echo "repo: $REPO"; echo "git: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo '?')"
  echo "python: $($PYTHON -V 2>&1)"; echo "DONUSEG_DATA_ROOT=$DONUSEG_DATA_ROOT"
  echo "DONUSEG_TFDS_DIR=$DONUSEG_TFDS_DIR"
  echo "JAX_COMPILATION_CACHE_DIR=$JAX_COMPILATION_CACHE_DIR"
  nproc; free -g
} > "$OUT/env.txt" 2>&1
nvidia-smi > "$OUT/nvidia_smi_before.txt" 2>&1 || true

if [[ ! -d "$DONUSEG_DATA_ROOT/tnbc/TNBC_NucleiSegmentation" ]]; then
  echo "error: TNBC not found under DONUSEG_DATA_ROOT=$DONUSEG_DATA_ROOT" | tee -a "$TIMING" >&2
  exit 2
fi

# --------------------------------------------------------------------- offline dependencies
IMPORTS='import ml_collections, tensorflow_datasets, array_record, roifile, tifffile, tqdm'
IMPORTS+=', importlib_resources, immutabledict, promise, toml, termcolor, tree'
if ! $PYTHON -c "$IMPORTS" > /dev/null 2>&1; then
  if [[ ! -d "$WHEELS_DIR" ]]; then
    echo "error: missing modules and no $WHEELS_DIR (see the top comment)" | tee -a "$TIMING" >&2
    exit 2
  fi
  PIP=("$PYTHON" -m pip install --no-index --find-links "$WHEELS_DIR" --no-deps --quiet)
  # Only wheels of distributions the machine lacks: never replace its jax / numpy / protobuf.
  mapfile -t TO_INSTALL < <("$PYTHON" - "$WHEELS_DIR" <<'PY'
import importlib.metadata, pathlib, sys
for wheel in sorted(pathlib.Path(sys.argv[1]).glob('*.whl')):
  try:
    importlib.metadata.distribution(wheel.name.split('-')[0])
  except importlib.metadata.PackageNotFoundError:
    print(wheel)
PY
  )
  echo "installing ${#TO_INSTALL[@]} wheel(s): ${TO_INSTALL[*]##*/}" >> "$OUT/pip.log"
  if (( ${#TO_INSTALL[@]} )); then
    "${PIP[@]}" "${TO_INSTALL[@]}" >> "$OUT/pip.log" 2>&1 \
      || "${PIP[@]}" --user "${TO_INSTALL[@]}" >> "$OUT/pip.log" 2>&1 \
      || "${PIP[@]}" --break-system-packages "${TO_INSTALL[@]}" >> "$OUT/pip.log" 2>&1 \
      || true  # the import check below decides
  fi
  $PYTHON -m pip check >> "$OUT/pip.log" 2>&1 || true  # a record only: --no-deps on purpose
  if ! $PYTHON -c "$IMPORTS" >> "$OUT/pip.log" 2>&1; then
    echo "error: imports still fail after installing $WHEELS_DIR (pip.log)" | tee -a "$TIMING" >&2
    exit 2
  fi
fi
$PYTHON -c 'import jax; print(jax.__version__, jax.devices())' >> "$OUT/env.txt" 2>&1
phase dependencies

# ---------------------------------------------------------------------------------- the run
ARGS=(table1 --root="$ROOT" --datasets=tnbc --folds="$FOLDS" --max_steps="$STEPS"
      --config.model.dtype=bfloat16 --config.eval.write_overlays=1)
if ! $PYTHON experiments/reproduce.py "${ARGS[@]}" --dry_run > "$OUT/dry_run.txt" 2>&1; then
  echo "error: reproduce.py refused the flags (see dry_run.txt)" | tee -a "$TIMING" >&2
  exit 2
fi
phase dry_run

nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw --format=csv -l 5 \
  > "$OUT/nvidia_smi_during.csv" 2>&1 &
SMI_PID=$!

RUN_S=$(( BUDGET_S - ($(date +%s) - START) ))
(( RUN_S >= 60 )) || RUN_S=60
echo "reproduce.py budget: ${RUN_S} s" >> "$TIMING"
set +e
timeout --signal=TERM --kill-after=30 "$RUN_S" \
  $PYTHON experiments/reproduce.py "${ARGS[@]}" > "$OUT/reproduce.log" 2>&1
STATUS=$?
set -e
phase "reproduce (exit $STATUS; 124 = stopped at BUDGET_S, rerun to resume)"
kill "$SMI_PID" 2> /dev/null || true
wait "$SMI_PID" 2> /dev/null || true

# A run stopped hard (kill-after) left no table: write it from the finished folds.
if [[ ! -f "$ROOT/table1.md" ]] || (( STATUS == 137 )); then
  $PYTHON experiments/reproduce.py "${ARGS[@]}" --aggregate_only >> "$OUT/reproduce.log" 2>&1 \
    || true
  phase aggregate_only
fi
nvidia-smi > "$OUT/nvidia_smi_after.txt" 2>&1 || true

# ------------------------------------------------------------------------------ the results
cp "$ROOT"/table1.md "$ROOT"/table1.json "$OUT"/ 2> /dev/null || true
ROW_DIR="$ROOT/tnbc/donuseg"
cp "$ROW_DIR"/cv_summary.md "$ROW_DIR"/cv_summary.json "$OUT"/ 2> /dev/null || true
for fold_dir in "$ROW_DIR"/fold_*; do
  [[ -d "$fold_dir" ]] || continue
  dest="$OUT/$(basename "$fold_dir")"
  mkdir -p "$dest"
  for name in eval_test_image.json metrics.jsonl config.json cv_fold_runs.jsonl; do
    cp "$fold_dir/$name" "$dest/" 2> /dev/null || true
  done
  cp "$fold_dir"/overlays/*.png "$dest/" 2> /dev/null || true
done
phase done
cat "$OUT/table1.md" 2> /dev/null || tail -40 "$OUT/reproduce.log"
exit "$STATUS"
