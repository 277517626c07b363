#pragma once
// Triplet loss (spec §2) over the chunked engine, shared by every backend. With
// h_ij = [m + S_ij − S_ii]_+ per anchor row (i2t) and the same per anchor column (t2i):
//   mining "all"     (VSE0):   Σ over valid negatives of h          -> HingeSumPolicy (dense)
//   mining "hardest" (VSE++):  h of the hardest valid negative       -> mined_hinge_term, k = 1
//   mining "topk":             mean of h over the k hardest valid    -> mined_hinge_term
// (mined_hinge_term is the engine's, common/engine_math.h: its mined passes compute it.)
#include <cstdint>

#include "common/engine_math.h"

namespace vse {

// Dense policy (see common/engine_math.h for the interface) of mining "all": per anchor the sum of
// its hinges and the number of active ones. saved = {S_ii, −active}: an entry's gradient is
// its hinge's indicator, recomputed from the same expression as in the forward; the
// diagonal's is minus the count.
template <typename T>
struct HingeSumPolicy {
  struct State {
    T sum = T(0);
    T active = T(0);
  };
  // A copy of the anchor's caption (or image) scores S_ii exactly: its hinge at margin 0 is
  // exactly 0 and inactive only if S_ii is the value the tiles hold.
  static constexpr bool kPositiveFromTiles = true;
  static constexpr int kAnchors = kBothAnchors;
  static constexpr bool kSameLabelTerms = false;
  static constexpr int64_t kSavedWidth = 2;
  T margin;

  VSE_HOST_DEVICE T argument(T score, T positive) const { return margin + score - positive; }
  VSE_HOST_DEVICE void add(State& state, T score, T positive) const {
    const T x = argument(score, positive);
    state.sum += hinge(x);
    state.active += hinge_grad(x);
  }
  VSE_HOST_DEVICE void merge(State& state, const State& other) const {
    state.sum += other.sum;
    state.active += other.active;
  }
  VSE_HOST_DEVICE T finish(const State& state, T positive, T* saved) const {
    saved[0] = positive;
    saved[1] = -state.active;
    return state.sum;
  }
  VSE_HOST_DEVICE T weight(T score, const T* saved) const { return hinge_grad(argument(score, saved[0])); }
  VSE_HOST_DEVICE T diagonal(const T* saved) const { return saved[1]; }
};

}  // namespace vse
