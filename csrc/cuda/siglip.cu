// siglip_forward / siglip_backward on CUDA (and, compiled by g++, on the SIMT executor): the
// ops of common/siglip_op.h over the CUDA passes of the chunked engine (cuda/engine_passes.h),
// with the dense passes of its policy instantiated here.
#include "common/siglip_op.h"
#include "cuda/engine_launch.cuh"

namespace vse::cuda {

template struct Engine::Dense<float, SigLipPolicy<float>>;
template struct Engine::Dense<double, SigLipPolicy<double>>;

VSE_REGISTER_KERNELS(VSE_KERNEL_DISPATCH_KEY, m) {
  m.impl("siglip_forward", &siglip_forward<Engine>);
  m.impl("siglip_backward", &siglip_backward<Engine>);
}

}  // namespace vse::cuda
