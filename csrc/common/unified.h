#pragma once
// Unified pair-similarity loss (spec §4.2, no 1/γ prefactor) over the chunked engine, shared
// by every backend. Per anchor row i (and likewise per anchor column):
//   L_i = log(1 + Σ_{valid j} exp(x_ij)),   x_ij = γ d_ij,   d_ij = (S_ij − S_ii) + m
// as a running log-sum-exp of x_ij over the negatives. The difference S_ij − S_ii is formed
// before γ multiplies it (S_ii known before the sweep, common/engine_driver.h dense_positives):
// forming γ S_ij and γ S_ii first and subtracting them loses every digit of the difference to
// cancellation at large γ, and overflows where γ S does although x does not.
// The same sweep gives the scale's gradient (spec §8.1): with π_ij = e^{x_ij − L_i},
//   ∂L_i/∂γ = Σ_j π_ij d_ij = (1 − e^{−L_i}) · (Σ_j e^{x_ij} d_ij / Σ_j e^{x_ij}),
// a softmax-weighted mean of the differences (LogSumExp::weighted_mean) times the negatives'
// total weight: no cancellation and no overflow at any γ. It costs a multiply-add per entry
// (about a tenth of the forward on CPU), so only a policy with kScaleGradient computes it.
#include "common/engine_math.h"

namespace vse {

// Dense policy (see common/engine_math.h for the interface). saved = {S_ii, L_i, ∂L_i/∂γ} (the
// last 0 without kScaleGradient): the softmax weight of negative j is π_ij = exp(x_ij − L_i),
// its gradient γ π_ij, and the diagonal's −γ Σ_j π_ij = −γ (1 − e^−L_i) (spec §4.3).
template <typename T, bool kScaleGradient = false>
struct UnifiedPolicy {
  using State = LogSumExp<T>;
  // Smooth in S_ii: the row-wise dot serves (engine_driver.h dense_positives).
  static constexpr bool kPositiveFromTiles = false;
  static constexpr int kAnchors = kBothAnchors;
  static constexpr bool kSameLabelTerms = false;
  static constexpr int64_t kSavedWidth = 3;
  T scale;
  T margin;

  VSE_HOST_DEVICE T difference(T score, T positive) const { return (score - positive) + margin; }
  VSE_HOST_DEVICE void add(State& state, T score, T positive) const {
    const T d = difference(score, positive);
    if constexpr (kScaleGradient) {
      state.add(scale * d, d);
    } else {
      state.add(scale * d);
    }
  }
  VSE_HOST_DEVICE void merge(State& state, const State& other) const { state.merge(other); }
  VSE_HOST_DEVICE T finish(const State& state, T positive, T* saved) const {
    const T loss = state.log1p_shifted(T(0));
    saved[0] = positive;
    saved[1] = loss;
    saved[2] = -math::expm1(-loss) * state.weighted_mean();
    return loss;
  }
  VSE_HOST_DEVICE T weight(T score, const T* saved) const {
    return scale * math::exp(scale * difference(score, saved[0]) - saved[1]);
  }
  VSE_HOST_DEVICE T diagonal(const T* saved) const { return scale * math::expm1(-saved[1]); }
};

}  // namespace vse
