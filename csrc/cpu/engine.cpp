// The sparse half of the CPU loss engine (cpu/engine.h): the backward of mined losses.
#include "cpu/engine.h"

#include <ATen/Dispatch.h>

namespace vse::cpu {
namespace {

// Entries of G, grouped by the output row they feed (CSR): entry e of group g is
// (source[e], weight[e]) with offset[g] <= e < offset[g + 1], in increasing (list, slot) order.
template <typename T>
struct Groups {
  std::vector<int64_t> offset, source;
  std::vector<T> weight;
};

// Groups the slots (anchor, s) of [n, k] lists by their listed index: a stable counting sort.
template <typename T>
Groups<T> group_by_index(const int64_t* index, const T* weight, int64_t n, int64_t k) {
  Groups<T> groups;
  groups.offset.assign(n + 1, 0);
  for (int64_t e = 0; e < n * k; ++e) {
    if (index[e] >= 0 && weight[e] != T(0)) ++groups.offset[index[e] + 1];
  }
  for (int64_t g = 0; g < n; ++g) groups.offset[g + 1] += groups.offset[g];
  groups.source.resize(groups.offset[n]);
  groups.weight.resize(groups.offset[n]);
  std::vector<int64_t> next(groups.offset.begin(), groups.offset.end() - 1);
  for (int64_t e = 0; e < n * k; ++e) {
    if (index[e] >= 0 && weight[e] != T(0)) {
      const int64_t at = next[index[e]]++;
      groups.source[at] = e / k;
      groups.weight[at] = weight[e];
    }
  }
  return groups;
}

template <typename T>
void axpy(T w, const T* x, T* y, int64_t d) {
  for (int64_t c = 0; c < d; ++c) y[c] += w * x[c];
}

// out_i = grad · (diagonal_i · other_i + Σ_s own_weight[i,s] · other[own_index[i,s]]
//                 + Σ_{(j, w) in gathered group i} w · other_j)
template <typename T>
void gather_rows(T grad, const T* other, int64_t n, int64_t d, const int64_t* own_index, const T* own_weight,
                 int64_t k, const Groups<T>& gathered, const T* diagonal, T* out) {
  const int64_t grain = std::max<int64_t>(1, 16384 / (d * (k + 2)));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* y = out + i * d;
      axpy(diagonal[i], other + i * d, y, d);
      for (int64_t s = 0; s < k; ++s) {
        const int64_t j = own_index[i * k + s];
        const T w = own_weight[i * k + s];
        if (j >= 0 && w != T(0)) axpy(w, other + j * d, y, d);
      }
      for (int64_t e = gathered.offset[i]; e < gathered.offset[i + 1]; ++e) {
        axpy(gathered.weight[e], other + gathered.source[e] * d, y, d);
      }
      for (int64_t c = 0; c < d; ++c) y[c] *= grad;
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sparse_backward(const at::Tensor& grad, const at::Tensor& a,
                                                   const at::Tensor& b, const at::Tensor& row_index,
                                                   const at::Tensor& row_weight,
                                                   const at::Tensor& col_index,
                                                   const at::Tensor& col_weight,
                                                   const at::Tensor& diagonal) {
  const auto a_ = a.contiguous(), b_ = b.contiguous();
  const auto ri = row_index.contiguous(), ci = col_index.contiguous();
  const auto rw = row_weight.contiguous(), cw = col_weight.contiguous(), dg = diagonal.contiguous();
  const int64_t n = a.size(0), d = a.size(1), k = row_index.size(1);
  TORCH_CHECK(col_index.size(1) == k, "sparse_backward: row and column lists differ in width");
  auto da = at::zeros_like(a_), db = at::zeros_like(b_);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "sparse_backward_cpu", [&] {
    const scalar_t g = grad.item<scalar_t>();
    const int64_t* ri_ = ri.data_ptr<int64_t>();
    const int64_t* ci_ = ci.data_ptr<int64_t>();
    const scalar_t* rw_ = rw.data_ptr<scalar_t>();
    const scalar_t* cw_ = cw.data_ptr<scalar_t>();
    // dA_i gathers B over row i of G: its own list, and the column lists that name row i.
    const auto by_row = group_by_index(ci_, cw_, n, k);
    // dB_j gathers A over column j of G: its own list, and the row lists that name column j.
    const auto by_col = group_by_index(ri_, rw_, n, k);
    gather_rows(g, b_.data_ptr<scalar_t>(), n, d, ri_, rw_, k, by_row, dg.data_ptr<scalar_t>(),
                da.data_ptr<scalar_t>());
    gather_rows(g, a_.data_ptr<scalar_t>(), n, d, ci_, cw_, k, by_col, dg.data_ptr<scalar_t>(),
                db.data_ptr<scalar_t>());
  });
  return {da, db};
}

}  // namespace vse::cpu
