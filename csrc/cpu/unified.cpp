// unified_forward / unified_backward on CPU: the ops of common/unified_op.h over the CPU
// passes of the chunked engine (cpu/engine.h).
#include <torch/library.h>

#include "common/unified_op.h"
#include "cpu/engine.h"

TORCH_LIBRARY_IMPL(vse_cuda, CPU, m) {
  m.impl("unified_forward", &vse::unified_forward<vse::cpu::Engine>);
  m.impl("unified_backward", &vse::unified_backward<vse::cpu::Engine>);
}
