#pragma once
// siglip_forward / siglip_backward (schemas in csrc/ops.cpp) for any backend of the chunked
// engine (common/engine_driver.h): the dense ops of common/dense_op.h with the policy of
// common/siglip.h. cpu/siglip.cpp and cuda/siglip.cu register them with their Engine.
#include <ATen/ATen.h>

#include <tuple>

#include "common/dense_op.h"
#include "common/siglip.h"

namespace vse {

// SigLipPolicy<T> with the checked scale t > 0 and bias b of the op `op`.
inline auto siglip_policy_maker(const char* op, const at::Tensor& scale, const at::Tensor& bias) {
  const double t = checked_scalar(op, "scale", scale, true), b = checked_scalar(op, "bias", bias, false);
  return [t, b](auto zero) {
    using T = decltype(zero);
    return SigLipPolicy<T>{static_cast<T>(t), static_cast<T>(b)};
  };
}

// Outputs: (loss in the accumulate type, row_saved [N, 3] with the saved values of SigLipPolicy,
// col_saved [N, 3] (zeros: the terms are the rows'), ∂loss/∂scale, ∂loss/∂bias in the
// accumulate type).
template <class Engine>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_forward(
    const at::Tensor& img, const at::Tensor& txt, const at::Tensor& labels, const at::Tensor& scale,
    const at::Tensor& bias, int64_t anchor_begin, int64_t anchor_end, int64_t row_chunk, int64_t col_chunk) {
  auto [loss, row_saved, col_saved] =
      dense_op_forward<Engine>("siglip_forward", siglip_policy_maker("siglip_forward", scale, bias), img, txt, labels,
                               anchor_begin, anchor_end, row_chunk, col_chunk);
  return {loss, row_saved, col_saved, sum_terms(row_saved.select(1, 1)), sum_terms(row_saved.select(1, 2))};
}

template <class Engine>
std::tuple<at::Tensor, at::Tensor> siglip_backward(const at::Tensor& grad, const at::Tensor& img,
                                                   const at::Tensor& txt, const at::Tensor& labels,
                                                   const at::Tensor& scale, const at::Tensor& bias,
                                                   const at::Tensor& row_saved, const at::Tensor& col_saved,
                                                   int64_t anchor_begin, int64_t anchor_end, int64_t row_chunk,
                                                   int64_t col_chunk) {
  return dense_op_backward<Engine>("siglip_backward", siglip_policy_maker("siglip_backward", scale, bias), grad, img,
                                   txt, labels, row_saved, col_saved, anchor_begin, anchor_end, row_chunk, col_chunk);
}

}  // namespace vse
