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
//   lstm_cell_step(gates, c) -> (h', c'): the LSTM's pointwise step (lmtrain/cells/lstm.py) on
//     pre-activations gates (B, 4H) in the order i, f, g, o, without keeping what a backward needs
//   sample_rows(logits, uniforms, temperature) -> (B,) int64: per row, the first token whose
//     cumulative probability under softmax(logits / temperature) exceeds uniforms[b]
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

at::Tensor step_linear(at::Tensor x, at::Tensor panels, at::Tensor scales, at::Tensor sums, at::Tensor bias, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "step_linear: x must be a float32 matrix");
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.numel() == n && panels.size(0) == (n + kPanel - 1) / kPanel,
              "step_linear: bias or panels do not match n");
  x = x.contiguous();
  bias = bias.contiguous();
  int64_t m = x.size(0), k = x.size(1);
  at::Tensor out = at::empty({m, n}, x.options());
  float* y = out.data_ptr<float>();
  const float* b = bias.const_data_ptr<float>();
  auto kind = panels.scalar_type();
  if (kind == at::kFloat) {
    TORCH_CHECK(panels.dim() == 3 && panels.size(1) == k && panels_available(false), "step_linear: float32 panels of another K");
    panel_gemm(x.const_data_ptr<float>(), m, k, panels.const_data_ptr<float>(), n, y, false);
    for (int64_t r = 0; r < m; ++r)
      for (int64_t j = 0; j < n; ++j) y[r * n + j] += b[j];
    return out;
  }
  if (kind == at::kBFloat16) {
#if defined(__AVX512BF16__)
    int64_t pairs = (k + 1) / 2;
    TORCH_CHECK(panels.dim() == 4 && panels.size(1) == pairs, "step_linear: bfloat16 panels of another K");
    at::Tensor xb = at::zeros({m, 2 * pairs}, x.options().dtype(at::kBFloat16));
    xb.narrow(1, 0, k).copy_(x);
    const uint16_t* xp = reinterpret_cast<const uint16_t*>(xb.const_data_ptr<at::BFloat16>());
    const uint16_t* wp = reinterpret_cast<const uint16_t*>(panels.const_data_ptr<at::BFloat16>());
    for_each_block(m, n, [&](int64_t p, int64_t r0, int rows, uint32_t m0, uint32_t m1) {
      rows_bf16<kMaxRows>(rows, xp + r0 * 2 * pairs, 2 * pairs, wp + p * pairs * kPanel * 2, pairs, y + r0 * n + p * kPanel, n,
                          b + p * kPanel, m0, m1);
    });
    return out;
#else
    TORCH_CHECK(false, "step_linear: bfloat16 panels need AVX512-BF16");
#endif
  }
  TORCH_CHECK(kind == at::kChar, "step_linear: panels must be float32, bfloat16 or int8");
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  int64_t quads = (k + 3) / 4;
  TORCH_CHECK(panels.dim() == 4 && panels.size(1) == quads && scales.numel() >= n && sums.numel() >= n,
              "step_linear: int8 panels of another K, or their scales and sums missing");
  std::vector<uint8_t> xq(m * 4 * quads);
  std::vector<float> x_scales(m);
  quantise_rows(x.const_data_ptr<float>(), m, k, 4 * quads, xq.data(), x_scales.data());
  const int8_t* wp = panels.const_data_ptr<int8_t>();
  const float* ws = scales.const_data_ptr<float>();
  const int32_t* su = sums.const_data_ptr<int32_t>();
  // A step's weights (11.6 MB at 2 × 650) do not stay in the cache from one step to the next, so
  // each row block also prefetches its share of the next panel: the next panel's first block then
  // finds it in the cache instead of waiting on memory in one burst while the later blocks wait on
  // nothing (the last panel prefetches itself again, harmlessly). With one row block there is no
  // such burst, and the hardware's own prefetch does better (1 stream: about 7 % slower with ours),
  // so the block "prefetches" the lines it is loading anyway.
  int64_t panel_bytes = quads * kPanel * 4, num_panels = panels.size(0), row_blocks = (m + kMaxRows - 1) / kMaxRows;
  int64_t rows_per_block = (m + row_blocks - 1) / row_blocks, share = panel_bytes / row_blocks;
  int64_t ahead = row_blocks > 1 ? 1 : 0;
  for_each_block(m, n, [&](int64_t p, int64_t r0, int rows, uint32_t m0, uint32_t m1) {
    const int8_t* next = wp + std::min(p + ahead, num_panels - 1) * panel_bytes + (r0 / rows_per_block) * share;
    rows_int8<kMaxRows>(rows, xq.data() + r0 * 4 * quads, 4 * quads, wp + p * panel_bytes, quads, y + r0 * n + p * kPanel,
                        n, x_scales.data() + r0, ws + p * kPanel, su + p * kPanel, b + p * kPanel, m0, m1, next, share);
  });
  return out;
#else
  TORCH_CHECK(false, "step_linear: int8 panels need AVX512-VNNI");
#endif
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
  at::parallel_for(0, batch, std::max<int64_t>(1, 8192 / std::max<int64_t>(hidden, 1)), [&](int64_t begin, int64_t end) {
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
  });
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

at::Tensor sample_rows(at::Tensor logits, at::Tensor uniforms, double temperature) {
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 2 && uniforms.scalar_type() == at::kFloat &&
                  uniforms.numel() == logits.size(0) && temperature > 0,
              "sample_rows: float32 logits (B, V), float32 uniforms (B,), temperature > 0");
  logits = logits.contiguous();
  uniforms = uniforms.contiguous();
  int64_t rows = logits.size(0), vocab = logits.size(1);
  int64_t blocks = (vocab + kBlock - 1) / kBlock, padded = blocks * kBlock;
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  const float* l = logits.const_data_ptr<float>();
  const float* u = uniforms.const_data_ptr<float>();
  int64_t* picked = out.data_ptr<int64_t>();
  float inverse = static_cast<float>(1.0 / temperature);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> weights(padded, 0.0f), block_sums(blocks);
    for (int64_t r = begin; r < end; ++r) {
      const float* row = l + r * vocab;
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
      // the first token whose cumulative weight exceeds u * total; a weight-0 token never
      double threshold = static_cast<double>(u[r]) * total, running = 0;
      int64_t choice = -1, last_positive = 0;
      for (int64_t b = 0; b < blocks && choice < 0; ++b) {
        if (running + block_sums[b] <= threshold) {
          running += block_sums[b];
          continue;
        }
        for (int64_t v = b * kBlock; v < std::min(vocab, (b + 1) * kBlock); ++v) {
          if (weights[v] <= 0) continue;
          last_positive = v;
          running += weights[v];
          if (running > threshold) {
            choice = v;
            break;
          }
        }
      }
      if (choice < 0) {  // rounding left the threshold past the end: the last token that can be drawn
        for (int64_t v = vocab - 1; v >= 0; --v)
          if (weights[v] > 0) {
            choice = v;
            break;
          }
        if (choice < 0) choice = last_positive;
      }
      picked[r] = choice;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmtrain, m) {
  m.def("lstm_cell_step(Tensor gates, Tensor c) -> (Tensor, Tensor)", &lstm_cell_step);
  m.def("sample_rows(Tensor logits, Tensor uniforms, float temperature) -> Tensor", &sample_rows);
  m.def("step_pack_int8(Tensor w) -> (Tensor, Tensor, Tensor)", &step_pack_int8);
  m.def("step_linear(Tensor x, Tensor panels, Tensor scales, Tensor sums, Tensor bias, int n) -> Tensor", &step_linear);
  m.def("step_available(int kind) -> bool", &step_available);
}
