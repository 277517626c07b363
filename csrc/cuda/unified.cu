// unified_forward / unified_backward on CUDA (and, compiled by g++, on the SIMT executor):
// the ops of common/unified_op.h over the CUDA passes of the chunked engine (cuda/engine.h).
#include "common/unified_op.h"
#include "cuda/engine.h"

namespace vse::cuda {

VSE_REGISTER_KERNELS(m) {
  m.impl("unified_forward", &unified_forward<Engine>);
  m.impl("unified_backward", &unified_backward<Engine>);
}

}  // namespace vse::cuda
