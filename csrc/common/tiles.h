#pragma once
// Host-side driver of the chunked engine (DESIGN §3), shared by the CPU and CUDA launchers:
// visits S = queries·keysᵀ tile by tile, each tile from one GEMM (at::mm on the tensors'
// device: MKL on CPU, cuBLAS on GPU), so no more than row_chunk × col_chunk of S exists.
// Tiles are visited row chunk by row chunk, columns left to right (increasing key index).
#include <ATen/ATen.h>

#include <algorithm>

namespace vse {

// Half types are multiplied in float32 so rankings are not decided by rounding to 8 or 11
// mantissa bits; float64 stays float64.
inline at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename TileFn>
void for_each_tile(const at::Tensor& queries, const at::Tensor& keys, int64_t row_chunk,
                   int64_t col_chunk, TileFn&& on_tile) {
  const auto acc = accumulate_type(queries.scalar_type());
  const int64_t n = queries.size(0), m = keys.size(0);
  for (int64_t r0 = 0; r0 < n; r0 += row_chunk) {
    const auto rows = queries.narrow(0, r0, std::min(row_chunk, n - r0)).to(acc);
    for (int64_t c0 = 0; c0 < m; c0 += col_chunk) {
      const auto cols = keys.narrow(0, c0, std::min(col_chunk, m - c0)).to(acc);
      on_tile(at::mm(rows, cols.t()), r0, c0);
    }
  }
}

}  // namespace vse
