#pragma once
// Argument checks of topk_similar shared by every backend. The Python wrapper raises the
// user-facing ValueError/TypeError first; these guard direct torch.ops calls.
#include <ATen/ATen.h>

#include <limits>

namespace vse {

inline void check_topk_args(const at::Tensor& queries, const at::Tensor& keys, int64_t k,
                            const at::Tensor& query_labels, const at::Tensor& key_labels,
                            int64_t row_chunk, int64_t col_chunk) {
  TORCH_CHECK(queries.dim() == 2 && keys.dim() == 2, "topk_similar: queries and keys must be 2-D");
  TORCH_CHECK(queries.size(1) == keys.size(1), "topk_similar: queries and keys differ in D");
  TORCH_CHECK(queries.scalar_type() == keys.scalar_type(), "topk_similar: dtypes differ");
  TORCH_CHECK(k >= 1 && k <= keys.size(0), "topk_similar: k must be in [1, number of keys]");
  TORCH_CHECK(keys.size(0) <= std::numeric_limits<int32_t>::max(),
              "topk_similar: at most 2^31-1 keys");
  TORCH_CHECK(row_chunk >= 1 && col_chunk >= 1, "topk_similar: chunks must be >= 1");
  const bool labelled = query_labels.numel() > 0 || key_labels.numel() > 0;
  if (labelled) {
    TORCH_CHECK(query_labels.dim() == 1 && query_labels.size(0) == queries.size(0) &&
                    key_labels.dim() == 1 && key_labels.size(0) == keys.size(0),
                "topk_similar: labels must be 1-D with one entry per query / key");
    TORCH_CHECK(query_labels.scalar_type() == at::kLong && key_labels.scalar_type() == at::kLong,
                "topk_similar: labels must be int64");
  }
}

}  // namespace vse
