// triplet_forward / triplet_backward on CPU: the ops of common/triplet_op.h over the CPU
// passes of the chunked engine (cpu/engine_passes.h).
#include "common/triplet_op.h"
#include "cpu/engine_passes.h"
#include "ops.h"

VSE_REGISTER_KERNELS(CPU, m) {
  m.impl("triplet_forward", &vse::triplet_forward<vse::cpu::Engine>);
  m.impl("triplet_backward", &vse::triplet_backward<vse::cpu::Engine>);
}
