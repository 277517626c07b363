#pragma once
// The one seam between CUDA sources and the two ways they are compiled:
//  - nvcc (real GPU build, registered for the CUDA dispatch key of `vse_cuda`);
//  - g++ with -DVSE_SIMT (csrc/simt runs every block's threads as CPU fibers,
//    registered for the CPU dispatch key of the test-only `vse_simt` namespace).
// Kernels and launchers in csrc/cuda include only this header for CUDA facilities,
// launch through vse::cuda::launch, and take dynamic shared memory through
// VSE_DYNAMIC_SHARED, so the same text compiles both ways.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../ops.h"

#if defined(VSE_SIMT)
#include "../simt/simt.h"
#define VSE_KERNEL_DISPATCH_KEY CPU
#else
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#define VSE_KERNEL_DISPATCH_KEY CUDA
#endif

#if defined(VSE_SIMT)
// `extern __shared__` has no g++ spelling; the executor hands out the block's buffer.
#define VSE_DYNAMIC_SHARED(T, name) T* name = ::simt::dynamic_shared<T>()
#else
#define VSE_DYNAMIC_SHARED(T, name)                                   \
  extern __shared__ __align__(16) unsigned char vse_dynamic_smem_[]; \
  T* name = reinterpret_cast<T*>(vse_dynamic_smem_)
#endif

namespace vse::cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

#if defined(VSE_SIMT)
using Stream = ::simt::Stream;
inline Stream current_stream() { return Stream{}; }

// Keeps the caller's device current while kernels are launched (a no-op on the executor).
struct DeviceGuard {
  explicit DeviceGuard(const at::Tensor&) {}
};

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamic_smem, Stream,
            Args... args) {
  ::simt::launch(grid, block, dynamic_smem, [=] { kernel(static_cast<Params>(args)...); },
                 reinterpret_cast<const void*>(kernel));
}
#else
using Stream = cudaStream_t;
inline Stream current_stream() { return c10::cuda::getCurrentCUDAStream(); }

struct DeviceGuard {
  explicit DeviceGuard(const at::Tensor& t) : guard_(t.device()) {}
  c10::cuda::CUDAGuard guard_;
};

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamic_smem, Stream stream,
            Args... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  if (dynamic_smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(dynamic_smem)));
  }
  kernel<<<grid, block, dynamic_smem, stream>>>(static_cast<Params>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

}  // namespace vse::cuda
