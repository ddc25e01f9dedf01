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
//   stack_step(tokens, table, panels[], scales[], sums[], biases[], layout, states[], extra[], out[],
//     scratch): a whole step of a stack of any cells as the ops above (and cell_cpu.cpp's
//     cell_step) would take it, in one parallel region, writing out = [logits, new states...]
//   stack_draw(logits, uniforms, temperature, table, ..., out[], scratch) -> tokens: the draw
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
#include "cell_steps.h"     // the cells' functors and by_cell, generated from their equations (build.py)

// A whole step of a stack of cells, with the products, the pointwise steps and the hand-overs
// between layers in one parallel region: the same computation, bit for bit, as the stepper's ops
// one by one (step_linear, lstm_cell_step or cell_step, index_select, cat), without their
// dispatches, thread start-ups and fresh buffers (at one stream, a fifth to a quarter of the
// op-by-op step's time).
//
//   tokens (B,) int64, or drawn first from draw = (logits (B, V), uniforms (B,), temperature) as
//     sample_rows draws them, each thread its own rows
//   table (V, G_0 H_0) = E W_ih^T + b_ih of layer 0
//   layout: 4 numbers per layer: the cell (-1: the LSTM, lstm_rows; else its functor's index,
//     by_cell), its number of states, of per-unit parameters, and whether its two products are
//     apart (1: cells with a recurrent bias, above layer 0) or one (0)
//   products, as (panels, scales, sums, bias) lists: layer 0's W_hh (K = H_0); each later layer's
//     [W_ih, W_hh] side by side (K = H_{l-1} + H_l), or W_ih (K = H_{l-1}) then W_hh (K = H_l) when
//     apart; then the decoder (K = H_{L-1})
//   states: every layer's states in order, each (B, H_l); extra: every layer's per-unit parameters
//   out: logits (B, V), then every layer's new states in order, written; none of them an input
//   scratch: bytes for the gates and the products' operands, grown when too small
//   -> the tokens (B,)
//
// Each layer's pointwise step gets xg and hg (B, G H) with every bias in them: layer 0's xg is its
// table row; a layer with one product gets that product as xg and zeros as hg; one with two gets
// each. Threads split the rows for the pointwise work and the (panel, row block) items for the
// products, with a barrier wherever one needs what another wrote.
struct Draw {
  at::Tensor logits, uniforms;
  double temperature;
};

struct LayerPlan {
  int64_t cell, states, extras, hidden, gates, saved;  // gates: G; saved: the functor's saved blocks
  bool apart;
  int64_t first_state, first_extra, first_product;     // offsets into states, extra, products
};

at::Tensor stack_step(at::Tensor tokens, const Draw* draw, at::Tensor table, std::vector<at::Tensor> panels,
                      std::vector<at::Tensor> scales, std::vector<at::Tensor> sums, std::vector<at::Tensor> biases,
                      std::vector<int64_t> layout, std::vector<at::Tensor> states, std::vector<at::Tensor> extra,
                      const std::vector<at::Tensor>& out, at::Tensor& scratch) {
  TORCH_CHECK(!layout.empty() && layout.size() % 4 == 0, "stack_step: 4 layout numbers per layer");
  int64_t layers = static_cast<int64_t>(layout.size()) / 4;
  std::vector<LayerPlan> plan;
  int64_t n_states = 0, n_extra = 0, n_products = 0;
  for (int64_t l = 0; l < layers; ++l) {
    LayerPlan p{layout[4 * l], layout[4 * l + 1], layout[4 * l + 2], 0, 4, 0, layout[4 * l + 3] != 0, n_states, n_extra,
                n_products};
    TORCH_CHECK(p.states >= 1 && p.extras >= 0 && !(l == 0 && p.apart) && !(p.cell < 0 && (p.apart || p.states != 2 || p.extras)),
                "stack_step: layer ", l, "'s layout");
    if (p.cell >= 0) {
      int64_t kinds[3];
      by_cell(p.cell, [&](auto c) {
        using Cell = decltype(c);
        kinds[0] = Cell::kGates, kinds[1] = Cell::kStates, kinds[2] = Cell::kSaved;
        return 0;
      });
      TORCH_CHECK(kinds[1] == p.states, "stack_step: layer ", l, "'s cell has ", kinds[1], " states");
      p.gates = kinds[0], p.saved = kinds[2];
    }
    n_states += p.states, n_extra += p.extras, n_products += p.apart ? 2 : 1;
    plan.push_back(p);
  }
  TORCH_CHECK(static_cast<int64_t>(states.size()) == n_states && static_cast<int64_t>(extra.size()) == n_extra &&
                  static_cast<int64_t>(panels.size()) == n_products + 1 && scales.size() == panels.size() &&
                  sums.size() == panels.size() && biases.size() == panels.size() &&
                  static_cast<int64_t>(out.size()) == n_states + 1,
              "stack_step: the states, parameters, products and outputs the layout names");
  table = table.contiguous();
  int64_t vocab_rows = table.size(0);
  at::Tensor draw_logits, uniforms;
  if (draw != nullptr) {
    draw_logits = draw->logits.contiguous();
    uniforms = draw->uniforms.contiguous();
    TORCH_CHECK(draw_logits.scalar_type() == at::kFloat && draw_logits.dim() == 2 && uniforms.scalar_type() == at::kFloat &&
                    uniforms.numel() == draw_logits.size(0) && draw_logits.size(1) <= vocab_rows && draw->temperature > 0,
                "stack_draw: float32 logits (B, V), float32 uniforms (B,), temperature > 0");
    tokens = at::empty({draw_logits.size(0)}, draw_logits.options().dtype(at::kLong));
  }
  TORCH_CHECK(tokens.dim() == 1 && tokens.scalar_type() == at::kLong, "stack_step: tokens must be (B,) int64");
  int64_t batch = tokens.size(0);
  tokens = tokens.contiguous();
  std::vector<const void*> inputs{draw_logits.defined() ? draw_logits.data_ptr() : nullptr};
  for (auto& p : plan) {
    p.hidden = states[p.first_state].dim() == 2 ? states[p.first_state].size(1) : -1;
    for (int64_t k = p.first_state; k < p.first_state + p.states; ++k) {
      states[k] = states[k].contiguous();
      TORCH_CHECK(states[k].scalar_type() == at::kFloat && states[k].dim() == 2 && states[k].size(0) == batch &&
                      states[k].size(1) == p.hidden,
                  "stack_step: float32 states (B, H_l)");
      inputs.push_back(states[k].data_ptr());
    }
    int64_t blocks = 0;
    for (int64_t k = p.first_extra; k < p.first_extra + p.extras; ++k) {
      extra[k] = extra[k].contiguous();
      TORCH_CHECK(extra[k].scalar_type() == at::kFloat && extra[k].numel() % p.hidden == 0,
                  "stack_step: float32 per-unit parameters, whole blocks of H_l");
      blocks += extra[k].numel() / p.hidden;
    }
    if (p.cell >= 0) {
      int64_t expected = by_cell(p.cell, [](auto c) { return static_cast<int64_t>(decltype(c)::kExtra); });
      TORCH_CHECK(blocks == expected && p.extras <= 4, "stack_step: the cell's per-unit parameters");
    }
  }
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.dim() == 2 && table.size(1) == plan[0].gates * plan[0].hidden,
              "stack_step: a float32 table (V, G_0 H_0)");
  int64_t* tok = tokens.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch && draw == nullptr; ++b)
    TORCH_CHECK(tok[b] >= 0 && tok[b] < vocab_rows, "stack_step: token ", tok[b], " outside the table");
  std::vector<StepProduct> products;
  int64_t scratch_bytes = 0, widest = 0, saved_width = 1;
  for (int64_t l = 0; l <= layers; ++l) {
    std::vector<std::pair<int64_t, int64_t>> shapes;  // (k, n) of this layer's products
    if (l == layers) {
      shapes.emplace_back(plan[l - 1].hidden, biases[n_products].numel());
    } else {
      const LayerPlan& p = plan[l];
      int64_t n = p.gates * p.hidden;
      widest = std::max(widest, n);
      saved_width = std::max(saved_width, p.saved * p.hidden);
      if (l == 0) shapes.emplace_back(p.hidden, n);
      else if (p.apart) shapes = {{plan[l - 1].hidden, n}, {p.hidden, n}};
      else shapes.emplace_back(plan[l - 1].hidden + p.hidden, n);
      if (l > 0 && !p.apart) scratch_bytes += round_up_64(batch * shapes[0].first * 4);  // [h'_{l-1}, h_l]
    }
    for (auto [k, n] : shapes) {
      size_t i = products.size();
      for (auto* t : {&panels[i], &scales[i], &sums[i], &biases[i]}) *t = t->contiguous();  // our copies of the lists
      products.push_back(step_product(panels[i], scales[i], sums[i], biases[i], n, k));
      scratch_bytes += StepOperand::bytes(products.back(), batch);
      if (l < layers) scratch_bytes += round_up_64(batch * n * 4);  // the product's result
    }
  }
  scratch_bytes += round_up_64(widest * 4) + round_up_64(batch * saved_width * 4);  // a row of zeros, the saved blocks
  int64_t vocab = products.back().n;
  for (int64_t i = 0; i <= n_states; ++i) {
    int64_t width = vocab;
    if (i > 0)
      for (const auto& p : plan)
        if (p.first_state < i && i <= p.first_state + p.states) width = p.hidden;
    TORCH_CHECK(out[i].scalar_type() == at::kFloat && out[i].is_contiguous() && out[i].dim() == 2 && out[i].size(0) == batch &&
                    out[i].size(1) == width,
                "stack_step: outputs must be contiguous float32 (B, V), then (B, H_l) for each state");
    TORCH_CHECK(std::find(inputs.begin(), inputs.end(), out[i].data_ptr()) == inputs.end(),
                "stack_step: an output is also an input");
  }
  TORCH_CHECK(scratch.scalar_type() == at::kByte && scratch.is_contiguous(), "stack_step: scratch must be uint8");
  if (scratch.numel() < scratch_bytes) scratch.resize_({scratch_bytes});
  uint8_t* cursor = scratch.data_ptr<uint8_t>();
  auto take = [&](int64_t bytes) { uint8_t* p = cursor; cursor += round_up_64(bytes); return p; };
  std::vector<StepOperand> operands;
  std::vector<float*> results(products.size() - 1), joint(layers, nullptr);
  for (size_t i = 0; i < products.size(); ++i) {
    operands.emplace_back(products[i], batch, take(StepOperand::bytes(products[i], batch)));
    if (i + 1 < products.size()) results[i] = reinterpret_cast<float*>(take(batch * products[i].n * 4));
  }
  for (int64_t l = 1; l < layers; ++l)
    if (!plan[l].apart) joint[l] = reinterpret_cast<float*>(take(batch * products[plan[l].first_product].k * 4));
  float* zeros = reinterpret_cast<float*>(take(widest * 4));
  std::fill(zeros, zeros + widest, 0.0f);
  float* saved = reinterpret_cast<float*>(take(batch * saved_width * 4));
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
      const LayerPlan& p = plan[l];
      int64_t width = p.gates * p.hidden, first = p.first_product;
      const float* mine = states[p.first_state].const_data_ptr<float>();
      if (l == 0) {
        operands[first].fill(products[first], mine, p.hidden, r0, r1);
      } else {
        int64_t below_h = plan[l - 1].hidden;
        const float* below = out[1 + plan[l - 1].first_state].const_data_ptr<float>();
        if (p.apart) {
          operands[first].fill(products[first], below, below_h, r0, r1);
          operands[first + 1].fill(products[first + 1], mine, p.hidden, r0, r1);
        } else {
          int64_t k = below_h + p.hidden;
          for (int64_t b = r0; b < r1; ++b) {
            std::copy(below + b * below_h, below + (b + 1) * below_h, joint[l] + b * k);
            std::copy(mine + b * p.hidden, mine + (b + 1) * p.hidden, joint[l] + b * k + below_h);
          }
          operands[first].fill(products[first], joint[l], k, r0, r1);
        }
      }
#pragma omp barrier
      for (int64_t i = first; i < first + (p.apart ? 2 : 1); ++i) {
        auto [i0, i1] = share_of(block_count(batch, width), tid, team);
        product_blocks(products[i], operands[i], batch, results[i], i0, i1);
      }
#pragma omp barrier
      float* g = results[first];
      if (p.cell < 0) {  // the LSTM: its gates are the product (plus the table row on layer 0)
        if (l == 0)
          for (int64_t b = r0; b < r1; ++b) {
            const float* row = table_p + tok[b] * width;
            for (int64_t j = 0; j < width; ++j) g[b * width + j] += row[j];
          }
        lstm_rows(g, states[p.first_state + 1].const_data_ptr<float>(), out[1 + p.first_state].data_ptr<float>(),
                  out[2 + p.first_state].data_ptr<float>(), r0, r1, p.hidden);
        continue;
      }
      Params<float> params{};
      for (int64_t k = 0; k < p.extras; ++k) params[k] = extra[p.first_extra + k].const_data_ptr<float>();
      by_cell(p.cell, [&](auto c) {
        using Cell = decltype(c);
        for (int64_t b = r0; b < r1; ++b) {
          ConstRows<float> prev{};
          Rows<float> next{};
          for (int k = 0; k < Cell::kStates; ++k) {
            prev[k] = states[p.first_state + k].const_data_ptr<float>() + b * p.hidden;
            next[k] = out[1 + p.first_state + k].data_ptr<float>() + b * p.hidden;
          }
          const float* xg = l == 0 ? table_p + tok[b] * width : g + b * width;
          const float* hg = l == 0 ? g + b * width : p.apart ? results[first + 1] + b * width : zeros;
          float* kept = saved + b * saved_width;
#pragma GCC ivdep
          for (int64_t j = 0; j < p.hidden; ++j) Cell::template forward<float, float>(j, p.hidden, xg, hg, nullptr, params, prev, next, kept);
        }
        return 0;
      });
    }
    const LayerPlan& top = plan[layers - 1];
    operands[n_products].fill(products[n_products], out[1 + top.first_state].const_data_ptr<float>(), top.hidden, r0, r1);
#pragma omp barrier
    auto [i0, i1] = share_of(block_count(batch, vocab), tid, team);
    product_blocks(products[n_products], operands[n_products], batch, out[0].data_ptr<float>(), i0, i1);
  }
  return tokens;
}

void cells_stack_step(at::Tensor tokens, at::Tensor table, std::vector<at::Tensor> panels, std::vector<at::Tensor> scales,
                      std::vector<at::Tensor> sums, std::vector<at::Tensor> biases, std::vector<int64_t> layout,
                      std::vector<at::Tensor> states, std::vector<at::Tensor> extra, std::vector<at::Tensor> out,
                      at::Tensor scratch) {
  stack_step(tokens, nullptr, table, panels, scales, sums, biases, layout, states, extra, out, scratch);
}

// tokens drawn from logits (B, V) as sample_rows draws them, then the stack's step on them
at::Tensor cells_stack_draw(at::Tensor logits, at::Tensor uniforms, double temperature, at::Tensor table,
                            std::vector<at::Tensor> panels, std::vector<at::Tensor> scales, std::vector<at::Tensor> sums,
                            std::vector<at::Tensor> biases, std::vector<int64_t> layout, std::vector<at::Tensor> states,
                            std::vector<at::Tensor> extra, std::vector<at::Tensor> out, at::Tensor scratch) {
  Draw draw{logits, uniforms, temperature};
  return stack_step(at::Tensor(), &draw, table, panels, scales, sums, biases, layout, states, extra, out, scratch);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmtrain, m) {
  m.def("lstm_cell_step(Tensor gates, Tensor c) -> (Tensor, Tensor)", &lstm_cell_step);
  m.def("sample_rows(Tensor logits, Tensor uniforms, float temperature) -> Tensor", &sample_rows);
  m.def("step_pack_int8(Tensor w) -> (Tensor, Tensor, Tensor)", &step_pack_int8);
  m.def("step_linear(Tensor x, Tensor panels, Tensor scales, Tensor sums, Tensor bias, int n) -> Tensor", &step_linear);
  m.def("step_available(int kind) -> bool", &step_available);
  m.def("stack_step(Tensor tokens, Tensor table, Tensor[] panels, Tensor[] scales, Tensor[] sums, Tensor[] biases, "
        "int[] layout, Tensor[] states, Tensor[] extra, Tensor(a!)[] out, Tensor(b!) scratch) -> ()",
        &cells_stack_step);
  m.def("stack_draw(Tensor logits, Tensor uniforms, float temperature, Tensor table, Tensor[] panels, Tensor[] scales, "
        "Tensor[] sums, Tensor[] biases, int[] layout, Tensor[] states, Tensor[] extra, Tensor(a!)[] out, Tensor(b!) scratch) "
        "-> Tensor",
        &cells_stack_draw);
}
