#pragma once
// SigLIP's per-row CPU loops on ATen's vectors (at::vec::Vectorized, Sleef's exp and log1p under
// AVX2/AVX-512), defined by cpu/capability/siglip.cpp, which the build compiles once per CPU
// capability into its own namespace (DEFAULT, and AVX2, AVX512 on x86-64), as ATen compiles its own
// kernels. cpu/siglip.cpp loops over a tile's rows and calls the loops of the capability torch
// itself runs with (at::get_cpu_capability(), ATEN_CPU_CAPABILITY included). The math is
// common/siglip.h's, on lanes of entries instead of one entry.
#include <cstdint>

#include "common/siglip.h"

namespace vse::cpu {

template <typename T>
struct SigLipRowLoops {
  using State = typename SigLipPolicy<T>::State;
  // state += the terms (loss, ∂/∂t, ∂/∂b) of the entries (i, c0 + j), j < cols, of one tile row
  // `row` of row anchor i, the anchor's own pair excepted (finish()'s): summed in W lanes
  // (W = the vector's width), lane u over j ≡ u mod W in increasing j, then the lanes in order.
  void (*fold)(const SigLipPolicy<T>& policy, const T* row, int64_t cols, int64_t i, int64_t c0,
               const int64_t* labels, State& state);
  // row[j] := grad · ∂L/∂S_{i, c0 + j} of row anchor i's terms, from its saved values `saved`.
  void (*gradient)(const SigLipPolicy<T>& policy, T grad, T* row, int64_t cols, int64_t i, int64_t c0,
                   const int64_t* labels, const T* saved);
};

namespace DEFAULT {
template <typename T>
SigLipRowLoops<T> siglip_row_loops();
}  // namespace DEFAULT
#if defined(VSE_CPU_CAPABILITIES_X86)
namespace AVX2 {
template <typename T>
SigLipRowLoops<T> siglip_row_loops();
}  // namespace AVX2
namespace AVX512 {
template <typename T>
SigLipRowLoops<T> siglip_row_loops();
}  // namespace AVX512
#endif

}  // namespace vse::cpu
