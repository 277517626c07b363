// Launchers of the mined (sparse) passes of the chunked loss engine on CUDA (declared in
// cuda/engine_passes.h; kernels in cuda/engine_kernels.cuh and cuda/topk.cuh), compiled once
// for float and double: every mined loss (triplet hardest/top-k, quintuplet, GOAL) uses them.
#include "cuda/engine_launch.cuh"
#include "cuda/topk.cuh"

namespace vse::cuda {
namespace {

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

template struct Engine::Mined<float>;
template struct Engine::Mined<double>;

}  // namespace vse::cuda
