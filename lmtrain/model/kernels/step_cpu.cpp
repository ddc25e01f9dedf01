// Products for one time step of generation: out (M, N) = x (M, K) @ W^T + bias, M small (1 to
// a few dozen streams), W fixed for the whole generation and prepared once.
//
// At M = 1 each product reads every weight once and does one multiply-add with it, so its speed
// is the speed at which the weights arrive: a 2 × 650 LSTM with a 10k vocabulary holds 53 MB of
// float32 weights, more than this CPU's 32 MB L3 cache, so every token would wait on main memory.
// Smaller weights fit in the cache and arrive several times faster, so W may be held as
//
//   float32   panels (ceil(N/32), K, 32)             exact
//   bfloat16  pair panels (ceil(N/32), ceil(K/2), 32, 2); x is rounded to bfloat16 too, products
//             accumulate in float32 (vdpbf16ps)
//   int8      quad panels (ceil(N/32), ceil(K/4), 32, 4) with one scale per output row
//             (w ≈ scale_n · q_nk, |q| ≤ 127); x is quantised per row the same way
//             (x ≈ scale_m · p_mk) and stored as p + 128 in unsigned bytes, because vpdpbusd
//             multiplies unsigned by signed bytes; the products accumulate exactly in int32 and
//             the offset comes back out through the row sums of q:
//                 Σ_k (p + 128) q = Σ_k p q + 128 Σ_k q
//
//   step_pack_int8(w) -> (panels, scales, sums)
//   step_linear(x, panels, scales, sums, bias, n) -> (M, n) float32
//     panels from pack_panels (float32 or bfloat16 weight) or step_pack_int8; scales and sums
//     are empty tensors except for int8.
//   lstm_cell_step(gates, c) -> (h', c'): the LSTM's pointwise step (lmtrain/model/cells/lstm.py) on
//     pre-activations gates (B, 4H) in the order i, f, g, o, without keeping what a backward needs
//   sample_rows(logits, uniforms, temperature) -> (B,) int64: per row, the first token whose
//     cumulative probability under softmax(logits / temperature) exceeds uniforms[b]
//   lstm_stack_step(tokens, table, panels[], scales[], sums[], biases[], h[], c[], out[], scratch):
//     a whole step of an LSTM stack as the ops above would take it, in one parallel region,
//     writing out = [logits, h'..., c'...]
//   lstm_stack_draw(logits, uniforms, temperature, table, ..., out[], scratch) -> tokens: the draw
//     of sample_rows, then that step
//
// Every row of x is computed on its own, in the same order whatever M is, so a stream's logits
// do not depend on how many streams run beside it (batched sampling equals one-by-one).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "fast_math.h"
#include "panel_gemm.h"

namespace {

bool int8_available() {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  return true;
#else
  return false;
#endif
}

bool step_available(int64_t kind) {  // 0 float32, 1 bfloat16, 2 int8
  if (kind == 2) return int8_available();
  return panels_available(kind == 1);
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)

// acc0 += x_quad · w0, acc1 += x_quad · w1: one row's step of block_int8, 4 bytes of x broadcast to
// all 16 lanes. Written in asm because GCC 12, given the same step as intrinsics over arrays of
// 24 accumulators, keeps 15 of them on the stack and loads and stores them every k-quad: the loop
// then runs at half of vpdpbusd's rate (≈ 190 instead of ≈ 400 G multiply-adds/s on 2 cores).
__attribute__((always_inline)) inline void dot_quad(__m512i& acc0, __m512i& acc1, const uint8_t* x_quad, __m512i w0, __m512i w1) {
  __m512i xv;
  asm("vpbroadcastd %[x], %[xv]\n\t"
      "vpdpbusd %[w0], %[xv], %[acc0]\n\t"
      "vpdpbusd %[w1], %[xv], %[acc1]"
      : [acc0] "+v"(acc0), [acc1] "+v"(acc1), [xv] "=&v"(xv)
      : [w0] "v"(w0), [w1] "v"(w1), [x] "m"(*reinterpret_cast<const int32_t*>(x_quad)));
}

// out rows (ROWS, 32) = dequantised x rows (ROWS, K) · one panel (K/4, 32, 4) + bias. The
// accumulators start at -128 Σ_k q, so they end at Σ_k p q (the unsigned offset of x taken out).
template <int ROWS>
__attribute__((always_inline)) inline void block_int8(const uint8_t* __restrict__ x, int64_t ldx, const int8_t* __restrict__ wp,
                                                      int64_t quads, float* __restrict__ out, int64_t ldo,
                                                      const float* __restrict__ x_scales, const float* __restrict__ w_scales,
                                                      const int32_t* __restrict__ sums, const float* __restrict__ bias,
                                                      __mmask16 m0, __mmask16 m1, const int8_t* prefetch, int64_t prefetch_bytes) {
  __m512i offset0 = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(m0, sums), 7);  // 128 Σ_k q
  __m512i offset1 = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(m1, sums + 16), 7);
  __m512i acc0[ROWS], acc1[ROWS];
#pragma GCC unroll 12
  for (int r = 0; r < ROWS; ++r) {
    acc0[r] = _mm512_sub_epi32(_mm512_setzero_si512(), offset0);
    acc1[r] = _mm512_sub_epi32(_mm512_setzero_si512(), offset1);
  }
  for (int64_t q = 0; q < quads; ++q) {
    __m512i w0 = _mm512_load_si512(wp + q * kPanel * 4);
    __m512i w1 = _mm512_load_si512(wp + q * kPanel * 4 + 64);
    _mm_prefetch(reinterpret_cast<const char*>(prefetch + q * prefetch_bytes / quads), _MM_HINT_T0);
#pragma GCC unroll 12
    for (int r = 0; r < ROWS; ++r) dot_quad(acc0[r], acc1[r], x + r * ldx + 4 * q, w0, w1);
  }
  __m512 ws0 = _mm512_maskz_loadu_ps(m0, w_scales), ws1 = _mm512_maskz_loadu_ps(m1, w_scales + 16);
  __m512 b0 = _mm512_maskz_loadu_ps(m0, bias), b1 = _mm512_maskz_loadu_ps(m1, bias + 16);
#pragma GCC unroll 12
  for (int r = 0; r < ROWS; ++r) {
    __m512 xs = _mm512_set1_ps(x_scales[r]);
    __m512 y0 = _mm512_cvtepi32_ps(acc0[r]);
    __m512 y1 = _mm512_cvtepi32_ps(acc1[r]);
    _mm512_mask_storeu_ps(out + r * ldo, m0, _mm512_fmadd_ps(y0, _mm512_mul_ps(xs, ws0), b0));
    _mm512_mask_storeu_ps(out + r * ldo + 16, m1, _mm512_fmadd_ps(y1, _mm512_mul_ps(xs, ws1), b1));
  }
}

template <int ROWS>
void rows_int8(int rows, const uint8_t* x, int64_t ldx, const int8_t* wp, int64_t quads, float* out, int64_t ldo,
               const float* x_scales, const float* w_scales, const int32_t* sums, const float* bias, __mmask16 m0, __mmask16 m1,
               const int8_t* prefetch, int64_t prefetch_bytes) {
  if constexpr (ROWS > 0) {
    if (rows == ROWS)
      return block_int8<ROWS>(x, ldx, wp, quads, out, ldo, x_scales, w_scales, sums, bias, m0, m1, prefetch, prefetch_bytes);
    return rows_int8<ROWS - 1>(rows, x, ldx, wp, quads, out, ldo, x_scales, w_scales, sums, bias, m0, m1, prefetch, prefetch_bytes);
  }
}

#endif

#if defined(__AVX512BF16__)

// panel_block_bf16 of panel_gemm.h with a float32 output and the bias added
template <int ROWS>
__attribute__((always_inline)) inline void block_bf16(const uint16_t* __restrict__ x, int64_t ldx, const uint16_t* __restrict__ wp,
                                                      int64_t pairs, float* __restrict__ out, int64_t ldo,
                                                      const float* __restrict__ bias, __mmask16 m0, __mmask16 m1) {
  __m512 acc0[ROWS], acc1[ROWS];
#pragma GCC unroll 12
  for (int r = 0; r < ROWS; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  dot_bf16_pairs<ROWS>(x, ldx, wp, pairs, acc0, acc1);
  __m512 b0 = _mm512_maskz_loadu_ps(m0, bias), b1 = _mm512_maskz_loadu_ps(m1, bias + 16);
#pragma GCC unroll 12
  for (int r = 0; r < ROWS; ++r) {
    _mm512_mask_storeu_ps(out + r * ldo, m0, _mm512_add_ps(acc0[r], b0));
    _mm512_mask_storeu_ps(out + r * ldo + 16, m1, _mm512_add_ps(acc1[r], b1));
  }
}

template <int ROWS>
void rows_bf16(int rows, const uint16_t* x, int64_t ldx, const uint16_t* wp, int64_t pairs, float* out, int64_t ldo,
               const float* bias, __mmask16 m0, __mmask16 m1) {
  if constexpr (ROWS > 0) {
    if (rows == ROWS) return block_bf16<ROWS>(x, ldx, wp, pairs, out, ldo, bias, m0, m1);
    return rows_bf16<ROWS - 1>(rows, x, ldx, wp, pairs, out, ldo, bias, m0, m1);
  }
}

#endif

std::tuple<at::Tensor, at::Tensor, at::Tensor> step_pack_int8(at::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "step_pack_int8: a float32 matrix");
  w = w.contiguous();
  int64_t n = w.size(0), k = w.size(1), panels = (n + kPanel - 1) / kPanel, quads = (k + 3) / 4;
  at::Tensor out = at::zeros({panels, quads, kPanel, 4}, w.options().dtype(at::kChar));
  at::Tensor scales = at::empty({panels * kPanel}, w.options());
  at::Tensor sums = at::zeros({panels * kPanel}, w.options().dtype(at::kInt));
  const float* src = w.const_data_ptr<float>();
  int8_t* dst = out.data_ptr<int8_t>();
  float* sc = scales.data_ptr<float>();
  int32_t* su = sums.data_ptr<int32_t>();
  at::parallel_for(0, panels * kPanel, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      if (row >= n) {
        sc[row] = 0.0f;
        continue;
      }
      const float* w_row = src + row * k;
      float amax = 0.0f;
      for (int64_t kk = 0; kk < k; ++kk) amax = std::max(amax, std::abs(w_row[kk]));
      float scale = amax > 0 ? amax / 127.0f : 1.0f;
      int64_t p = row / kPanel, j = row % kPanel;
      int32_t total = 0;
      for (int64_t kk = 0; kk < k; ++kk) {
        int32_t q = static_cast<int32_t>(std::nearbyint(w_row[kk] / scale));
        q = std::min(127, std::max(-127, q));
        dst[((p * quads + kk / 4) * kPanel + j) * 4 + kk % 4] = static_cast<int8_t>(q);
        total += q;
      }
      sc[row] = scale;
      su[row] = total;
    }
  });
  return {out, scales, sums};
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)

// the largest |x_k| of one row (K,), NaN left out (max_ps(a, b) is b where a is NaN)
float row_amax(const float* row, int64_t k) {
  __m512 top = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k; kk += 16) {
    __mmask16 mask = k - kk >= 16 ? 0xFFFF : (1u << (k - kk)) - 1;
    top = _mm512_max_ps(_mm512_abs_ps(_mm512_maskz_loadu_ps(mask, row + kk)), top);
  }
  return _mm512_reduce_max_ps(top);
}

// x (M, K) float32 -> p + 128 as bytes (M, 4 ceil(K/4)), padding 128 (p = 0), and each row's scale.
// p = round-half-even(x / scale) clamped to ±127, as std::nearbyint gives in the default rounding
// mode; 16 at a time (scalar code here cost about as much as a third of the K = 650 product).
void quantise_rows(const float* x, int64_t m, int64_t k, int64_t width, uint8_t* out, float* scales) {
  const __m512i low = _mm512_set1_epi32(-127), high = _mm512_set1_epi32(127), offset = _mm512_set1_epi32(128);
  for (int64_t r = 0; r < m; ++r) {
    const float* row = x + r * k;
    float amax = row_amax(row, k);
    float scale = amax > 0 ? amax / 127.0f : 1.0f, inverse = 1.0f / scale;
    __m512 inv = _mm512_set1_ps(inverse);
    uint8_t* dst = out + r * width;
    for (int64_t kk = 0; kk < k; kk += 16) {
      __mmask16 mask = k - kk >= 16 ? 0xFFFF : (1u << (k - kk)) - 1;
      __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, row + kk), inv));
      q = _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(q, low), high), offset);
      _mm512_mask_cvtepi32_storeu_epi8(dst + kk, mask, q);
    }
    std::fill(dst + k, dst + width, uint8_t{128});
    scales[r] = scale;
  }
}

#endif

// One product of a step, its weight prepared: out (M, n) = x (M, k) W^T + bias, W as the panels
// of one kind (float32, bfloat16 or int8, with the scales and row sums of int8).
struct StepProduct {
  at::ScalarType kind;
  const void* panels;
  const float* scales;
  const int32_t* sums;
  const float* bias;
  int64_t n, k, num_panels;
};

StepProduct step_product(const at::Tensor& panels, const at::Tensor& scales, const at::Tensor& sums, const at::Tensor& bias,
                         int64_t n, int64_t k) {
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.numel() == n &&
                  panels.is_contiguous() && panels.size(0) == (n + kPanel - 1) / kPanel,
              "step_linear: bias or panels do not match n");
  auto kind = panels.scalar_type();
  StepProduct p{kind, panels.const_data_ptr(), nullptr, nullptr, bias.const_data_ptr<float>(), n, k, panels.size(0)};
  if (kind == at::kFloat) {
    TORCH_CHECK(panels.dim() == 3 && panels.size(1) == k && panels_available(false), "step_linear: float32 panels of another K");
  } else if (kind == at::kBFloat16) {
    TORCH_CHECK(panels_available(true), "step_linear: bfloat16 panels need AVX512-BF16");
    TORCH_CHECK(panels.dim() == 4 && panels.size(1) == (k + 1) / 2, "step_linear: bfloat16 panels of another K");
  } else {
    TORCH_CHECK(kind == at::kChar, "step_linear: panels must be float32, bfloat16 or int8");
    TORCH_CHECK(int8_available(), "step_linear: int8 panels need AVX512-VNNI");
    TORCH_CHECK(panels.dim() == 4 && panels.size(1) == (k + 3) / 4 && scales.scalar_type() == at::kFloat &&
                    sums.scalar_type() == at::kInt && scales.is_contiguous() && sums.is_contiguous() &&
                    scales.numel() >= n && sums.numel() >= n,
                "step_linear: int8 panels of another K, or their scales and sums missing");
    p.scales = scales.const_data_ptr<float>();
    p.sums = sums.const_data_ptr<int32_t>();
  }
  return p;
}

constexpr int64_t round_up_64(int64_t bytes) { return (bytes + 63) / 64 * 64; }

// x as a product reads it, for M rows: float32 as it is, bfloat16 pairs (rounded to nearest
// even, padding 0), or the bytes p + 128 of int8 quads with one scale per row (quantise_rows),
// in memory the caller gives (`bytes(p, m)` of it)
struct StepOperand {
  int64_t width;   // elements per row: k, 2 ceil(k/2) or 4 ceil(k/4)
  uint8_t* data;   // M rows of width elements (float32, bfloat16 bits or bytes)
  float* scales;   // int8: one scale per row

  static int64_t width_of(const StepProduct& p) {
    return p.kind == at::kFloat ? p.k : p.kind == at::kBFloat16 ? 2 * ((p.k + 1) / 2) : 4 * ((p.k + 3) / 4);
  }
  static int64_t element_bytes(const StepProduct& p) { return p.kind == at::kFloat ? 4 : p.kind == at::kBFloat16 ? 2 : 1; }
  static int64_t bytes(const StepProduct& p, int64_t m) {
    return round_up_64(m * width_of(p) * element_bytes(p)) + (p.kind == at::kChar ? round_up_64(m * 4) : 0);
  }

  StepOperand(const StepProduct& p, int64_t m, uint8_t* memory)
      : width(width_of(p)), data(memory), scales(reinterpret_cast<float*>(memory + round_up_64(m * width * element_bytes(p)))) {}

  const float* f() const { return reinterpret_cast<const float*>(data); }
  const uint16_t* b() const { return reinterpret_cast<const uint16_t*>(data); }

  // rows [r0, r1) of x (rows of k float32, ldx apart)
  void fill(const StepProduct& p, const float* x, int64_t ldx, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = x + r * ldx;
      if (p.kind == at::kFloat) {
        std::copy(row, row + p.k, reinterpret_cast<float*>(data) + r * width);
      } else if (p.kind == at::kBFloat16) {
        uint16_t* out = reinterpret_cast<uint16_t*>(data) + r * width;
        for (int64_t kk = 0; kk < p.k; ++kk) {
          if (std::isnan(row[kk]))
            out[kk] = 0x7FC0;
          else
            store(reinterpret_cast<at::BFloat16*>(out), kk, row[kk]);
        }
        std::fill(out + p.k, out + width, uint16_t{0});
      } else {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
        quantise_rows(row, 1, p.k, width, data + r * width, scales + r);
#endif
      }
    }
  }
};

// items [begin, end) (blocks_in) of out (M, n) = operand · W^T + bias
void product_blocks(const StepProduct& p, const StepOperand& x, int64_t m, float* y, int64_t begin, int64_t end) {
  int64_t n = p.n;
  if (p.kind == at::kFloat) {
#if defined(__AVX512F__)
    const float* wp = static_cast<const float*>(p.panels);
    blocks_in(m, n, begin, end, [&](int64_t panel, int64_t r0, int rows, uint32_t m0, uint32_t m1) {
      float* out = y + r0 * n + panel * kPanel;
      panel_rows<kMaxRows>(rows, x.f() + r0 * x.width, x.width, wp + panel * p.k * kPanel, p.k, out, n, m0, m1, false);
      int64_t cols = std::min<int64_t>(kPanel, n - panel * kPanel);
      for (int r = 0; r < rows; ++r)
        for (int64_t j = 0; j < cols; ++j) out[r * n + j] += p.bias[panel * kPanel + j];
    });
#endif
    return;
  }
  if (p.kind == at::kBFloat16) {
#if defined(__AVX512BF16__)
    int64_t pairs = x.width / 2;
    const uint16_t* wp = reinterpret_cast<const uint16_t*>(p.panels);
    blocks_in(m, n, begin, end, [&](int64_t panel, int64_t r0, int rows, uint32_t m0, uint32_t m1) {
      rows_bf16<kMaxRows>(rows, x.b() + r0 * x.width, x.width, wp + panel * pairs * kPanel * 2, pairs,
                          y + r0 * n + panel * kPanel, n, p.bias + panel * kPanel, m0, m1);
    });
#endif
    return;
  }
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  // A step's weights (11.6 MB at 2 × 650) do not stay in the cache from one step to the next, so
  // each row block also prefetches its share of the next panel: the next panel's first block then
  // finds it in the cache instead of waiting on memory in one burst while the later blocks wait on
  // nothing (the last panel prefetches itself again, harmlessly). With one row block there is no
  // such burst, and the hardware's own prefetch does better (1 stream: about 7 % slower with ours),
  // so the block "prefetches" the lines it is loading anyway.
  int64_t quads = x.width / 4;
  const int8_t* wp = static_cast<const int8_t*>(p.panels);
  int64_t panel_bytes = quads * kPanel * 4, row_blocks = (m + kMaxRows - 1) / kMaxRows;
  int64_t rows_per_block = (m + row_blocks - 1) / row_blocks, share = panel_bytes / row_blocks;
  int64_t ahead = row_blocks > 1 ? 1 : 0;
  blocks_in(m, n, begin, end, [&](int64_t panel, int64_t r0, int rows, uint32_t m0, uint32_t m1) {
    const int8_t* next = wp + std::min(panel + ahead, p.num_panels - 1) * panel_bytes + (r0 / rows_per_block) * share;
    rows_int8<kMaxRows>(rows, x.data + r0 * x.width, x.width, wp + panel * panel_bytes, quads, y + r0 * n + panel * kPanel,
                        n, x.scales + r0, p.scales + panel * kPanel, p.sums + panel * kPanel, p.bias + panel * kPanel, m0,
                        m1, next, share);
  });
#endif
}

at::Tensor step_linear(at::Tensor x, at::Tensor panels, at::Tensor scales, at::Tensor sums, at::Tensor bias, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "step_linear: x must be a float32 matrix");
  x = x.contiguous();
  int64_t m = x.size(0), k = x.size(1);
  panels = panels.contiguous();
  scales = scales.contiguous();
  sums = sums.contiguous();
  bias = bias.contiguous();
  StepProduct p = step_product(panels, scales, sums, bias, n, k);
  at::Tensor memory = at::empty({StepOperand::bytes(p, m)}, x.options().dtype(at::kByte));
  StepOperand operand(p, m, memory.data_ptr<uint8_t>());
  operand.fill(p, x.const_data_ptr<float>(), k, 0, m);
  at::Tensor out = at::empty({m, n}, x.options());
  float* y = out.data_ptr<float>();
  at::parallel_for(0, block_count(m, n), 1, [&](int64_t begin, int64_t end) { product_blocks(p, operand, m, y, begin, end); });
  return out;
}

// rows [begin, end) of the LSTM's pointwise step: gates (B, 4H) in the order i, f, g, o and c
// (B, H) -> h', c'. Not inlined, so the single-step op and the stack's step run the same code
// and give the same bits.
__attribute__((noinline)) void lstm_rows(const float* g, const float* cp, float* ho, float* co, int64_t begin, int64_t end,
                                         int64_t hidden) {
  for (int64_t b = begin; b < end; ++b) {
    const float* pi = g + b * 4 * hidden;
    const float* pf = pi + hidden;
    const float* pg = pi + 2 * hidden;
    const float* po = pi + 3 * hidden;
#pragma GCC ivdep
    for (int64_t j = 0; j < hidden; ++j) {
      float cell = sigmoid_fast(pf[j]) * cp[b * hidden + j] + sigmoid_fast(pi[j]) * tanh_fast(pg[j]);
      co[b * hidden + j] = cell;
      ho[b * hidden + j] = sigmoid_fast(po[j]) * tanh_fast(cell);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> lstm_cell_step(at::Tensor gates, at::Tensor c) {
  TORCH_CHECK(gates.scalar_type() == at::kFloat && c.scalar_type() == at::kFloat && gates.dim() == 2 && c.dim() == 2 &&
                  gates.size(0) == c.size(0) && gates.size(1) == 4 * c.size(1),
              "lstm_cell_step: float32 gates (B, 4H) and c (B, H)");
  gates = gates.contiguous();
  c = c.contiguous();
  int64_t batch = c.size(0), hidden = c.size(1);
  at::Tensor h_out = at::empty_like(c), c_out = at::empty_like(c);
  const float* g = gates.const_data_ptr<float>();
  const float* cp = c.const_data_ptr<float>();
  float* ho = h_out.data_ptr<float>();
  float* co = c_out.data_ptr<float>();
  at::parallel_for(0, batch, std::max<int64_t>(1, 8192 / std::max<int64_t>(hidden, 1)),
                   [&](int64_t begin, int64_t end) { lstm_rows(g, cp, ho, co, begin, end, hidden); });
  return {h_out, c_out};
}

constexpr int64_t kLanes = 16;   // partial maxima and sums kept per lane, so the loops vectorise
constexpr int64_t kBlock = 256;  // the cumulative sum is searched block by block, then within one

// the largest of row (V,), NaN left out
float row_max(const float* row, int64_t vocab) {
  int64_t whole = vocab / kLanes * kLanes;
  float top = -std::numeric_limits<float>::infinity();
#if defined(__AVX512F__)
  // GCC leaves the lane loop below scalar (a third of sample_rows' time); max_ps(x, m) keeps m
  // where x is NaN, as the comparison does
  __m512 lanes = _mm512_set1_ps(top);
  for (int64_t v = 0; v < whole; v += kLanes) lanes = _mm512_max_ps(_mm512_loadu_ps(row + v), lanes);
  top = _mm512_reduce_max_ps(lanes);
#else
  float lane_max[kLanes];
  std::fill(lane_max, lane_max + kLanes, top);
  for (int64_t v = 0; v < whole; v += kLanes)
    for (int64_t t = 0; t < kLanes; ++t) lane_max[t] = row[v + t] > lane_max[t] ? row[v + t] : lane_max[t];
  top = *std::max_element(lane_max, lane_max + kLanes);
#endif
  for (int64_t v = whole; v < vocab; ++v) top = std::max(top, row[v]);
  return top;
}

// The buffers one thread needs to draw from rows of `vocab` logits.
struct DrawBuffers {
  std::vector<float> weights, block_sums;
  explicit DrawBuffers(int64_t vocab)
      : weights((vocab + kBlock - 1) / kBlock * kBlock, 0.0f), block_sums((vocab + kBlock - 1) / kBlock) {}
};

// one row of logits (V,) -> the first token whose cumulative weight exp((l - max) / T) exceeds
// u times the total; a weight-0 token is never drawn. inverse = 1 / T.
int64_t sample_row(const float* row, int64_t vocab, float u, float inverse, DrawBuffers& buffers) {
  float* weights = buffers.weights.data();
  float* block_sums = buffers.block_sums.data();
  int64_t blocks = (vocab + kBlock - 1) / kBlock;
  float top = row_max(row, vocab);
  // the weights and their block sums in one pass while the block is in registers; the last,
  // partial block reads no further than the row (its padding stays 0)
  double total = 0;
  int64_t full_blocks = vocab / kBlock;
  for (int64_t b = 0; b < blocks; ++b) {
    float lane_sum[kLanes] = {};
    if (b < full_blocks) {
      for (int64_t v = b * kBlock; v < (b + 1) * kBlock; v += kLanes)
#pragma GCC ivdep
        for (int64_t t = 0; t < kLanes; ++t) {
          float z = (row[v + t] - top) * inverse;
          float w = z < -87.0f ? 0.0f : exp_poly(z);  // below e^-87 (and -inf, a masked token) counts as 0
          weights[v + t] = w;
          lane_sum[t] += w;
        }
    } else {
      for (int64_t v = b * kBlock; v < vocab; ++v) {
        float z = (row[v] - top) * inverse;
        weights[v] = z < -87.0f ? 0.0f : exp_poly(z);
      }
      for (int64_t v = b * kBlock; v < (b + 1) * kBlock; v += kLanes)
        for (int64_t t = 0; t < kLanes; ++t) lane_sum[t] += weights[v + t];
    }
    float sum = 0;
    for (int64_t t = 0; t < kLanes; ++t) sum += lane_sum[t];
    block_sums[b] = sum;
    total += sum;
  }
  // the first token whose cumulative weight exceeds u * total
  double threshold = static_cast<double>(u) * total, running = 0;
  int64_t last_positive = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    if (running + block_sums[b] <= threshold) {
      running += block_sums[b];
      continue;
    }
    for (int64_t v = b * kBlock; v < std::min(vocab, (b + 1) * kBlock); ++v) {
      if (weights[v] <= 0) continue;
      last_positive = v;
      running += weights[v];
      if (running > threshold) return v;
    }
  }
  // rounding left the threshold past the end: the last token that can be drawn
  for (int64_t v = vocab - 1; v >= 0; --v)
    if (weights[v] > 0) return v;
  return last_positive;
}

at::Tensor sample_rows(at::Tensor logits, at::Tensor uniforms, double temperature) {
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 2 && uniforms.scalar_type() == at::kFloat &&
                  uniforms.numel() == logits.size(0) && temperature > 0,
              "sample_rows: float32 logits (B, V), float32 uniforms (B,), temperature > 0");
  logits = logits.contiguous();
  uniforms = uniforms.contiguous();
  int64_t rows = logits.size(0), vocab = logits.size(1);
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  const float* l = logits.const_data_ptr<float>();
  const float* u = uniforms.const_data_ptr<float>();
  int64_t* picked = out.data_ptr<int64_t>();
  float inverse = static_cast<float>(1.0 / temperature);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    DrawBuffers buffers(vocab);
    for (int64_t r = begin; r < end; ++r) picked[r] = sample_row(l + r * vocab, vocab, u[r], inverse, buffers);
  });
  return out;
}

// [begin, end) of `count`, the share of thread `tid` of `team` (as at::parallel_for splits a range)
std::pair<int64_t, int64_t> share_of(int64_t count, int tid, int team) {
  int64_t chunk = (count + team - 1) / team;
  return {std::min(count, tid * chunk), std::min(count, (tid + 1) * chunk)};
}

// A whole step of an LSTM stack, with the products, the pointwise steps and the hand-overs between
// layers in one parallel region: the same computation, bit for bit, as the stepper's ops one by
// one (step_linear, lstm_cell_step, index_select, cat), without their dispatches, thread
// start-ups and fresh buffers (at one stream, a fifth to a quarter of the op-by-op step's time).
//
//   tokens (B,) int64, or drawn first from draw = (logits (B, V), uniforms (B,), temperature) as
//     sample_rows draws them, each thread its own rows
//   table (V, 4 H_0) = E W_ih^T + b_ih of layer 0
//   products: L + 1 of them, as (panels, scales, sums, bias) lists: layer 0's W_hh (K = H_0),
//     layer l's [W_ih, W_hh] side by side (K = H_{l-1} + H_l), then the decoder (K = H_{L-1})
//   h, c: L tensors (B, H_l)
//   out: logits (B, V), h'_0 .. h'_{L-1}, c'_0 .. c'_{L-1}, written; none of them an input
//   scratch: bytes for the gates and the products' operands, grown when too small
//   -> the tokens (B,)
//
// Threads split the rows for the pointwise work and the (panel, row block) items for the products,
// with a barrier wherever one needs what another wrote.
struct Draw {
  at::Tensor logits, uniforms;
  double temperature;
};

at::Tensor stack_step(at::Tensor tokens, const Draw* draw, at::Tensor table, std::vector<at::Tensor> panels,
                      std::vector<at::Tensor> scales, std::vector<at::Tensor> sums, std::vector<at::Tensor> biases,
                      std::vector<at::Tensor> h, std::vector<at::Tensor> c, const std::vector<at::Tensor>& out,
                      at::Tensor& scratch) {
  int64_t layers = static_cast<int64_t>(h.size());
  TORCH_CHECK(layers >= 1 && c.size() == h.size() && panels.size() == h.size() + 1 && scales.size() == panels.size() &&
                  sums.size() == panels.size() && biases.size() == panels.size() &&
                  static_cast<int64_t>(out.size()) == 2 * layers + 1,
              "lstm_stack_step: L states, L + 1 products and 2 L + 1 outputs");
  table = table.contiguous();
  int64_t vocab_rows = table.size(0);
  at::Tensor draw_logits, uniforms;
  if (draw != nullptr) {
    draw_logits = draw->logits.contiguous();
    uniforms = draw->uniforms.contiguous();
    TORCH_CHECK(draw_logits.scalar_type() == at::kFloat && draw_logits.dim() == 2 && uniforms.scalar_type() == at::kFloat &&
                    uniforms.numel() == draw_logits.size(0) && draw_logits.size(1) <= vocab_rows && draw->temperature > 0,
                "lstm_stack_draw: float32 logits (B, V), float32 uniforms (B,), temperature > 0");
    tokens = at::empty({draw_logits.size(0)}, draw_logits.options().dtype(at::kLong));
  }
  TORCH_CHECK(tokens.dim() == 1 && tokens.scalar_type() == at::kLong, "lstm_stack_step: tokens must be (B,) int64");
  int64_t batch = tokens.size(0);
  tokens = tokens.contiguous();
  std::vector<int64_t> hidden(layers);
  std::vector<const void*> inputs{draw_logits.defined() ? draw_logits.data_ptr() : nullptr};
  for (int64_t l = 0; l < layers; ++l) {
    h[l] = h[l].contiguous();
    c[l] = c[l].contiguous();
    hidden[l] = h[l].size(1);
    TORCH_CHECK(h[l].scalar_type() == at::kFloat && c[l].scalar_type() == at::kFloat && h[l].dim() == 2 &&
                    h[l].sizes() == c[l].sizes() && h[l].size(0) == batch,
                "lstm_stack_step: float32 states (B, H_l)");
    inputs.push_back(h[l].data_ptr());
    inputs.push_back(c[l].data_ptr());
  }
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.dim() == 2 && table.size(1) == 4 * hidden[0],
              "lstm_stack_step: a float32 table (V, 4 H_0)");
  int64_t* tok = tokens.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch && draw == nullptr; ++b)
    TORCH_CHECK(tok[b] >= 0 && tok[b] < vocab_rows, "lstm_stack_step: token ", tok[b], " outside the table");
  std::vector<StepProduct> products;
  int64_t scratch_bytes = 0;
  for (int64_t l = 0; l <= layers; ++l) {
    int64_t k = l == 0 ? hidden[0] : l < layers ? hidden[l - 1] + hidden[l] : hidden[layers - 1];
    int64_t n = l < layers ? 4 * hidden[l] : biases[l].numel();
    for (auto* t : {&panels[l], &scales[l], &sums[l], &biases[l]}) *t = t->contiguous();  // our copies of the lists
    products.push_back(step_product(panels[l], scales[l], sums[l], biases[l], n, k));
    scratch_bytes += StepOperand::bytes(products.back(), batch);
    if (l < layers) scratch_bytes += round_up_64(batch * n * 4);            // the gates
    if (0 < l && l < layers) scratch_bytes += round_up_64(batch * k * 4);   // [h'_{l-1}, h_l]
  }
  int64_t vocab = products[layers].n;
  for (int64_t i = 0; i < 2 * layers + 1; ++i) {
    int64_t width = i == 0 ? vocab : hidden[(i - 1) % layers];
    TORCH_CHECK(out[i].scalar_type() == at::kFloat && out[i].is_contiguous() && out[i].dim() == 2 && out[i].size(0) == batch &&
                    out[i].size(1) == width,
                "lstm_stack_step: outputs must be contiguous float32 (B, V), (B, H_l) x 2 L");
    TORCH_CHECK(std::find(inputs.begin(), inputs.end(), out[i].data_ptr()) == inputs.end(),
                "lstm_stack_step: an output is also an input");
  }
  TORCH_CHECK(scratch.scalar_type() == at::kByte && scratch.is_contiguous(), "lstm_stack_step: scratch must be uint8");
  if (scratch.numel() < scratch_bytes) scratch.resize_({scratch_bytes});
  uint8_t* cursor = scratch.data_ptr<uint8_t>();
  auto take = [&](int64_t bytes) { uint8_t* p = cursor; cursor += round_up_64(bytes); return p; };
  std::vector<StepOperand> operands;
  std::vector<float*> gates(layers), joint(layers, nullptr);
  for (int64_t l = 0; l <= layers; ++l) {
    operands.emplace_back(products[l], batch, take(StepOperand::bytes(products[l], batch)));
    if (l < layers) gates[l] = reinterpret_cast<float*>(take(batch * products[l].n * 4));
    if (0 < l && l < layers) joint[l] = reinterpret_cast<float*>(take(batch * products[l].k * 4));
  }
  const float* table_p = table.const_data_ptr<float>();
  int team_size = at::in_parallel_region() ? 1 : at::get_num_threads();

#pragma omp parallel num_threads(team_size)
  {
#ifdef _OPENMP
    int tid = omp_get_thread_num(), team = omp_get_num_threads();
#else
    int tid = 0, team = 1;
#endif
    auto [r0, r1] = share_of(batch, tid, team);
    if (draw != nullptr && r0 < r1) {
      int64_t width = draw_logits.size(1);
      DrawBuffers buffers(width);
      const float* rows = draw_logits.const_data_ptr<float>();
      const float* u = uniforms.const_data_ptr<float>();
      float inverse = static_cast<float>(1.0 / draw->temperature);
      for (int64_t b = r0; b < r1; ++b) tok[b] = sample_row(rows + b * width, width, u[b], inverse, buffers);
    }
    for (int64_t l = 0; l < layers; ++l) {
      int64_t width = 4 * hidden[l];
      float* h_next = out[1 + l].data_ptr<float>();
      if (l == 0) {
        operands[0].fill(products[0], h[0].const_data_ptr<float>(), hidden[0], r0, r1);
      } else {
        int64_t k = hidden[l - 1] + hidden[l];
        const float* below = out[l].const_data_ptr<float>();
        const float* mine = h[l].const_data_ptr<float>();
        for (int64_t b = r0; b < r1; ++b) {
          std::copy(below + b * hidden[l - 1], below + (b + 1) * hidden[l - 1], joint[l] + b * k);
          std::copy(mine + b * hidden[l], mine + (b + 1) * hidden[l], joint[l] + b * k + hidden[l - 1]);
        }
        operands[l].fill(products[l], joint[l], k, r0, r1);
      }
#pragma omp barrier
      float* g = gates[l];
      auto [i0, i1] = share_of(block_count(batch, width), tid, team);
      product_blocks(products[l], operands[l], batch, g, i0, i1);
#pragma omp barrier
      if (l == 0)
        for (int64_t b = r0; b < r1; ++b) {
          const float* row = table_p + tok[b] * width;
          for (int64_t j = 0; j < width; ++j) g[b * width + j] += row[j];
        }
      lstm_rows(g, c[l].const_data_ptr<float>(), h_next, out[1 + layers + l].data_ptr<float>(), r0, r1, hidden[l]);
    }
    operands[layers].fill(products[layers], out[layers].const_data_ptr<float>(), hidden[layers - 1], r0, r1);
#pragma omp barrier
    auto [i0, i1] = share_of(block_count(batch, vocab), tid, team);
    product_blocks(products[layers], operands[layers], batch, out[0].data_ptr<float>(), i0, i1);
  }
  return tokens;
}

void lstm_stack_step(at::Tensor tokens, at::Tensor table, std::vector<at::Tensor> panels, std::vector<at::Tensor> scales,
                     std::vector<at::Tensor> sums, std::vector<at::Tensor> biases, std::vector<at::Tensor> h,
                     std::vector<at::Tensor> c, std::vector<at::Tensor> out, at::Tensor scratch) {
  stack_step(tokens, nullptr, table, panels, scales, sums, biases, h, c, out, scratch);
}

// tokens drawn from logits (B, V) as sample_rows draws them, then the stack's step on them
at::Tensor lstm_stack_draw(at::Tensor logits, at::Tensor uniforms, double temperature, at::Tensor table,
                           std::vector<at::Tensor> panels, std::vector<at::Tensor> scales, std::vector<at::Tensor> sums,
                           std::vector<at::Tensor> biases, std::vector<at::Tensor> h, std::vector<at::Tensor> c,
                           std::vector<at::Tensor> out, at::Tensor scratch) {
  Draw draw{logits, uniforms, temperature};
  return stack_step(at::Tensor(), &draw, table, panels, scales, sums, biases, h, c, out, scratch);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmtrain, m) {
  m.def("lstm_cell_step(Tensor gates, Tensor c) -> (Tensor, Tensor)", &lstm_cell_step);
  m.def("sample_rows(Tensor logits, Tensor uniforms, float temperature) -> Tensor", &sample_rows);
  m.def("step_pack_int8(Tensor w) -> (Tensor, Tensor, Tensor)", &step_pack_int8);
  m.def("step_linear(Tensor x, Tensor panels, Tensor scales, Tensor sums, Tensor bias, int n) -> Tensor", &step_linear);
  m.def("step_available(int kind) -> bool", &step_available);
  m.def("lstm_stack_step(Tensor tokens, Tensor table, Tensor[] panels, Tensor[] scales, Tensor[] sums, Tensor[] biases, "
        "Tensor[] h, Tensor[] c, Tensor(a!)[] out, Tensor(b!) scratch) -> ()",
        &lstm_stack_step);
  m.def("lstm_stack_draw(Tensor logits, Tensor uniforms, float temperature, Tensor table, Tensor[] panels, Tensor[] scales, "
        "Tensor[] sums, Tensor[] biases, Tensor[] h, Tensor[] c, Tensor(a!)[] out, Tensor(b!) scratch) -> Tensor",
        &lstm_stack_draw);
}
