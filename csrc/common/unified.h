#pragma once
// Unified pair-similarity loss (spec §4.2, no 1/γ prefactor) over the chunked engine, shared
// by every backend. Per anchor row i (and likewise per anchor column):
//   L_i = log(1 + Σ_{valid j} exp(γ (S_ij − S_ii + m)))
// computed as a running log-sum-exp of γ·S_ij over the negatives, shifted by γ (m − S_ii)
// once S_ii is known, so the positive may come from any tile, before or after.
#include "common/engine.h"

namespace vse {

// Dense policy (see common/engine.h for the interface). saved = {γ (m − S_ii) − L_i,
// −γ (1 − e^−L_i)}: π_ij = exp(γ S_ij + saved[0]) is the softmax weight of negative j, its
// gradient γ π_ij, and the diagonal's −γ Σ_j π_ij (spec §4.3).
template <typename T>
struct UnifiedPolicy {
  using State = LogSumExp<T>;
  static constexpr bool kPositiveFirst = false;
  T scale;
  T margin;

  VSE_HOST_DEVICE void add(State& state, T score, T /*positive*/) const { state.add(scale * score); }
  VSE_HOST_DEVICE void merge(State& state, const State& other) const { state.merge(other); }
  VSE_HOST_DEVICE T finish(const State& state, T positive, T* saved) const {
    const T shift = scale * (margin - positive);
    const T loss = state.log1p_shifted(shift);
    saved[0] = shift - loss;
    saved[1] = scale * math::expm1(-loss);
    return loss;
  }
  VSE_HOST_DEVICE T weight(T score, const T* saved) const { return scale * math::exp(scale * score + saved[0]); }
  VSE_HOST_DEVICE T diagonal(const T* saved) const { return saved[1]; }
};

}  // namespace vse
