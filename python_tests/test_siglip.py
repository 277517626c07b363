"""siglip_loss / SigLipLoss (the chunked engine) against the oracle
vse_cuda.reference.siglip_loss: loss and the gradients of img, txt, scale and bias with and
without labels (same-label pairs are positives), both reductions, normalization, chunk sizes
that do and do not divide N, all dtypes, extreme logits; gradcheck, opcheck, determinism,
torch.compile, memory and bad input. Multi-process runs are in test_distributed.py.

On simt (and cuda) this runs dense_rows_kernel, dense_columns_kernel, dense_finish_kernel
and dense_gradient_kernel of csrc/cuda/engine_kernels.cuh with the SigLIP policy, whose
same-label terms no other policy has (fold_entry, dense_entry_gradient). On cpu the rows and
gradient passes evaluate the same terms in vector lanes (cpu/capability/siglip.cpp): tile widths
around the lane counts, every capability's build, NaN and thread counts are checked below."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vse_cuda
from vse_cuda import reference as ref

from _loss_cases import (BACKENDS, LABEL_KINDS, TOL, assert_close, extra_peak_mib, loss_and_grads, make_labels,
                         opcheck_setup, oracle_grid, per_backend, random_inputs)

SIZES = [(n, d) for n in (1, 2, 3, 17, 64) for d in (1, 5)]
SIMT_SIZES = [(1, 1), (2, 5), (17, 5), (64, 1)]


def ours(on_backend, **options):
    def call(img, txt, scale, bias):
        with on_backend():
            return vse_cuda.siglip_loss(img, txt, scale, bias, **options)
    return call


def oracle(**options):
    options.pop("chunk_size", None)
    return lambda img, txt, scale, bias: ref.siglip_loss(img, txt, scale, bias, **options)


def scalars(scale: float, bias: float, dtype=torch.float64, device="cpu"):
    return torch.tensor(scale, dtype=dtype, device=device), torch.tensor(bias, dtype=dtype, device=device)


@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (1.0, 0.5), (300.0, -2.0)])
@pytest.mark.parametrize("label_kind", LABEL_KINDS)
@pytest.mark.parametrize("backend,n,d", per_backend(BACKENDS, SIZES, SIMT_SIZES))
def test_matches_oracle_float64(backend, device, on_backend, n, d, label_kind, scale, bias):
    img, txt = (x.to(device) for x in random_inputs(n, d, seed=10 * n + d))
    t, b = scalars(scale, bias, device=device)
    labels = make_labels(label_kind, n, device=device)
    for normalize, reduction, chunks in oracle_grid(n):
        options = dict(labels=labels, normalize=normalize, reduction=reduction)
        want_loss, want_grads = loss_and_grads(oracle(**options), img, txt, t, b)
        for chunk in chunks:
            loss, grads = loss_and_grads(ours(on_backend, chunk_size=chunk, **options), img, txt, t, b)
            case = f"normalize={normalize} reduction={reduction} chunk={chunk}"
            assert_close(loss, want_loss, torch.float64, f"loss, {case}")
            for what, got, want in zip(("d img", "d txt", "d scale", "d bias"), grads, want_grads):
                assert_close(got, want, torch.float64, f"{what}, {case}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("label_kind", [None, "pairs"])
def test_low_precision_matches_oracle(backend, device, on_backend, dtype, label_kind):
    img, txt = (F.normalize(x, dim=1).to(device, dtype) for x in random_inputs(37, 8, seed=2))
    t, b = scalars(10.0, -5.0, torch.float32, device)
    labels = make_labels(label_kind, 37, device=device)
    for reduction in ("sum", "mean"):
        options = dict(labels=labels, reduction=reduction)
        want_loss, want_grads = loss_and_grads(oracle(**options), img, txt, t, b)
        for chunk in (None, 8):
            loss, grads = loss_and_grads(ours(on_backend, chunk_size=chunk, **options), img, txt, t, b)
            assert loss.dtype == dtype and grads[0].dtype == dtype and grads[1].dtype == dtype
            assert_close(loss, want_loss, dtype, "loss")
            for what, got, want in zip(("d img", "d txt", "d scale", "d bias"), grads, want_grads):
                assert_close(got, want, dtype, what)


def test_numbers_and_tensors_agree_bitwise(backend, device, on_backend):
    img, txt = (x.to(device) for x in random_inputs(29, 6, torch.float32, seed=4))
    labels = make_labels("pairs", 29, device=device)
    with on_backend():
        by_number = vse_cuda.siglip_loss(img, txt, 7.0, -3.0, labels=labels, chunk_size=8)
        by_tensor = vse_cuda.siglip_loss(img, txt, *scalars(7.0, -3.0, device=device), labels=labels, chunk_size=8)
    assert torch.equal(by_number, by_tensor)


def test_extreme_logits_stay_finite(backend, device, on_backend):
    # |t·S + b| up to 1e4: log σ underflows nowhere (softplus from e^{−|x|}).
    img, txt = (F.normalize(x, dim=1).to(device) for x in random_inputs(12, 4, seed=7))
    t, b = scalars(1e4, -50.0, device=device)
    want_loss, want_grads = loss_and_grads(oracle(), img, txt, t, b)
    loss, grads = loss_and_grads(ours(on_backend, chunk_size=5), img, txt, t, b)
    assert torch.isfinite(loss) and all(bool(torch.isfinite(g).all()) for g in grads)
    assert_close(loss, want_loss, torch.float64, "loss")
    for what, got, want in zip(("d img", "d txt", "d scale", "d bias"), grads, want_grads):
        assert_close(got, want, torch.float64, what)


@pytest.mark.parametrize("labelled", [False, True])
def test_gradcheck(backend, device, on_backend, labelled):
    img, txt = (x.to(device).requires_grad_() for x in random_inputs(7, 4, seed=3))
    t, b = (x.requires_grad_() for x in scalars(2.0, -1.0, device=device))
    labels = torch.tensor([0, 1, 0, 2, 3, 3, 4], device=device) if labelled else None
    assert torch.autograd.gradcheck(ours(on_backend, labels=labels, normalize=True, chunk_size=3), (img, txt, t, b))


@pytest.mark.parametrize("anchors", [(0, 9), (2, 7)], ids=["all_anchors", "some_anchors"])
@pytest.mark.parametrize("labelled", [False, True])
def test_opcheck(backend, device, on_backend, labelled, anchors):
    (img, txt), labels, op = opcheck_setup(device, on_backend, labelled)
    t, b = (x.requires_grad_() for x in scalars(10.0, -10.0, torch.float32, device))
    torch.library.opcheck(op.siglip_forward.default, (img, txt, labels, t, b, *anchors, 4, 6))
    _, *saved, _, _ = op.siglip_forward(img.detach(), txt.detach(), labels, t.detach(), b.detach(), *anchors, 4, 6)
    torch.library.opcheck(op.siglip_backward.default, (torch.tensor(0.5, device=device), img.detach(), txt.detach(),
                                                       labels, t.detach(), b.detach(), *saved, *anchors, 4, 6))


@pytest.mark.parametrize("labelled", [False, True])
def test_anchor_ranges_partition_the_loss(backend, on_backend, labelled):
    # What group= relies on: [0, 5) + [5, 13) + [13, 23) of the anchors give the whole loss and
    # gradients, each term counted once (halves from its row and its column anchor).
    img, txt = random_inputs(23, 5, seed=4)
    labels = make_labels("random", 23) if labelled else torch.empty(0, dtype=torch.int64)
    with on_backend():
        ops = vse_cuda._lib.ops(img, txt)
    pieces = []
    for begin, end in [(0, 23), (0, 5), (5, 13), (13, 23)]:
        leaves = [x.clone().requires_grad_() for x in (img, txt, *scalars(4.0, -2.0))]
        with on_backend():
            ops.siglip_forward(*leaves[:2], labels, *leaves[2:], begin, end, 4, 6)[0].backward()
        pieces.append([x.grad for x in leaves])
    whole, parts = pieces[0], pieces[1:]
    for s, want in enumerate(whole):
        torch.testing.assert_close(sum(p[s] for p in parts), want, rtol=1e-12, atol=1e-12)


def test_bitwise_deterministic(backend, device, on_backend):
    img, txt = (x.to(device) for x in random_inputs(300, 32, torch.float32, seed=9))
    fn = ours(on_backend, labels=make_labels("random", 300).to(device), chunk_size=64)
    t, b = scalars(10.0, -10.0, torch.float32, device)
    first, second = loss_and_grads(fn, img, txt, t, b), loss_and_grads(fn, img, txt, t, b)
    assert torch.equal(first[0], second[0]) and all(torch.equal(x, y) for x, y in zip(first[1], second[1]))


def test_simt_bitwise_deterministic_across_worker_counts(monkeypatch):
    img, txt = random_inputs(150, 16, torch.float32, seed=10)
    fn = ours(lambda: vse_cuda.use_backend("simt"), labels=make_labels("random", 150), chunk_size=40)
    runs = []
    for workers in ("1", "3", "1"):
        monkeypatch.setenv("VSE_SIMT_THREADS", workers)
        runs.append(loss_and_grads(fn, img, txt, *scalars(10.0, -10.0, torch.float32)))
    for other in runs[1:]:
        assert torch.equal(runs[0][0], other[0]) and all(torch.equal(x, y) for x, y in zip(runs[0][1], other[1]))


def test_simt_kernels_match_the_cpu_kernels():
    img, txt = random_inputs(75, 16, seed=11)
    labels = make_labels("pairs", 75)
    t, b = scalars(5.0, -2.0)
    results = []
    for ops in (torch.ops.vse_cuda, torch.ops.vse_simt):
        forward = ops.siglip_forward(img, txt, labels, t, b, 0, 75, 16, 24)
        backward = ops.siglip_backward(torch.tensor(1.5, dtype=torch.float64), img, txt, labels, t, b,
                                       *forward[1:3], 0, 75, 16, 24)
        results.append(forward + backward)
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# The CPU kernels evaluate each row's entries in vector lanes of the CPU capability torch runs
# with (cpu/capability/siglip.cpp: 4, 8 or 16 entries): tile widths below, at and around those
# counts, the anchor's own pair at every lane position and outside the tile, labels (same-label
# pairs are positives), and logits from moderate to ±huge, through the ops' own tile plan.
LANE_TILES = [(41, 1), (7, 3), (41, 4), (5, 7), (41, 8), (9, 15), (41, 16), (6, 17), (41, 33), (40, 41)]
# (scale, bias); |t·S + b| up to ~5e4 in float64 only: at t = 1e4 float32's rounding of S alone
# moves a logit by ~5e-3, beyond float32's tolerance for any kernel.
LANE_LOGITS = {torch.float64: [(10.0, -10.0), (300.0, -2.0), (1e4, 50.0), (1e4, -50.0)],
               torch.float32: [(10.0, -10.0), (300.0, -2.0)]}


def check_lanes_against_oracle(dtype: torch.dtype, label_kind: str | None, tiles=LANE_TILES) -> None:
    """The CPU op's loss (a sum) and gradients for every tile shape of `tiles` against the float64
    oracle on the same (dtype-rounded) inputs."""
    n = 41
    img, txt = (x.to(dtype) for x in random_inputs(n, 6, seed=12))
    labels = make_labels(label_kind, n)
    lab = torch.empty(0, dtype=torch.int64) if labels is None else labels
    for scale, bias in LANE_LOGITS[dtype]:
        t, b = scalars(scale, bias, dtype)
        want_loss, want_grads = loss_and_grads(oracle(labels=labels, reduction="sum"), img.double(), txt.double(),
                                               *scalars(scale, bias))
        for rows, cols in tiles:
            case = f"{dtype} labels={label_kind} scale={scale} bias={bias} tile={rows}x{cols}"
            loss, row_saved, col_saved, d_scale, d_bias = torch.ops.vse_cuda.siglip_forward(
                img, txt, lab, t, b, 0, n, rows, cols)
            d_img, d_txt = torch.ops.vse_cuda.siglip_backward(torch.tensor(1.0, dtype=loss.dtype), img, txt, lab,
                                                              t, b, row_saved, col_saved, 0, n, rows, cols)
            assert_close(loss.double(), want_loss, dtype, f"loss, {case}")
            for what, got, want in zip(("d img", "d txt", "d scale", "d bias"), (d_img, d_txt, d_scale, d_bias),
                                       want_grads):
                assert_close(got.double(), want, dtype, f"{what}, {case}")


@pytest.mark.parametrize("label_kind", [None, "random", "same"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_lanes_match_the_oracle(dtype, label_kind):
    check_lanes_against_oracle(dtype, label_kind)


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_cpu_capabilities_match_the_oracle(capability):
    # Each capability's build of the loops, chosen as torch chooses its own (ATEN_CPU_CAPABILITY),
    # in a process of its own (the choice is made once per process).
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        if torch.backends.cpu.get_cpu_capability() != {capability.upper()!r}:
            print("unsupported:", torch.backends.cpu.get_cpu_capability())
            sys.exit(0)
        import test_siglip
        for dtype in (torch.float64, torch.float32):
            for label_kind in (None, "random"):
                test_siglip.check_lanes_against_oracle(dtype, label_kind, [(7, 3), (9, 15), (6, 17), (40, 41)])
        print("ok")
    """)
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    if run.stdout.startswith("unsupported"):
        pytest.skip(f"this CPU runs torch with {run.stdout.split()[-1]}")
    assert run.stdout.strip().endswith("ok"), run.stdout + run.stderr


def test_nan_propagates_as_in_the_scalar_kernels():
    # A NaN input entry makes its row and column of S NaN: the vector lanes (cpu) give NaN
    # exactly where the one-entry-at-a-time kernels (simt) do, and the same values elsewhere.
    img, txt = random_inputs(37, 5, seed=13)
    img[3, 1] = float("nan")
    txt[20, 0] = float("nan")
    labels = make_labels("pairs", 37)
    t, b = scalars(10.0, -10.0)
    results = []
    for ops in (torch.ops.vse_cuda, torch.ops.vse_simt):
        forward = ops.siglip_forward(img, txt, labels, t, b, 0, 37, 8, 12)
        backward = ops.siglip_backward(torch.tensor(1.0, dtype=torch.float64), img, txt, labels, t, b,
                                       *forward[1:3], 0, 37, 8, 12)
        results.append(forward + backward)
    assert torch.isnan(results[0][0])
    for got, want in zip(*results):
        assert torch.equal(got.isnan(), want.isnan())
        torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), rtol=1e-12, atol=1e-12)


def test_cpu_bitwise_deterministic_across_thread_counts():
    img, txt = random_inputs(600, 16, torch.float32, seed=14)
    fn = ours(lambda: vse_cuda.use_backend("cpu"), labels=make_labels("random", 600), chunk_size=128)
    t, b = scalars(10.0, -10.0, torch.float32)
    threads = torch.get_num_threads()
    runs = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            runs.append(loss_and_grads(fn, img, txt, t, b))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        assert torch.equal(runs[0][0], other[0]) and all(torch.equal(x, y) for x, y in zip(runs[0][1], other[1]))


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(dynamic):
    module = vse_cuda.SigLipLoss(normalize=True, chunk_size=5)
    compiled = torch.compile(module, fullgraph=True, dynamic=dynamic)
    img, txt = random_inputs(12, 5, torch.float32, seed=6)
    labels = make_labels("pairs", 12)
    eager = loss_and_grads(lambda a, b: module(a, b, labels), img, txt)
    graph = loss_and_grads(lambda a, b: compiled(a, b, labels), img, txt)
    torch.testing.assert_close(graph, eager)


def test_module_learns_log_scale_and_bias():
    img, txt = random_inputs(10, 4, seed=1)
    module = vse_cuda.SigLipLoss(chunk_size=4)
    assert sorted(name for name, _ in module.named_parameters()) == ["bias", "log_scale"]
    assert float(module.log_scale.detach().exp()) == pytest.approx(10.0) and float(module.bias.detach()) == -10.0
    module(img, txt).backward()
    t_prime, b = torch.tensor(10.0).log().double().requires_grad_(), torch.tensor(-10.0).double().requires_grad_()
    ref.siglip_loss(img, txt, t_prime.exp(), b).backward()
    torch.testing.assert_close(module.log_scale.grad.double(), t_prime.grad, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(module.bias.grad.double(), b.grad, rtol=1e-6, atol=1e-9)
    fixed = vse_cuda.SigLipLoss(learnable=False)
    assert list(fixed.parameters()) == [] and sorted(name for name, _ in fixed.named_buffers()) == ["bias", "log_scale"]


def test_memory_stays_within_chunks():
    # S would be 6000 × 6000 float32 = 137 MiB; the engine holds one 500-row tile and O(N) state.
    extra_mib = extra_peak_mib(
        "inputs = [torch.randn(6000, 16, requires_grad=True) for _ in range(2)]",
        "scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)\n"
        "vse_cuda.siglip_loss(*inputs, scale, bias, chunk_size=500).backward()")
    assert extra_mib < 60, f"siglip_loss used {extra_mib:.0f} MiB extra; S alone would need 137 MiB"


@pytest.mark.parametrize("call, error, match", [
    (lambda x: vse_cuda.siglip_loss(x, x, 0.0, 0.0), ValueError, "scale must be > 0"),
    (lambda x: vse_cuda.siglip_loss(x, x, 10.0, float("nan")), ValueError, "bias must be finite"),
    (lambda x: vse_cuda.siglip_loss(x, x, torch.tensor([10.0]), 0.0), TypeError, "scale must be a real number"),
    (lambda x: vse_cuda.siglip_loss(x, x, 10.0, torch.tensor(1)), TypeError, "bias must be a real number"),
    (lambda x: vse_cuda.siglip_loss(x, x, 10.0, "0"), TypeError, "bias must be a real number"),
    (lambda x: vse_cuda.siglip_loss(x, x[:3], 10.0, 0.0), ValueError, "txt has N=3"),
    (lambda x: vse_cuda.siglip_loss(x, x, 10.0, 0.0, reduction="none"), ValueError, "reduction"),
    (lambda x: vse_cuda.siglip_loss(x, x, 10.0, 0.0, labels=torch.zeros(4)), TypeError, "labels"),
    (lambda x: vse_cuda.SigLipLoss(init_scale=-1.0), ValueError, "init_scale must be > 0"),
    (lambda x: vse_cuda.SigLipLoss(init_bias=float("inf")), ValueError, "init_bias must be finite"),
    (lambda x: vse_cuda.SigLipLoss(reduction="avg"), ValueError, "reduction"),
], ids=["scale-zero", "bias-nan", "scale-1d", "bias-int-tensor", "bias-str", "unpaired", "reduction",
        "labels-float", "module-scale", "module-bias", "module-reduction"])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(4, 5))
