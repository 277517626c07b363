// siglip_forward / siglip_backward on CPU: the ops of common/siglip_op.h over the CPU passes
// of the chunked engine (cpu/engine_passes.h).
#include "common/siglip_op.h"
#include "cpu/engine_passes.h"
#include "ops.h"

VSE_REGISTER_KERNELS(CPU, m) {
  m.impl("siglip_forward", &vse::siglip_forward<vse::cpu::Engine>);
  m.impl("siglip_backward", &vse::siglip_backward<vse::cpu::Engine>);
}
