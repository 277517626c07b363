// unified_forward / unified_backward on CPU: the dense chunked engine (cpu/engine.h) with
// the policy of common/unified.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "common/loss_args.h"
#include "common/unified.h"
#include "cpu/engine.h"
#include "ops.h"

namespace vse::cpu {
namespace {

// Outputs: (loss summed over both directions in the accumulate type, row_saved [N, 2],
// col_saved [N, 2]) with the saved values of UnifiedPolicy.
std::tuple<at::Tensor, at::Tensor, at::Tensor> unified_forward(const at::Tensor& img, const at::Tensor& txt,
                                                               const at::Tensor& labels, double scale,
                                                               double margin, int64_t row_chunk,
                                                               int64_t col_chunk) {
  check_pair_args("unified_forward", img, txt, labels, row_chunk, col_chunk);
  const int64_t n = img.size(0);
  const auto acc = accumulate_type(img.scalar_type());
  const auto a = img.to(acc).contiguous(), b = txt.to(acc).contiguous();
  const auto lab = labels.contiguous();
  auto loss = at::empty({}, a.options());
  auto row_saved = at::empty({n, kSavedWidth}, a.options());
  auto col_saved = at::empty({n, kSavedWidth}, a.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "unified_forward_cpu", [&] {
    const UnifiedPolicy<scalar_t> policy{static_cast<scalar_t>(scale), static_cast<scalar_t>(margin)};
    loss.fill_(dense_forward<scalar_t>(a, b, labels_data(lab), policy, row_chunk, col_chunk,
                                       row_saved.data_ptr<scalar_t>(), col_saved.data_ptr<scalar_t>()));
  });
  return {loss, row_saved, col_saved};
}

std::tuple<at::Tensor, at::Tensor> unified_backward(const at::Tensor& grad, const at::Tensor& img,
                                                    const at::Tensor& txt, const at::Tensor& labels,
                                                    double scale, double margin, const at::Tensor& row_saved,
                                                    const at::Tensor& col_saved, int64_t row_chunk,
                                                    int64_t col_chunk) {
  check_pair_args("unified_backward", img, txt, labels, row_chunk, col_chunk);
  const int64_t n = img.size(0);
  const auto acc = accumulate_type(img.scalar_type());
  check_saved("unified_backward", "row_saved", row_saved, n, kSavedWidth, acc);
  check_saved("unified_backward", "col_saved", col_saved, n, kSavedWidth, acc);
  const auto a = img.to(acc).contiguous(), b = txt.to(acc).contiguous();
  const auto lab = labels.contiguous();
  const auto rs = row_saved.contiguous(), cs = col_saved.contiguous();
  std::tuple<at::Tensor, at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES(acc, "unified_backward_cpu", [&] {
    const UnifiedPolicy<scalar_t> policy{static_cast<scalar_t>(scale), static_cast<scalar_t>(margin)};
    grads = dense_backward<scalar_t>(grad.to(acc).item<scalar_t>(), a, b, labels_data(lab), policy, row_chunk,
                                     col_chunk, rs.data_ptr<scalar_t>(), cs.data_ptr<scalar_t>());
  });
  return {std::get<0>(grads).to(img.scalar_type()), std::get<1>(grads).to(txt.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(vse_cuda, CPU, m) {
  m.impl("unified_forward", &unified_forward);
  m.impl("unified_backward", &unified_backward);
}

}  // namespace vse::cpu
