// triplet_forward / triplet_backward on CPU: the ops of common/triplet_op.h over the CPU
// passes of the chunked engine (cpu/engine.h).
#include <torch/library.h>

#include "common/triplet_op.h"
#include "cpu/engine.h"

TORCH_LIBRARY_IMPL(vse_cuda, CPU, m) {
  m.impl("triplet_forward", &vse::triplet_forward<vse::cpu::Engine>);
  m.impl("triplet_backward", &vse::triplet_backward<vse::cpu::Engine>);
}
