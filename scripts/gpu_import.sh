#!/usr/bin/env bash
# Merge a GPU campaign's results into the zoo, then evaluate and redraw the gallery.
#
#   bash scripts/gpu_import.sh DIR [--zoo model_zoo] [--docs docs] [--runs runs/gpu]
#        [--quick] [--no-eval] [--sr-data DIR] [--held-out DIR] [--photos P...]
#        [--sr-photos P...]
#        [--public-slots] [--keep-fp32] [--force] [--gate-photos DIR]
#
# DIR holds what the campaign left in its OUT_DIR (the device tool's files_at). Steps:
#   1. python -m training.gpu.results import: each tar unpacked under --runs (sample grids and
#      loss curves to look at), weights checked against their entry's sha256; the gate
#      (evaluation/gate.py) compares each net with the zoo's net of its name on held-out photos
#      (--gate-photos, default evaluation/photos; --quick: at 64 px) and a worse one is refused
#      (the zoo keeps its own; --force merges it anyway); the others copied into the
#      zoo, entries upserted (hardware, iterations, wall time, data pack, lineage), weights
#      stored in fp16 where within 40 dB of fp32; a multi-style slot whose name another model
#      already offers stays private unless --public-slots; a teacher (summary.json's
#      "teachers", the wide net the shipped student is distilled from) is unpacked, not merged
#      (the distilled intermediate never comes back: the shipped student is its fine-tune);
#   2. python -m evaluation sr on the imported SR models (into the manifest's metrics and
#      DOCS/eval_sr_gpu.md; --quick: one image of Set5), LPIPS in fp32 as the stored numbers
#      of the others are, so that each factor's default upscaler is re-chosen from numbers
#      that compare (evaluation.sr.choose_default_upscalers);
#   3. python -m evaluation droplets on the imported styles that are public (private slots are
#      no styles of the zoo yet), into the metrics and DOCS/eval_droplets_gpu.md; --held-out
#      DIR: the photos (default: evaluation's held-out BSD100); --quick: one photo at 64 px.
#      The L-BFGS comparison (python -m evaluation style) is left to run by hand: ~2.5 min per
#      style and photo at 256 px on this CPU;
#   4. python -m evaluation gallery (DOCS/gallery_{styles,sr,controls}.jpg);
#   5. scripts/make_thumbnails.py for the zoo's styles.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
    sed -n '2,6p' "$0"
    exit 2
fi
DIR=$1
shift
PY=${PYTHON:-.venv/bin/python}
ZOO=model_zoo
DOCS=docs
RUNS=runs/gpu
QUICK=0
EVAL=1
SR_DATA=../shared/data/sr_bench
HELD_OUT=""
IMPORT_FLAGS=()
PHOTOS=()
SR_PHOTOS=()
while [ $# -gt 0 ]; do
    case $1 in
        --zoo) ZOO=$2; shift 2 ;;
        --docs) DOCS=$2; shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --no-eval) EVAL=0; shift ;;
        --sr-data) SR_DATA=$2; shift 2 ;;
        --held-out) HELD_OUT=$2; shift 2 ;;
        --public-slots|--keep-fp32|--force) IMPORT_FLAGS+=("$1"); shift ;;
        --gate-photos) IMPORT_FLAGS+=("$1" "$2"); shift 2 ;;
        --photos) shift; while [ $# -gt 0 ] && [[ "$1" != --* ]]; do PHOTOS+=("$1"); shift; done ;;
        --sr-photos) shift; while [ $# -gt 0 ] && [[ "$1" != --* ]]; do SR_PHOTOS+=("$1"); shift; done ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
[ "$QUICK" = 1 ] && IMPORT_FLAGS+=(--gate-style-size 64 --gate-droplet-size 64)
names=$(mktemp)
trap 'rm -f "$names"' EXIT
"$PY" -m training.gpu.results import "$DIR" --zoo "$ZOO" --runs "$RUNS" --names-out "$names" \
    "${IMPORT_FLAGS[@]}"
field() { "$PY" -c 'import json, sys; print(" ".join(json.load(open(sys.argv[1]))[sys.argv[2]]))' "$names" "$1"; }
read -r -a SR <<< "$(field sr)"
read -r -a STYLES <<< "$(field public_styles)"
read -r -a MERGED_STYLE_NETS <<< "$(field style)"
if [ "${#SR[@]}" -eq 0 ] && [ "${#MERGED_STYLE_NETS[@]}" -eq 0 ]; then
    echo "nothing merged: the zoo, its evaluation, gallery and thumbnails stay as they were"
    exit 0
fi
[ "$EVAL" = 1 ] || exit 0
mkdir -p "$DOCS"
if [ "${#SR[@]}" -gt 0 ]; then
    LIMIT=()
    [ "$QUICK" = 1 ] && LIMIT=(--sets Set5 --limit 1)
    "$PY" -m evaluation sr --models "${SR[@]}" --zoo "$ZOO" --data "$SR_DATA" \
        --lpips-precision fp32 --out "$DOCS/eval_sr_gpu.md" "${LIMIT[@]}"
fi
if [ "${#STYLES[@]}" -gt 0 ]; then
    DROPLETS=()
    [ -n "$HELD_OUT" ] && DROPLETS+=(--photos "$HELD_OUT")
    [ "$QUICK" = 1 ] && DROPLETS+=(--num-photos 1 --sizes 64)
    "$PY" -m evaluation droplets --models "${STYLES[@]}" --zoo "$ZOO" \
        --out "$DOCS/eval_droplets_gpu.md" "${DROPLETS[@]}"
fi
GALLERY=(--zoo "$ZOO" --styles-out "$DOCS/gallery_styles.jpg" --sr-out "$DOCS/gallery_sr.jpg"
         --controls-out "$DOCS/gallery_controls.jpg")
[ "${#PHOTOS[@]}" -gt 0 ] && GALLERY+=(--photos "${PHOTOS[@]}")
[ "${#SR_PHOTOS[@]}" -gt 0 ] && GALLERY+=(--sr-photos "${SR_PHOTOS[@]}")
[ "$QUICK" = 1 ] && GALLERY+=(--style-size 64 --cell 48 --sr-crop 16 --sr-cell 32)
"$PY" -m evaluation gallery "${GALLERY[@]}"
"$PY" scripts/make_thumbnails.py --zoo "$ZOO"
