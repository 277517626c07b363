// topk_similar on CPU: GEMM tiles (common/tiles.h) reduced row by row into a running top-k.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/tiles.h"
#include "common/topk_args.h"
#include "cpu/topk.h"
#include "ops.h"

namespace vse::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> topk_similar(const at::Tensor& queries, const at::Tensor& keys,
                                                int64_t k, const at::Tensor& query_labels,
                                                const at::Tensor& key_labels, int64_t row_chunk,
                                                int64_t col_chunk) {
  check_topk_args(queries, keys, k, query_labels, key_labels, row_chunk, col_chunk);
  const int64_t n = queries.size(0);
  const auto acc = accumulate_type(queries.scalar_type());
  auto values = at::zeros({n, k}, queries.options().dtype(acc));
  auto indices = at::full({n, k}, -1, queries.options().dtype(at::kLong));
  const bool labelled = query_labels.numel() > 0;
  const auto qlab = labelled ? query_labels.contiguous() : query_labels;
  const auto klab = labelled ? key_labels.contiguous() : key_labels;
  const int64_t* qlab_ptr = labelled ? qlab.data_ptr<int64_t>() : nullptr;
  const int64_t* klab_ptr = labelled ? klab.data_ptr<int64_t>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES(acc, "topk_similar_cpu", [&] {
    scalar_t* list_values = values.data_ptr<scalar_t>();
    int64_t* list_indices = indices.data_ptr<int64_t>();
    const auto operand_queries = as_operand(queries), operand_keys = as_operand(keys);
    for_each_tile(operand_queries, operand_keys, row_chunk, col_chunk, [&](const at::Tensor& tile, int64_t r0, int64_t c0) {
      const scalar_t* scores = tile.data_ptr<scalar_t>();
      const int64_t cols = tile.size(1);
      at::parallel_for(0, tile.size(0), 1, [&](int64_t begin, int64_t end) {
        TopkMerge<scalar_t>& list = thread_merges<scalar_t>(1)[0];
        for (int64_t r = begin; r < end; ++r) {
          const int64_t query = r0 + r;
          const auto excluded = [&](int64_t key) { return excluded_by_label(qlab_ptr, klab_ptr, query, key); };
          list.load(list_values + query * k, list_indices + query * k, k);
          merge_row(list, scores + r * cols, cols, c0, excluded);
          list.store(list_values + query * k, list_indices + query * k);
        }
      });
    });
  });
  return {values.to(queries.scalar_type()), indices};
}

}  // namespace

VSE_REGISTER_KERNELS(CPU, m) { m.impl("topk_similar", &topk_similar); }

}  // namespace vse::cpu
