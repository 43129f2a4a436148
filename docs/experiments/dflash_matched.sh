#!/bin/sh
# Issue 15: DFlash against EAGLE-3 at matched training compute.
#
# The EAGLE-3 row is issue 16's SFT base (docs/experiments/opd_plateau.sh base: 1,500 corpus
# prompts, the recipe's flags, 500 steps). Each DFlash row trains from scratch on the SAME target
# data and bf16 feature cache (symlinked, never regenerated) with the same flags, changing only
# the family, for the same optimizer seconds as the base took. Block SFT draws BLOCK_ANCHORS
# random response anchors per sequence and step (0 = every response position); STEPS sets the
# length of the cosine schedule, chosen so that it ends near the seconds budget.
# Then MT-Bench tau on all 80 questions for every checkpoint of every row (`train tau`, K = B-1)
# and a bench on the first 20 questions per drafter (greedy, 128 new tokens, plain in the same
# run), for the DFlash rows and the EAGLE-3 base.
# Resumable: finished runs, tau files and bench JSONs are skipped; an unfinished run resumes.
#
#   sh docs/experiments/dflash_matched.sh train|tau|bench|all
#   BLOCKS="8 16" SECONDS_BUDGET=1800 STEPS=1500 BLOCK_ANCHORS=32 sh ...
#   LAYERS=3 BLOCKS=8 ... sh ...   # a deeper drafter: rows named dflash-b8-l3
set -eu
BLOCKS="${BLOCKS:-8 16}"
SECONDS_BUDGET="${SECONDS_BUDGET:-1800}"
STEPS="${STEPS:-1500}"
BLOCK_ANCHORS="${BLOCK_ANCHORS:-32}"
LAYERS="${LAYERS:-1}"
SUFFIX=""; [ "$LAYERS" = 1 ] || SUFFIX="-l$LAYERS"
OUT="${OUT:-runs/plateau}"
BENCH="${BENCH:-docs/bench}"
DRAFTOPD="${DRAFTOPD:-.venv/bin/draftopd}"
BASE="$OUT/base"
[ -f "$BASE/data/manifest.json" ] || { echo "run opd_plateau.sh base first ($BASE)"; exit 1; }
stage="${1:-all}"

last_ckpt() { ls -d "$1/checkpoints/step-"* | tail -1; }

train() {
  for b in $BLOCKS; do
    out="$OUT/dflash-b$b$SUFFIX"
    mkdir -p "$out"
    base_abs="$(cd "$BASE" && pwd -P)"
    [ -e "$out/data" ] || ln -sfn "$base_abs/data" "$out/data"
    [ -e "$out/features" ] || ln -sfn "$base_abs/features" "$out/features"
    echo "== dflash B=$b: $SECONDS_BUDGET optimizer s, $STEPS-step schedule ($(date +%T))"
    "$DRAFTOPD" train sft --out "$out" --corpus-size 4000 --limit 1500 --heldout 32 \
      --max-new-tokens 128 --gen-batch-size 64 --max-seq-len 384 --feature-cache bfloat16 \
      --draft-vocab-size 8000 --init-from-target --autocast auto --batch-size 8 --lr 1e-3 \
      --warmup 50 --min-lr-ratio 0.2 --eval-every 0 --checkpoint-every "$((STEPS / 5))" \
      --threads 2 --no-progress --drafter-type dflash --block-size "$b" --drafter-layers "$LAYERS" \
      --block-anchors "$BLOCK_ANCHORS" --steps "$STEPS" --max-seconds "$SECONDS_BUDGET"
  done
}

tau() {
  for b in $BLOCKS; do
    out="$OUT/dflash-b$b$SUFFIX"
    [ -f "$out/tau_eval.jsonl" ] && continue
    echo "== MT-Bench tau, 80 questions, dflash B=$b at K=$((b - 1)) ($(date +%T))"
    "$DRAFTOPD" train tau --run "dflash-b$b$SUFFIX=$out" --limit 80 --max-new-tokens 128 \
      --num-draft-tokens "$((b - 1))" --threads 2
  done
}

bench_one() {  # bench_one NAME METHOD CHECKPOINT K SWEEP [FLAGS...]
  name="$1"; method="$2"; ckpt="$3"; k="$4"; sweep="$5"; shift 5
  [ -f "$BENCH/issue15_matched_$name.json" ] && return 0
  echo "== bench $name ($(date +%T))"
  "$DRAFTOPD" bench --limit 20 --max-new-tokens 128 --method "$method" --drafter "$ckpt" \
    --num-draft-tokens "$k" --sweep-k "$sweep" --threads 2 --no-progress "$@" \
    --json "$BENCH/issue15_matched_$name.json"
}

bench() {  # one K swept per drafter besides its own (2 for EAGLE-3: its best so far, issue 14)
  [ "$LAYERS" = 1 ] && bench_one eagle3 eagle3 "$(last_ckpt "$BASE")" 4 2 --with-ngram
  for b in $BLOCKS; do
    bench_one "dflash_b$b$SUFFIX" dflash "$(last_ckpt "$OUT/dflash-b$b$SUFFIX")" "$((b - 1))" 3
  done
}

case "$stage" in
  train) train ;;
  tau) tau ;;
  bench) bench ;;
  all) train; tau; bench ;;
esac
echo "== done $stage ($(date +%T))"
