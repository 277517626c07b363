#pragma once
// unified_forward / unified_backward (schemas in csrc/ops.cpp) for any backend of the chunked
// engine (common/engine_driver.h): the dense ops of common/dense_op.h with the policy of
// common/unified.h. cpu/unified.cpp and cuda/unified.cu register them with their Engine.
#include <ATen/ATen.h>

#include <tuple>

#include "common/dense_op.h"
#include "common/unified.h"

namespace vse {

// Outputs: (loss summed over both directions in the accumulate type, row_saved [N, 3],
// col_saved [N, 3] with the saved values of UnifiedPolicy, ∂loss/∂scale in the accumulate type,
// computed only with scale_grad: 0 otherwise).
template <class Engine>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> unified_forward(
    const at::Tensor& img, const at::Tensor& txt, const at::Tensor& labels, const at::Tensor& scale, double margin,
    bool scale_grad, int64_t anchor_begin, int64_t anchor_end, int64_t row_chunk, int64_t col_chunk) {
  const double gamma = checked_scalar("unified_forward", "scale", scale, true);
  const auto run = [&](auto learns_scale) {
    const auto make_policy = [&](auto zero) {
      using T = decltype(zero);
      return UnifiedPolicy<T, decltype(learns_scale)::value>{static_cast<T>(gamma), static_cast<T>(margin)};
    };
    return dense_op_forward<Engine>("unified_forward", make_policy, img, txt, labels, anchor_begin, anchor_end,
                                    row_chunk, col_chunk);
  };
  auto [loss, row_saved, col_saved] = scale_grad ? run(std::true_type{}) : run(std::false_type{});
  const auto d_scale = sum_terms(at::stack({row_saved.select(1, 2), col_saved.select(1, 2)}));
  return {loss, row_saved, col_saved, d_scale};
}

template <class Engine>
std::tuple<at::Tensor, at::Tensor> unified_backward(const at::Tensor& grad, const at::Tensor& img,
                                                    const at::Tensor& txt, const at::Tensor& labels,
                                                    const at::Tensor& scale, double margin,
                                                    const at::Tensor& row_saved, const at::Tensor& col_saved,
                                                    int64_t anchor_begin, int64_t anchor_end, int64_t row_chunk,
                                                    int64_t col_chunk) {
  const double gamma = checked_scalar("unified_backward", "scale", scale, true);
  const auto make_policy = [&](auto zero) {
    using T = decltype(zero);
    return UnifiedPolicy<T>{static_cast<T>(gamma), static_cast<T>(margin)};
  };
  return dense_op_backward<Engine>("unified_backward", make_policy, grad, img, txt, labels, row_saved, col_saved,
                                   anchor_begin, anchor_end, row_chunk, col_chunk);
}

}  // namespace vse
