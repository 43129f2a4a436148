#!/bin/sh
# Issue 14, third try: does the training prompt mix decide the MT-Bench tau? The recipe's held-out
# tau rose to 2.0 while MT-Bench tau stayed at 1.5: the held-out prompts come from the same
# templates as the training ones. Two arms, same budget, one difference, the prompts:
#   corpus: the built-in template corpus (N prompts);
#   self:   N prompts the target wrote itself (`draftopd train prompts`, self-instruct).
# Each arm: the recipe's flags (docs/training.md) at N prompts and STEPS steps, then MT-Bench tau
# (K = 4, first 20 questions) of every checkpoint of both arms, and a bench of the final drafters.
# Resumable: rerun it and finished parts are skipped.
#
#   sh docs/experiments/data_mix.sh [N] [STEPS]        # default 1500 prompts, 450 steps
set -eu
N="${1:-1500}"
STEPS="${2:-450}"
DRAFTOPD="${DRAFTOPD:-.venv/bin/draftopd}"
OUT=runs/mix
mkdir -p "$OUT"
echo "== self-instruct prompts ($(date +%T))"
"$DRAFTOPD" train prompts --out "$OUT/self_prompts.jsonl" --count "$((N + 32))" --threads 2

arm() {  # arm NAME FLAGS...
  name="$1"; shift
  echo "== arm $name: $* ($(date +%T))"
  "$DRAFTOPD" train sft --out "$OUT/$name" --heldout 32 --max-new-tokens 128 \
    --gen-batch-size 64 --max-seq-len 384 --feature-cache bfloat16 --draft-vocab-size 8000 \
    --init-from-target --autocast auto --steps "$STEPS" --batch-size 8 --lr 1e-3 --warmup 50 \
    --min-lr-ratio 0.2 --eval-every 50 --eval-draft-tokens 4 --eval-max-new-tokens 128 \
    --checkpoint-every 50 --threads 2 --no-progress "$@"
}
arm corpus --corpus-size "$((N + 32))"
arm self --prompts "$OUT/self_prompts.jsonl"

echo "== MT-Bench tau per checkpoint ($(date +%T))"
[ -f "$OUT/tau.json" ] || "$DRAFTOPD" train tau --run "corpus=$OUT/corpus" --run "self=$OUT/self" \
  --limit 20 --max-new-tokens 128 --num-draft-tokens 4 --threads 2 --json "$OUT/tau.json"
for name in corpus self; do
  last=$(ls -d "$OUT/$name"/checkpoints/step-* | tail -1)
  echo "== bench $name $last ($(date +%T))"
  [ -f "$OUT/bench-$name.json" ] || "$DRAFTOPD" bench --limit 20 --max-new-tokens 128 \
    --method eagle3 --drafter "$last" --sweep-k 2,3,4 --with-ngram --json "$OUT/bench-$name.json"
done
"$DRAFTOPD" compare "$OUT/bench-corpus.json" "$OUT/bench-self.json" --labels corpus,self
echo "== done ($(date +%T))"
