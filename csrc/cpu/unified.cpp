// unified_forward / unified_backward on CPU: the ops of common/unified_op.h over the CPU
// passes of the chunked engine (cpu/engine_passes.h).
#include "common/unified_op.h"
#include "cpu/engine_passes.h"
#include "ops.h"

VSE_REGISTER_KERNELS(CPU, m) {
  m.impl("unified_forward", &vse::unified_forward<vse::cpu::Engine>);
  m.impl("unified_backward", &vse::unified_backward<vse::cpu::Engine>);
}
