// quintuplet_forward / quintuplet_backward on CPU: the ops of common/quintuplet_op.h over the
// CPU passes of the chunked engine (cpu/engine_passes.h).
#include "common/quintuplet_op.h"
#include "cpu/engine_passes.h"
#include "ops.h"

VSE_REGISTER_KERNELS(CPU, m) {
  m.impl("quintuplet_forward", &vse::quintuplet_forward<vse::cpu::Engine>);
  m.impl("quintuplet_backward", &vse::quintuplet_backward<vse::cpu::Engine>);
}
