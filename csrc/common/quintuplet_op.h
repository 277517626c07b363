#pragma once
// quintuplet_forward / quintuplet_backward (schemas in csrc/ops.cpp) for any backend of the
// chunked engine (common/engine_driver.h): cpu/quintuplet.cpp and cuda/quintuplet.cu register
// them with their Engine. The mined lists (k = 1) and four row-wise dots feed the per-anchor
// math of common/quintuplet.h; the backward is sparse (gathers, no GEMM).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <array>
#include <tuple>

#include "common/engine_driver.h"
#include "common/loss_args.h"
#include "common/quintuplet.h"

namespace vse {

using QuintupletInputs = std::array<at::Tensor, 6>;  // img, txt, off_img, off_txt, img2, txt2

// The four offline inputs match img in shape, dtype and device.
inline void check_offline_args(const char* op, const QuintupletInputs& inputs) {
  static const char* names[6] = {"img", "txt", "off_img", "off_txt", "img2", "txt2"};
  for (int s = 2; s < 6; ++s) {
    TORCH_CHECK(inputs[s].sizes() == inputs[0].sizes(), op, ": ", names[s], " must have the shape of img [N, D]");
    TORCH_CHECK(inputs[s].scalar_type() == inputs[0].scalar_type(), op, ": ", names[s], " must have img's dtype");
    check_device(op, names[s], inputs[s], inputs[0]);
  }
}

inline QuintupletInputs to_accumulate(const QuintupletInputs& inputs) {
  const auto acc = accumulate_type(inputs[0].scalar_type());
  QuintupletInputs out;
  for (int s = 0; s < 6; ++s) out[s] = inputs[s].to(acc).contiguous();
  return out;
}

// Outputs: (loss summed over the anchors in the accumulate type, saved [N, 7] = ∂loss/∂(p, u,
// w, x, y, q, z) per anchor (QuintupletScore order; 0 outside the anchors), row_index [N, 1] = c(i), col_index [N, 1]
// = r(i), −1 where the anchor has no valid negative).
template <class Engine>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quintuplet_forward(
    const at::Tensor& img, const at::Tensor& txt, const at::Tensor& off_img, const at::Tensor& off_txt,
    const at::Tensor& img2, const at::Tensor& txt2, const at::Tensor& labels, double margin_online,
    double margin_offline, double alpha, double beta, bool detach_weights, int64_t anchor_begin, int64_t anchor_end,
    int64_t row_chunk, int64_t col_chunk) {
  check_pair_args("quintuplet_forward", img, txt, labels, row_chunk, col_chunk);
  const QuintupletInputs inputs = {img, txt, off_img, off_txt, img2, txt2};
  check_offline_args("quintuplet_forward", inputs);
  checked_option("quintuplet_forward", "margin_online", margin_online);
  checked_option("quintuplet_forward", "margin_offline", margin_offline);
  checked_option("quintuplet_forward", "alpha", alpha, true);
  checked_option("quintuplet_forward", "beta", beta);
  const typename Engine::Guard guard(img);
  const int64_t n = img.size(0);
  const Anchors anchors = checked_anchors("quintuplet_forward", anchor_begin, anchor_end, n);
  // The in-batch scores from the tiles' GEMMs in the operand type; x, y, q, z, the offline
  // scores (spec §3.3), one row-wise dot each in the accumulate type.
  const auto a = as_operand(img), b = as_operand(txt);
  const QuintupletInputs acc = to_accumulate(inputs);
  const at::Tensor offline[4] = {row_dots(acc[0], acc[3]), row_dots(acc[2], acc[1]), row_dots(acc[2], acc[3]),
                                 row_dots(acc[4], acc[5])};
  const auto lab = labels.contiguous();
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(acc[0].scalar_type(), "quintuplet_forward", [&] {
    using T = scalar_t;
    const QuintupletOptions<T> options{static_cast<T>(margin_online), static_cast<T>(margin_offline),
                                       static_cast<T>(alpha), static_cast<T>(beta), detach_weights};
    const MinedLists lists = mine_negatives<Engine, T>(a, b, labels_data(lab), 1, anchors, row_chunk, col_chunk);
    auto saved = at::zeros({n, kQuintupletScores}, acc[0].options());
    const auto terms = at::zeros({n}, acc[0].options());
    for_each_anchor_of<Engine>(
        anchors, QuintupletAnchors<T>{options, lists.row_positive.data_ptr<T>(), lists.col_positive.data_ptr<T>(),
                                lists.row_values.data_ptr<T>(),
                                lists.row_indices.data_ptr<int64_t>(), lists.col_values.data_ptr<T>(),
                                lists.col_indices.data_ptr<int64_t>(), offline[0].data_ptr<T>(),
                                offline[1].data_ptr<T>(), offline[2].data_ptr<T>(), offline[3].data_ptr<T>(),
                                saved.data_ptr<T>(), terms.data_ptr<T>()});
    out = {sum_terms(terms), saved, lists.row_indices, lists.col_indices};
  });
  return out;
}

template <class Engine>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> quintuplet_backward(
    const at::Tensor& grad, const at::Tensor& img, const at::Tensor& txt, const at::Tensor& off_img,
    const at::Tensor& off_txt, const at::Tensor& img2, const at::Tensor& txt2, const at::Tensor& saved,
    const at::Tensor& row_index, const at::Tensor& col_index) {
  TORCH_CHECK(img.dim() == 2 && img.sizes() == txt.sizes(), "quintuplet_backward: img and txt must be [N, D]");
  const QuintupletInputs inputs = {img, txt, off_img, off_txt, img2, txt2};
  check_offline_args("quintuplet_backward", inputs);
  const int64_t n = img.size(0);
  const auto acc = accumulate_type(img.scalar_type());
  check_saved("quintuplet_backward", "saved", saved, n, kQuintupletScores, acc);
  TORCH_CHECK(row_index.dim() == 2 && row_index.size(0) == n && row_index.size(1) == 1 &&
                  row_index.sizes() == col_index.sizes() && row_index.scalar_type() == at::kLong &&
                  col_index.scalar_type() == at::kLong,
              "quintuplet_backward: row_index and col_index must be int64 [N, 1]");
  const at::Tensor* others[3] = {&saved, &row_index, &col_index};
  const char* names[3] = {"saved", "row_index", "col_index"};
  for (int t = 0; t < 3; ++t) check_device("quintuplet_backward", names[t], *others[t], img);
  const typename Engine::Guard guard(img);
  const auto [a, b, a_off, b_off, a2, b2] = to_accumulate(inputs);
  const auto g = grad.to(a.options());
  // The in-batch scores p, u, w: the sparse G of the mined lists (gathers, no GEMM).
  auto [da, db] = sparse_backward<Engine>(g, a, b, row_index, saved.narrow(1, kScoreU, 1), col_index,
                                          saved.narrow(1, kScoreW, 1), saved.select(1, kScoreP));
  // The offline scores s_i = ⟨e_i, f_i⟩: ∂e_i += g·∂L/∂s_i·f_i and ∂f_i += g·∂L/∂s_i·e_i.
  const auto weight = [&](int score) { return saved.narrow(1, score, 1) * g; };
  const auto gx = weight(kScoreX), gy = weight(kScoreY), gq = weight(kScoreQ), gz = weight(kScoreZ);
  da.addcmul_(gx, b_off);
  db.addcmul_(gy, a_off);
  const auto da_off = gy * b + gq * b_off;
  const auto db_off = gx * a + gq * a_off;
  const auto da2 = gz * b2, db2 = gz * a2;
  return {da.to(img.scalar_type()),         db.to(txt.scalar_type()),     da_off.to(off_img.scalar_type()),
          db_off.to(off_txt.scalar_type()), da2.to(img2.scalar_type()), db2.to(txt2.scalar_type())};
}

}  // namespace vse
