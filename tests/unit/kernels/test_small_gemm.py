"""The native small-M GEMM against its reference, ``F.linear`` (with RMSNorm and a residual)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from draftopd.kernels import _cpu_flags, small_gemm

needs_avx2 = pytest.mark.skipif(
    not {"avx2", "fma"} <= _cpu_flags(), reason="the kernel needs an x86-64 CPU with AVX2/FMA"
)


@pytest.fixture(scope="module", params=["native", "avx2"])
def kernel(request: pytest.FixtureRequest) -> object:
    """Both code paths: the best this CPU has (AVX-512 here) and the AVX2 + FMA one."""
    module = small_gemm(request.param)
    assert module is not None, "the kernel must build on a machine with AVX2, g++ and ninja"
    if request.param == "avx2":
        assert module.isa() == "avx2"
    return module


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@needs_avx2
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 13, 17, 40])
@pytest.mark.parametrize(("n", "k"), [(96, 64), (100, 37), (33, 130), (640, 64)])
def test_linear_matches_f_linear(kernel: object, rows: int, n: int, k: int) -> None:
    generator = torch.Generator().manual_seed(rows * 1000 + n + k)
    weight = torch.randn(n, k, generator=generator)
    x = torch.randn(rows, k, generator=generator)
    packed = kernel.pack(weight)  # type: ignore[attr-defined]
    assert packed.shape[0] * packed.shape[2] >= n and packed.shape[1] == k
    got = kernel.linear(x, packed, n)  # type: ignore[attr-defined]
    torch.testing.assert_close(got, F.linear(x, weight), rtol=1e-5, atol=1e-4)


@needs_avx2
@pytest.mark.parametrize("rows", [1, 6, 9])
def test_fused_norm_and_residual(kernel: object, rows: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(70, 48, generator=generator)
    norm = torch.rand(48, generator=generator) + 0.5
    residual = torch.randn(rows, 70, generator=generator)
    x = torch.randn(rows, 48, generator=generator) * 3
    packed = kernel.pack(weight)  # type: ignore[attr-defined]
    got = kernel.linear(x, packed, 70, norm, 1e-5, residual)  # type: ignore[attr-defined]
    want = residual + F.linear(_rms(x, norm, 1e-5), weight)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    # leading dimensions are kept, as F.linear keeps them
    batched = kernel.linear(x[None], packed, 70)  # type: ignore[attr-defined]
    assert batched.shape == (1, rows, 70)


@needs_avx2
def test_bad_arguments_are_refused(kernel: object) -> None:
    packed = kernel.pack(torch.randn(40, 16))  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="input width"):
        kernel.linear(torch.randn(2, 15), packed, 40)  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="n does not match"):
        kernel.linear(torch.randn(2, 16), packed, 400)  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="float32"):
        kernel.pack(torch.randn(4, 4, dtype=torch.float64))  # type: ignore[attr-defined]


@needs_avx2
@pytest.mark.parametrize("rows", [1, 4, 13])
def test_bfloat16_weights_widen_exactly(kernel: object, rows: int) -> None:
    """bf16 panels hold the weight rounded to bfloat16; the product is float32 with that weight."""
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(150, 72, generator=generator)
    x = torch.randn(rows, 72, generator=generator)
    packed = kernel.pack(weight, True)  # type: ignore[attr-defined]
    assert packed.dtype == torch.bfloat16
    got = kernel.linear(x, packed, 150)  # type: ignore[attr-defined]
    rounded = weight.to(torch.bfloat16).float()
    torch.testing.assert_close(got, F.linear(x, rounded), rtol=1e-5, atol=1e-4)
    assert (got - F.linear(x, weight)).abs().max() > 1e-4  # the rounding is real


@needs_avx2
@pytest.mark.parametrize("rows", [1, 7])
def test_int8_weights_with_row_scales(kernel: object, rows: int) -> None:
    """int8 panels: each output row rounded to 127 steps of max|W[n]| / 127, scaled after the
    dot product; the residual is added after the scale."""
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(90, 40, generator=generator)
    weight[3] = 0.0  # an all-zero row keeps a finite scale
    x = torch.randn(rows, 40, generator=generator)
    residual = torch.randn(rows, 90, generator=generator)
    packed, scales = kernel.pack_int8(weight)  # type: ignore[attr-defined]
    assert packed.dtype == torch.int8 and scales.shape[0] >= 90
    step = weight.abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
    rounded = torch.round(weight / step).clamp(-127, 127) * step
    got = kernel.linear(x, packed, 90, None, 1e-6, residual, scales)  # type: ignore[attr-defined]
    torch.testing.assert_close(got, residual + F.linear(x, rounded), rtol=1e-5, atol=1e-4)
    with pytest.raises(RuntimeError, match="scales"):
        kernel.linear(x, packed, 90)  # type: ignore[attr-defined]


@needs_avx2
def test_a_stale_build_lock_does_not_hang_the_next_process(kernel: object) -> None:
    """torch's build lock left by a process killed inside ``load`` (seen: a stopped background
    job) made every later process wait forever; the next one now clears it and goes on."""
    build_dir = Path(kernel.__file__).parent  # type: ignore[attr-defined]
    (build_dir / "lock").write_text("")
    target = "avx2" if kernel.isa() == "avx2" else "native"  # type: ignore[attr-defined]
    code = f"from draftopd.kernels import small_gemm; assert small_gemm({target!r}) is not None"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    assert not (build_dir / "lock").exists()
