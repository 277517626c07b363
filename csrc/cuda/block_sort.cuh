#pragma once
// Block-wide bitonic sort of (value, index) pairs in shared memory, best first in the
// project's candidate order (common/topk.h). Every thread of the block must call it.
#include "common/topk.h"
#include "cuda/launch.h"

namespace vse::cuda {

// Sorts `count` entries (a power of two) with O(count·log²count / blockDim) compare-exchanges.
template <typename T>
__device__ void block_bitonic_sort(T* values, int* indices, int count) {
  for (int size = 2; size <= count; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < count / 2; t += blockDim.x) {
        const int lo = 2 * t - (t & (stride - 1));
        const int hi = lo + stride;
        const bool best_first = (lo & size) == 0;
        const bool hi_first = ranks_before(values[hi], indices[hi], values[lo], indices[lo]);
        const bool lo_first = ranks_before(values[lo], indices[lo], values[hi], indices[hi]);
        if (best_first ? hi_first : lo_first) {
          const T v = values[lo];
          values[lo] = values[hi];
          values[hi] = v;
          const int i = indices[lo];
          indices[lo] = indices[hi];
          indices[hi] = i;
        }
      }
      __syncthreads();
    }
  }
}

}  // namespace vse::cuda
