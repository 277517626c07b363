#pragma once
// The forward and backward ops of a dense loss (unified_op.h, siglip_op.h), shared: the argument
// checks every one needs, then dense_forward / dense_backward (engine_driver.h) with the loss's
// policy in the accumulate type. `make_policy(T{})` builds that policy for the type T.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <tuple>

#include "common/engine_driver.h"
#include "common/loss_args.h"

namespace vse {

// run(a, b, labels, anchors, T{}) on the checked arguments of the dense op `op`: a and b the
// operands (tiles.h), labels a device pointer or nullptr, T the accumulate type; returns what
// run returns (the same type for every T).
template <class Engine, typename Run>
auto dense_op_dispatch(const char* op, const at::Tensor& img, const at::Tensor& txt, const at::Tensor& labels,
                       int64_t anchor_begin, int64_t anchor_end, int64_t row_chunk, int64_t col_chunk,
                       const Run& run) {
  check_pair_args(op, img, txt, labels, row_chunk, col_chunk);
  const typename Engine::Guard guard(img);
  const Anchors anchors = checked_anchors(op, anchor_begin, anchor_end, img.size(0));
  const auto a = as_operand(img), b = as_operand(txt);
  const auto lab = labels.contiguous();
  decltype(run(a, b, labels_data(lab), anchors, double{})) out;
  AT_DISPATCH_FLOATING_TYPES(accumulate_type(img.scalar_type()), "dense_op_dispatch",
                             [&] { out = run(a, b, labels_data(lab), anchors, scalar_t{}); });
  return out;
}

// (loss summed over the anchors' terms, row_saved, col_saved), in the accumulate type.
template <class Engine, typename MakePolicy>
std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_op_forward(const char* op, const MakePolicy& make_policy,
                                                                const at::Tensor& img, const at::Tensor& txt,
                                                                const at::Tensor& labels, int64_t anchor_begin,
                                                                int64_t anchor_end, int64_t row_chunk,
                                                                int64_t col_chunk) {
  return dense_op_dispatch<Engine>(
      op, img, txt, labels, anchor_begin, anchor_end, row_chunk, col_chunk,
      [&](const at::Tensor& a, const at::Tensor& b, const int64_t* labels_ptr, const Anchors& anchors, auto zero) {
        using T = decltype(zero);
        return dense_forward<Engine, T>(a, b, labels_ptr, make_policy(zero), anchors, row_chunk, col_chunk);
      });
}

// (d img, d txt) in the inputs' dtypes, from the saved values of dense_op_forward.
template <class Engine, typename MakePolicy>
std::tuple<at::Tensor, at::Tensor> dense_op_backward(const char* op, const MakePolicy& make_policy,
                                                     const at::Tensor& grad, const at::Tensor& img,
                                                     const at::Tensor& txt, const at::Tensor& labels,
                                                     const at::Tensor& row_saved, const at::Tensor& col_saved,
                                                     int64_t anchor_begin, int64_t anchor_end, int64_t row_chunk,
                                                     int64_t col_chunk) {
  check_pair_args(op, img, txt, labels, row_chunk, col_chunk);
  const typename Engine::Guard guard(img);
  const int64_t n = img.size(0);
  const Anchors anchors = checked_anchors(op, anchor_begin, anchor_end, n);
  const auto acc = accumulate_type(img.scalar_type());
  const int64_t width = decltype(make_policy(double{}))::kSavedWidth;
  check_saved(op, "row_saved", row_saved, n, width, acc);
  check_saved(op, "col_saved", col_saved, n, width, acc);
  check_device(op, "row_saved", row_saved, img);
  check_device(op, "col_saved", col_saved, img);
  const auto a = as_operand(img), b = as_operand(txt);
  const auto lab = labels.contiguous();
  const auto rs = row_saved.contiguous(), cs = col_saved.contiguous();
  const auto g = grad.to(accumulate_options(img));
  std::tuple<at::Tensor, at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES(acc, "dense_op_backward", [&] {
    grads = dense_backward<Engine, scalar_t>(g, a, b, labels_data(lab), make_policy(scalar_t{}), anchors, row_chunk,
                                             col_chunk, rs, cs);
  });
  return {std::get<0>(grads).to(img.scalar_type()), std::get<1>(grads).to(txt.scalar_type())};
}

}  // namespace vse
