#pragma once
// The CPU running top-k list, in the candidate order of common/topk.h. topk_similar merges
// tile rows into it; the losses' hard-negative mining merges tile rows (i2t anchors) and
// tile columns (t2i anchors) into it.
#include <algorithm>
#include <cstdint>
#include <limits>
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

// One list (k slots, best first, empty slots with index -1) opened for merging: load() it,
// offer() candidates in increasing index, store() it back. Candidates that beat the list's
// last entry are buffered; when the buffer holds 2k, nth_element keeps the best k, so a
// merge costs O(candidates) plus O(k) per k insertions.
template <typename T>
class TopkMerge {
 public:
  void load(const T* values, const int64_t* indices, int64_t k) {
    k_ = k;
    buffer_.clear();
    buffer_.reserve(2 * k);
    for (int64_t s = 0; s < k && indices[s] >= 0; ++s) buffer_.push_back({values[s], indices[s]});
    full_ = static_cast<int64_t>(buffer_.size()) == k;
    last_ = full_ ? buffer_.back().value : T(0);
  }

  // A value that a candidate must not be <= to stand a chance (NaN while the list has room,
  // so `!(value <= threshold())` is the cheap, vectorizable pre-test of offer()).
  T threshold() const { return full_ ? last_ : std::numeric_limits<T>::quiet_NaN(); }

  void offer(T value, int64_t index) {
    if (full_ && !beats_last(value, last_)) return;
    buffer_.push_back({value, index});
    if (static_cast<int64_t>(buffer_.size()) == 2 * k_) {
      std::nth_element(buffer_.begin(), buffer_.begin() + (k_ - 1), buffer_.end(), better<T>);
      buffer_.resize(k_);
      full_ = true;
      last_ = buffer_[k_ - 1].value;
    }
  }

  void store(T* values, int64_t* indices) {
    const int64_t kept = std::min<int64_t>(k_, buffer_.size());
    std::partial_sort(buffer_.begin(), buffer_.begin() + kept, buffer_.end(), better<T>);
    for (int64_t s = 0; s < kept; ++s) {
      values[s] = buffer_[s].value;
      indices[s] = buffer_[s].index;
    }
  }

 private:
  std::vector<Candidate<T>> buffer_;
  int64_t k_ = 0;
  bool full_ = false;
  T last_ = T(0);
};

// Candidates per pre-test block of merge_row: one AVX-512 register of float32.
constexpr int64_t kMergeBlock = 16;

// Merges one contiguous row of candidates (values scores[0 .. count), indices index0 + c)
// into an opened list, skipping excluded(index). Blocks in which no value can enter are
// skipped after one vectorizable comparison, so the typical row costs one read per value.
template <typename T, typename Excluded>
void merge_row(TopkMerge<T>& list, const T* scores, int64_t count, int64_t index0, const Excluded& excluded) {
  int64_t c = 0;
  for (; c + kMergeBlock <= count; c += kMergeBlock) {
    const T threshold = list.threshold();
    bool any = false;
    for (int64_t u = 0; u < kMergeBlock; ++u) any |= !(scores[c + u] <= threshold);
    if (!any) continue;
    for (int64_t u = 0; u < kMergeBlock; ++u) {
      if (!excluded(index0 + c + u)) list.offer(scores[c + u], index0 + c + u);
    }
  }
  for (; c < count; ++c) {
    if (!excluded(index0 + c)) list.offer(scores[c], index0 + c);
  }
}

// The calling thread's merge state(s): `count` reusable lists (buffers keep their memory).
template <typename T>
std::vector<TopkMerge<T>>& thread_merges(size_t count) {
  thread_local std::vector<TopkMerge<T>> merges;
  if (merges.size() < count) merges.resize(count);
  return merges;
}

}  // namespace vse::cpu
