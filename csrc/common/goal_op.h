#pragma once
// goal_forward / goal_backward (schemas in csrc/ops.cpp) for any backend of the chunked
// engine (common/engine_driver.h): cpu/goal.cpp and cuda/goal.cu register them with their
// Engine. The mined lists (k = 1), for *_ms with the negative sets reduced in the same tile
// sweep and the sorted positives built with ATen, feed the per-anchor math of common/goal.h;
// the backward is sparse (gathers, no GEMM).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <string_view>
#include <tuple>

#include "common/engine_driver.h"
#include "common/goal.h"
#include "common/loss_args.h"

namespace vse {

inline TripletWeight parse_triplet_weight(std::string_view name) {
  if (name == "con") return TripletWeight::kCon;
  if (name == "nca") return TripletWeight::kNca;
  TORCH_CHECK(name == "cir", "goal_forward: triplet_weight must be con, nca or cir");
  return TripletWeight::kCir;
}

inline PairWeight parse_pair_weight(std::string_view name) {
  if (name == "con") return PairWeight::kCon;
  if (name == "lin") return PairWeight::kLin;
  if (name == "sig") return PairWeight::kSig;
  if (name == "lin_ms") return PairWeight::kLinMs;
  TORCH_CHECK(name == "sig_ms", "goal_forward: pair_weight must be con, lin, sig, lin_ms or sig_ms");
  return PairWeight::kSigMs;
}

// The positives sorted for relative_positive (common/goal.h PositiveSet) and each anchor's
// position in that order, on the positives' device. The sort is stable (ties by index) and
// puts NaN last, where no limit reaches it.
struct SortedPositives {
  at::Tensor sorted, sum, exp0, exp1, position;

  template <typename T>
  PositiveSet<T> view() const {
    return {sorted.data_ptr<T>(), sorted.size(0), sum.data_ptr<double>(), exp0.data_ptr<double>(),
            exp1.data_ptr<double>()};
  }
};

// positive: [N] with N ≥ 1; a: the sig_ms scale.
template <class Engine>
SortedPositives sort_positives(const at::Tensor& positive, double a) {
  const int64_t n = positive.size(0);
  const auto [sorted, order] = positive.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
  const auto values = sorted.to(at::kDouble);
  auto from_second = (a * (values.narrow(0, std::min<int64_t>(1, n - 1), 1) - values)).exp();
  from_second.narrow(0, 0, 1).zero_();
  const auto position = at::empty_like(order).scatter_(0, order, at::arange(n, order.options()));
  return {sorted.contiguous(), prefix_sums<Engine>(values),
          prefix_sums<Engine>((a * (values.narrow(0, 0, 1) - values)).exp()), prefix_sums<Engine>(from_second),
          position};
}

// Every pair's positive S_kk as tiles hold it, for 𝒫 (whose members are compared with the
// anchors' tile values): one process's from its own sweep (the mined lists'); a rank of a
// group sweeps only its anchors' rows and columns, so it recomputes the tiles holding the
// diagonal of the whole batch, square where the budget allows (about row_chunk / N of one
// sweep's GEMM work; the same tiles as one process's sweep when row_chunk ≥ col_chunk).
inline at::Tensor every_positive(const at::Tensor& a, const at::Tensor& b, const MinedLists& lists,
                                 const Anchors& anchors, int64_t row_chunk, int64_t col_chunk) {
  const int64_t n = a.size(0);
  if (anchors.all(n)) return lists.row_positive;
  return tile_positives(a, b, Anchors{0, n}, row_chunk, std::min(row_chunk, col_chunk), Tiling::kCanonical).row;
}

// The mined lists (k = 1) and, for *_ms, every row's and column's negative-set state
// ([N, 3] of T, NegativeSetPolicy), reduced in the same tile sweep.
struct GoalNegatives {
  MinedLists lists;
  at::Tensor row_set, col_set;
};

template <class Engine, typename T>
GoalNegatives mine_goal_negatives(const at::Tensor& a, const at::Tensor& b, const int64_t* labels, bool relative,
                                  T b_scale, PairWeight pair, const Anchors& anchors, int64_t row_chunk,
                                  int64_t col_chunk) {
  if (!relative) return {mine_negatives<Engine, T>(a, b, labels, 1, anchors, row_chunk, col_chunk), {}, {}};
  using Policy = NegativeSetPolicy<T>;
  using Passes = typename Engine::template Dense<T, Policy>;
  const int64_t n = a.size(0);
  // 𝒩's threshold is needed during the sweep, so it comes from the positives as row-wise
  // dots (S_ii up to rounding), before any tile; torch's min makes it NaN if one is NaN.
  const auto dots = row_dots(a, b);
  const at::Tensor threshold = (dots.min() - goal_negative_offset<T>()).contiguous();
  const Policy policy{threshold.data_ptr<T>(), b_scale, pair == PairWeight::kSigMs};
  GoalNegatives out{{}, initial_states<T, typename Policy::State>(n, accumulate_options(a)),
                    initial_states<T, typename Policy::State>(n, accumulate_options(a))};
  out.lists = mine_negatives<Engine, T>(
      a, b, labels, 1, anchors, row_chunk, col_chunk,
      [&](const at::Tensor& tile, int64_t r0, int64_t c0, int directions) {
        if (directions & kRowAnchors) Passes::rows(policy, tile, r0, c0, labels, dots, out.row_set);
        if (directions & kColumnAnchors) Passes::columns(policy, tile, r0, c0, labels, dots, out.col_set);
      });
  return out;
}

// Outputs: (loss = Σ (N − P) over both directions' anchors with a valid negative, in the
// accumulate type; row_saved / col_saved [N, 2] = (∂/∂S_{i,c(i)}, ∂/∂S_ii) of each row /
// column anchor (0 without a negative and outside the anchors); row_index / col_index [N, 1] = c(i) / r(j), −1: none).
template <class Engine>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> goal_forward(
    const at::Tensor& img, const at::Tensor& txt, const at::Tensor& labels, c10::string_view triplet_weight_,
    c10::string_view pair_weight_, double tau, double a_, double b_, double lam, int64_t anchor_begin,
    int64_t anchor_end, int64_t row_chunk, int64_t col_chunk) {
  check_pair_args("goal_forward", img, txt, labels, row_chunk, col_chunk);
  checked_option("goal_forward", "tau", tau, true);
  checked_option("goal_forward", "a", a_, true);
  checked_option("goal_forward", "b", b_, true);
  checked_option("goal_forward", "lam", lam);
  const auto triplet = parse_triplet_weight({triplet_weight_.data(), triplet_weight_.size()});
  const auto pair = parse_pair_weight({pair_weight_.data(), pair_weight_.size()});
  const typename Engine::Guard guard(img);
  const int64_t n = img.size(0);
  const Anchors anchors = checked_anchors("goal_forward", anchor_begin, anchor_end, n);
  const bool relative = is_relative(pair) && n > 0;
  const auto acc = accumulate_type(img.scalar_type());
  const auto a = as_operand(img), b = as_operand(txt);
  const auto lab = labels.contiguous();
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(acc, "goal_forward", [&] {
    using T = scalar_t;
    using State = typename NegativeSetPolicy<T>::State;
    const GoalOptions<T> options{triplet, pair, static_cast<T>(tau), static_cast<T>(a_), static_cast<T>(b_),
                                 static_cast<T>(lam)};
    const GoalNegatives mined =
        mine_goal_negatives<Engine, T>(a, b, labels_data(lab), relative, options.b, pair, anchors, row_chunk,
                                       col_chunk);
    const MinedLists& lists = mined.lists;
    const SortedPositives positives =
        relative ? sort_positives<Engine>(every_positive(a, b, lists, anchors, row_chunk, col_chunk), a_)
                 : SortedPositives{};
    const auto acc_options = accumulate_options(a);
    const auto terms = at::zeros({2, n}, acc_options);
    at::Tensor saved[2] = {at::zeros({n, 2}, acc_options), at::zeros({n, 2}, acc_options)};
    const at::Tensor* hardest[2] = {&lists.row_values, &lists.col_values};
    const at::Tensor* index[2] = {&lists.row_indices, &lists.col_indices};
    const at::Tensor* sets[2] = {&mined.row_set, &mined.col_set};
    const at::Tensor* own_positive[2] = {&lists.row_positive, &lists.col_positive};
    for (int direction = 0; direction < 2; ++direction) {
      GoalAnchors<T> pass{options, own_positive[direction]->data_ptr<T>(), hardest[direction]->data_ptr<T>(),
                             index[direction]->data_ptr<int64_t>(), {}, nullptr, nullptr,
                             saved[direction].data_ptr<T>(), terms[direction].data_ptr<T>()};
      if (relative) {
        pass.positives = positives.view<T>();
        pass.position = positives.position.data_ptr<int64_t>();
        pass.negatives = reinterpret_cast<const State*>(sets[direction]->data_ptr<T>());
      }
      for_each_anchor_of<Engine>(anchors, pass);
    }
    out = {sum_terms(terms), saved[0], saved[1], lists.row_indices, lists.col_indices};
  });
  return out;
}

template <class Engine>
std::tuple<at::Tensor, at::Tensor> goal_backward(const at::Tensor& grad, const at::Tensor& img, const at::Tensor& txt,
                                                 const at::Tensor& row_saved, const at::Tensor& col_saved,
                                                 const at::Tensor& row_index, const at::Tensor& col_index) {
  TORCH_CHECK(img.dim() == 2 && img.sizes() == txt.sizes() && img.scalar_type() == txt.scalar_type(),
              "goal_backward: img and txt must be [N, D] of one dtype");
  const int64_t n = img.size(0);
  const auto acc = accumulate_type(img.scalar_type());
  check_saved("goal_backward", "row_saved", row_saved, n, 2, acc);
  check_saved("goal_backward", "col_saved", col_saved, n, 2, acc);
  TORCH_CHECK(row_index.dim() == 2 && row_index.size(0) == n && row_index.size(1) == 1 &&
                  row_index.sizes() == col_index.sizes() && row_index.scalar_type() == at::kLong &&
                  col_index.scalar_type() == at::kLong,
              "goal_backward: row_index and col_index must be int64 [N, 1]");
  const at::Tensor* others[5] = {&txt, &row_saved, &col_saved, &row_index, &col_index};
  const char* names[5] = {"txt", "row_saved", "col_saved", "row_index", "col_index"};
  for (int t = 0; t < 5; ++t) check_device("goal_backward", names[t], *others[t], img);
  const typename Engine::Guard guard(img);
  const auto a = img.to(acc).contiguous(), b = txt.to(acc).contiguous();
  // G·grad: the listed negatives' weights, and on the diagonal both directions' positive weights.
  const auto diagonal = row_saved.select(1, 1) + col_saved.select(1, 1);
  auto [da, db] = sparse_backward<Engine>(grad.to(a.options()), a, b, row_index, row_saved.narrow(1, 0, 1),
                                          col_index, col_saved.narrow(1, 0, 1), diagonal);
  return {da.to(img.scalar_type()), db.to(txt.scalar_type())};
}

}  // namespace vse
