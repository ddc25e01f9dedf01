// The LSTM's time loops on the CPU: per step one GEMM and one fused pass over the gates.
//
// Python (lmtrain/model/kernels/lstm.py) does the sequence-wide GEMMs (input projections, dX, dW) and
// calls these two ops for the loops, so each step costs two calls into ATen instead of about a
// dozen Python-level operations. Same equations and gate order (i, f, g, o) as
// lmtrain/model/cells/lstm.py.
//
//   lstm_forward_loop(acts, hs, cs, tanh_cs, w_hh, mode, hs_low=None)
//     acts (T, B, 4H): on entry x W_ih^T + b for every step; on return the activations i, f, g, o
//     hs, cs (T+1, B, H): h_0 and c_0 set on entry; filled with h_t, c_t
//     tanh_cs (T, B, H): filled with tanh(c_t)
//     w_hh: the recurrent weight (4H, H) in the form `mode` names (below)
//     hs_low (T+1, B, H) bfloat16, mixed precision only (float32 buffers, bfloat16 panels): h_0
//       set on entry; filled with h_t rounded, the operand of the next step's product
//
//   lstm_backward_loop(acts, cs, tanh_cs, dy, dh_last, dc_last, w_hh_t, mode, dgates, dgates_low=None)
//       -> (dh_0, dc_0)
//     dy (T, B, H), dh_last, dc_last (B, H); w_hh_t: W_hh^T (H, 4H) in the form `mode` names
//     dgates (T, B, 4H): filled with the gradients of the pre-activations
//     dgates_low (B, 4H) bfloat16, mixed precision only: each step's dgates rounded, the operand
//       of dh_{t-1} = d gates_t W_hh
//
//   pack_panels(w) -> panels: w (N, K), any strides; float32 -> (ceil(N/32), K, 32), bfloat16 ->
//     (ceil(N/32), ceil(K/2), 32, 2), zero-padded
//   panels_matmul(x, panels, n, out_dtype=None) -> x (M, K) @ W^T (M, n), W given as its panels;
//     out_dtype float32 with bfloat16 operands keeps the float32 sums
//   transpose(x) -> x (M, N) as a contiguous (N, M) tensor, copied tile by tile
//   panels_available(bf16) -> whether this build has the panel GEMM for the type (AVX-512, AVX512-BF16)
//
// The weight forms (`mode`): 0 a plain (N, K) tensor, any strides (at::mm); 1 oneDNN, either
// packed by mkldnn::_reorder_linear_weight or a plain tensor; 2 our panels (float32 with AVX-512, bfloat16 with AVX512-BF16).
// The panel GEMM (panel_gemm.h) writes each step's product straight into the step's slice of a
// preallocated buffer and costs no allocation or library call per step, which is what makes the
// small per-step GEMMs fast at batch 20.
//
// float32 and bfloat16 use a polynomial exp the compiler can vectorise (about 2 ulp in float,
// fast_math.h); float64 uses std::exp, for the tests' 1e-10 comparisons.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "fast_math.h"
#include "panel_gemm.h"
#include "recurrent_gemm.h"

namespace {

template <typename T>
void forward_step(const T* pre, T* acts, const T* __restrict__ c_prev, T* __restrict__ c_out,
                  T* __restrict__ tanh_c_out, T* __restrict__ h_out, int64_t batch, int64_t hidden) {
  using M = typename Math<T>::type;
  at::parallel_for(0, batch, grain(hidden), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      // pre and acts may be the same buffer: element j is read before it is written
      const T* pi = pre + b * 4 * hidden;
      const T* pf = pi + hidden;
      const T* pg = pi + 2 * hidden;
      const T* po = pi + 3 * hidden;
      T* ai = acts + b * 4 * hidden;
      T* af = ai + hidden;
      T* ag = ai + 2 * hidden;
      T* ao = ai + 3 * hidden;
      const T* __restrict__ cp = c_prev + b * hidden;
      T* __restrict__ co = c_out + b * hidden;
      T* __restrict__ tco = tanh_c_out + b * hidden;
      T* __restrict__ ho = h_out + b * hidden;
#pragma GCC ivdep
      for (int64_t j = 0; j < hidden; ++j) {
        M i = sigmoid_fast(load(pi, j));
        M f = sigmoid_fast(load(pf, j));
        M g = tanh_fast(load(pg, j));
        M o = sigmoid_fast(load(po, j));
        M c = f * load(cp, j) + i * g;
        M tc = tanh_fast(c);
        store(ai, j, i);
        store(af, j, f);
        store(ag, j, g);
        store(ao, j, o);
        store(co, j, c);
        store(tco, j, tc);
        store(ho, j, o * tc);
      }
    }
  });
}

template <typename T>
void backward_step(const T* __restrict__ dh_rec, const T* __restrict__ dy, const T* __restrict__ acts,
                   const T* __restrict__ c_prev, const T* __restrict__ tanh_c, T* __restrict__ dc, T* __restrict__ dgates,
                   int64_t batch, int64_t hidden) {
  using M = typename Math<T>::type;
  at::parallel_for(0, batch, grain(hidden), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const T* __restrict__ ai = acts + b * 4 * hidden;
      const T* __restrict__ af = ai + hidden;
      const T* __restrict__ ag = ai + 2 * hidden;
      const T* __restrict__ ao = ai + 3 * hidden;
      T* __restrict__ di = dgates + b * 4 * hidden;
      T* __restrict__ df = di + hidden;
      T* __restrict__ dg = di + 2 * hidden;
      T* __restrict__ d_o = di + 3 * hidden;
      const T* __restrict__ dhr = dh_rec + b * hidden;
      const T* __restrict__ dyr = dy + b * hidden;
      const T* __restrict__ cp = c_prev + b * hidden;
      const T* __restrict__ tcr = tanh_c + b * hidden;
      T* __restrict__ dcr = dc + b * hidden;
#pragma GCC ivdep
      for (int64_t j = 0; j < hidden; ++j) {
        M i = load(ai, j), f = load(af, j), g = load(ag, j), o = load(ao, j);
        M tc = load(tcr, j);
        M dh = load(dhr, j) + load(dyr, j);
        M dct = load(dcr, j) + dh * o * (1 - tc * tc);
        store(di, j, dct * g * i * (1 - i));
        store(df, j, dct * load(cp, j) * f * (1 - f));
        store(dg, j, dct * i * (1 - g * g));
        store(d_o, j, dh * tc * o * (1 - o));
        store(dcr, j, dct * f);
      }
    }
  });
}

void lstm_forward_loop(at::Tensor acts, at::Tensor hs, at::Tensor cs, at::Tensor tanh_cs, at::Tensor w_hh, int64_t mode,
                       const c10::optional<at::Tensor>& hs_low) {
  TORCH_CHECK(acts.is_contiguous() && hs.is_contiguous() && cs.is_contiguous() && tanh_cs.is_contiguous(),
              "lstm_forward_loop: buffers must be contiguous");
  bool mixed = hs_low.has_value();
  mixed ? check_mixed(w_hh, acts, *hs_low, mode) : check_panels(w_hh, acts, mode);
  int64_t steps = acts.size(0), batch = acts.size(1), hidden = hs.size(2);
  for (int64_t t = 0; t < steps; ++t) {
    at::Tensor step_acts = acts[t];
    at::Tensor pre = step_acts;  // the pre-activations, written in place when the GEMM allows it
    if (mode == kPanels) {
      panels_product(mixed ? (*hs_low)[t] : hs[t], w_hh, step_acts, true);
    } else {
      pre = linear(hs[t], w_hh, step_acts, mode).contiguous();
    }
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, acts.scalar_type(), "lstm_forward_step", [&] {
      forward_step<scalar_t>(pre.const_data_ptr<scalar_t>(), step_acts.data_ptr<scalar_t>(), cs[t].const_data_ptr<scalar_t>(),
                             cs[t + 1].data_ptr<scalar_t>(), tanh_cs[t].data_ptr<scalar_t>(), hs[t + 1].data_ptr<scalar_t>(),
                             batch, hidden);
    });
    if (mixed) (*hs_low)[t + 1].copy_(hs[t + 1]);
  }
}

std::tuple<at::Tensor, at::Tensor> lstm_backward_loop(at::Tensor acts, at::Tensor cs, at::Tensor tanh_cs, at::Tensor dy,
                                                      at::Tensor dh_last, at::Tensor dc_last, at::Tensor w_hh_t, int64_t mode,
                                                      at::Tensor dgates, const c10::optional<at::Tensor>& dgates_low) {
  bool mixed = dgates_low.has_value();
  mixed ? check_mixed(w_hh_t, acts, *dgates_low, mode) : check_panels(w_hh_t, acts, mode);
  int64_t steps = acts.size(0), batch = acts.size(1), hidden = cs.size(2);
  dy = dy.contiguous();
  at::Tensor dh_rec = dh_last.contiguous();  // the gradient reaching h_t through the next step (or from outside)
  at::Tensor dc = dc_last.clone(at::MemoryFormat::Contiguous);
  // the panel GEMM writes dh_{t-1} into one buffer of ours, overwritten each step
  at::Tensor dh_buffer = mode == kPanels ? at::empty_like(dc) : at::Tensor();
  for (int64_t t = steps - 1; t >= 0; --t) {
    at::Tensor step_dgates = dgates[t];
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, acts.scalar_type(), "lstm_backward_step", [&] {
      backward_step<scalar_t>(dh_rec.const_data_ptr<scalar_t>(), dy[t].const_data_ptr<scalar_t>(), acts[t].const_data_ptr<scalar_t>(),
                              cs[t].const_data_ptr<scalar_t>(), tanh_cs[t].const_data_ptr<scalar_t>(), dc.data_ptr<scalar_t>(),
                              step_dgates.data_ptr<scalar_t>(), batch, hidden);
    });
    if (mode == kPanels) {
      if (mixed) dgates_low->copy_(step_dgates);
      panels_product(mixed ? *dgates_low : step_dgates, w_hh_t, dh_buffer, false);
      dh_rec = dh_buffer;
    } else {
      dh_rec = linear(step_dgates, w_hh_t, c10::nullopt, mode).contiguous();
    }
  }
  return {dh_rec, dc};
}

at::Tensor pack_panels(at::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
              "pack_panels: a float32 or bfloat16 matrix");
  int64_t n = w.size(0), k = w.size(1), panels = (n + kPanel - 1) / kPanel;
  auto options = w.options().memory_format(at::MemoryFormat::Contiguous);
  if (w.scalar_type() == at::kBFloat16) {
    at::Tensor out = at::empty({panels, (k + 1) / 2, kPanel, 2}, options);
    pack_panels_bf16_into(reinterpret_cast<const uint16_t*>(w.const_data_ptr<at::BFloat16>()), n, k, w.stride(0), w.stride(1),
                          reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
    return out;
  }
  at::Tensor out = at::empty({panels, k, kPanel}, options);
  pack_panels_into(w.const_data_ptr<float>(), n, k, w.stride(0), w.stride(1), out.data_ptr<float>());
  return out;
}

at::Tensor panels_matmul(at::Tensor x, at::Tensor panels, int64_t n, c10::optional<at::ScalarType> out_dtype) {
  x = x.contiguous();
  check_panels(panels, x, kPanels);
  at::ScalarType out_type = out_dtype.value_or(x.scalar_type());
  TORCH_CHECK(out_type == x.scalar_type() || (x.scalar_type() == at::kBFloat16 && out_type == at::kFloat),
              "panels_matmul: the output type must be the operands' or, for bfloat16 operands, float32");
  at::Tensor out = at::empty({x.size(0), n}, x.options().dtype(out_type));
  panels_product(x, panels, out, false);
  return out;
}

// a transposing copy in 32 × 32 tiles, so reads and writes both stay within a few cache lines;
// each thread writes whole rows of the output (no cache line written by two threads)
template <typename T>
void transpose_tiles(const T* src, int64_t rows, int64_t cols, int64_t s0, int64_t s1, T* dst) {
  constexpr int64_t tile = 32;
  int64_t col_tiles = (cols + tile - 1) / tile;
  at::parallel_for(0, col_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ct = begin; ct < end; ++ct) {
      int64_t c0 = ct * tile, c1 = std::min(cols, c0 + tile);
      for (int64_t r0 = 0; r0 < rows; r0 += tile) {
        int64_t r1 = std::min(rows, r0 + tile);
        for (int64_t c = c0; c < c1; ++c) {
          T* out = dst + c * rows;
          const T* in = src + c * s1;
          for (int64_t r = r0; r < r1; ++r) out[r] = in[r * s0];
        }
      }
    }
  });
}

at::Tensor transpose(at::Tensor x) {
  TORCH_CHECK(x.dim() == 2, "transpose: a matrix");
  at::Tensor out = at::empty({x.size(1), x.size(0)}, x.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "transpose", [&] {
    transpose_tiles<scalar_t>(x.const_data_ptr<scalar_t>(), x.size(0), x.size(1), x.stride(0), x.stride(1),
                              out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

// Registered for every dispatch key, since the packed weight is an MkldnnCPU tensor; these run
// inside an autograd.Function's forward and backward, so autograd never looks inside them.
TORCH_LIBRARY(lmtrain, m) {  // the cross-entropy ops join from cross_entropy_cpu.cpp
  m.def("lstm_forward_loop(Tensor(a!) acts, Tensor(b!) hs, Tensor(c!) cs, Tensor(d!) tanh_cs, Tensor w_hh, int mode, "
        "Tensor(e!)? hs_low=None) -> ()",
        &lstm_forward_loop);
  m.def("lstm_backward_loop(Tensor acts, Tensor cs, Tensor tanh_cs, Tensor dy, Tensor dh_last, Tensor dc_last, Tensor w_hh_t, "
        "int mode, Tensor(a!) dgates, Tensor(b!)? dgates_low=None) -> (Tensor, Tensor)",
        &lstm_backward_loop);
  m.def("pack_panels(Tensor w) -> Tensor", &pack_panels);
  m.def("panels_matmul(Tensor x, Tensor panels, int n, ScalarType? out_dtype=None) -> Tensor", &panels_matmul);
  m.def("transpose(Tensor x) -> Tensor", &transpose);
  m.def("panels_available(bool bf16) -> bool", &panels_available);
}
