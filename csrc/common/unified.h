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
#include <limits>

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

// ------------------------------------------------------------------- positives from labels
// label_positives (spec §8.3): anchor i's positives are P(i) = {p : labels_p = labels_i}, i
// included, and its term is the mean over p ∈ P(i) of
//   log(1 + Σ_{j∉P(i)} exp(γ(S_ij − S_ip + m))) = softplus(y_ip),   y_ip = Λ_i + γ(S_ii − S_ip),
// with Λ_i = log Σ_{j∉P(i)} e^{γ d_ij} the log-sum-exp of UnifiedPolicy's sweep, whose
// negatives are exactly j ∉ P(i). A second sweep then visits only the same-label pairs, each
// with its anchor's Λ_i known (LabelPositivesSweep). With σ_ip = σ(y_ip), σ̄_i = mean_p σ_ip
// and π_ij = e^{γ d_ij − Λ_i} (softmax over the negatives):
//   ∂L_i/∂S_ij = γ π_ij σ̄_i (j ∉ P(i)),   ∂L_i/∂S_ip = −γ σ_ip / |P(i)| (p ∈ P(i), p = i too),
//   ∂L_i/∂γ = σ̄_i Σ_j π_ij d_ij + mean_p σ_ip (S_ii − S_ip).
// With unique labels P(i) = {i}, y_ii = Λ_i and this is UnifiedPolicy's loss.

// Sweep policy over the same-label pairs of the anchors of one direction, whose Λ (log_sum_exp
// of their UnifiedPolicy states; −inf for an anchor without negatives) the policy points to.
// State: Σ_p softplus(y_ip), Σ_p σ_ip, Σ_p σ_ip (S_ii − S_ip) and |P(i)| − 1, over p ≠ i.
template <typename T>
struct LabelPositivesSweep {
  struct State {
    T loss = T(0);
    T sigmoid = T(0);
    T d_scale = T(0);
    T others = T(0);
  };
  static constexpr bool kPositiveFromTiles = false;
  static constexpr int kAnchors = kBothAnchors;
  static constexpr bool kSameLabelTerms = true;
  T scale;
  const T* lse;

  VSE_HOST_DEVICE void add(State&, T, T) const {}  // the negatives were the first sweep's
  VSE_HOST_DEVICE void add_same_label(State& state, T score, T positive, int64_t anchor) const {
    const auto f = softplus_sigmoid(lse[anchor] + scale * (positive - score));
    state.loss += f.softplus;
    state.sigmoid += f.sigmoid;
    state.d_scale += f.sigmoid * (positive - score);
    state.others += T(1);
  }
  VSE_HOST_DEVICE void merge(State& state, const State& other) const {
    state.loss += other.loss;
    state.sigmoid += other.sigmoid;
    state.d_scale += other.d_scale;
    state.others += other.others;
  }
};

// Λ of a log-sum-exp state, −inf when it has no terms.
template <typename T>
VSE_HOST_DEVICE T log_sum_exp(const LogSumExp<T>& state) {
  return state.sum == T(0) ? -std::numeric_limits<T>::infinity() : state.max + math::log(state.sum);
}

// Per-anchor pass (Engine::for_each_anchor) between the two sweeps: lse[i] = Λ_i.
template <typename T>
struct LogSumExpValues {
  const LogSumExp<T>* negatives;
  T* lse;

  VSE_HOST_DEVICE void operator()(int64_t i) const { lse[i] = log_sum_exp(negatives[i]); }
};

// Gradient policy of label_positives from saved = {S_ii, W_i, ∂L_i/∂γ, Λ_i, 1/|P(i)|}, with
// W_i = Λ_i − log σ̄_i so that a negative's weight γ π_ij σ̄_i = γ e^{γ d_ij − W_i} is
// UnifiedPolicy's with W_i in place of L_i (with unique labels W_i = softplus(Λ_i) = L_i).
template <typename T>
struct LabelPositivesPolicy {
  static constexpr bool kPositiveFromTiles = false;
  static constexpr int kAnchors = kBothAnchors;
  static constexpr bool kSameLabelTerms = true;
  static constexpr int64_t kSavedWidth = 5;
  T scale;
  T margin;

  VSE_HOST_DEVICE T weight(T score, const T* saved) const {
    return scale * math::exp(scale * ((score - saved[0]) + margin) - saved[1]);
  }
  VSE_HOST_DEVICE T same_label_weight(T score, const T* saved) const {
    return -scale * logistic(saved[3] + scale * (saved[0] - score)) * saved[4];
  }
  VSE_HOST_DEVICE T diagonal(const T* saved) const {
    return -scale * logistic(saved[3]) * saved[4];
  }
};

// Per-anchor pass after the second sweep: terms[i] = L_i and saved row i of
// LabelPositivesPolicy, from the anchor's two states, Λ_i and S_ii (∂L_i/∂γ only with
// scale_gradient: the first sweep's states then hold the weighted means it needs).
template <typename T>
struct LabelPositivesFinish {
  bool scale_gradient;
  const LogSumExp<T>* negatives;
  const typename LabelPositivesSweep<T>::State* same_label;
  const T* lse;
  const T* positive;
  T* terms;
  T* saved;

  VSE_HOST_DEVICE void operator()(int64_t i) const {
    const auto& others = same_label[i];
    const T lambda = lse[i], inverse_count = T(1) / (T(1) + others.others);
    const auto own = softplus_sigmoid(lambda);
    const T mean_sigmoid = (own.sigmoid + others.sigmoid) * inverse_count;
    T* out = saved + LabelPositivesPolicy<T>::kSavedWidth * i;
    out[0] = positive[i];
    // Without negatives every term and weight is 0 (Λ_i = −inf); W_i is then never read.
    out[1] = negatives[i].sum == T(0) ? T(0) : lambda - math::log(mean_sigmoid);
    out[2] = scale_gradient ? mean_sigmoid * negatives[i].weighted_mean() + others.d_scale * inverse_count : T(0);
    out[3] = lambda;
    out[4] = inverse_count;
    terms[i] = (own.softplus + others.loss) * inverse_count;
  }
};

}  // namespace vse
