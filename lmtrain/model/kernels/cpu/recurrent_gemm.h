// The recurrent product of one time step, shared by the LSTM's loops (lstm_cpu.cpp) and every
// other cell's (cell_cpu.cpp): x (M, K) @ W^T into a step's slice, with W in one of three forms
// (`Mode`): a plain tensor (at::mm), oneDNN's packed form, or our panels (panel_gemm.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include "panel_gemm.h"

namespace {

int64_t grain(int64_t hidden) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(hidden, 1)); }

enum Mode : int64_t { kPlain = 0, kOneDNN = 1, kPanels = 2 };

// x (M, K) @ W^T (+ add) for the plain and oneDNN forms
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& add, int64_t mode) {
  if (mode == kPlain) {
    return add ? at::addmm(*add, x, weight.t()) : at::mm(x, weight.t());
  }
  static auto plain = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  static auto binary = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "binary");
  torch::jit::Stack stack;
  if (add) {
    stack = {x, *add, weight, c10::IValue(), c10::IValue(std::string("add"))};
    binary.callBoxed(&stack);
  } else {
    stack = {x, weight, c10::IValue(), c10::IValue(std::string("none")), c10::IValue(c10::List<c10::optional<at::Scalar>>()),
             c10::IValue(std::string(""))};
    plain.callBoxed(&stack);
  }
  return stack[0].toTensor();
}

// out (M, N) (+)= x (M, K) @ W^T with W as panels; x and W one type (float32 or bfloat16), out
// the same type or, with bfloat16 operands, float32; all contiguous
void panels_product(const at::Tensor& x, const at::Tensor& panels, at::Tensor& out, bool accumulate) {
  if (x.scalar_type() == at::kBFloat16) {
    auto bits = [](const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.const_data_ptr<at::BFloat16>()); };
    if (out.scalar_type() == at::kFloat) {
      panel_gemm_bf16<float>(bits(x), x.size(0), x.size(1), bits(panels), out.size(1), out.data_ptr<float>(), accumulate);
    } else {
      panel_gemm_bf16<uint16_t>(bits(x), x.size(0), x.size(1), bits(panels), out.size(1),
                                reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), accumulate);
    }
  } else {
    panel_gemm(x.const_data_ptr<float>(), x.size(0), x.size(1), panels.const_data_ptr<float>(), out.size(1),
               out.data_ptr<float>(), accumulate);
  }
}

void check_panels(const at::Tensor& w, const at::Tensor& x, int64_t mode) {
  bool bf16 = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(mode != kPanels || (panels_available(bf16) && w.scalar_type() == x.scalar_type() && w.is_contiguous() &&
                                  (bf16 || x.scalar_type() == at::kFloat)),
              "lmtrain: panel weights need float32 with AVX-512 or bfloat16 with AVX512-BF16");
}

// mixed precision: float32 buffers, bfloat16 operands (`low`) and panels
void check_mixed(const at::Tensor& w, const at::Tensor& buffers, const at::Tensor& low, int64_t mode) {
  TORCH_CHECK(mode == kPanels && buffers.scalar_type() == at::kFloat && low.scalar_type() == at::kBFloat16 &&
                  low.is_contiguous(),
              "lmtrain: mixed precision needs float32 buffers, bfloat16 operands and bfloat16 panels");
  check_panels(w, low, mode);
}

}  // namespace
