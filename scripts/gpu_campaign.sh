#!/usr/bin/env bash
# The GPU campaign in one command: train the multi-style net and the x4 / x8 SR nets on a
# wall-clock budget, then pack each model into OUT_DIR (at most 8 files come back).
#
#   bash scripts/gpu_campaign.sh OUT_DIR [--budget-s S] [--dry-run] [--pack DIR] [--work DIR]
#        [--export-s S] [training options: --stages a,b --share NAME=F
#         --override NAME:--option=value --warm-zoo DIR|none --no-cuda-graphs ...]
#
# Each stage continues the net of its name in --warm-zoo (default model_zoo, the shipped zoo)
# where it fits (training/gpu/campaign.py); the log says which.
#
# On the device machine: run(command="bash scripts/gpu_campaign.sh $OUT --budget-s 540",
#   carry=[".whl", ".pack"], timeout_s=600)   (README, "Training on a GPU")
# Rehearsal here (tiny synthetic pack, tiny budgets, the same code, ~1-2 min on 2 cores):
#   bash scripts/gpu_campaign.sh /tmp/rehearsal --dry-run
#
# The command ends inside --budget-s whatever fails: training runs under `timeout` with the
# budget less the export's share, and the export always runs afterwards, exporting any model
# whose process was killed from its last checkpoint. Checkpoints stay in --work (.campaign),
# so a second command on the same machine resumes; on a fresh machine, restore them first
# (python -m training.gpu.results restore DIR) and carry .campaign too.
# CAMPAIGN_IMPORT_AUDIT=FILE records what the repository's modules import (the rehearsal's test
# checks it against what the GPU image has: training/gpu/imports.py).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
    sed -n '2,9p' "$0"
    exit 2
fi
OUT_DIR=$1
shift
BUDGET_S=""
DRY_RUN=0
PACK=.pack
WORK=""
EXPORT_S=""
TRAIN_ARGS=()
while [ $# -gt 0 ]; do
    case $1 in
        --budget-s) BUDGET_S=$2; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        --pack) PACK=$2; shift 2 ;;
        --work) WORK=$2; shift 2 ;;
        --export-s) EXPORT_S=$2; shift 2 ;;
        *) TRAIN_ARGS+=("$1"); shift ;;
    esac
done
started=$(date +%s)
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
exec > >(tee -a "$OUT_DIR/campaign.log") 2>&1
stamp() { echo "[campaign] $(( $(date +%s) - started ))s: $*"; }

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
MODE=()
if [ "$DRY_RUN" = 1 ]; then
    BUDGET_S=${BUDGET_S:-100}
    EXPORT_S=${EXPORT_S:-25}
    GRACE_S=10
    RETRY_MIN_S=5
    MODE=(--dry-run)
    # One thread: on a shared 2-core CPU, torch's threads spin against each other and tiny ops
    # run ~5x slower (measured: a rehearsal stage 42 s with 2 threads, 8 s with one).
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    if [ -z "$WORK" ]; then
        WORK=$(mktemp -d "${TMPDIR:-/tmp}/campaign-rehearsal.XXXXXX")
        trap 'rm -rf "$WORK"' EXIT
    fi
    PACK="$WORK/pack"
    # Every stage runs (at least one step each), checkpointing often: the rehearsal is about
    # exercising each path, not about the time it takes on a shared 2-core CPU.
    TRAIN_ARGS=(--device cpu --reserve-s 3 --min-stage-s 0 --log-every 2
                --checkpoint-every-s 2 --profile-s 0.5 "${TRAIN_ARGS[@]}")
else
    BUDGET_S=${BUDGET_S:-540}
    EXPORT_S=${EXPORT_S:-60}
    GRACE_S=15
    RETRY_MIN_S=60
    WORK=${WORK:-.campaign}
fi
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
stamp "budget ${BUDGET_S}s (export ${EXPORT_S}s), pack $PACK, work $WORK, python $PY"

# Wheels for what the GPU image lacks (pydantic: bench/gpu_prepare.sh), only where missing:
# a cp312 wheel must never shadow a working install (this CPU's venv is Python 3.11).
if ! "$PY" -c "import pydantic" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$WORK/site" .whl/*.whl && export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi

if [ -n "${CAMPAIGN_IMPORT_AUDIT:-}" ]; then
    RUN=("$PY" training/gpu/imports.py "$CAMPAIGN_IMPORT_AUDIT" -m)
else
    RUN=("$PY" -m)
fi
if [ "$DRY_RUN" = 1 ]; then
    stamp "building the rehearsal's tiny pack"
    timeout 120 "$PY" -m training.gpu.pack build --out "$PACK" --synthetic --max-mib 40 \
        --side 48 --vgg-preset 0 || { stamp "pack build failed"; exit 1; }
fi

# Training ends by its deadline (Python's startup counts against it) and is killed GRACE_S
# later if a stage overruns; the export gets the rest.
deadline=$(( started + BUDGET_S - EXPORT_S - GRACE_S ))
cap=$(( deadline + GRACE_S - $(date +%s) ))
rc_train=0
if [ $(( deadline - $(date +%s) )) -lt 10 ]; then
    stamp "no time left to train (budget ${BUDGET_S}s)"
    rc_train=1
else
    stamp "training until $(( deadline - started ))s (killed at $(( deadline + GRACE_S - started ))s)"
    timeout -k 10 "$cap" "${RUN[@]}" training.gpu.campaign train --pack "$PACK" --work "$WORK" \
        --deadline "$deadline" "${MODE[@]}" "${TRAIN_ARGS[@]}"
    rc_train=$?
    [ "$rc_train" = 0 ] || stamp "training exited with $rc_train (124: killed at its cap)"
    # A failed stage can leave its process unusable for the rest: on the 2026-12-04 lease a
    # failed CUDA graph capture left the CUDA generator in its capture state and all five
    # stages failed within 13 s. Once, while a minute is left: a fresh process without CUDA
    # graphs, every stage resuming from its checkpoint, shares of what is left.
    if [ "$rc_train" = 1 ] && [[ " ${TRAIN_ARGS[*]} " != *" --no-cuda-graphs "* ]] \
            && [ $(( deadline - $(date +%s) )) -ge "$RETRY_MIN_S" ]; then
        stamp "retrying the training in a fresh process, without CUDA graphs"
        cap=$(( deadline + GRACE_S - $(date +%s) ))
        timeout -k 10 "$cap" "${RUN[@]}" training.gpu.campaign train --pack "$PACK" \
            --work "$WORK" --deadline "$deadline" "${MODE[@]}" "${TRAIN_ARGS[@]}" --no-cuda-graphs
        rc_train=$?
        [ "$rc_train" = 0 ] || stamp "the retry exited with $rc_train"
    fi
fi

left=$(( BUDGET_S - ($(date +%s) - started) ))
[ "$left" -lt 15 ] && left=15
stamp "export (at most ${left}s)"
timeout -k 5 "$left" "${RUN[@]}" training.gpu.campaign export --pack "$PACK" --work "$WORK" \
    --out "$OUT_DIR" "${MODE[@]}"
rc_export=$?
stamp "done: rc train $rc_train, export $rc_export; $(ls "$OUT_DIR" | tr '\n' ' ')"
[ "$rc_export" = 0 ] || exit "$rc_export"
exit "$rc_train"
