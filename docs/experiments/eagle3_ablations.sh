#!/bin/sh
# Issue 14 ablations: each row trains from scratch for the same optimizer seconds on the data and
# feature cache of the recipe run (runs/eagle3-recipe, see docs/training.md), changing one choice.
# Resumable: rerun it and finished rows are skipped, unfinished ones resume from their checkpoint.
#
#   sh docs/experiments/eagle3_ablations.sh [SECONDS]    # default 600 optimizer seconds per row
#
# Then `draftopd train curve runs/abl-<row>/metrics.jsonl` per row; the table in
# docs/benchmarks.md takes the final held-out tau of each metrics.jsonl.
set -eu
SECONDS_PER_ROW="${1:-600}"
RECIPE=runs/eagle3-recipe
DRAFTOPD=.venv/bin/draftopd
[ -f "$RECIPE/data/manifest.json" ] || { echo "run the recipe first ($RECIPE)"; exit 1; }

row() {  # row NAME CACHE_DIR_OR_NONE FLAGS...
  name="$1"; cache="$2"; shift 2
  out="runs/abl-$name"
  mkdir -p "$out"
  [ -e "$out/data" ] || ln -s "$(pwd)/$RECIPE/data" "$out/data"
  if [ "$cache" != none ] && [ ! -e "$out/features" ]; then ln -s "$(pwd)/$cache" "$out/features"; fi
  echo "== $name: $*"
  "$DRAFTOPD" train sft --out "$out" --heldout 32 --max-new-tokens 128 --gen-batch-size 64 \
    --max-seq-len 384 --steps 1500 --batch-size 8 --lr 1e-3 --warmup 50 --min-lr-ratio 0.2 \
    --eval-every 50 --eval-draft-tokens 4 --eval-max-new-tokens 128 --checkpoint-every 50 \
    --threads 2 --max-seconds "$SECONDS_PER_ROW" --no-progress "$@"
}

row baseline "$RECIPE/features" --feature-cache bfloat16 --draft-vocab-size 8000 --init-from-target
# the settings before issue 14: target on the fly, TTT depth 7, random LM head
row before none --feature-cache off --draft-vocab-size 8000 --ttt-steps 7
row no-cache none --feature-cache off --draft-vocab-size 8000 --init-from-target
row no-target-init "$RECIPE/features" --feature-cache bfloat16 --draft-vocab-size 8000
row ttt7 "$RECIPE/features" --feature-cache bfloat16 --draft-vocab-size 8000 --init-from-target \
  --ttt-steps 7
row vocab4000 "$RECIPE/features" --feature-cache bfloat16 --draft-vocab-size 4000 --init-from-target
row vocab16000 "$RECIPE/features" --feature-cache bfloat16 --draft-vocab-size 16000 \
  --init-from-target
# storage precision of the cache: fp32 features need their own cache (one target pass)
row cache-fp32 none --feature-cache float32 --draft-vocab-size 8000 --init-from-target
