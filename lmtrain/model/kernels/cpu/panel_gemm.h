// A small float32 GEMM for the recurrent product of one time step: out (M, N) (+)= x (M, K) @ W^T.
//
// W (N, K) is copied once per sequence into panels of 32 outputs, (ceil(N/32), K, 32), so the
// inner loop reads 32 consecutive weights per k. Each panel is multiplied with up to 12 rows of x
// at a time: 24 AVX-512 accumulators (12 rows × 2 vectors of 16), two weight loads and 12
// broadcasts per k. Work items are (panel, row block) pairs split across threads, so batch 20
// with N = 200 still keeps both cores busy. oneDNN's inner product reaches the same arithmetic
// rate on large products, but each call costs it about 15 µs of set-up and a fresh output, which
// at batch 20 and hidden 200 is a third of the step.
//
// bfloat16 (with AVX512-BF16): the same panels hold pairs of consecutive k, (P, ceil(K/2), 32, 2),
// and each vdpbf16ps multiplies a broadcast pair of x with 16 weight pairs, accumulating in
// float32. The output is either bfloat16, read and written through float32 (round to nearest
// even), or float32 as it is: mixed precision's products (train.precision = bf16) take bfloat16
// operands and keep their float32 sums.
//
// Built only where the compiler targets AVX-512 (-march=native on such a CPU); elsewhere
// panels_available() is false and lmtrain uses oneDNN or at::mm instead.

#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kPanel = 32;
constexpr int kMaxRows = 12;

bool panels_available(bool bf16) {
#if defined(__AVX512F__)
#if defined(__AVX512BF16__)
  return true;
#else
  return !bf16;
#endif
#else
  (void)bf16;
  return false;
#endif
}

// bfloat16 w (N, K) with strides (s0, s1) -> out (P, ceil(K/2), 32, 2), the padding zero
void pack_panels_bf16_into(const uint16_t* w, int64_t n, int64_t k, int64_t s0, int64_t s1, uint16_t* out) {
  int64_t panels = (n + kPanel - 1) / kPanel, pairs = (k + 1) / 2;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      uint16_t* dst = out + p * pairs * kPanel * 2;
      std::fill(dst, dst + pairs * kPanel * 2, uint16_t{0});
      int64_t cols = std::min<int64_t>(kPanel, n - p * kPanel);
      for (int64_t j = 0; j < cols; ++j) {
        for (int64_t kk = 0; kk < k; ++kk) dst[((kk / 2) * kPanel + j) * 2 + (kk % 2)] = w[(p * kPanel + j) * s0 + kk * s1];
      }
    }
  });
}

// w (N, K) with strides (s0, s1) -> out (P, K, 32), the padding columns zero
void pack_panels_into(const float* w, int64_t n, int64_t k, int64_t s0, int64_t s1, float* out) {
  int64_t panels = (n + kPanel - 1) / kPanel;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      float* dst = out + p * k * kPanel;
      int64_t cols = std::min<int64_t>(kPanel, n - p * kPanel);
      if (cols < kPanel) std::fill(dst, dst + k * kPanel, 0.0f);
      if (s1 == 1) {  // rows of w contiguous: read along k
        for (int64_t j = 0; j < cols; ++j) {
          const float* src = w + (p * kPanel + j) * s0;
          for (int64_t kk = 0; kk < k; ++kk) dst[kk * kPanel + j] = src[kk];
        }
      } else {  // columns contiguous (a transposed view): read along n
        for (int64_t kk = 0; kk < k; ++kk) {
          const float* src = w + kk * s1 + p * kPanel * s0;
          for (int64_t j = 0; j < cols; ++j) dst[kk * kPanel + j] = src[j * s0];
        }
      }
    }
  });
}

#if defined(__AVX512F__)

template <int ROWS>
__attribute__((always_inline)) inline void panel_block(const float* __restrict__ x, int64_t ldx, const float* __restrict__ wp,
                                                       int64_t k, float* __restrict__ out, int64_t ldo, __mmask16 m0,
                                                       __mmask16 m1, bool accumulate) {
  __m512 acc0[ROWS], acc1[ROWS];
#pragma GCC unroll 12
  for (int r = 0; r < ROWS; ++r) {
    acc0[r] = accumulate ? _mm512_maskz_loadu_ps(m0, out + r * ldo) : _mm512_setzero_ps();
    acc1[r] = accumulate ? _mm512_maskz_loadu_ps(m1, out + r * ldo + 16) : _mm512_setzero_ps();
  }
  for (int64_t kk = 0; kk < k; ++kk) {
    __m512 w0 = _mm512_load_ps(wp + kk * kPanel);
    __m512 w1 = _mm512_load_ps(wp + kk * kPanel + 16);
#pragma GCC unroll 12
    for (int r = 0; r < ROWS; ++r) {
      __m512 xv = _mm512_set1_ps(x[r * ldx + kk]);
      acc0[r] = _mm512_fmadd_ps(xv, w0, acc0[r]);
      acc1[r] = _mm512_fmadd_ps(xv, w1, acc1[r]);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < ROWS; ++r) {
    _mm512_mask_storeu_ps(out + r * ldo, m0, acc0[r]);
    _mm512_mask_storeu_ps(out + r * ldo + 16, m1, acc1[r]);
  }
}

// panel_block<rows> for a row count known only at run time
template <int ROWS>
void panel_rows(int rows, const float* x, int64_t ldx, const float* wp, int64_t k, float* out, int64_t ldo, __mmask16 m0,
                __mmask16 m1, bool accumulate) {
  if constexpr (ROWS > 0) {
    if (rows == ROWS) return panel_block<ROWS>(x, ldx, wp, k, out, ldo, m0, m1, accumulate);
    return panel_rows<ROWS - 1>(rows, x, ldx, wp, k, out, ldo, m0, m1, accumulate);
  }
}

#if defined(__AVX512BF16__)

__attribute__((always_inline)) inline __m512 load_bf16(const uint16_t* p, __mmask16 mask) {
  __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

__attribute__((always_inline)) inline void store_bf16(uint16_t* p, __mmask16 mask, __m512 v) {
  _mm256_mask_storeu_epi16(p, mask, (__m256i)_mm512_cvtneps_pbh(v));
}

// the pair (x[k], x[k + 1]) as one 32-bit lane value, x[k + 1] taken as 0 past the end
__attribute__((always_inline)) inline uint32_t bf16_pair(const uint16_t* x, int64_t kk, int64_t k) {
  return static_cast<uint32_t>(x[kk]) | (kk + 1 < k ? static_cast<uint32_t>(x[kk + 1]) << 16 : 0u);
}

// acc{0,1}[r] += the first `pairs` k-pairs of row r of x times a panel's two halves (32 outputs)
template <int ROWS>
__attribute__((always_inline)) inline void dot_bf16_pairs(const uint16_t* __restrict__ x, int64_t ldx,
                                                          const uint16_t* __restrict__ wp, int64_t pairs, __m512* acc0,
                                                          __m512* acc1) {
  for (int64_t kk = 0; kk < pairs; ++kk) {
    __m512bh w0 = (__m512bh)_mm512_load_si512(wp + kk * kPanel * 2);
    __m512bh w1 = (__m512bh)_mm512_load_si512(wp + kk * kPanel * 2 + 32);
#pragma GCC unroll 12
    for (int r = 0; r < ROWS; ++r) {
      uint32_t pair;
      __builtin_memcpy(&pair, x + r * ldx + 2 * kk, 4);
      __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      acc0[r] = _mm512_dpbf16_ps(acc0[r], xv, w0);
      acc1[r] = _mm512_dpbf16_ps(acc1[r], xv, w1);
    }
  }
}

// a bfloat16 or float32 output block: read into float32 accumulators, written back from them
__attribute__((always_inline)) inline __m512 load_out(const uint16_t* p, __mmask16 mask) { return load_bf16(p, mask); }
__attribute__((always_inline)) inline __m512 load_out(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
__attribute__((always_inline)) inline void store_out(uint16_t* p, __mmask16 mask, __m512 v) { store_bf16(p, mask, v); }
__attribute__((always_inline)) inline void store_out(float* p, __mmask16 mask, __m512 v) { _mm512_mask_storeu_ps(p, mask, v); }

template <int ROWS, typename Out>
__attribute__((always_inline)) inline void panel_block_bf16(const uint16_t* __restrict__ x, int64_t ldx,
                                                            const uint16_t* __restrict__ wp, int64_t k, Out* __restrict__ out,
                                                            int64_t ldo, __mmask16 m0, __mmask16 m1, bool accumulate) {
  __m512 acc0[ROWS], acc1[ROWS];
#pragma GCC unroll 12
  for (int r = 0; r < ROWS; ++r) {
    acc0[r] = accumulate ? load_out(out + r * ldo, m0) : _mm512_setzero_ps();
    acc1[r] = accumulate ? load_out(out + r * ldo + 16, m1) : _mm512_setzero_ps();
  }
  int64_t full = k / 2;
  dot_bf16_pairs<ROWS>(x, ldx, wp, full, acc0, acc1);
  if (k % 2) {  // the last, unpaired k
    __m512bh w0 = (__m512bh)_mm512_load_si512(wp + full * kPanel * 2);
    __m512bh w1 = (__m512bh)_mm512_load_si512(wp + full * kPanel * 2 + 32);
    for (int r = 0; r < ROWS; ++r) {
      __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(bf16_pair(x + r * ldx, 2 * full, k)));
      acc0[r] = _mm512_dpbf16_ps(acc0[r], xv, w0);
      acc1[r] = _mm512_dpbf16_ps(acc1[r], xv, w1);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < ROWS; ++r) {
    store_out(out + r * ldo, m0, acc0[r]);
    store_out(out + r * ldo + 16, m1, acc1[r]);
  }
}

template <int ROWS, typename Out>
void panel_rows_bf16(int rows, const uint16_t* x, int64_t ldx, const uint16_t* wp, int64_t k, Out* out, int64_t ldo,
                     __mmask16 m0, __mmask16 m1, bool accumulate) {
  if constexpr (ROWS > 0) {
    if (rows == ROWS) return panel_block_bf16<ROWS, Out>(x, ldx, wp, k, out, ldo, m0, m1, accumulate);
    return panel_rows_bf16<ROWS - 1, Out>(rows, x, ldx, wp, k, out, ldo, m0, m1, accumulate);
  }
}

#endif
#endif

// the work of one GEMM as (panel, row block) items: their number, and items [begin, end) each
// given its rows and column masks (block(p, r0, rows, m0, m1)), for a caller that splits the
// items across threads itself
inline int64_t block_count(int64_t m, int64_t n) { return (n + kPanel - 1) / kPanel * ((m + kMaxRows - 1) / kMaxRows); }

template <typename F>
void blocks_in(int64_t m, int64_t n, int64_t begin, int64_t end, F&& block) {
  int64_t row_blocks = (m + kMaxRows - 1) / kMaxRows;
  int64_t rows_per_block = (m + row_blocks - 1) / row_blocks;  // even blocks: 20 rows -> 10 + 10
  for (int64_t item = begin; item < end; ++item) {
    int64_t p = item / row_blocks, r0 = (item % row_blocks) * rows_per_block;
    int rows = static_cast<int>(std::min<int64_t>(rows_per_block, m - r0));
    if (rows <= 0) continue;
    int64_t cols = std::min<int64_t>(kPanel, n - p * kPanel);
    uint32_t m0 = cols >= 16 ? 0xFFFFu : (1u << cols) - 1;
    uint32_t m1 = cols >= 32 ? 0xFFFFu : cols <= 16 ? 0u : (1u << (cols - 16)) - 1;
    block(p, r0, rows, m0, m1);
  }
}

// every item of one GEMM, split across torch's threads
template <typename F>
void for_each_block(int64_t m, int64_t n, F&& block) {
  at::parallel_for(0, block_count(m, n), 1, [&](int64_t begin, int64_t end) { blocks_in(m, n, begin, end, block); });
}

// out (M, N) (+)= x (M, K) @ W^T, W as panels (P, K, 32); x and out row-major and contiguous
void panel_gemm(const float* x, int64_t m, int64_t k, const float* panels, int64_t n, float* out, bool accumulate) {
#if defined(__AVX512F__)
  for_each_block(m, n, [&](int64_t p, int64_t r0, int rows, uint32_t m0, uint32_t m1) {
    panel_rows<kMaxRows>(rows, x + r0 * k, k, panels + p * k * kPanel, k, out + r0 * n + p * kPanel, n, m0, m1, accumulate);
  });
#else
  (void)x, (void)m, (void)k, (void)panels, (void)n, (void)out, (void)accumulate;
  TORCH_CHECK(false, "lmtrain: the panel GEMM needs AVX-512");
#endif
}

// the same with bfloat16 operands, W as pair panels (P, ceil(K/2), 32, 2); out bfloat16 (as uint16_t)
// or float32
template <typename Out>
void panel_gemm_bf16(const uint16_t* x, int64_t m, int64_t k, const uint16_t* panels, int64_t n, Out* out, bool accumulate) {
#if defined(__AVX512BF16__)
  int64_t panel_size = (k + 1) / 2 * kPanel * 2;
  for_each_block(m, n, [&](int64_t p, int64_t r0, int rows, uint32_t m0, uint32_t m1) {
    panel_rows_bf16<kMaxRows, Out>(rows, x + r0 * k, k, panels + p * panel_size, k, out + r0 * n + p * kPanel, n, m0, m1, accumulate);
  });
#else
  (void)x, (void)m, (void)k, (void)panels, (void)n, (void)out, (void)accumulate;
  TORCH_CHECK(false, "lmtrain: the bfloat16 panel GEMM needs AVX512-BF16");
#endif
}

}  // namespace
