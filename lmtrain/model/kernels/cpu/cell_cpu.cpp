// Every cell's time loops on the CPU but the LSTM's (lstm_cpu.cpp): one generic loop over time,
// templated on a cell's pointwise step, with the recurrent product of each step written straight
// into a reused buffer (recurrent_gemm.h: our panels, oneDNN or at::mm). The steps are functors
// generated from each cell's equations (lmtrain/model/cells/NAME.py, STEP) into cell_steps.h when
// the ops are built (lmtrain/model/kernels/emit_cpp.py says what a functor gives).
//
// Python (lmtrain/model/kernels/cell_sequence.py) does the sequence-wide GEMMs (input projections,
// dX, dW) and calls these two ops for the loops: the same plan as the generic engine
// (lmtrain/model/recurrence.py), with the cell's step inlined and vectorised instead of a dozen
// tensor operations per step.
//
//   cell_forward_loop(cell, xg, states, saved, w_hh, mode, b_hh, extra)
//     cell: the functor's index (by_cell)
//     xg (T, B, GH): x W_ih^T + b_ih for every step
//     states: the cell's state tensors, each (T+1, B, H); state 0 is h; row 0 set on entry
//     saved (T, B, S·H): filled with what the backward step needs (S per cell; 1 element if none)
//     w_hh: (GH, H) in the form `mode` names; b_hh (GH,) or None (the cell's recurrent bias);
//     extra: the cell's per-unit parameters (at most 4, e.g. the peepholes, 3H)
//     hs_low (T+1, B, H) bfloat16, mixed precision only (float32 buffers, bfloat16 panels): h_0 set
//       on entry; filled with h_t rounded, the operand of the next step's product (and of dW_hh)
//   cell_backward_loop(cell, states, saved, dy, d_final, w_hh_t, mode, dxg, dhg, extra)
//     -> the gradients of the initial states, then of the per-unit parameters, all their blocks
//        in one tensor (if any)
//     dhg_low (B, GH) bfloat16, mixed precision only: each step's dhg rounded, the operand of
//       dh_{t-1} = dhg_t W_hh
//     dy (T, B, H); d_final: the gradients of the final states (each (B, H))
//     w_hh_t: W_hh^T (H, GH) in the form `mode` names
//     dxg, dhg (T, B, GH): filled with the gradients of the two pre-activations (one tensor where
//       the cell's are equal, kShared: all but the GRU's)

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

#include "fast_math.h"
#include "panel_gemm.h"
#include "recurrent_gemm.h"

namespace {

#include "cell_steps.h"  // the cells' functors and by_cell, generated from their equations (build.py)

// out (B, N) = x (B, K) @ W^T, the step's recurrent product
void step_product(const at::Tensor& x, const at::Tensor& w, at::Tensor out, int64_t mode) {
  if (mode == kPanels) {
    panels_product(x, w, out, false);
  } else {
    out.copy_(linear(x, w, c10::nullopt, mode));
  }
}

template <typename Cell, typename T>
void forward_loop(const at::Tensor& xg, std::vector<at::Tensor>& states, at::Tensor& saved, const at::Tensor& w_hh, int64_t mode,
                  const c10::optional<at::Tensor>& b_hh, const Params<T>& extra, const c10::optional<at::Tensor>& hs_low) {
  using M = typename Math<T>::type;
  int64_t steps = xg.size(0), batch = xg.size(1), width = xg.size(2), hidden = states[0].size(2);
  at::Tensor hg = at::empty({batch, width}, xg.options());
  const T* bias = b_hh ? b_hh->const_data_ptr<T>() : nullptr;
  for (int64_t t = 0; t < steps; ++t) {
    if (hs_low) {  // mixed precision: h_t rounded to bfloat16 (kept for dW_hh), float32 sums
      panels_product((*hs_low)[t], w_hh, hg, false);
    } else {
      step_product(states[0][t], w_hh, hg, mode);
    }
    const T* xg_t = xg[t].const_data_ptr<T>();
    const T* hg_p = hg.const_data_ptr<T>();
    T* saved_t = saved[t].data_ptr<T>();
    ConstRows<T> prev{};
    Rows<T> next{};
    for (int k = 0; k < Cell::kStates; ++k) prev[k] = states[k][t].const_data_ptr<T>(), next[k] = states[k][t + 1].data_ptr<T>();
    at::parallel_for(0, batch, grain(hidden), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        ConstRows<T> p{};
        Rows<T> n{};
        for (int k = 0; k < Cell::kStates; ++k) p[k] = prev[k] + b * hidden, n[k] = next[k] + b * hidden;
        const T* x = xg_t + b * width;
        const T* h = hg_p + b * width;
        T* s = saved_t + b * Cell::kSaved * hidden;
#pragma GCC ivdep
        for (int64_t j = 0; j < hidden; ++j) Cell::template forward<M, T>(j, hidden, x, h, bias, extra, p, n, s);
      }
    });
    if (hs_low) (*hs_low)[t + 1].copy_(states[0][t + 1]);
  }
}

template <typename Cell, typename T>
std::vector<at::Tensor> backward_loop(const std::vector<at::Tensor>& states, const at::Tensor& saved, const at::Tensor& dy,
                                      std::vector<at::Tensor> d, const at::Tensor& w_hh_t, int64_t mode, at::Tensor& dxg,
                                      at::Tensor& dhg, const Params<T>& extra, const c10::optional<at::Tensor>& dhg_low) {
  using M = typename Math<T>::type;
  int64_t steps = dy.size(0), batch = dy.size(1), width = dxg.size(2), hidden = dy.size(2);
  // each row's sums of the extras' gradients over the steps (a row is one thread's), summed over
  // the rows at the end
  at::Tensor d_extra_rows = at::zeros({batch, Cell::kExtra * hidden}, dy.options());
  T* d_extra_p = d_extra_rows.data_ptr<T>();
  TORCH_CHECK(Cell::kShared == (dxg.data_ptr() == dhg.data_ptr()), "cell_backward_loop: dhg must be dxg exactly when the cell's gradients are one");
  // d[k]: the gradient reaching state k of the step being undone; d_prev[k]: its direct part for
  // the step before, to which the loop adds dhg_t W_hh for state 0
  for (auto& g : d) g = g.contiguous().clone();
  at::Tensor total = at::empty({batch, hidden}, dy.options());
  std::vector<at::Tensor> d_prev;
  for (int k = 0; k < Cell::kStates; ++k) d_prev.push_back(at::empty({batch, hidden}, dy.options()));
  for (int64_t t = steps - 1; t >= 0; --t) {
    at::add_out(total, d[0], dy[t]);
    const T* saved_t = saved[t].const_data_ptr<T>();
    T* dxg_t = dxg[t].data_ptr<T>();
    T* dhg_t = dhg[t].data_ptr<T>();
    ConstRows<T> grads{}, prev{}, next{};
    Rows<T> out{};
    for (int k = 0; k < Cell::kStates; ++k) {
      grads[k] = (k == 0 ? total : d[k]).const_data_ptr<T>();
      prev[k] = states[k][t].const_data_ptr<T>(), next[k] = states[k][t + 1].const_data_ptr<T>();
      out[k] = d_prev[k].data_ptr<T>();
    }
    at::parallel_for(0, batch, grain(hidden), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        ConstRows<T> g{}, p{}, n{};
        Rows<T> o{};
        for (int k = 0; k < Cell::kStates; ++k) {
          g[k] = grads[k] + b * hidden, p[k] = prev[k] + b * hidden, n[k] = next[k] + b * hidden, o[k] = out[k] + b * hidden;
        }
        T* dx = dxg_t + b * width;
        T* dh = Cell::kShared ? dx : dhg_t + b * width;
        const T* s = saved_t + b * Cell::kSaved * hidden;
        T* de = d_extra_p + b * Cell::kExtra * hidden;
#pragma GCC ivdep
        for (int64_t j = 0; j < hidden; ++j) Cell::template backward<M, T>(j, hidden, g, s, p, n, extra, dx, dh, o, de);
      }
    });
    // dh_{t-1} = dhg_t W_hh + its direct part
    if (dhg_low) {  // mixed precision: the step's gradient rounded to bfloat16, float32 sums
      dhg_low->copy_(dhg[t]);
      panels_product(*dhg_low, w_hh_t, d_prev[0], true);
    } else if (mode == kPanels) {
      panels_product(dhg[t], w_hh_t, d_prev[0], true);
    } else {
      d_prev[0].add_(linear(dhg[t], w_hh_t, c10::nullopt, mode));
    }
    std::swap(d, d_prev);
  }
  if (Cell::kExtra) d.push_back(d_extra_rows.sum(0));
  return d;
}

template <typename T>
Params<T> extra_of(const std::vector<at::Tensor>& extra) {
  TORCH_CHECK(extra.size() <= 4, "cell loops: at most four per-unit parameters");
  Params<T> p{};
  for (size_t i = 0; i < extra.size(); ++i) {
    TORCH_CHECK(extra[i].is_contiguous(), "cell loops: per-unit parameters must be contiguous");
    p[i] = extra[i].const_data_ptr<T>();
  }
  return p;
}

void cell_forward_loop(int64_t cell, at::Tensor xg, std::vector<at::Tensor> states, at::Tensor saved, at::Tensor w_hh,
                       int64_t mode, const c10::optional<at::Tensor>& b_hh, std::vector<at::Tensor> extra,
                       const c10::optional<at::Tensor>& hs_low) {
  TORCH_CHECK(xg.is_contiguous() && saved.is_contiguous(), "cell_forward_loop: buffers must be contiguous");
  for (auto& s : states) TORCH_CHECK(s.is_contiguous() && s.scalar_type() == xg.scalar_type(), "cell_forward_loop: states");
  hs_low ? check_mixed(w_hh, xg, *hs_low, mode) : check_panels(w_hh, xg, mode);
  AT_DISPATCH_FLOATING_TYPES(xg.scalar_type(), "cell_forward_loop", [&] {
    by_cell(cell, [&](auto c) {
      forward_loop<decltype(c), scalar_t>(xg, states, saved, w_hh, mode, b_hh, extra_of<scalar_t>(extra), hs_low);
      return 0;
    });
  });
}

std::vector<at::Tensor> cell_backward_loop(int64_t cell, std::vector<at::Tensor> states, at::Tensor saved, at::Tensor dy,
                                           std::vector<at::Tensor> d_final, at::Tensor w_hh_t, int64_t mode, at::Tensor dxg,
                                           at::Tensor dhg, std::vector<at::Tensor> extra,
                                           const c10::optional<at::Tensor>& dhg_low) {
  TORCH_CHECK(dxg.is_contiguous() && dhg.is_contiguous(), "cell_backward_loop: buffers must be contiguous");
  dhg_low ? check_mixed(w_hh_t, dxg, *dhg_low, mode) : check_panels(w_hh_t, dxg, mode);
  // dy is read one step at a time (add_out), whatever its strides: a broadcast gradient (that of
  // a sum) is not copied to (T, B, H)
  std::vector<at::Tensor> d_first;
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "cell_backward_loop", [&] {
    d_first = by_cell(cell, [&](auto c) {
      return backward_loop<decltype(c), scalar_t>(states, saved, dy, d_final, w_hh_t, mode, dxg, dhg, extra_of<scalar_t>(extra),
                                                  dhg_low);
    });
  });
  return d_first;
}

// One row of a cell's step for generation (no recurrent bias apart: hg holds it), vectorised
template <typename Cell, typename M, typename T>
void step_row(int64_t hidden, const T* x, const T* h, const Params<T>& p, const ConstRows<T>& prev, const Rows<T>& out, T* kept) {
#pragma GCC ivdep
  for (int64_t j = 0; j < hidden; ++j) Cell::template forward<M, T>(j, hidden, x, h, nullptr, p, prev, out, kept);
}

// One step of a cell without keeping what a backward needs (generation): xg, hg (B, GH), the
// pre-activations with every bias in them; states (B, H) each -> the new states
std::vector<at::Tensor> cell_step(int64_t cell, at::Tensor xg, at::Tensor hg, std::vector<at::Tensor> states,
                                  std::vector<at::Tensor> extra) {
  xg = xg.contiguous();
  hg = hg.contiguous();
  TORCH_CHECK(xg.dim() == 2 && xg.sizes() == hg.sizes() && xg.scalar_type() == hg.scalar_type() && !states.empty(),
              "cell_step: xg and hg (B, GH) of one dtype, and the states");
  for (auto& s : states) {
    s = s.contiguous();
    TORCH_CHECK(s.dim() == 2 && s.size(0) == xg.size(0) && s.sizes() == states[0].sizes() && s.scalar_type() == xg.scalar_type(),
                "cell_step: states (B, H) of xg's dtype");
  }
  std::vector<at::Tensor> next;
  AT_DISPATCH_FLOATING_TYPES(xg.scalar_type(), "cell_step", [&] {
    by_cell(cell, [&](auto c) {
      using Cell = decltype(c);
      using M = typename Math<scalar_t>::type;
      TORCH_CHECK(static_cast<int64_t>(states.size()) == Cell::kStates, "cell_step: the cell has ", Cell::kStates, " states");
      int64_t batch = xg.size(0), hidden = states[0].size(1), width = xg.size(1);
      TORCH_CHECK(width == Cell::kGates * hidden, "cell_step: xg must be (B, ", Cell::kGates, " H)");
      for (int k = 0; k < Cell::kStates; ++k) next.push_back(at::empty_like(states[k]));
      at::Tensor saved = at::empty({batch, std::max(Cell::kSaved, 1) * hidden}, xg.options());
      Params<scalar_t> p = extra_of<scalar_t>(extra);
      at::parallel_for(0, batch, grain(hidden), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          ConstRows<scalar_t> prev{};
          Rows<scalar_t> out{};
          for (int k = 0; k < Cell::kStates; ++k) {
            prev[k] = states[k].const_data_ptr<scalar_t>() + b * hidden, out[k] = next[k].data_ptr<scalar_t>() + b * hidden;
          }
          const scalar_t* x = xg.const_data_ptr<scalar_t>() + b * width;
          const scalar_t* h = hg.const_data_ptr<scalar_t>() + b * width;
          scalar_t* kept = saved.data_ptr<scalar_t>() + b * Cell::kSaved * hidden;
          step_row<Cell, M, scalar_t>(hidden, x, h, p, prev, out, kept);
        }
      });
      return 0;
    });
  });
  return next;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmtrain, m) {
  m.def("cell_step(int cell, Tensor xg, Tensor hg, Tensor[] states, Tensor[] extra) -> Tensor[]", &cell_step);
  m.def("cell_forward_loop(int cell, Tensor xg, Tensor(a!)[] states, Tensor(b!) saved, Tensor w_hh, int mode, "
        "Tensor? b_hh, Tensor[] extra, Tensor(c!)? hs_low=None) -> ()",
        &cell_forward_loop);
  m.def("cell_backward_loop(int cell, Tensor[] states, Tensor saved, Tensor dy, Tensor[] d_final, Tensor w_hh_t, int mode, "
        "Tensor(a!) dxg, Tensor(b!) dhg, Tensor[] extra, Tensor(c!)? dhg_low=None) -> Tensor[]",
        &cell_backward_loop);
}
