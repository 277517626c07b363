#pragma once
// The CPU backend of the chunked loss engine (DESIGN §3; the host orchestration, shared with
// CUDA, is common/engine_driver.h): loops only. Each tile of S is swept twice in row-major
// order, once into per-row state or lists (rows in parallel), once into per-column state or
// lists (blocks of columns in parallel). Every row's and column's state sees its entries in
// increasing index, so the results do not depend on the thread count and no two threads
// write the same state: no atomics, bitwise reproducible. The math of each loss is a policy
// in common/<loss>.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/engine_math.h"
#include "common/engine_driver.h"
#include "cpu/topk.h"

namespace vse::cpu {

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

// Anchors per task of for_each_anchor: a per-anchor functor does O(1) to O(log N) work.
constexpr int64_t kAnchorGrain = 2048;

// The per-tile passes of common/engine_driver.h on CPU tensors.
struct Engine {
  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };

  template <typename Fn>
  static void for_each_anchor(int64_t n, const Fn& fn) {
    at::parallel_for(0, n, kAnchorGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) fn(i);
    });
  }

  // A policy without a State (a gradient-only one, common/unified.h LabelPositivesPolicy) uses
  // only gradient(), so State is named inside the passes that fold.
  template <typename T, typename Policy>
  struct Dense {
    static void rows(const Policy& policy, const at::Tensor& tile, int64_t r0, int64_t c0, const int64_t* labels,
                     const at::Tensor& positive, const at::Tensor& row_state) {
      using State = typename Policy::State;
      const T* scores = tile.data_ptr<T>();
      const T* positives = positive.data_ptr<T>();
      State* states = reinterpret_cast<State*>(row_state.data_ptr<T>());
      const int64_t cols = tile.size(1);
      for_each_row(tile.size(0), cols, [&](int64_t r) {
        const int64_t i = r0 + r;
        const T* row = scores + r * cols;
        // States are worked on in locals: the compiler cannot keep them in registers while
        // they might alias the tile.
        State state = states[i];
        const T p = positives[i];
        for (int64_t j = 0; j < cols; ++j) {
          fold_entry(policy, state, labels, i, c0 + j, row[j], p);
        }
        states[i] = state;
      });
    }

    static void columns(const Policy& policy, const at::Tensor& tile, int64_t r0, int64_t c0, const int64_t* labels,
                        const at::Tensor& positive, const at::Tensor& col_state) {
      using State = typename Policy::State;
      const T* scores = tile.data_ptr<T>();
      const T* positives = positive.data_ptr<T>();
      State* states = reinterpret_cast<State*>(col_state.data_ptr<T>());
      const int64_t rows = tile.size(0), cols = tile.size(1);
      for_each_column_block(rows, cols, [&](int64_t j0, int64_t j1) {
        const int64_t width = j1 - j0;
        State state[kColumnBlock];
        T p[kColumnBlock];
        std::copy_n(states + c0 + j0, width, state);
        std::copy_n(positives + c0 + j0, width, p);
        for (int64_t r = 0; r < rows; ++r) {
          const T* row = scores + r * cols + j0;
          for (int64_t u = 0; u < width; ++u) {
            fold_entry(policy, state[u], labels, c0 + j0 + u, r0 + r, row[u], p[u]);
          }
        }
        std::copy_n(state, width, states + c0 + j0);
      });
    }

    static void finish(const Policy& policy, const at::Tensor& state, const at::Tensor& positive,
                       const at::Tensor& terms, const at::Tensor& saved) {
      using State = typename Policy::State;
      const State* states = reinterpret_cast<const State*>(state.data_ptr<T>());
      const T* positives = positive.data_ptr<T>();
      T* term = terms.data_ptr<T>();
      T* out = saved.data_ptr<T>();
      for (int64_t i = 0; i < state.size(0); ++i) term[i] = policy.finish(states[i], positives[i], out + Policy::kSavedWidth * i);
    }

    static void gradient(const Policy& policy, const at::Tensor& grad, const at::Tensor& tile, int64_t r0, int64_t c0,
                         const int64_t* labels, const at::Tensor& row_saved, const at::Tensor& col_saved,
                         int directions) {
      const T g = *grad.data_ptr<T>();
      T* scores = tile.data_ptr<T>();
      const T* own = row_saved.data_ptr<T>();
      const T* other = col_saved.data_ptr<T>();
      const int64_t cols = tile.size(1);
      for_each_row(tile.size(0), cols, [&](int64_t r) {
        T* row = scores + r * cols;
        for (int64_t j = 0; j < cols; ++j) {
          row[j] = g * dense_entry_gradient(policy, labels, r0 + r, c0 + j, row[j], own, other, directions);
        }
      });
    }
  };

  template <typename T>
  struct Mined {
    static void rows(const at::Tensor& tile, int64_t r0, int64_t c0, const int64_t* labels, const at::Tensor& values,
                     const at::Tensor& indices) {
      const T* scores = tile.data_ptr<T>();
      T* list_values = values.data_ptr<T>();
      int64_t* list_indices = indices.data_ptr<int64_t>();
      const int64_t cols = tile.size(1), k = values.size(1);
      for_each_row(tile.size(0), cols, [&](int64_t r) {
        const int64_t i = r0 + r;
        TopkMerge<T>& list = thread_merges<T>(1)[0];
        list.load(list_values + i * k, list_indices + i * k, k);
        merge_row(list, scores + r * cols, cols, c0, [&](int64_t key) { return !is_negative(labels, i, key); });
        list.store(list_values + i * k, list_indices + i * k);
      });
    }

    static void columns(const at::Tensor& tile, int64_t r0, int64_t c0, const int64_t* labels,
                        const at::Tensor& values, const at::Tensor& indices) {
      const T* scores = tile.data_ptr<T>();
      T* list_values = values.data_ptr<T>();
      int64_t* list_indices = indices.data_ptr<int64_t>();
      const int64_t rows = tile.size(0), cols = tile.size(1), k = values.size(1);
      for_each_column_block(rows, cols, [&](int64_t j0, int64_t j1) {
        // The block's lists, fed row by row; rows in which no value can enter any of them are
        // skipped after one vectorizable comparison against the lists' thresholds.
        std::vector<TopkMerge<T>>& lists = thread_merges<T>(kColumnBlock);
        const int64_t width = j1 - j0;
        T threshold[kColumnBlock];
        for (int64_t u = 0; u < width; ++u) {
          const int64_t anchor = c0 + j0 + u;
          lists[u].load(list_values + anchor * k, list_indices + anchor * k, k);
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
          lists[u].store(list_values + anchor * k, list_indices + anchor * k);
        }
      });
    }

    static void hinge_terms(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& positive, T margin,
                            const at::Tensor& weights, const at::Tensor& terms) {
      const T* v = values.data_ptr<T>();
      const int64_t* idx = indices.data_ptr<int64_t>();
      const T* positives = positive.data_ptr<T>();
      T* w = weights.data_ptr<T>();
      T* term = terms.data_ptr<T>();
      const int64_t k = values.size(1);
      for (int64_t i = 0; i < values.size(0); ++i) {
        term[i] = mined_hinge_term(v + i * k, idx + i * k, k, positives[i], margin, w + i * k);
      }
    }

    static void gather(const at::Tensor& grad, const at::Tensor& other, const at::Tensor& own_index,
                       const at::Tensor& own_weight, const Groups& groups, const at::Tensor& diagonal,
                       const at::Tensor& out) {
      const T g = *grad.data_ptr<T>();
      const T* x = other.data_ptr<T>();
      const int64_t* index = own_index.data_ptr<int64_t>();
      const T* weight = own_weight.data_ptr<T>();
      const int64_t* offset = groups.offset.data_ptr<int64_t>();
      const int64_t* source = groups.source.data_ptr<int64_t>();
      const T* gathered = groups.weight.data_ptr<T>();
      const T* diag = diagonal.data_ptr<T>();
      T* y_all = out.data_ptr<T>();
      const int64_t n = other.size(0), d = other.size(1), k = own_index.size(1);
      const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(d * (k + 2), 1));
      at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          T* y = y_all + i * d;
          std::fill_n(y, d, T(0));
          axpy(diag[i], x + i * d, y, d);
          for (int64_t s = 0; s < k; ++s) {
            const int64_t j = index[i * k + s];
            const T w = weight[i * k + s];
            if (j >= 0 && w != T(0)) axpy(w, x + j * d, y, d);
          }
          for (int64_t e = offset[i]; e < offset[i + 1]; ++e) axpy(gathered[e], x + source[e] * d, y, d);
          for (int64_t c = 0; c < d; ++c) y[c] *= g;
        }
      });
    }

   private:
    static void axpy(T w, const T* x, T* y, int64_t d) {
      for (int64_t c = 0; c < d; ++c) y[c] += w * x[c];
    }
  };
};

}  // namespace vse::cpu
