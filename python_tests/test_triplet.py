"""triplet_loss / TripletLoss (the chunked engine) against the oracle
vse_cuda.reference.triplet_loss: loss and both gradients for every mining mode, with and
without labels, both reductions, normalization, chunk sizes that do and do not divide N, all
dtypes; gradcheck, opcheck, special cases and duplicated rows. What every loss must satisfy
(module = function, memory, bad input, determinism, torch.compile, ...) is in
test_loss_contract.py.

On simt (and cuda) this runs csrc/cuda/engine_kernels.cuh and topk.cuh: topk_tile_kernel (mined lists),
mined_hinge_terms_kernel, gather_rows_kernel (sparse backward), and for mining="all"
dense_rows_kernel, dense_columns_kernel, dense_finish_kernel, dense_gradient_kernel."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import vse_cuda
from vse_cuda import reference as ref

from _loss_cases import (BACKENDS, LABEL_KINDS, TRIPLET, assert_close, grid_inputs, loss_and_grads, make_labels,
                         opcheck_setup, oracle_grid, per_backend, random_inputs, with_duplicates)

MININGS = [("hardest", 1), ("all", 1), ("topk", 1), ("topk", 3), ("topk", 200)]
SIZES = [(n, d) for n in (1, 2, 3, 17, 128) for d in (1, 3, 64)]
SIMT_SIZES = [(1, 1), (2, 3), (3, 64), (17, 3), (128, 64)]  # every N, every D


def ours(mining, k, on_backend, **options):
    return TRIPLET.ours(on_backend, mining=mining, k=k, **options)


def oracle(mining, k, **options):
    return TRIPLET.reference(mining=mining, k=k, **options)


@pytest.mark.parametrize("label_kind", LABEL_KINDS)
@pytest.mark.parametrize("mining,k", [m for m in MININGS if m != ("topk", 1)])  # topk k=1: the ties test
@pytest.mark.parametrize("backend,n,d", per_backend(BACKENDS, SIZES, SIMT_SIZES))
def test_matches_oracle_float64(backend, device, on_backend, n, d, mining, k, label_kind):
    img, txt = (x.to(device) for x in random_inputs(n, d, seed=100 * n + d))
    labels = make_labels(label_kind, n, device=device)
    for normalize, reduction, chunks in oracle_grid(n):
        options = dict(margin=0.2, labels=labels, normalize=normalize, reduction=reduction)
        want_loss, want_grads = loss_and_grads(oracle(mining, k, **options), img, txt)
        for chunk in chunks:
            loss, grads = loss_and_grads(ours(mining, k, on_backend, chunk_size=chunk, **options), img, txt)
            case = f"normalize={normalize} reduction={reduction} chunk={chunk}"
            assert_close(loss, want_loss, torch.float64, f"loss, {case}")
            assert_close(grads[0], want_grads[0], torch.float64, f"d img, {case}")
            assert_close(grads[1], want_grads[1], torch.float64, f"d txt, {case}")


@pytest.mark.parametrize("label_kind", [None, "random", "pairs"])
@pytest.mark.parametrize("mining,k", MININGS)
def test_exact_ties_and_zero_hinges_match_the_oracle(backend, device, on_backend, mining, k, label_kind):
    # Grid inputs: many exactly tied negatives (the lowest index wins) and hinges at exactly
    # 0 (margin 1/4, similarities multiples of 1/16), which must pass no gradient.
    img, txt = (x.to(device) for x in grid_inputs(40, 3, seed=4))
    labels = make_labels(label_kind, 40, device=device)
    S = img @ txt.T
    assert bool(((0.25 + S - S.diagonal()[:, None]) == 0).any()), "the case must contain hinges at 0"
    want_loss, want_grads = loss_and_grads(oracle(mining, k, margin=0.25, labels=labels), img, txt)
    for chunk in (None, 7, 8):
        loss, grads = loss_and_grads(ours(mining, k, on_backend, margin=0.25, labels=labels, chunk_size=chunk), img, txt)
        torch.testing.assert_close(loss, want_loss, rtol=0, atol=1e-12)
        torch.testing.assert_close(grads, want_grads, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("label_kind", [None, "pairs"])
@pytest.mark.parametrize("mining,k", MININGS[:4])
def test_low_precision_matches_oracle(backend, device, on_backend, dtype, mining, k, label_kind):
    img, txt = (x.to(device) for x in grid_inputs(37, 8, dtype, seed=2))
    labels = make_labels(label_kind, 37, device=device)
    for reduction in ("sum", "mean"):
        options = dict(margin=0.25, labels=labels, reduction=reduction)
        want_loss, want_grads = loss_and_grads(oracle(mining, k, **options), img, txt)
        for chunk in (None, 8) if reduction == "sum" else [None]:
            loss, grads = loss_and_grads(ours(mining, k, on_backend, chunk_size=chunk, **options), img, txt)
            assert loss.dtype == dtype and grads[0].dtype == dtype and grads[1].dtype == dtype
            assert_close(loss, want_loss, dtype, "loss")
            assert_close(grads[0], want_grads[0], dtype, "d img")
            assert_close(grads[1], want_grads[1], dtype, "d txt")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mining,k", MININGS[:4])
def test_low_precision_random_normalized(backend, device, on_backend, dtype, mining, k):
    img, txt = (x.to(device) for x in random_inputs(128, 64, dtype, seed=8))
    options = dict(labels=make_labels("random", 128).to(device), normalize=True)
    want_loss, want_grads = loss_and_grads(oracle(mining, k, **options), img, txt)
    loss, grads = loss_and_grads(ours(mining, k, on_backend, chunk_size=48, **options), img, txt)
    assert_close(loss, want_loss, dtype, "loss")
    assert_close(grads[0], want_grads[0], dtype, "d img")
    assert_close(grads[1], want_grads[1], dtype, "d txt")


@pytest.mark.parametrize("mining,k", MININGS)
def test_column_tiles(backend, device, on_backend, mining, k):
    # The op itself, with tiles narrower than N in both directions (the wrappers only narrow
    # columns when one row chunk of S exceeds the memory budget).
    img, txt = (x.to(device) for x in random_inputs(23, 6, seed=1))
    labels = make_labels("random", 23).to(device)

    def via_op(a, b):
        with on_backend():
            return vse_cuda._lib.ops(a, b).triplet_forward(a, b, labels, 0.2, mining, min(k, 23), 0, 23, 5, 7)[0]

    loss, grads = loss_and_grads(via_op, img, txt)
    want_loss, want_grads = loss_and_grads(oracle(mining, k, labels=labels), img, txt)
    assert_close(loss, want_loss, torch.float64, "loss")
    assert_close(grads[0], want_grads[0], torch.float64, "d img")
    assert_close(grads[1], want_grads[1], torch.float64, "d txt")


@pytest.mark.parametrize("mining", ["hardest", "all", "topk"])
def test_hinge_at_exactly_zero_passes_no_gradient(backend, device, on_backend, mining):
    # img = I and txt = Sᵀ make img·txtᵀ = S exactly. With margin 1/4 the hardest hinges
    # (row 0: 1/4 + 3/4 − 1, column 1: the same) are exactly 0, the others negative.
    S = torch.tensor([[1.0, 0.75], [0.5, 1.0]], dtype=torch.float64, device=device)
    img, txt = torch.eye(2, dtype=torch.float64, device=device), S.T.contiguous()
    loss, grads = loss_and_grads(ours(mining, 2, on_backend, margin=0.25), img, txt)
    assert float(loss) == 0.0
    assert not bool(grads[0].any()) and not bool(grads[1].any())
    loss, grads = loss_and_grads(ours(mining, 2, on_backend, margin=0.375), img, txt)
    want_loss, want_grads = loss_and_grads(oracle(mining, 2, margin=0.375), img, txt)
    assert float(loss) == float(want_loss) == 0.25
    torch.testing.assert_close(grads, want_grads, rtol=0, atol=0)


def test_ties_go_to_the_lowest_index(backend, device, on_backend):
    # Row 0 has two equally hard negatives (columns 1 and 2): only column 1 is mined in the
    # i2t direction; column 2 gets row 0 through its own (t2i) hardest negative only.
    S = torch.tensor([[1.0, 0.5, 0.5], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64, device=device)
    img, txt = torch.eye(3, dtype=torch.float64, device=device), S.T.contiguous()
    loss, grads = loss_and_grads(ours("hardest", 1, on_backend, margin=0.75), img, txt)
    G = grads[1].T  # d txt = Gᵀ·img = Gᵀ
    expected = torch.tensor([[-1.0, 2.0, 1.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(G.cpu(), expected, rtol=0, atol=0)
    assert float(loss) == 0.75


def _separated(n, d, labels, margin, normalize, gap=1e-3):
    """float64 inputs with no hinge argument and no gap between valid values of a row or a
    column within `gap`, so that gradcheck's finite differences never cross a kink."""
    for seed in range(1000):
        img, txt = random_inputs(n, d, seed=seed)
        a, b = (torch.nn.functional.normalize(x, dim=1) for x in (img, txt)) if normalize else (img, txt)
        S = a @ b.T
        valid = ref.negative_mask(n, labels)
        P = S.diagonal()
        args = torch.cat([(margin + S - P[:, None])[valid], (margin + S - P[None, :])[valid]])
        gaps = [v[:-1] - v[1:] for M, V in ((S, valid), (S.T, valid.T)) for row, ok in zip(M, V)
                for v in [torch.sort(row[ok], descending=True).values] if v.numel() > 1]
        if args.abs().min() > gap and (not gaps or torch.cat(gaps).min() > gap):
            return img, txt
    raise AssertionError("no separated inputs")


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("mining,k", [("hardest", 1), ("all", 1), ("topk", 3)])
def test_gradcheck(backend, device, on_backend, mining, k, normalize):
    labels = torch.tensor([0, 1, 0, 2, 3, 3, 4])
    img, txt = _separated(7, 4, labels, 0.2, normalize)
    img, txt = img.to(device).requires_grad_(), txt.to(device).requires_grad_()
    fn = ours(mining, k, on_backend, labels=labels.to(device), normalize=normalize, chunk_size=3)
    assert torch.autograd.gradcheck(fn, (img, txt))


@pytest.mark.parametrize("labelled", [False, True])
@pytest.mark.parametrize("mining,k", [("hardest", 1), ("all", 1), ("topk", 3)])
@pytest.mark.parametrize("anchors", [(0, 9), (2, 7)], ids=["all_anchors", "some_anchors"])
def test_opcheck(backend, device, on_backend, mining, k, labelled, anchors):
    (img, txt), labels, op = opcheck_setup(device, on_backend, labelled)
    torch.library.opcheck(op.triplet_forward.default, (img, txt, labels, 0.2, mining, k, *anchors, 4, 6))
    _, *saved = op.triplet_forward(img.detach(), txt.detach(), labels, 0.2, mining, k, *anchors, 4, 6)
    torch.library.opcheck(op.triplet_backward.default, (torch.tensor(1.5, device=device), img.detach(), txt.detach(),
                                                        labels, 0.2, mining, *saved, *anchors, 4, 6))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mining,k", [("hardest", 1), ("all", 1), ("topk", 5)])
def test_simt_kernels_match_the_cpu_kernels(dtype, mining, k):
    # The ops themselves on 5 × 4 tiles (chunks 16 and 24 do not divide N = 75): the same
    # saved state (layout and values), index lists and gradients as the CPU kernels.
    img, txt = random_inputs(75, 16, dtype, seed=11)
    labels = make_labels("random", 75)
    grad = torch.tensor(1.5, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    results = {}
    for ops in (torch.ops.vse_cuda, torch.ops.vse_simt):
        forward = ops.triplet_forward(img, txt, labels, 0.2, mining, k, 0, 75, 16, 24)
        backward = ops.triplet_backward(grad, img, txt, labels, 0.2, mining, *forward[1:], 0, 75, 16, 24)
        results[ops] = (forward, backward)
    (cpu_forward, cpu_backward), (simt_forward, simt_backward) = results.values()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert torch.equal(simt_forward[3], cpu_forward[3]) and torch.equal(simt_forward[4], cpu_forward[4])
    for got, want in zip(simt_forward[:3] + simt_backward, cpu_forward[:3] + cpu_backward):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("mining,k", [("hardest", 1), ("all", 1), ("topk", 3)])
def test_nan_input_gives_nan_loss(backend, device, on_backend, mining, k):
    img, txt = (x.to(device) for x in random_inputs(10, 4, seed=2))
    img[3, 1] = float("nan")
    loss, grads = loss_and_grads(ours(mining, k, on_backend, chunk_size=4), img, txt)
    assert torch.isnan(loss)
    assert grads[0].shape == img.shape and grads[1].shape == txt.shape
    if mining != "all":
        with on_backend():
            _, _, _, row_index, col_index = vse_cuda._lib.ops(img, txt).triplet_forward(
                img, txt, torch.empty(0, dtype=torch.int64, device=device), 0.2, mining, k, 0, 10, 4, 10)
        assert bool(((row_index >= -1) & (row_index < 10)).all() and ((col_index >= -1) & (col_index < 10)).all())


@pytest.mark.slow
def test_no_n_by_n_allocation_at_n_60000():
    # N = M = 60000: one N×N float32 S is 13.4 GiB. Forward + backward run in a process whose
    # address space is capped at 8 GiB (torch itself maps about 3 GiB), so a single N×N buffer
    # anywhere in the loss path would fail to allocate. Hardest mining: one GEMM sweep (the
    # dense losses share the same tiles, only slower).
    script = textwrap.dedent("""
        import resource, torch, vse_cuda
        limit = 8 << 30
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            torch.empty(60000, 60000)
            raise SystemExit("the cap does not refuse an N x N matrix")
        except RuntimeError:
            pass
        img = torch.randn(60000, 8, requires_grad=True)
        txt = torch.randn(60000, 8, requires_grad=True)
        vse_cuda.triplet_loss(img, txt).backward()
        print(bool(img.grad.abs().sum() > 0 and txt.grad.abs().sum() > 0))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True"


# ----------------------------------------------- duplicated rows: positives as the tiles hold them

DUPLICATE_SIZES = [(5, 3), (17, 64), (33, 300)]
DUPLICATE_SIMT_SIZES = [(5, 3), (17, 64)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("label_kind", [None, "random"])
@pytest.mark.parametrize("which", ["captions", "images", "pairs"])
@pytest.mark.parametrize("backend,n,d", per_backend(BACKENDS, DUPLICATE_SIZES, DUPLICATE_SIMT_SIZES))
def test_all_negatives_at_zero_marginwith_duplicates(backend, device, on_backend, n, d, which, label_kind, dtype):
    # VSE0 (mining="all") at margin 0: every hinge of a copy against its original is at exactly 0.
    # The oracle runs in float64 on the same (dtype-valued) inputs, where the copies' scores
    # equal their positives too; per-row gradients, not only their sums, must agree.
    # The default plan only (one tile per row chunk here, as the oracle's one GEMM): with several
    # column tiles MKL's GEMM can round a copy's score differently from the original's by its
    # column position within a tile (measured for float64 and small float32 tiles), which no
    # choice of positives undoes (a known limit; see the engine's tiles.h).
    img, txt = (x.to(device) for x in with_duplicates(n, d, dtype, which, seed=7 * n + d))
    labels = make_labels(label_kind, n, seed=n, device=device)
    want_loss, want_grads = loss_and_grads(oracle("all", 1, margin=0.0, labels=labels), img.double(), txt.double())
    for chunk in (None,):
        loss, grads = loss_and_grads(ours("all", 1, on_backend, margin=0.0, labels=labels, chunk_size=chunk), img, txt)
        assert_close(loss, want_loss.to(dtype), dtype, f"loss, chunk={chunk}")
        assert_close(grads[0], want_grads[0].to(dtype), dtype, f"d img, chunk={chunk}")
        assert_close(grads[1], want_grads[1].to(dtype), dtype, f"d txt, chunk={chunk}")


def _op_loss(on_backend, mining, k, labels, anchors, row_chunk, col_chunk):
    """The triplet op itself on the pairs [begin, end) of the batch: a rank of a group's share."""
    def loss(img, txt):
        lab = img.new_empty(0, dtype=torch.int64) if labels is None else labels
        with on_backend():
            op = vse_cuda._lib.ops(img, txt).triplet_forward
            return op(img, txt, lab, 0.0, mining, k, *anchors, row_chunk, col_chunk)[0]
    return loss


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("which", ["captions", "images", "pairs"])
@pytest.mark.parametrize("mining,k", [("all", 1), ("hardest", 1), ("topk", 3)])
def test_anchor_shares_at_zero_marginwith_duplicates(backend, device, on_backend, mining, k, which, dtype):
    # A group's ranks sweep their rows and their columns with tiles of other shapes than one
    # process does: each direction's positives must come from its own sweep's tiles. The
    # shares' losses and gradients sum to the oracle's on the whole batch. One tile per sweep,
    # as in the default plan at this size (see the test above for why).
    n, d = 23, 40
    img, txt = (x.to(device) for x in with_duplicates(n, d, dtype, which, seed=3))
    labels = make_labels("random", n, seed=1).to(device)
    want_loss, want_grads = loss_and_grads(oracle(mining, k, margin=0.0, labels=labels), img.double(), txt.double())
    for bounds in ([0, 9, 23], [0, 4, 13, 23]):
        for row_chunk, col_chunk in ((23, 23),):
            shares = [loss_and_grads(_op_loss(on_backend, mining, k, labels, (lo, hi), row_chunk, col_chunk), img, txt)
                      for lo, hi in zip(bounds[:-1], bounds[1:])]
            case = f"shares={bounds} chunks={row_chunk}x{col_chunk}"
            assert_close(sum(s[0] for s in shares), want_loss.to(dtype), dtype, f"loss, {case}")
            for side in (0, 1):
                got = sum(s[1][side] for s in shares)
                assert_close(got, want_grads[side].to(dtype), dtype, f"d {('img', 'txt')[side]}, {case}")
