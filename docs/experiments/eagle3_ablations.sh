#!/bin/sh
# Issue 14 ablations (and issue 15's DFlash rows at matched training compute): each row trains
# from scratch for the same optimizer seconds on the data and feature cache of the recipe run
# (runs/eagle3-recipe, see docs/training.md), changing one choice of the recipe.
# Resumable: rerun it and finished rows are skipped, unfinished ones resume from their checkpoint.
#
#   sh docs/experiments/eagle3_ablations.sh [SECONDS] [ROW...]   # default 240 s, every row
#
# Then `draftopd train curve runs/abl-<row>/metrics.jsonl` per row; the table in
# docs/benchmarks.md takes the last held-out tau of each metrics.jsonl.
set -eu
SECONDS_PER_ROW="${1:-240}"
[ $# -gt 0 ] && shift
ONLY="$*"
RECIPE=runs/eagle3-recipe
DRAFTOPD=.venv/bin/draftopd
[ -f "$RECIPE/data/manifest.json" ] || { echo "run the recipe first ($RECIPE)"; exit 1; }

row() {  # row NAME CACHE(yes|no) FLAGS...
  name="$1"; cache="$2"; shift 2
  if [ -n "$ONLY" ] && ! echo " $ONLY " | grep -q " $name "; then return 0; fi
  out="runs/abl-$name"
  mkdir -p "$out"
  [ -e "$out/data" ] || ln -s "$(pwd)/$RECIPE/data" "$out/data"
  if [ "$cache" = yes ] && [ ! -e "$out/features" ]; then
    ln -s "$(pwd)/$RECIPE/features" "$out/features"
  fi
  echo "== $name: $* ($(date +%T))"
  # the recipe's command (docs/training.md) with a budget of optimizer seconds, then the row's
  # changes (later flags win)
  "$DRAFTOPD" train sft --out "$out" --corpus-size 6000 --heldout 32 --max-new-tokens 128 \
    --gen-batch-size 64 --max-seq-len 384 --feature-cache bfloat16 --draft-vocab-size 8000 \
    --autocast auto --steps 1800 --batch-size 8 --lr 1e-3 --warmup 50 \
    --min-lr-ratio 0.2 --eval-every 50 --eval-draft-tokens 4 --eval-max-new-tokens 128 \
    --checkpoint-every 50 --threads 2 --max-seconds "$SECONDS_PER_ROW" --no-progress "$@"
}

# most telling rows first: the recipe, the DFlash rows beside it (issue 15), then one change each
row baseline yes
row dflash-b16 yes --drafter-type dflash --block-size 16 --eval-draft-tokens 15
row dflash-b8 yes --drafter-type dflash --block-size 8 --eval-draft-tokens 7
row no-cache no --feature-cache off
row ttt7 yes --ttt-steps 7
row vocab4000 yes --draft-vocab-size 4000
row target-init yes --init-from-target
row vocab16000 yes --draft-vocab-size 16000
row autocast-off yes --autocast off
row dflash-b16-hard yes --drafter-type dflash --block-size 16 --eval-draft-tokens 15 \
  --sft-target hard
# the settings before issue 14: target on the fly, TTT depth 7, random LM head, fp32
row before no --feature-cache off --ttt-steps 7 --autocast off
