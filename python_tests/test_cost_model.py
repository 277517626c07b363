"""The cost model (vse_cuda.cost_model): FLOPs follow the loss's structure, bytes follow the
engine's tile plan (plan_chunks), times are a roofline per pass, and bad arguments are refused."""

from __future__ import annotations

import pytest
import torch

from vse_cuda import _chunking, cost_model

N, D = 4096, 256


def test_flops_count_gemms_per_loss():
    gemm = 2.0 * N * N * D
    sparse = cost_model.loss_cost("triplet_hardest", N, D)
    dense = cost_model.loss_cost("unified", N, D)
    # sparse: the forward GEMM plus a gather/scatter of (k + 2)·N rows; dense: 1 + recompute + 2
    assert sparse.gemm_equivalents == pytest.approx(1.0, abs=0.01)
    assert dense.flops == pytest.approx(4 * gemm)
    assert cost_model.loss_cost("unified", N, D, backward=False).flops == pytest.approx(gemm)
    assert cost_model.loss_cost("eager_infonce", N, D).flops == pytest.approx(3 * gemm)
    assert cost_model.loss_cost("topk_similar", N, D, k=10).backward == ()


def test_bytes_follow_the_tile_plan(monkeypatch):
    base = cost_model.loss_cost("triplet_hardest", N, D, row_chunk=1024)
    assert (base.rows, base.cols) == (1024, N)
    # Narrower tiles re-read the inputs more often: the model must call plan_chunks, not copy it.
    monkeypatch.setattr(_chunking, "DEFAULT_MEMORY_BUDGET", 1024 * 512 * 4)
    monkeypatch.setattr(cost_model, "plan_chunks",
                        lambda n, m, dtype, row_chunk=None: _chunking.plan_chunks(n, m, dtype, row_chunk,
                                                                                  budget=1024 * 512 * 4))
    narrow = cost_model.loss_cost("triplet_hardest", N, D, row_chunk=1024)
    assert (narrow.rows, narrow.cols) == (1024, 512)
    extra_b_reads = (N // 512 - 1) * N * D * 4
    assert narrow.bytes - base.bytes == pytest.approx(extra_b_reads)


def test_fused_moves_fewer_bytes_than_eager_at_large_n():
    fused = cost_model.loss_cost("unified", 65536, 768, torch.bfloat16)
    eager = cost_model.loss_cost("eager_infonce", 65536, 768, torch.bfloat16)
    assert fused.bytes < eager.bytes
    assert fused.seconds("h200") < eager.seconds("h200")


def test_roofline_per_pass():
    dev = cost_model.Device("toy", {"float32": 1e9}, 1e9)
    p = cost_model.Pass("p", flops=2e9, bytes=1e9)
    assert p.seconds(dev, torch.float32) == pytest.approx(2.0)
    assert cost_model.Pass("q", flops=0.0, bytes=3e9).seconds(dev, torch.float32) == pytest.approx(3.0)
    c = cost_model.gemm_cost(N, N, D, torch.float32)
    assert c.seconds(dev) == pytest.approx(max(c.flops / 1e9, c.bytes / 1e9))
    # bf16 on the H200 runs at the bf16 rate: ~15x the fp32 time for a compute-bound GEMM
    big32, big16 = (cost_model.gemm_cost(8192, 8192, 8192, t) for t in (torch.float32, torch.bfloat16))
    assert big32.seconds("h200") / big16.seconds("h200") == pytest.approx(990 / 67, rel=0.01)


def test_measured_cpu_device_has_positive_rates():
    dev = cost_model.measure_cpu_device(gemm_size=128, copy_mib=4, repeats=1)
    assert dev.name == "cpu-here" and dev.bandwidth > 0 and dev.flops["float32"] > 0


@pytest.mark.parametrize("call, error, match", [
    (lambda: cost_model.loss_cost("contrastive", N, D), ValueError, "loss must be one of"),
    (lambda: cost_model.loss_cost("unified", 0, D), ValueError, "n must be an int >= 1"),
    (lambda: cost_model.loss_cost("unified", N, 2.5), ValueError, "dim must be an int >= 1"),
    (lambda: cost_model.loss_cost("triplet_topk", N, D, k=0), ValueError, "k must be an int >= 1"),
    (lambda: cost_model.loss_cost("unified", N, D, torch.int64), TypeError, "dtype must be a floating"),
    (lambda: cost_model.get_device("tpu"), ValueError, "device must be one of"),
    (lambda: cost_model.get_device(3), TypeError, "device must be a Device"),
    (lambda: cost_model.Device("x", {"float32": 1.0}, 1.0).gemm_rate(torch.bfloat16), ValueError, "no GEMM rate"),
])
def test_bad_arguments_are_refused(call, error, match):
    with pytest.raises(error, match=match):
        call()
