#!/bin/sh
# Issue 16: Draft-OPD past the SFT plateau, at a size that fits one session on 2 cores.
#
# 1. base: an EAGLE-3 SFT run with the recipe's flags (docs/training.md) on N corpus prompts,
#    long enough that its MT-Bench tau has flattened (issue 14, third try: 1,500 prompts flatten
#    near 1.37 by step 300-450); MT-Bench tau (80 questions) at every checkpoint shows it.
# 2. arms from the base's last checkpoint, on fresh corpus prompts (never seen by the base), the
#    same optimizer steps and sequences per step, the same target tokens:
#      opd            the paper's recipe: both streams, gamma 0.8, LR 3e-4, cosine, 5% warmup;
#      sft            continued SFT on the target's greedy answers to the same prompts, LR 3e-4;
#      opd-no-b       ablation: stream B off (lambda_b 0);
#      opd-random     ablation: the same number of blocks at random anchors;
#      opd-fkl        ablation: all forward KL (Bernoulli forward KL on stream B too);
#      opd-lbX        stream B weight lambda_b = X (e.g. opd-lb0.1), both streams on;
#      opd-gX         stream B decay gamma = X (e.g. opd-g0.4).
#    SEEDS seeds (prompt order) for opd and sft, one for the ablations.
# 3. MT-Bench tau on all 80 questions (first turn, greedy, 128 new tokens, K = 4) at every
#    checkpoint of every arm (step 0 = the base's last checkpoint), then the report: the table,
#    the paired per-prompt comparisons and the plateau figure (opd_plateau_report.py).
# FAMILY=dflash-b8 runs the arms of a second drafter family from the DFlash base that
# dflash_matched.sh trains on the same data (runs/plateau/dflash-b8): arms are named
# dflash-b8-opd-s0 etc., drafted at K = B - 1 (set K), continued SFT with SFT_FLAGS (the base's
# block-SFT flags, e.g. "--block-anchors 32"). The base stage is EAGLE-3's only.
# Every stage is skipped when its output exists: rerun to resume. `tau` scores the runs that have
# no tau_eval.jsonl yet, so it can run after the first seed and again after the others.
#
#   sh docs/experiments/opd_plateau.sh base|arms|tau|report|all
#   SEEDS="1 2" ABLATIONS= sh docs/experiments/opd_plateau.sh arms   # more seeds later
#   MAIN_ARMS=sft ABLATIONS="opd-no-b opd-lb0.1" sh ... arms             # a chosen subset
#   FAMILY=dflash-b8 K=7 SFT_FLAGS="--block-anchors 32" ABLATIONS= sh ... arms; ... tau
set -eu
N="${N:-1500}"             # base prompts
BASE_STEPS="${BASE_STEPS:-500}"
ARM_STEPS="${ARM_STEPS:-40}"
PER_STEP="${PER_STEP:-16}"
SEEDS="${SEEDS:-0}"
ABLATIONS="${ABLATIONS-opd-no-b}"  # set and empty: no ablation
MAIN_ARMS="${MAIN_ARMS-opd sft}"   # the arms run for every seed (set and empty: ablations only)
CORPUS=4000                # one corpus list for every stage; the last 32 are held out
OUT="${OUT:-runs/plateau}"
FAMILY="${FAMILY:-}"       # empty: EAGLE-3 (base in $OUT/base, arms unprefixed)
K="${K:-4}"
SFT_FLAGS="${SFT_FLAGS:-}"
BASE_RUN="$OUT/${FAMILY:-base}"
P="${FAMILY:+$FAMILY-}"    # arm name prefix
DRAFTOPD="${DRAFTOPD:-.venv/bin/draftopd}"
mkdir -p "$OUT"
stage="${1:-all}"

base() {
  [ -z "$FAMILY" ] || { echo "the base stage trains EAGLE-3; dflash_matched.sh trains $FAMILY"; exit 2; }
  echo "== base SFT: $N prompts, $BASE_STEPS steps ($(date +%T))"
  "$DRAFTOPD" train sft --out "$OUT/base" --corpus-size "$CORPUS" --limit "$N" --heldout 32 \
    --max-new-tokens 128 --gen-batch-size 64 --max-seq-len 384 --feature-cache bfloat16 \
    --draft-vocab-size 8000 --init-from-target --autocast auto --steps "$BASE_STEPS" \
    --batch-size 8 --lr 1e-3 --warmup 50 --min-lr-ratio 0.2 --eval-every 100 \
    --eval-draft-tokens 4 --eval-max-new-tokens 128 --checkpoint-every 50 --threads 2 --no-progress
  [ -f "$OUT/base_tau.json" ] || "$DRAFTOPD" train tau --run "base=$OUT/base" --limit 80 \
    --max-new-tokens 128 --num-draft-tokens 4 --threads 2 --json "$OUT/base_tau.json"
}

base_ckpt() { ls -d "$BASE_RUN/checkpoints/step-"* | tail -1; }

common() {  # the run flags every arm shares: fresh prompts after the base's
  echo --corpus-size "$CORPUS" --skip "$N" --limit "$((ARM_STEPS * PER_STEP))" --heldout 32 \
    --steps "$ARM_STEPS" --lr 3e-4 --eval-every 0 --eval-max-new-tokens 64 \
    --checkpoint-every "$((ARM_STEPS / 5))" --threads 2 --no-progress
}

opd() {  # opd NAME SEED FLAGS...
  name="$1"; seed="$2"; shift 2
  echo "== arm $name seed $seed: $* ($(date +%T))"
  # shellcheck disable=SC2046
  "$DRAFTOPD" train opd --out "$OUT/$P$name-s$seed" --drafter "$(base_ckpt)" --seed "$seed" \
    --prompts-per-step "$PER_STEP" --num-draft-tokens "$K" --max-new-tokens 128 \
    --rollout-mode batched --rollout-batch-size "$PER_STEP" --eval-draft-tokens "$K" \
    --gamma 0.8 --warmup-fraction 0.05 $(common) "$@"
}

sft() {  # sft SEED
  echo "== arm sft seed $1 ($(date +%T))"
  # shellcheck disable=SC2046
  "$DRAFTOPD" train sft --out "$OUT/${P}sft-s$1" --init-from "$(base_ckpt)" --seed "$1" \
    --batch-size "$PER_STEP" --max-new-tokens 128 --gen-batch-size 64 --max-seq-len 384 \
    --feature-cache bfloat16 --autocast auto --warmup-fraction 0.05 --eval-draft-tokens "$K" \
    $(common) $SFT_FLAGS
}

ablations() {
  for a in $ABLATIONS; do
    case "$a" in
      opd-no-b) opd opd-no-b 0 --lambda-b 0 ;;
      opd-random) opd opd-random 0 --random-anchors ;;
      opd-fkl) opd opd-fkl 0 --stream-b-loss bernoulli_fkl ;;
      opd-lb*) opd "$a" 0 --lambda-b "${a#opd-lb}" ;;  # e.g. opd-lb0.1: stream B weight 0.1
      opd-g*) opd "$a" 0 --gamma "${a#opd-g}" ;;       # e.g. opd-g0.4: stream B decay 0.4
      *) echo "unknown ablation $a" >&2; exit 2 ;;
    esac
  done
}

arms() {  # the first seed, then the ablations, then the other seeds
  first=1
  for seed in $SEEDS; do
    for arm in $MAIN_ARMS; do
      case "$arm" in
        opd) opd opd "$seed" ;;
        sft) sft "$seed" ;;
        *) echo "unknown arm $arm" >&2; exit 2 ;;
      esac
    done
    if [ "$first" = 1 ]; then ablations; first=0; fi
  done
}

tau() {
  runs=""
  for d in "$OUT/$P"opd*-s* "$OUT/${P}sft-s"*; do
    [ -f "$d/metrics.jsonl" ] && [ ! -f "$d/tau_eval.jsonl" ] && runs="$runs --run $(basename "$d")=$d"
  done
  [ -n "$runs" ] || return 0
  echo "== MT-Bench tau per checkpoint, 80 questions:$runs ($(date +%T))"
  # shellcheck disable=SC2086
  "$DRAFTOPD" train tau $runs --init "$(base_ckpt)" --limit 80 --max-new-tokens 128 \
    --num-draft-tokens "$K" --threads 2
}

report() {
  .venv/bin/python docs/experiments/opd_plateau_report.py "$OUT" ${FAMILY:+--family "$FAMILY" --k "$K"}
}

case "$stage" in
  base) base ;;
  arms) arms ;;
  tau) tau ;;
  report) report ;;
  all) base; arms; tau; report ;;
esac
echo "== done $stage ($(date +%T))"
