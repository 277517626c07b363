// triplet_forward / triplet_backward on CPU: the chunked engine (cpu/engine.h) with the
// triplet policies of common/triplet.h. Mining "all" is dense (recompute S in backward),
// "hardest"/"topk" are sparse (mined lists, gather backward).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <string_view>

#include "common/loss_args.h"
#include "common/triplet.h"
#include "cpu/engine.h"
#include "ops.h"

namespace vse::cpu {
namespace {

using Tensors5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Width of the mined lists: 1 for "hardest", k for "topk" (at most N: no anchor has more).
int64_t list_width(std::string_view mining, int64_t k, int64_t n) {
  TORCH_CHECK(mining == "all" || mining == "hardest" || mining == "topk",
              "triplet: mining must be all, hardest or topk");
  TORCH_CHECK(k >= 1, "triplet: k must be >= 1");
  return mining == "hardest" ? 1 : std::min(k, std::max<int64_t>(n, 1));
}

// Outputs: (loss, row_saved, col_saved, row_index, col_index); loss is the sum over both
// directions in the accumulate type.
//   "all":            row/col_saved [N, 2] (HingeSumPolicy), row/col_index [N, 0]
//   "hardest"/"topk": row/col_saved [N, w] = ∂loss/∂(listed negative), row/col_index [N, w]
//                     the listed negatives (−1: empty slot), w = list_width(...)
Tensors5 triplet_forward(const at::Tensor& img, const at::Tensor& txt, const at::Tensor& labels, double margin,
                         c10::string_view mining_, int64_t k, int64_t row_chunk, int64_t col_chunk) {
  check_pair_args("triplet_forward", img, txt, labels, row_chunk, col_chunk);
  const std::string_view mining(mining_.data(), mining_.size());
  const int64_t n = img.size(0);
  const int64_t width = list_width(mining, k, n);
  const auto acc = accumulate_type(img.scalar_type());
  const auto a = img.to(acc).contiguous(), b = txt.to(acc).contiguous();
  const auto lab = labels.contiguous();
  const int64_t* labels_ptr = labels_data(lab);
  auto loss = at::empty({}, a.options());
  Tensors5 out;
  AT_DISPATCH_FLOATING_TYPES(acc, "triplet_forward_cpu", [&] {
    const auto m = static_cast<scalar_t>(margin);
    if (mining == "all") {
      auto row_saved = at::empty({n, kSavedWidth}, a.options());
      auto col_saved = at::empty({n, kSavedWidth}, a.options());
      loss.fill_(dense_forward<scalar_t>(a, b, labels_ptr, HingeSumPolicy<scalar_t>{m}, row_chunk, col_chunk,
                                         row_saved.data_ptr<scalar_t>(), col_saved.data_ptr<scalar_t>()));
      const auto none = at::empty({n, 0}, a.options().dtype(at::kLong));
      out = {loss, row_saved, col_saved, none, none.clone()};
      return;
    }
    auto lists = mine_negatives<scalar_t>(a, b, labels_ptr, width, row_chunk, col_chunk);
    auto row_weight = at::empty({n, width}, a.options()), col_weight = at::empty({n, width}, a.options());
    const scalar_t* positive = lists.positive.data_ptr<scalar_t>();
    double total[2] = {0, 0};  // summed in double, as in the dense engine
    const at::Tensor* values[2] = {&lists.row_values, &lists.col_values};
    const at::Tensor* indices[2] = {&lists.row_indices, &lists.col_indices};
    at::Tensor* weights[2] = {&row_weight, &col_weight};
    for (int direction = 0; direction < 2; ++direction) {
      const scalar_t* v = values[direction]->data_ptr<scalar_t>();
      const int64_t* idx = indices[direction]->data_ptr<int64_t>();
      scalar_t* w = weights[direction]->data_ptr<scalar_t>();
      for (int64_t i = 0; i < n; ++i) {
        total[direction] += mined_hinge_term(v + i * width, idx + i * width, width, positive[i], m, w + i * width);
      }
    }
    loss.fill_(static_cast<scalar_t>(total[0] + total[1]));
    out = {loss, row_weight, col_weight, lists.row_indices, lists.col_indices};
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> triplet_backward(const at::Tensor& grad, const at::Tensor& img,
                                                    const at::Tensor& txt, const at::Tensor& labels,
                                                    double margin, c10::string_view mining_,
                                                    const at::Tensor& row_saved, const at::Tensor& col_saved,
                                                    const at::Tensor& row_index, const at::Tensor& col_index,
                                                    int64_t row_chunk, int64_t col_chunk) {
  check_pair_args("triplet_backward", img, txt, labels, row_chunk, col_chunk);
  const std::string_view mining(mining_.data(), mining_.size());
  TORCH_CHECK(mining == "all" || mining == "hardest" || mining == "topk",
              "triplet_backward: mining must be all, hardest or topk");
  const int64_t n = img.size(0);
  const auto acc = accumulate_type(img.scalar_type());
  const int64_t width = mining == "all" ? kSavedWidth : row_index.size(1);
  check_saved("triplet_backward", "row_saved", row_saved, n, width, acc);
  check_saved("triplet_backward", "col_saved", col_saved, n, width, acc);
  const auto a = img.to(acc).contiguous(), b = txt.to(acc).contiguous();
  const auto g = grad.to(acc);
  std::tuple<at::Tensor, at::Tensor> grads;
  if (mining == "all") {
    const auto lab = labels.contiguous();
    const auto rs = row_saved.contiguous(), cs = col_saved.contiguous();
    AT_DISPATCH_FLOATING_TYPES(acc, "triplet_backward_cpu", [&] {
      grads = dense_backward<scalar_t>(g.item<scalar_t>(), a, b, labels_data(lab),
                                       HingeSumPolicy<scalar_t>{static_cast<scalar_t>(margin)}, row_chunk,
                                       col_chunk, rs.data_ptr<scalar_t>(), cs.data_ptr<scalar_t>());
    });
  } else {
    TORCH_CHECK(row_index.sizes() == row_saved.sizes() && col_index.sizes() == col_saved.sizes() &&
                    row_index.scalar_type() == at::kLong && col_index.scalar_type() == at::kLong,
                "triplet_backward: index lists must be int64 and match the saved weights");
    // The positive S_ii of every listed pair gets minus the pair's weight, in both directions.
    const auto diagonal = -(row_saved.sum(1) + col_saved.sum(1));
    grads = sparse_backward(g, a, b, row_index, row_saved, col_index, col_saved, diagonal);
  }
  return {std::get<0>(grads).to(img.scalar_type()), std::get<1>(grads).to(txt.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(vse_cuda, CPU, m) {
  m.impl("triplet_forward", &triplet_forward);
  m.impl("triplet_backward", &triplet_backward);
}

}  // namespace vse::cpu
