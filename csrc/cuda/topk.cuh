#pragma once
// Fused top-k over one GEMM tile of S, merged into each query's running list: the rows of a
// tile (topk_similar, the row anchors of the mined losses) or its columns (their column
// anchors), with a predicate that drops candidates.
#include "common/topk.h"
#include "cuda/block_sort.cuh"
#include "cuda/launch.h"

namespace vse::cuda {

// Shared slots per block: the row's list (k) plus room for new candidates, a power of two
// so one bitonic sort merges them; the room holds at least one full sweep of the block.
inline int topk_slots(int k, int threads) {
  int slots = 1;
  while (slots < k + (k > threads ? k : threads)) slots <<= 1;
  return slots;
}

// Dynamic shared memory of a topk_tile_kernel block: `slots` values and int indices.
template <typename T>
size_t topk_shared_bytes(int slots) {
  return static_cast<size_t>(slots) * (sizeof(T) + sizeof(int));
}

// Largest dynamic shared memory a topk_tile_kernel block may ask for (sm_80 allows 163 KiB).
constexpr size_t kTopkMaxSharedBytes = 160 * 1024;

// topk_similar's predicate: keys sharing the query's label (common/topk.h).
struct LabelExclusion {
  const int64_t* query_labels;
  const int64_t* key_labels;
  VSE_HOST_DEVICE bool operator()(int64_t query, int64_t key) const {
    return excluded_by_label(query_labels, key_labels, query, key);
  }
};

// One block per query of the tile. Query q = query0 + blockIdx.x has the candidates
// key0 + j, j < candidates, at tile[blockIdx.x · query_stride + j · key_stride] (the rows of
// a tile `cols` wide: strides (cols, 1); its columns: (1, cols)); excluded(q, key) drops one.
// Candidates must come in increasing key, and tiles in increasing key0 (beats_last).
// The block sweeps the candidates blockDim.x at a time; a candidate that would enter the
// list is appended after it (shared atomic counter, so the append order varies, but the
// sort's total order makes the result deterministic). When the room could overflow on the
// next sweep, or at the end, one bitonic sort merges.
template <typename T, typename Excluded>
__global__ void topk_tile_kernel(const T* __restrict__ tile, int64_t candidates, int64_t query_stride,
                                 int64_t key_stride, int64_t query0, int64_t key0, Excluded excluded,
                                 T* __restrict__ list_values, int64_t* __restrict__ list_indices, int k, int slots) {
  VSE_DYNAMIC_SHARED(unsigned char, smem);
  T* values = reinterpret_cast<T*>(smem);
  int* indices = reinterpret_cast<int*>(values + slots);
  __shared__ int appended;

  const int64_t query = query0 + blockIdx.x;
  const T* scores = tile + static_cast<int64_t>(blockIdx.x) * query_stride;
  T* row_values = list_values + query * k;
  int64_t* row_indices = list_indices + query * k;
  for (int s = threadIdx.x; s < slots; s += blockDim.x) {
    values[s] = s < k ? row_values[s] : T(0);
    indices[s] = s < k ? static_cast<int>(row_indices[s]) : -1;
  }
  if (threadIdx.x == 0) appended = 0;
  __syncthreads();

  const int room = slots - k;
  for (int64_t base = 0; base < candidates; base += blockDim.x) {
    const bool full = indices[k - 1] >= 0;
    const T last = values[k - 1];
    const int64_t j = base + threadIdx.x;
    if (j < candidates && !excluded(query, key0 + j)) {
      const T value = scores[j * key_stride];
      if (!full || beats_last(value, last)) {
        const int at = atomicAdd(&appended, 1);
        values[k + at] = value;
        indices[k + at] = static_cast<int>(key0 + j);
      }
    }
    __syncthreads();
    const int pending = appended;
    const bool last_sweep = base + blockDim.x >= candidates;
    // Everyone reads `appended` before anyone appends again or resets it.
    __syncthreads();
    if (pending > room - static_cast<int>(blockDim.x) || (last_sweep && pending > 0)) {
      block_bitonic_sort(values, indices, slots);
      for (int s = k + threadIdx.x; s < slots; s += blockDim.x) indices[s] = -1;
      if (threadIdx.x == 0) appended = 0;
      __syncthreads();
    }
  }
  for (int s = threadIdx.x; s < k; s += blockDim.x) {
    row_values[s] = values[s];
    row_indices[s] = indices[s];
  }
}

}  // namespace vse::cuda
