#pragma once
// The chunked loss engine on CPU (DESIGN §3): loops only. S = A·Bᵀ is visited tile by tile
// (common/tiles.h, one at::mm per tile); each tile is swept twice in row-major order, once
// into per-row state (rows in parallel), once into per-column state (blocks of columns in
// parallel), and both carry over to the next tile. Every row's and column's state sees its
// entries in increasing index, row chunk after row chunk, so the results do not depend on
// the thread count and no two threads write the same state: no atomics, bitwise
// reproducible. The math of each loss is a policy in common/<loss>.h.
//
// Dense policy interface (common/triplet.h HingeSumPolicy, common/unified.h UnifiedPolicy):
//   State                              an anchor's running state over its negatives
//   kPositiveFirst                     add() needs the anchor's positive S_ii: it is then
//                                      ⟨a_i, b_i⟩ computed before the pass; otherwise S_ii
//                                      is read from the tile it lies in, for finish() only
//   add(state, S_ij, S_ii)             folds in one valid negative
//   finish(state, S_ii, saved) -> T    the anchor's loss term; writes kSavedWidth values
//   weight(S_ij, saved) -> T           ∂term/∂S_ij of a valid negative, from the saved values
//   diagonal(saved) -> T               ∂term/∂S_ii
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "common/engine.h"
#include "common/tiles.h"
#include "cpu/topk.h"

namespace vse::cpu {

// Values a dense policy saves per anchor for its backward.
constexpr int64_t kSavedWidth = 2;

// Columns per task of a column sweep: 16 float32 are one cache line, read row after row,
// and the block's states stay in registers or L1.
constexpr int64_t kColumnBlock = 16;

// Entries of S a task should at least get: smaller tiles run on the calling thread (a
// parallel region costs more than reducing a few thousand entries).
constexpr int64_t kMinTaskEntries = 16384;

// fn(r) for every row r < rows of a tile `cols` wide, rows in parallel.
template <typename Fn>
void for_each_row(int64_t rows, int64_t cols, const Fn& fn) {
  const int64_t grain = std::max<int64_t>(1, kMinTaskEntries / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) fn(r);
  });
}

// fn(j0, j1) for blocks [j0, j1) of at most kColumnBlock columns of a tile `rows` high,
// blocks in parallel. fn walks the block row by row (row-major, cache friendly), so each
// column still sees its entries in increasing row order.
template <typename Fn>
void for_each_column_block(int64_t rows, int64_t cols, const Fn& fn) {
  const int64_t blocks = (cols + kColumnBlock - 1) / kColumnBlock;
  const int64_t grain = std::max<int64_t>(1, kMinTaskEntries / (kColumnBlock * std::max<int64_t>(rows, 1)));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      fn(block * kColumnBlock, std::min(cols, (block + 1) * kColumnBlock));
    }
  });
}

inline const int64_t* labels_data(const at::Tensor& labels) {
  return labels.numel() > 0 ? labels.data_ptr<int64_t>() : nullptr;
}

// The row-wise inner products ⟨a_i, b_i⟩ of two [N, D] tensors in the accumulate type: the
// positives S_ii before any tile is seen, and AOQ's offline scores. O(N·D).
inline at::Tensor row_dots(const at::Tensor& a, const at::Tensor& b) { return (a * b).sum(1).contiguous(); }

// ------------------------------------------------------------------------------ dense losses

// Forward of a dense loss: returns the summed loss (rows' terms plus columns') and writes
// kSavedWidth values per row anchor (row_saved) and per column anchor (col_saved). a and b
// are [N, D] in the accumulate type T.
template <typename T, typename Policy>
T dense_forward(const at::Tensor& a, const at::Tensor& b, const int64_t* labels, const Policy& policy,
                int64_t row_chunk, int64_t col_chunk, T* row_saved, T* col_saved) {
  using State = typename Policy::State;
  const int64_t n = a.size(0);
  std::vector<State> row_state(n), col_state(n);
  std::vector<T> positive(n, T(0));
  if constexpr (Policy::kPositiveFirst) {
    std::copy_n(row_dots(a, b).data_ptr<T>(), n, positive.begin());
  }
  for_each_tile(a, b, row_chunk, col_chunk, [&](const at::Tensor& tile, int64_t r0, int64_t c0) {
    const T* scores = tile.data_ptr<T>();
    const int64_t rows = tile.size(0), cols = tile.size(1);
    for_each_row(rows, cols, [&](int64_t r) {
      const int64_t i = r0 + r;
      const T* row = scores + r * cols;
      if constexpr (!Policy::kPositiveFirst) {
        if (i >= c0 && i < c0 + cols) positive[i] = row[i - c0];
      }
      // States are worked on in locals: the compiler cannot keep them in registers while
      // they might alias the tile.
      State state = row_state[i];
      const T p = positive[i];
      for (int64_t j = 0; j < cols; ++j) {
        if (is_negative(labels, i, c0 + j)) policy.add(state, row[j], p);
      }
      row_state[i] = state;
    });
    for_each_column_block(rows, cols, [&](int64_t j0, int64_t j1) {
      const int64_t width = j1 - j0;
      State state[kColumnBlock];
      T p[kColumnBlock];
      std::copy_n(col_state.begin() + c0 + j0, width, state);
      std::copy_n(positive.begin() + c0 + j0, width, p);
      for (int64_t r = 0; r < rows; ++r) {
        const T* row = scores + r * cols + j0;
        for (int64_t u = 0; u < width; ++u) {
          if (is_negative(labels, c0 + j0 + u, r0 + r)) policy.add(state[u], row[u], p[u]);
        }
      }
      std::copy_n(state, width, col_state.begin() + c0 + j0);
    });
  });
  // The N anchor terms are summed in double (float32 terms of a large batch would lose digits).
  double row_total = 0, col_total = 0;
  for (int64_t i = 0; i < n; ++i) row_total += policy.finish(row_state[i], positive[i], row_saved + kSavedWidth * i);
  for (int64_t j = 0; j < n; ++j) col_total += policy.finish(col_state[j], positive[j], col_saved + kSavedWidth * j);
  return static_cast<T>(row_total + col_total);
}

// Backward of a dense loss: recomputes each tile S_c, turns it into G_c = grad·∂L/∂S_c in
// place from the saved row and column values, then dA_c = G_c·B_c and dB_c += G_cᵀ·A_c (two
// GEMMs per tile, accumulated tile after tile in a fixed order). Returns (dA, dB) in T.
template <typename T, typename Policy>
std::tuple<at::Tensor, at::Tensor> dense_backward(T grad, const at::Tensor& a, const at::Tensor& b,
                                                  const int64_t* labels, const Policy& policy,
                                                  int64_t row_chunk, int64_t col_chunk,
                                                  const T* row_saved, const T* col_saved) {
  auto da = at::zeros_like(a), db = at::zeros_like(b);
  for_each_tile(a, b, row_chunk, col_chunk, [&](const at::Tensor& tile, int64_t r0, int64_t c0) {
    T* scores = tile.data_ptr<T>();
    const int64_t rows = tile.size(0), cols = tile.size(1);
    for_each_row(rows, cols, [&](int64_t r) {
      const int64_t i = r0 + r;
      const T* own = row_saved + kSavedWidth * i;
      T* row = scores + r * cols;
      for (int64_t j = 0; j < cols; ++j) {
        const int64_t key = c0 + j;
        T w = T(0);
        if (is_negative(labels, i, key)) {
          w = policy.weight(row[j], own) + policy.weight(row[j], col_saved + kSavedWidth * key);
        } else if (key == i) {
          w = policy.diagonal(own) + policy.diagonal(col_saved + kSavedWidth * i);
        }
        row[j] = grad * w;
      }
    });
    da.narrow(0, r0, rows).addmm_(tile, b.narrow(0, c0, cols));
    db.narrow(0, c0, cols).addmm_(tile.t(), a.narrow(0, r0, rows));
  });
  return {da, db};
}

// -------------------------------------------------------------------- mined (sparse) losses

// Lists of hardest negatives: per row anchor i and per column anchor j the k best valid
// negatives (values best first, empty slots index −1; order of common/topk.h), merged tile
// after tile, and the positives S_ii, read from the tiles.
struct MinedLists {
  at::Tensor row_values, row_indices, col_values, col_indices, positive;
};

// A per-anchor reduction that mine_negatives folds every valid negative into, in the same
// sweep as its lists (e.g. GOAL's relative-similarity sets, common/goal.h):
//   State                     an anchor's running state
//   kActive                   false compiles the reduction out (NoReduction)
//   add(state, S_ij)          folds in one valid negative
// Like the dense policies' states, each row's and column's state sees its entries in
// increasing index, so the result does not depend on the tiling or the thread count.
struct NoReduction {
  struct State {};
  static constexpr bool kActive = false;
  template <typename T>
  void add(State& /*state*/, T /*score*/) const {}
};

template <typename T, typename Reduction = NoReduction>
MinedLists mine_negatives(const at::Tensor& a, const at::Tensor& b, const int64_t* labels, int64_t k,
                          int64_t row_chunk, int64_t col_chunk, const Reduction& reduction = {},
                          typename Reduction::State* row_state = nullptr,
                          typename Reduction::State* col_state = nullptr) {
  using State = typename Reduction::State;
  const int64_t n = a.size(0);
  const auto values_options = a.options();
  const auto index_options = a.options().dtype(at::kLong);
  MinedLists lists{at::zeros({n, k}, values_options), at::full({n, k}, -1, index_options),
                   at::zeros({n, k}, values_options), at::full({n, k}, -1, index_options),
                   at::zeros({n}, values_options)};
  T* row_values = lists.row_values.data_ptr<T>();
  int64_t* row_indices = lists.row_indices.data_ptr<int64_t>();
  T* col_values = lists.col_values.data_ptr<T>();
  int64_t* col_indices = lists.col_indices.data_ptr<int64_t>();
  T* positive = lists.positive.data_ptr<T>();
  for_each_tile(a, b, row_chunk, col_chunk, [&](const at::Tensor& tile, int64_t r0, int64_t c0) {
    const T* scores = tile.data_ptr<T>();
    const int64_t rows = tile.size(0), cols = tile.size(1);
    for_each_row(rows, cols, [&](int64_t r) {
      const int64_t i = r0 + r;
      const T* row = scores + r * cols;
      if (i >= c0 && i < c0 + cols) positive[i] = row[i - c0];
      TopkMerge<T>& list = thread_merges<T>(1)[0];
      list.load(row_values + i * k, row_indices + i * k, k);
      merge_row(list, row, cols, c0, [&](int64_t key) { return !is_negative(labels, i, key); });
      list.store(row_values + i * k, row_indices + i * k);
      if constexpr (Reduction::kActive) {
        State state = row_state[i];
        for (int64_t j = 0; j < cols; ++j) {
          if (is_negative(labels, i, c0 + j)) reduction.add(state, row[j]);
        }
        row_state[i] = state;
      }
    });
    for_each_column_block(rows, cols, [&](int64_t j0, int64_t j1) {
      const int64_t width = j1 - j0;
      if constexpr (Reduction::kActive) {
        State state[kColumnBlock];
        std::copy_n(col_state + c0 + j0, width, state);
        for (int64_t r = 0; r < rows; ++r) {
          const T* row = scores + r * cols + j0;
          for (int64_t u = 0; u < width; ++u) {
            if (is_negative(labels, c0 + j0 + u, r0 + r)) reduction.add(state[u], row[u]);
          }
        }
        std::copy_n(state, width, col_state + c0 + j0);
      }
      // The block's lists, fed row by row; rows in which no value can enter any of them are
      // skipped after one vectorizable comparison against the lists' thresholds.
      std::vector<TopkMerge<T>>& lists = thread_merges<T>(kColumnBlock);
      T threshold[kColumnBlock];
      for (int64_t u = 0; u < width; ++u) {
        const int64_t anchor = c0 + j0 + u;
        lists[u].load(col_values + anchor * k, col_indices + anchor * k, k);
        threshold[u] = lists[u].threshold();
      }
      for (int64_t r = 0; r < rows; ++r) {
        const T* row = scores + r * cols + j0;
        bool any = false;
        for (int64_t u = 0; u < width; ++u) any |= !(row[u] <= threshold[u]);
        if (!any) continue;
        const int64_t query = r0 + r;
        for (int64_t u = 0; u < width; ++u) {
          if (!is_negative(labels, c0 + j0 + u, query)) continue;
          lists[u].offer(row[u], query);
          threshold[u] = lists[u].threshold();
        }
      }
      for (int64_t u = 0; u < width; ++u) {
        const int64_t anchor = c0 + j0 + u;
        lists[u].store(col_values + anchor * k, col_indices + anchor * k);
      }
    });
  });
  return lists;
}

// dA = G·B and dB = Gᵀ·A, times grad, for the sparse G of a mined loss:
//   G[i, row_index[i,s]] += row_weight[i,s]   (row anchor i's listed negatives)
//   G[col_index[j,s], j] += col_weight[j,s]   (column anchor j's listed negatives)
//   G[i, i]              += diagonal[i]
// Slots with index −1 or weight 0 are skipped. Entries are grouped by output row (a stable
// counting sort) and each output row sums its entries in a fixed order: O(N·k·D), no GEMM,
// no atomics. a, b: [N, D]; index [N, k] int64; weights and diagonal in a's dtype (float or
// double). Returns (dA, dB) in that dtype.
std::tuple<at::Tensor, at::Tensor> sparse_backward(const at::Tensor& grad, const at::Tensor& a,
                                                   const at::Tensor& b, const at::Tensor& row_index,
                                                   const at::Tensor& row_weight,
                                                   const at::Tensor& col_index,
                                                   const at::Tensor& col_weight,
                                                   const at::Tensor& diagonal);

}  // namespace vse::cpu
