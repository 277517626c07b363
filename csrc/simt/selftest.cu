// Test-only kernels exercising the SIMT executor (python_tests/test_simt.py).
// Written as ordinary CUDA: it compiles with nvcc for sm_80/sm_90 and, with -DVSE_SIMT, with
// g++ against csrc/simt/simt.h. Every op here is registered as `selftest_*` in the namespace of
// the build (vse_simt on the CPU key, or vse_cuda on the CUDA key).
#include <cstdint>
#include <vector>

#include "../cuda/launch.h"

namespace vse::selftest {

using vse::cuda::kFullMask;
using vse::cuda::kWarpSize;

__device__ __forceinline__ unsigned linear_tid() {
  return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}
__device__ __forceinline__ unsigned block_threads() { return blockDim.x * blockDim.y * blockDim.z; }
// The lanes that exist in this thread's warp (the last warp of a block may be partial).
__device__ __forceinline__ unsigned warp_mask() {
  const unsigned first = linear_tid() / kWarpSize * kWarpSize;
  const unsigned lanes = block_threads() - first;
  return lanes >= 32 ? kFullMask : ((1u << lanes) - 1u);
}

// (1) Tiled block sum with static shared memory and a tree reduction; any block shape and size
// (not only powers of two). Also counts positive elements with __syncthreads_count and checks
// __syncthreads_and / __syncthreads_or.
__global__ void block_sum_kernel(const float* __restrict__ x, int64_t n, float* __restrict__ sums,
                                 int* __restrict__ counts) {
  __shared__ float tile[1024];
  const unsigned t = linear_tid();
  const unsigned nt = block_threads();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * nt + t;
  const float v = i < n ? x[i] : 0.0f;
  tile[t] = v;
  const int positive = __syncthreads_count(v > 0.0f);
  const int all_positive = __syncthreads_and(v > 0.0f);
  const int any_positive = __syncthreads_or(v > 0.0f);
  unsigned p = 1;
  while (p < nt) p <<= 1;
  for (unsigned s = p >> 1; s > 0; s >>= 1) {
    if (t < s && t + s < nt) tile[t] += tile[t + s];
    __syncthreads();
  }
  if (t == 0) {
    sums[blockIdx.x] = tile[0];
    counts[3 * blockIdx.x] = positive;
    counts[3 * blockIdx.x + 1] = all_positive;
    counts[3 * blockIdx.x + 2] = any_positive;
  }
}

// Per-block sum through a shared float atomicAdd: the order of the additions is the order in
// which the block's threads run, so the rounding shows whether a schedule is deterministic.
__global__ void block_atomic_sum_kernel(const float* __restrict__ x, int64_t n,
                                        float* __restrict__ sums) {
  __shared__ float acc;
  const unsigned t = linear_tid();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * block_threads() + t;
  if (t == 0) acc = 0.0f;
  __syncthreads();
  if (i < n) atomicAdd(&acc, x[i]);
  __syncthreads();
  if (t == 0) sums[blockIdx.x] = acc;
}

// (2) Warp shuffles and votes. One value per thread (threads past n hold 0 but take part).
// Outputs per thread: xor_sum, scan (inclusive, __shfl_up_sync), bcast (lane (7*lane+3)%lanes,
// __shfl_sync), half_sum (width-16 xor all-reduce). Outputs per warp: down_sum (double, lane 0
// of a guarded __shfl_down_sync reduction), ballot/any/all of (v > 0) and (v >= 0).
// Full warps use full masks; a partial last warp uses the mask of its existing lanes, and only
// the ops valid there (bcast, down_sum, votes) are written for it (others stay untouched).
__global__ void warp_ops_kernel(const int* __restrict__ x, int64_t n, int* __restrict__ xor_sum,
                                float* __restrict__ scan, int* __restrict__ bcast,
                                long long* __restrict__ half_sum, double* __restrict__ down_sum,
                                int* __restrict__ votes) {
  const unsigned t = linear_tid();
  const unsigned nt = block_threads();
  const unsigned lane = t % kWarpSize;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * nt + t;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * ((nt + kWarpSize - 1) / kWarpSize) +
                       t / kWarpSize;
  const unsigned mask = warp_mask();
  const unsigned lanes = static_cast<unsigned>(__popc(mask));
  const int v = i < n ? x[i] : 0;

  // idx shuffle: any source lane of the mask
  const int src = static_cast<int>((7 * lane + 3) % lanes);
  const int b = __shfl_sync(mask, v, src);
  if (i < n) bcast[i] = b;

  // guarded down-reduction in double (8-byte shuffles)
  double d = static_cast<double>(v);
  for (unsigned off = 16; off > 0; off >>= 1) {
    const double o = __shfl_down_sync(mask, d, off);
    if (lane + off < lanes) d += o;
  }
  if (lane == 0) down_sum[warp] = d;

  // votes
  const unsigned ballot_pos = __ballot_sync(mask, v > 0);
  const int any_pos = __any_sync(mask, v > 0);
  const int all_nonneg = __all_sync(mask, v >= 0);
  if (lane == 0) {
    votes[3 * warp] = static_cast<int>(ballot_pos);
    votes[3 * warp + 1] = any_pos;
    votes[3 * warp + 2] = all_nonneg;
  }

  if (mask != kFullMask) return;  // the rest needs the whole warp

  // xor all-reduce (int)
  int s = v;
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(kFullMask, s, off);
  // inclusive scan (float; integer values, exact)
  float c = static_cast<float>(v);
  for (unsigned off = 1; off < 32; off <<= 1) {
    const float o = __shfl_up_sync(kFullMask, c, off);
    if (lane >= off) c += o;
  }
  // all-reduce within 16-lane segments (long long, width 16)
  long long h = v;
  for (int off = 8; off > 0; off >>= 1) h += __shfl_xor_sync(kFullMask, h, off, 16);
  __syncwarp();
  if (i < n) {
    xor_sum[i] = s;
    scan[i] = c;
    half_sum[i] = h;
  }
}

// Shuffle edge cases, one warp: for each case c (op 0 idx, 1 up, 2 down, 3 xor; the lane or
// offset operand; the width), out[c * 32 + lane] = the shuffled value of v = 10 * lane + 1.
// With `undefined_case`, one more row: lanes 0-15 shuffle down by 8 with mask 0xffff, so
// lanes 8-15 read lanes outside the mask (undefined in CUDA; all-ones bits, -1, on the executor).
__global__ void shfl_cases_kernel(const int* __restrict__ ops, const int* __restrict__ params,
                                  const int* __restrict__ widths, int ncases,
                                  int undefined_case, int* __restrict__ out) {
  const unsigned lane = threadIdx.x % kWarpSize;
  const int v = static_cast<int>(10 * lane + 1);
  for (int c = 0; c < ncases; ++c) {
    const int p = params[c];
    const int w = widths[c];
    int r = 0;
    switch (ops[c]) {
      case 0: r = __shfl_sync(kFullMask, v, p, w); break;
      case 1: r = __shfl_up_sync(kFullMask, v, static_cast<unsigned>(p), w); break;
      case 2: r = __shfl_down_sync(kFullMask, v, static_cast<unsigned>(p), w); break;
      default: r = __shfl_xor_sync(kFullMask, v, p, w); break;
    }
    out[c * kWarpSize + lane] = r;
  }
  if (undefined_case && lane < 16) {
    out[ncases * kWarpSize + lane] = __shfl_down_sync(0xffffu, v, 8u);
  }
}

// (3) Grid-stride loops over a rows x cols matrix: rows over (blockIdx.y, threadIdx.y),
// columns over (blockIdx.x, threadIdx.x); the grid is smaller than the work.
__global__ void axpy2d_kernel(float a, const float* __restrict__ x, const float* __restrict__ y,
                              float* __restrict__ out, int64_t rows, int64_t cols) {
  const int64_t row_stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  const int64_t col_stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < rows;
       r += row_stride) {
    for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < cols;
         c += col_stride) {
      out[r * cols + c] = a * x[r * cols + c] + y[r * cols + c];
    }
  }
}

// (4) Dynamic shared memory of runtime size: each block reverses its tile of blockDim.x
// elements (the last tile may be short). Two arrays live in the buffer: the values (double)
// and their source indices (int), the latter at a 16-byte aligned offset.
__global__ void reverse_tiles_kernel(const double* __restrict__ x, int64_t n,
                                     double* __restrict__ out, int* __restrict__ src) {
  VSE_DYNAMIC_SHARED(unsigned char, smem);
  const unsigned nt = blockDim.x;
  double* vals = reinterpret_cast<double*>(smem);
  int* idx = reinterpret_cast<int*>(smem + ((nt * sizeof(double) + 15) / 16) * 16);
  const unsigned t = threadIdx.x;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * nt;
  const int64_t remaining = n - base;
  const unsigned len = remaining < static_cast<int64_t>(nt) ? static_cast<unsigned>(remaining) : nt;
  if (t < len) {
    vals[t] = x[base + t];
    idx[t] = static_cast<int>(base + t);
  }
  __syncthreads();
  if (t < len) {
    out[base + t] = vals[len - 1 - t];
    src[base + t] = idx[len - 1 - t];
  }
}

// (5) Atomics across blocks: per-block shared histogram flushed to a global one (int), plus
// global totals with every atomic flavour the executor provides.
// stats: [0] count, [1] sum (unsigned long long); extremes: [0] max, [1] min (long long)
// ints:  [0] atomicMax, [1] atomicMin, [2] atomicSub countdown, [3] atomicOr of 1<<(k%31),
//        [4] atomicCAS winners (slots claimed), [5] unsigned atomicAdd, [6] unsigned atomicMax
__global__ void atomics_kernel(const int* __restrict__ keys, int64_t n, int nbins,
                               int* __restrict__ hist, unsigned long long* __restrict__ stats,
                               long long* __restrict__ extremes, int* __restrict__ ints,
                               float* __restrict__ fsum, double* __restrict__ dsum,
                               int* __restrict__ owner, int* __restrict__ last) {
  __shared__ int local[256];
  const unsigned t = threadIdx.x;
  for (unsigned b = t; b < static_cast<unsigned>(nbins); b += blockDim.x) local[b] = 0;
  __syncthreads();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + t; i < n; i += stride) {
    const int k = keys[i];
    atomicAdd(&local[k], 1);
    atomicAdd(&stats[0], 1ull);
    atomicAdd(&stats[1], static_cast<unsigned long long>(k));
    atomicMax(&extremes[0], static_cast<long long>(k));
    atomicMin(&extremes[1], static_cast<long long>(k));
    atomicMax(&ints[0], k);
    atomicMin(&ints[1], k);
    atomicSub(&ints[2], 1);
    atomicOr(&ints[3], 1 << (k % 31));
    if (atomicCAS(&owner[k], -1, static_cast<int>(i)) == -1) atomicAdd(&ints[4], 1);
    atomicExch(&last[k], static_cast<int>(i));
    atomicAdd(reinterpret_cast<unsigned int*>(&ints[5]), 2u);
    atomicMax(reinterpret_cast<unsigned int*>(&ints[6]), static_cast<unsigned int>(k));
    atomicAdd(fsum, static_cast<float>(k));
    atomicAdd(dsum, static_cast<double>(k) * 0.5);
  }
  __syncthreads();
  for (unsigned b = t; b < static_cast<unsigned>(nbins); b += blockDim.x) {
    if (local[b] != 0) atomicAdd(&hist[b], local[b]);
  }
}

// (6) Faults, for the executor's error paths (mode 0 is correct code, the control).
//  1: __syncthreads inside `if (threadIdx.x < 5)`            -> divergent barrier
//  2: thread 7 returns early, the others wait at a barrier   -> exited thread
//  3: odd and even threads at two different __syncthreads    -> divergent barrier
//  4: lane 3 returns, the others shuffle with the full mask  -> exited lane
//  5: lanes 0-15 shuffle, lanes 16-31 ballot, full masks     -> mismatched warp ops
//  6: a full-mask ballot in a partial warp (block of 48)     -> mask names missing lanes
//  7: lanes 0-15 wait at __syncthreads, 16-31 at __syncwarp  -> deadlock
//  8: only block 2 (of the grid) is divergent                -> error of that block
//  9: two threads write one shared word with no barrier      -> a data race (TSan only)
__global__ void fault_kernel(int mode, int* __restrict__ out) {
  __shared__ int word;
  const unsigned t = threadIdx.x;
  int v = static_cast<int>(t);
  if (mode == 1) {
    if (t < 5) __syncthreads();
  } else if (mode == 2) {
    if (t == 7) return;
    __syncthreads();
  } else if (mode == 3) {
    if (t % 2 == 1) {
      __syncthreads();
    } else {
      __syncthreads();
    }
  } else if (mode == 4) {
    if (t % 32 == 3) return;
    v = __shfl_xor_sync(kFullMask, v, 1);
  } else if (mode == 5) {
    if (t % 32 < 16) {
      v = __shfl_xor_sync(kFullMask, v, 1);
    } else {
      v = static_cast<int>(__ballot_sync(kFullMask, v > 0));
    }
  } else if (mode == 6) {
    v = static_cast<int>(__ballot_sync(kFullMask, v > 0));
  } else if (mode == 7) {
    if (t % 32 < 16) {
      __syncthreads();
    } else {
      __syncwarp();
    }
  } else if (mode == 8) {
    if (blockIdx.x == 2 && t == 0) return;
    __syncthreads();
  } else if (mode == 9) {
    if (t < 2) word = v;
    __syncthreads();
    v = word;
  } else {
    if (t == 0) word = 42;
    __syncthreads();
    v += word;
    v += __shfl_xor_sync(warp_mask(), v, 0);
  }
  out[static_cast<int64_t>(blockIdx.x) * blockDim.x + t] = v;
}

// (7) Indices and launch configuration: every thread writes its threadIdx/blockIdx/blockDim/
// gridDim (12 ints) at its global linear position; also counts threads with an atomic.
__global__ void indices_kernel(int* __restrict__ out, unsigned long long* __restrict__ count) {
  const unsigned long long block =
      blockIdx.x + static_cast<unsigned long long>(gridDim.x) *
                       (blockIdx.y + static_cast<unsigned long long>(gridDim.y) * blockIdx.z);
  const unsigned long long g = block * block_threads() + linear_tid();
  int* o = out + 12 * g;
  o[0] = static_cast<int>(threadIdx.x);
  o[1] = static_cast<int>(threadIdx.y);
  o[2] = static_cast<int>(threadIdx.z);
  o[3] = static_cast<int>(blockIdx.x);
  o[4] = static_cast<int>(blockIdx.y);
  o[5] = static_cast<int>(blockIdx.z);
  o[6] = static_cast<int>(blockDim.x);
  o[7] = static_cast<int>(blockDim.y);
  o[8] = static_cast<int>(blockDim.z);
  o[9] = static_cast<int>(gridDim.x);
  o[10] = static_cast<int>(gridDim.y);
  o[11] = static_cast<int>(gridDim.z);
  atomicAdd(count, 1ull);
}

// ---------------------------------------------------------------------------------------------
// Launchers.
namespace {

void check_input(const at::Tensor& x, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(x.dim() == 1, name, " must be 1-D, got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == dtype, name, " must be ", dtype, ", got ", x.scalar_type());
}

unsigned checked_dim(int64_t v, const char* name) {
  TORCH_CHECK(v >= 0 && v <= 0x7fffffff, name, " out of range: ", v);
  return static_cast<unsigned>(v);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

std::vector<at::Tensor> selftest_block_sum(const at::Tensor& x_in, int64_t bx, int64_t by,
                                           int64_t bz) {
  check_input(x_in, at::kFloat, "x");
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  const int64_t nt = bx * by * bz;
  TORCH_CHECK(nt >= 1 && nt <= 1024, "block must have 1..1024 threads");
  const int64_t blocks = ceil_div(n, nt);
  vse::cuda::DeviceGuard guard(x);
  at::Tensor sums = at::zeros({blocks}, x.options());
  at::Tensor counts = at::zeros({blocks, 3}, x.options().dtype(at::kInt));
  vse::cuda::launch(block_sum_kernel, dim3(checked_dim(blocks, "blocks")),
                    dim3(checked_dim(bx, "bx"), checked_dim(by, "by"), checked_dim(bz, "bz")), 0,
                    vse::cuda::current_stream(), x.data_ptr<float>(), n, sums.data_ptr<float>(),
                    counts.data_ptr<int>());
  return {sums, counts};
}

at::Tensor selftest_block_atomic_sum(const at::Tensor& x_in, int64_t block) {
  check_input(x_in, at::kFloat, "x");
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  const int64_t blocks = ceil_div(n, block);
  vse::cuda::DeviceGuard guard(x);
  at::Tensor sums = at::zeros({blocks}, x.options());
  vse::cuda::launch(block_atomic_sum_kernel, dim3(checked_dim(blocks, "blocks")),
                    dim3(checked_dim(block, "block")), 0, vse::cuda::current_stream(),
                    x.data_ptr<float>(), n, sums.data_ptr<float>());
  return sums;
}

std::vector<at::Tensor> selftest_warp_ops(const at::Tensor& x_in, int64_t block) {
  check_input(x_in, at::kInt, "x");
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  const int64_t blocks = ceil_div(n, block);
  const int64_t warps = blocks * ceil_div(block, 32);
  vse::cuda::DeviceGuard guard(x);
  const auto opt = x.options();
  at::Tensor xor_sum = at::full({n}, -7, opt);
  at::Tensor scan = at::full({n}, -7.0, opt.dtype(at::kFloat));
  at::Tensor bcast = at::full({n}, -7, opt);
  at::Tensor half_sum = at::full({n}, -7, opt.dtype(at::kLong));
  at::Tensor down_sum = at::full({warps}, -7.0, opt.dtype(at::kDouble));
  at::Tensor votes = at::full({warps, 3}, -7, opt);
  vse::cuda::launch(warp_ops_kernel, dim3(checked_dim(blocks, "blocks")),
                    dim3(checked_dim(block, "block")), 0, vse::cuda::current_stream(),
                    x.data_ptr<int>(), n, xor_sum.data_ptr<int>(), scan.data_ptr<float>(),
                    bcast.data_ptr<int>(),
                    reinterpret_cast<long long*>(half_sum.data_ptr<int64_t>()),
                    down_sum.data_ptr<double>(), votes.data_ptr<int>());
  return {xor_sum, scan, bcast, half_sum, down_sum, votes};
}

at::Tensor selftest_shfl_cases(const at::Tensor& ops, const at::Tensor& params,
                               const at::Tensor& widths, bool undefined_case) {
  check_input(ops, at::kInt, "ops");
  check_input(params, at::kInt, "params");
  check_input(widths, at::kInt, "widths");
  const int64_t ncases = ops.numel();
  TORCH_CHECK(params.numel() == ncases && widths.numel() == ncases, "one param, width per op");
  vse::cuda::DeviceGuard guard(ops);
  at::Tensor out = at::full({ncases + (undefined_case ? 1 : 0), kWarpSize}, -7, ops.options());
  vse::cuda::launch(shfl_cases_kernel, dim3(1), dim3(kWarpSize), 0, vse::cuda::current_stream(),
                    ops.contiguous().data_ptr<int>(), params.contiguous().data_ptr<int>(),
                    widths.contiguous().data_ptr<int>(), static_cast<int>(ncases),
                    undefined_case ? 1 : 0, out.data_ptr<int>());
  return out;
}

at::Tensor selftest_axpy2d(double a, const at::Tensor& x_in, const at::Tensor& y_in,
                           int64_t gx, int64_t gy, int64_t bx, int64_t by) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.sizes() == y_in.sizes(), "x, y must be equal 2-D shapes");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && y_in.scalar_type() == at::kFloat,
              "x, y must be float32");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor y = y_in.contiguous();
  vse::cuda::DeviceGuard guard(x);
  at::Tensor out = at::full_like(x, -1.0);
  vse::cuda::launch(axpy2d_kernel, dim3(checked_dim(gx, "gx"), checked_dim(gy, "gy")),
                    dim3(checked_dim(bx, "bx"), checked_dim(by, "by")), 0,
                    vse::cuda::current_stream(), static_cast<float>(a), x.data_ptr<float>(),
                    y.data_ptr<float>(), out.data_ptr<float>(), x.size(0), x.size(1));
  return out;
}

std::vector<at::Tensor> selftest_reverse_tiles(const at::Tensor& x_in, int64_t block,
                                               int64_t extra_smem) {
  check_input(x_in, at::kDouble, "x");
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.numel();
  const int64_t blocks = ceil_div(n, block);
  TORCH_CHECK(block >= 1 && extra_smem >= 0, "invalid block or extra_smem");
  const size_t smem = static_cast<size_t>(ceil_div(block * 8, 16) * 16 + block * 4 + extra_smem);
  vse::cuda::DeviceGuard guard(x);
  at::Tensor out = at::full_like(x, -1.0);
  at::Tensor src = at::full({n}, -1, x.options().dtype(at::kInt));
  vse::cuda::launch(reverse_tiles_kernel, dim3(checked_dim(blocks, "blocks")),
                    dim3(checked_dim(block, "block")), smem, vse::cuda::current_stream(),
                    x.data_ptr<double>(), n, out.data_ptr<double>(), src.data_ptr<int>());
  return {out, src};
}

std::vector<at::Tensor> selftest_atomics(const at::Tensor& keys_in, int64_t nbins, int64_t grid,
                                         int64_t block) {
  check_input(keys_in, at::kInt, "keys");
  TORCH_CHECK(nbins >= 1 && nbins <= 256, "nbins must be in [1, 256]");
  const at::Tensor keys = keys_in.contiguous();
  const int64_t n = keys.numel();
  TORCH_CHECK(n == 0 || (keys.min().item<int>() >= 0 && keys.max().item<int>() < nbins),
              "keys must be in [0, nbins)");
  vse::cuda::DeviceGuard guard(keys);
  const auto opt = keys.options();
  at::Tensor hist = at::zeros({nbins}, opt);
  at::Tensor stats = at::zeros({2}, opt.dtype(at::kLong));
  at::Tensor extremes = at::tensor({INT64_MIN, INT64_MAX}, opt.dtype(at::kLong));
  at::Tensor ints = at::tensor({INT32_MIN, INT32_MAX, static_cast<int>(n), 0, 0, 0, 0}, opt);
  at::Tensor fsum = at::zeros({1}, opt.dtype(at::kFloat));
  at::Tensor dsum = at::zeros({1}, opt.dtype(at::kDouble));
  at::Tensor owner = at::full({nbins}, -1, opt);
  at::Tensor last = at::full({nbins}, -1, opt);
  vse::cuda::launch(atomics_kernel, dim3(checked_dim(grid, "grid")),
                    dim3(checked_dim(block, "block")), 0, vse::cuda::current_stream(),
                    keys.data_ptr<int>(), n, static_cast<int>(nbins), hist.data_ptr<int>(),
                    reinterpret_cast<unsigned long long*>(stats.data_ptr<int64_t>()),
                    reinterpret_cast<long long*>(extremes.data_ptr<int64_t>()),
                    ints.data_ptr<int>(), fsum.data_ptr<float>(), dsum.data_ptr<double>(),
                    owner.data_ptr<int>(), last.data_ptr<int>());
  return {hist, stats, extremes, ints, fsum, dsum, owner, last};
}

at::Tensor selftest_fault(const at::Tensor& like, int64_t mode, int64_t grid, int64_t block) {
  vse::cuda::DeviceGuard guard(like);
  at::Tensor out = at::full({grid * block}, -1, like.options().dtype(at::kInt));
  vse::cuda::launch(fault_kernel, dim3(checked_dim(grid, "grid")),
                    dim3(checked_dim(block, "block")), 0, vse::cuda::current_stream(),
                    static_cast<int>(mode), out.data_ptr<int>());
  return out;
}

std::vector<at::Tensor> selftest_indices(const at::Tensor& like, int64_t gx, int64_t gy,
                                         int64_t gz, int64_t bx, int64_t by, int64_t bz,
                                         int64_t dynamic_smem) {
  TORCH_CHECK(gx >= 0 && gy >= 0 && gz >= 0 && bx >= 0 && by >= 0 && bz >= 0 && dynamic_smem >= 0,
              "negative launch configuration");
  const int64_t total = gx * gy * gz * bx * by * bz;
  TORCH_CHECK(total <= (int64_t{1} << 24), "too many threads for this test");
  vse::cuda::DeviceGuard guard(like);
  at::Tensor out = at::full({total, 12}, -1, like.options().dtype(at::kInt));
  at::Tensor count = at::zeros({1}, like.options().dtype(at::kLong));
  vse::cuda::launch(indices_kernel,
                    dim3(checked_dim(gx, "gx"), checked_dim(gy, "gy"), checked_dim(gz, "gz")),
                    dim3(checked_dim(bx, "bx"), checked_dim(by, "by"), checked_dim(bz, "bz")),
                    static_cast<size_t>(dynamic_smem), vse::cuda::current_stream(),
                    out.data_ptr<int>(),
                    reinterpret_cast<unsigned long long*>(count.data_ptr<int64_t>()));
  return {out, count};
}

#if defined(VSE_SIMT)
// [launch_id, workers, blocks, switches, barriers, warp_ops] of the last executor launch.
at::Tensor selftest_last_launch_stats() {
  const ::simt::LaunchStats s = ::simt::last_launch_stats();
  return at::tensor({static_cast<int64_t>(s.launch_id), static_cast<int64_t>(s.workers),
                     static_cast<int64_t>(s.blocks), static_cast<int64_t>(s.switches),
                     static_cast<int64_t>(s.barriers), static_cast<int64_t>(s.warp_ops)},
                    at::kLong);
}
#endif

}  // namespace vse::selftest

TORCH_LIBRARY_FRAGMENT(VSE_OPS_NAMESPACE, m) {
  m.def("selftest_block_sum(Tensor x, int bx, int by=1, int bz=1) -> Tensor[]");
  m.def("selftest_block_atomic_sum(Tensor x, int block) -> Tensor");
  m.def("selftest_warp_ops(Tensor x, int block) -> Tensor[]");
  m.def("selftest_shfl_cases(Tensor ops, Tensor params, Tensor widths, bool undefined_case) -> Tensor");
  m.def("selftest_axpy2d(float a, Tensor x, Tensor y, int gx, int gy, int bx, int by) -> Tensor");
  m.def("selftest_reverse_tiles(Tensor x, int block, int extra_smem=0) -> Tensor[]");
  m.def("selftest_atomics(Tensor keys, int nbins, int grid, int block) -> Tensor[]");
  m.def("selftest_fault(Tensor like, int mode, int grid, int block) -> Tensor");
  m.def(
      "selftest_indices(Tensor like, int gx, int gy, int gz, int bx, int by, int bz, "
      "int dynamic_smem=0) -> Tensor[]");
#if defined(VSE_SIMT)
  // No tensor argument to dispatch on: registered as a catch-all (CompositeImplicitAutograd).
  m.def("selftest_last_launch_stats() -> Tensor", &vse::selftest::selftest_last_launch_stats);
#endif
}

VSE_REGISTER_KERNELS(VSE_KERNEL_DISPATCH_KEY, m) {
  m.impl("selftest_block_sum", &vse::selftest::selftest_block_sum);
  m.impl("selftest_block_atomic_sum", &vse::selftest::selftest_block_atomic_sum);
  m.impl("selftest_warp_ops", &vse::selftest::selftest_warp_ops);
  m.impl("selftest_shfl_cases", &vse::selftest::selftest_shfl_cases);
  m.impl("selftest_axpy2d", &vse::selftest::selftest_axpy2d);
  m.impl("selftest_reverse_tiles", &vse::selftest::selftest_reverse_tiles);
  m.impl("selftest_atomics", &vse::selftest::selftest_atomics);
  m.impl("selftest_fault", &vse::selftest::selftest_fault);
  m.impl("selftest_indices", &vse::selftest::selftest_indices);
}
