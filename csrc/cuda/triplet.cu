// triplet_forward / triplet_backward on CUDA (and, compiled by g++, on the SIMT executor):
// the ops of common/triplet_op.h over the CUDA passes of the chunked engine (cuda/engine.h).
#include "common/triplet_op.h"
#include "cuda/engine.h"

namespace vse::cuda {

VSE_REGISTER_KERNELS(m) {
  m.impl("triplet_forward", &triplet_forward<Engine>);
  m.impl("triplet_backward", &triplet_backward<Engine>);
}

}  // namespace vse::cuda
