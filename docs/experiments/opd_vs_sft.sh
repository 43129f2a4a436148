#!/usr/bin/env bash
# Draft-OPD vs continued SFT on SmolLM2-135M (issue 4's experiment), from the SFT checkpoint of
# docs/benchmarks.md. Both arms: the same 320 fresh prompts (corpus prompts 1000..1319, never seen
# by the SFT bootstrap), 8 sequences per optimizer step, the same steps, LR 3e-4 with 5% warmup.
# tau is then measured on the first 20 MT-Bench questions (greedy, 128 new tokens, K=4) at every
# checkpoint of both runs, and plotted against steps and seconds.
#
#   docs/experiments/opd_vs_sft.sh              # both arms, tau, plot
#   ABLATIONS=1 docs/experiments/opd_vs_sft.sh  # also: random anchors, stream B off
#
# Every step resumes if rerun. CPU: ~1 h on 2 cores for the two arms (see docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
DRAFTOPD=${DRAFTOPD:-.venv/bin/draftopd}
INIT=${INIT:-runs/sft-smollm2/checkpoints/step-00000300}
STEPS=${STEPS:-40}
PER_STEP=8
EVERY=$((STEPS / 4))
THREADS=${THREADS:-2}
[[ -d "$INIT" ]] || { echo "no SFT checkpoint at $INIT: run the SFT command of docs/benchmarks.md" >&2; exit 1; }

common=(--skip 1000 --limit $((STEPS * PER_STEP)) --heldout 8 --steps "$STEPS" --lr 3e-4
        --eval-every 0 --eval-max-new-tokens 32 --checkpoint-every "$EVERY" --threads "$THREADS")
opd=(--drafter "$INIT" --prompts-per-step "$PER_STEP" --num-draft-tokens 4 --max-new-tokens 128
     --rollout-mode batched --rollout-batch-size 8 --eval-draft-tokens 4)

"$DRAFTOPD" train opd --out runs/opd-smollm2 "${opd[@]}" "${common[@]}"
"$DRAFTOPD" train sft --out runs/csft-smollm2 --init-from "$INIT" --batch-size "$PER_STEP" \
  --max-new-tokens 128 --gen-batch-size 32 --max-seq-len 384 --warmup $((STEPS / 20)) \
  --draft-vocab-size 8000 "${common[@]}"
runs=(--run draft-opd=runs/opd-smollm2 --run continued-sft=runs/csft-smollm2)
if [[ "${ABLATIONS:-0}" == 1 ]]; then
  "$DRAFTOPD" train opd --out runs/opd-random-anchors --random-anchors "${opd[@]}" "${common[@]}"
  "$DRAFTOPD" train opd --out runs/opd-no-stream-b --lambda-b 0 "${opd[@]}" "${common[@]}"
  runs+=(--run opd-random-anchors=runs/opd-random-anchors --run opd-no-stream-b=runs/opd-no-stream-b)
fi
"$DRAFTOPD" train tau "${runs[@]}" --init "$INIT" --limit 20 --max-new-tokens 128 \
  --num-draft-tokens 4 --threads "$THREADS" --json docs/bench/opd_vs_sft_tau.json
plots=()
for run in "${runs[@]}"; do
  [[ "$run" == --run ]] && continue
  plots+=(--run "${run%%=*}=${run#*=}/tau_eval.jsonl")
done
"$DRAFTOPD" train compare "${plots[@]}" --png docs/img/opd_vs_sft.png
