"""Our plain decoding against llama.cpp on an F32 GGUF of the same weights, in one run.

Not part of the project's dependencies or CI: llama-cpp-python is built from its sdist in a venv
of its own (about 12 minutes), and its vendored convert_hf_to_gguf.py writes the F32 GGUF from
our safetensors cache offline (docs/benchmarks.md gives the commands). Run with our venv and the
llama.cpp venv's site-packages on PYTHONPATH:

  PYTHONPATH=/path/to/llamacpp-venv/lib/python3.11/site-packages \
    .venv/bin/python docs/experiments/llama_cpp_peer.py --gguf smollm2-f32.gguf --limit 20

Both run greedy, 128 new tokens, on the MT-Bench prompts rendered by our chat template, with the
same thread count, alternating per prompt; the report counts token-identical outputs.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from llama_cpp import Llama

from draftopd.models.target import load_target
from draftopd.prompts import default_prompts_path, load_prompts, render_prompt
from draftopd.speculative.engine import DecodeEngine
from draftopd.speculative.sampling import SamplingParams


def llama_cpp_greedy(llm: Llama, ids: list[int], max_new: int, eos: set[int]) -> list[int]:
    llm.reset()
    out: list[int] = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if token in eos or len(out) >= max_new:
            break
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--json")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    target = load_target("smollm2")
    engine = DecodeEngine(target)
    llm = Llama(args.gguf, n_ctx=2048, n_threads=threads, n_batch=512, verbose=False)
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    eos = set(target.eos_token_ids)
    prompts = [render_prompt(target.tokenizer, p) for p in load_prompts(default_prompts_path())]
    prompts = prompts[: args.limit]
    engine.generate(prompts[0], SamplingParams(max_new_tokens=8), decode_text=False)  # warm-up
    llama_cpp_greedy(llm, prompts[0], 8, eos)
    ours_t = peer_t = 0.0
    ours_n = peer_n = identical = 0
    for ids in prompts:
        start = time.perf_counter()
        ours = engine.generate(ids, params, decode_text=False).token_ids
        ours_t += time.perf_counter() - start
        start = time.perf_counter()
        peer = llama_cpp_greedy(llm, ids, args.max_new_tokens, eos)
        peer_t += time.perf_counter() - start
        ours_n, peer_n = ours_n + len(ours), peer_n + len(peer)
        identical += int(ours == peer)
    report = {
        "ours_tokens_per_s": ours_n / ours_t,
        "llama_cpp_tokens_per_s": peer_n / peer_t,
        "ratio": (ours_n / ours_t) / (peer_n / peer_t),
        "identical": identical,
        "num_prompts": len(prompts),
        "threads": threads,
        "kernel": target.lean.kernel_name,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
