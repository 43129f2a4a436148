"""Where the lean step's time goes: matrix products vs everything else, against the memory floor.

  .venv/bin/python docs/experiments/step_profile.py [--context 200] [--repeats 40]

For T = 1, 5 and 8 new tokens after ``--context`` cached ones it prints the median step, the same
step with the native kernel's products replaced by empty outputs of the right shape (what the
rest of the step costs: attention, RoPE, cache writes, norms outside the kernel, Python), their
difference (the products), and the time to read the weights' bytes once (the memory floor).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from draftopd.costs import weight_stream_ms
from draftopd.models.target import load_target


class _NoProducts:
    """Stands in for the kernel module: right shapes, no arithmetic."""

    def __init__(self, real: object) -> None:
        self.real = real

    def linear(self, x, weight, n, norm=None, eps=0.0, residual=None):  # type: ignore[no-untyped-def]
        return torch.empty(x.shape[0], n)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    target = load_target("smollm2")
    target.new_decode_cache()
    lean = target.lean
    ids = torch.randint(0, target.vocab_size, (args.context + 16,), generator=torch.Generator())
    cache = lean.new_cache()
    lean.forward(ids[: args.context], cache)

    def median_ms(block: int) -> float:
        samples = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            lean.forward(ids[args.context : args.context + block], cache)
            samples.append(time.perf_counter() - start)
            cache.crop(args.context)
        return statistics.median(samples) * 1e3

    floor = weight_stream_ms(target, args.repeats)
    print(f"kernel {lean.kernel_name}, context {args.context}, {torch.get_num_threads()} threads")
    print(f"memory floor (read the weights once): {floor:.1f} ms")
    print(f"{'T':>3} {'step':>8} {'no products':>12} {'products':>9} {'step/floor':>11}")
    real = lean.linear.kernel
    for block in (1, 5, 8):
        lean.linear.kernel = real
        total = median_ms(block)
        lean.linear.kernel = _NoProducts(real)  # type: ignore[assignment]
        rest = median_ms(block)
        lean.linear.kernel = real
        print(f"{block:>3} {total:>8.1f} {rest:>12.1f} {total - rest:>9.1f} {total / floor:>11.2f}")


if __name__ == "__main__":
    main()
