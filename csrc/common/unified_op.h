#pragma once
// unified_forward / unified_backward (schemas in csrc/ops.cpp) for any backend of the chunked
// engine (common/engine_driver.h): the dense ops of common/dense_op.h with the policy of
// common/unified.h. cpu/unified.cpp and cuda/unified.cu register them with their Engine.
#include <ATen/ATen.h>

#include <tuple>

#include "common/dense_op.h"
#include "common/unified.h"

namespace vse {

// Forward of label_positives (common/unified.h): the negatives' log-sum-exps as UnifiedPolicy
// sweeps them, then a second sweep over the same-label pairs with each anchor's Λ known.
// Returns (loss, row_saved, col_saved [N, 5] of LabelPositivesPolicy).
template <class Engine, typename T, bool kScaleGradient>
std::tuple<at::Tensor, at::Tensor, at::Tensor> label_positives_forward(const at::Tensor& a, const at::Tensor& b,
                                                                       const int64_t* labels, T gamma, T margin,
                                                                       const Anchors& anchors, int64_t row_chunk,
                                                                       int64_t col_chunk) {
  using Negatives = UnifiedPolicy<T, kScaleGradient>;
  using Sweep = LabelPositivesSweep<T>;
  const int64_t n = a.size(0);
  const auto options = accumulate_options(a);
  const TilePlan plan = dense_plan<Negatives>(row_chunk, col_chunk);
  const Positives positive = dense_positives<Negatives>(a, b, anchors, plan);
  const Negatives negatives{gamma, margin};
  const at::Tensor negative_states[2] = {initial_states<T, typename Negatives::State>(n, options),
                                         initial_states<T, typename Negatives::State>(n, options)};
  dense_sweep<Engine, T>(a, b, labels, negatives, negatives, anchors, plan, positive, negative_states[0],
                         negative_states[1]);
  const at::Tensor lse[2] = {at::zeros({n}, options), at::zeros({n}, options)};
  const at::Tensor same_label_states[2] = {initial_states<T, typename Sweep::State>(n, options),
                                           initial_states<T, typename Sweep::State>(n, options)};
  for (int d = 0; d < 2; ++d) {
    for_each_anchor_of<Engine>(anchors, LogSumExpValues<T>{state_data<LogSumExp<T>, T>(negative_states[d]),
                                                            lse[d].data_ptr<T>()});
  }
  dense_sweep<Engine, T>(a, b, labels, Sweep{gamma, lse[0].data_ptr<T>()}, Sweep{gamma, lse[1].data_ptr<T>()},
                         anchors, plan, positive, same_label_states[0], same_label_states[1]);
  const auto terms = at::zeros({2, n}, options);
  const at::Tensor saved[2] = {at::zeros({n, LabelPositivesPolicy<T>::kSavedWidth}, options),
                               at::zeros({n, LabelPositivesPolicy<T>::kSavedWidth}, options)};
  const at::Tensor* positives[2] = {&positive.row, &positive.col};
  for (int d = 0; d < 2; ++d) {
    for_each_anchor_of<Engine>(
        anchors, LabelPositivesFinish<T>{kScaleGradient, state_data<LogSumExp<T>, T>(negative_states[d]),
                                         state_data<typename Sweep::State, T>(same_label_states[d]),
                                         lse[d].data_ptr<T>(), positives[d]->data_ptr<T>(), terms[d].data_ptr<T>(),
                                         saved[d].data_ptr<T>()});
  }
  return {sum_terms(terms), saved[0], saved[1]};
}

// Outputs: (loss summed over both directions in the accumulate type, row_saved and col_saved
// [N, 3] with the saved values of UnifiedPolicy, or [N, 5] of LabelPositivesPolicy with
// label_positives, ∂loss/∂scale in the accumulate type, computed only with scale_grad: 0
// otherwise).
template <class Engine>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> unified_forward(
    const at::Tensor& img, const at::Tensor& txt, const at::Tensor& labels, const at::Tensor& scale, double margin,
    bool scale_grad, bool label_positives, int64_t anchor_begin, int64_t anchor_end, int64_t row_chunk,
    int64_t col_chunk) {
  const double gamma = checked_scalar("unified_forward", "scale", scale, true);
  checked_option("unified_forward", "margin", margin);
  TORCH_CHECK(!label_positives || labels.numel() > 0, "unified_forward: label_positives needs labels");
  const auto run = [&](auto learns_scale) {
    constexpr bool kScaleGradient = decltype(learns_scale)::value;
    return dense_op_dispatch<Engine>(
        "unified_forward", img, txt, labels, anchor_begin, anchor_end, row_chunk, col_chunk,
        [&](const at::Tensor& a, const at::Tensor& b, const int64_t* labels_ptr, const Anchors& anchors, auto zero) {
          using T = decltype(zero);
          const T g = static_cast<T>(gamma), m = static_cast<T>(margin);
          if (label_positives) {
            return label_positives_forward<Engine, T, kScaleGradient>(a, b, labels_ptr, g, m, anchors, row_chunk,
                                                                      col_chunk);
          }
          return dense_forward<Engine, T>(a, b, labels_ptr, UnifiedPolicy<T, kScaleGradient>{g, m}, anchors,
                                          row_chunk, col_chunk);
        });
  };
  auto [loss, row_saved, col_saved] = scale_grad ? run(std::true_type{}) : run(std::false_type{});
  const auto d_scale = sum_terms(at::stack({row_saved.select(1, 2), col_saved.select(1, 2)}));
  return {loss, row_saved, col_saved, d_scale};
}

template <class Engine>
std::tuple<at::Tensor, at::Tensor> unified_backward(const at::Tensor& grad, const at::Tensor& img,
                                                    const at::Tensor& txt, const at::Tensor& labels,
                                                    const at::Tensor& scale, double margin, bool label_positives,
                                                    const at::Tensor& row_saved, const at::Tensor& col_saved,
                                                    int64_t anchor_begin, int64_t anchor_end, int64_t row_chunk,
                                                    int64_t col_chunk) {
  const double gamma = checked_scalar("unified_backward", "scale", scale, true);
  TORCH_CHECK(!label_positives || labels.numel() > 0, "unified_backward: label_positives needs labels");
  const auto backward = [&](auto make_policy) {
    return dense_op_backward<Engine>("unified_backward", make_policy, grad, img, txt, labels, row_saved, col_saved,
                                     anchor_begin, anchor_end, row_chunk, col_chunk);
  };
  if (label_positives) {
    return backward([&](auto zero) {
      using T = decltype(zero);
      return LabelPositivesPolicy<T>{static_cast<T>(gamma), static_cast<T>(margin)};
    });
  }
  return backward([&](auto zero) {
    using T = decltype(zero);
    return UnifiedPolicy<T>{static_cast<T>(gamma), static_cast<T>(margin)};
  });
}

}  // namespace vse
