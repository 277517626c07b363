// goal_forward / goal_backward on CUDA (and, compiled by g++, on the SIMT executor): the ops
// of common/goal_op.h over the CUDA passes of the chunked engine (cuda/engine_passes.h), the
// per-anchor passes through cuda/anchors.cuh.
#include "common/goal_op.h"
#include "cuda/anchors.cuh"
#include "cuda/engine_launch.cuh"

namespace vse::cuda {

// GOAL's negative sets use only the sweeps of the dense passes (common/goal.h).
#define VSE_INSTANTIATE_SWEEPS(T)                                                                                     \
  template void Engine::Dense<T, NegativeSetPolicy<T>>::rows(const NegativeSetPolicy<T>&, const at::Tensor&, int64_t, \
                                                             int64_t, const int64_t*, const at::Tensor&,              \
                                                             const at::Tensor&);                                      \
  template void Engine::Dense<T, NegativeSetPolicy<T>>::columns(const NegativeSetPolicy<T>&, const at::Tensor&,       \
                                                                int64_t, int64_t, const int64_t*, const at::Tensor&,  \
                                                                const at::Tensor&);
VSE_INSTANTIATE_SWEEPS(float)
VSE_INSTANTIATE_SWEEPS(double)
#undef VSE_INSTANTIATE_SWEEPS

VSE_REGISTER_KERNELS(VSE_KERNEL_DISPATCH_KEY, m) {
  m.impl("goal_forward", &goal_forward<Engine>);
  m.impl("goal_backward", &goal_backward<Engine>);
}

}  // namespace vse::cuda
