// y[M, N] = x[M, K] @ W[N, K]^T for the few rows of a decode or verification step.
//
// BLAS libraries tune GEMM for large M; for M = 1..16 they run at 2-3x the cost of streaming the
// weights once (docs/engine.md). Here each weight element is read from memory exactly once and
// used for every row of x:
// - W is packed once into panels of NR output columns, [panels, K, NR], so a panel streams
//   sequentially;
// - a register-blocked micro-kernel keeps MR rows x NR columns of accumulators in vector
//   registers; a panel stays in L2 while the MR-row chunks of x pass over it;
// - panels are split across torch's intra-op threads (at::parallel_for).
// Each output is a fused multiply-add chain over k (two interleaved chains for a single row): only
// the summation order differs from BLAS (floating-point reassociation).
//
// Compiled at first use for the machine it runs on (-march=native): AVX-512 or AVX2 + FMA.
// Built with -fopenmp: torch's header-only at::parallel_for is serial without it.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#if defined(__AVX512F__)
using vec = __m512;
constexpr int VL = 16;
constexpr int MR_MAX = 12;  // 24 accumulators + 2 weight vectors + 1 broadcast of 32 registers
static inline vec vzero() { return _mm512_setzero_ps(); }
static inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
static inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
static inline vec vbroadcast(float f) { return _mm512_set1_ps(f); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec vload_bf16(const uint16_t* p) {  // bfloat16 is the top half of a float32
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline vec vload_i8(const int8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}
#define DRAFTOPD_ISA "avx512"
#elif defined(__AVX2__) && defined(__FMA__)
using vec = __m256;
constexpr int VL = 8;
constexpr int MR_MAX = 6;  // 12 accumulators + 2 weight vectors + 1 broadcast of 16 registers
static inline vec vzero() { return _mm256_setzero_ps(); }
static inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
static inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
static inline vec vbroadcast(float f) { return _mm256_set1_ps(f); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec vload_bf16(const uint16_t* p) {  // bfloat16 is the top half of a float32
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
static inline vec vload_i8(const int8_t* p) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}
#define DRAFTOPD_ISA "avx2"
#else
#error "small_gemm needs AVX2 with FMA, or AVX-512"
#endif

constexpr int NR = 2 * VL;  // output columns per panel: two vectors

// weights are float32, bfloat16 (uint16 bits) widened exactly to float32 on load, or int8 with
// one float32 scale per output column, applied once the dot product is complete
static inline vec wload(const float* p) { return vload(p); }
static inline vec wload(const uint16_t* p) { return vload_bf16(p); }
static inline vec wload(const int8_t* p) { return vload_i8(p); }
constexpr int64_t PREFETCH = 32;  // k rows ahead

template <int MR, typename W>
static void micro_kernel(const float* __restrict x, int64_t ldx, const W* __restrict panel,
                         int64_t K, float* __restrict y, int64_t ldy, int64_t cols,
                         const float* __restrict residual, const float* __restrict scale) {
  vec lo[MR], hi[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    lo[i] = vzero();
    hi[i] = vzero();
  }
  int64_t k = 0;
  if constexpr (MR == 1) {
    // one row: two more accumulator chains hide the FMA latency (a GEMV is otherwise
    // latency-bound, not bandwidth-bound); they are added at the end
    vec lo2 = vzero(), hi2 = vzero();
    for (; k + 1 < K; k += 2) {
      _mm_prefetch(reinterpret_cast<const char*>(panel + (k + PREFETCH) * NR), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(panel + (k + PREFETCH) * NR + VL), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(panel + (k + 1 + PREFETCH) * NR), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(panel + (k + 1 + PREFETCH) * NR + VL), _MM_HINT_T0);
      const vec b0 = vbroadcast(x[k]), b1 = vbroadcast(x[k + 1]);
      lo[0] = vfma(b0, wload(panel + k * NR), lo[0]);
      hi[0] = vfma(b0, wload(panel + k * NR + VL), hi[0]);
      lo2 = vfma(b1, wload(panel + (k + 1) * NR), lo2);
      hi2 = vfma(b1, wload(panel + (k + 1) * NR + VL), hi2);
    }
    lo[0] = lo[0] + lo2;
    hi[0] = hi[0] + hi2;
  }
  for (; k < K; ++k) {
    _mm_prefetch(reinterpret_cast<const char*>(panel + (k + PREFETCH) * NR), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(panel + (k + PREFETCH) * NR + VL), _MM_HINT_T0);
    const vec w0 = wload(panel + k * NR);
    const vec w1 = wload(panel + k * NR + VL);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const vec b = vbroadcast(x[i * ldx + k]);
      lo[i] = vfma(b, w0, lo[i]);
      hi[i] = vfma(b, w1, hi[i]);
    }
  }
  if (scale != nullptr) {
    const vec s0 = vload(scale), s1 = vload(scale + VL);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      lo[i] = lo[i] * s0;
      hi[i] = hi[i] * s1;
    }
  }
  if (cols == NR) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      if (residual != nullptr) {  // residual + x W^T, added once the dot product is complete
        lo[i] = vload(residual + i * ldy) + lo[i];
        hi[i] = vload(residual + i * ldy + VL) + hi[i];
      }
      vstore(y + i * ldy, lo[i]);
      vstore(y + i * ldy + VL, hi[i]);
    }
    return;
  }
  alignas(64) float tmp[NR];
  for (int i = 0; i < MR; ++i) {
    vstore(tmp, lo[i]);
    vstore(tmp + VL, hi[i]);
    for (int64_t j = 0; j < cols; ++j) {
      y[i * ldy + j] = residual != nullptr ? residual[i * ldy + j] + tmp[j] : tmp[j];
    }
  }
}

template <typename W>
using Kernel = void (*)(const float*, int64_t, const W*, int64_t, float*, int64_t, int64_t,
                        const float*, const float*);

template <typename W, int... R>
static const Kernel<W>* kernels(std::integer_sequence<int, R...>) {
  static const Kernel<W> table[] = {&micro_kernel<R + 1, W>...};
  return table;
}

template <typename W>
static const Kernel<W>* kernel_table() {
  return kernels<W>(std::make_integer_sequence<int, MR_MAX>{});
}

int64_t panel_width() { return NR; }

std::string isa() { return DRAFTOPD_ISA; }

// W [N, K] -> panels [ceil(N / NR), K, NR], zero-padded past N; float32, or bfloat16 (rounded
// to nearest even by torch) when ``bf16`` is set.
torch::Tensor pack(const torch::Tensor& weight, bool bf16) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kFloat32,
              "pack expects a 2-D float32 weight");
  auto w = bf16 ? weight.to(torch::kBFloat16).contiguous() : weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1), panels = (N + NR - 1) / NR;
  auto padded = torch::zeros({panels * NR, K}, w.options());
  padded.narrow(0, 0, N).copy_(w);
  return padded.view({panels, NR, K}).transpose(1, 2).contiguous();
}

// W [N, K] -> (int8 panels [ceil(N / NR), K, NR], float32 scales [ceil(N / NR) * NR]): each
// output row is rounded to 127 steps of max|W[n]| / 127 (symmetric, per row).
std::vector<torch::Tensor> pack_int8(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kFloat32,
              "pack_int8 expects a 2-D float32 weight");
  const int64_t N = weight.size(0), K = weight.size(1), panels = (N + NR - 1) / NR;
  auto scale = weight.abs().amax(1).clamp_min(1e-12) / 127.0;  // [N]
  auto q = torch::round(weight / scale.unsqueeze(1)).clamp(-127, 127).to(torch::kInt8);
  auto padded = torch::zeros({panels * NR, K}, q.options());
  padded.narrow(0, 0, N).copy_(q);
  auto scales = torch::zeros({panels * NR}, weight.options());
  scales.narrow(0, 0, N).copy_(scale);
  return {padded.view({panels, NR, K}).transpose(1, 2).contiguous(), scales};
}

template <typename W>
static void run(const float* xp, const W* wp, float* yp, const float* rp, const float* sp,
                int64_t M, int64_t K, int64_t n, int64_t panels) {
  const Kernel<W>* table = kernel_table<W>();
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t cols = std::min<int64_t>(NR, n - p * NR);
      const W* panel = wp + p * K * NR;
      for (int64_t m = 0; m < M; m += MR_MAX) {
        const int64_t rows = std::min<int64_t>(MR_MAX, M - m);
        const int64_t offset = m * n + p * NR;
        table[rows - 1](xp + m * K, K, panel, K, yp + offset, n, cols,
                        rp != nullptr ? rp + offset : nullptr,
                        sp != nullptr ? sp + p * NR : nullptr);
      }
    }
  });
}

// RMSNorm of each row, as the Llama reference computes it in float32:
// weight * (x * rsqrt(mean(x^2) + eps)).
static torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(weight.numel() == K && weight.scalar_type() == torch::kFloat32,
              "norm weight must be float32 of the input width");
  auto w = weight.contiguous();
  auto out = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float* row = xp + m * K;
    float squares = 0.f;
    for (int64_t k = 0; k < K; ++k) squares += row[k] * row[k];
    const float r = 1.f / std::sqrt(squares / static_cast<float>(K) + static_cast<float>(eps));
    for (int64_t k = 0; k < K; ++k) op[m * K + k] = wp[k] * (row[k] * r);
  }
  return out;
}

// y = [residual +] norm?(x) @ W^T, W packed by pack(); n is W's row count.
torch::Tensor linear(const torch::Tensor& input, const torch::Tensor& packed, int64_t n,
                     const std::optional<torch::Tensor>& norm_weight, double eps,
                     const std::optional<torch::Tensor>& residual,
                     const std::optional<torch::Tensor>& scales) {
  const auto wtype = packed.scalar_type();
  TORCH_CHECK(input.scalar_type() == torch::kFloat32 &&
                  (wtype == torch::kFloat32 || wtype == torch::kBFloat16 || wtype == torch::kChar),
              "linear expects a float32 input and a float32, bfloat16 or int8 packed weight");
  TORCH_CHECK((wtype == torch::kChar) == scales.has_value(),
              "an int8 packed weight needs its scales, and only it takes scales");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == NR && packed.is_contiguous(),
              "linear expects a weight from pack()");
  const int64_t K = packed.size(1), panels = packed.size(0);
  TORCH_CHECK(input.size(-1) == K, "input width ", input.size(-1), " != weight width ", K);
  TORCH_CHECK(n > (panels - 1) * NR && n <= panels * NR, "n does not match the packed weight");
  auto x = input.reshape({-1, K}).contiguous();
  if (norm_weight.has_value()) x = rms_norm(x, *norm_weight, eps);
  const int64_t M = x.size(0);
  auto sizes = input.sizes().vec();
  sizes.back() = n;
  torch::Tensor res;
  const float* rp = nullptr;
  if (residual.has_value()) {
    res = residual->reshape({-1, n}).contiguous();
    TORCH_CHECK(res.size(0) == M && res.scalar_type() == torch::kFloat32,
                "residual must be float32 of shape [rows, n]");
    rp = res.data_ptr<float>();
  }
  auto y = torch::empty({M, n}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (wtype == torch::kBFloat16) {
    run(xp, reinterpret_cast<const uint16_t*>(packed.data_ptr()), yp, rp, nullptr, M, K, n,
        panels);
  } else if (wtype == torch::kChar) {
    TORCH_CHECK(scales->numel() == panels * NR && scales->scalar_type() == torch::kFloat32,
                "scales must come from pack_int8");
    run(xp, packed.data_ptr<int8_t>(), yp, rp, scales->contiguous().data_ptr<float>(), M, K, n,
        panels);
  } else {
    run(xp, packed.data_ptr<float>(), yp, rp, nullptr, M, K, n, panels);
  }
  return y.view(sizes);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &pack, "pack a [N, K] float32 weight into [panels, K, NR]", py::arg("weight"),
        py::arg("bf16") = false);
  m.def("linear", &linear, "[residual +] norm?(x) @ W^T with a packed W", py::arg("input"),
        py::arg("packed"), py::arg("n"), py::arg("norm_weight") = py::none(),
        py::arg("eps") = 1e-6, py::arg("residual") = py::none(),
        py::arg("scales") = py::none());
  m.def("pack_int8", &pack_int8, "pack a [N, K] float32 weight as int8 panels and row scales");
  m.def("panel_width", &panel_width, "NR, the output columns per panel");
  m.def("isa", &isa, "the instruction set the kernel was compiled for");
}
