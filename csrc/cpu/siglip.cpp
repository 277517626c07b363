// siglip_forward / siglip_backward on CPU: the ops of common/siglip_op.h over the CPU passes
// of the chunked engine (cpu/engine_passes.h), except the two that see every entry of S: the
// rows pass and the gradient pass evaluate SigLIP's terms a vector of entries at a time
// (cpu/capability/siglip.h; a scalar exp and log1p per entry cost more than the tile's GEMM).
#include <ATen/Version.h>

#include <string>
#include <type_traits>

#include "common/siglip_op.h"
#include "cpu/capability/siglip.h"
#include "cpu/engine_passes.h"
#include "ops.h"

namespace vse::cpu {
namespace {

// The row loops of the CPU capability torch runs its own kernels with: SigLIP's loss then uses
// the same vector instructions and Sleef functions as eager torch.nn.functional.logsigmoid.
// Results are bitwise reproducible for a given capability (the lanes' count fixes the order of
// the sums), whatever the thread count.
template <typename T>
const SigLipRowLoops<T>& row_loops() {
  static const SigLipRowLoops<T> loops = [] {
#if defined(VSE_CPU_CAPABILITIES_X86)
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512") return AVX512::siglip_row_loops<T>();
    if (capability == "AVX2") return AVX2::siglip_row_loops<T>();
#endif
    return DEFAULT::siglip_row_loops<T>();
  }();
  return loops;
}

// The CPU engine with SigLIP's rows and gradient passes on vectors; its columns pass (never
// swept: the terms are the rows') and finish are the engine's.
struct SigLipEngine : Engine {
  template <typename T, typename Policy>
  struct Dense : Engine::Dense<T, Policy> {
    static_assert(std::is_same_v<Policy, SigLipPolicy<T>>);
    using Base = Engine::Dense<T, Policy>;
    using State = typename Policy::State;

    static void rows(const Policy& policy, const at::Tensor& tile, int64_t r0, int64_t c0, const int64_t* labels,
                     const at::Tensor& /*positive*/, const at::Tensor& row_state) {
      const auto& loops = row_loops<T>();
      const T* scores = tile.data_ptr<T>();
      State* states = reinterpret_cast<State*>(row_state.data_ptr<T>());
      const int64_t cols = tile.size(1);
      for_each_row(tile.size(0), cols, [&](int64_t r) {
        State state = states[r0 + r];
        loops.fold(policy, scores + r * cols, cols, r0 + r, c0, labels, state);
        states[r0 + r] = state;
      });
    }

    static void gradient(const Policy& policy, const at::Tensor& grad, const at::Tensor& tile, int64_t r0,
                         int64_t c0, const int64_t* labels, const at::Tensor& row_saved, const at::Tensor& col_saved,
                         int directions) {
      if (directions != kRowAnchors) {  // not SigLIP's sweeps (kAnchors = kRowAnchors); kept general
        Base::gradient(policy, grad, tile, r0, c0, labels, row_saved, col_saved, directions);
        return;
      }
      const auto& loops = row_loops<T>();
      const T g = *grad.data_ptr<T>();
      T* scores = tile.data_ptr<T>();
      const T* saved = row_saved.data_ptr<T>();
      const int64_t cols = tile.size(1);
      for_each_row(tile.size(0), cols, [&](int64_t r) {
        const int64_t i = r0 + r;
        loops.gradient(policy, g, scores + r * cols, cols, i, c0, labels, saved + Policy::kSavedWidth * i);
      });
    }
  };
};

}  // namespace
}  // namespace vse::cpu

VSE_REGISTER_KERNELS(CPU, m) {
  m.impl("siglip_forward", &vse::siglip_forward<vse::cpu::SigLipEngine>);
  m.impl("siglip_backward", &vse::siglip_backward<vse::cpu::SigLipEngine>);
}
