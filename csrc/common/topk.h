#pragma once
// The candidate order of every top-k in the project (topk_similar, mining, top-k losses):
//   larger value first; NaN above every number (as torch.sort(descending=True)), so NaN in
//   the data surfaces instead of hiding; equal values by lower index; empty slots
//   (index < 0) after everything. It is a strict total order on distinct indices, so every
//   backend, whatever order it visits candidates in, returns the same list.
#include <cstdint>

#include "common/macros.h"

namespace vse {

template <typename T>
VSE_HOST_DEVICE bool is_nan(T x) {
  return x != x;
}

template <typename T, typename Index>
VSE_HOST_DEVICE bool ranks_before(T a, Index a_index, T b, Index b_index) {
  if (b_index < 0) return a_index >= 0;
  if (a_index < 0) return false;
  const bool a_nan = is_nan(a), b_nan = is_nan(b);
  if (a_nan != b_nan) return a_nan;
  if (!a_nan && a != b) return a > b;
  return a_index < b_index;
}

// Candidates are visited in increasing key index, so one enters a full list only when it is
// strictly better than the list's last value (an equal value has the larger index and loses).
template <typename T>
VSE_HOST_DEVICE bool beats_last(T value, T last) {
  return value > last || (is_nan(value) && !is_nan(last));
}

// Keys sharing the query's label are never candidates (false-negative masking).
VSE_HOST_DEVICE bool excluded_by_label(const int64_t* query_labels, const int64_t* key_labels,
                                       int64_t query, int64_t key) {
  return query_labels != nullptr && query_labels[query] == key_labels[key];
}

}  // namespace vse
