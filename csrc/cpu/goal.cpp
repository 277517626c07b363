// goal_forward / goal_backward on CPU: the mined lists of the chunked engine (cpu/engine.h,
// k = 1), for *_ms with the negative-set reduction folded into the same sweep, and the
// per-anchor math of common/goal.h; sparse backward (gathers, no GEMM).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string_view>
#include <vector>

#include "common/goal.h"
#include "common/loss_args.h"
#include "cpu/engine.h"
#include "ops.h"

namespace vse::cpu {
namespace {

using Tensors5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

TripletWeight parse_triplet_weight(std::string_view name) {
  if (name == "con") return TripletWeight::kCon;
  if (name == "nca") return TripletWeight::kNca;
  TORCH_CHECK(name == "cir", "goal_forward: triplet_weight must be con, nca or cir");
  return TripletWeight::kCir;
}

PairWeight parse_pair_weight(std::string_view name) {
  if (name == "con") return PairWeight::kCon;
  if (name == "lin") return PairWeight::kLin;
  if (name == "sig") return PairWeight::kSig;
  if (name == "lin_ms") return PairWeight::kLinMs;
  TORCH_CHECK(name == "sig_ms", "goal_forward: pair_weight must be con, lin, sig, lin_ms or sig_ms");
  return PairWeight::kSigMs;
}

// min_k P_k − 0.1, NaN if any P_k is NaN (as torch's min).
template <typename T>
T negative_threshold(const T* positive, int64_t n) {
  T low = positive[0];
  for (int64_t k = 1; k < n && !is_nan(low); ++k) low = is_nan(positive[k]) || positive[k] < low ? positive[k] : low;
  return low - goal_negative_offset<T>();
}

// The sorted positives and their prefix sums (common/goal.h PositiveSet), O(N log N), and
// each anchor's position in that order (−1: NaN). Ties are ordered by index (deterministic).
template <typename T>
struct SortedPositives {
  std::vector<T> sorted;
  std::vector<double> sum, exp0, exp1;
  std::vector<int64_t> position;

  SortedPositives(const T* positive, int64_t n, double a) : position(n, -1) {
    std::vector<int64_t> order;
    for (int64_t k = 0; k < n; ++k) {
      if (!is_nan(positive[k])) order.push_back(k);
    }
    std::sort(order.begin(), order.end(), [&](int64_t l, int64_t r) {
      return positive[l] < positive[r] || (positive[l] == positive[r] && l < r);
    });
    const int64_t count = static_cast<int64_t>(order.size());
    sorted.resize(count);
    sum.assign(count + 1, 0.0);
    exp0.assign(count + 1, 0.0);
    exp1.assign(count + 1, 0.0);
    for (int64_t s = 0; s < count; ++s) {
      position[order[s]] = s;
      sorted[s] = positive[order[s]];
      const double v = sorted[s];
      sum[s + 1] = sum[s] + v;
      exp0[s + 1] = exp0[s] + std::exp(a * (static_cast<double>(sorted[0]) - v));
      exp1[s + 1] = s == 0 ? 0.0 : exp1[s] + std::exp(a * (static_cast<double>(sorted[1]) - v));
    }
  }

  PositiveSet<T> view() const {
    return {sorted.data(), static_cast<int64_t>(sorted.size()), sum.data(), exp0.data(), exp1.data()};
  }
};

// Outputs: (loss = Σ (N − P) over both directions' anchors with a valid negative, in the
// accumulate type; row_saved / col_saved [N, 2] = (∂/∂S_{i,c(i)}, ∂/∂S_ii) of each row /
// column anchor (0 without a negative); row_index / col_index [N, 1] = c(i) / r(j), −1: none).
Tensors5 goal_forward(const at::Tensor& img, const at::Tensor& txt, const at::Tensor& labels,
                      c10::string_view triplet_weight_, c10::string_view pair_weight_, double tau, double a_,
                      double b_, double lam, int64_t row_chunk, int64_t col_chunk) {
  check_pair_args("goal_forward", img, txt, labels, row_chunk, col_chunk);
  const auto triplet = parse_triplet_weight({triplet_weight_.data(), triplet_weight_.size()});
  const auto pair = parse_pair_weight({pair_weight_.data(), pair_weight_.size()});
  const int64_t n = img.size(0);
  const auto acc = accumulate_type(img.scalar_type());
  const auto a = img.to(acc).contiguous(), b = txt.to(acc).contiguous();
  const auto lab = labels.contiguous();
  const int64_t* labels_ptr = labels_data(lab);
  auto loss = at::empty({}, a.options());
  auto row_saved = at::zeros({n, 2}, a.options()), col_saved = at::zeros({n, 2}, a.options());
  at::Tensor row_index, col_index;
  AT_DISPATCH_FLOATING_TYPES(acc, "goal_forward_cpu", [&] {
    using T = scalar_t;
    const GoalOptions<T> options{triplet, pair, static_cast<T>(tau), static_cast<T>(a_), static_cast<T>(b_),
                                 static_cast<T>(lam)};
    using Reduction = NegativeSetReduction<T>;
    std::vector<typename Reduction::State> row_set, col_set;
    MinedLists lists;
    if (is_relative(pair)) {
      // 𝒩's threshold is needed during the sweep: from the positives as row-wise dots
      // (S_ii up to rounding), before any tile.
      const auto dots = row_dots(a, b);
      const Reduction reduction{negative_threshold(dots.data_ptr<T>(), n), options.b, pair == PairWeight::kSigMs};
      row_set.resize(n);
      col_set.resize(n);
      lists = mine_negatives<T>(a, b, labels_ptr, 1, Anchors{0, n}, row_chunk, col_chunk, reduction, row_set.data(), col_set.data());
    } else {
      lists = mine_negatives<T>(a, b, labels_ptr, 1, Anchors{0, n}, row_chunk, col_chunk);
    }
    const T* p = lists.positive.data_ptr<T>();
    double total = 0;  // summed in double, as in the other losses
    const at::Tensor* values[2] = {&lists.row_values, &lists.col_values};
    const at::Tensor* indices[2] = {&lists.row_indices, &lists.col_indices};
    const std::vector<typename Reduction::State>* sets[2] = {&row_set, &col_set};
    T* saved[2] = {row_saved.data_ptr<T>(), col_saved.data_ptr<T>()};
    std::optional<SortedPositives<T>> positives;
    if (is_relative(pair)) positives.emplace(p, n, static_cast<double>(a_));
    for (int direction = 0; direction < 2; ++direction) {
      const T* nv = values[direction]->data_ptr<T>();
      const int64_t* c = indices[direction]->data_ptr<int64_t>();
      for (int64_t i = 0; i < n; ++i) {
        if (c[i] < 0) continue;  // no valid negative: no value, no gradient
        total += static_cast<double>(nv[i] - p[i]);
        T rp = T(0), rn = T(0);
        if (positives) {
          rp = relative_positive(positives->view(), p[i], positives->position[i], nv[i],
                                 pair == PairWeight::kSigMs, options.a);
          rn = Reduction::mean((*sets[direction])[i]);
        }
        goal_weights(options, p[i], nv[i], rp, rn, saved[direction] + 2 * i);
      }
    }
    loss.fill_(static_cast<T>(total));
    row_index = lists.row_indices;
    col_index = lists.col_indices;
  });
  return {loss, row_saved, col_saved, row_index, col_index};
}

std::tuple<at::Tensor, at::Tensor> goal_backward(const at::Tensor& grad, const at::Tensor& img,
                                                 const at::Tensor& txt, const at::Tensor& row_saved,
                                                 const at::Tensor& col_saved, const at::Tensor& row_index,
                                                 const at::Tensor& col_index) {
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
  const auto a = img.to(acc).contiguous(), b = txt.to(acc).contiguous();
  // G·grad: the listed negatives' weights, and on the diagonal both directions' positive weights.
  const auto diagonal = row_saved.select(1, 1) + col_saved.select(1, 1);
  auto [da, db] = sparse_backward(grad.to(acc), a, b, row_index, row_saved.narrow(1, 0, 1), col_index,
                                  col_saved.narrow(1, 0, 1), diagonal);
  return {da.to(img.scalar_type()), db.to(txt.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(vse_cuda, CPU, m) {
  m.impl("goal_forward", &goal_forward);
  m.impl("goal_backward", &goal_backward);
}

}  // namespace vse::cpu
