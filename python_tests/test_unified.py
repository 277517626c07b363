"""unified_loss / UnifiedLoss (the chunked engine) against the oracle
vse_cuda.reference.unified_loss: loss and both gradients with and without labels, both
reductions, normalization, chunk sizes that do and do not divide N, all dtypes, large scales;
the InfoNCE special case, gradcheck, opcheck and special cases. What every loss must satisfy
(module = function, memory, bad input, determinism, torch.compile, ...) is in
test_loss_contract.py.

On simt (and cuda) this runs dense_rows_kernel, dense_columns_kernel, dense_finish_kernel
and dense_gradient_kernel of csrc/cuda/engine_kernels.cuh."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vse_cuda

from _loss_cases import (BACKENDS, LABEL_KINDS, TOL, UNIFIED, assert_close, chunk_options, grid_inputs, loss_and_grads,
                         make_labels, opcheck_setup, oracle_grid, per_backend, random_inputs)

SIZES = [(n, d) for n in (1, 2, 3, 17, 128) for d in (1, 3, 64)]
SIMT_SIZES = [(1, 1), (2, 3), (3, 64), (17, 3), (128, 64)]  # every N, every D


ours, oracle = UNIFIED.ours, UNIFIED.reference


def _scale(value: float) -> torch.Tensor:
    """The ops' 0-dim scale argument, as unified_loss passes a number."""
    return torch.tensor(value, dtype=torch.float64)


@pytest.mark.parametrize("scale,margin", [(20.0, 0.2), (1000.0, 0.1)])
@pytest.mark.parametrize("label_kind", LABEL_KINDS)
@pytest.mark.parametrize("backend,n,d", per_backend(BACKENDS, SIZES, SIMT_SIZES))
def test_matches_oracle_float64(backend, device, on_backend, n, d, label_kind, scale, margin):
    img, txt = (x.to(device) for x in random_inputs(n, d, seed=100 * n + d))
    labels = make_labels(label_kind, n, device=device)
    for normalize, reduction, chunks in oracle_grid(n):
        options = dict(scale=scale, margin=margin, labels=labels, normalize=normalize, reduction=reduction)
        want_loss, want_grads = loss_and_grads(oracle(**options), img, txt)
        for chunk in chunks:
            loss, grads = loss_and_grads(ours(on_backend, chunk_size=chunk, **options), img, txt)
            case = f"normalize={normalize} reduction={reduction} chunk={chunk}"
            # Gradients relative to the loss per anchor too: with normalize and D = 1
            # they are exactly 0, sums of terms of the size of the loss that cancel.
            per_anchor = float(want_loss.abs()) / n
            assert_close(loss, want_loss, torch.float64, f"loss, {case}")
            assert_close(grads[0], want_grads[0], torch.float64, f"d img, {case}", per_anchor)
            assert_close(grads[1], want_grads[1], torch.float64, f"d txt, {case}", per_anchor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("label_kind", [None, "pairs"])
def test_low_precision_matches_oracle(backend, device, on_backend, dtype, label_kind):
    img, txt = (x.to(device) for x in grid_inputs(37, 8, dtype, seed=2))
    labels = make_labels(label_kind, 37, device=device)
    for reduction in ("sum", "mean"):
        options = dict(margin=0.25, labels=labels, reduction=reduction)
        want_loss, want_grads = loss_and_grads(oracle(**options), img, txt)
        for chunk in (None, 8) if reduction == "sum" else [None]:
            loss, grads = loss_and_grads(ours(on_backend, chunk_size=chunk, **options), img, txt)
            assert loss.dtype == dtype and grads[0].dtype == dtype and grads[1].dtype == dtype
            assert_close(loss, want_loss, dtype, "loss")
            assert_close(grads[0], want_grads[0], dtype, "d img")
            assert_close(grads[1], want_grads[1], dtype, "d txt")


@pytest.mark.parametrize("scale", [20.0, 1000.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_random_normalized(backend, device, on_backend, dtype, scale):
    # Half inputs are computed in float32: no overflow of exp at scale 1000, no NaN. The
    # reference is the oracle in float64 on the same inputs: at scale 1000 an error of one
    # float32 rounding in S moves exp(γ·S) by γ·2⁻²⁴ ≈ 6e-5, so there the engine and the
    # oracle in float32 both stay within 1e-4 of it, not 1e-5.
    img, txt = (x.to(device) for x in random_inputs(128, 64, dtype, seed=8))
    options = dict(scale=scale, labels=make_labels("random", 128).to(device), normalize=True, reduction="mean")
    want_loss, want_grads = loss_and_grads(oracle(**options), img.double(), txt.double())
    loss, grads = loss_and_grads(ours(on_backend, chunk_size=48, **options), img, txt)
    assert torch.isfinite(loss) and all(bool(torch.isfinite(g).all()) for g in grads)
    tol = max(TOL[dtype], 1e-4 if scale > 100 else 0.0)
    assert_close(loss, want_loss.to(dtype), dtype, "loss", tol=tol)
    assert_close(grads[0], want_grads[0].to(dtype), dtype, "d img", tol=tol)
    assert_close(grads[1], want_grads[1].to(dtype), dtype, "d txt", tol=tol)


def test_column_tiles(backend, device, on_backend):
    # The op itself, with tiles narrower than N in both directions.
    img, txt = (x.to(device) for x in random_inputs(23, 6, seed=1))
    labels = make_labels("random", 23).to(device)

    def via_op(a, b):
        with on_backend():
            return vse_cuda._lib.ops(a, b).unified_forward(a, b, labels, _scale(20.0), 0.2, False, False, 0, 23, 5, 7)[0]

    loss, grads = loss_and_grads(via_op, img, txt)
    want_loss, want_grads = loss_and_grads(oracle(labels=labels), img, txt)
    assert_close(loss, want_loss, torch.float64, "loss")
    assert_close(grads[0], want_grads[0], torch.float64, "d img")
    assert_close(grads[1], want_grads[1], torch.float64, "d txt")


def test_zero_margin_is_symmetric_info_nce(backend, device, on_backend):
    img, txt = (x.to(device) for x in random_inputs(19, 8, seed=5))
    tau = 0.07
    loss, grads = loss_and_grads(ours(on_backend, scale=1 / tau, margin=0.0, normalize=True, chunk_size=6), img, txt)

    def info_nce(a, b):
        logits = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / tau
        target = torch.arange(a.size(0), device=a.device)
        return F.cross_entropy(logits, target, reduction="sum") + F.cross_entropy(logits.T, target, reduction="sum")

    want_loss, want_grads = loss_and_grads(info_nce, img, txt)
    assert_close(loss, want_loss, torch.float64, "loss")
    assert_close(grads[0], want_grads[0], torch.float64, "d img")
    assert_close(grads[1], want_grads[1], torch.float64, "d txt")


def test_large_scale_tends_to_the_hardest_triplet(backend, device, on_backend):
    img, txt = (x.to(device) for x in random_inputs(16, 8, torch.float32, seed=7))
    with on_backend():
        unified = vse_cuda.unified_loss(img, txt, scale=1e4, normalize=True)
        hardest = vse_cuda.triplet_loss(img, txt, normalize=True)
    assert torch.isfinite(unified)
    torch.testing.assert_close(unified / 1e4, hardest, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("labelled", [False, True])
def test_gradcheck(backend, device, on_backend, labelled, normalize):
    img, txt = (x.to(device).requires_grad_() for x in random_inputs(7, 4, seed=3))
    labels = torch.tensor([0, 1, 0, 2, 3, 3, 4], device=device) if labelled else None
    fn = ours(on_backend, scale=3.0, labels=labels, normalize=normalize, chunk_size=3)
    assert torch.autograd.gradcheck(fn, (img, txt))


@pytest.mark.parametrize("anchors", [(0, 9), (2, 7)], ids=["all_anchors", "some_anchors"])
@pytest.mark.parametrize("labelled,label_positives", [(False, False), (True, False), (True, True)])
def test_opcheck(backend, device, on_backend, labelled, label_positives, anchors):
    (img, txt), labels, op = opcheck_setup(device, on_backend, labelled)
    # A learnable scale on the inputs' device: the op's autograd gives it a gradient too.
    scale = torch.tensor(20.0, dtype=img.dtype, device=device, requires_grad=True)
    options = (0.2, True, label_positives, *anchors, 4, 6)
    torch.library.opcheck(op.unified_forward.default, (img, txt, labels, scale, *options))
    _, *saved, _ = op.unified_forward(img.detach(), txt.detach(), labels, scale.detach(), *options)
    assert saved[0].shape == (img.size(0), 5 if label_positives else 3)
    torch.library.opcheck(op.unified_backward.default, (torch.tensor(0.5, device=device), img.detach(), txt.detach(),
                                                        labels, scale.detach(), 0.2, label_positives, *saved,
                                                        *anchors, 4, 6))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("label_positives", [False, True])
def test_simt_kernels_match_the_cpu_kernels(dtype, label_positives):
    # The ops themselves on 5 × 4 tiles (chunks 16 and 24 do not divide N = 75): the same
    # saved state (layout and values) and gradients as the CPU kernels, within the dtype's
    # tolerance relative to each output's largest entry (the backends' GEMMs round S differently).
    img, txt = random_inputs(75, 16, dtype, seed=11)
    labels = make_labels("pairs" if label_positives else "random", 75)
    grad = torch.tensor(1.5, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    results = []
    for ops in (torch.ops.vse_cuda, torch.ops.vse_simt):
        forward = ops.unified_forward(img, txt, labels, _scale(5.0), 0.2, True, label_positives, 0, 75, 16, 24)
        backward = ops.unified_backward(grad, img, txt, labels, _scale(5.0), 0.2, label_positives, *forward[1:3], 0,
                                        75, 16, 24)
        results.append(forward + backward)
    for got, want in zip(*reversed(results)):
        assert got.shape == want.shape
        assert_close(got, want, dtype, tol=1e-12 if dtype == torch.float64 else None)


def test_nan_input_gives_nan_loss(backend, device, on_backend):
    img, txt = (x.to(device) for x in random_inputs(10, 4, seed=2))
    txt[6, 0] = float("nan")
    loss, grads = loss_and_grads(ours(on_backend, chunk_size=4), img, txt)
    assert torch.isnan(loss)
    assert grads[0].shape == img.shape and grads[1].shape == txt.shape


# --------------------------------------------------- large scales: γ times a difference, not a difference of γ S

def _relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return float((got.double() - exact).abs().max() / exact.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("scale", [1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e10])
@pytest.mark.parametrize("label_kind", [None, "random"])
def test_large_scale_gradients_as_precise_as_the_float32_oracle(backend, device, on_backend, scale, label_kind):
    # The exact values are the float64 oracle's on the same float32 inputs. The float32 oracle
    # rounds S once and then forms γ (S_ij − S_ii + m); ours must lose no more than it does
    # (forming γ S_ij and γ S_ii first cancels every digit of their difference at large γ).
    n, d = 29, 16
    img, txt = (F.normalize(x, dim=1).to(device) for x in random_inputs(n, d, torch.float32, seed=11))
    labels = make_labels(label_kind, n, seed=2, device=device)
    options = dict(scale=scale, margin=0.1, labels=labels)
    exact_loss, exact_grads = loss_and_grads(oracle(**options), img.double(), txt.double())
    ref_loss, ref_grads = loss_and_grads(oracle(**options), img, txt)
    for chunk in chunk_options(n):
        loss, grads = loss_and_grads(ours(on_backend, chunk_size=chunk, **options), img, txt)
        assert torch.isfinite(loss) and all(bool(torch.isfinite(g).all()) for g in grads), f"chunk={chunk}"
        assert _relative_error(loss, exact_loss) <= 2 * _relative_error(ref_loss, exact_loss) + 1e-6
        for side in (0, 1):
            floor = 2 * _relative_error(ref_grads[side], exact_grads[side]) + 1e-5
            assert _relative_error(grads[side], exact_grads[side]) <= floor, f"d {('img', 'txt')[side]}, chunk={chunk}"


@pytest.mark.parametrize("magnitude,scale", [(1.0, 1e20), (1e147, 1e10), (1e-150, 1e20)])
def test_extreme_float64_values_are_finite_and_right(backend, device, on_backend, magnitude, scale):
    # S of size magnitude², γ large: every γ (S_ij − S_ii + m) is a finite float64 (the loss is
    # about 1e304 for magnitude 1e147), but γ S_ij alone overflows or cancels.
    n, d = 13, 8
    img, txt = (F.normalize(x, dim=1).to(device) * magnitude for x in random_inputs(n, d, seed=4))
    options = dict(scale=scale, margin=0.0)
    want_loss, want_grads = loss_and_grads(oracle(**options), img, txt)
    assert torch.isfinite(want_loss) and all(bool(torch.isfinite(g).all()) for g in want_grads)
    for chunk in chunk_options(n):
        loss, grads = loss_and_grads(ours(on_backend, chunk_size=chunk, **options), img, txt)
        torch.testing.assert_close(loss, want_loss, rtol=1e-9, atol=0.0, msg=f"loss, chunk={chunk}")
        for side in (0, 1):
            scale_of = float(want_grads[side].abs().max())
            torch.testing.assert_close(grads[side], want_grads[side], rtol=1e-9, atol=1e-9 * scale_of,
                                       msg=f"d {('img', 'txt')[side]}, chunk={chunk}")


def test_huge_float32_scores_give_finite_gradients(backend, device, on_backend):
    # S ≈ 1e36 is a finite float32 and so is every γ (S_ij − S_ii + m) at γ = 20.
    img, txt = (F.normalize(x, dim=1).to(device) * 1e18 for x in random_inputs(11, 4, torch.float32, seed=6))
    want_loss, want_grads = loss_and_grads(oracle(scale=20.0, margin=0.2), img.double(), txt.double())
    loss, grads = loss_and_grads(ours(on_backend, scale=20.0, margin=0.2), img, txt)
    assert torch.isfinite(loss) and all(bool(torch.isfinite(g).all()) for g in grads)
    assert _relative_error(loss, want_loss) <= 1e-5
    for side in (0, 1):
        assert _relative_error(grads[side], want_grads[side]) <= 1e-5


# ------------------------------------------------------- a learnable scale (spec §8.1)

def ours_scaled(on_backend, **options):
    """unified_loss(img, txt, scale=scale) on the test's backend, scale a tensor argument."""
    def call(img, txt, scale):
        with on_backend():
            return vse_cuda.unified_loss(img, txt, scale=scale, **options)
    return call


def oracle_scaled(**options):
    return lambda img, txt, scale: vse_cuda.reference.unified_loss(img, txt, scale=scale, **options)


SCALE_SIZES = [(n, d) for n in (1, 2, 17, 64) for d in (1, 5)]
SCALE_SIMT_SIZES = [(1, 1), (2, 5), (17, 5), (64, 1)]


#: (label kind, label_positives): masking with every label kind; positives from labels (spec
#: §8.3) with every kind that has labels.
LABEL_USES = [*((kind, False) for kind in LABEL_KINDS), *((kind, True) for kind in LABEL_KINDS if kind)]


@pytest.mark.parametrize("scale,margin", [(0.5, 0.2), (20.0, 0.0), (1000.0, 0.1)])
@pytest.mark.parametrize("label_kind,label_positives", LABEL_USES)
@pytest.mark.parametrize("backend,n,d", per_backend(BACKENDS, SCALE_SIZES, SCALE_SIMT_SIZES))
def test_scale_gradient_matches_oracle_float64(backend, device, on_backend, n, d, label_kind, label_positives, scale,
                                               margin):
    img, txt = (x.to(device) for x in random_inputs(n, d, seed=10 * n + d))
    gamma = torch.tensor(scale, dtype=torch.float64, device=device)
    labels = make_labels(label_kind, n, seed=n, device=device)
    for normalize, reduction, chunks in oracle_grid(n):
        options = dict(margin=margin, labels=labels, normalize=normalize, reduction=reduction,
                       label_positives=label_positives)
        want_loss, want_grads = loss_and_grads(oracle_scaled(**options), img, txt, gamma)
        for chunk in chunks:
            loss, grads = loss_and_grads(ours_scaled(on_backend, chunk_size=chunk, **options), img, txt, gamma)
            case = f"normalize={normalize} reduction={reduction} chunk={chunk}"
            assert_close(loss, want_loss, torch.float64, f"loss, {case}")
            for what, got, want in zip(("d img", "d txt", "d scale"), grads, want_grads):
                assert_close(got, want, torch.float64, f"{what}, {case}", float(want_loss.abs()) / n)


def test_number_and_tensor_scale_agree_bitwise(backend, device, on_backend):
    img, txt = (x.to(device) for x in random_inputs(37, 8, torch.float32, seed=3))
    labels = make_labels("pairs", 37, device=device)
    by_number = loss_and_grads(ours(on_backend, scale=14.0, labels=labels, chunk_size=9), img, txt)
    # loss_and_grads makes the scale a leaf that requires grad: the forward then computes ∂L/∂γ too.
    scale = torch.tensor(14.0, device=device)
    learning = loss_and_grads(ours_scaled(on_backend, labels=labels, chunk_size=9), img, txt, scale)
    with on_backend():
        fixed = vse_cuda.unified_loss(img, txt, scale=scale, labels=labels, chunk_size=9)
    assert torch.equal(by_number[0], learning[0]) and torch.equal(by_number[0], fixed)
    assert all(torch.equal(a, b) for a, b in zip(by_number[1], learning[1][:2]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_scale_gradient_of_half_inputs(backend, device, on_backend, dtype):
    # S is a float32 GEMM of the inputs as given, so ∂L/∂γ is as precise as float32 whatever
    # the input dtype: compared with the float64 oracle on the same (rounded) inputs.
    img, txt = (F.normalize(x, dim=1).to(device, dtype) for x in random_inputs(45, 16, seed=6))
    labels = make_labels("random", 45, device=device)
    gamma = torch.tensor(30.0, device=device)
    options = dict(margin=0.1, labels=labels, reduction="mean")
    _, (_, _, want) = loss_and_grads(oracle_scaled(**options), img.double(), txt.double(), gamma.double())
    _, (_, _, got) = loss_and_grads(ours_scaled(on_backend, chunk_size=16, **options), img, txt, gamma)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * float(want.abs()))


@pytest.mark.parametrize("scale", [1e3, 1e6, 1e10])
def test_scale_gradient_at_large_scales(backend, device, on_backend, scale):
    # ∂L_i/∂γ is a softmax-weighted mean of the differences S_ij − S_ii + m times the
    # negatives' weight: no γ multiplies a rounding error, in float64 or in float32.
    n, d = 29, 16
    img, txt = (F.normalize(x, dim=1).to(device) for x in random_inputs(n, d, seed=12))
    options = dict(margin=0.1, labels=make_labels("random", n, seed=3, device=device))
    gamma = torch.tensor(scale, dtype=torch.float64, device=device)
    _, (*_, exact) = loss_and_grads(oracle_scaled(**options), img, txt, gamma)
    _, (*_, ref32) = loss_and_grads(oracle_scaled(**options), img.float(), txt.float(), gamma.float())
    for chunk in chunk_options(n):
        _, (*_, got) = loss_and_grads(ours_scaled(on_backend, chunk_size=chunk, **options), img, txt, gamma)
        torch.testing.assert_close(got, exact, rtol=1e-9, atol=0.0, msg=f"float64, chunk={chunk}")
        _, (*_, got32) = loss_and_grads(ours_scaled(on_backend, chunk_size=chunk, **options), img.float(),
                                        txt.float(), gamma.float())
        assert torch.isfinite(got32)
        assert _relative_error(got32, exact) <= 2 * _relative_error(ref32, exact) + 1e-6, f"chunk={chunk}"


def test_gradcheck_with_the_scale(backend, device, on_backend):
    img, txt = (x.to(device).requires_grad_() for x in random_inputs(7, 4, seed=3))
    gamma = torch.tensor(3.0, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2, 3, 3, 4], device=device)
    assert torch.autograd.gradcheck(ours_scaled(on_backend, labels=labels, chunk_size=3), (img, txt, gamma))


def test_scale_alone_requires_grad(backend, device, on_backend):
    # Frozen towers, a learnable temperature: only the scale gets a gradient, the same one.
    img, txt = (x.to(device) for x in random_inputs(20, 6, seed=9))
    gamma = torch.tensor(8.0, dtype=torch.float64, device=device)
    _, (*_, want) = loss_and_grads(ours_scaled(on_backend, chunk_size=7), img, txt, gamma)
    alone = gamma.clone().requires_grad_()
    with on_backend():
        vse_cuda.unified_loss(img, txt, scale=alone, chunk_size=7).backward()
    assert torch.equal(alone.grad, want)


def test_clip_log_scale_parametrization(backend, device, on_backend):
    # CLIP learns t = log γ (logit_scale, initialised at log(1/0.07)): ∂L/∂t = γ ∂L/∂γ.
    img, txt = (F.normalize(x, dim=1).to(device) for x in random_inputs(33, 8, seed=2))
    log_scale = torch.tensor(1 / 0.07, dtype=torch.float64, device=device).log()
    options = dict(margin=0.0, reduction="mean")

    def ours_log(a, b, t):
        return ours_scaled(on_backend, chunk_size=10, **options)(a, b, t.exp().clamp(max=100))

    def oracle_log(a, b, t):
        return oracle_scaled(**options)(a, b, t.exp().clamp(max=100))

    loss, grads = loss_and_grads(ours_log, img, txt, log_scale)
    want_loss, want_grads = loss_and_grads(oracle_log, img, txt, log_scale)
    assert_close(loss, want_loss, torch.float64, "loss")
    for what, got, want in zip(("d img", "d txt", "d log scale"), grads, want_grads):
        assert_close(got, want, torch.float64, what)


def test_module_with_a_learnable_scale(backend, device, on_backend):
    img, txt = (x.to(device) for x in random_inputs(12, 4, seed=5))
    module = vse_cuda.UnifiedLoss(scale=torch.nn.Parameter(torch.tensor(5.0, dtype=torch.float64, device=device)),
                                  margin=0.1, chunk_size=5)
    assert [p is module.scale for p in module.parameters()] == [True]
    assert "scale=<Parameter>" in repr(module)
    with on_backend():
        module(img, txt).backward()
    _, (*_, want) = loss_and_grads(ours_scaled(on_backend, margin=0.1, chunk_size=5), img, txt, module.scale.detach())
    assert torch.equal(module.scale.grad, want)
    # A scale given to forward replaces the module's for that call.
    with on_backend():
        replaced = module(img, txt, scale=2.0)
        assert torch.equal(replaced, vse_cuda.unified_loss(img, txt, scale=2.0, margin=0.1, chunk_size=5))


@pytest.mark.parametrize("dynamic", [False, True])
def test_learnable_scale_under_torch_compile(backend, device, on_backend, dynamic):
    img, txt = (x.to(device) for x in random_inputs(16, 4, torch.float32, seed=1))
    gamma = torch.tensor(12.0, device=device)

    def loss(a, b, s):
        return vse_cuda.unified_loss(a, b, scale=s, normalize=True, reduction="mean", chunk_size=6)

    compiled = torch.compile(loss, fullgraph=True, dynamic=dynamic)
    with on_backend():
        eager = loss_and_grads(loss, img, txt, gamma)
        graph = loss_and_grads(compiled, img, txt, gamma)
    torch.testing.assert_close(graph[0], eager[0])
    for got, want in zip(graph[1], eager[1]):
        torch.testing.assert_close(got, want)


def test_op_without_scale_grad_refuses_a_scale_that_requires_grad():
    # A direct op call that did not ask the forward for ∂L/∂γ cannot give the scale a gradient.
    img, txt = random_inputs(5, 3, seed=0)
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    loss = torch.ops.vse_cuda.unified_forward(img, txt, torch.empty(0, dtype=torch.int64), scale, 0.2, False,
                                              False, 0, 5, 4, 4)[0]
    with pytest.raises(RuntimeError, match="scale_grad=False"):
        loss.backward()


# ------------------------------------------------ positives from labels (spec §8.3)

def positives_loss(on_backend, **options):
    """unified_loss(..., label_positives=True) with a tensor scale as its third input (the
    oracle grid with label_positives is test_scale_gradient_matches_oracle_float64's)."""
    return ours_scaled(on_backend, label_positives=True, **options)


def positives_oracle(**options):
    return oracle_scaled(label_positives=True, **options)


def test_label_positives_with_unique_labels_is_the_unified_loss(backend, device, on_backend):
    # P(i) = {i}: the same terms, summed the same way (bitwise), and gradients up to rounding.
    img, txt = (x.to(device) for x in random_inputs(41, 6, seed=4))
    labels = torch.arange(41, device=device)
    gamma = torch.tensor(15.0, dtype=torch.float64, device=device)
    plain = loss_and_grads(ours_scaled(on_backend, labels=labels, chunk_size=9), img, txt, gamma)
    positives = loss_and_grads(positives_loss(on_backend, labels=labels, chunk_size=9), img, txt, gamma)
    assert torch.equal(plain[0], positives[0])
    for got, want in zip(positives[1], plain[1]):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


def test_label_positives_count_same_label_pairs_instead_of_masking_them(backend, device, on_backend):
    # Two captions of one image: masking ignores the pair (0, 1); as positives it has a
    # gradient pulling them together, and the loss differs.
    img, txt = (x.to(device) for x in random_inputs(6, 4, seed=8))
    labels = torch.tensor([0, 0, 1, 2, 3, 4], device=device)
    gamma = torch.tensor(5.0, dtype=torch.float64, device=device)
    masked = loss_and_grads(ours_scaled(on_backend, labels=labels), img, txt, gamma)
    positives = loss_and_grads(positives_loss(on_backend, labels=labels), img, txt, gamma)
    assert not torch.equal(masked[0], positives[0])
    # Row anchor 0's term depends on S_01 = ⟨img_0, txt_1⟩ only as a positive.
    assert positives[1][1][1].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_label_positives_of_half_inputs(backend, device, on_backend, dtype):
    # Tiles are float32 GEMMs of the inputs as given: compared with the float64 oracle on the
    # same rounded inputs, with float32's tolerance.
    img, txt = (F.normalize(x, dim=1).to(device, dtype) for x in random_inputs(45, 16, seed=6))
    labels = make_labels("pairs", 45, device=device)
    gamma = torch.tensor(30.0, device=device)
    options = dict(margin=0.1, labels=labels, reduction="mean")
    want_loss, want_grads = loss_and_grads(positives_oracle(**options), img.double(), txt.double(), gamma.double())
    loss, grads = loss_and_grads(positives_loss(on_backend, chunk_size=16, **options), img, txt, gamma)
    assert loss.dtype == dtype and grads[0].dtype == dtype and grads[2].dtype == torch.float32
    torch.testing.assert_close(loss.double(), want_loss, rtol=TOL[dtype], atol=TOL[dtype])
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), want, rtol=TOL[dtype], atol=TOL[dtype] * float(want.abs().max()))


@pytest.mark.parametrize("scale", [1e3, 1e6, 1e10])
def test_label_positives_at_large_scales(backend, device, on_backend, scale):
    # Entries on a grid make every S exact in any summation order, so each γ(S_ij − S_ip + m) is
    # exact too. What rounds is each log-sum-exp, of size γ: eps·γ in every exponent, the
    # oracle's too. float64 must stay within that, float32 within twice the float32 oracle's error.
    n = 24
    img, txt = (x.to(device) for x in grid_inputs(n, 6, seed=3))
    labels = make_labels("pairs", n, device=device)
    gamma = torch.tensor(scale, dtype=torch.float64, device=device)
    options = dict(margin=0.125, labels=labels)
    want_loss, want_grads = loss_and_grads(positives_oracle(**options), img, txt, gamma)
    _, grads32_oracle = loss_and_grads(positives_oracle(**options), img.float(), txt.float(), gamma.float())
    tol = max(1e-12, 4 * torch.finfo(torch.float64).eps * scale)
    for chunk in chunk_options(n):
        loss, grads = loss_and_grads(positives_loss(on_backend, chunk_size=chunk, **options), img, txt, gamma)
        torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=0.0, msg=f"chunk={chunk}")
        for got, want in zip(grads, want_grads):
            assert _relative_error(got, want) <= tol, f"chunk={chunk}"
        _, grads32 = loss_and_grads(positives_loss(on_backend, chunk_size=chunk, **options), img.float(),
                                    txt.float(), gamma.float())
        for got, oracle32, want in zip(grads32, grads32_oracle, want_grads):
            assert bool(torch.isfinite(got).all())
            assert _relative_error(got, want) <= 2 * _relative_error(oracle32, want) + 1e-6, f"chunk={chunk}"


def test_label_positives_gradcheck(backend, device, on_backend):
    img, txt = (x.to(device).requires_grad_() for x in random_inputs(7, 4, seed=3))
    gamma = torch.tensor(3.0, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2, 3, 3, 3], device=device)
    fn = positives_loss(on_backend, labels=labels, normalize=True, chunk_size=3)
    assert torch.autograd.gradcheck(fn, (img, txt, gamma))


def test_label_positives_need_labels(backend, device, on_backend):
    img, txt = (x.to(device) for x in random_inputs(4, 3, seed=0))
    with on_backend(), pytest.raises(ValueError, match="label_positives=True needs labels"):
        vse_cuda.unified_loss(img, txt, label_positives=True)
    with pytest.raises(TypeError, match="label_positives"):
        vse_cuda.UnifiedLoss(label_positives="yes")
    with pytest.raises(RuntimeError, match="label_positives needs labels"):
        torch.ops.vse_cuda.unified_forward(img.cpu(), txt.cpu(), torch.empty(0, dtype=torch.int64), _scale(2.0), 0.2,
                                           False, True, 0, 4, 4, 4)


def test_label_positives_module(backend, device, on_backend):
    img, txt = (x.to(device) for x in random_inputs(12, 4, seed=5))
    labels = make_labels("pairs", 12, device=device)
    module = vse_cuda.UnifiedLoss(scale=7.0, margin=0.1, chunk_size=5, label_positives=True)
    assert "label_positives=True" in repr(module)
    with on_backend():
        assert torch.equal(module(img, txt, labels),
                           vse_cuda.unified_loss(img, txt, scale=7.0, margin=0.1, labels=labels, chunk_size=5,
                                                 label_positives=True))
