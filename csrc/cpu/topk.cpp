// topk_similar on CPU: GEMM tiles (common/tiles.h) reduced row by row into a running top-k.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/tiles.h"
#include "common/topk.h"
#include "common/topk_args.h"
#include "ops.h"

namespace vse::cpu {
namespace {

template <typename T>
struct Candidate {
  T value;
  int64_t index;
};

template <typename T>
bool better(const Candidate<T>& a, const Candidate<T>& b) {
  return ranks_before(a.value, a.index, b.value, b.index);
}

// Merges one row of a tile (keys col0 .. col0+cols-1) into that row's sorted top-k list.
// Candidates that beat the list's last entry are buffered; when the buffer holds 2k,
// nth_element keeps the best k, so a row costs O(cols) plus O(k) per k insertions.
template <typename T>
void merge_row(const T* scores, int64_t cols, int64_t col0, int64_t query,
               const int64_t* query_labels, const int64_t* key_labels, T* list_values,
               int64_t* list_indices, int64_t k, std::vector<Candidate<T>>& buffer) {
  buffer.clear();
  for (int64_t s = 0; s < k && list_indices[s] >= 0; ++s) buffer.push_back({list_values[s], list_indices[s]});
  bool full = static_cast<int64_t>(buffer.size()) == k;
  T last = full ? buffer.back().value : T(0);
  for (int64_t j = 0; j < cols; ++j) {
    const int64_t key = col0 + j;
    if (excluded_by_label(query_labels, key_labels, query, key)) continue;
    const T value = scores[j];
    if (full && !beats_last(value, last)) continue;
    buffer.push_back({value, key});
    if (static_cast<int64_t>(buffer.size()) == 2 * k) {
      std::nth_element(buffer.begin(), buffer.begin() + (k - 1), buffer.end(), better<T>);
      buffer.resize(k);
      full = true;
      last = buffer[k - 1].value;
    }
  }
  const int64_t kept = std::min<int64_t>(k, buffer.size());
  std::partial_sort(buffer.begin(), buffer.begin() + kept, buffer.end(), better<T>);
  for (int64_t s = 0; s < kept; ++s) {
    list_values[s] = buffer[s].value;
    list_indices[s] = buffer[s].index;
  }
}

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
    for_each_tile(queries, keys, row_chunk, col_chunk, [&](const at::Tensor& tile, int64_t r0, int64_t c0) {
      const scalar_t* scores = tile.data_ptr<scalar_t>();
      const int64_t cols = tile.size(1);
      at::parallel_for(0, tile.size(0), 1, [&](int64_t begin, int64_t end) {
        std::vector<Candidate<scalar_t>> buffer;
        buffer.reserve(2 * k);
        for (int64_t r = begin; r < end; ++r) {
          const int64_t query = r0 + r;
          merge_row(scores + r * cols, cols, c0, query, qlab_ptr, klab_ptr, list_values + query * k,
                    list_indices + query * k, k, buffer);
        }
      });
    });
  });
  return {values.to(queries.scalar_type()), indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(vse_cuda, CPU, m) { m.impl("topk_similar", &topk_similar); }

}  // namespace vse::cpu
