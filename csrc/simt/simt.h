#pragma once
// simt.h: the CUDA device facilities for the test-only SIMT executor (g++ -DVSE_SIMT).
//
// The same csrc/cuda sources that nvcc compiles for the GPU compile with g++ against this
// header, and csrc/simt/executor.cpp runs them on the CPU:
//  - a launch's blocks are spread over a small pool of worker OS threads
//    (VSE_SIMT_THREADS, default 2); a worker runs one block at a time, to the end;
//  - a block's CUDA threads are cooperative fibers of that worker, switched only at sync
//    points (barriers, warp operations), round-robin, so every run is deterministic;
//  - `__shared__` is `static thread_local`: one copy per worker OS thread = one per running
//    block (a worker never interleaves two blocks);
//  - barrier and warp semantics are strict: a `__syncthreads` that some thread of the block
//    never reaches (it returned, or waits at a barrier on another source line), a warp op whose
//    mask names an exited or nonexistent lane (CUDA tolerates exited ones; we do not), a lane
//    waiting at another op, or any deadlock raise std::runtime_error in the thread that called
//    simt::launch. Barriers are told apart by file:line, so two on one line count as one.
//  - warp ops pair lanes by (op, value size, mask, width), not by source line (as sm_70+ does);
//    only __syncthreads* and __syncwarp order memory (ThreadSanitizer builds check this).
//
// Standalone C++17 + libc: no torch/ATen here.
#if defined(__CUDACC__)
#error "csrc/simt/simt.h is for host compilers (g++ -DVSE_SIMT), not nvcc"
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <type_traits>

// ---------------------------------------------------------------------------------------------
// Built-in vector types (the subset kernels here may use), with CUDA's alignments.
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};
struct int2 { int x, y; } __attribute__((aligned(8)));
struct int3 { int x, y, z; };
struct int4 { int x, y, z, w; } __attribute__((aligned(16)));
struct uint2 { unsigned int x, y; } __attribute__((aligned(8)));
struct uint4 { unsigned int x, y, z, w; } __attribute__((aligned(16)));
struct float2 { float x, y; } __attribute__((aligned(8)));
struct float3 { float x, y, z; };
struct float4 { float x, y, z, w; } __attribute__((aligned(16)));
struct double2 { double x, y; } __attribute__((aligned(16)));
struct longlong2 { long long x, y; } __attribute__((aligned(16)));
struct ulonglong2 { unsigned long long x, y; } __attribute__((aligned(16)));
inline constexpr int2 make_int2(int x, int y) { return int2{x, y}; }
inline constexpr int3 make_int3(int x, int y, int z) { return int3{x, y, z}; }
inline constexpr int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }
inline constexpr uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline constexpr uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return uint3{x, y, z}; }
inline constexpr uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) {
  return uint4{x, y, z, w};
}
inline constexpr float2 make_float2(float x, float y) { return float2{x, y}; }
inline constexpr float3 make_float3(float x, float y, float z) { return float3{x, y, z}; }
inline constexpr float4 make_float4(float x, float y, float z, float w) {
  return float4{x, y, z, w};
}
inline constexpr double2 make_double2(double x, double y) { return double2{x, y}; }

// ---------------------------------------------------------------------------------------------
// Qualifiers.
#ifndef __global__
#define __global__
#endif
#ifndef __device__
#define __device__
#endif
#ifndef __host__
#define __host__
#endif
#ifndef __forceinline__
#define __forceinline__ inline
#endif
// No __noinline__: libstdc++ spells `__attribute__((__noinline__))`, which such a macro breaks.
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#ifndef __align__
#define __align__(n) alignas(n)
#endif
// One copy per worker OS thread; a worker runs one block at a time with all its CUDA
// threads as fibers on that OS thread, so this is exactly per-block shared memory.
#ifndef __shared__
#define __shared__ static thread_local
#endif

namespace simt {

struct Stream {};

// Hard limits checked by simt::launch (those of sm_90; sm_80 allows 163 KiB of shared memory).
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxBlockDimX = 1024, kMaxBlockDimY = 1024, kMaxBlockDimZ = 64;
constexpr unsigned long long kMaxGridDimX = 2147483647ull;
constexpr unsigned kMaxGridDimYZ = 65535;
constexpr size_t kMaxDynamicSharedBytes = 227 * 1024;
constexpr int kWarpSize = 32;

// Statistics of the last simt::launch that ran to its end (test and benchmark aid).
struct LaunchStats {
  unsigned long long launch_id = 0;      // 1-based sequence number of launches
  unsigned workers = 0;                  // worker OS threads that ran blocks
  unsigned long long blocks = 0;         // blocks run
  unsigned long long switches = 0;       // fiber context switches
  unsigned long long barriers = 0;       // completed __syncthreads (block-wide) rounds
  unsigned long long warp_ops = 0;       // completed warp-op groups
};
LaunchStats last_launch_stats();

namespace detail {

struct ThreadCtx {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  void* dynamic_smem;
};

// The running CUDA thread of this OS thread (null outside kernels).
inline thread_local ThreadCtx* tls_ctx = nullptr;

[[noreturn]] void outside_kernel(const char* what);

inline ThreadCtx& current() {
  ThreadCtx* c = tls_ctx;
  if (__builtin_expect(c == nullptr, 0)) outside_kernel("threadIdx/blockIdx/blockDim/gridDim");
  return *c;
}

using BodyFn = void (*)(const void*);
void launch_impl(dim3 grid, dim3 block, size_t dynamic_smem_bytes, BodyFn fn, const void* body,
                 const void* kernel);

// Warp op codes (the value size is part of the op: 8-byte shuffles never pair with 4-byte).
enum WarpOp : int {
  kShflIdx = 0,
  kShflUp = 1,
  kShflDown = 2,
  kShflXor = 3,
  kBallot = 4,
  kAny = 5,
  kAll = 6,
  kSyncwarp = 7,
};
enum BarrierOp : int { kBarSync = 0, kBarCount = 1, kBarAnd = 2, kBarOr = 3 };

template <typename T>
inline unsigned long long to_bits(T v) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "warp op value type");
  unsigned long long b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T from_bits(unsigned long long b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

// The source position of a sync call: __syncthreads and the warp ops are object-like macros
// expanding to At{__FILE__, __LINE__}.op, so errors name the line, and a barrier reached at
// two different lines by threads of one block is reported as divergent.
struct At {
  const char* file;
  int line;

  int barrier(int op, int predicate) const;
  unsigned long long warp(int op, int value_bytes, unsigned mask, unsigned long long value,
                          int param, int width) const;

  void syncthreads() const { barrier(kBarSync, 0); }
  int syncthreads_count(int predicate) const { return barrier(kBarCount, predicate); }
  int syncthreads_and(int predicate) const { return barrier(kBarAnd, predicate); }
  int syncthreads_or(int predicate) const { return barrier(kBarOr, predicate); }
  void syncwarp(unsigned mask = 0xffffffffu) const { warp(kSyncwarp, 0, mask, 0, 0, 32); }
  unsigned ballot_sync(unsigned mask, int predicate) const {
    return static_cast<unsigned>(warp(kBallot, 0, mask, predicate != 0, 0, 32));
  }
  int any_sync(unsigned mask, int predicate) const {
    return static_cast<int>(warp(kAny, 0, mask, predicate != 0, 0, 32));
  }
  int all_sync(unsigned mask, int predicate) const {
    return static_cast<int>(warp(kAll, 0, mask, predicate != 0, 0, 32));
  }

// The overload set of CUDA's shuffles (sm_30_intrinsics.hpp). Semantics are PTX shfl.sync's:
// only the low 5 bits of the lane/offset operand count; a source outside the lane's width
// segment (up/down/xor) gives the lane its own value; a source lane outside `mask` is undefined
// in CUDA and reads all-ones bits here (NaN / -1).
#define SIMT_SHFL_OVERLOADS_(T)                                                              \
  T shfl_sync(unsigned mask, T var, int src_lane, int width = 32) const {                    \
    return from_bits<T>(warp(kShflIdx, sizeof(T), mask, to_bits(var), src_lane, width));   \
  }                                                                                          \
  T shfl_up_sync(unsigned mask, T var, unsigned int delta, int width = 32) const {           \
    return from_bits<T>(                                                                     \
        warp(kShflUp, sizeof(T), mask, to_bits(var), static_cast<int>(delta & 31u), width));   \
  }                                                                                          \
  T shfl_down_sync(unsigned mask, T var, unsigned int delta, int width = 32) const {         \
    return from_bits<T>(                                                                     \
        warp(kShflDown, sizeof(T), mask, to_bits(var), static_cast<int>(delta & 31u), width)); \
  }                                                                                          \
  T shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) const {               \
    return from_bits<T>(warp(kShflXor, sizeof(T), mask, to_bits(var), lane_mask, width));   \
  }
  SIMT_SHFL_OVERLOADS_(int)
  SIMT_SHFL_OVERLOADS_(unsigned int)
  SIMT_SHFL_OVERLOADS_(long)
  SIMT_SHFL_OVERLOADS_(unsigned long)
  SIMT_SHFL_OVERLOADS_(long long)
  SIMT_SHFL_OVERLOADS_(unsigned long long)
  SIMT_SHFL_OVERLOADS_(float)
  SIMT_SHFL_OVERLOADS_(double)
#undef SIMT_SHFL_OVERLOADS_
};

}  // namespace detail

// Runs body() once per CUDA thread of every block of the grid. A grid with a zero dimension
// is a no-op. Throws std::runtime_error for an invalid configuration and rethrows the first
// error (lowest block) raised inside the kernel, after all workers have stopped.
// `kernel` (optional) is the kernel's address, used only to name it in error messages.
template <class Fn>
void launch(dim3 grid, dim3 block, size_t dynamic_smem_bytes, Fn body,
            const void* kernel = nullptr) {
  detail::launch_impl(
      grid, block, dynamic_smem_bytes,
      [](const void* p) { (*static_cast<const Fn*>(p))(); }, &body, kernel);
}

// The running block's dynamic shared memory (`extern __shared__`), 16-byte aligned.
// Its bytes are 0xff at block start (reads before writes give NaN / -1).
template <class T>
T* dynamic_shared() {
  return static_cast<T*>(detail::current().dynamic_smem);
}

}  // namespace simt

// ---------------------------------------------------------------------------------------------
// Built-in variables.
#define threadIdx (::simt::detail::current().thread_idx)
#define blockIdx (::simt::detail::current().block_idx)
#define blockDim (::simt::detail::current().block_dim)
#define gridDim (::simt::detail::current().grid_dim)
static constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------------
// Barriers and warp operations (see simt::detail::At).
#define __syncthreads ::simt::detail::At{__FILE__, __LINE__}.syncthreads
#define __syncthreads_count ::simt::detail::At{__FILE__, __LINE__}.syncthreads_count
#define __syncthreads_and ::simt::detail::At{__FILE__, __LINE__}.syncthreads_and
#define __syncthreads_or ::simt::detail::At{__FILE__, __LINE__}.syncthreads_or
#define __syncwarp ::simt::detail::At{__FILE__, __LINE__}.syncwarp
#define __shfl_sync ::simt::detail::At{__FILE__, __LINE__}.shfl_sync
#define __shfl_up_sync ::simt::detail::At{__FILE__, __LINE__}.shfl_up_sync
#define __shfl_down_sync ::simt::detail::At{__FILE__, __LINE__}.shfl_down_sync
#define __shfl_xor_sync ::simt::detail::At{__FILE__, __LINE__}.shfl_xor_sync
#define __ballot_sync ::simt::detail::At{__FILE__, __LINE__}.ballot_sync
#define __any_sync ::simt::detail::At{__FILE__, __LINE__}.any_sync
#define __all_sync ::simt::detail::At{__FILE__, __LINE__}.all_sync

// ---------------------------------------------------------------------------------------------
// Memory fences. Atomics below are acq_rel read-modify-writes (CUDA's are relaxed; the
// stronger order keeps ThreadSanitizer quiet on fence-based patterns it cannot model).
#if defined(__SANITIZE_THREAD__)
// ThreadSanitizer does not model fences (and g++ -Wtsan warns about them): a seq_cst RMW on
// one shared word stands in, which TSan sees as release+acquire among all fencing threads.
namespace simt::detail {
inline int tsan_fence_word = 0;
}
inline void __threadfence() { __atomic_fetch_add(&::simt::detail::tsan_fence_word, 0, __ATOMIC_SEQ_CST); }
#else
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
#endif
inline void __threadfence_block() { __threadfence(); }
inline void __threadfence_system() { __threadfence(); }

// ---------------------------------------------------------------------------------------------
// Atomics (real atomics: blocks run concurrently on several OS threads).
namespace simt::detail {
template <typename T, typename F>
inline T atomic_update(T* address, F f) {
  T expected;
  __atomic_load(address, &expected, __ATOMIC_RELAXED);
  T desired;
  do {
    desired = f(expected);
  } while (!__atomic_compare_exchange(address, &expected, &desired, false, __ATOMIC_ACQ_REL,
                                      __ATOMIC_ACQUIRE));
  return expected;
}
}  // namespace simt::detail

#define SIMT_ATOMIC_INT_OPS_(T)                                                               \
  inline T atomicAdd(T* a, T v) { return __atomic_fetch_add(a, v, __ATOMIC_ACQ_REL); }        \
  inline T atomicExch(T* a, T v) { return __atomic_exchange_n(a, v, __ATOMIC_ACQ_REL); }      \
  inline T atomicAnd(T* a, T v) { return __atomic_fetch_and(a, v, __ATOMIC_ACQ_REL); }        \
  inline T atomicOr(T* a, T v) { return __atomic_fetch_or(a, v, __ATOMIC_ACQ_REL); }          \
  inline T atomicXor(T* a, T v) { return __atomic_fetch_xor(a, v, __ATOMIC_ACQ_REL); }        \
  inline T atomicCAS(T* a, T compare, T v) {                                                  \
    __atomic_compare_exchange_n(a, &compare, v, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);   \
    return compare;                                                                           \
  }
SIMT_ATOMIC_INT_OPS_(int)
SIMT_ATOMIC_INT_OPS_(unsigned int)
SIMT_ATOMIC_INT_OPS_(unsigned long long)
#undef SIMT_ATOMIC_INT_OPS_

inline int atomicSub(int* a, int v) { return __atomic_fetch_sub(a, v, __ATOMIC_ACQ_REL); }
inline unsigned int atomicSub(unsigned int* a, unsigned int v) {
  return __atomic_fetch_sub(a, v, __ATOMIC_ACQ_REL);
}
inline float atomicAdd(float* a, float v) {
  return ::simt::detail::atomic_update(a, [v](float o) { return o + v; });
}
inline double atomicAdd(double* a, double v) {
  return ::simt::detail::atomic_update(a, [v](double o) { return o + v; });
}
inline float atomicExch(float* a, float v) {
  float old;
  __atomic_exchange(a, &v, &old, __ATOMIC_ACQ_REL);
  return old;
}
#define SIMT_ATOMIC_MINMAX_(T)                                                                \
  inline T atomicMax(T* a, T v) {                                                             \
    return ::simt::detail::atomic_update(a, [v](T o) { return o < v ? v : o; });              \
  }                                                                                           \
  inline T atomicMin(T* a, T v) {                                                             \
    return ::simt::detail::atomic_update(a, [v](T o) { return v < o ? v : o; });              \
  }
SIMT_ATOMIC_MINMAX_(int)
SIMT_ATOMIC_MINMAX_(unsigned int)
SIMT_ATOMIC_MINMAX_(long long)
SIMT_ATOMIC_MINMAX_(unsigned long long)
#undef SIMT_ATOMIC_MINMAX_
inline unsigned int atomicInc(unsigned int* a, unsigned int limit) {
  return ::simt::detail::atomic_update(a, [limit](unsigned o) { return o >= limit ? 0u : o + 1; });
}
inline unsigned int atomicDec(unsigned int* a, unsigned int limit) {
  return ::simt::detail::atomic_update(
      a, [limit](unsigned o) { return (o == 0 || o > limit) ? limit : o - 1; });
}

// ---------------------------------------------------------------------------------------------
// Integer and float intrinsics.
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) {
  return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x));
}
inline unsigned int __brev(unsigned int x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
  return (x >> 16) | (x << 16);
}
inline int __float_as_int(float x) { return ::simt::detail::from_bits<int>(::simt::detail::to_bits(x)); }
inline unsigned int __float_as_uint(float x) {
  return ::simt::detail::from_bits<unsigned int>(::simt::detail::to_bits(x));
}
inline float __int_as_float(int x) { return ::simt::detail::from_bits<float>(::simt::detail::to_bits(x)); }
inline float __uint_as_float(unsigned int x) {
  return ::simt::detail::from_bits<float>(::simt::detail::to_bits(x));
}
inline long long __double_as_longlong(double x) {
  return ::simt::detail::from_bits<long long>(::simt::detail::to_bits(x));
}
inline double __longlong_as_double(long long x) {
  return ::simt::detail::from_bits<double>(::simt::detail::to_bits(x));
}
// Fast-math intrinsics: the CPU computes them exactly rounded (the GPU's are approximate;
// tests compare with a tolerance).
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __fsub_rn(float x, float y) { return x - y; }
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __fmaf_rn(float x, float y, float z) { return std::fma(x, y, z); }
inline float __saturatef(float x) { return x > 1.0f ? 1.0f : (x > 0.0f ? x : 0.0f); }

// Read-only cache load: a plain load here.
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
