#pragma once
// The CPU running top-k list, in the candidate order of common/topk.h. topk_similar merges
// tile rows into it; the losses' hard-negative mining merges tile rows (i2t anchors) and
// tile columns (t2i anchors, a strided walk down the column) into it.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/topk.h"

namespace vse::cpu {

template <typename T>
struct Candidate {
  T value;
  int64_t index;
};

template <typename T>
bool better(const Candidate<T>& a, const Candidate<T>& b) {
  return ranks_before(a.value, a.index, b.value, b.index);
}

// Merges `count` candidates, values scores[0], scores[stride], scores[2·stride], … with
// indices index0, index0 + 1, … (so visited in increasing index), into a sorted top-k list
// (k slots, best first, empty slots with index -1). Candidates with excluded(index) are
// skipped. Candidates that beat the list's last entry are buffered; when the buffer holds
// 2k, nth_element keeps the best k, so a call costs O(count) plus O(k) per k insertions.
template <typename T, typename Excluded>
void merge_candidates(const T* scores, int64_t count, int64_t stride, int64_t index0,
                      Excluded&& excluded, T* list_values, int64_t* list_indices, int64_t k,
                      std::vector<Candidate<T>>& buffer) {
  buffer.clear();
  for (int64_t s = 0; s < k && list_indices[s] >= 0; ++s) buffer.push_back({list_values[s], list_indices[s]});
  bool full = static_cast<int64_t>(buffer.size()) == k;
  T last = full ? buffer.back().value : T(0);
  for (int64_t c = 0; c < count; ++c) {
    const int64_t index = index0 + c;
    if (excluded(index)) continue;
    const T value = scores[c * stride];
    if (full && !beats_last(value, last)) continue;
    buffer.push_back({value, index});
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

}  // namespace vse::cpu
