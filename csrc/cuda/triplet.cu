// triplet_forward / triplet_backward on CUDA (and, compiled by g++, on the SIMT executor):
// the ops of common/triplet_op.h over the CUDA passes of the chunked engine
// (cuda/engine_passes.h), with the dense passes of mining "all" instantiated here.
#include "common/triplet_op.h"
#include "cuda/engine_launch.cuh"

namespace vse::cuda {

template struct Engine::Dense<float, HingeSumPolicy<float>>;
template struct Engine::Dense<double, HingeSumPolicy<double>>;

VSE_REGISTER_KERNELS(VSE_KERNEL_DISPATCH_KEY, m) {
  m.impl("triplet_forward", &triplet_forward<Engine>);
  m.impl("triplet_backward", &triplet_backward<Engine>);
}

}  // namespace vse::cuda
