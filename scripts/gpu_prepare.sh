#!/usr/bin/env bash
# Run HERE (the CPU machine, in the checkout the session calls the device tool from) before a
# GPU session; again only when the tracked tree, the data or the wheels changed:
#   1. bench/gpu_prepare.sh: .whl/ (every package the campaign and the serving check import
#      that the GPU image lacks: python -m training.gpu.imports wheels) and .gpu/ (redis-server);
#   2. the data pack .pack/ (python -m training.gpu.pack): the training photos, fitted into the
#      room the travel budget leaves, the seven style images in slot order, VGG-16 in bf16;
#   3. the travel check of the lease's call: tracked + .whl + .gpu + .pack (+ .campaign)
#      <= 62 MiB (training.gpu.travel).
#
#   bash scripts/gpu_prepare.sh [--resume-from DIR [--resume-stages a,b]] [--no-serving]
#                               [--train DIR] [--shared DIR]
#
# --resume-from DIR: a campaign's results (its tars); their checkpoints (~5 MB per model) go
# into .campaign/, which then travels too (the pack gets that much less room), and the
# campaign resumes from them: name the stages to continue (then run the campaign with the
# same --stages). --no-serving: the lease trains only, .gpu stays here (3.7 MiB more room).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
SHARED=../shared
TRAIN=""
RESUME=""
RESUME_STAGES=""
SERVING=1
while [ $# -gt 0 ]; do
    case $1 in
        --resume-from) RESUME=$2; shift 2 ;;
        --resume-stages) RESUME_STAGES=$2; shift 2 ;;
        --no-serving) SERVING=0; shift ;;
        --train) TRAIN=$2; shift 2 ;;
        --shared) SHARED=$2; shift 2 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
TRAIN=${TRAIN:-$SHARED/data/train}
S=$SHARED/data/styles
# The multi-style net's slots, in the order of the CPU run (runs/multistyle.log).
STYLES=(
    "mosaic=$S/restricted_or_unclear/mosaic.jpg"
    "candy=$S/restricted_or_unclear/candy.jpg"
    "starry_night=$S/public_domain/starry_night.jpg"
    "wave=$S/public_domain/wave.jpg"
    "the_scream=$S/public_domain/the_scream.jpg"
    "udnie=$S/public_domain/udnie.jpg"
    "composition_vii=$S/public_domain/composition_vii.jpg"
)

bash bench/gpu_prepare.sh
CARRY=(.whl)
# the lease's one call (scripts/gpu_lease.sh) carries the serving check's redis too
[ "$SERVING" = 1 ] && CARRY+=(.gpu)
if [ -n "$RESUME" ]; then
    rm -rf .campaign
    "$PY" -m training.gpu.results restore "$RESUME" --work .campaign --stages "$RESUME_STAGES"
    CARRY+=(.campaign)
fi
room=$("$PY" -m training.gpu.travel room --carry "${CARRY[@]}") || {
    echo "only ${room} MiB left for the pack: make room in the tracked tree" >&2
    exit 1
}
echo "room for the pack: $room MiB"
"$PY" -m training.gpu.pack build --out .pack --train "$TRAIN" --styles "${STYLES[@]}" \
    --max-mib "$room" --min-photo-mib 4
"$PY" -m training.gpu.travel check --carry "${CARRY[@]}" .pack
echo "carry=$(printf '"%s", ' "${CARRY[@]}" .pack | sed 's/, $//;s/^/[/;s/$/]/')"
