// executor.cpp: the runtime of the test-only SIMT executor (see simt.h).
//
// Execution model
//  - A launch's blocks are claimed in increasing linear order by a pool of worker OS threads
//    (VSE_SIMT_THREADS, default 2, read at every launch); one launch runs at a time.
//  - A worker runs a block to its end: the block's CUDA threads are fibers on the worker's OS
//    thread, with stacks reused from launch to launch (mmap, guard pages below, 256 KiB each,
//    VSE_SIMT_STACK_KB). A fiber runs until it blocks at a barrier or warp op, or exits; the
//    next runnable fiber (FIFO order) takes over. Completing a barrier or warp op makes its
//    waiters runnable in thread order. So a block's schedule depends on nothing but the code.
//  - VSE_SIMT_KERNEL_LOG=<file>: every launch appends the kernel's name to the file (which
//    kernels a test selection runs; see the Makefile's sanitize-thread).
//  - Errors (invalid sync, deadlock, anything thrown by kernel code) abort the block; the
//    error of the lowest failing block is rethrown by simt::launch after all workers stopped
//    (blocks after it are not started), so the reported error is deterministic too.
//
// Sanitizers
//  - ASan: every stack switch is annotated (__sanitizer_start/finish_switch_fiber); the stack
//    of a fiber abandoned by an aborted block is unpoisoned before reuse; the unused tail of
//    the dynamic shared memory buffer is poisoned, so overruns of the requested size trap.
//  - TSan: every CUDA thread is a TSan fiber, switched without synchronization; the executor's
//    own bookkeeping runs with TSan's memory-access tracking off, and only the memory effects
//    CUDA guarantees are published: __syncthreads (and _count/_and/_or) and __syncwarp order
//    the memory accesses of the threads they synchronize, shuffles and votes order nothing,
//    block start/end order against the launching thread. Two threads of a block touching
//    shared memory without a barrier between them are reported as a race.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <cxxabi.h>
#include <dlfcn.h>
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#if !defined(__x86_64__) || defined(SIMT_FORCE_UCONTEXT)
#define SIMT_UCONTEXT 1
#include <ucontext.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#define SIMT_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SIMT_ASAN 1
#endif
#endif
#if defined(__SANITIZE_THREAD__)
#define SIMT_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define SIMT_TSAN 1
#endif
#endif

#if defined(SIMT_ASAN)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#if defined(SIMT_TSAN)
#include <sanitizer/tsan_interface.h>
extern "C" void __tsan_ignore_thread_begin(void);
extern "C" void __tsan_ignore_thread_end(void);
#endif
// Functions that switch stacks or never return: TSan must not instrument their entry/exit, or
// every fiber's shadow call stack would grow by their frames at each exit (TSan aborts when a
// shadow stack passes 65536 frames).
#define SIMT_NO_TSAN __attribute__((no_sanitize_thread))

#include "simt.h"

// ---------------------------------------------------------------------------------------------
// Context switch. x86-64 System V: save the callee-saved registers, MXCSR and the x87 control
// word on the current stack, swap stack pointers, restore. A new fiber's stack is laid out so
// that the first switch "returns" into simt_ctx_trampoline, which calls entry(arg).
#if !defined(SIMT_UCONTEXT)
extern "C" {
__attribute__((visibility("hidden"))) void simt_ctx_switch(void** save_sp, void* load_sp);
__attribute__((visibility("hidden"))) void simt_ctx_trampoline();
}
asm(R"(
    .text
    .p2align 4
    .globl simt_ctx_switch
    .hidden simt_ctx_switch
    .type simt_ctx_switch, @function
simt_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size simt_ctx_switch, .-simt_ctx_switch

    .p2align 4
    .globl simt_ctx_trampoline
    .hidden simt_ctx_trampoline
    .type simt_ctx_trampoline, @function
simt_ctx_trampoline:
    .cfi_startproc
    .cfi_undefined rip
    movq %r12, %rdi
    callq *%r13
    ud2
    .cfi_endproc
    .size simt_ctx_trampoline, .-simt_ctx_trampoline
)");
#endif

namespace simt {
namespace {

using detail::At;
using detail::ThreadCtx;

constexpr unsigned kRingSlots = 1024;  // TSan sync objects, one per barrier/warp-op instance
constexpr size_t kDefaultStackKiB = 256;
constexpr size_t kGuardBytes = 64 * 1024;
constexpr unsigned kDefaultThreads = 2;
constexpr unsigned kMaxThreads = 256;

std::string fmt(const char* format, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* format, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, format);
  int len = std::vsnprintf(buf, sizeof buf, format, ap);
  va_end(ap);
  if (len < 0) return "<format error>";
  return std::string(buf, std::min<size_t>(static_cast<size_t>(len), sizeof buf - 1));
}

// ---------------------------------------------------------------------------------------------
// Sanitizer hooks (no-ops in plain builds).
inline void tsan_release(void* addr) {
#if defined(SIMT_TSAN)
  __tsan_release(addr);
#else
  (void)addr;
#endif
}
inline void tsan_acquire(void* addr) {
#if defined(SIMT_TSAN)
  __tsan_acquire(addr);
#else
  (void)addr;
#endif
}

// ---------------------------------------------------------------------------------------------
// State.
enum class FState : unsigned char { Ready, Running, Barrier, Warp, Done };

struct Fiber {
  // context
  void* sp = nullptr;
#if defined(SIMT_UCONTEXT)
  ucontext_t uc;
#endif
  char* map = nullptr;
  size_t map_bytes = 0;
  char* stack_lo = nullptr;
  size_t stack_bytes = 0;
  // CUDA thread
  ThreadCtx ctx{};
  unsigned tid = 0;
  FState state = FState::Ready;
  bool dirty = false;    // left suspended by an aborted block: its stack needs unpoisoning
  // what it waits for, and what it gets
  int op = 0, bytes = 0, width = 32, param = 0;
  unsigned mask = 0;
  unsigned long long value = 0, result = 0;
  const char* file = nullptr;
  int line = 0;
  unsigned slot = 0;
  // sanitizers
  void* asan_fake = nullptr;
  void* tsan_fiber = nullptr;
  bool tsan_ignoring = false;
};

struct Group {  // a warp op in progress: the lanes of `mask` that arrived so far
  bool open = false;
  int op = 0, bytes = 0, width = 32;
  unsigned mask = 0, arrived = 0, slot = 0;
  const char* file = nullptr;
  int line = 0;
};

struct Warp {
  unsigned existing = 0, exited = 0;
  Group groups[32];
};

struct Launch {
  dim3 grid, block;
  size_t smem = 0;
  detail::BodyFn fn = nullptr;
  const void* body = nullptr;
  const void* kernel = nullptr;
  unsigned long long id = 0, nblocks = 0;
  unsigned nthreads = 0;
  size_t stack_bytes = 0;
  std::atomic<unsigned long long> next{0};
  std::atomic<unsigned long long> err_block{~0ull};
  std::mutex mu;
  std::exception_ptr error;
  std::string name;  // set on first error
  std::atomic<unsigned long long> blocks_run{0}, switches{0}, barriers{0}, warp_ops{0};
};

struct Block {
  Launch* L = nullptr;
  unsigned long long linear = 0;
  uint3 idx{0, 0, 0};
  unsigned n = 0;
  Fiber** f = nullptr;
  std::vector<unsigned> queue;
  unsigned qhead = 0, qcount = 0;
  unsigned live = 0, exited = 0, first_exited = 0;
  // the barrier in progress
  unsigned bar_arrived = 0, bar_slot = 0;
  int bar_op = 0, bar_acc = 0;
  const char* bar_file = nullptr;
  int bar_line = 0;
  std::vector<Warp> warps;
  Fiber* current = nullptr;
  std::exception_ptr error;
  unsigned ring_next = 0;
  unsigned long long switches = 0, barriers = 0, warp_ops = 0;
  unsigned char ring[kRingSlots] = {};
  unsigned char start_sync = 0, end_sync = 0;
};

struct Worker {
  unsigned index = 0;
  std::vector<Fiber*> fibers;
  size_t stack_bytes = 0;
  void* main_sp = nullptr;
#if defined(SIMT_UCONTEXT)
  ucontext_t main_uc;
#endif
  void* main_asan_fake = nullptr;
  const void* main_stack_lo = nullptr;
  size_t main_stack_bytes = 0;
  void* tsan_main = nullptr;
  unsigned char* smem = nullptr;
  size_t smem_cap = 0;
  Block block;
};

thread_local Worker* tls_worker = nullptr;

// ---------------------------------------------------------------------------------------------
// Names for messages.
const char* op_name(int op) {
  switch (op) {
    case detail::kShflIdx: return "__shfl_sync";
    case detail::kShflUp: return "__shfl_up_sync";
    case detail::kShflDown: return "__shfl_down_sync";
    case detail::kShflXor: return "__shfl_xor_sync";
    case detail::kBallot: return "__ballot_sync";
    case detail::kAny: return "__any_sync";
    case detail::kAll: return "__all_sync";
    case detail::kSyncwarp: return "__syncwarp";
  }
  return "<warp op>";
}
const char* bar_name(int op) {
  switch (op) {
    case detail::kBarCount: return "__syncthreads_count";
    case detail::kBarAnd: return "__syncthreads_and";
    case detail::kBarOr: return "__syncthreads_or";
  }
  return "__syncthreads";
}
std::string site(const char* file, int line) {
  if (!file) return "?";
  const char* base = std::strrchr(file, '/');
  return fmt("%s:%d", base ? base + 1 : file, line);
}
bool same_site(const char* f1, int l1, const char* f2, int l2) {
  return l1 == l2 && (f1 == f2 || (f1 && f2 && std::strcmp(f1, f2) == 0));
}
std::string lanes(unsigned m) {  // "0-15,17"
  std::string s;
  for (int i = 0; i < 32;) {
    if (!((m >> i) & 1u)) {
      ++i;
      continue;
    }
    int j = i;
    while (j + 1 < 32 && ((m >> (j + 1)) & 1u)) ++j;
    if (!s.empty()) s += ',';
    s += j == i ? fmt("%d", i) : fmt("%d-%d", i, j);
    i = j + 1;
  }
  return s.empty() ? "none" : s;
}

std::string kernel_name(const void* kernel) {
  if (!kernel) return "<kernel>";
  Dl_info info;
  if (dladdr(kernel, &info) && info.dli_sname && info.dli_saddr == kernel) {
    int status = 0;
    char* dem = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    std::string s = (status == 0 && dem) ? dem : info.dli_sname;
    std::free(dem);
    return s;
  }
  if (dladdr(kernel, &info) && info.dli_fname) {
    const char* base = std::strrchr(info.dli_fname, '/');
    return fmt("<kernel at %s+0x%lx>", base ? base + 1 : info.dli_fname,
               static_cast<unsigned long>(reinterpret_cast<uintptr_t>(kernel) -
                                          reinterpret_cast<uintptr_t>(info.dli_fbase)));
  }
  return fmt("<kernel at %p>", kernel);
}

std::string thread_name(const Block& b, unsigned tid) {
  const ThreadCtx& c = b.f[tid]->ctx;
  return fmt("thread (%u,%u,%u) [linear %u, warp %u lane %u]", c.thread_idx.x, c.thread_idx.y,
             c.thread_idx.z, tid, tid / 32, tid % 32);
}

std::string prefix(const Block& b) {
  const Launch& L = *b.L;
  return fmt("simt: kernel %s (launch #%llu, grid (%u,%u,%u), block (%u,%u,%u)), block (%u,%u,%u): ",
             kernel_name(L.kernel).c_str(), L.id, L.grid.x, L.grid.y, L.grid.z, L.block.x,
             L.block.y, L.block.z, b.idx.x, b.idx.y, b.idx.z);
}

[[noreturn]] void fail(const Block& b, const std::string& what) {
  throw std::runtime_error(prefix(b) + what);
}

std::exception_ptr make_error(const Block& b, const std::string& what) {
  return std::make_exception_ptr(std::runtime_error(prefix(b) + what));
}

std::string wait_desc(const Block& b, const Fiber* g) {
  switch (g->state) {
    case FState::Done: return "has exited";
    case FState::Barrier:
      return fmt("waits at %s (%s)", bar_name(b.bar_op), site(g->file, g->line).c_str());
    case FState::Warp:
      return fmt("waits at %s (mask 0x%08x, %s)", op_name(g->op), g->mask,
                 site(g->file, g->line).c_str());
    default: return "is runnable";
  }
}

// Called when no fiber of the block can run: explain why.
std::string diagnose(const Block& b) {
  for (unsigned wi = 0; wi < b.warps.size(); ++wi) {
    const Warp& w = b.warps[wi];
    const Group* best = nullptr;
    for (const Group& g : w.groups) {
      if (g.open && (!best || __builtin_ctz(g.arrived) < __builtin_ctz(best->arrived))) best = &g;
    }
    if (!best) continue;
    const Group& g = *best;
    unsigned missing = g.mask & ~g.arrived;
    if (!missing) continue;
    unsigned j = __builtin_ctz(missing);
    const Fiber* fj = b.f[wi * 32 + j];
    return fmt("deadlock: %s(mask 0x%08x) at %s: lanes %s of warp %u wait there, but lane %u, ",
               op_name(g.op), g.mask, site(g.file, g.line).c_str(), lanes(g.arrived).c_str(), wi,
               j) +
           thread_name(b, wi * 32 + j) + ", " + wait_desc(b, fj) +
           "; every lane of the mask must reach the same warp op";
  }
  if (b.bar_arrived > 0) {
    for (unsigned t = 0; t < b.n; ++t) {
      const Fiber* ft = b.f[t];
      if (ft->state == FState::Barrier) continue;
      return fmt("deadlock: %u of %u threads wait at %s (%s), but ", b.bar_arrived, b.n,
                 bar_name(b.bar_op), site(b.bar_file, b.bar_line).c_str()) +
             thread_name(b, t) + " " + wait_desc(b, ft) +
             "; every thread of the block must reach every __syncthreads";
    }
  }
  return "deadlock: no thread of the block can make progress";
}

// ---------------------------------------------------------------------------------------------
// Scheduling.
Fiber* pop(Block& b) {
  if (b.qcount == 0) return nullptr;
  unsigned t = b.queue[b.qhead];
  if (++b.qhead == b.n) b.qhead = 0;
  --b.qcount;
  return b.f[t];
}
void push(Block& b, Fiber* f) {
  unsigned pos = b.qhead + b.qcount;
  if (pos >= b.n) pos -= b.n;
  b.queue[pos] = f->tid;
  ++b.qcount;
  f->state = FState::Ready;
}
unsigned new_slot(Block& b) {
  unsigned s = b.ring_next++;
  return s % kRingSlots;
}

void fiber_entry(void* arg);

#if defined(SIMT_UCONTEXT)
SIMT_NO_TSAN void uc_entry(unsigned hi, unsigned lo) {
  fiber_entry(reinterpret_cast<void*>((static_cast<uintptr_t>(hi) << 32) | lo));
}
#endif

void ctx_init(Fiber* f) {
#if defined(SIMT_UCONTEXT)
  getcontext(&f->uc);
  f->uc.uc_stack.ss_sp = f->stack_lo;
  f->uc.uc_stack.ss_size = f->stack_bytes;
  f->uc.uc_link = nullptr;
  uintptr_t p = reinterpret_cast<uintptr_t>(f);
  makecontext(&f->uc, reinterpret_cast<void (*)()>(&uc_entry), 2,
              static_cast<unsigned>(p >> 32), static_cast<unsigned>(p & 0xffffffffu));
#else
  uintptr_t top = (reinterpret_cast<uintptr_t>(f->stack_lo) + f->stack_bytes) & ~uintptr_t(15);
  uint64_t* s = reinterpret_cast<uint64_t*>(top);
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  s[-1] = 0;
  s[-2] = 0;
  s[-3] = reinterpret_cast<uint64_t>(&simt_ctx_trampoline);  // return address
  s[-4] = 0;                                                 // rbp: ends frame-pointer chains
  s[-5] = 0;                                                 // rbx
  s[-6] = reinterpret_cast<uint64_t>(f);                     // r12: argument
  s[-7] = reinterpret_cast<uint64_t>(&fiber_entry);          // r13: entry
  s[-8] = 0;                                                 // r14
  s[-9] = 0;                                                 // r15
  s[-10] = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpucw) << 32);
  f->sp = &s[-10];
#endif
}

// Switches from `from` (null: the worker's own context) to `to` (null: the worker's context).
// `exiting`: `from` never resumes.
SIMT_NO_TSAN void switch_to(Worker& w, Fiber* from, Fiber* to, bool exiting) {
  Block& b = w.block;
  ++b.switches;
  b.current = to;
  detail::tls_ctx = to ? &to->ctx : nullptr;
  if (to) to->state = FState::Running;
#if defined(SIMT_ASAN)
  if (exiting && from) {
    // The frames of this exit path are abandoned, their redzones still poisoned; the fiber's
    // next life reuses the stack, and uninstrumented code (the ASan runtime itself, libc)
    // would trip over that stale poison. Clear it from just below this frame to the top.
    char* frame = static_cast<char*>(__builtin_frame_address(0));
    char* lo = std::max(from->stack_lo, frame - 4096);
    __asan_unpoison_memory_region(lo, static_cast<size_t>(from->stack_lo + from->stack_bytes - lo));
  }
  void** fake_save = exiting ? nullptr : (from ? &from->asan_fake : &w.main_asan_fake);
  __sanitizer_start_switch_fiber(fake_save, to ? to->stack_lo : w.main_stack_lo,
                                 to ? to->stack_bytes : w.main_stack_bytes);
#else
  (void)exiting;
#endif
#if defined(SIMT_TSAN)
  __tsan_switch_to_fiber(to ? to->tsan_fiber : w.tsan_main, __tsan_switch_to_fiber_no_sync);
#endif
#if defined(SIMT_UCONTEXT)
  swapcontext(from ? &from->uc : &w.main_uc, to ? &to->uc : &w.main_uc);
#else
  simt_ctx_switch(from ? &from->sp : &w.main_sp, to ? to->sp : w.main_sp);
#endif
#if defined(SIMT_ASAN)
  __sanitizer_finish_switch_fiber(from ? from->asan_fake : w.main_asan_fake, nullptr, nullptr);
#endif
}

// Blocks the running fiber `self` (its state says what it waits for) until released.
void wait_here(Worker& w, Fiber* self) {
  Block& b = w.block;
  Fiber* next = pop(b);
  if (!next) fail(b, diagnose(b));
  switch_to(w, self, next, false);
}

// TSan: the executor's bookkeeping is not the kernel's memory; its accesses are not tracked.
struct Untracked {
  Fiber* f;
  explicit Untracked(Fiber* fiber) : f(fiber) {
#if defined(SIMT_TSAN)
    __tsan_ignore_thread_begin();
    if (f) f->tsan_ignoring = true;
#endif
  }
  ~Untracked() {
#if defined(SIMT_TSAN)
    if (f) f->tsan_ignoring = false;
    __tsan_ignore_thread_end();
#endif
  }
  Untracked(const Untracked&) = delete;
  Untracked& operator=(const Untracked&) = delete;
};

[[noreturn]] SIMT_NO_TSAN void fiber_exit(Worker& w, Fiber* f, std::exception_ptr* err_in) {
  Block& b = w.block;
  std::exception_ptr err = std::move(*err_in);
  f->state = FState::Done;
  --b.live;
  if (b.exited++ == 0) b.first_exited = f->tid;
  unsigned lane = f->tid % 32;
  Warp& wp = b.warps[f->tid / 32];
  wp.exited |= 1u << lane;
  if (!err && b.bar_arrived > 0) {
    err = make_error(b, thread_name(b, f->tid) +
                            fmt(" returned while %u of %u threads wait at %s (%s); every thread "
                                "of the block must reach every __syncthreads",
                                b.bar_arrived, b.n, bar_name(b.bar_op),
                                site(b.bar_file, b.bar_line).c_str()));
  }
  if (!err) {
    for (const Group& g : wp.groups) {
      if (g.open && ((g.mask >> lane) & 1u)) {
        err = make_error(b, thread_name(b, f->tid) +
                                fmt(" returned while lanes %s wait for it at %s(mask 0x%08x) "
                                    "(%s)",
                                    lanes(g.arrived).c_str(), op_name(g.op), g.mask,
                                    site(g.file, g.line).c_str()));
        break;
      }
    }
  }
  Fiber* next = nullptr;
  if (!err) {
    next = pop(b);
    if (!next && b.live > 0) err = make_error(b, diagnose(b));
  }
  if (err) {
    if (!b.error) b.error = std::move(err);
    err = nullptr;
    next = nullptr;
  }
  // Nothing with a destructor may stay alive in this frame: it never returns.
  switch_to(w, f, next, true);
  __builtin_trap();
}

SIMT_NO_TSAN void fiber_entry(void* arg) {
  Fiber* f = static_cast<Fiber*>(arg);
#if defined(SIMT_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
#if defined(SIMT_TSAN)
  if (f->tsan_ignoring) {
    f->tsan_ignoring = false;
    __tsan_ignore_thread_end();
  }
#endif
  Worker& w = *tls_worker;
  Launch& L = *w.block.L;
  tsan_acquire(&w.block.start_sync);
  std::exception_ptr err;
  try {
    L.fn(L.body);
  } catch (...) {
    err = std::current_exception();
  }
  tsan_release(&w.block.end_sync);
#if defined(SIMT_TSAN)
  __tsan_ignore_thread_begin();
  f->tsan_ignoring = true;
#endif
  fiber_exit(w, f, &err);
}

// ---------------------------------------------------------------------------------------------
// Per-worker resources.
size_t page_size() {
  static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}

// TSan, for a fiber that will not run again in this life (suspended by an aborted block, or
// about to be destroyed): publish its memory accesses (release on `addr`) and end the ignore
// scope it was suspended in. Only TSan's notion of the current fiber changes; no stack switch.
SIMT_NO_TSAN void tsan_settle(Worker& w, Fiber* f, void* addr) {
#if defined(SIMT_TSAN)
  if (!f->tsan_fiber) return;
  __tsan_switch_to_fiber(f->tsan_fiber, __tsan_switch_to_fiber_no_sync);
  if (f->tsan_ignoring) {
    f->tsan_ignoring = false;
    __tsan_ignore_thread_end();
  }
  if (addr) __tsan_release(addr);
  __tsan_switch_to_fiber(w.tsan_main, __tsan_switch_to_fiber_no_sync);
#else
  (void)w;
  (void)f;
  (void)addr;
#endif
}

void free_fiber(Worker& w, Fiber* f) {
  if (f->map) munmap(f->map, f->map_bytes);
#if defined(SIMT_TSAN)
  tsan_settle(w, f, nullptr);
  if (f->tsan_fiber) __tsan_destroy_fiber(f->tsan_fiber);
#else
  (void)w;
#endif
  delete f;
}

void new_tsan_fiber(Worker& w, Fiber* f) {
#if defined(SIMT_TSAN)
  if (f->tsan_fiber) {
    tsan_settle(w, f, nullptr);
    __tsan_destroy_fiber(f->tsan_fiber);
  }
  f->tsan_fiber = __tsan_create_fiber(0);
  f->tsan_ignoring = false;
  char name[64];
  std::snprintf(name, sizeof name, "simt worker %u, CUDA thread %u", w.index, f->tid);
  __tsan_set_fiber_name(f->tsan_fiber, name);
#else
  (void)w;
  (void)f;
#endif
}

Fiber* new_fiber(Worker& w, unsigned tid, size_t stack_bytes) {
  std::unique_ptr<Fiber> f(new Fiber);
  f->map_bytes = kGuardBytes + stack_bytes;
  void* m = mmap(nullptr, f->map_bytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
  if (m == MAP_FAILED) {
    throw std::runtime_error(fmt("simt: cannot map a %zu-byte fiber stack", f->map_bytes));
  }
  f->map = static_cast<char*>(m);
  if (mprotect(f->map, kGuardBytes, PROT_NONE) != 0) {
    munmap(f->map, f->map_bytes);
    f->map = nullptr;
    throw std::runtime_error("simt: cannot protect a fiber stack guard");
  }
  f->stack_lo = f->map + kGuardBytes;
  f->stack_bytes = stack_bytes;
  f->tid = tid;
  new_tsan_fiber(w, f.get());
  return f.release();
}

void ensure_resources(Worker& w, unsigned n, size_t stack_bytes) {
  if (w.stack_bytes != stack_bytes) {
    for (Fiber* f : w.fibers) free_fiber(w, f);
    w.fibers.clear();
    w.stack_bytes = stack_bytes;
  }
  while (w.fibers.size() < n) {
    w.fibers.push_back(new_fiber(w, static_cast<unsigned>(w.fibers.size()), stack_bytes));
  }
  if (!w.smem) {
    w.smem_cap = (kMaxDynamicSharedBytes + page_size() - 1) / page_size() * page_size();
    void* m = mmap(nullptr, w.smem_cap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
    if (m == MAP_FAILED) throw std::runtime_error("simt: cannot map dynamic shared memory");
    w.smem = static_cast<unsigned char*>(m);
  }
}

// ---------------------------------------------------------------------------------------------
// Blocks.
void run_block(Worker& w, Launch& L, unsigned long long linear) {
  Untracked untracked(nullptr);
  const unsigned n = L.nthreads;
  ensure_resources(w, n, L.stack_bytes);
  Block& b = w.block;
  b.L = &L;
  b.linear = linear;
  b.idx = uint3{static_cast<unsigned>(linear % L.grid.x),
                static_cast<unsigned>((linear / L.grid.x) % L.grid.y),
                static_cast<unsigned>(linear / (static_cast<unsigned long long>(L.grid.x) *
                                                L.grid.y))};
  b.n = n;
  b.f = w.fibers.data();
  b.queue.resize(n);
  b.qhead = 0;
  b.qcount = 0;
  b.live = n;
  b.exited = 0;
  b.first_exited = 0;
  b.bar_arrived = 0;
  b.current = nullptr;
  b.error = nullptr;
  b.switches = b.barriers = b.warp_ops = 0;
  const unsigned nwarps = (n + 31) / 32;
  b.warps.assign(nwarps, Warp{});
  for (unsigned wi = 0; wi < nwarps; ++wi) {
    unsigned cnt = std::min(32u, n - wi * 32);
    b.warps[wi].existing = cnt == 32 ? 0xffffffffu : ((1u << cnt) - 1);
  }
  // Dynamic shared memory: 0xff bytes (NaN / -1), and under ASan the rest is poisoned.
#if defined(SIMT_ASAN)
  __asan_unpoison_memory_region(w.smem, w.smem_cap);
#endif
  std::memset(w.smem, 0xff, L.smem);
#if defined(SIMT_ASAN)
  __asan_poison_memory_region(w.smem + L.smem, w.smem_cap - L.smem);
#endif
  const dim3 bd = L.block;
  for (unsigned t = 0; t < n; ++t) {
    Fiber* f = w.fibers[t];
    if (f->dirty) {
#if defined(SIMT_ASAN)
      __asan_unpoison_memory_region(f->stack_lo, f->stack_bytes);
#endif
      // A fresh TSan fiber: the old one's shadow call stack still holds the abandoned frames.
      new_tsan_fiber(w, f);
      f->asan_fake = nullptr;
      f->dirty = false;
    }
    f->ctx.thread_idx = uint3{t % bd.x, (t / bd.x) % bd.y, t / (bd.x * bd.y)};
    f->ctx.block_idx = b.idx;
    f->ctx.block_dim = L.block;
    f->ctx.grid_dim = L.grid;
    f->ctx.dynamic_smem = w.smem;
    ctx_init(f);
    push(b, f);
  }
  tsan_release(&b.start_sync);
  Fiber* first = pop(b);
  switch_to(w, nullptr, first, false);
  // Back here when every fiber exited, or the block failed.
  if (b.error) {
    for (unsigned t = 0; t < n; ++t) {
      Fiber* f = w.fibers[t];
      if (f->state != FState::Done) {
        f->dirty = true;  // suspended mid-stack, never resumed
        tsan_settle(w, f, &b.end_sync);
      }
    }
  }
  tsan_acquire(&b.end_sync);
  detail::tls_ctx = nullptr;
  L.switches.fetch_add(b.switches, std::memory_order_relaxed);
  L.barriers.fetch_add(b.barriers, std::memory_order_relaxed);
  L.warp_ops.fetch_add(b.warp_ops, std::memory_order_relaxed);
  L.blocks_run.fetch_add(1, std::memory_order_relaxed);
  if (b.error) {
    std::lock_guard<std::mutex> lock(L.mu);
    if (linear < L.err_block.load(std::memory_order_relaxed)) {
      L.err_block.store(linear, std::memory_order_relaxed);
      L.error = b.error;
    }
    b.error = nullptr;
  }
}

void record_error(Launch& L, unsigned long long linear, std::exception_ptr e) {
  std::lock_guard<std::mutex> lock(L.mu);
  if (linear < L.err_block.load(std::memory_order_relaxed)) {
    L.err_block.store(linear, std::memory_order_relaxed);
    L.error = std::move(e);
  }
}

void work(Worker& w, Launch& L) {
  for (;;) {
    unsigned long long linear = L.next.fetch_add(1, std::memory_order_relaxed);
    if (linear >= L.nblocks || linear > L.err_block.load(std::memory_order_relaxed)) break;
    try {
      run_block(w, L, linear);
    } catch (...) {  // resources (mmap) failed outside any fiber
      record_error(L, linear, std::current_exception());
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The worker pool.
struct Pool {
  explicit Pool(pid_t p) : pid(p) {}
  pid_t pid;
  std::mutex launch_mu;  // one launch at a time
  std::mutex mu;
  std::condition_variable cv_work, cv_done;
  unsigned nthreads = 0;
  unsigned long long gen = 0, launches = 0;
  Launch* job = nullptr;
  unsigned job_workers = 0, active = 0;
};

void worker_main(Pool* p, unsigned index) {
  Worker* w = new Worker;  // lives as long as the thread: forever
  w->index = index;
  tls_worker = w;
  pthread_attr_t attr;
  if (pthread_getattr_np(pthread_self(), &attr) == 0) {
    void* addr = nullptr;
    size_t size = 0;
    pthread_attr_getstack(&attr, &addr, &size);
    w->main_stack_lo = addr;
    w->main_stack_bytes = size;
    pthread_attr_destroy(&attr);
  }
#if defined(SIMT_TSAN)
  w->tsan_main = __tsan_get_current_fiber();
#endif
  unsigned long long seen = 0;
  std::unique_lock<std::mutex> lock(p->mu);
  for (;;) {
    p->cv_work.wait(lock, [&] { return p->gen != seen; });
    seen = p->gen;
    if (index >= p->job_workers) continue;
    Launch* L = p->job;
    lock.unlock();
    work(*w, *L);
    lock.lock();
    if (--p->active == 0) p->cv_done.notify_all();
  }
}

Pool* get_pool() {
  static std::mutex m;
  static Pool* pool = nullptr;  // never destroyed: its threads wait forever
  std::lock_guard<std::mutex> lock(m);
  if (!pool || pool->pid != getpid()) pool = new Pool(getpid());  // fresh after fork()
  return pool;
}

unsigned long env_number(const char* name, unsigned long dflt, unsigned long lo,
                         unsigned long hi) {
  const char* s = std::getenv(name);
  if (!s || !*s) return dflt;
  char* end = nullptr;
  unsigned long v = std::strtoul(s, &end, 10);
  if (*end != '\0' || v < lo || v > hi || s[0] == '-') {
    throw std::runtime_error(fmt("simt: %s must be an integer in [%lu, %lu], got '%s'", name,
                                 lo, hi, s));
  }
  return v;
}

std::mutex stats_mu;
LaunchStats stats_last;

// VSE_SIMT_KERNEL_LOG: one line per launch, the kernel's name.
void log_kernel(const void* kernel) {
  const char* path = std::getenv("VSE_SIMT_KERNEL_LOG");
  if (!path || !*path) return;
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  if (FILE* f = std::fopen(path, "a")) {
    std::fprintf(f, "%s\n", kernel_name(kernel).c_str());
    std::fclose(f);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Sync operations (called from fibers).
namespace detail {

[[noreturn]] void outside_kernel(const char* what) {
  throw std::runtime_error(std::string("simt: ") + what +
                           " used outside a kernel launched by simt::launch");
}

int At::barrier(int op, int predicate) const {
  Worker* w = tls_worker;
  if (!w || !w->block.current) outside_kernel(bar_name(op));
  Block& b = w->block;
  Fiber* self = b.current;
  Untracked untracked(self);
  if (b.exited > 0) {
    fail(b, thread_name(b, self->tid) +
                fmt(" reached %s (%s) but ", bar_name(op), site(file, line).c_str()) +
                thread_name(b, b.first_exited) +
                " has exited without reaching it; every thread of the block must reach every "
                "__syncthreads");
  }
  if (b.bar_arrived == 0) {
    b.bar_op = op;
    b.bar_file = file;
    b.bar_line = line;
    b.bar_slot = new_slot(b);
    b.bar_acc = op == kBarAnd ? 1 : 0;
  } else if (!same_site(file, line, b.bar_file, b.bar_line) || op != b.bar_op) {
    unsigned other = 0;
    while (b.f[other]->state != FState::Barrier) ++other;
    fail(b, fmt("divergent barrier: %u thread(s) wait at %s (%s), first ", b.bar_arrived,
                bar_name(b.bar_op), site(b.bar_file, b.bar_line).c_str()) +
                thread_name(b, other) + ", but " + thread_name(b, self->tid) +
                fmt(" reached %s (%s); all threads of a block must reach the same barrier",
                    bar_name(op), site(file, line).c_str()));
  }
  tsan_release(&b.ring[b.bar_slot]);
  self->slot = b.bar_slot;
  const int pred = predicate != 0;
  switch (op) {
    case kBarCount: b.bar_acc += pred; break;
    case kBarAnd: b.bar_acc &= pred; break;
    case kBarOr: b.bar_acc |= pred; break;
    default: break;
  }
  if (++b.bar_arrived == b.n) {
    const int result = b.bar_acc;
    b.bar_arrived = 0;
    ++b.barriers;
    for (unsigned t = 0; t < b.n; ++t) {
      Fiber* ft = b.f[t];
      if (ft->state == FState::Barrier) {
        ft->result = static_cast<unsigned long long>(result);
        push(b, ft);
      }
    }
    self->result = static_cast<unsigned long long>(result);
  } else {
    self->state = FState::Barrier;
    self->file = file;
    self->line = line;
    wait_here(*w, self);
  }
  tsan_acquire(&b.ring[self->slot]);
  return static_cast<int>(self->result);
}

unsigned long long At::warp(int op, int value_bytes, unsigned mask, unsigned long long value,
                            int param, int width) const {
  Worker* w = tls_worker;
  if (!w || !w->block.current) outside_kernel(op_name(op));
  Block& b = w->block;
  Fiber* self = b.current;
  Untracked untracked(self);
  const unsigned lane = self->tid % 32;
  const unsigned wi = self->tid / 32;
  Warp& wp = b.warps[wi];
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    fail(b, thread_name(b, self->tid) +
                fmt(" called %s (%s) with width %d; width must be a power of 2 in [1, 32]",
                    op_name(op), site(file, line).c_str(), width));
  }
  if (!((mask >> lane) & 1u)) {
    fail(b, thread_name(b, self->tid) +
                fmt(" called %s (%s) with mask 0x%08x, which does not include its own lane",
                    op_name(op), site(file, line).c_str(), mask));
  }
  if (mask & ~wp.existing) {
    fail(b, thread_name(b, self->tid) +
                fmt(" called %s (%s) with mask 0x%08x, but warp %u of this %u-thread block "
                    "has only lanes %s",
                    op_name(op), site(file, line).c_str(), mask, wi, b.n,
                    lanes(wp.existing).c_str()));
  }
  if (mask & wp.exited) {
    unsigned j = __builtin_ctz(mask & wp.exited);
    fail(b, thread_name(b, self->tid) +
                fmt(" called %s (%s) with mask 0x%08x, but lane %u of that mask, ", op_name(op),
                    site(file, line).c_str(), mask, j) +
                thread_name(b, wi * 32 + j) + ", has exited");
  }
  Group* g = nullptr;
  Group* free_group = nullptr;
  for (Group& c : wp.groups) {
    if (!c.open) {
      if (!free_group) free_group = &c;
    } else if (c.op == op && c.mask == mask && c.bytes == value_bytes && c.width == width) {
      g = &c;
      break;
    }
  }
  if (!g) {
    g = free_group;  // at most 31 groups are open: each holds a waiting lane other than this one
    if (!g) fail(b, "internal error: no free warp-op group");
    g->open = true;
    g->op = op;
    g->bytes = value_bytes;
    g->mask = mask;
    g->width = width;
    g->arrived = 0;
    g->slot = new_slot(b);
    g->file = file;
    g->line = line;
  }
  if (op == kSyncwarp) tsan_release(&b.ring[g->slot]);
  g->arrived |= 1u << lane;
  self->op = op;
  self->bytes = value_bytes;
  self->mask = mask;
  self->width = width;
  self->param = param;
  self->value = value;
  self->file = file;
  self->line = line;
  self->slot = g->slot;
  if (g->arrived == mask) {
    // Everyone is here: compute every member's result (PTX shfl.sync / vote.sync semantics).
    Fiber** lanes_f = b.f + wi * 32;
    unsigned long long ballot = 0;
    if (op == kBallot || op == kAny || op == kAll) {
      for (unsigned m = mask; m; m &= m - 1) {
        unsigned l = __builtin_ctz(m);
        if (lanes_f[l]->value) ballot |= 1ull << l;
      }
    }
    for (unsigned m = mask; m; m &= m - 1) {
      unsigned i = __builtin_ctz(m);
      Fiber* fi = lanes_f[i];
      unsigned long long r = 0;
      switch (op) {
        case kShflIdx:
        case kShflUp:
        case kShflDown:
        case kShflXor: {
          // PTX: b = operand[4:0]; segment = [seg_lo, seg_hi] of `width` lanes; for up the
          // clamp is seg_lo (j >= seg_lo), for the others seg_hi (j <= seg_hi).
          const int seg_lo = static_cast<int>(i) & ~(width - 1);
          const int seg_hi = seg_lo + width - 1;
          const int bval = fi->param & 31;
          int j = 0;
          bool in_range = true;
          if (op == kShflIdx) {
            j = seg_lo | (bval & (width - 1));
          } else if (op == kShflUp) {
            j = static_cast<int>(i) - bval;
            in_range = j >= seg_lo;
          } else if (op == kShflDown) {
            j = static_cast<int>(i) + bval;
            in_range = j <= seg_hi;
          } else {
            j = static_cast<int>(i) ^ bval;
            in_range = j <= seg_hi;
          }
          if (!in_range) {
            r = fi->value;  // out of the segment: the lane keeps its own value
          } else if (j >= 0 && j < 32 && ((mask >> j) & 1u)) {
            r = lanes_f[j]->value;
          } else {
            r = ~0ull;  // source lane not in the mask: undefined in CUDA; NaN / -1 here
          }
          break;
        }
        case kBallot: r = ballot; break;
        case kAny: r = ballot != 0; break;
        case kAll: r = ballot == mask; break;
        default: r = 0; break;
      }
      fi->result = r;
    }
    g->open = false;
    ++b.warp_ops;
    for (unsigned m = mask; m; m &= m - 1) {
      Fiber* fi = lanes_f[__builtin_ctz(m)];
      if (fi != self) push(b, fi);
    }
  } else {
    self->state = FState::Warp;
    wait_here(*w, self);
  }
  if (op == kSyncwarp) tsan_acquire(&b.ring[self->slot]);
  return self->result;
}

void launch_impl(dim3 grid, dim3 block, size_t dynamic_smem_bytes, BodyFn fn, const void* body,
                 const void* kernel) {
  if (block.x < 1 || block.y < 1 || block.z < 1) {
    throw std::runtime_error(fmt("simt::launch: block dimensions must be >= 1, got (%u,%u,%u)",
                                 block.x, block.y, block.z));
  }
  const unsigned long long nthreads =
      static_cast<unsigned long long>(block.x) * block.y * block.z;
  if (block.x > kMaxBlockDimX || block.y > kMaxBlockDimY || block.z > kMaxBlockDimZ ||
      nthreads > kMaxThreadsPerBlock) {
    throw std::runtime_error(fmt(
        "simt::launch: block (%u,%u,%u) = %llu threads is invalid; CUDA allows at most %u "
        "threads per block and dimensions of at most (%u,%u,%u)",
        block.x, block.y, block.z, nthreads, kMaxThreadsPerBlock, kMaxBlockDimX, kMaxBlockDimY,
        kMaxBlockDimZ));
  }
  if (grid.x > kMaxGridDimX || grid.y > kMaxGridDimYZ || grid.z > kMaxGridDimYZ) {
    throw std::runtime_error(fmt("simt::launch: grid (%u,%u,%u) exceeds CUDA's limits (%llu,%u,%u)",
                                 grid.x, grid.y, grid.z, kMaxGridDimX, kMaxGridDimYZ,
                                 kMaxGridDimYZ));
  }
  if (dynamic_smem_bytes > kMaxDynamicSharedBytes) {
    throw std::runtime_error(fmt("simt::launch: %zu bytes of dynamic shared memory requested; "
                                 "the limit is %zu (227 KiB)",
                                 dynamic_smem_bytes, kMaxDynamicSharedBytes));
  }
  if (tls_worker) {
    throw std::runtime_error("simt::launch: called from inside a kernel (no dynamic parallelism)");
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  const unsigned threads = static_cast<unsigned>(
      env_number("VSE_SIMT_THREADS", kDefaultThreads, 1, kMaxThreads));
  const size_t stack_kib = env_number("VSE_SIMT_STACK_KB", kDefaultStackKiB, 64, 1u << 20);
  log_kernel(kernel);

  Launch L;
  L.grid = grid;
  L.block = block;
  L.smem = dynamic_smem_bytes;
  L.fn = fn;
  L.body = body;
  L.kernel = kernel;
  L.nblocks = static_cast<unsigned long long>(grid.x) * grid.y * grid.z;
  L.nthreads = static_cast<unsigned>(nthreads);
  L.stack_bytes = (stack_kib * 1024 + page_size() - 1) / page_size() * page_size();
  const unsigned nworkers =
      static_cast<unsigned>(std::min<unsigned long long>(threads, L.nblocks));

  Pool* p = get_pool();
  std::lock_guard<std::mutex> launch_lock(p->launch_mu);
  L.id = ++p->launches;
  {
    std::unique_lock<std::mutex> lock(p->mu);
    while (p->nthreads < nworkers) {
      std::thread(worker_main, p, p->nthreads).detach();
      ++p->nthreads;
    }
    p->job = &L;
    p->job_workers = nworkers;
    p->active = nworkers;
    ++p->gen;
    p->cv_work.notify_all();
    p->cv_done.wait(lock, [&] { return p->active == 0; });
    p->job = nullptr;
  }
  {
    std::lock_guard<std::mutex> lock(stats_mu);
    stats_last.launch_id = L.id;
    stats_last.workers = nworkers;
    stats_last.blocks = L.blocks_run.load();
    stats_last.switches = L.switches.load();
    stats_last.barriers = L.barriers.load();
    stats_last.warp_ops = L.warp_ops.load();
  }
  if (L.error) std::rethrow_exception(L.error);
}

}  // namespace detail

LaunchStats last_launch_stats() {
  std::lock_guard<std::mutex> lock(stats_mu);
  return stats_last;
}

}  // namespace simt
