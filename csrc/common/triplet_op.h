#pragma once
// triplet_forward / triplet_backward (schemas in csrc/ops.cpp) for any backend of the chunked
// engine (common/engine_driver.h): cpu/triplet.cpp and cuda/triplet.cu register them with their
// Engine. Mining "all" is dense (recompute S in backward, HingeSumPolicy), "hardest"/"topk"
// are sparse (mined lists, mined_hinge_term, gather backward); see common/triplet.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <string_view>
#include <tuple>

#include "common/engine_driver.h"
#include "common/loss_args.h"
#include "common/triplet.h"

namespace vse {

// Width of the mined lists: 1 for "hardest", k for "topk" (at most N: no anchor has more).
inline int64_t triplet_list_width(std::string_view mining, int64_t k, int64_t n) {
  TORCH_CHECK(mining == "all" || mining == "hardest" || mining == "topk",
              "triplet: mining must be all, hardest or topk");
  TORCH_CHECK(k >= 1, "triplet: k must be >= 1");
  return mining == "hardest" ? 1 : std::min(k, std::max<int64_t>(n, 1));
}

// Outputs: (loss, row_saved, col_saved, row_index, col_index); loss is the sum over both
// directions in the accumulate type.
//   "all":            row/col_saved [N, 2] (HingeSumPolicy), row/col_index [N, 0]
//   "hardest"/"topk": row/col_saved [N, w] = ∂loss/∂(listed negative), row/col_index [N, w]
//                     the listed negatives (−1: empty slot), w = triplet_list_width(...)
template <class Engine>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> triplet_forward(
    const at::Tensor& img, const at::Tensor& txt, const at::Tensor& labels, double margin,
    c10::string_view mining_, int64_t k, int64_t anchor_begin, int64_t anchor_end, int64_t row_chunk,
    int64_t col_chunk) {
  check_pair_args("triplet_forward", img, txt, labels, row_chunk, col_chunk);
  checked_option("triplet_forward", "margin", margin);
  const typename Engine::Guard guard(img);
  const std::string_view mining(mining_.data(), mining_.size());
  const int64_t n = img.size(0);
  const Anchors anchors = checked_anchors("triplet_forward", anchor_begin, anchor_end, n);
  const int64_t width = triplet_list_width(mining, k, n);
  const auto acc = accumulate_type(img.scalar_type());
  const auto a = as_operand(img), b = as_operand(txt);
  const auto lab = labels.contiguous();
  const int64_t* labels_ptr = labels_data(lab);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(acc, "triplet_forward", [&] {
    const auto m = static_cast<scalar_t>(margin);
    if (mining == "all") {
      const auto [loss, row_saved, col_saved] =
          dense_forward<Engine, scalar_t>(a, b, labels_ptr, HingeSumPolicy<scalar_t>{m}, anchors, row_chunk,
                                          col_chunk);
      const auto none = at::empty({n, 0}, lab.options().dtype(at::kLong));
      out = {loss, row_saved, col_saved, none, none.clone()};
      return;
    }
    using Passes = typename Engine::template Mined<scalar_t>;
    const auto lists = mine_negatives<Engine, scalar_t>(a, b, labels_ptr, width, anchors, row_chunk, col_chunk);
    const auto acc_options = accumulate_options(a);
    auto row_weight = at::empty({n, width}, acc_options), col_weight = at::empty({n, width}, acc_options);
    const auto terms = at::empty({2, n}, acc_options);
    Passes::hinge_terms(lists.row_values, lists.row_indices, lists.row_positive, m, row_weight, terms[0]);
    Passes::hinge_terms(lists.col_values, lists.col_indices, lists.col_positive, m, col_weight, terms[1]);
    out = {sum_terms(terms), row_weight, col_weight, lists.row_indices, lists.col_indices};
  });
  return out;
}

template <class Engine>
std::tuple<at::Tensor, at::Tensor> triplet_backward(const at::Tensor& grad, const at::Tensor& img,
                                                    const at::Tensor& txt, const at::Tensor& labels, double margin,
                                                    c10::string_view mining_, const at::Tensor& row_saved,
                                                    const at::Tensor& col_saved, const at::Tensor& row_index,
                                                    const at::Tensor& col_index, int64_t anchor_begin,
                                                    int64_t anchor_end, int64_t row_chunk, int64_t col_chunk) {
  check_pair_args("triplet_backward", img, txt, labels, row_chunk, col_chunk);
  const typename Engine::Guard guard(img);
  const std::string_view mining(mining_.data(), mining_.size());
  TORCH_CHECK(mining == "all" || mining == "hardest" || mining == "topk",
              "triplet_backward: mining must be all, hardest or topk");
  const int64_t n = img.size(0);
  const Anchors anchors = checked_anchors("triplet_backward", anchor_begin, anchor_end, n);
  const auto acc = accumulate_type(img.scalar_type());
  const int64_t width = mining == "all" ? HingeSumPolicy<double>::kSavedWidth : row_index.size(1);
  check_saved("triplet_backward", "row_saved", row_saved, n, width, acc);
  check_saved("triplet_backward", "col_saved", col_saved, n, width, acc);
  const at::Tensor* others[4] = {&row_saved, &col_saved, &row_index, &col_index};
  const char* names[4] = {"row_saved", "col_saved", "row_index", "col_index"};
  for (int t = 0; t < 4; ++t) check_device("triplet_backward", names[t], *others[t], img);
  const auto g = grad.to(accumulate_options(img));
  std::tuple<at::Tensor, at::Tensor> grads;
  if (mining == "all") {
    const auto a = as_operand(img), b = as_operand(txt);
    const auto lab = labels.contiguous();
    const auto rs = row_saved.contiguous(), cs = col_saved.contiguous();
    AT_DISPATCH_FLOATING_TYPES(acc, "triplet_backward", [&] {
      grads = dense_backward<Engine, scalar_t>(g, a, b, labels_data(lab),
                                               HingeSumPolicy<scalar_t>{static_cast<scalar_t>(margin)}, anchors,
                                               row_chunk, col_chunk, rs, cs);
    });
  } else {
    TORCH_CHECK(row_index.sizes() == row_saved.sizes() && col_index.sizes() == col_saved.sizes() &&
                    row_index.scalar_type() == at::kLong && col_index.scalar_type() == at::kLong,
                "triplet_backward: index lists must be int64 and match the saved weights");
    // The positive S_ii of every listed pair gets minus the pair's weight, in both directions.
    const auto diagonal = -(row_saved.sum(1) + col_saved.sum(1));
    grads = sparse_backward<Engine>(g, img.to(acc), txt.to(acc), row_index, row_saved, col_index, col_saved, diagonal);
  }
  return {std::get<0>(grads).to(img.scalar_type()), std::get<1>(grads).to(txt.scalar_type())};
}

}  // namespace vse
