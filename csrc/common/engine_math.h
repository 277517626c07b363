#pragma once
// Math of the chunked loss engine (DESIGN §3) shared by every backend: which entries of S
// are negatives, the hinge, the running log-sum-exp and the gradient of a dense loss. The
// per-loss policies built from these live in common/<loss>.h, the host orchestration in
// common/engine_driver.h; the CPU and CUDA files only loop over tiles.
//
// Dense policy interface (common/triplet.h HingeSumPolicy, common/unified.h UnifiedPolicy):
//   State                              an anchor's running state over its negatives
//   kPositiveFromTiles                 add() compares S_ij with S_ii exactly: S_ii is then
//                                      the value its tile holds (engine_driver.h
//                                      dense_positives), otherwise the row-wise dot
//   add(state, S_ij, S_ii)             folds in one valid negative
//   merge(state, other)                folds in the state of other negatives of the same
//                                      anchor (a later column tile, another thread's share)
//   kAnchors                           the anchors that have terms: kBothAnchors, or
//                                      kRowAnchors for a loss with one term per entry of S
//   kSameLabelTerms                    the loss has terms for the anchor's same-label pairs
//                                      (other than its own): add_same_label(state, S_ij,
//                                      S_ii, anchor) folds them in and same_label_weight() is
//                                      their gradient; else they are never visited (masked)
//                                      and their gradient is 0
//   kSavedWidth                        values finish() saves per anchor for the backward
//   finish(state, S_ii, saved) -> T    the anchor's loss term; writes kSavedWidth values
//   weight(S_ij, saved) -> T           ∂term/∂S_ij of a valid negative, from the saved values
//   diagonal(saved) -> T               ∂term/∂S_ii
#include <cmath>
#include <cstdint>
#include <limits>

#include "common/macros.h"

namespace vse {

namespace math {
// float/double overloads that name the same functions on the host and in CUDA device code.
VSE_HOST_DEVICE float exp(float x) { return ::expf(x); }
VSE_HOST_DEVICE double exp(double x) { return ::exp(x); }
VSE_HOST_DEVICE float expm1(float x) { return ::expm1f(x); }
VSE_HOST_DEVICE double expm1(double x) { return ::expm1(x); }
VSE_HOST_DEVICE float log(float x) { return ::logf(x); }
VSE_HOST_DEVICE double log(double x) { return ::log(x); }
VSE_HOST_DEVICE float log1p(float x) { return ::log1pf(x); }
VSE_HOST_DEVICE double log1p(double x) { return ::log1p(x); }
}  // namespace math

// Entry (anchor, candidate) is a valid negative: not the anchor's own pair and, with labels,
// not a pair of the same label (false-negative masking). The mask is symmetric, so rows
// (i2t anchors) and columns (t2i anchors) use the same test.
VSE_HOST_DEVICE bool is_negative(const int64_t* labels, int64_t anchor, int64_t candidate) {
  return candidate != anchor && (labels == nullptr || labels[anchor] != labels[candidate]);
}

// Folds entry (anchor, candidate) of S into the anchor's state: a valid negative through add(),
// a same-label pair other than the anchor's own through add_same_label() when the policy has
// such terms (kSameLabelTerms); the anchor's own pair is finish()'s.
template <typename Policy, typename State, typename T>
VSE_HOST_DEVICE void fold_entry(const Policy& policy, State& state, const int64_t* labels, int64_t anchor,
                                int64_t candidate, T score, T positive) {
  if (is_negative(labels, anchor, candidate)) {
    policy.add(state, score, positive);
  } else if constexpr (Policy::kSameLabelTerms) {
    if (candidate != anchor) policy.add_same_label(state, score, positive, anchor);
  }
}

// [x]_+ and its derivative as torch.relu: the derivative at exactly 0 is 0, NaN propagates
// in the value and passes the gradient (torch's threshold_backward keeps it for x > 0 or NaN).
// Both are written to compile to selects, not branches: hinges of random data are
// unpredictable.
template <typename T>
VSE_HOST_DEVICE T hinge(T x) {
  return x < T(0) ? T(0) : x;  // maxss(0, x): NaN stays NaN
}
template <typename T>
VSE_HOST_DEVICE T hinge_grad(T x) {
  return static_cast<T>(!(x <= T(0)));
}

// log(1 + e^y) without overflow.
template <typename T>
VSE_HOST_DEVICE T softplus(T y) {
  return y > T(0) ? y + math::log1p(math::exp(-y)) : math::log1p(math::exp(y));
}

// The lane operations of the formulas below on V: here a scalar T, on every backend. The CPU
// loops of SigLIP (cpu/capability/siglip.cpp) specialize Lanes for ATen's vector of T, so that
// the same formulas, written once here, evaluate a row of entries at a time there.
template <typename V>
struct Lanes {
  static VSE_HOST_DEVICE V exp(V x) { return math::exp(x); }
  static VSE_HOST_DEVICE V log1p(V x) { return math::log1p(x); }
  // x > 0 ? a : b
  static VSE_HOST_DEVICE V if_positive(V x, V a, V b) { return x > V(0) ? a : b; }
};

// softplus(y) = log(1 + e^y) and σ(y) from one exponential, e^{−|y|}: both stable for any y.
template <typename V>
struct SoftplusSigmoid {
  V softplus, sigmoid;
};
template <typename V>
VSE_HOST_DEVICE V exp_minus_abs(V y) {
  return Lanes<V>::exp(Lanes<V>::if_positive(y, -y, y));
}
// σ(y) from e = e^{−|y|}.
template <typename V>
VSE_HOST_DEVICE V sigmoid_from(V y, V e) {
  const V inverse = V(1) / (V(1) + e);
  return Lanes<V>::if_positive(y, inverse, e * inverse);
}
template <typename V>
VSE_HOST_DEVICE SoftplusSigmoid<V> softplus_sigmoid(V y) {
  const V e = exp_minus_abs(y);
  return {Lanes<V>::if_positive(y, y, V(0)) + Lanes<V>::log1p(e), sigmoid_from(y, e)};
}
// σ(y) alone (the backward: no logarithm).
template <typename V>
VSE_HOST_DEVICE V logistic(V y) {
  return sigmoid_from(y, exp_minus_abs(y));
}

// Running log Σ e^x_k with an online maximum and, for terms added with a second value d_k,
// the softmax-weighted sum of d beside it: weighted / sum = Σ e^x_k d_k / Σ e^x_k (the unified
// loss's d_k = x_k / γ gives ∂/∂γ this way, common/unified.h; add(x) leaves weighted at 0).
// It starts empty (sum 0, max the lowest finite value: no ±inf fill); a NaN term makes it NaN.
// `merge` combines two partial states (e.g. one column's state over two row chunks), in the
// caller's fixed order.
template <typename T>
struct LogSumExp {
  T max = std::numeric_limits<T>::lowest();
  T sum = T(0);       // Σ e^(x_k − max)
  T weighted = T(0);  // Σ e^(x_k − max) d_k

  VSE_HOST_DEVICE void add(T x) {
    if (x > max) {
      sum = sum * math::exp(max - x) + T(1);
      max = x;
    } else {
      sum += math::exp(x - max);
    }
  }

  VSE_HOST_DEVICE void add(T x, T d) {
    if (x > max) {
      const T rescale = math::exp(max - x);
      sum = sum * rescale + T(1);
      weighted = weighted * rescale + d;
      max = x;
    } else {
      const T e = math::exp(x - max);
      sum += e;
      weighted += e * d;
    }
  }

  VSE_HOST_DEVICE void merge(const LogSumExp& other) {
    if (other.sum == T(0)) return;
    if (sum == T(0)) {
      *this = other;
      return;
    }
    const T m = other.max > max ? other.max : max;
    const T own = math::exp(max - m), theirs = math::exp(other.max - m);
    sum = sum * own + other.sum * theirs;
    weighted = weighted * own + other.weighted * theirs;
    max = m;
  }

  // log(1 + Σ e^(x + shift)): the log-sum-exp with the constant 0 term (0 when empty).
  VSE_HOST_DEVICE T log1p_shifted(T shift) const {
    return sum == T(0) ? T(0) : softplus(max + shift + math::log(sum));
  }

  // Σ e^x_k d_k / Σ e^x_k, the mean of d under the softmax of x (0 when empty).
  VSE_HOST_DEVICE T weighted_mean() const { return sum == T(0) ? T(0) : weighted / sum; }
};

// The anchors whose terms a sweep of tiles serves: its rows' (i2t), its columns' (t2i) or
// both. One process sweeps S once for both; a rank of a group sweeps its own rows against
// every column, then every row against its own columns (common/engine_driver.h).
enum Directions : int { kRowAnchors = 1, kColumnAnchors = 2, kBothAnchors = kRowAnchors | kColumnAnchors };

// ∂L/∂S_ij of a dense loss (per unit of ∂/∂loss) from the saved values of row anchor i and
// column anchor j = key (row_saved, col_saved: Policy::kSavedWidth values per anchor): the two
// anchors' weights for a valid negative, their diagonal terms on the diagonal, their same-label
// weights on a same-label pair (kSameLabelTerms), 0 elsewhere; only the
// anchors of `directions` count.
template <typename Policy, typename T>
VSE_HOST_DEVICE T dense_entry_gradient(const Policy& policy, const int64_t* labels, int64_t i, int64_t key, T score,
                                       const T* row_saved, const T* col_saved, int directions) {
  const bool rows = directions & kRowAnchors, cols = directions & kColumnAnchors;
  if (is_negative(labels, i, key)) {
    const T own = rows ? policy.weight(score, row_saved + Policy::kSavedWidth * i) : T(0);
    return cols ? own + policy.weight(score, col_saved + Policy::kSavedWidth * key) : own;
  }
  if (key != i) {
    if constexpr (Policy::kSameLabelTerms) {
      const T own = rows ? policy.same_label_weight(score, row_saved + Policy::kSavedWidth * i) : T(0);
      return cols ? own + policy.same_label_weight(score, col_saved + Policy::kSavedWidth * key) : own;
    }
    return T(0);
  }
  const T own = rows ? policy.diagonal(row_saved + Policy::kSavedWidth * i) : T(0);
  return cols ? own + policy.diagonal(col_saved + Policy::kSavedWidth * i) : own;
}

// Mined hinge term of one anchor (triplet "hardest"/"topk", common/triplet.h) from its list of
// hardest negatives (values best first, empty slots with index −1): the mean of
// [m + v_s − S_ii]_+ over the listed negatives, 0 when there are none. weights[s] = ∂term/∂v_s; ∂term/∂S_ii is minus their sum.
template <typename T>
VSE_HOST_DEVICE T mined_hinge_term(const T* values, const int64_t* indices, int64_t k, T positive,
                                   T margin, T* weights) {
  int64_t count = 0;
  while (count < k && indices[count] >= 0) ++count;
  T sum = T(0);
  for (int64_t s = 0; s < count; ++s) {
    const T x = margin + values[s] - positive;
    sum += hinge(x);
    weights[s] = hinge_grad(x) / static_cast<T>(count);
  }
  for (int64_t s = count; s < k; ++s) weights[s] = T(0);
  return count == 0 ? T(0) : sum / static_cast<T>(count);
}

}  // namespace vse
