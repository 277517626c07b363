// topk_similar on CUDA (and, compiled by g++, on the SIMT executor): GEMM tiles from
// common/tiles.h, each reduced by topk_tile_kernel into the running per-row lists.
#include <ATen/Dispatch.h>

#include "common/tiles.h"
#include "common/topk_args.h"
#include "cuda/topk.cuh"

namespace vse::cuda {
namespace {

constexpr int kTopkThreads = 256;

std::tuple<at::Tensor, at::Tensor> topk_similar(const at::Tensor& queries, const at::Tensor& keys,
                                                int64_t k, const at::Tensor& query_labels,
                                                const at::Tensor& key_labels, int64_t row_chunk,
                                                int64_t col_chunk) {
  check_topk_args(queries, keys, k, query_labels, key_labels, row_chunk, col_chunk);
  DeviceGuard guard(queries);
  const int64_t n = queries.size(0);
  const auto acc = accumulate_type(queries.scalar_type());
  auto values = at::zeros({n, k}, queries.options().dtype(acc));
  auto indices = at::full({n, k}, -1, queries.options().dtype(at::kLong));
  const bool labelled = query_labels.numel() > 0;
  const auto qlab = labelled ? query_labels.contiguous() : query_labels;
  const auto klab = labelled ? key_labels.contiguous() : key_labels;
  const int64_t* qlab_ptr = labelled ? qlab.data_ptr<int64_t>() : nullptr;
  const int64_t* klab_ptr = labelled ? klab.data_ptr<int64_t>() : nullptr;
  const int slots = topk_slots(static_cast<int>(k), kTopkThreads);

  AT_DISPATCH_FLOATING_TYPES(acc, "topk_similar_cuda", [&] {
    const size_t smem = topk_shared_bytes<scalar_t>(slots);
    TORCH_CHECK(smem <= kTopkMaxSharedBytes, "topk_similar: k=", k, " needs ", smem,
                " bytes of shared memory per block on CUDA; use k <= 8192 (float32) or 4096 (float64)");
    const LabelExclusion excluded{qlab_ptr, klab_ptr};
    const auto operand_queries = as_operand(queries), operand_keys = as_operand(keys);
    for_each_tile(operand_queries, operand_keys, row_chunk, col_chunk, [&](const at::Tensor& tile, int64_t r0, int64_t c0) {
      const int64_t cols = tile.size(1);
      launch(topk_tile_kernel<scalar_t, LabelExclusion>, dim3(static_cast<unsigned>(tile.size(0))),
             dim3(kTopkThreads), smem, current_stream(), tile.data_ptr<scalar_t>(), cols, cols, int64_t{1}, r0,
             c0, excluded, values.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(), static_cast<int>(k), slots);
    });
  });
  return {values.to(queries.scalar_type()), indices};
}

}  // namespace

VSE_REGISTER_KERNELS(VSE_KERNEL_DISPATCH_KEY, m) { m.impl("topk_similar", &topk_similar); }

}  // namespace vse::cuda
