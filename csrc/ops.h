#pragma once
// The op namespace of the library being compiled: `vse_cuda` for the product (_C),
// `vse_simt` for the test-only build of csrc/cuda under the SIMT executor (_simt).
#include <torch/library.h>

#if defined(VSE_SIMT)
#define VSE_OPS_NAMESPACE vse_simt
#else
#define VSE_OPS_NAMESPACE vse_cuda
#endif

// Registers a file's kernels for one dispatch key of the library being compiled, the one way
// every backend spells it: CPU in csrc/cpu, VSE_KERNEL_DISPATCH_KEY in csrc/cuda (CUDA under
// nvcc, CPU for the SIMT build; cuda/launch.h).
#define VSE_REGISTER_KERNELS(dispatch_key, m) TORCH_LIBRARY_IMPL(VSE_OPS_NAMESPACE, dispatch_key, m)
