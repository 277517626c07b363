#pragma once
// Engine::for_each_anchor on CUDA (cuda/engine_passes.h): fn(i) for every i < n, a thread
// each. A template over the functor, so it lives in a header that the .cu files
// instantiating it include (cuda/quintuplet.cu, cuda/goal.cu).
#include "cuda/engine_passes.h"

namespace vse::cuda {

constexpr int kAnchorThreads = 256;

template <typename Fn>
__global__ void anchors_kernel(Fn fn, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) fn(i);
}

template <typename Fn>
void Engine::for_each_anchor(int64_t n, const Fn& fn) {
  const auto blocks = static_cast<unsigned>((n + kAnchorThreads - 1) / kAnchorThreads);
  launch(anchors_kernel<Fn>, dim3(blocks), dim3(kAnchorThreads), 0, current_stream(), fn, n);
}

}  // namespace vse::cuda
