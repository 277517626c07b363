"""The SIMT executor (csrc/simt) through the test-only kernels of csrc/simt/selftest.cu.

Every kernel is checked element by element against plain torch; values are chosen so that the
expected results are exact (small integers in float), so any executor bug shows as a mismatch.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vse_cuda import _lib

SIZES = [1, 2, 3, 31, 97, 1000, 4099, 65537]
# (bx, by, bz): warp-sized, not multiples of 32, and 2-D/3-D shapes
BLOCKS_ANY = [
    (1, 1, 1), (32, 1, 1), (64, 1, 1), (96, 1, 1), (256, 1, 1), (1024, 1, 1),
    (7, 1, 1), (33, 1, 1), (100, 1, 1), (8, 4, 2), (5, 3, 7), (16, 16, 4),
]
WARP_BLOCKS = [32, 64, 96, 256, 1024]
PARTIAL_WARP_BLOCKS = [1, 7, 40, 48, 100]
MAX_DYNAMIC_SMEM = 227 * 1024


@pytest.fixture(scope="module")
def ops():
    return _lib.simt_ops()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _ceil_div(a, b):
    return (a + b - 1) // b


def _padded(x, blocks, nt, fill=0):
    """x laid out per block: shape (blocks, nt), `fill` past the end."""
    out = torch.full((blocks * nt,), fill, dtype=x.dtype)
    out[: x.numel()] = x
    return out.view(blocks, nt)


def _stats(ops):
    names = ("launch_id", "workers", "blocks", "switches", "barriers", "warp_ops")
    return dict(zip(names, ops.selftest_last_launch_stats().tolist()))


# ---------------------------------------------------------------------------------------------
# (1) static shared memory + __syncthreads tree reduction (+ __syncthreads_count/and/or)
@pytest.mark.parametrize("block", BLOCKS_ANY, ids=lambda b: "x".join(map(str, b)))
@pytest.mark.parametrize("n", SIZES)
def test_block_sum(ops, n, block):
    nt = block[0] * block[1] * block[2]
    x = torch.randint(-8, 9, (n,), generator=_gen(n * 7 + nt)).float()
    sums, counts = ops.selftest_block_sum(x, *block)
    blocks = _ceil_div(n, nt)
    tiles = _padded(x, blocks, nt)
    assert torch.equal(sums, tiles.sum(1))
    positive = tiles > 0
    expected = torch.stack([positive.sum(1), positive.all(1), positive.any(1)], 1).int()
    assert torch.equal(counts, expected)
    st = _stats(ops)
    assert st["blocks"] == blocks
    # count + and + or + one per level of the tree
    assert st["barriers"] == blocks * (3 + (nt - 1).bit_length())


# ---------------------------------------------------------------------------------------------
# (2) warp shuffles (idx/up/down/xor, 4- and 8-byte, width 16) and votes
def _warp_reference(x, block):
    n = x.numel()
    blocks = _ceil_div(n, block)
    wpb = _ceil_div(block, 32)
    vals = torch.zeros(blocks, wpb * 32, dtype=torch.int64)
    vals[:, :block] = _padded(x.long(), blocks, block)
    exists = torch.zeros(wpb * 32, dtype=torch.bool)
    exists[:block] = True
    vals = vals.view(blocks, wpb, 32)
    exists = exists.view(wpb, 32)
    nlanes = exists.sum(1)  # (wpb,)
    lane = torch.arange(32)
    full = (nlanes == 32).view(1, wpb, 1).expand(blocks, wpb, 32)

    down_sum = vals.sum(2).double().reshape(-1)
    src = (7 * lane.view(1, 32) + 3) % nlanes.view(wpb, 1)  # (wpb, 32)
    bcast = torch.gather(vals, 2, src.expand(blocks, wpb, 32))
    bits = ((vals > 0) & exists).long() << lane
    ballot = bits.sum(2)
    ballot = torch.where(ballot >= 2**31, ballot - 2**32, ballot)
    any_pos = ((vals > 0) & exists).any(2)
    all_nonneg = ((vals >= 0) | ~exists).all(2)
    votes = torch.stack([ballot, any_pos.long(), all_nonneg.long()], 2).view(-1, 3).int()

    xor_sum = vals.sum(2, keepdim=True).expand(blocks, wpb, 32)
    scan = vals.cumsum(2)
    half = vals.view(blocks, wpb, 2, 16).sum(3, keepdim=True).expand(blocks, wpb, 2, 16)
    half = half.reshape(blocks, wpb, 32)

    def per_thread(t, untouched, only_full=True):
        t = torch.where(full, t, torch.full_like(t, untouched)) if only_full else t
        return t.reshape(blocks, wpb * 32)[:, :block].reshape(-1)[:n]

    return [
        per_thread(xor_sum, -7).int(),
        per_thread(scan, -7).float(),
        per_thread(bcast, 0, only_full=False).int(),
        per_thread(half, -7),
        down_sum,
        votes,
    ]


@pytest.mark.parametrize("block", WARP_BLOCKS + PARTIAL_WARP_BLOCKS)
@pytest.mark.parametrize("n", SIZES)
def test_warp_ops(ops, n, block):
    x = torch.randint(0, 10, (n,), generator=_gen(n + 13 * block)).int()
    x[::37] = -1  # some warps get a negative value: __all_sync(v >= 0) is false there
    got = ops.selftest_warp_ops(x, block)
    want = _warp_reference(x, block)
    names = ["xor_sum", "scan", "bcast", "half_sum", "down_sum", "votes"]
    for name, g, w in zip(names, got, want):
        assert g.dtype == w.dtype and torch.equal(g, w), name
    st = _stats(ops)
    blocks = _ceil_div(n, block)
    full_warps = block // 32
    partial = 1 if block % 32 else 0
    # per full warp: 1 idx + 5 down + 3 votes + 5 xor + 5 up + 4 width-16 xor + 1 syncwarp
    assert st["warp_ops"] == blocks * (24 * full_warps + 9 * partial)


def _ptx_shfl(op, b, width, lane):
    """Source lane of PTX shfl.sync (CUDA's __shfl*_sync): only b[4:0] counts; up clamps at
    the start of the lane's width segment, the other modes at its end; out of range -> own."""
    bval = b & 31
    lo = lane & ~(width - 1)
    hi = lo + width - 1
    if op == 0:
        return lo | (bval & (width - 1))
    j = {1: lane - bval, 2: lane + bval, 3: lane ^ bval}[op]
    ok = j >= lo if op == 1 else j <= hi
    return j if ok else lane


SHFL_CASES = (
    [(0, p, w) for p in (0, 5, 31, 32, 37, -1, -7) for w in (32, 16, 8, 1)]
    + [(op, d, w) for op in (1, 2) for d in (0, 1, 5, 17, 31, 32, 33) for w in (32, 16, 4, 1)]
    + [(3, m, w) for m in (0, 1, 7, 16, 31, 32, 33, -1) for w in (32, 16, 8)]
)


def test_shuffle_edge_cases(ops):
    o, p, w = (torch.tensor(c, dtype=torch.int32) for c in zip(*SHFL_CASES))
    out = ops.selftest_shfl_cases(o, p, w, True)
    want = [[10 * _ptx_shfl(*case, lane) + 1 for lane in range(32)] for case in SHFL_CASES]
    want = torch.tensor(want, dtype=torch.int32)
    assert torch.equal(out[:-1], want)
    # lanes 8-15 read lanes 16-23, outside the mask: undefined in CUDA, -1 on the executor
    last = out[-1]
    assert last[:8].tolist() == [10 * (lane + 8) + 1 for lane in range(8)]
    assert last[8:16].tolist() == [-1] * 8 and last[16:].tolist() == [-7] * 16


# ---------------------------------------------------------------------------------------------
# (3) several blocks, grid-stride loops, 2-D grid and blocks, grid smaller than the work
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (37, 129), (200, 301)])
@pytest.mark.parametrize("grid", [(1, 1), (2, 3), (5, 1)])
@pytest.mark.parametrize("block", [(32, 1), (16, 4), (7, 3), (128, 2)])
def test_grid_stride(ops, shape, grid, block):
    g = _gen(shape[0] * 1000 + shape[1])
    x = torch.randn(shape, generator=g)
    y = torch.randn(shape, generator=g)
    out = ops.selftest_axpy2d(1.5, x, y, *grid, *block)
    torch.testing.assert_close(out, 1.5 * x + y, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# (4) dynamic shared memory of runtime size
@pytest.mark.parametrize("extra", [0, 1000])
@pytest.mark.parametrize("block", [1, 7, 32, 64, 96, 100, 256, 1024])
@pytest.mark.parametrize("n", SIZES)
def test_dynamic_shared_reverse(ops, n, block, extra):
    x = torch.randn(n, dtype=torch.float64, generator=_gen(n + block))
    out, src = ops.selftest_reverse_tiles(x, block, extra)
    blocks = _ceil_div(n, block)
    idx = torch.arange(blocks * block).view(blocks, block)
    lengths = (n - idx[:, :1]).clamp(max=block)  # each tile's length
    rev = idx[:, :1] + (lengths - 1 - (idx - idx[:, :1]))
    rev = rev.reshape(-1)[:n]
    assert torch.equal(src, rev.int())
    assert torch.equal(out, x[rev])


def test_dynamic_shared_limit(ops):
    x = torch.randn(300, dtype=torch.float64)
    block = 64
    base = _ceil_div(block * 8, 16) * 16 + block * 4
    out, src = ops.selftest_reverse_tiles(x, block, MAX_DYNAMIC_SMEM - base)  # exactly the limit
    assert torch.equal(src[:64], torch.arange(63, -1, -1, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="dynamic shared memory"):
        ops.selftest_reverse_tiles(x, block, MAX_DYNAMIC_SMEM - base + 1)


# ---------------------------------------------------------------------------------------------
# (5) atomics across blocks (and within a block, on shared memory)
@pytest.mark.parametrize("nbins", [1, 7, 256])
@pytest.mark.parametrize("grid,block", [(1, 32), (3, 100), (64, 256), (5, 1024)])
@pytest.mark.parametrize("n", [1, 2, 1000, 65537])
def test_atomics(ops, n, nbins, grid, block):
    keys = torch.randint(0, nbins, (n,), generator=_gen(n * 3 + nbins)).int()
    got = ops.selftest_atomics(keys, nbins, grid, block)
    hist, stats, extremes, ints, fsum, dsum, owner, last = got
    k = keys.long()
    assert torch.equal(hist, torch.bincount(k, minlength=nbins).int())
    assert stats.tolist() == [n, int(k.sum())]
    assert extremes.tolist() == [int(k.max()), int(k.min())]
    bits = 0
    for v in torch.unique(k).tolist():
        bits |= 1 << (v % 31)
    assert ints.tolist() == [
        int(k.max()), int(k.min()), 0, bits, torch.unique(k).numel(), 2 * n, int(k.max())
    ]
    assert fsum.item() == float(k.sum())  # integers below 2**24: exact in any order
    assert dsum.item() == 0.5 * float(k.sum())
    present = torch.bincount(k, minlength=nbins) > 0
    for table in (owner, last):
        assert torch.equal(table < 0, ~present)
        hit = table[present].long()
        assert torch.equal(keys[hit].long(), torch.arange(nbins)[present])


# ---------------------------------------------------------------------------------------------
# (6) invalid synchronization raises RuntimeError (never hangs), and the executor recovers
# mode: (block, grid, pattern the message must match); see fault_kernel in selftest.cu
FAULTS = {
    1: (64, 3, r"thread \(5,0,0\).* returned while 5 of 64 threads wait at __syncthreads "
               r"\(selftest\.cu:\d+\)"),
    2: (64, 3, r"thread \(7,0,0\).* returned while 7 of 64 threads wait at __syncthreads"),
    3: (64, 3, r"divergent barrier: 1 thread\(s\) wait at __syncthreads \(selftest\.cu:(\d+)\).*"
               r"thread \(1,0,0\).* reached __syncthreads \(selftest\.cu:(?!\1)\d+\)"),
    4: (64, 2, r"thread \(3,0,0\).* returned while lanes 0-2 wait for it at "
               r"__shfl_xor_sync\(mask 0xffffffff\)"),
    5: (64, 2, r"deadlock: __shfl_xor_sync\(mask 0xffffffff\) at selftest\.cu:\d+: lanes 0-15 "
               r"of warp 0 wait there, but lane 16, thread \(16,0,0\).* waits at __ballot_sync"),
    6: (48, 2, r"thread \(32,0,0\).* called __ballot_sync \(selftest\.cu:\d+\) with mask "
               r"0xffffffff, but warp 1 of this 48-thread block has only lanes 0-15"),
    7: (32, 2, r"deadlock: __syncwarp\(mask 0xffffffff\).* lanes 16-31 of warp 0 wait there, "
               r"but lane 0, thread \(0,0,0\).* waits at __syncthreads"),
    8: (64, 6, r"block \(2,0,0\): thread \(1,0,0\).* reached __syncthreads .* but "
               r"thread \(0,0,0\).* has exited without reaching it"),
}


def _check_control(ops, block, grid=3):
    out = ops.selftest_fault(torch.empty(0), 0, grid, block)
    t = torch.arange(block).repeat(grid)
    assert torch.equal(out, ((t + 42) * 2).int())


@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("mode", sorted(FAULTS))
def test_invalid_sync_raises(ops, mode, threads, monkeypatch):
    monkeypatch.setenv("VSE_SIMT_THREADS", threads)
    block, grid, pattern = FAULTS[mode]
    with pytest.raises(RuntimeError) as info:
        ops.selftest_fault(torch.empty(0), mode, grid, block)
    message = str(info.value)
    launch = r"simt: kernel .*\(launch #\d+, grid \(%d,1,1\), block \(%d,1,1\)\)" % (grid, block)
    assert re.search(launch, message), message
    assert re.search(pattern, message), message
    if mode != 8:
        assert "block (0,0,0)" in message  # the lowest failing block is reported
    _check_control(ops, block)  # the executor still works afterwards


def test_fault_control_and_partial_warps(ops):
    for block in (1, 32, 48, 64, 100, 1024):
        _check_control(ops, block, grid=2)


def test_error_is_deterministic(ops, monkeypatch):
    messages = set()
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("VSE_SIMT_THREADS", threads)
        for _ in range(2):
            with pytest.raises(RuntimeError) as info:
                ops.selftest_fault(torch.empty(0), 8, 6, 64)
            messages.add(re.sub(r"launch #\d+", "launch #N", str(info.value)))
    assert len(messages) == 1, messages


# ---------------------------------------------------------------------------------------------
# launch configurations: indices in 1-3 dimensions, limits, empty grids
INDEX_CONFIGS = [
    (1, 1, 1, 1, 1, 1), (3, 2, 2, 4, 3, 2), (2, 1, 3, 32, 2, 1), (1, 1, 1, 1024, 1, 1),
    (5, 1, 1, 7, 1, 1), (2, 2, 2, 2, 2, 64), (1, 3, 1, 1, 1024, 1),
]


@pytest.mark.parametrize("cfg", INDEX_CONFIGS, ids=lambda c: "x".join(map(str, c)))
def test_indices(ops, cfg):
    gx, gy, gz, bx, by, bz = cfg
    out, count = ops.selftest_indices(torch.empty(0), *cfg)
    def grid_of(x, y, z):  # (x, y, z) triples, x fastest
        zyx = torch.meshgrid(torch.arange(z), torch.arange(y), torch.arange(x), indexing="ij")
        return torch.stack(zyx, -1).flip(-1).reshape(-1, 3)

    b = grid_of(gx, gy, gz).view(-1, 1, 3)
    t = grid_of(bx, by, bz).view(1, -1, 3)
    nb, nt = b.shape[0], t.shape[1]
    expected = torch.cat([
        t.expand(nb, nt, 3), b.expand(nb, nt, 3),
        torch.tensor([bx, by, bz]).expand(nb, nt, 3), torch.tensor([gx, gy, gz]).expand(nb, nt, 3),
    ], -1).reshape(-1, 12).int()
    assert torch.equal(out, expected)
    assert count.item() == nb * nt


@pytest.mark.parametrize("cfg,pattern", [
    ((1, 1, 1, 1025, 1, 1), r"1025 threads is invalid"),
    ((1, 1, 1, 64, 32, 1), r"2048 threads is invalid"),
    ((1, 1, 1, 1, 1, 65), r"block \(1,1,65\)"),
    ((1, 1, 1, 0, 1, 1), r"block dimensions must be >= 1"),
    ((1, 1, 1, 1, 0, 1), r"block dimensions must be >= 1"),
    ((1, 65536, 1, 1, 1, 1), r"exceeds CUDA's limits"),
])
def test_invalid_launch_config(ops, cfg, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        ops.selftest_indices(torch.empty(0), *cfg)


@pytest.mark.parametrize("grid", [(0, 1, 1), (1, 0, 1), (3, 2, 0)])
def test_empty_grid_is_noop(ops, grid):
    ops.selftest_indices(torch.empty(0), 1, 1, 1, 1, 1, 1)
    before = _stats(ops)["launch_id"]
    out, count = ops.selftest_indices(torch.empty(0), *grid, 32, 1, 1)
    assert out.shape == (0, 12) and count.item() == 0
    assert _stats(ops)["launch_id"] == before


# ---------------------------------------------------------------------------------------------
# (7) determinism: bitwise-equal results on repeated runs and with 1, 2 or 3 worker threads
def test_determinism_across_runs_and_threads(ops, monkeypatch):
    x = torch.randn(50_000, generator=_gen(7)) * 1000  # non-integers: order-dependent rounding
    results = {}
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("VSE_SIMT_THREADS", threads)
        for rep in range(2):
            tree = ops.selftest_block_sum(x, 256)[0]
            st_tree = _stats(ops)
            atomic = ops.selftest_block_atomic_sum(x, 1000)
            st_atomic = _stats(ops)
            assert st_tree["workers"] == int(threads) and st_atomic["workers"] == int(threads)
            results[(threads, rep)] = (tree, atomic)
    ref_tree, ref_atomic = results[("1", 0)]
    torch.testing.assert_close(ref_atomic, _padded(x, 50, 1000).sum(1), rtol=1e-5, atol=1e-2)
    for key, (tree, atomic) in results.items():
        assert torch.equal(tree, ref_tree), key
        assert torch.equal(atomic, ref_atomic), key


def test_threads_env_validation(ops, monkeypatch):
    x = torch.ones(10)
    for bad in ("0", "-1", "abc", "100000"):
        monkeypatch.setenv("VSE_SIMT_THREADS", bad)
        with pytest.raises(RuntimeError, match="VSE_SIMT_THREADS"):
            ops.selftest_block_sum(x, 32)
    monkeypatch.setenv("VSE_SIMT_THREADS", "4")
    monkeypatch.setenv("VSE_SIMT_STACK_KB", "64")  # stacks are re-made at the new size
    sums, _ = ops.selftest_block_sum(torch.ones(5000), 128)
    assert torch.equal(sums, _padded(torch.ones(5000), 40, 128).sum(1))
    assert _stats(ops)["workers"] == 4


# ---------------------------------------------------------------------------------------------
# (8) ThreadSanitizer reports a missing __syncthreads: in fault_kernel mode 9 two threads of a
# block write one __shared__ word with no barrier between them; mode 0 (the control) is correct.
# Only in `make sanitize-thread`, which loads the TSan build of _simt (VSE_SIMT_LIBRARY), preloads
# libtsan and sets VSE_SANITIZER=thread. Each mode runs in a subprocess: TSan halts on the first
# report (halt_on_error=1), which would end this pytest process.
_RACE_SCRIPT = """
import sys, torch
from vse_cuda import _lib
maps = open("/proc/self/maps").read()
print("tsan runtime:", "loaded" if "libtsan" in maps else "missing", flush=True)
out = _lib.simt_ops().selftest_fault(torch.empty(0), int(sys.argv[1]), 1, 64)
print("result:", out[:4].tolist(), flush=True)
"""
_TSAN_EXIT_CODE = 66


def _run_fault_under_tsan(mode):
    env = dict(os.environ)
    env["TSAN_OPTIONS"] = env.get("TSAN_OPTIONS", "") + f":halt_on_error=1:exitcode={_TSAN_EXIT_CODE}"
    # A hang guard only (a normal run takes seconds); no test asserts on time.
    return subprocess.run([sys.executable, "-c", _RACE_SCRIPT, str(mode)], env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.skipif(os.environ.get("VSE_SANITIZER") != "thread",
                    reason="needs the ThreadSanitizer build of _simt; runs in `make sanitize-thread` "
                           "(VSE_SANITIZER=thread)")
def test_tsan_reports_missing_syncthreads():
    library = os.environ.get("VSE_SIMT_LIBRARY")
    assert library, "VSE_SANITIZER=thread but VSE_SIMT_LIBRARY does not name the TSan build"
    # The library is instrumented (its calls into the TSan runtime are in its symbol table)...
    instrumented = b"__tsan_func_entry" in Path(library).read_bytes()
    assert instrumented, f"{library} is not a TSan build"
    source = Path(__file__).resolve().parents[1] / "csrc" / "simt" / "selftest.cu"
    race_line = next(i for i, text in enumerate(source.read_text().splitlines(), 1)
                     if "if (t < 2) word = v;" in text)

    control = _run_fault_under_tsan(0)
    # ...and the runtime runs in the subprocess, so a clean control means no race was seen.
    assert "tsan runtime: loaded" in control.stdout, control.stdout + control.stderr
    assert control.returncode == 0, control.stderr
    assert "ThreadSanitizer" not in control.stderr, control.stderr
    assert "result: [84, 86, 88, 90]" in control.stdout, control.stdout

    race = _run_fault_under_tsan(9)
    report = race.stderr
    assert "tsan runtime: loaded" in race.stdout, race.stdout + report
    assert "WARNING: ThreadSanitizer: data race" in report, report
    assert race.returncode == _TSAN_EXIT_CODE, report
    # Both accesses are the unsynchronized write, in fault_kernel, by two CUDA threads.
    assert re.search(r"fault_kernel[^\n]*selftest\.cu:%d" % race_line, report), report
    assert len(re.findall(r"selftest\.cu:%d" % race_line, report)) >= 2, report
    assert re.search(r"CUDA thread 0\b", report) and re.search(r"CUDA thread 1\b", report), report
