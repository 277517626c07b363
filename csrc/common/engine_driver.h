#pragma once
// Host side of the chunked loss engine (DESIGN §3), shared by the CPU and CUDA backends: the
// order of the sweeps, the state and saved layouts, the mined lists and the grouping of the
// sparse gradient's entries by output row. Everything here is ATen on the tensors' device;
// a backend supplies only its per-tile passes as an `Engine` (cpu/engine_passes.h, cuda/engine_passes.h):
//
//   Engine::Guard(tensor)          keeps the tensor's device current for the op's duration
//   Engine::for_each_anchor(n, fn) fn(i) for every i < n, in parallel; fn is a small
//                                  VSE_HOST_DEVICE functor of common/ (raw device pointers)
//                                  that writes only what belongs to its i
//   Engine::Dense<T, Policy>       the passes of a dense policy (common/engine_math.h):
//     rows(policy, tile, r0, c0, labels, positive, row_state)
//         folds each tile row's valid negatives into its row anchor's state
//     columns(policy, tile, r0, c0, labels, positive, col_state)
//         folds each tile column's valid negatives into its column anchor's state
//         (these two use only State, add and merge: a per-anchor reduction over the valid
//         negatives, such as GOAL's NegativeSetPolicy, needs nothing else)
//     finish(policy, state, positive, terms, saved)
//         terms[i] = policy.finish(state[i], positive[i], saved[i])
//     gradient(policy, grad, tile, r0, c0, labels, row_saved, col_saved, directions)
//         tile := grad · dense_entry_gradient(..., directions), in place
//   Engine::Mined<T>               the passes of the mined (sparse-gradient) losses:
//     rows(tile, r0, c0, labels, values, indices)
//         merges each tile row's valid negatives into its row anchor's list (common/topk.h order)
//     columns(tile, r0, c0, labels, values, indices)
//         the same for each tile column and its column anchor
//     hinge_terms(values, indices, positive, margin, weights, terms)
//         terms[i] = mined_hinge_term(list i, positive[i], margin, weights[i])
//     gather(grad, other, own_index, own_weight, groups, diagonal, out)
//         out_i = grad·(diagonal_i·other_i + Σ_s own_weight[i,s]·other[own_index[i,s]]
//                       + Σ_{(j, w) in group i} w·other_j), terms in this order
//
// Tensors are contiguous on the backend's device: tiles [rows, cols] of S in T; states
// [N, sizeof(State) / sizeof(T)] in T, read as State[N]; positives [N]; saved [N, Policy::kSavedWidth];
// lists [N, k] (values T, indices int64, −1 = empty); grad 0-dim in T; labels a device pointer
// or nullptr. Each anchor's state or list sees its tiles in the order for_each_tile visits
// them, and each backend reduces a tile in a fixed order (no float atomics), so every result
// is bitwise reproducible on a backend; backends may differ from one another by rounding.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>

#include "common/engine_math.h"
#include "common/tiles.h"

namespace vse {

inline const int64_t* labels_data(const at::Tensor& labels) {
  return labels.numel() > 0 ? labels.data_ptr<int64_t>() : nullptr;
}

// The row-wise inner products ⟨a_i, b_i⟩ of two [N, D] tensors in the accumulate type, O(N·D):
// S_ii up to rounding (a different reduction than the tiles' GEMM), for values that are not
// compared with tile entries; the losses' positives come from the tiles (tile_positives).
inline at::Tensor row_dots(const at::Tensor& a, const at::Tensor& b) {
  const auto acc = accumulate_type(a.scalar_type());
  return (a.to(acc) * b.to(acc)).sum(1).contiguous();
}

// [n, W] states, each State{} (an empty state), as T on the device of `options` (filled
// column by column: no host-to-device copy, which would synchronize the stream).
template <typename T, typename State>
at::Tensor initial_states(int64_t n, const at::TensorOptions& options) {
  static_assert(std::is_trivially_copyable_v<State> && sizeof(State) % sizeof(T) == 0,
                "a state must be a plain aggregate of T");
  constexpr int64_t width = sizeof(State) / sizeof(T);
  const State empty{};
  T fields[width];
  std::memcpy(fields, &empty, sizeof(State));
  auto states = at::empty({n, width}, options);
  for (int64_t c = 0; c < width; ++c) states.select(1, c).fill_(fields[c]);
  return states;
}

// The [n, W] states of initial_states, read as State[n].
template <typename State, typename T>
State* state_data(const at::Tensor& states) {
  return reinterpret_cast<State*>(states.data_ptr<T>());
}

// Copies the positives S_ii lying in the tile S[r0 : r0+rows, c0 : c0+cols] into positive.
inline void copy_positives(const at::Tensor& tile, int64_t r0, int64_t c0, const at::Tensor& positive) {
  const int64_t lo = std::max(r0, c0), hi = std::min(r0 + tile.size(0), c0 + tile.size(1));
  if (lo >= hi) return;
  positive.narrow(0, lo, hi - lo).copy_(tile.narrow(0, lo - r0, hi - lo).narrow(1, lo - c0, hi - lo).diagonal());
}

// The loss from the anchors' terms: summed in double (float32 terms of a large batch would
// lose digits), returned 0-dim in the terms' dtype.
inline at::Tensor sum_terms(const at::Tensor& terms) {
  return terms.to(at::kDouble).sum().to(terms.scalar_type());
}

// The pairs whose anchors an op accounts for: rows and columns [begin, end) of the square S.
// One process: all N. A rank of a group (vse_cuda.distributed): its own pairs inside the
// gathered batch, so its row anchors see every column and its column anchors every row.
struct Anchors {
  int64_t begin;
  int64_t end;

  int64_t size() const { return end - begin; }
  bool all(int64_t n) const { return begin == 0 && end == n; }
  // The anchors' rows of an [N, ...] tensor of per-anchor values.
  at::Tensor of(const at::Tensor& t) const { return t.narrow(0, begin, size()); }
};

inline Anchors checked_anchors(const char* op, int64_t begin, int64_t end, int64_t n) {
  TORCH_CHECK(0 <= begin && begin <= end && end <= n, op, ": anchors [", begin, ", ", end,
              ") must lie in [0, ", n, "]");
  return {begin, end};
}

// on_tile(tile, r0, c0, directions) for the tiles of S the anchors need (tiles.h, global r0
// and c0): all of S in one sweep serving both directions when they are all N; otherwise
// their rows against every column (kRowAnchors), then every row against their columns
// (kColumnAnchors), so that each anchor's state still sees its entries in increasing index.
// `tiling` and `selection` as in tiles.h; each sweep's diagonal is its anchors' pairs.
// Only the anchors of `wanted` are served: a loss whose terms all belong to row anchors
// (kRowAnchors) gets no column sweep under a group and tiles marked for its rows alone.
template <typename TileFn>
void for_each_anchor_tile(const at::Tensor& a, const at::Tensor& b, const Anchors& anchors, int64_t row_chunk,
                          int64_t col_chunk, const TileFn& on_tile, Tiling tiling,
                          TileSelection selection = TileSelection::kAll, int wanted = kBothAnchors) {
  const int64_t first = anchors.begin;
  const TilePlan plan{row_chunk, col_chunk, tiling, selection, 0};
  if (anchors.all(a.size(0))) {
    for_each_tile(a, b, plan, [&](const at::Tensor& tile, int64_t r0, int64_t c0) { on_tile(tile, r0, c0, wanted); });
    return;
  }
  // Local row q of the anchors' rows is pair first + q; local column q of their columns too.
  if (wanted & kRowAnchors) {
    for_each_tile(anchors.of(a), b, TilePlan{row_chunk, col_chunk, tiling, selection, first},
                  [&](const at::Tensor& tile, int64_t r0, int64_t c0) { on_tile(tile, first + r0, c0, kRowAnchors); });
  }
  if (wanted & kColumnAnchors) {
    for_each_tile(a, anchors.of(b), TilePlan{row_chunk, col_chunk, tiling, selection, -first},
                  [&](const at::Tensor& tile, int64_t r0, int64_t c0) { on_tile(tile, r0, first + c0, kColumnAnchors); });
  }
}

// The anchors' positives S_ii as their own sweeps' tiles hold them: row anchors' from the
// tiles of their rows, column anchors' from the tiles of their columns (one sweep serves both
// when the anchors are all N; a rank of a group sweeps its rows and its columns with different
// tile shapes, which may round S_ii differently). Only the tiles holding the diagonal are
// computed: about col_chunk / N of a sweep's GEMM work.
struct Positives {
  at::Tensor row, col;
};

inline Positives tile_positives(const at::Tensor& a, const at::Tensor& b, const Anchors& anchors, int64_t row_chunk,
                                int64_t col_chunk, Tiling tiling) {
  const auto options = accumulate_options(a);
  Positives out{at::zeros({a.size(0)}, options), at::zeros({a.size(0)}, options)};
  for_each_anchor_tile(
      a, b, anchors, row_chunk, col_chunk,
      [&](const at::Tensor& tile, int64_t r0, int64_t c0, int directions) {
        if (directions & kRowAnchors) copy_positives(tile, r0, c0, out.row);
        if (directions & kColumnAnchors) copy_positives(tile, r0, c0, out.col);
      },
      tiling, TileSelection::kDiagonal);
  return out;
}

namespace detail {

// fn(first + k): a per-anchor functor moved to the anchors' range.
template <typename Fn>
struct FromFirst {
  Fn fn;
  int64_t first;

  VSE_HOST_DEVICE void operator()(int64_t k) const { fn(first + k); }
};

}  // namespace detail

// fn(i) for every pair i of the anchors (Engine::for_each_anchor over their range).
template <class Engine, typename Fn>
void for_each_anchor_of(const Anchors& anchors, const Fn& fn) {
  Engine::for_each_anchor(anchors.size(), detail::FromFirst<Fn>{fn, anchors.begin});
}

// ------------------------------------------------------------------------- prefix sums

// Terms per block of a prefix sum: one thread sums a block sequentially.
constexpr int64_t kScanBlock = 256;

namespace detail {

// Block j's running sums, out[k + 1] = Σ_{begin ≤ l ≤ k} terms[l], and its total.
struct ScanBlock {
  const double* terms;
  double* out;
  double* totals;
  int64_t n;

  VSE_HOST_DEVICE void operator()(int64_t j) const {
    const int64_t begin = j * kScanBlock, end = begin + kScanBlock < n ? begin + kScanBlock : n;
    double running = 0.0;
    for (int64_t k = begin; k < end; ++k) {
      running += terms[k];
      out[k + 1] = running;
    }
    totals[j] = running;
  }
};

// Block j's running sums plus the totals of the blocks before it, summed in block order.
struct AddBlockOffset {
  const double* totals;
  double* out;
  int64_t n;

  VSE_HOST_DEVICE void operator()(int64_t j) const {
    double offset = 0.0;
    for (int64_t l = 0; l < j; ++l) offset += totals[l];
    const int64_t begin = j * kScanBlock, end = begin + kScanBlock < n ? begin + kScanBlock : n;
    for (int64_t k = begin; k < end; ++k) out[k + 1] += offset;
  }
};

}  // namespace detail

// [n + 1] prefix sums Σ_{k<e} terms[k] of a [n] double tensor, in a fixed order on every
// backend (torch.cumsum is not deterministic for floating types on CUDA): blocks summed
// sequentially, in parallel, then offset by the preceding blocks' totals.
template <class Engine>
at::Tensor prefix_sums(const at::Tensor& terms) {
  const auto input = terms.contiguous();
  const int64_t n = input.size(0), blocks = (n + kScanBlock - 1) / kScanBlock;
  auto out = at::zeros({n + 1}, input.options());
  const auto totals = at::empty({blocks}, input.options());
  Engine::for_each_anchor(blocks, detail::ScanBlock{input.data_ptr<double>(), out.data_ptr<double>(),
                                                    totals.data_ptr<double>(), n});
  Engine::for_each_anchor(blocks, detail::AddBlockOffset{totals.data_ptr<double>(), out.data_ptr<double>(), n});
  return out;
}

// ------------------------------------------------------------------------------ dense losses

// How the dense sweeps of a policy cut S: the forward's positives pass, its sweep and the
// backward's recompute alike, so that all see bitwise the same tiles. A policy whose add()
// compares entries with S_ii exactly (kPositiveFromTiles: a hinge at exactly 0 is inactive)
// sweeps canonical tiles (tiles.h), square where the budget allows, so that its positives pass
// recomputes about row_chunk / N of the GEMM work; the others sweep the plain tiles.
template <typename Policy>
TilePlan dense_plan(int64_t row_chunk, int64_t col_chunk) {
  if constexpr (Policy::kPositiveFromTiles) {
    return {row_chunk, std::min(row_chunk, col_chunk), Tiling::kCanonical};
  } else {
    return {row_chunk, col_chunk, Tiling::kPlain};
  }
}

// The positives of a dense policy: the tiles' own (kPositiveFromTiles) or the row-wise dots,
// S_ii up to rounding, for a policy smooth in S_ii whose gradient reaches it through G's
// diagonal entry (any consistent value of S_ii is then as right as the tile's).
template <typename Policy>
Positives dense_positives(const at::Tensor& a, const at::Tensor& b, const Anchors& anchors, const TilePlan& plan) {
  if constexpr (Policy::kPositiveFromTiles) {
    return tile_positives(a, b, anchors, plan.row_chunk, plan.col_chunk, plan.tiling);
  } else {
    const auto dots = row_dots(a, b);
    return {dots, dots};
  }
}

// One sweep of the tiles the anchors need, folding each entry into its row anchor's state
// (row_policy) and its column anchor's (col_policy): the same policy type, whose two values
// may carry per-direction data (common/unified.h LabelPositivesSweep). `positive` is the
// anchors' S_ii (dense_positives), states as initial_states made them.
template <class Engine, typename T, typename Policy>
void dense_sweep(const at::Tensor& a, const at::Tensor& b, const int64_t* labels, const Policy& row_policy,
                 const Policy& col_policy, const Anchors& anchors, const TilePlan& plan, const Positives& positive,
                 const at::Tensor& row_state, const at::Tensor& col_state) {
  using Passes = typename Engine::template Dense<T, Policy>;
  for_each_anchor_tile(
      a, b, anchors, plan.row_chunk, plan.col_chunk,
      [&](const at::Tensor& tile, int64_t r0, int64_t c0, int directions) {
        if (directions & kRowAnchors) Passes::rows(row_policy, tile, r0, c0, labels, positive.row, row_state);
        if (directions & kColumnAnchors) Passes::columns(col_policy, tile, r0, c0, labels, positive.col, col_state);
      },
      plan.tiling, TileSelection::kAll, Policy::kAnchors);
}

// Forward of a dense loss: (loss summed over the anchors' row and column terms, row_saved
// and col_saved [N, Policy::kSavedWidth]; the saved values of other pairs are 0). a and b are [N, D]
// contiguous in their operand type (tiles.h), T their accumulate type. Every entry's add()
// gets its anchor's positive S_ii, known before the sweep (dense_positives).
template <class Engine, typename T, typename Policy>
std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_forward(const at::Tensor& a, const at::Tensor& b,
                                                             const int64_t* labels, const Policy& policy,
                                                             const Anchors& anchors, int64_t row_chunk,
                                                             int64_t col_chunk) {
  using Passes = typename Engine::template Dense<T, Policy>;
  using State = typename Policy::State;
  const int64_t n = a.size(0);
  const auto options = accumulate_options(a);
  const auto row_state = initial_states<T, State>(n, options);
  const auto col_state = initial_states<T, State>(n, options);
  const TilePlan plan = dense_plan<Policy>(row_chunk, col_chunk);
  const Positives positive = dense_positives<Policy>(a, b, anchors, plan);
  dense_sweep<Engine, T>(a, b, labels, policy, policy, anchors, plan, positive, row_state, col_state);
  const auto terms = at::zeros({2, n}, options);
  auto row_saved = at::zeros({n, Policy::kSavedWidth}, options);
  auto col_saved = at::zeros({n, Policy::kSavedWidth}, options);
  Passes::finish(policy, anchors.of(row_state), anchors.of(positive.row), anchors.of(terms[0]), anchors.of(row_saved));
  if (Policy::kAnchors & kColumnAnchors) {
    Passes::finish(policy, anchors.of(col_state), anchors.of(positive.col), anchors.of(terms[1]),
                   anchors.of(col_saved));
  }
  return {sum_terms(terms), row_saved, col_saved};
}

// Backward of a dense loss: recomputes each tile S_c the anchors need, turns it into
// G_c = grad·∂L/∂S_c in place from the saved row and column values, then dA_c = G_c·B_c and
// dB_c += G_cᵀ·A_c (two GEMMs per tile, accumulated tile after tile in a fixed order). grad is
// 0-dim in T on the device; a and b as in dense_forward. With half operands G_c is rounded to
// their type for the two GEMMs (as eager autocast rounds it) and dA, dB accumulate in T.
// Returns (dA, dB) in T.
template <class Engine, typename T, typename Policy>
std::tuple<at::Tensor, at::Tensor> dense_backward(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b,
                                                  const int64_t* labels, const Policy& policy, const Anchors& anchors,
                                                  int64_t row_chunk, int64_t col_chunk, const at::Tensor& row_saved,
                                                  const at::Tensor& col_saved) {
  using Passes = typename Engine::template Dense<T, Policy>;
  auto da = at::zeros(a.sizes(), accumulate_options(a)), db = at::zeros(b.sizes(), accumulate_options(b));
  const TilePlan plan = dense_plan<Policy>(row_chunk, col_chunk);
  for_each_anchor_tile(a, b, anchors, plan.row_chunk, plan.col_chunk,
                       [&](const at::Tensor& tile, int64_t r0, int64_t c0, int directions) {
                         Passes::gradient(policy, grad, tile, r0, c0, labels, row_saved, col_saved, directions);
                         const int64_t rows = tile.size(0), cols = tile.size(1);
                         const auto g = tile.to(a.scalar_type());
                         add_product(da.narrow(0, r0, rows), g, b.narrow(0, c0, cols));
                         add_product(db.narrow(0, c0, cols), g.t(), a.narrow(0, r0, rows));
                       },
                       plan.tiling, TileSelection::kAll, Policy::kAnchors);
  return {da, db};
}

// -------------------------------------------------------------------- mined (sparse) losses

// Lists of hardest negatives: per row anchor i and per column anchor j the k best valid
// negatives (values best first, empty slots index −1; order of common/topk.h), merged tile
// after tile, and the positives S_ii, read from the tiles: row anchors' from the tiles of the
// rows' sweep, column anchors' from the columns' (the same tiles unless a group splits them),
// so that each anchor compares its negatives with a positive rounded the same way.
struct MinedLists {
  at::Tensor row_values, row_indices, col_values, col_indices, row_positive, col_positive;
};

// on_tile(tile, r0, c0, directions), when given, sees every tile after the lists did (another
// reduction in the same sweep, e.g. GOAL's negative sets through the Dense passes). Only the
// anchors' lists are filled; the others stay empty.
template <class Engine, typename T, typename OnTile>
MinedLists mine_negatives(const at::Tensor& a, const at::Tensor& b, const int64_t* labels, int64_t k,
                          const Anchors& anchors, int64_t row_chunk, int64_t col_chunk, const OnTile& on_tile) {
  using Passes = typename Engine::template Mined<T>;
  const int64_t n = a.size(0);
  TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(), "mined losses: at most 2^31-1 pairs");
  const auto options = accumulate_options(a), index_options = a.options().dtype(at::kLong);
  MinedLists lists{at::zeros({n, k}, options), at::full({n, k}, -1, index_options), at::zeros({n, k}, options),
                   at::full({n, k}, -1, index_options), at::zeros({n}, options),       at::zeros({n}, options)};
  for_each_anchor_tile(a, b, anchors, row_chunk, col_chunk,
                       [&](const at::Tensor& tile, int64_t r0, int64_t c0, int directions) {
                         if (directions & kRowAnchors) {
                           copy_positives(tile, r0, c0, lists.row_positive);
                           Passes::rows(tile, r0, c0, labels, lists.row_values, lists.row_indices);
                         }
                         if (directions & kColumnAnchors) {
                           copy_positives(tile, r0, c0, lists.col_positive);
                           Passes::columns(tile, r0, c0, labels, lists.col_values, lists.col_indices);
                         }
                         on_tile(tile, r0, c0, directions);
                       },
                       Tiling::kCanonical);
  return lists;
}

template <class Engine, typename T>
MinedLists mine_negatives(const at::Tensor& a, const at::Tensor& b, const int64_t* labels, int64_t k,
                          const Anchors& anchors, int64_t row_chunk, int64_t col_chunk) {
  return mine_negatives<Engine, T>(a, b, labels, k, anchors, row_chunk, col_chunk,
                                   [](const at::Tensor&, int64_t, int64_t, int) {});
}

// Entries of a sparse G grouped by the output row they feed (CSR): entry e of group g is
// (source[e], weight[e]) for offset[g] <= e < offset[g + 1].
struct Groups {
  at::Tensor offset, source, weight;
};

// Groups the slots (anchor, s) of [n, k] lists by their listed index, skipping empty slots
// and zero weights: a stable sort by index, so each group keeps increasing (anchor, s) order.
// The skipped slots sort last, past offset[n].
inline Groups group_by_index(const at::Tensor& index, const at::Tensor& weight) {
  const int64_t n = index.size(0), k = index.size(1);
  const auto flat = index.reshape(-1);
  const auto flat_weight = weight.reshape(-1);
  const auto listed = flat.ge(0).logical_and(flat_weight.ne(0));
  const auto keys = at::where(listed, flat, n).to(at::kInt);
  const auto [sorted, order] = keys.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
  return {at::searchsorted(sorted, at::arange(n + 1, keys.options())), order.div(k, "floor"),
          flat_weight.index_select(0, order)};
}

// dA = G·B and dB = Gᵀ·A, times grad, for the sparse G of a mined loss:
//   G[i, row_index[i,s]] += row_weight[i,s]   (row anchor i's listed negatives)
//   G[col_index[j,s], j] += col_weight[j,s]   (column anchor j's listed negatives)
//   G[i, i]              += diagonal[i]
// Slots with index −1 or weight 0 are skipped. Entries are grouped by output row and each
// output row sums its entries in a fixed order: O(N·k·D), no GEMM, no atomics. a, b: [N, D];
// index [N, k] int64; weights and diagonal in a's dtype (float or double). Returns (dA, dB)
// in that dtype.
// Every listed index is −1 (an empty slot) or in [0, bound), a row of the other side. The backward
// ops are public, so lists may come from callers, not only from a forward: an index out of
// range would read and write out of bounds. _assert_async checks on the device (no host sync
// on CUDA; there a failure is a device-side assert) in O(N·k), beside the O(N·k·D) gather.
inline void check_listed_indices(const at::Tensor& index, int64_t bound, const char* name) {
  const std::string message =
      std::string("sparse_backward: ") + name + " must hold -1 or indices in [0, " + std::to_string(bound) + ")";
  at::_assert_async(index.ge(-1).logical_and(index.lt(bound)).all(), message);
}

template <class Engine>
std::tuple<at::Tensor, at::Tensor> sparse_backward(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b,
                                                   const at::Tensor& row_index, const at::Tensor& row_weight,
                                                   const at::Tensor& col_index, const at::Tensor& col_weight,
                                                   const at::Tensor& diagonal) {
  const auto a_ = a.contiguous(), b_ = b.contiguous();
  const auto ri = row_index.contiguous(), ci = col_index.contiguous();
  const auto rw = row_weight.contiguous(), cw = col_weight.contiguous(), dg = diagonal.contiguous();
  TORCH_CHECK(a.size(0) <= std::numeric_limits<int32_t>::max(), "sparse_backward: at most 2^31-1 pairs");
  TORCH_CHECK(col_index.size(1) == row_index.size(1), "sparse_backward: row and column lists differ in width");
  check_listed_indices(ri, b_.size(0), "row_index");
  check_listed_indices(ci, a_.size(0), "col_index");
  const auto g = grad.to(a_.options());
  // dA_i gathers B over row i of G: its own list, and the column lists that name row i.
  const auto by_row = group_by_index(ci, cw);
  // dB_j gathers A over column j of G: its own list, and the row lists that name column j.
  const auto by_col = group_by_index(ri, rw);
  auto da = at::empty_like(a_), db = at::empty_like(b_);
  AT_DISPATCH_FLOATING_TYPES(a_.scalar_type(), "sparse_backward", [&] {
    using Passes = typename Engine::template Mined<scalar_t>;
    Passes::gather(g, b_, ri, rw, by_row, dg, da);
    Passes::gather(g, a_, ci, cw, by_col, dg, db);
  });
  return {da, db};
}

}  // namespace vse
