// Cross-entropy over the vocabulary, fused: the forward keeps only each row's log-sum-exp, and the
// backward writes the gradient of the logits in their own type (bfloat16 for the bf16 decoder)
// in one pass, with no float32 copy of the logits and no log-softmax tensor.
//
//   cross_entropy_forward(logits (N, V) float32 or bfloat16, targets (N,) int64) -> (loss (N,), lse (N,))
//     lse_n = log Σ_v exp(logits[n, v]);  loss_n = lse_n - logits[n, targets_n]; 0 where targets_n < 0
//   cross_entropy_backward(logits, targets, lse, grad (N,)) -> grad_logits (N, V) in logits' type
//     grad_logits[n, v] = grad_n (exp(logits[n, v] - lse_n) - [v = targets_n]); 0 where targets_n < 0
//
// Both run in float (fast_math.h's exp, about 2 ulp) with one row per task.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "fast_math.h"

namespace {

template <typename T>
void forward_rows(const T* logits, const int64_t* targets, int64_t rows, int64_t vocab, float* loss, float* lse) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = logits + r * vocab;
      float top = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : top)
      for (int64_t j = 0; j < vocab; ++j) top = std::max(top, load(row, j));
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < vocab; ++j) sum += exp_poly(load(row, j) - top);
      lse[r] = top + std::log(sum);
      loss[r] = targets[r] < 0 ? 0.0f : lse[r] - load(row, targets[r]);
    }
  });
}

template <typename T>
void backward_rows(const T* logits, const int64_t* targets, const float* lse, const float* grad, int64_t rows,
                   int64_t vocab, T* out) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = logits + r * vocab;
      T* out_row = out + r * vocab;
      int64_t target = targets[r];
      float g = target < 0 ? 0.0f : grad[r], shift = lse[r];
#pragma omp simd
      for (int64_t j = 0; j < vocab; ++j) store(out_row, j, g * exp_poly(load(row, j) - shift));
      if (target >= 0) store(out_row, target, g * (exp_poly(load(row, target) - shift) - 1.0f));
    }
  });
}

void check(const at::Tensor& logits, const at::Tensor& targets) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() &&
                  (logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16),
              "cross_entropy: logits must be a contiguous float32 or bfloat16 matrix");
  TORCH_CHECK(targets.dim() == 1 && targets.scalar_type() == at::kLong && targets.is_contiguous() &&
                  targets.size(0) == logits.size(0),
              "cross_entropy: targets must be one int64 per row");
  TORCH_CHECK(targets.numel() == 0 || targets.max().item<int64_t>() < logits.size(1),
              "cross_entropy: a target is outside the vocabulary");
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward(at::Tensor logits, at::Tensor targets) {
  check(logits, targets);
  int64_t rows = logits.size(0), vocab = logits.size(1);
  auto options = logits.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({rows}, options), lse = at::empty({rows}, options);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, logits.scalar_type(), "cross_entropy_forward", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      forward_rows<scalar_t>(logits.const_data_ptr<scalar_t>(), targets.const_data_ptr<int64_t>(), rows, vocab,
                             loss.data_ptr<float>(), lse.data_ptr<float>());
    }
  });
  return {loss, lse};
}

at::Tensor cross_entropy_backward(at::Tensor logits, at::Tensor targets, at::Tensor lse, at::Tensor grad) {
  check(logits, targets);
  lse = lse.contiguous();
  grad = grad.to(at::kFloat).contiguous();
  at::Tensor out = at::empty_like(logits);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, logits.scalar_type(), "cross_entropy_backward", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      backward_rows<scalar_t>(logits.const_data_ptr<scalar_t>(), targets.const_data_ptr<int64_t>(),
                              lse.const_data_ptr<float>(), grad.const_data_ptr<float>(), logits.size(0),
                              logits.size(1), out.data_ptr<scalar_t>());
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmtrain, m) {
  m.def("cross_entropy_forward(Tensor logits, Tensor targets) -> (Tensor, Tensor)", &cross_entropy_forward);
  m.def("cross_entropy_backward(Tensor logits, Tensor targets, Tensor lse, Tensor grad) -> Tensor", &cross_entropy_backward);
}
