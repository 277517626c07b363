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

// on_tile(tile, r0, c0) gets the rows × cols tile S[r0 : r0+rows, c0 : c0+cols], contiguous,
// in the accumulate type; it may overwrite it (the dense losses turn it into ∂L/∂S in place).
// Every tile lives in one buffer, so the allocator is not asked for (and the OS does not
// fault in) a fresh C×M block per GEMM. Inputs already in the accumulate type are not copied.
template <typename TileFn>
void for_each_tile(const at::Tensor& queries, const at::Tensor& keys, int64_t row_chunk,
                   int64_t col_chunk, TileFn&& on_tile) {
  const auto acc = accumulate_type(queries.scalar_type());
  const int64_t n = queries.size(0), m = keys.size(0);
  auto buffer = at::empty({std::min(row_chunk, n) * std::min(col_chunk, m)}, queries.options().dtype(acc));
  for (int64_t r0 = 0; r0 < n; r0 += row_chunk) {
    const auto rows = queries.narrow(0, r0, std::min(row_chunk, n - r0)).to(acc);
    for (int64_t c0 = 0; c0 < m; c0 += col_chunk) {
      const auto cols = keys.narrow(0, c0, std::min(col_chunk, m - c0)).to(acc);
      auto tile = buffer.narrow(0, 0, rows.size(0) * cols.size(0)).view({rows.size(0), cols.size(0)});
      at::mm_out(tile, rows, cols.t());
      on_tile(tile, r0, c0);
    }
  }
}

}  // namespace vse
