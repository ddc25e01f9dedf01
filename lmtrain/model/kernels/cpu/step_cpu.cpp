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

#include "step_products.h"  // step_pack_int8, quantise_rows, StepProduct, StepOperand, step_linear
#include "step_sampling.h"  // lstm_cell_step, sample_rows, share_of

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
