#pragma once
// unified_forward / unified_backward (schemas in csrc/ops.cpp) for any backend of the chunked
// engine (common/engine_driver.h): the dense engine with the policy of common/unified.h.
// cpu/unified.cpp and cuda/unified.cu register them with their Engine.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <tuple>

#include "common/engine_driver.h"
#include "common/loss_args.h"
#include "common/unified.h"

namespace vse {

// Outputs: (loss summed over both directions in the accumulate type, row_saved [N, 3],
// col_saved [N, 3] with the saved values of UnifiedPolicy, ∂loss/∂scale in the accumulate type,
// computed only with scale_grad: 0 otherwise).
template <class Engine>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> unified_forward(
    const at::Tensor& img, const at::Tensor& txt, const at::Tensor& labels, const at::Tensor& scale, double margin,
    bool scale_grad, int64_t anchor_begin, int64_t anchor_end, int64_t row_chunk, int64_t col_chunk) {
  check_pair_args("unified_forward", img, txt, labels, row_chunk, col_chunk);
  const double gamma = checked_scalar("unified_forward", "scale", scale, true);
  const typename Engine::Guard guard(img);
  const Anchors anchors = checked_anchors("unified_forward", anchor_begin, anchor_end, img.size(0));
  const auto acc = accumulate_type(img.scalar_type());
  const auto a = as_operand(img), b = as_operand(txt);
  const auto lab = labels.contiguous();
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(acc, "unified_forward", [&] {
    const auto run = [&](auto policy) {
      out = dense_forward<Engine, scalar_t>(a, b, labels_data(lab), policy, anchors, row_chunk, col_chunk);
    };
    const auto g = static_cast<scalar_t>(gamma), m = static_cast<scalar_t>(margin);
    if (scale_grad) {
      run(UnifiedPolicy<scalar_t, true>{g, m});
    } else {
      run(UnifiedPolicy<scalar_t>{g, m});
    }
  });
  auto& [loss, row_saved, col_saved] = out;
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
  check_pair_args("unified_backward", img, txt, labels, row_chunk, col_chunk);
  const double gamma = checked_scalar("unified_backward", "scale", scale, true);
  const typename Engine::Guard guard(img);
  const int64_t n = img.size(0);
  const Anchors anchors = checked_anchors("unified_backward", anchor_begin, anchor_end, n);
  const auto acc = accumulate_type(img.scalar_type());
  constexpr int64_t width = UnifiedPolicy<double>::kSavedWidth;
  check_saved("unified_backward", "row_saved", row_saved, n, width, acc);
  check_saved("unified_backward", "col_saved", col_saved, n, width, acc);
  check_device("unified_backward", "row_saved", row_saved, img);
  check_device("unified_backward", "col_saved", col_saved, img);
  const auto a = as_operand(img), b = as_operand(txt);
  const auto lab = labels.contiguous();
  const auto rs = row_saved.contiguous(), cs = col_saved.contiguous();
  const auto g = grad.to(accumulate_options(img));
  std::tuple<at::Tensor, at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES(acc, "unified_backward", [&] {
    const UnifiedPolicy<scalar_t> policy{static_cast<scalar_t>(gamma), static_cast<scalar_t>(margin)};
    grads = dense_backward<Engine, scalar_t>(g, a, b, labels_data(lab), policy, anchors, row_chunk, col_chunk, rs,
                                             cs);
  });
  return {std::get<0>(grads).to(img.scalar_type()), std::get<1>(grads).to(txt.scalar_type())};
}

}  // namespace vse
