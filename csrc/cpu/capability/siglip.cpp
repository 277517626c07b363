// SigLIP's per-row CPU loops (cpu/capability/siglip.h) for the CPU capability this file is
// compiled for (CMakeLists.txt: -DCPU_CAPABILITY=DEFAULT|AVX2|AVX512 and that capability's
// flags). Each row is cut into lanes of W entries; the lanes evaluate common/siglip.h's terms
// together, the row's own pair and the lanes past its end masked out.
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

#include "cpu/capability/siglip.h"

namespace vse {

// common/siglip.h's lane operations on a vector of T.
template <typename T>
struct Lanes<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  static V exp(V x) { return x.exp(); }
  // log(1 + e) for the e = e^{−|y|} in [0, 1] of softplus_sigmoid (NaN stays NaN), from Sleef's
  // log instead of its log1p, which is 5-8× slower on AVX-512 here (12 ns vs 1.6 ns an element
  // measured on this AMD EPYC, 2.7 vs 2.1 on AVX2): with u = 1 + e rounded, δ = (u − 1) − e is
  // its rounding error exactly (Fast2Sum, |e| ≤ 1), and log(1 + e) = log(u − δ) = log u − δ/u
  // up to (δ/u)² < 2^−46 relative: as accurate as log1p, also for e below the ulp of 1.
  static V log1p(V e) {
    const V u = V(T(1)) + e;
    return u.log() - ((u - V(T(1))) - e) / u;
  }
  static V if_positive(V x, V a, V b) { return V::blendv(b, a, x > V(T(0))); }
};

}  // namespace vse

namespace vse::cpu::CPU_CAPABILITY {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// z of the lanes [j, j + W) of row anchor i (columns c0 + j + u): +1 for a pair of its label, −1
// otherwise (and for lanes past the row's `count` entries).
template <typename T>
Vec<T> signs(const int64_t* labels, int64_t i, int64_t c0, int64_t j, int64_t count) {
  constexpr int64_t W = Vec<T>::size();
  T z[W];
  const int64_t label = labels[i];
  for (int64_t u = 0; u < W; ++u) z[u] = u < count && labels[c0 + j + u] == label ? T(1) : T(-1);
  return Vec<T>::loadu(z);
}

template <typename T>
Vec<T> load(const T* x, int64_t count) {
  return count == Vec<T>::size() ? Vec<T>::loadu(x) : Vec<T>::loadu(x, count);
}

template <typename T>
T sum_lanes(const Vec<T>& v) {
  T lanes[Vec<T>::size()];
  v.store(lanes);
  T sum = T(0);
  for (int64_t u = 0; u < Vec<T>::size(); ++u) sum += lanes[u];
  return sum;
}

template <typename T>
void fold_row(const SigLipPolicy<T>& policy, const T* row, int64_t cols, int64_t i, int64_t c0,
              const int64_t* labels, typename SigLipPolicy<T>::State& state) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  const V lane = V::arange(T(0), T(1)), minus_one(T(-1));
  V loss(T(0)), d_scale(T(0)), d_bias(T(0));
  const int64_t own = i - c0;  // the anchor's own column in this tile, if it lies inside
  for (int64_t j = 0; j < cols; j += W) {
    const int64_t count = std::min(W, cols - j);
    const V score = load(row + j, count);
    const auto term = policy.term(score, labels == nullptr ? minus_one : signs<T>(labels, i, c0, j, count));
    const bool own_here = j <= own && own < j + W;
    if (count == W && !own_here) {
      loss = loss + term.loss;
      d_scale = d_scale + term.d_scale;
      d_bias = d_bias + term.d_bias;
    } else {
      // Lanes past the row's end and the anchor's own pair add nothing (a blend, so that a NaN
      // or ±inf there stays out too).
      const V keep = (lane < V(T(count))) & (lane != V(own_here ? T(own - j) : T(-1)));
      loss = V::blendv(loss, loss + term.loss, keep);
      d_scale = V::blendv(d_scale, d_scale + term.d_scale, keep);
      d_bias = V::blendv(d_bias, d_bias + term.d_bias, keep);
    }
  }
  state.loss += sum_lanes(loss);
  state.d_scale += sum_lanes(d_scale);
  state.d_bias += sum_lanes(d_bias);
}

template <typename T>
void gradient_row(const SigLipPolicy<T>& policy, T grad, T* row, int64_t cols, int64_t i, int64_t c0,
                  const int64_t* labels, const T* saved) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  const V g(grad), minus_one(T(-1));
  for (int64_t j = 0; j < cols; j += W) {
    const int64_t count = std::min(W, cols - j);
    const V z = labels == nullptr ? minus_one : signs<T>(labels, i, c0, j, count);
    (g * policy.gradient(load(row + j, count), z)).store(row + j, static_cast<int>(count));
  }
  // The anchor's own pair: its gradient from the saved S_ii (the one its term was computed at).
  const int64_t own = i - c0;
  if (0 <= own && own < cols) row[own] = grad * policy.diagonal(saved);
}

}  // namespace

template <typename T>
SigLipRowLoops<T> siglip_row_loops() {
  return {&fold_row<T>, &gradient_row<T>};
}
template SigLipRowLoops<float> siglip_row_loops<float>();
template SigLipRowLoops<double> siglip_row_loops<double>();

}  // namespace vse::cpu::CPU_CAPABILITY
