"""goal_loss / GoalLoss (the chunked engine) against the oracle vse_cuda.reference.goal_loss:
the logging value and the injected gradient for every triplet × pair weight, with and without
labels, both reductions, normalization, chunk sizes that do and do not divide N, all dtypes;
the relative-similarity sets without cancellation, grad_output scaling, the VSE++ special
case, opcheck and special cases. What every loss must satisfy (module = function, memory, bad
input, determinism, torch.compile, ...) is in test_loss_contract.py.

On simt (and cuda) this runs csrc/cuda/engine_kernels.cuh and topk.cuh: topk_tile_kernel (the mined lists, k = 1),
for lin_ms / sig_ms dense_rows_kernel and dense_columns_kernel over NegativeSetPolicy (the
negative sets, in the same tile sweep), gather_rows_kernel (sparse backward), and
csrc/cuda/anchors.cuh: anchors_kernel over GoalAnchors (each anchor's value and weights) and,
for lin_ms / sig_ms, over detail::ScanBlock and detail::AddBlockOffset (the sorted positives'
prefix sums)."""

from __future__ import annotations

import itertools

import pytest
import torch

import vse_cuda
from vse_cuda import reference as ref

from _loss_cases import (BACKENDS, GOAL, GOAL_PAIR_WEIGHTS, LABEL_KINDS, aligned_inputs, assert_close, grid_inputs,
                         loss_and_grads, make_labels, opcheck_setup, oracle_grid, per_backend, random_inputs)

TRIPLET_WEIGHTS = ("con", "nca", "cir")
PAIR_WEIGHTS = GOAL_PAIR_WEIGHTS
WEIGHTS = list(itertools.product(TRIPLET_WEIGHTS, PAIR_WEIGHTS))
SIZES = [(n, d) for n in (1, 2, 3, 17, 128) for d in (1, 3, 64)]
CASES = [(n, d, label_kind) for n, d in SIZES for label_kind in LABEL_KINDS]
# Every N and D; N = 128 with one label pattern only (each case runs 40 calls, several
# seconds each on the executor at that N).
SIMT_CASES = [(n, d, label_kind) for n, d in [(1, 1), (2, 3), (3, 64), (17, 3)] for label_kind in LABEL_KINDS]
SIMT_CASES.append((128, 64, "random"))


ours, oracle = GOAL.ours, GOAL.reference


def assert_all_close(got, want, dtype, case="", tol=None):
    assert_close(got[0], want[0], dtype, f"value, {case}", tol=tol)
    assert_close(got[1][0], want[1][0], dtype, f"d img, {case}", tol=tol)
    assert_close(got[1][1], want[1][1], dtype, f"d txt, {case}", tol=tol)


@pytest.mark.parametrize("triplet_weight", TRIPLET_WEIGHTS)
@pytest.mark.parametrize("backend,n,d,label_kind", per_backend(BACKENDS, CASES, SIMT_CASES))
def test_matches_oracle_float64(backend, device, on_backend, n, d, label_kind, triplet_weight):
    img, txt = (x.to(device) for x in random_inputs(n, d, seed=100 * n + d))
    labels = make_labels(label_kind, n, device=device)
    for pair_weight in PAIR_WEIGHTS:
        for normalize, reduction, chunks in oracle_grid(n):
            options = dict(triplet_weight=triplet_weight, pair_weight=pair_weight, labels=labels,
                           normalize=normalize, reduction=reduction)
            want = loss_and_grads(oracle(**options), img, txt)
            for chunk in chunks:
                got = loss_and_grads(ours(on_backend, chunk_size=chunk, **options), img, txt)
                assert_all_close(got, want, torch.float64,
                                 f"{pair_weight} normalize={normalize} reduction={reduction} chunk={chunk}")


@pytest.mark.parametrize("triplet_weight,pair_weight", WEIGHTS)
def test_other_hyper_parameters_match_the_oracle(backend, device, on_backend, triplet_weight, pair_weight):
    img, txt = (x.to(device) for x in random_inputs(29, 6, seed=3))
    labels = make_labels("random", 29).to(device)
    options = dict(triplet_weight=triplet_weight, pair_weight=pair_weight, tau=2.5, a=3.0, b=7.0, lam=0.25,
                   labels=labels, normalize=True)
    want = loss_and_grads(oracle(**options), img, txt)
    got = loss_and_grads(ours(on_backend, chunk_size=8, **options), img, txt)
    assert_all_close(got, want, torch.float64)


@pytest.mark.parametrize("label_kind", [None, "random", "pairs"])
@pytest.mark.parametrize("triplet_weight,pair_weight", WEIGHTS)
def test_exact_ties_match_the_oracle(backend, device, on_backend, triplet_weight, pair_weight, label_kind):
    # Grid inputs: exactly tied negatives (the lowest index wins) and tied positives, which
    # enter or leave the relative-similarity sets together.
    img, txt = (x.to(device) for x in grid_inputs(40, 3, seed=4))
    labels = make_labels(label_kind, 40, device=device)
    options = dict(triplet_weight=triplet_weight, pair_weight=pair_weight, labels=labels)
    want = loss_and_grads(oracle(**options), img, txt)
    for chunk in (None, 7, 8):
        got = loss_and_grads(ours(on_backend, chunk_size=chunk, **options), img, txt)
        assert_all_close(got, want, torch.float64, f"chunk={chunk}", tol=1e-12)


@pytest.mark.parametrize("noise", [0.5, 0.8])
@pytest.mark.parametrize("label_kind", [None, "random", "pairs"])
@pytest.mark.parametrize("triplet_weight,pair_weight", [w for w in WEIGHTS if w[1].endswith("_ms")])
def test_partial_relative_sets_match_the_oracle(backend, device, on_backend, triplet_weight, pair_weight, label_kind,
                                                noise):
    img, txt = (x.to(device) for x in aligned_inputs(64, 16, noise))
    labels = make_labels(label_kind, 64, device=device)
    for reduction in ("sum", "mean"):
        options = dict(triplet_weight=triplet_weight, pair_weight=pair_weight, labels=labels, reduction=reduction)
        want = loss_and_grads(oracle(**options), img, txt)
        for chunk in (None, 16, 10) if reduction == "sum" else [None]:
            got = loss_and_grads(ours(on_backend, chunk_size=chunk, **options), img, txt)
            assert_all_close(got, want, torch.float64, f"{reduction} chunk={chunk}")
    for dtype in (torch.float32, torch.bfloat16):
        options = dict(triplet_weight=triplet_weight, pair_weight=pair_weight, labels=labels)
        low = tuple(x.to(dtype) for x in (img, txt))
        assert_all_close(loss_and_grads(ours(on_backend, chunk_size=10, **options), *low),
                         loss_and_grads(oracle(**options), *low), dtype, str(dtype))


@pytest.mark.parametrize("noise", [0.5, 0.8])
def test_relative_sets_are_exercised(noise):
    # The comparisons above mean something only if the sets are neither all empty nor all full
    # on their inputs, in both directions (mostly empty at noise 0.5, with sets of several
    # members at 0.8), and the relative terms change the weights.
    img, txt = aligned_inputs(64, 16, noise)
    S = img @ txt.T
    P = S.diagonal()
    valid = ref.negative_mask(64)
    for M in (S, S.T):
        hardest = M.masked_fill(~valid, float("-inf")).max(dim=1).values
        positive_sizes = (valid & (P[None, :] <= hardest[:, None] + 0.1)).sum(1)
        negative_sizes = (valid & (M >= P.min() - 0.1)).sum(1) - (hardest >= P.min() - 0.1).long()
        for sizes in (positive_sizes, negative_sizes):
            assert 0 < int(sizes.sum()) < 64 * 63
            assert int((sizes == 0).sum()) > 32 if noise == 0.5 else int(sizes.max()) > 1
    for plain, relative in (("sig", "sig_ms"), ("lin", "lin_ms")):
        _, first = loss_and_grads(lambda a, b: vse_cuda.goal_loss(a, b, pair_weight=plain), img, txt)
        _, second = loss_and_grads(lambda a, b: vse_cuda.goal_loss(a, b, pair_weight=relative), img, txt)
        assert not torch.allclose(first[1], second[1])


def _from_similarity(S: torch.Tensor, dtype: torch.dtype):
    """img = I, txt = Sᵀ: img·txtᵀ = S exactly, and d txt = Gᵀ."""
    return torch.eye(S.size(0), dtype=dtype), S.T.contiguous().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pair_weight", ["sig_ms", "lin_ms"])
def test_relative_sets_without_cancellation(backend, device, on_backend, dtype, pair_weight):
    # Row 1's hardest negative (5) lies far above its other negatives (2): e^{b(2 − 5)} ≈ 1e-13
    # is R⁻, and with e^{−b(5 − λ)} ≈ 3e-20 it is what w_n depends on; removing c(i) from a
    # sum that holds it (1 + 1e-13 − 1) would lose it (entirely in float32, to 1e-3 in
    # float64). Anchor 0 holds the smallest positive (−10): its R⁺ = mean e^{a(−10 − P_k)} ≈
    # 1e-9, of the size of e^{a(P − λ)}, must not come from a sum that starts with its own
    # term either. Each weight is compared elementwise with the oracle in float64.
    S = torch.full((6, 6), 0.25, dtype=torch.float64)
    S.diagonal().copy_(torch.tensor([-10.0, 0.5, 0.625, 0.75, 0.875, 1.0]))
    S[0, 3] = 1.0
    S[1] = torch.tensor([2.0, 0.5, 5.0, 2.0, 2.0, 2.0])
    S[4, 2] = -0.5
    img, txt = (x.to(device) for x in _from_similarity(S, dtype))
    options = dict(triplet_weight="nca", pair_weight=pair_weight)
    _, (_, got) = loss_and_grads(ours(on_backend, chunk_size=4, **options), img, txt)
    _, (_, want) = loss_and_grads(oracle(**options), *_from_similarity(S, torch.float64))
    rtol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(got.double().cpu(), want, rtol=rtol, atol=0)
    assert float(want[2, 1]) > 1e12 if pair_weight == "sig_ms" else True  # w_n of row 1 is 1/R⁻


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("label_kind", [None, "pairs"])
def test_low_precision_matches_oracle(backend, device, on_backend, dtype, label_kind):
    img, txt = (x.to(device) for x in grid_inputs(37, 8, dtype, seed=2))
    labels = make_labels(label_kind, 37, device=device)
    for triplet_weight, pair_weight in WEIGHTS:
        for reduction in ("sum", "mean"):
            options = dict(triplet_weight=triplet_weight, pair_weight=pair_weight, labels=labels, reduction=reduction)
            want = loss_and_grads(oracle(**options), img, txt)
            for chunk in (None, 8) if reduction == "sum" else [None]:
                got = loss_and_grads(ours(on_backend, chunk_size=chunk, **options), img, txt)
                assert got[0].dtype == dtype and all(g.dtype == dtype for g in got[1])
                assert_all_close(got, want, dtype, f"{triplet_weight}/{pair_weight} {reduction} chunk={chunk}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("triplet_weight,pair_weight", [("con", "sig"), ("nca", "sig_ms"), ("cir", "lin_ms")])
def test_low_precision_random_normalized(backend, device, on_backend, dtype, triplet_weight, pair_weight):
    img, txt = (x.to(device) for x in random_inputs(128, 64, dtype, seed=8))
    options = dict(triplet_weight=triplet_weight, pair_weight=pair_weight,
                   labels=make_labels("random", 128).to(device), normalize=True)
    want = loss_and_grads(oracle(**options), img, txt)
    got = loss_and_grads(ours(on_backend, chunk_size=48, **options), img, txt)
    assert_all_close(got, want, dtype)


@pytest.mark.parametrize("pair_weight", PAIR_WEIGHTS)
def test_column_tiles(backend, device, on_backend, pair_weight):
    # The op itself, with tiles narrower than N in both directions.
    img, txt = (x.to(device) for x in random_inputs(23, 6, seed=1))
    labels = make_labels("random", 23).to(device)

    def via_op(a, b):
        with on_backend():
            op = vse_cuda._lib.ops(a, b).goal_forward
            return op(a, b, labels, "cir", pair_weight, 1.0, 2.0, 10.0, 0.5, 0, a.size(0), 5, 7)[0]

    got = loss_and_grads(via_op, img, txt)
    want = loss_and_grads(oracle(triplet_weight="cir", pair_weight=pair_weight, labels=labels), img, txt)
    assert_all_close(got, want, torch.float64)


def test_value_is_the_sum_of_hardest_negative_minus_positive(backend, device, on_backend):
    img, txt = (x.to(device) for x in random_inputs(13, 5, seed=21))
    labels = make_labels("random", 13).to(device)
    S = img @ txt.T
    valid = ref.negative_mask(13, labels)
    expected = 0.0
    for M, V in ((S, valid), (S.T, valid.T)):
        for i in range(13):
            if V[i].any():
                expected += float(M[i][V[i]].max() - M[i, i])
    for triplet_weight, pair_weight in WEIGHTS:
        with on_backend():
            value = vse_cuda.goal_loss(img, txt, triplet_weight=triplet_weight, pair_weight=pair_weight,
                                       labels=labels, chunk_size=4)
        assert float(value) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("triplet_weight,pair_weight", [("con", "con"), ("cir", "sig_ms"), ("nca", "lin_ms")])
def test_backward_scales_with_grad_output(backend, device, on_backend, triplet_weight, pair_weight):
    img, txt = (x.to(device) for x in random_inputs(9, 4, seed=61))
    options = dict(triplet_weight=triplet_weight, pair_weight=pair_weight, tau=2.0, chunk_size=4)
    _, once = loss_and_grads(ours(on_backend, **options), img, txt)
    _, scaled = loss_and_grads(lambda a, b: -2.5 * ours(on_backend, **options)(a, b), img, txt)
    _, mean = loss_and_grads(ours(on_backend, reduction="mean", **options), img, txt)
    for g1, g2, g3 in zip(once, scaled, mean):
        assert g1.abs().max() > 0
        torch.testing.assert_close(g2, -2.5 * g1, rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(g3, g1 / 9, rtol=1e-14, atol=1e-15)
    # A sum with another loss: each gets its own gradient.
    with on_backend():
        _, both = loss_and_grads(lambda a, b: ours(on_backend, **options)(a, b) + vse_cuda.triplet_loss(a, b),
                                 img, txt)
        _, triplet = loss_and_grads(vse_cuda.triplet_loss, img, txt)
    for g_both, g_goal, g_triplet in zip(both, once, triplet):
        torch.testing.assert_close(g_both, g_goal + g_triplet)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("labelled", [False, True])
def test_con_con_is_the_hardest_triplet_when_every_hinge_is_active(backend, device, on_backend, labelled, normalize):
    # No margin cut-off: with margin 10 every VSE++ hinge is active and the two coincide, up to
    # the margin in the value.
    img, txt = (x.to(device) for x in random_inputs(12, 4, seed=31))
    labels = make_labels("random", 12).to(device) if labelled else None
    goal = loss_and_grads(ours(on_backend, labels=labels, normalize=normalize, chunk_size=5), img, txt)
    with on_backend():
        triplet = loss_and_grads(lambda a, b: vse_cuda.triplet_loss(a, b, margin=10.0, labels=labels,
                                                                    normalize=normalize, chunk_size=5), img, txt)
    valid = ref.negative_mask(12, None if labels is None else labels.cpu())
    anchors = int(valid.any(dim=1).sum()) * 2
    torch.testing.assert_close(triplet[0], goal[0] + 10.0 * anchors)
    torch.testing.assert_close(triplet[1], goal[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("labelled", [False, True])
@pytest.mark.parametrize("triplet_weight,pair_weight", [("con", "con"), ("nca", "sig_ms"), ("cir", "lin_ms")])
@pytest.mark.parametrize("anchors", [(0, 9), (2, 7)], ids=["all_anchors", "some_anchors"])
def test_opcheck(backend, device, on_backend, triplet_weight, pair_weight, labelled, anchors):
    (img, txt), labels, op = opcheck_setup(device, on_backend, labelled)
    args = (img, txt, labels, triplet_weight, pair_weight, 1.0, 2.0, 10.0, 0.5, *anchors, 4, 6)
    torch.library.opcheck(op.goal_forward.default, args)
    _, *saved = op.goal_forward(img.detach(), txt.detach(), *args[2:])
    torch.library.opcheck(op.goal_backward.default,
                          (torch.tensor(1.5, device=device), img.detach(), txt.detach(), *saved))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_simt_kernels_match_the_cpu_kernels(dtype):
    # The ops themselves on 5 × 4 tiles (chunks 16 and 24 do not divide N = 75), for every
    # triplet × pair weight: the same saved weights (layout and values), index lists and
    # gradients as the CPU kernels. Aligned inputs fill the relative sets partly.
    img, txt = aligned_inputs(75, 16, 0.8, dtype, seed=11)
    labels = make_labels("random", 75)
    grad = torch.tensor(1.5, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for triplet_weight, pair_weight in WEIGHTS:
        results = []
        for ops in (torch.ops.vse_cuda, torch.ops.vse_simt):
            forward = ops.goal_forward(img, txt, labels, triplet_weight, pair_weight, 1.0, 2.0, 10.0, 0.5, 0, 75, 16,
                                       24)
            results.append(forward + ops.goal_backward(grad, img, txt, *forward[1:]))
        cpu, simt = results
        assert torch.equal(simt[3], cpu[3]) and torch.equal(simt[4], cpu[4])
        for got, want in zip(simt, cpu):
            assert got.dtype == want.dtype and got.shape == want.shape
            torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{triplet_weight}/{pair_weight}: {m}")


@pytest.mark.parametrize("pair_weight", ["lin_ms", "sig_ms"])
def test_sorted_positives_over_several_scan_blocks(backend, device, on_backend, pair_weight):
    # N = 600 positives: their prefix sums span three blocks of the engine's scan (256 each).
    img, txt = (x.to(device) for x in aligned_inputs(600, 16, 0.8, seed=17))
    options = dict(triplet_weight="nca", pair_weight=pair_weight, labels=make_labels("pairs", 600).to(device))
    want = loss_and_grads(oracle(**options), img, txt)
    got = loss_and_grads(ours(on_backend, chunk_size=256, **options), img, txt)
    assert_all_close(got, want, torch.float64)


@pytest.mark.parametrize("pair_weight", PAIR_WEIGHTS)
def test_all_same_label_gives_zero_loss_and_zero_gradients(backend, device, on_backend, pair_weight):
    img, txt = (x.to(device) for x in random_inputs(6, 3, seed=7))
    labels = torch.full((6,), 2, device=device)
    loss, grads = loss_and_grads(ours(on_backend, pair_weight=pair_weight, labels=labels, chunk_size=4), img, txt)
    assert float(loss) == 0.0
    assert all(not bool(g.any()) for g in grads)


@pytest.mark.parametrize("pair_weight", PAIR_WEIGHTS)
@pytest.mark.parametrize("where", ["img", "txt"])
def test_nan_input_gives_nan_loss(backend, device, on_backend, where, pair_weight):
    img, txt = (x.to(device) for x in random_inputs(10, 4, seed=2))
    (img if where == "img" else txt)[3, 1] = float("nan")
    loss, grads = loss_and_grads(ours(on_backend, pair_weight=pair_weight, chunk_size=4), img, txt)
    assert torch.isnan(loss)
    assert grads[0].shape == img.shape and grads[1].shape == txt.shape
    with on_backend():
        _, _, _, row_index, col_index = vse_cuda._lib.ops(img, txt).goal_forward(
            img, txt, torch.empty(0, dtype=torch.int64, device=device), "con", pair_weight, 1.0, 2.0, 10.0, 0.5, 0, 10, 4,
            10)
    assert bool(((row_index >= -1) & (row_index < 10)).all() and ((col_index >= -1) & (col_index < 10)).all())




@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("pair_weight", ["lin_ms", "sig_ms"])
def test_anchor_shares_weigh_as_one_process(backend, device, on_backend, pair_weight, dtype):
    # A rank of a group sweeps only its anchors' rows and columns, yet R⁺ compares each of its
    # anchors' positives with every pair's: all of them as tiles hold them, not as row-wise
    # dots (another reduction, an ulp off). With 8 × 8 tiles and shares of 8 pairs, a rank's
    # tiles are bitwise one process's, so its anchors' saved weights must be too.
    n, d = 24, 16
    img, txt = (x.to(device) for x in aligned_inputs(n, d, 0.8, dtype, seed=13))
    labels = make_labels("random", n, device=device)

    def forward(begin, end):
        with on_backend():
            op = vse_cuda._lib.ops(img, txt).goal_forward
            return op(img, txt, labels, "nca", pair_weight, 1.0, 2.0, 10.0, 0.5, begin, end, 8, 8)

    whole = forward(0, n)
    for begin in (0, 8, 16):
        share, mine = forward(begin, begin + 8), slice(begin, begin + 8)
        for name, got, want in zip(("row_saved", "col_saved"), share[1:3], whole[1:3]):
            assert torch.equal(got[mine], want[mine]), f"{name} of pairs [{begin}, {begin + 8})"
