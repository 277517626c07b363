#pragma once
// siglip_forward / siglip_backward (schemas in csrc/ops.cpp) for any backend of the chunked
// engine (common/engine_driver.h): the dense engine with the policy of common/siglip.h.
// cpu/siglip.cpp and cuda/siglip.cu register them with their Engine.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <tuple>

#include "common/engine_driver.h"
#include "common/loss_args.h"
#include "common/siglip.h"

namespace vse {

// Outputs: (loss in the accumulate type, row_saved [N, 3] with the saved values of SigLipPolicy,
// col_saved [N, 3] (zeros: the terms are the rows'), ∂loss/∂scale, ∂loss/∂bias in the
// accumulate type).
template <class Engine>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_forward(
    const at::Tensor& img, const at::Tensor& txt, const at::Tensor& labels, const at::Tensor& scale,
    const at::Tensor& bias, int64_t anchor_begin, int64_t anchor_end, int64_t row_chunk, int64_t col_chunk) {
  check_pair_args("siglip_forward", img, txt, labels, row_chunk, col_chunk);
  const double t = checked_scalar("siglip_forward", "scale", scale, true);
  const double b = checked_scalar("siglip_forward", "bias", bias, false);
  const typename Engine::Guard guard(img);
  const Anchors anchors = checked_anchors("siglip_forward", anchor_begin, anchor_end, img.size(0));
  const auto acc = accumulate_type(img.scalar_type());
  const auto a = as_operand(img), b_op = as_operand(txt);
  const auto lab = labels.contiguous();
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(acc, "siglip_forward", [&] {
    const SigLipPolicy<scalar_t> policy{static_cast<scalar_t>(t), static_cast<scalar_t>(b)};
    out = dense_forward<Engine, scalar_t>(a, b_op, labels_data(lab), policy, anchors, row_chunk, col_chunk);
  });
  auto& [loss, row_saved, col_saved] = out;
  const auto summed = [&](int64_t column) { return sum_terms(row_saved.select(1, column)); };
  return {loss, row_saved, col_saved, summed(1), summed(2)};
}

template <class Engine>
std::tuple<at::Tensor, at::Tensor> siglip_backward(const at::Tensor& grad, const at::Tensor& img,
                                                   const at::Tensor& txt, const at::Tensor& labels,
                                                   const at::Tensor& scale, const at::Tensor& bias,
                                                   const at::Tensor& row_saved, const at::Tensor& col_saved,
                                                   int64_t anchor_begin, int64_t anchor_end, int64_t row_chunk,
                                                   int64_t col_chunk) {
  check_pair_args("siglip_backward", img, txt, labels, row_chunk, col_chunk);
  const double t = checked_scalar("siglip_backward", "scale", scale, true);
  const double b = checked_scalar("siglip_backward", "bias", bias, false);
  const typename Engine::Guard guard(img);
  const int64_t n = img.size(0);
  const Anchors anchors = checked_anchors("siglip_backward", anchor_begin, anchor_end, n);
  const auto acc = accumulate_type(img.scalar_type());
  constexpr int64_t width = SigLipPolicy<double>::kSavedWidth;
  check_saved("siglip_backward", "row_saved", row_saved, n, width, acc);
  check_saved("siglip_backward", "col_saved", col_saved, n, width, acc);
  check_device("siglip_backward", "row_saved", row_saved, img);
  check_device("siglip_backward", "col_saved", col_saved, img);
  const auto a = as_operand(img), b_op = as_operand(txt);
  const auto lab = labels.contiguous();
  const auto rs = row_saved.contiguous(), cs = col_saved.contiguous();
  const auto g = grad.to(accumulate_options(img));
  std::tuple<at::Tensor, at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES(acc, "siglip_backward", [&] {
    const SigLipPolicy<scalar_t> policy{static_cast<scalar_t>(t), static_cast<scalar_t>(b)};
    grads = dense_backward<Engine, scalar_t>(g, a, b_op, labels_data(lab), policy, anchors, row_chunk, col_chunk, rs,
                                             cs);
  });
  return {std::get<0>(grads).to(img.scalar_type()), std::get<1>(grads).to(txt.scalar_type())};
}

}  // namespace vse
