// unified_forward / unified_backward on CUDA (and, compiled by g++, on the SIMT executor):
// the ops of common/unified_op.h over the CUDA passes of the chunked engine
// (cuda/engine_passes.h), with the dense passes of its policy instantiated here.
#include "common/unified_op.h"
#include "cuda/anchors.cuh"
#include "cuda/engine_launch.cuh"

namespace vse::cuda {

template struct Engine::Dense<float, UnifiedPolicy<float>>;
template struct Engine::Dense<double, UnifiedPolicy<double>>;
template struct Engine::Dense<float, UnifiedPolicy<float, true>>;
template struct Engine::Dense<double, UnifiedPolicy<double, true>>;

// label_positives' passes (LabelPositivesSweep folds only, LabelPositivesPolicy only weighs, so
// neither has every Dense member) and per-anchor passes are instantiated where unified_op.h uses them.

VSE_REGISTER_KERNELS(VSE_KERNEL_DISPATCH_KEY, m) {
  m.impl("unified_forward", &unified_forward<Engine>);
  m.impl("unified_backward", &unified_backward<Engine>);
}

}  // namespace vse::cuda
