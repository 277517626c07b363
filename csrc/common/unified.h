#pragma once
// Unified pair-similarity loss (spec §4.2, no 1/γ prefactor) over the chunked engine, shared
// by every backend. Per anchor row i (and likewise per anchor column):
//   L_i = log(1 + Σ_{valid j} exp(x_ij)),   x_ij = γ ((S_ij − S_ii) + m)
// as a running log-sum-exp of x_ij over the negatives. The difference S_ij − S_ii is formed
// before γ multiplies it (S_ii known before the sweep, common/engine_driver.h dense_positives):
// forming γ S_ij and γ S_ii first and subtracting them loses every digit of the difference to
// cancellation at large γ, and overflows where γ S does although x does not.
#include "common/engine_math.h"

namespace vse {

// Dense policy (see common/engine_math.h for the interface). saved = {S_ii, L_i}: the softmax weight
// of negative j is π_ij = exp(x_ij − L_i), its gradient γ π_ij, and the diagonal's
// −γ Σ_j π_ij = −γ (1 − e^−L_i) (spec §4.3).
template <typename T>
struct UnifiedPolicy {
  using State = LogSumExp<T>;
  // Smooth in S_ii: the row-wise dot serves (engine_driver.h dense_positives).
  static constexpr bool kPositiveFromTiles = false;
  T scale;
  T margin;

  VSE_HOST_DEVICE T argument(T score, T positive) const { return scale * ((score - positive) + margin); }
  VSE_HOST_DEVICE void add(State& state, T score, T positive) const { state.add(argument(score, positive)); }
  VSE_HOST_DEVICE void merge(State& state, const State& other) const { state.merge(other); }
  VSE_HOST_DEVICE T finish(const State& state, T positive, T* saved) const {
    const T loss = state.log1p_shifted(T(0));
    saved[0] = positive;
    saved[1] = loss;
    return loss;
  }
  VSE_HOST_DEVICE T weight(T score, const T* saved) const {
    return scale * math::exp(argument(score, saved[0]) - saved[1]);
  }
  VSE_HOST_DEVICE T diagonal(const T* saved) const { return scale * math::expm1(-saved[1]); }
};

}  // namespace vse
