#pragma once
// The CUDA backend of the chunked loss engine (common/engine_driver.h): the per-tile passes as
// kernel launches on the current stream. The dense passes' launchers are templates in
// cuda/engine_launch.cuh, instantiated by each loss's .cu for its policies; the mined passes'
// are compiled once in cuda/engine_mined.cu; kernels in cuda/engine_kernels.cuh;
// for_each_anchor in cuda/anchors.cuh. Compiled by nvcc for the GPU and by g++ for the SIMT executor
// (cuda/launch.h).
#include <ATen/ATen.h>

#include "common/engine_driver.h"
#include "cuda/launch.h"

namespace vse::cuda {

struct Engine {
  using Guard = DeviceGuard;

  // A thread per anchor on the current stream. A template over the functor, so it is defined
  // in cuda/anchors.cuh, which every .cu that runs a per-anchor pass includes.
  template <typename Fn>
  static void for_each_anchor(int64_t n, const Fn& fn);

  template <typename T, typename Policy>
  struct Dense {
    static void rows(const Policy& policy, const at::Tensor& tile, int64_t r0, int64_t c0, const int64_t* labels,
                     const at::Tensor& positive, const at::Tensor& row_state);
    static void columns(const Policy& policy, const at::Tensor& tile, int64_t r0, int64_t c0, const int64_t* labels,
                        const at::Tensor& positive, const at::Tensor& col_state);
    static void finish(const Policy& policy, const at::Tensor& state, const at::Tensor& positive,
                       const at::Tensor& terms, const at::Tensor& saved);
    static void gradient(const Policy& policy, const at::Tensor& grad, const at::Tensor& tile, int64_t r0, int64_t c0,
                         const int64_t* labels, const at::Tensor& row_saved, const at::Tensor& col_saved,
                         int directions);
  };

  template <typename T>
  struct Mined {
    static void rows(const at::Tensor& tile, int64_t r0, int64_t c0, const int64_t* labels, const at::Tensor& values,
                     const at::Tensor& indices);
    static void columns(const at::Tensor& tile, int64_t r0, int64_t c0, const int64_t* labels,
                        const at::Tensor& values, const at::Tensor& indices);
    static void hinge_terms(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& positive, T margin,
                            const at::Tensor& weights, const at::Tensor& terms);
    static void gather(const at::Tensor& grad, const at::Tensor& other, const at::Tensor& own_index,
                       const at::Tensor& own_weight, const Groups& groups, const at::Tensor& diagonal,
                       const at::Tensor& out);
  };
};

}  // namespace vse::cuda
