// goal_forward / goal_backward on CUDA (and, compiled by g++, on the SIMT executor): the ops
// of common/goal_op.h over the CUDA passes of the chunked engine (cuda/engine.h), the
// per-anchor passes through cuda/anchors.cuh.
#include "common/goal_op.h"
#include "cuda/anchors.cuh"
#include "cuda/engine.h"

namespace vse::cuda {

VSE_REGISTER_KERNELS(m) {
  m.impl("goal_forward", &goal_forward<Engine>);
  m.impl("goal_backward", &goal_backward<Engine>);
}

}  // namespace vse::cuda
