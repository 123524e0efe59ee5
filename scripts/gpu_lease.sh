#!/usr/bin/env bash
# A whole GPU lease in ONE device call: the training campaign, then the serving check.
#
#   bash scripts/gpu_lease.sh OUT_DIR [--train-s 420] [--check-s 150] [--dry-run]
#        [campaign options...]
#
# Why one call: a machine stays warm only 30 s after a call, and a fresh start costs minutes
# of the 15-minute lease, so a second call is only cheap when it follows at once. One call of
# at most 10 minutes holds both: the campaign (scripts/gpu_campaign.sh, its 8 files in OUT_DIR)
# and bench/gpu_check.sh with BUDGET_S=--check-s, whose files come back as one serving.tar
# together with the campaign's campaign.log (8 files in all, the most a call returns).
# Carry .whl, .pack and .gpu.
#   run(command="bash scripts/gpu_lease.sh $OUT", carry=[".whl", ".pack", ".gpu"], timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
    sed -n '2,4p' "$0"
    exit 2
fi
OUT_DIR=$1
shift
TRAIN_S=420
CHECK_S=150
REST=()
while [ $# -gt 0 ]; do
    case $1 in
        --train-s) TRAIN_S=$2; shift 2 ;;
        --check-s) CHECK_S=$2; shift 2 ;;
        --dry-run) REST+=("$1"); export DEVICE=cpu QUICK=1; shift ;;  # a CPU rehearsal
        *) REST+=("$1"); shift ;;
    esac
done
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then export PYTHON=.venv/bin/python; fi
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
bash scripts/gpu_campaign.sh "$OUT_DIR" --budget-s "$TRAIN_S" "${REST[@]}"
rc_train=$?
serving=$(mktemp -d "${TMPDIR:-/tmp}/serving.XXXXXX")
OUT="$serving" BUDGET_S="$CHECK_S" timeout -k 5 "$CHECK_S" bash bench/gpu_check.sh >/dev/null 2>&1
rc_check=$?
grep '^\[gpu_check\]' "$serving/gpu_check.log" 2>/dev/null | tail -n 8
# The campaign's log travels inside serving.tar: six model tars, summary.json and this tar
# are the eight files a call brings back.
[ -f "$OUT_DIR/campaign.log" ] && mv "$OUT_DIR/campaign.log" "$serving/campaign.log"
tar -C "$serving" -cf "$OUT_DIR/serving.tar" . && rm -rf "$serving"
echo "[lease] campaign rc $rc_train, serving check rc $rc_check; $(ls "$OUT_DIR" | tr '\n' ' ')"
[ "$rc_train" = 0 ] || exit "$rc_train"
exit "$rc_check"
