#pragma once
// Launchers of the dense passes of the chunked loss engine on CUDA (declared in
// cuda/engine_passes.h; kernels in cuda/engine_kernels.cuh), as templates over the policy:
// each loss's .cu instantiates them for its own policies (e.g. cuda/triplet.cu for
// HingeSumPolicy), so adding a policy touches only its loss's files. The mined passes, shared
// by the mined losses, are compiled once in cuda/engine_mined.cu.
#include "cuda/engine_kernels.cuh"
#include "cuda/engine_passes.h"

namespace vse::cuda {

constexpr int kMaxThreads = 256;

// Threads for a block that sweeps `count` entries: a power of two in [32, kMaxThreads], no
// more than the entries need.
inline int sweep_threads(int64_t count) {
  int threads = kWarpSize;
  while (threads < kMaxThreads && threads < count) threads <<= 1;
  return threads;
}

inline unsigned blocks_for(int64_t count, int threads) { return static_cast<unsigned>((count + threads - 1) / threads); }

template <typename T, typename Policy>
void Engine::Dense<T, Policy>::rows(const Policy& policy, const at::Tensor& tile, int64_t r0, int64_t c0,
                                    const int64_t* labels, const at::Tensor& positive, const at::Tensor& row_state) {
  using State = typename Policy::State;
  const int64_t cols = tile.size(1);
  const int threads = sweep_threads(cols);
  launch(dense_rows_kernel<T, Policy>, dim3(static_cast<unsigned>(tile.size(0))), dim3(threads),
         threads * sizeof(State), current_stream(), policy, tile.data_ptr<T>(), cols, r0, c0, labels,
         positive.data_ptr<T>(), state_data<State, T>(row_state));
}

template <typename T, typename Policy>
void Engine::Dense<T, Policy>::columns(const Policy& policy, const at::Tensor& tile, int64_t r0, int64_t c0,
                                       const int64_t* labels, const at::Tensor& positive,
                                       const at::Tensor& col_state) {
  using State = typename Policy::State;
  const int64_t rows = tile.size(0), cols = tile.size(1);
  launch(dense_columns_kernel<T, Policy>, dim3(blocks_for(cols, kColumnWarp)), dim3(kColumnWarp, kColumnSegments),
         kColumnWarp * kColumnSegments * sizeof(State), current_stream(), policy, tile.data_ptr<T>(), rows, cols,
         r0, c0, labels, positive.data_ptr<T>(), state_data<State, T>(col_state));
}

template <typename T, typename Policy>
void Engine::Dense<T, Policy>::finish(const Policy& policy, const at::Tensor& state, const at::Tensor& positive,
                                      const at::Tensor& terms, const at::Tensor& saved) {
  using State = typename Policy::State;
  const int64_t n = state.size(0);
  launch(dense_finish_kernel<T, Policy>, dim3(blocks_for(n, kMaxThreads)), dim3(kMaxThreads), 0, current_stream(),
         policy, state_data<const State, T>(state), positive.data_ptr<T>(), n, terms.data_ptr<T>(),
         saved.data_ptr<T>());
}

template <typename T, typename Policy>
void Engine::Dense<T, Policy>::gradient(const Policy& policy, const at::Tensor& grad, const at::Tensor& tile,
                                        int64_t r0, int64_t c0, const int64_t* labels, const at::Tensor& row_saved,
                                        const at::Tensor& col_saved, int directions) {
  const int64_t rows = tile.size(0), cols = tile.size(1);
  const int threads = sweep_threads(cols);
  const dim3 grid(blocks_for(cols, threads), static_cast<unsigned>(rows < 65535 ? rows : 65535));
  launch(dense_gradient_kernel<T, Policy>, grid, dim3(threads), 0, current_stream(), policy, grad.data_ptr<T>(),
         tile.data_ptr<T>(), rows, cols, r0, c0, labels, row_saved.data_ptr<T>(), col_saved.data_ptr<T>(),
         directions);
}

}  // namespace vse::cuda
