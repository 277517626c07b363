#pragma once
// AOQ adaptive offline quintuplet loss (spec §3.3, gradient §3.5) over the chunked engine,
// shared by every backend. Per anchor pair i, from the mined lists (k = 1) and four row-wise
// dots:
//   p = S_ii, u = S_{i,c(i)} (hardest valid negative of row i), w = S_{r(i),i} (of column i),
//   x = ⟨img_i, off_txt_i⟩, y = ⟨off_img_i, txt_i⟩, q = ⟨off_img_i, off_txt_i⟩, z = ⟨img2_i, txt2_i⟩
//   ω = β − (x − u)/α,  ν = β − (y − w)/α  (unclamped)
//   L_i = ω [m₁ + u − p]_+ + ν [m₁ + w − p]_+
//       + [m₂ + x − p]_+ + [m₂ + y − p]_+ + [m₂ + q − p]_+ + [m₂ + z − p]_+
// An online term whose anchor has no valid negative is 0, with no gradient through its
// weight; the offline terms always count.
#include <cstdint>

#include "common/engine_math.h"

namespace vse {

// Indices of the per-anchor gradient ∂L_i/∂(p, u, w, x, y, q, z) written by quintuplet_term.
enum QuintupletScore : int { kScoreP = 0, kScoreU, kScoreW, kScoreX, kScoreY, kScoreQ, kScoreZ, kQuintupletScores };

template <typename T>
struct QuintupletOptions {
  T margin_online;
  T margin_offline;
  T alpha;
  T beta;
  bool detach_weights;  // ω, ν constants: drops the through-weight terms ±h/α of spec §3.5
};

namespace detail {

// One adaptive online term ω [m₁ + s − p]_+, ω = β − (offline − s)/α, into the term and the
// gradients of p, s and the offline score it is weighted by.
template <typename T>
VSE_HOST_DEVICE void adaptive_hinge(const QuintupletOptions<T>& o, T p, T s, T offline, T& term, T& grad_p,
                                    T& grad_s, T& grad_offline) {
  const T arg = o.margin_online + s - p;
  const T h = hinge(arg), active = hinge_grad(arg);
  const T weight = o.beta - (offline - s) / o.alpha;
  term += weight * h;
  grad_p -= weight * active;
  grad_s += weight * active;
  if (!o.detach_weights) {
    grad_s += h / o.alpha;
    grad_offline -= h / o.alpha;
  }
}

}  // namespace detail

// L_i of one anchor; writes grads[kQuintupletScores] = ∂L_i/∂(p, u, w, x, y, q, z). p and
// p_col: S_ii as the tiles of u's row and of w's column hold it, so that a copy's score is
// compared with a positive rounded as it is (a hinge at exactly 0 stays 0); the offline
// terms take p. has_u / has_w: the anchor has a valid negative in its row / column (u / w
// are ignored otherwise).
template <typename T>
VSE_HOST_DEVICE T quintuplet_term(const QuintupletOptions<T>& o, T p, T u, bool has_u, T p_col, T w, bool has_w,
                                  T x, T y, T q, T z, T* grads) {
  for (int s = 0; s < kQuintupletScores; ++s) grads[s] = T(0);
  T online = T(0);
  if (has_u) detail::adaptive_hinge(o, p, u, x, online, grads[kScoreP], grads[kScoreU], grads[kScoreX]);
  if (has_w) detail::adaptive_hinge(o, p_col, w, y, online, grads[kScoreP], grads[kScoreW], grads[kScoreY]);
  const T offline_scores[4] = {x, y, q, z};
  T offline = T(0);
  for (int s = 0; s < 4; ++s) {
    const T arg = o.margin_offline + offline_scores[s] - p;
    const T active = hinge_grad(arg);
    offline += hinge(arg);
    grads[kScoreX + s] += active;
    grads[kScoreP] -= active;
  }
  return online + offline;
}

// The per-anchor pass of quintuplet_forward (Engine::for_each_anchor): terms[i] = L_i and
// grads row i, from the k = 1 mined lists (value and index, −1: no valid negative), their
// positives (the row and the column sweep's) and the offline dots.
template <typename T>
struct QuintupletAnchors {
  QuintupletOptions<T> options;
  const T* p;
  const T* p_col;
  const T* u;
  const int64_t* c;
  const T* w;
  const int64_t* r;
  const T* x;
  const T* y;
  const T* q;
  const T* z;
  T* grads;  // [N, kQuintupletScores]
  T* terms;  // [N]

  VSE_HOST_DEVICE void operator()(int64_t i) const {
    terms[i] = quintuplet_term(options, p[i], u[i], c[i] >= 0, p_col[i], w[i], r[i] >= 0, x[i], y[i], q[i], z[i],
                               grads + kQuintupletScores * i);
  }
};

}  // namespace vse
