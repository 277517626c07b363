// goal_forward / goal_backward on CPU: the ops of common/goal_op.h over the CPU passes of the
// chunked engine (cpu/engine_passes.h).
#include "common/goal_op.h"
#include "cpu/engine_passes.h"
#include "ops.h"

VSE_REGISTER_KERNELS(CPU, m) {
  m.impl("goal_forward", &vse::goal_forward<vse::cpu::Engine>);
  m.impl("goal_backward", &vse::goal_backward<vse::cpu::Engine>);
}
