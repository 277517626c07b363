// quintuplet_forward / quintuplet_backward on CUDA (and, compiled by g++, on the SIMT
// executor): the ops of common/quintuplet_op.h over the CUDA passes of the chunked engine
// (cuda/engine_passes.h), the per-anchor pass through cuda/anchors.cuh.
#include "common/quintuplet_op.h"
#include "cuda/anchors.cuh"
#include "cuda/engine_passes.h"

namespace vse::cuda {

VSE_REGISTER_KERNELS(VSE_KERNEL_DISPATCH_KEY, m) {
  m.impl("quintuplet_forward", &quintuplet_forward<Engine>);
  m.impl("quintuplet_backward", &quintuplet_backward<Engine>);
}

}  // namespace vse::cuda
