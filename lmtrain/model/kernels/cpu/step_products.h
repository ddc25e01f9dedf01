// The products of one generation step: out (M, n) = x (M, k) W^T + bias, W held as float32,
// bfloat16 or int8 panels (see step_cpu.cpp's header), split into blocks that threads share.
//
// Part of step_cpu.cpp's one translation unit: included there inside its anonymous namespace,
// after its includes, so the compiled code is the same as when it was one file (same bits).

#pragma once

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
