#pragma once
// SigLIP's sigmoid loss (spec §8.2) over the chunked engine, shared by every backend. With the
// logit u_ij = t·S_ij + b and z_ij = +1 for a positive pair (the anchor's own, and with labels
// every same-label pair), −1 otherwise:
//   L = Σ_ij softplus(−z_ij u_ij),   ∂L/∂u_ij = −z_ij σ(−z_ij u_ij),
//   ∂L/∂S_ij = t ∂L/∂u_ij,   ∂L/∂t = Σ_ij S_ij ∂L/∂u_ij,   ∂L/∂b = Σ_ij ∂L/∂u_ij.
// Every entry is one term, not one per direction as in the other dense losses, so the terms
// are the row anchors' alone (kAnchors = kRowAnchors): one process sweeps S once into its rows,
// and a rank of a group sweeps only its own rows against every column (no column sweep), so
// the ranks' losses count each term once.
#include "common/engine_math.h"

namespace vse {

// Dense policy (see common/engine_math.h for the interface), row anchors only. State: the sum
// of the row's terms, of their ∂/∂t and of their ∂/∂b so far. saved = {S_ii, ∂/∂t, ∂/∂b} of
// the row (the diagonal term included).
template <typename T>
struct SigLipPolicy {
  struct State {
    T loss = T(0);
    T d_scale = T(0);
    T d_bias = T(0);
  };
  // Smooth in S_ii: the row-wise dot serves (engine_driver.h dense_positives).
  static constexpr bool kPositiveFromTiles = false;
  static constexpr int kAnchors = kRowAnchors;
  static constexpr bool kSameLabelTerms = true;
  static constexpr int64_t kSavedWidth = 3;
  T scale;
  T bias;

  // The term of entry S_ij with sign z and its derivatives ∂/∂t, ∂/∂b, on scalars or lanes.
  template <typename V>
  struct Term {
    V loss, d_scale, d_bias;
  };
  template <typename V>
  VSE_HOST_DEVICE Term<V> term(V score, V z) const {
    const auto f = softplus_sigmoid(-z * (V(scale) * score + V(bias)));
    const V d_logit = -z * f.sigmoid;
    return {f.softplus, d_logit * score, d_logit};
  }
  // The term added to state.
  VSE_HOST_DEVICE void fold(State& state, T score, T z) const {
    const Term<T> t = term(score, z);
    state.loss += t.loss;
    state.d_scale += t.d_scale;
    state.d_bias += t.d_bias;
  }
  VSE_HOST_DEVICE void add(State& state, T score, T /*positive*/) const { fold(state, score, T(-1)); }
  VSE_HOST_DEVICE void add_same_label(State& state, T score, T /*positive*/, int64_t /*anchor*/) const {
    fold(state, score, T(1));
  }
  VSE_HOST_DEVICE void merge(State& state, const State& other) const {
    state.loss += other.loss;
    state.d_scale += other.d_scale;
    state.d_bias += other.d_bias;
  }
  VSE_HOST_DEVICE T finish(const State& state, T positive, T* saved) const {
    State total = state;
    fold(total, positive, T(1));
    saved[0] = positive;
    saved[1] = total.d_scale;
    saved[2] = total.d_bias;
    return total.loss;
  }
  // ∂term/∂S_ij = −z t σ(−z u_ij).
  template <typename V>
  VSE_HOST_DEVICE V gradient(V score, V z) const {
    return -z * V(scale) * logistic(-z * (V(scale) * score + V(bias)));
  }
  VSE_HOST_DEVICE T weight(T score, const T* /*saved*/) const { return gradient(score, T(-1)); }
  VSE_HOST_DEVICE T same_label_weight(T score, const T* /*saved*/) const { return gradient(score, T(1)); }
  VSE_HOST_DEVICE T diagonal(const T* saved) const { return gradient(saved[0], T(1)); }
};

}  // namespace vse
