// The pointwise and drawing parts of one generation step: the LSTM's cell step, and drawing a
// token per row of logits (sample_row / sample_rows).
//
// Part of step_cpu.cpp's one translation unit: included there inside its anonymous namespace,
// after its includes, so the compiled code is the same as when it was one file (same bits).

#pragma once

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
