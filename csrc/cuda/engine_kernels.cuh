#pragma once
// Kernels of the chunked loss engine on CUDA (launchers: cuda/engine_launch.cuh and
// cuda/engine_mined.cu; host side: common/engine_driver.h). Every tile is reduced by a fixed
// assignment of entries to threads and a fixed merge order, and no two threads write one
// output: no float atomics, bitwise reproducible from run to run. The math is common/'s: policies, is_negative,
// dense_entry_gradient, mined_hinge_term.
#include "common/engine_math.h"
#include "cuda/launch.h"

namespace vse::cuda {

// ------------------------------------------------------------------------------ dense losses

// Threads per block of dense_columns_kernel: kColumnWarp columns (one coalesced row segment
// per warp) × kColumnSegments contiguous row segments, merged in segment order.
constexpr int kColumnWarp = 32;
constexpr int kColumnSegments = 8;

// Merges the block's states (one per thread, blockDim.x a power of two) into shared[0] in a
// fixed tree order: round s folds shared[t + s] into shared[t] for t < s, s = blockDim.x / 2 … 1.
template <typename Policy, typename State>
__device__ void block_merge(const Policy& policy, State* shared, const State& own) {
  shared[threadIdx.x] = own;
  __syncthreads();
  for (unsigned stride = blockDim.x >> 1; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) policy.merge(shared[threadIdx.x], shared[threadIdx.x + stride]);
    __syncthreads();
  }
}

// Row anchors: one block per tile row. Thread t folds the row's columns t, t + blockDim.x, …
// (in that order) into a state of its own; the block merges them (block_merge) and thread 0
// merges the result into the row's running state, so column tiles are merged in tile order.
// Dynamic shared memory: blockDim.x states.
template <typename T, typename Policy>
__global__ void dense_rows_kernel(Policy policy, const T* __restrict__ tile, int64_t cols, int64_t r0, int64_t c0,
                                  const int64_t* __restrict__ labels, const T* __restrict__ positive,
                                  typename Policy::State* __restrict__ row_state) {
  using State = typename Policy::State;
  VSE_DYNAMIC_SHARED(State, partial);
  const int64_t i = r0 + blockIdx.x;
  const T* row = tile + static_cast<int64_t>(blockIdx.x) * cols;
  const T p = positive[i];
  State state;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    fold_entry(policy, state, labels, i, c0 + j, row[j], p);
  }
  block_merge(policy, partial, state);
  if (threadIdx.x == 0) policy.merge(row_state[i], partial[0]);
}

// Column anchors: a thread per (column, row segment). Thread (x, y) of block b walks column
// j = b·kColumnWarp + x over the y-th of kColumnSegments contiguous segments of the tile's
// rows, in increasing row order (a warp reads consecutive columns of one row: coalesced);
// then thread (x, 0) merges the column's running state with the segments' states in segment
// order. Dynamic shared memory: kColumnWarp · kColumnSegments states.
template <typename T, typename Policy>
__global__ void dense_columns_kernel(Policy policy, const T* __restrict__ tile, int64_t rows, int64_t cols,
                                     int64_t r0, int64_t c0, const int64_t* __restrict__ labels,
                                     const T* __restrict__ positive, typename Policy::State* __restrict__ col_state) {
  using State = typename Policy::State;
  VSE_DYNAMIC_SHARED(State, partial);
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t per_segment = (rows + blockDim.y - 1) / blockDim.y;
  const int64_t begin = threadIdx.y * per_segment;
  const int64_t end = begin + per_segment < rows ? begin + per_segment : rows;
  State state;
  if (j < cols) {
    const int64_t anchor = c0 + j;
    const T p = positive[anchor];
    for (int64_t r = begin; r < end; ++r) {
      fold_entry(policy, state, labels, anchor, r0 + r, tile[r * cols + j], p);
    }
  }
  partial[threadIdx.y * blockDim.x + threadIdx.x] = state;
  __syncthreads();
  if (threadIdx.y == 0 && j < cols) {
    State total = col_state[c0 + j];
    for (unsigned s = 0; s < blockDim.y; ++s) policy.merge(total, partial[s * blockDim.x + threadIdx.x]);
    col_state[c0 + j] = total;
  }
}

// A thread per anchor: its loss term and saved values.
template <typename T, typename Policy>
__global__ void dense_finish_kernel(Policy policy, const typename Policy::State* __restrict__ state,
                                    const T* __restrict__ positive, int64_t n, T* __restrict__ terms,
                                    T* __restrict__ saved) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) terms[i] = policy.finish(state[i], positive[i], saved + Policy::kSavedWidth * i);
}

// The tile S_c turned into G_c = grad·∂L/∂S_c (of the anchors of `directions`) in place: a thread per column of the block's
// column range, rows blockIdx.y, blockIdx.y + gridDim.y, … (coalesced rows).
template <typename T, typename Policy>
__global__ void dense_gradient_kernel(Policy policy, const T* __restrict__ grad, T* __restrict__ tile, int64_t rows,
                                      int64_t cols, int64_t r0, int64_t c0, const int64_t* __restrict__ labels,
                                      const T* __restrict__ row_saved, const T* __restrict__ col_saved,
                                      int directions) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= cols) return;
  const T g = *grad;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    T* entry = tile + r * cols + j;
    *entry = g * dense_entry_gradient(policy, labels, r0 + r, c0 + j, *entry, row_saved, col_saved, directions);
  }
}

// -------------------------------------------------------------------- mined (sparse) losses

// The mined lists' predicate for topk_tile_kernel: everything but an anchor's valid negatives.
struct NotNegative {
  const int64_t* labels;
  VSE_HOST_DEVICE bool operator()(int64_t anchor, int64_t candidate) const {
    return !is_negative(labels, anchor, candidate);
  }
};

// A thread per anchor: its mined triplet term and the weights of its listed negatives.
template <typename T>
__global__ void mined_hinge_terms_kernel(const T* __restrict__ values, const int64_t* __restrict__ indices,
                                         int64_t n, int64_t k, const T* __restrict__ positive, T margin,
                                         T* __restrict__ weights, T* __restrict__ terms) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) terms[i] = mined_hinge_term(values + i * k, indices + i * k, k, positive[i], margin, weights + i * k);
}

// One block per output row i, a thread per feature c (strided by blockDim.x): out[i, c] =
// grad·(diagonal_i·other[i, c] + Σ_s own_weight[i,s]·other[own_index[i,s], c]
// + Σ_e weight[e]·other[source[e], c]) over e in [offset[i], offset[i+1]), summed in this
// order. Slots with index −1 or weight 0 are skipped (0·NaN would be NaN).
template <typename T>
__global__ void gather_rows_kernel(const T* __restrict__ grad, const T* __restrict__ other, int64_t d,
                                   const int64_t* __restrict__ own_index, const T* __restrict__ own_weight, int64_t k,
                                   const int64_t* __restrict__ offset, const int64_t* __restrict__ source,
                                   const T* __restrict__ weight, const T* __restrict__ diagonal, T* __restrict__ out) {
  const int64_t i = blockIdx.x;
  const T g = *grad;
  const int64_t first = offset[i], last = offset[i + 1];
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    T sum = diagonal[i] * other[i * d + c];
    for (int64_t s = 0; s < k; ++s) {
      const int64_t j = own_index[i * k + s];
      const T w = own_weight[i * k + s];
      if (j >= 0 && w != T(0)) sum += w * other[j * d + c];
    }
    for (int64_t e = first; e < last; ++e) sum += weight[e] * other[source[e] * d + c];
    out[i * d + c] = g * sum;
  }
}

}  // namespace vse::cuda
