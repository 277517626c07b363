// Launchers of the chunked loss engine's passes on CUDA (cuda/engine.h; kernels in
// cuda/engine.cuh and cuda/topk.cuh), instantiated for the (T, Policy) pairs of the ops.
#include "cuda/engine.h"

#include "common/goal.h"
#include "common/triplet.h"
#include "common/unified.h"
#include "cuda/engine.cuh"
#include "cuda/topk.cuh"

namespace vse::cuda {
namespace {

constexpr int kMaxThreads = 256;

// Threads for a block that sweeps `count` entries: a power of two in [32, kMaxThreads], no
// more than the entries need.
int sweep_threads(int64_t count) {
  int threads = kWarpSize;
  while (threads < kMaxThreads && threads < count) threads <<= 1;
  return threads;
}

unsigned blocks_for(int64_t count, int threads) { return static_cast<unsigned>((count + threads - 1) / threads); }

template <typename State, typename T>
State* states_of(const at::Tensor& state) {
  return reinterpret_cast<State*>(state.data_ptr<T>());
}

// Merges the tile's candidates into `queries` running lists (one block each): candidate j of
// query q at tile[q·query_stride + j·key_stride], keys key0 + j.
template <typename T>
void merge_lists(const at::Tensor& tile, int64_t queries, int64_t candidates, int64_t query_stride,
                 int64_t key_stride, int64_t query0, int64_t key0, const int64_t* labels, const at::Tensor& values,
                 const at::Tensor& indices) {
  const int k = static_cast<int>(values.size(1));
  const int threads = sweep_threads(candidates);
  const int slots = topk_slots(k, threads);
  const size_t smem = topk_shared_bytes<T>(slots);
  TORCH_CHECK(smem <= kTopkMaxSharedBytes, "mined losses: k=", k, " needs ", smem,
              " bytes of shared memory per block on CUDA; use k <= 8192 (float32) or 4096 (float64)");
  launch(topk_tile_kernel<T, NotNegative>, dim3(static_cast<unsigned>(queries)), dim3(threads), smem,
         current_stream(), tile.data_ptr<T>(), candidates, query_stride, key_stride, query0, key0,
         NotNegative{labels}, values.data_ptr<T>(), indices.data_ptr<int64_t>(), k, slots);
}

}  // namespace

// ------------------------------------------------------------------------------ dense losses

template <typename T, typename Policy>
void Engine::Dense<T, Policy>::rows(const Policy& policy, const at::Tensor& tile, int64_t r0, int64_t c0,
                                    const int64_t* labels, const at::Tensor& positive, const at::Tensor& row_state) {
  using State = typename Policy::State;
  const int64_t cols = tile.size(1);
  const int threads = sweep_threads(cols);
  launch(dense_rows_kernel<T, Policy>, dim3(static_cast<unsigned>(tile.size(0))), dim3(threads),
         threads * sizeof(State), current_stream(), policy, tile.data_ptr<T>(), cols, r0, c0, labels,
         positive.data_ptr<T>(), states_of<State, T>(row_state));
}

template <typename T, typename Policy>
void Engine::Dense<T, Policy>::columns(const Policy& policy, const at::Tensor& tile, int64_t r0, int64_t c0,
                                       const int64_t* labels, const at::Tensor& positive,
                                       const at::Tensor& col_state) {
  using State = typename Policy::State;
  const int64_t rows = tile.size(0), cols = tile.size(1);
  launch(dense_columns_kernel<T, Policy>, dim3(blocks_for(cols, kColumnWarp)), dim3(kColumnWarp, kColumnSegments),
         kColumnWarp * kColumnSegments * sizeof(State), current_stream(), policy, tile.data_ptr<T>(), rows, cols,
         r0, c0, labels, positive.data_ptr<T>(), states_of<State, T>(col_state));
}

template <typename T, typename Policy>
void Engine::Dense<T, Policy>::finish(const Policy& policy, const at::Tensor& state, const at::Tensor& positive,
                                      const at::Tensor& terms, const at::Tensor& saved) {
  using State = typename Policy::State;
  const int64_t n = state.size(0);
  launch(dense_finish_kernel<T, Policy>, dim3(blocks_for(n, kMaxThreads)), dim3(kMaxThreads), 0, current_stream(),
         policy, states_of<const State, T>(state), positive.data_ptr<T>(), n, terms.data_ptr<T>(),
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

// -------------------------------------------------------------------- mined (sparse) losses

template <typename T>
void Engine::Mined<T>::rows(const at::Tensor& tile, int64_t r0, int64_t c0, const int64_t* labels,
                            const at::Tensor& values, const at::Tensor& indices) {
  const int64_t rows = tile.size(0), cols = tile.size(1);
  merge_lists<T>(tile, rows, cols, cols, 1, r0, c0, labels, values, indices);
}

template <typename T>
void Engine::Mined<T>::columns(const at::Tensor& tile, int64_t r0, int64_t c0, const int64_t* labels,
                               const at::Tensor& values, const at::Tensor& indices) {
  const int64_t rows = tile.size(0), cols = tile.size(1);
  merge_lists<T>(tile, cols, rows, 1, cols, c0, r0, labels, values, indices);
}

template <typename T>
void Engine::Mined<T>::hinge_terms(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& positive,
                                   T margin, const at::Tensor& weights, const at::Tensor& terms) {
  const int64_t n = values.size(0);
  launch(mined_hinge_terms_kernel<T>, dim3(blocks_for(n, kMaxThreads)), dim3(kMaxThreads), 0, current_stream(),
         values.data_ptr<T>(), indices.data_ptr<int64_t>(), n, values.size(1), positive.data_ptr<T>(), margin,
         weights.data_ptr<T>(), terms.data_ptr<T>());
}

template <typename T>
void Engine::Mined<T>::gather(const at::Tensor& grad, const at::Tensor& other, const at::Tensor& own_index,
                              const at::Tensor& own_weight, const Groups& groups, const at::Tensor& diagonal,
                              const at::Tensor& out) {
  const int64_t n = other.size(0), d = other.size(1);
  launch(gather_rows_kernel<T>, dim3(static_cast<unsigned>(n)), dim3(sweep_threads(d)), 0, current_stream(),
         grad.data_ptr<T>(), other.data_ptr<T>(), d, own_index.data_ptr<int64_t>(), own_weight.data_ptr<T>(),
         own_index.size(1), groups.offset.data_ptr<int64_t>(), groups.source.data_ptr<int64_t>(),
         groups.weight.data_ptr<T>(), diagonal.data_ptr<T>(), out.data_ptr<T>());
}

template struct Engine::Dense<float, HingeSumPolicy<float>>;
template struct Engine::Dense<double, HingeSumPolicy<double>>;
template struct Engine::Dense<float, UnifiedPolicy<float>>;
template struct Engine::Dense<double, UnifiedPolicy<double>>;
template struct Engine::Mined<float>;
template struct Engine::Mined<double>;

// GOAL's negative sets use only the sweeps of the dense passes (common/goal.h).
#define VSE_INSTANTIATE_SWEEPS(T)                                                                                     \
  template void Engine::Dense<T, NegativeSetPolicy<T>>::rows(const NegativeSetPolicy<T>&, const at::Tensor&, int64_t, \
                                                             int64_t, const int64_t*, const at::Tensor&,              \
                                                             const at::Tensor&);                                      \
  template void Engine::Dense<T, NegativeSetPolicy<T>>::columns(const NegativeSetPolicy<T>&, const at::Tensor&,       \
                                                                int64_t, int64_t, const int64_t*, const at::Tensor&,  \
                                                                const at::Tensor&);
VSE_INSTANTIATE_SWEEPS(float)
VSE_INSTANTIATE_SWEEPS(double)
#undef VSE_INSTANTIATE_SWEEPS

}  // namespace vse::cuda
