"""What every loss must satisfy, run over the table _loss_cases.LOSSES (triplet, unified,
quintuplet, GOAL): the module equals the function, `group` must be a ProcessGroup, memory stays
within chunks, bad input and bad module keywords are refused by name, non-contiguous inputs
match the oracle, one pair gives a zero loss, results are bitwise deterministic (also across
the SIMT executor's worker counts) and torch.compile(fullgraph=True) matches eager.

What only one loss does (its oracle grids, gradcheck, opcheck, its special cases) stays in its
own test_<loss>.py. Test ids name the loss first, then the variant: test_bitwise_deterministic[
cpu-triplet-topk-4] is triplet_loss(mining="topk", k=4) on the cpu backend."""

from __future__ import annotations

import pytest
import torch

import vse_cuda

from _loss_cases import LOSSES, LossCase, assert_close, extra_peak_mib, loss_and_grads, make_labels, random_inputs

BY_LOSS = pytest.mark.parametrize("loss", LOSSES, ids=[loss.name for loss in LOSSES])


def variants(test: str):
    """`loss, options` parameters: every loss's variants for `test` (see LossCase.variants)."""
    return pytest.mark.parametrize("loss, options", [
        pytest.param(loss, options, id="-".join(filter(None, (loss.name, variant))))
        for loss in LOSSES for variant, options in loss.variants.get(test, ())])


def assert_all_close(loss: LossCase, got, want, dtype: torch.dtype) -> None:
    """The loss and every input's gradient of loss_and_grads."""
    assert_close(got[0], want[0], dtype, "loss")
    for name, g, w in zip(loss.inputs, got[1], want[1]):
        assert_close(g, w, dtype, f"d {name}")


def assert_bitwise_equal(first, second) -> None:
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


@BY_LOSS
def test_module_matches_the_function(loss):
    inputs = loss.make_inputs(11, 6, seed=12)
    labels = make_labels("pairs", 11)
    module = loss.module(**loss.module_options)
    assert all(shown in repr(module) for shown in loss.repr_shows), repr(module)
    assert torch.equal(module(*inputs, labels), loss.function(*inputs, labels=labels, **loss.module_options))
    assert torch.equal(loss.module()(*inputs), loss.function(*inputs))


@BY_LOSS
def test_group_must_be_a_process_group(loss):
    # group= itself is tested with several processes in test_distributed.py.
    inputs = loss.make_inputs(3, 2)
    with pytest.raises(TypeError, match="ProcessGroup"):
        loss.function(*inputs, group=object())
    with pytest.raises(TypeError, match="ProcessGroup"):
        loss.module(group=object())


@BY_LOSS
def test_memory_stays_within_chunks(loss):
    # S would be 6000 × 6000 float32 = 137 MiB (the oracle keeps several); the engine holds one
    # 500-row tile (11 MiB) and O(N·k) state, in the forward and in the backward.
    extra_mib = extra_peak_mib(
        f"inputs = [torch.randn(6000, 16, requires_grad=True) for _ in range({len(loss.inputs)})]",
        f"for options in {list(loss.memory_calls)!r}:\n"
        f"    labels = torch.arange(6000) // 5 if options.pop('labelled', False) else None\n"
        f"    vse_cuda.{loss.name}_loss(*inputs, chunk_size=500, labels=labels, **options).backward()")
    assert extra_mib < 60, f"{loss.name}_loss used {extra_mib:.0f} MiB extra; S alone would need 137 MiB"


@pytest.mark.parametrize("loss, overrides, error, match", [
    pytest.param(loss, overrides, error, match, id=f"{loss.name}-overrides{i}-{error.__name__}-{match}")
    for loss in LOSSES for i, (overrides, error, match) in enumerate(loss.bad_inputs)])
def test_bad_input(loss, overrides, error, match):
    g = torch.Generator().manual_seed(0)
    args = {name: torch.randn(4, 5, generator=g) for name in loss.inputs}
    args.update(overrides)
    inputs = [args.pop(name) for name in loss.inputs]
    with pytest.raises(error, match=match):
        loss.function(*inputs, **args)


@pytest.mark.parametrize("loss, kwargs, error, match", [
    pytest.param(loss, kwargs, error, match, id=f"{loss.name}-kwargs{i}-{error.__name__}-{match}")
    for loss in LOSSES for i, (kwargs, error, match) in enumerate(loss.bad_keywords)])
def test_module_checks_its_keywords(loss, kwargs, error, match):
    with pytest.raises(error, match=match):
        loss.module(**kwargs)


@variants("non_contiguous")
def test_non_contiguous_inputs(backend, device, on_backend, loss, options):
    # The images strided column slices, the captions transposed (column-major) views.
    g = torch.Generator().manual_seed(13)
    half = len(loss.inputs) // 2
    bases = [torch.randn(15, 12, generator=g, dtype=torch.float64).to(device) for _ in range(half)]
    bases += [torch.randn(6, 15, generator=g, dtype=torch.float64).to(device) for _ in range(half)]

    def views(xs):
        return [x[:, ::2] for x in xs[:half]] + [x.T for x in xs[half:]]

    assert not any(x.is_contiguous() for x in views(bases))
    got = loss_and_grads(lambda *xs: loss.ours(on_backend, chunk_size=4, **options)(*views(xs)), *bases)
    want = loss_and_grads(lambda *xs: loss.reference(**options)(*views(xs)), *bases)
    assert_all_close(loss, got, want, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@variants("single_pair")
def test_single_pair_gives_zero_loss_and_zero_gradients(backend, device, on_backend, loss, options, dtype):
    inputs = [x.to(device) for x in loss.make_inputs(1, 4, dtype)]
    for normalize in (False, True):
        value, grads = loss_and_grads(loss.ours(on_backend, normalize=normalize, **options), *inputs)
        assert value.dtype == dtype and float(value) == 0.0
        assert all(g.dtype == dtype and not bool(g.any()) for g in grads)


@variants("deterministic")
def test_bitwise_deterministic(backend, device, on_backend, loss, options):
    inputs = [x.to(device) for x in loss.make_inputs(300, 32, torch.float32, seed=9)]
    fn = loss.ours(on_backend, labels=make_labels("random", 300).to(device), chunk_size=64, **options)
    assert_bitwise_equal(loss_and_grads(fn, *inputs), loss_and_grads(fn, *inputs))


@variants("simt_workers")
def test_simt_bitwise_deterministic_across_worker_counts(monkeypatch, loss, options):
    # The executor runs blocks on VSE_SIMT_THREADS OS threads: 1 and 3 workers interleave the
    # blocks differently, and the results must not notice (no float atomics, fixed orders).
    inputs = loss.simt_inputs() if loss.simt_inputs else loss.make_inputs(150, 16, torch.float32, seed=10)
    labels = make_labels("random", 150)
    runs = []
    for workers in ("1", "3", "1"):
        monkeypatch.setenv("VSE_SIMT_THREADS", workers)
        fn = loss.ours(lambda: vse_cuda.use_backend("simt"), labels=labels, chunk_size=40, **options)
        runs.append(loss_and_grads(fn, *inputs))
    for other in runs[1:]:
        assert_bitwise_equal(runs[0], other)


@variants("compile")
def test_torch_compile_fullgraph_forward_and_backward(loss, options):
    module = loss.module(**options)
    compiled = torch.compile(module, fullgraph=True)
    inputs = random_inputs(12, 5, torch.float32, seed=6, count=len(loss.inputs))
    labels = make_labels("pairs", 12)
    eager = loss_and_grads(lambda *xs: module(*xs, labels), *inputs)
    graph = loss_and_grads(lambda *xs: compiled(*xs, labels), *inputs)
    torch.testing.assert_close(graph, eager)
