#pragma once
// Host-side driver of the chunked engine (DESIGN §3), shared by the CPU and CUDA launchers:
// visits S = queries·keysᵀ tile by tile, each tile from one GEMM (at::mm on the tensors'
// device: MKL on CPU, cuBLAS on GPU), so no more than row_chunk × col_chunk of S exists.
// Tiles are visited row chunk by row chunk, columns left to right (increasing key index).
#include <ATen/ATen.h>

#include <algorithm>

namespace vse {

// The type of the engine's scores, states and gradients: float32 for half inputs, so that
// rankings, log-sum-exps and sums see float32 values; float64 stays float64.
inline at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline at::TensorOptions accumulate_options(const at::Tensor& x) {
  return x.options().dtype(accumulate_type(x.scalar_type()));
}

// The type in which the tile GEMMs multiply x: its own for bf16 and fp16 on CUDA, where
// cuBLAS has a half GEMM that accumulates and writes float32 at tensor-core speed
// (aten::mm.dtype); the accumulate type otherwise. On CPU, torch 2.14 has no such GEMM: its
// fast bf16 GEMM (oneDNN) writes bf16, which would rank bf16-rounded scores, and MKL's
// bf16·bf16→float32 GEMM runs at the float32 rate on AVX512-BF16 (measured, issue 13), so
// half inputs are widened once and multiplied in float32 there.
inline at::ScalarType operand_type(const at::Tensor& x) {
  const auto t = x.scalar_type();
  const bool half = t == at::kBFloat16 || t == at::kHalf;
  return half && x.is_cuda() ? t : accumulate_type(t);
}

// x, contiguous, in its operand type (no copy when it is already).
inline at::Tensor as_operand(const at::Tensor& x) { return x.to(operand_type(x)).contiguous(); }

// out = x·y in out's (accumulate) type for operands of one operand type: the tensors' own
// GEMM, or for half operands one half GEMM with float32 accumulation that writes float32.
inline void tile_product(at::Tensor& out, const at::Tensor& x, const at::Tensor& y) {
  if (x.scalar_type() == out.scalar_type()) {
    at::mm_out(out, x, y);
  } else {
    at::mm_out(out, x, y, out.scalar_type());
  }
}

// out += x·y in out's type, as tile_product (the dense backward's two GEMMs per tile).
inline void add_product(const at::Tensor& out, const at::Tensor& x, const at::Tensor& y) {
  if (x.scalar_type() == out.scalar_type()) {
    out.addmm_(x, y);
  } else {
    out.add_(at::mm(x, y, out.scalar_type()));
  }
}

// How a sweep cuts S. kPlain: row chunks of row_chunk rows and column tiles of col_chunk
// keys, the last ones ragged, each GEMM of its tile's own shape. kCanonical: every GEMM of the
// sweep has one shape h × w (the chunks balanced, h ≤ row_chunk, w ≤ col_chunk; a ragged last
// chunk is zero-padded up to it), so that an entry's value depends on its two inputs only, as
// in one GEMM of the whole S: an image or caption that repeats another scores bitwise what the
// original scores, in whatever tile each lies (GEMM kernels round differently for different
// shapes). The losses that compare entries with their anchors' positives sweep this way.
enum class Tiling { kPlain, kCanonical };

// Which tiles of a sweep on_tile sees: all, or only those holding an entry of the diagonal
// key = query + diagonal_offset (the positives S_ii of a square S; same GEMMs, same values).
enum class TileSelection { kAll, kDiagonal };

struct TilePlan {
  int64_t row_chunk;
  int64_t col_chunk;
  Tiling tiling = Tiling::kPlain;
  TileSelection selection = TileSelection::kAll;
  int64_t diagonal_offset = 0;
};

namespace detail {

// The size of each of the fewest chunks of at most `chunk` that cover `n` (n, chunk >= 1).
inline int64_t balanced_chunk(int64_t n, int64_t chunk) {
  const int64_t count = (n + chunk - 1) / chunk;
  return (n + count - 1) / count;
}

// x[begin : begin + size] as a [size, D] tensor, zero rows appended after the `available`
// ones when the chunk is ragged.
inline at::Tensor padded_rows(const at::Tensor& x, int64_t begin, int64_t size) {
  const int64_t available = std::min(size, x.size(0) - begin);
  const auto rows = x.narrow(0, begin, available);
  if (available == size) return rows;
  auto out = at::zeros({size, x.size(1)}, rows.options());
  out.narrow(0, 0, available).copy_(rows);
  return out;
}

}  // namespace detail

// on_tile(tile, r0, c0) gets the rows × cols tile S[r0 : r0+rows, c0 : c0+cols], contiguous,
// in the accumulate type; it may overwrite it (the dense losses turn it into ∂L/∂S in place).
// queries and keys are [n, D] and [m, D] in one operand type (as_operand), multiplied by
// tile_product. Every tile lives in one buffer, so the allocator is not asked for (and the OS
// does not fault in) a fresh C×M block per GEMM.
// A tile's values depend on the plan's chunks and tiling only, not on its selection.
template <typename TileFn>
void for_each_tile(const at::Tensor& queries, const at::Tensor& keys, const TilePlan& plan, TileFn&& on_tile) {
  const int64_t n = queries.size(0), m = keys.size(0);
  if (n == 0 || m == 0) return;
  const bool canonical = plan.tiling == Tiling::kCanonical;
  const int64_t h = canonical ? detail::balanced_chunk(n, plan.row_chunk) : std::min(plan.row_chunk, n);
  const int64_t w = canonical ? detail::balanced_chunk(m, plan.col_chunk) : std::min(plan.col_chunk, m);
  auto buffer = at::empty({h * w}, accumulate_options(queries));
  for (int64_t r0 = 0; r0 < n; r0 += h) {
    const int64_t rows_n = std::min(h, n - r0);
    const auto rows = canonical ? detail::padded_rows(queries, r0, h) : queries.narrow(0, r0, rows_n);
    for (int64_t c0 = 0; c0 < m; c0 += w) {
      const int64_t cols_n = std::min(w, m - c0);
      if (plan.selection == TileSelection::kDiagonal &&
          (c0 >= r0 + rows_n + plan.diagonal_offset || c0 + cols_n <= r0 + plan.diagonal_offset)) {
        continue;
      }
      const auto cols = canonical ? detail::padded_rows(keys, c0, w) : keys.narrow(0, c0, cols_n);
      auto full = buffer.narrow(0, 0, rows.size(0) * cols.size(0)).view({rows.size(0), cols.size(0)});
      tile_product(full, rows, cols.t());
      // A padded GEMM's real entries, contiguous (a copy only for a ragged tile).
      const auto tile = rows.size(0) == rows_n && cols.size(0) == cols_n
                            ? full
                            : full.narrow(0, 0, rows_n).narrow(1, 0, cols_n).contiguous();
      on_tile(tile, r0, c0);
    }
  }
}

template <typename TileFn>
void for_each_tile(const at::Tensor& queries, const at::Tensor& keys, int64_t row_chunk, int64_t col_chunk,
                   TileFn&& on_tile) {
  for_each_tile(queries, keys, TilePlan{row_chunk, col_chunk}, on_tile);
}

}  // namespace vse
