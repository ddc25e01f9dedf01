// Every cell's time loops on the CPU but the LSTM's (lstm_cpu.cpp): one generic loop over time,
// templated on a cell's pointwise step (a functor below), with the recurrent product of each step
// written straight into a reused buffer (recurrent_gemm.h: our panels, oneDNN or at::mm).
//
// Python (lmtrain/model/kernels/cell_sequence.py) does the sequence-wide GEMMs (input projections,
// dX, dW) and calls these two ops for the loops: the same plan as the generic engine
// (lmtrain/model/recurrence.py), with the cell's step inlined and vectorised instead of a dozen
// tensor operations per step. Same equations and gate order as lmtrain/model/cells/NAME.py.
//
//   cell_forward_loop(cell, xg, states, saved, w_hh, mode, b_hh=None)
//     xg (T, B, GH): x W_ih^T + b_ih for every step
//     states: the cell's state tensors, each (T+1, B, H); state 0 is h; row 0 set on entry
//     saved (T, B, S·H): filled with what the backward step needs (S per cell; 1 element if none)
//     w_hh: (GH, H) in the form `mode` names; b_hh (GH,) or None (the cell's recurrent bias)
//   cell_backward_loop(cell, states, saved, dy, d_final, w_hh_t, mode, dxg, dhg) -> d_states
//     -> the gradients of the initial states
//     dy (T, B, H); d_final: the gradients of the final states (each (B, H))
//     w_hh_t: W_hh^T (H, GH) in the form `mode` names
//     dxg, dhg (T, B, GH): filled with the gradients of the two pre-activations (one tensor where
//       the cell's are equal, e.g. the RNN's)
//
// A cell functor gives kGates, kStates, kSaved (H-wide blocks per step), and per unit j of one
// row: forward(j, H, xg, hg, b_hh, prev, next, saved) and backward(j, H, d, saved, prev, next,
// dxg, dhg, d_prev), where `d` is the gradient reaching each state of the step's output (the
// output's own gradient included in state 0) and d_prev receives the direct part of the
// gradient of each input state (the part through W_hh is the loop's).

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

template <typename T> using Rows = std::array<T*, 4>;  // one row of each state (at most 4: the sLSTM's)
template <typename T> using ConstRows = std::array<const T*, 4>;

// h' = tanh(xg + hg) (lmtrain/model/cells/rnn.py); nothing saved: h' is the next state
struct Rnn {
  static constexpr int kGates = 1, kStates = 1, kSaved = 0;
  template <typename M, typename T>
  static inline void forward(int64_t j, int64_t, const T* xg, const T* hg, const T* b, const ConstRows<T>&, const Rows<T>& next, T*) {
    M pre = M(xg[j]) + M(hg[j]) + (b ? M(b[j]) : M(0));
    next[0][j] = tanh_fast(pre);
  }
  template <typename M, typename T>
  static inline void backward(int64_t j, int64_t, const ConstRows<T>& d, const T*, const ConstRows<T>&, const ConstRows<T>& next,
                              T* dxg, T* dhg, const Rows<T>& d_prev) {
    M h = next[0][j];
    M g = M(d[0][j]) * (M(1) - h * h);
    dxg[j] = g;
    if (dhg != dxg) dhg[j] = g;
    d_prev[0][j] = M(0);  // h reaches the step only through W_hh
  }
};

// PyTorch's GRU (lmtrain/model/cells/gru.py): gates r, z, n; saved r, z, n and U_n h + b_hn
struct Gru {
  static constexpr int kGates = 3, kStates = 1, kSaved = 4;
  template <typename M, typename T>
  static inline void forward(int64_t j, int64_t H, const T* xg, const T* hg, const T* b, const ConstRows<T>& prev,
                             const Rows<T>& next, T* saved) {
    M hr = M(hg[j]), hz = M(hg[H + j]), hn = M(hg[2 * H + j]);
    if (b) hr += M(b[j]), hz += M(b[H + j]), hn += M(b[2 * H + j]);
    M r = sigmoid_fast(M(xg[j]) + hr);
    M z = sigmoid_fast(M(xg[H + j]) + hz);
    M n = tanh_fast(M(xg[2 * H + j]) + r * hn);
    M h = prev[0][j];
    next[0][j] = n + z * (h - n);
    saved[j] = r, saved[H + j] = z, saved[2 * H + j] = n, saved[3 * H + j] = hn;
  }
  template <typename M, typename T>
  static inline void backward(int64_t j, int64_t H, const ConstRows<T>& d, const T* saved, const ConstRows<T>& prev,
                              const ConstRows<T>&, T* dxg, T* dhg, const Rows<T>& d_prev) {
    M r = saved[j], z = saved[H + j], n = saved[2 * H + j], hn = saved[3 * H + j];
    M dh = d[0][j], h = prev[0][j];
    M dn = dh * (M(1) - z) * (M(1) - n * n);
    M dz = dh * (h - n) * z * (M(1) - z);
    M dr = dn * hn * r * (M(1) - r);
    dxg[j] = dr, dxg[H + j] = dz, dxg[2 * H + j] = dn;
    dhg[j] = dr, dhg[H + j] = dz, dhg[2 * H + j] = dn * r;
    d_prev[0][j] = dh * z;
  }
};

enum CellKind : int64_t { kRnn = 0, kGru = 1 };

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
                  const c10::optional<at::Tensor>& b_hh) {
  using M = typename Math<T>::type;
  int64_t steps = xg.size(0), batch = xg.size(1), width = xg.size(2), hidden = states[0].size(2);
  at::Tensor hg = at::empty({batch, width}, xg.options());
  const T* bias = b_hh ? b_hh->const_data_ptr<T>() : nullptr;
  for (int64_t t = 0; t < steps; ++t) {
    step_product(states[0][t], w_hh, hg, mode);
    const T* xg_t = xg[t].const_data_ptr<T>();
    const T* hg_p = hg.const_data_ptr<T>();
    T* saved_t = saved[t].data_ptr<T>();
    std::array<const T*, 4> prev{};
    std::array<T*, 4> next{};
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
        for (int64_t j = 0; j < hidden; ++j) Cell::template forward<M, T>(j, hidden, x, h, bias, p, n, s);
      }
    });
  }
}

template <typename Cell, typename T>
std::vector<at::Tensor> backward_loop(const std::vector<at::Tensor>& states, const at::Tensor& saved, const at::Tensor& dy,
                         std::vector<at::Tensor> d, const at::Tensor& w_hh_t, int64_t mode, at::Tensor& dxg, at::Tensor& dhg) {
  using M = typename Math<T>::type;
  int64_t steps = dy.size(0), batch = dy.size(1), width = dxg.size(2), hidden = dy.size(2);
  bool shared = dxg.data_ptr() == dhg.data_ptr();
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
    std::array<const T*, 4> grads{}, prev{}, next{};
    std::array<T*, 4> out{};
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
        T* dh = shared ? dx : dhg_t + b * width;
        const T* s = saved_t + b * Cell::kSaved * hidden;
#pragma GCC ivdep
        for (int64_t j = 0; j < hidden; ++j) Cell::template backward<M, T>(j, hidden, g, s, p, n, dx, dh, o);
      }
    });
    // dh_{t-1} = dhg_t W_hh + its direct part
    if (mode == kPanels) {
      panels_product(dhg[t], w_hh_t, d_prev[0], true);
    } else {
      d_prev[0].add_(linear(dhg[t], w_hh_t, c10::nullopt, mode));
    }
    std::swap(d, d_prev);
  }
  return d;
}

template <typename F>
auto by_cell(int64_t cell, F&& f) {
  TORCH_CHECK(cell == kRnn || cell == kGru, "cell loops: unknown cell ", cell);
  return cell == kRnn ? f(Rnn{}) : f(Gru{});
}

void cell_forward_loop(int64_t cell, at::Tensor xg, std::vector<at::Tensor> states, at::Tensor saved, at::Tensor w_hh,
                       int64_t mode, const c10::optional<at::Tensor>& b_hh) {
  TORCH_CHECK(xg.is_contiguous() && saved.is_contiguous(), "cell_forward_loop: buffers must be contiguous");
  for (auto& s : states) TORCH_CHECK(s.is_contiguous() && s.scalar_type() == xg.scalar_type(), "cell_forward_loop: states");
  check_panels(w_hh, xg, mode);
  AT_DISPATCH_FLOATING_TYPES(xg.scalar_type(), "cell_forward_loop", [&] {
    by_cell(cell, [&](auto c) {
      forward_loop<decltype(c), scalar_t>(xg, states, saved, w_hh, mode, b_hh);
      return 0;
    });
  });
}

std::vector<at::Tensor> cell_backward_loop(int64_t cell, std::vector<at::Tensor> states, at::Tensor saved, at::Tensor dy,
                                           std::vector<at::Tensor> d_final, at::Tensor w_hh_t, int64_t mode, at::Tensor dxg,
                                           at::Tensor dhg) {
  TORCH_CHECK(dxg.is_contiguous() && dhg.is_contiguous(), "cell_backward_loop: buffers must be contiguous");
  check_panels(w_hh_t, dxg, mode);
  dy = dy.contiguous();
  std::vector<at::Tensor> d_first;
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "cell_backward_loop", [&] {
    d_first = by_cell(cell, [&](auto c) {
      return backward_loop<decltype(c), scalar_t>(states, saved, dy, d_final, w_hh_t, mode, dxg, dhg);
    });
  });
  return d_first;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmtrain, m) {
  m.def("cell_forward_loop(int cell, Tensor xg, Tensor(a!)[] states, Tensor(b!) saved, Tensor w_hh, int mode, "
        "Tensor? b_hh=None) -> ()",
        &cell_forward_loop);
  m.def("cell_backward_loop(int cell, Tensor[] states, Tensor saved, Tensor dy, Tensor[] d_final, Tensor w_hh_t, int mode, "
        "Tensor(a!) dxg, Tensor(b!) dhg) -> Tensor[]",
        &cell_backward_loop);
}
