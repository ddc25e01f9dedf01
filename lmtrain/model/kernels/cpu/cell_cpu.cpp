// Every cell's time loops on the CPU but the LSTM's (lstm_cpu.cpp): one generic loop over time,
// templated on a cell's pointwise step (a functor below), with the recurrent product of each step
// written straight into a reused buffer (recurrent_gemm.h: our panels, oneDNN or at::mm).
//
// Python (lmtrain/model/kernels/cell_sequence.py) does the sequence-wide GEMMs (input projections,
// dX, dW) and calls these two ops for the loops: the same plan as the generic engine
// (lmtrain/model/recurrence.py), with the cell's step inlined and vectorised instead of a dozen
// tensor operations per step. Same equations and gate order as lmtrain/model/cells/NAME.py.
//
//   cell_forward_loop(cell, xg, states, saved, w_hh, mode, b_hh, extra)
//     xg (T, B, GH): x W_ih^T + b_ih for every step
//     states: the cell's state tensors, each (T+1, B, H); state 0 is h; row 0 set on entry
//     saved (T, B, S·H): filled with what the backward step needs (S per cell; 1 element if none)
//     w_hh: (GH, H) in the form `mode` names; b_hh (GH,) or None (the cell's recurrent bias);
//     extra: [] or the cell's one per-unit parameter (the peepholes, 3H)
//     hs_low (T+1, B, H) bfloat16, mixed precision only (float32 buffers, bfloat16 panels): h_0 set
//       on entry; filled with h_t rounded, the operand of the next step's product (and of dW_hh)
//   cell_backward_loop(cell, states, saved, dy, d_final, w_hh_t, mode, dxg, dhg, extra)
//     -> the gradients of the initial states, then of the extra (if any)
//     dhg_low (B, GH) bfloat16, mixed precision only: each step's dhg rounded, the operand of
//       dh_{t-1} = dhg_t W_hh
//     dy (T, B, H); d_final: the gradients of the final states (each (B, H))
//     w_hh_t: W_hh^T (H, GH) in the form `mode` names
//     dxg, dhg (T, B, GH): filled with the gradients of the two pre-activations (one tensor where
//       the cell's are equal, e.g. the RNN's)
//
// A cell functor gives kGates, kStates, kSaved and kExtra (H-wide blocks), and per unit j of one
// row: forward(j, H, xg, hg, b_hh, extra, prev, next, saved) and backward(j, H, d, saved, prev,
// next, extra, dxg, dhg, d_prev, d_extra), where `d` is the gradient reaching each state of the step's output (the
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
  static constexpr int kGates = 1, kStates = 1, kSaved = 0, kExtra = 0;
  template <typename M, typename T>
  __attribute__((always_inline)) static inline void forward(int64_t j, int64_t, const T* xg, const T* hg, const T* b, const T*, const ConstRows<T>&,
                             const Rows<T>& next, T*) {
    next[0][j] = tanh_fast(M(xg[j]) + M(hg[j]) + (b ? M(b[j]) : M(0)));
  }
  template <typename M, typename T>
  __attribute__((always_inline)) static inline void backward(int64_t j, int64_t, const ConstRows<T>& d, const T*, const ConstRows<T>&, const ConstRows<T>& next,
                              const T*, T* dxg, T* dhg, const Rows<T>& d_prev, T*) {
    M h = next[0][j];
    M g = M(d[0][j]) * (M(1) - h * h);
    dxg[j] = g;
    if (dhg != dxg) dhg[j] = g;
    d_prev[0][j] = M(0);  // h reaches the step only through W_hh
  }
};

// PyTorch's GRU (lmtrain/model/cells/gru.py): gates r, z, n; saved r, z, n and U_n h + b_hn
struct Gru {
  static constexpr int kGates = 3, kStates = 1, kSaved = 4, kExtra = 0;
  template <typename M, typename T>
  __attribute__((always_inline)) static inline void forward(int64_t j, int64_t H, const T* xg, const T* hg, const T* b, const T*, const ConstRows<T>& prev,
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
  __attribute__((always_inline)) static inline void backward(int64_t j, int64_t H, const ConstRows<T>& d, const T* saved, const ConstRows<T>& prev,
                              const ConstRows<T>&, const T*, T* dxg, T* dhg, const Rows<T>& d_prev, T*) {
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

// the peephole LSTM (lmtrain/model/cells/peephole.py): gates i, f, g, o, peepholes p_i, p_f, p_o
// (the extra, 3H); saved i, f, g, o and tanh c'
struct Peephole {
  static constexpr int kGates = 4, kStates = 2, kSaved = 5, kExtra = 3;
  template <typename M, typename T>
  __attribute__((always_inline)) static inline void forward(int64_t j, int64_t H, const T* xg, const T* hg, const T*, const T* p, const ConstRows<T>& prev,
                             const Rows<T>& next, T* saved) {
    M c = prev[1][j];
    M i = sigmoid_fast(M(xg[j]) + M(hg[j]) + M(p[j]) * c);
    M f = sigmoid_fast(M(xg[H + j]) + M(hg[H + j]) + M(p[H + j]) * c);
    M g = tanh_fast(M(xg[2 * H + j]) + M(hg[2 * H + j]));
    M c_new = f * c + i * g;
    M o = sigmoid_fast(M(xg[3 * H + j]) + M(hg[3 * H + j]) + M(p[2 * H + j]) * c_new);
    M tc = tanh_fast(c_new);
    next[0][j] = o * tc, next[1][j] = c_new;
    saved[j] = i, saved[H + j] = f, saved[2 * H + j] = g, saved[3 * H + j] = o, saved[4 * H + j] = tc;
  }
  template <typename M, typename T>
  __attribute__((always_inline)) static inline void backward(int64_t j, int64_t H, const ConstRows<T>& d, const T* saved, const ConstRows<T>& prev,
                              const ConstRows<T>& next, const T* p, T* dxg, T*, const Rows<T>& d_prev, T* d_extra) {
    M i = saved[j], f = saved[H + j], g = saved[2 * H + j], o = saved[3 * H + j], tc = saved[4 * H + j];
    M dh = d[0][j], c_prev = prev[1][j], c_new = next[1][j];
    M d_o = dh * tc * o * (M(1) - o);
    // c' reaches the loss through h' = o tanh(c'), through o's peephole, and through the next step
    M dc = M(d[1][j]) + dh * o * (M(1) - tc * tc) + d_o * M(p[2 * H + j]);
    M di = dc * g * i * (M(1) - i), df = dc * c_prev * f * (M(1) - f), dg = dc * i * (M(1) - g * g);
    dxg[j] = di, dxg[H + j] = df, dxg[2 * H + j] = dg, dxg[3 * H + j] = d_o;
    d_prev[0][j] = M(0);
    d_prev[1][j] = dc * f + di * M(p[j]) + df * M(p[H + j]);
    d_extra[j] += di * c_prev, d_extra[H + j] += df * c_prev, d_extra[2 * H + j] += d_o * c_new;
  }
};

// the coupled-gate LSTM (lmtrain/model/cells/coupled.py): gates f, g, o, input gate 1 - f;
// saved f, g, o and tanh c'
struct Coupled {
  static constexpr int kGates = 3, kStates = 2, kSaved = 4, kExtra = 0;
  template <typename M, typename T>
  __attribute__((always_inline)) static inline void forward(int64_t j, int64_t H, const T* xg, const T* hg, const T*, const T*, const ConstRows<T>& prev,
                             const Rows<T>& next, T* saved) {
    M f = sigmoid_fast(M(xg[j]) + M(hg[j]));
    M g = tanh_fast(M(xg[H + j]) + M(hg[H + j]));
    M o = sigmoid_fast(M(xg[2 * H + j]) + M(hg[2 * H + j]));
    M c_new = g + f * (M(prev[1][j]) - g);
    M tc = tanh_fast(c_new);
    next[0][j] = o * tc, next[1][j] = c_new;
    saved[j] = f, saved[H + j] = g, saved[2 * H + j] = o, saved[3 * H + j] = tc;
  }
  template <typename M, typename T>
  __attribute__((always_inline)) static inline void backward(int64_t j, int64_t H, const ConstRows<T>& d, const T* saved, const ConstRows<T>& prev,
                              const ConstRows<T>&, const T*, T* dxg, T*, const Rows<T>& d_prev, T*) {
    M f = saved[j], g = saved[H + j], o = saved[2 * H + j], tc = saved[3 * H + j];
    M dh = d[0][j], c_prev = prev[1][j];
    M dc = M(d[1][j]) + dh * o * (M(1) - tc * tc);
    dxg[j] = dc * (c_prev - g) * f * (M(1) - f);
    dxg[H + j] = dc * (M(1) - f) * (M(1) - g * g);
    dxg[2 * H + j] = dh * tc * o * (M(1) - o);
    d_prev[0][j] = M(0), d_prev[1][j] = dc * f;
  }
};

// log(y) for y > 0 in float, vectorisable: y = 2^e m with m in [sqrt(1/2), sqrt 2), then
// log m = 2 atanh(s), s = (m - 1) / (m + 1), as a series in s^2 (|s| < 0.172: about 1 ulp)
__attribute__((always_inline)) inline float log_poly(float y) {
  int32_t bits = __builtin_bit_cast(int32_t, y);
  int32_t e = ((bits >> 23) & 0xff) - 127;
  float m = __builtin_bit_cast(float, (bits & 0x7fffff) | 0x3f800000);  // [1, 2)
  bool high = m > 1.41421356f;
  m = high ? m * 0.5f : m;
  e = high ? e + 1 : e;
  float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
  float series = 1.0f + s2 * (0.333333333f + s2 * (0.2f + s2 * (0.142857143f + s2 * 0.111111111f)));
  return float(e) * 0.693147181f + 2.0f * s * series;
}

// log σ(x) = min(x, 0) - log(1 + e^-|x|), exact for large |x| in either direction
__attribute__((always_inline)) inline float log_sigmoid(float x) { return std::min(x, 0.0f) - log_poly(1.0f + exp_poly(-std::abs(x))); }
inline double log_sigmoid(double x) { return std::min(x, 0.0) - std::log1p(std::exp(-std::abs(x))); }
__attribute__((always_inline)) inline float exp_fast(float x) { return exp_poly(x); }
inline double exp_fast(double x) { return std::exp(x); }

// xLSTM's sLSTM (lmtrain/model/cells/slstm.py): gates i, f, z, o, states h, c, n, m; saved i, f,
// tanh z, o, σ(-f̃) and the max's margin ĩ - (m + log σ(f̃))
struct Slstm {
  static constexpr int kGates = 4, kStates = 4, kSaved = 6, kExtra = 0;
  template <typename M, typename T>
  __attribute__((always_inline)) static inline void forward(int64_t j, int64_t H, const T* xg, const T* hg, const T*, const T*, const ConstRows<T>& prev,
                             const Rows<T>& next, T* saved) {
    M a_i = M(xg[j]) + M(hg[j]), a_f = M(xg[H + j]) + M(hg[H + j]);
    M a_z = M(xg[2 * H + j]) + M(hg[2 * H + j]), a_o = M(xg[3 * H + j]) + M(hg[3 * H + j]);
    M c = prev[1][j], n = prev[2][j], m = prev[3][j];
    M log_f = log_sigmoid(a_f) + m;
    M m_new = std::max(a_i, log_f);
    M i = exp_fast(a_i - m_new), f = exp_fast(log_f - m_new);
    M tz = tanh_fast(a_z), o = sigmoid_fast(a_o);
    M c_new = f * c + i * tz, n_new = f * n + i;
    next[0][j] = o * c_new / n_new, next[1][j] = c_new, next[2][j] = n_new, next[3][j] = m_new;
    saved[j] = i, saved[H + j] = f, saved[2 * H + j] = tz, saved[3 * H + j] = o;
    saved[4 * H + j] = sigmoid_fast(-a_f), saved[5 * H + j] = a_i - log_f;
  }
  template <typename M, typename T>
  __attribute__((always_inline)) static inline void backward(int64_t j, int64_t H, const ConstRows<T>& d, const T* saved, const ConstRows<T>& prev,
                              const ConstRows<T>& next, const T*, T* dxg, T*, const Rows<T>& d_prev, T*) {
    M i = saved[j], f = saved[H + j], tz = saved[2 * H + j], o = saved[3 * H + j];
    M sig_neg_f = saved[4 * H + j], margin = saved[5 * H + j];
    M c = prev[1][j], n = prev[2][j], c_new = next[1][j], n_new = next[2][j];
    M dh = d[0][j];
    M ratio = c_new / n_new, dh_o_n = dh * o / n_new;
    M dc = M(d[1][j]) + dh_o_n, dn = M(d[2][j]) - dh_o_n * ratio;  // total gradients of c' and n'
    M di_i = (dc * tz + dn) * i, df_f = (dc * c + dn * n) * f;
    M dm = M(d[3][j]) - di_i - df_f;  // total gradient of m'
    M to_i = margin > M(0) ? M(1) : margin < M(0) ? M(0) : M(0.5);  // torch.maximum's split
    M d_log_f = df_f + dm - dm * to_i;
    dxg[j] = di_i + dm * to_i;
    dxg[H + j] = d_log_f * sig_neg_f;
    dxg[2 * H + j] = dc * i * (M(1) - tz * tz);
    dxg[3 * H + j] = dh * ratio * o * (M(1) - o);
    d_prev[0][j] = M(0), d_prev[1][j] = dc * f, d_prev[2][j] = dn * f, d_prev[3][j] = d_log_f;
  }
};

enum CellKind : int64_t { kRnn = 0, kGru = 1, kPeephole = 2, kCoupled = 3, kSlstm = 4 };

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
                  const c10::optional<at::Tensor>& b_hh, const T* extra, const c10::optional<at::Tensor>& hs_low) {
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
        for (int64_t j = 0; j < hidden; ++j) Cell::template forward<M, T>(j, hidden, x, h, bias, extra, p, n, s);
      }
    });
    if (hs_low) (*hs_low)[t + 1].copy_(states[0][t + 1]);
  }
}

template <typename Cell, typename T>
std::vector<at::Tensor> backward_loop(const std::vector<at::Tensor>& states, const at::Tensor& saved, const at::Tensor& dy,
                                      std::vector<at::Tensor> d, const at::Tensor& w_hh_t, int64_t mode, at::Tensor& dxg,
                                      at::Tensor& dhg, const T* extra, const c10::optional<at::Tensor>& dhg_low) {
  using M = typename Math<T>::type;
  int64_t steps = dy.size(0), batch = dy.size(1), width = dxg.size(2), hidden = dy.size(2);
  // each row's sums of the extras' gradients over the steps (a row is one thread's), summed over
  // the rows at the end
  at::Tensor d_extra_rows = at::zeros({batch, Cell::kExtra * hidden}, dy.options());
  T* d_extra_p = d_extra_rows.data_ptr<T>();
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

template <typename F>
auto by_cell(int64_t cell, F&& f) {
  switch (cell) {
    case kRnn: return f(Rnn{});
    case kGru: return f(Gru{});
    case kPeephole: return f(Peephole{});
    case kCoupled: return f(Coupled{});
    case kSlstm: return f(Slstm{});
  }
  TORCH_CHECK(false, "cell loops: unknown cell ", cell);
  return f(Rnn{});
}

template <typename T>
const T* extra_of(const std::vector<at::Tensor>& extra) {
  TORCH_CHECK(extra.size() <= 1 && (extra.empty() || extra[0].is_contiguous()), "cell loops: at most one contiguous extra");
  return extra.empty() ? nullptr : extra[0].const_data_ptr<T>();
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
  dy = dy.contiguous();
  std::vector<at::Tensor> d_first;
  AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "cell_backward_loop", [&] {
    d_first = by_cell(cell, [&](auto c) {
      return backward_loop<decltype(c), scalar_t>(states, saved, dy, d_final, w_hh_t, mode, dxg, dhg, extra_of<scalar_t>(extra),
                                                  dhg_low);
    });
  });
  return d_first;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmtrain, m) {
  m.def("cell_forward_loop(int cell, Tensor xg, Tensor(a!)[] states, Tensor(b!) saved, Tensor w_hh, int mode, "
        "Tensor? b_hh, Tensor[] extra, Tensor(c!)? hs_low=None) -> ()",
        &cell_forward_loop);
  m.def("cell_backward_loop(int cell, Tensor[] states, Tensor saved, Tensor dy, Tensor[] d_final, Tensor w_hh_t, int mode, "
        "Tensor(a!) dxg, Tensor(b!) dhg, Tensor[] extra, Tensor(c!)? dhg_low=None) -> Tensor[]",
        &cell_backward_loop);
}
