#pragma once
// GOAL (spec §5) over the chunked engine, shared by every backend. Per anchor (rows: i2t,
// columns: t2i) with at least one valid negative, from its positive P = S_ii and its hardest
// valid negative N = S_{i,c(i)} (mined lists, k = 1):
//   value        N − P                        (the logging value; the loss is their sum)
//   ∂/∂S_{i,c(i)} = w_t·w_n,  ∂/∂S_ii −= w_t·w_p (the injected gradient; weights are constants)
// Triplet weights w_t: con 1, nca σ(τ(N − P)), cir σ(τ((1 − P)² + N² − 0.5)).
// Pair weights (w_p, w_n): con (1, 1), lin (1 − P, N),
//   sig    (1/(e^{a(P−λ)} + 1),   1/(e^{−b(N−λ)} + 1)),
//   sig_ms (1/(e^{a(P−λ)} + R⁺),  1/(e^{−b(N−λ)} + R⁻)),  R⁺ = mean_𝒫 e^{a(P − P_k)}, R⁻ = mean_𝒩 e^{b(S_ij − N)}
//   lin_ms ((1 − R⁺)(1 − P),     (1 + R⁻)·N),            R⁺ = mean_𝒫 (P − P_k),    R⁻ = mean_𝒩 (N − S_ij)
// over the relative-similarity sets (empty set: R = 0)
//   𝒫_i = {k ≠ i : P_k ≤ N_i + 0.1}                           (over the vector of positives)
//   𝒩_i = {j valid negative, j ≠ c(i) : S_ij ≥ min_k P_k − 0.1}  (over S: NegativeSetPolicy)
#include <cstdint>
#include <limits>

#include "common/engine_math.h"

namespace vse {

enum class TripletWeight : int { kCon, kNca, kCir };
enum class PairWeight : int { kCon, kLin, kSig, kLinMs, kSigMs };

template <typename T>
struct GoalOptions {
  TripletWeight triplet;
  PairWeight pair;
  T tau, a, b, lam;
};

// Offsets of the relative-similarity sets (spec §5.2).
template <typename T>
VSE_HOST_DEVICE T goal_positive_offset() {
  return T(0.1);
}
template <typename T>
VSE_HOST_DEVICE T goal_negative_offset() {
  return T(0.1);
}

VSE_HOST_DEVICE bool is_relative(PairWeight pair) { return pair == PairWeight::kLinMs || pair == PairWeight::kSigMs; }

template <typename T>
VSE_HOST_DEVICE T sigmoid(T x) {
  return T(1) / (T(1) + math::exp(-x));
}

// -------------------------------------------------------------------- 𝒩: the negative set

// The negative set's mean as a policy of the dense sweeps (Engine::Dense<T, Policy>::rows /
// columns, run in the mined lists' tile sweep): an anchor's valid negatives ≥ threshold
// (= min_k P_k − 0.1) are kept, all but the largest (the hardest negative c(i) whenever
// N_i ≥ threshold) in `rest` relative to the largest, so that removing c(i) cancels nothing:
//   sig_ms: rest = Σ e^{b(S_ij − top)}     lin_ms: rest = Σ (top − S_ij)
// Equal values: the other one stays in rest (e⁰ = 1, or 0), as an equal non-c(i) entry.
template <typename T>
struct NegativeSetPolicy {
  // A plain aggregate of T (the engine stores states as [N, 3] tensors of T), so count is a
  // T: exact up to 2^24 kept entries per anchor in float32.
  struct State {
    T top = std::numeric_limits<T>::lowest();
    T rest = T(0);
    T count = T(0);  // kept entries, the top included
  };
  static constexpr bool kSameLabelTerms = false;
  const T* threshold;  // on the tensors' device: read there, never copied to the host (a sync)
  T b;
  bool exponential;  // sig_ms (else lin_ms)

  VSE_HOST_DEVICE void add(State& state, T score, T /*positive*/) const {
    // NaN is never kept (as S_ij ≥ threshold in the oracle).
    if (score >= *threshold) merge(state, State{score, T(0), T(1)});
  }

  // Folds in another part of the same anchor's negatives: the lower top joins the rest,
  // which is re-based on the higher one (on a tie, state's own top stays on top).
  VSE_HOST_DEVICE void merge(State& state, const State& other) const {
    if (other.count == T(0)) return;
    if (state.count == T(0)) {
      state = other;
      return;
    }
    const bool own_top = !(other.top > state.top);
    const State& high = own_top ? state : other;
    const State& low = own_top ? other : state;
    const T shift = high.top - low.top;
    const T rest = exponential ? high.rest + (low.rest + T(1)) * math::exp(-b * shift)
                               : high.rest + low.rest + low.count * shift;
    state = State{high.top, rest, state.count + other.count};
  }

  // R⁻ of an anchor whose hardest negative is a number: its top is then N_i when kept.
  static VSE_HOST_DEVICE T mean(const State& state) {
    return state.count <= T(1) ? T(0) : state.rest / (state.count - T(1));
  }
};

// -------------------------------------------------------------------- 𝒫: the positive set

// The positives sorted ascending, ties by index and NaN last (never ≤ a limit, so never in a
// set), with prefix sums in double over that order, for R⁺ in O(log N) per anchor:
//   sum[e]    = Σ_{k<e} P_(k)
//   exp0[e]   = Σ_{k<e}    e^{a(P_(0) − P_(k))}   (terms ≤ 1: no overflow)
//   exp1[e]   = Σ_{1≤k<e} e^{a(P_(1) − P_(k))}   (for the anchor at position 0: excluding it
//                                                from exp0 would cancel its leading term)
// Entries past the last number hold NaN and are never read.
template <typename T>
struct PositiveSet {
  const T* sorted;
  int64_t count;
  const double* sum;
  const double* exp0;
  const double* exp1;
};

// R⁺ of an anchor with positive p at position `position` of the sorted positives (past every
// set's end if p is NaN) and hardest negative nv: the mean over 𝒫 = {k ≠ i : P_k ≤ nv + 0.1}
// of e^{a(p − P_k)} (sig_ms) or p − P_k (lin_ms); 0 when 𝒫 is empty.
template <typename T>
VSE_HOST_DEVICE T relative_positive(const PositiveSet<T>& set, T p, int64_t position, T nv, bool exponential, T a) {
  const T limit = nv + goal_positive_offset<T>();
  int64_t lo = 0, hi = set.count;  // end = the number of sorted positives ≤ limit
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (set.sorted[mid] <= limit) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  const int64_t end = lo;
  const bool self = position >= 0 && position < end;  // ties of p are all in or all out
  const int64_t members = end - (self ? 1 : 0);
  if (members == 0) return T(0);
  const double pd = static_cast<double>(p);
  double total;
  if (!exponential) {
    total = static_cast<double>(members) * pd - (set.sum[end] - (self ? pd : 0.0));
  } else if (self && position == 0) {
    total = ::exp(static_cast<double>(a) * (pd - set.sorted[1])) * set.exp1[end];
  } else {
    const double min = set.sorted[0];
    const double own = self ? ::exp(static_cast<double>(a) * (min - pd)) : 0.0;
    total = ::exp(static_cast<double>(a) * (pd - min)) * (set.exp0[end] - own);
  }
  return static_cast<T>(total / static_cast<double>(members));
}

// ---------------------------------------------------------------------- the anchor's terms

template <typename T>
VSE_HOST_DEVICE T triplet_weight(const GoalOptions<T>& o, T p, T nv) {
  switch (o.triplet) {
    case TripletWeight::kNca:
      return sigmoid(o.tau * (nv - p));
    case TripletWeight::kCir:
      return sigmoid(o.tau * ((T(1) - p) * (T(1) - p) + nv * nv - T(0.5)));
    default:
      return T(1);
  }
}

// The gradient of one anchor with a valid negative: weights[0] = ∂/∂S_{i,c(i)} = w_t·w_n,
// weights[1] = ∂/∂S_ii = −w_t·w_p. r_pos, r_neg: R⁺, R⁻ (used by *_ms only).
template <typename T>
VSE_HOST_DEVICE void goal_weights(const GoalOptions<T>& o, T p, T nv, T r_pos, T r_neg, T* weights) {
  T wp = T(1), wn = T(1);
  switch (o.pair) {
    case PairWeight::kLin:
      wp = T(1) - p;
      wn = nv;
      break;
    case PairWeight::kSig:
      wp = T(1) / (math::exp(o.a * (p - o.lam)) + T(1));
      wn = T(1) / (math::exp(-o.b * (nv - o.lam)) + T(1));
      break;
    case PairWeight::kSigMs:
      wp = T(1) / (math::exp(o.a * (p - o.lam)) + r_pos);
      wn = T(1) / (math::exp(-o.b * (nv - o.lam)) + r_neg);
      break;
    case PairWeight::kLinMs:
      wp = (T(1) - r_pos) * (T(1) - p);
      wn = (T(1) + r_neg) * nv;
      break;
    default:
      break;
  }
  const T wt = triplet_weight(o, p, nv);
  weights[0] = wt * wn;
  weights[1] = -(wt * wp);
}

// The per-anchor pass of goal_forward over one direction (Engine::for_each_anchor): terms[i]
// = N_i − P_i and saved row i = (∂/∂S_{i,c(i)}, ∂/∂S_ii), all 0 for an anchor without a valid
// negative. positives, position and negatives are read by *_ms only.
template <typename T>
struct GoalAnchors {
  GoalOptions<T> options;
  const T* positive;
  const T* hardest;       // N_i (k = 1 mined list)
  const int64_t* index;   // c(i), −1: no valid negative
  PositiveSet<T> positives;
  const int64_t* position;  // of P_i in positives.sorted
  const typename NegativeSetPolicy<T>::State* negatives;
  T* saved;  // [N, 2]
  T* terms;  // [N]

  VSE_HOST_DEVICE void operator()(int64_t i) const {
    T* weights = saved + 2 * i;
    if (index[i] < 0) {
      terms[i] = weights[0] = weights[1] = T(0);
      return;
    }
    const T p = positive[i], nv = hardest[i];
    T r_pos = T(0), r_neg = T(0);
    if (is_relative(options.pair)) {
      r_pos = relative_positive(positives, p, position[i], nv, options.pair == PairWeight::kSigMs, options.a);
      r_neg = NegativeSetPolicy<T>::mean(negatives[i]);
    }
    terms[i] = nv - p;
    goal_weights(options, p, nv, r_pos, r_neg, weights);
  }
};

}  // namespace vse
