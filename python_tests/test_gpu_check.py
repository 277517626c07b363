"""benchmarks/bench_gpu.py on the CPU (what gpu_check.sh --dry-run runs): every row is measured
or says why not, carries the cost model's prediction, and the fused losses agree with the oracle."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_gpu  # noqa: E402


def test_cpu_sweep_writes_measured_rows_with_the_model_beside(tmp_path):
    rc = bench_gpu.main(["--device", "cpu", "--sizes", "64", "--dims", "8", "--dtypes", "float32", "--repeats", "1",
                         "--warmup", "0", "--budget-s", "600", "--out-dir", str(tmp_path)])
    assert rc == 0
    rows = list(csv.DictReader((tmp_path / "bench_gpu_cpu.csv").open()))
    measured = {(r["loss"], r["method"]) for r in rows if r["status"] == "ok"}
    for loss in bench_gpu.LOSSES:
        assert (loss, "fused") in measured and (loss, "oracle") in measured
    assert ("gemm", "gemm") in measured and ("unified", "clip_pattern") in measured
    # The CLIP family as trained: learnable temperature (and bias), open_clip's patterns beside.
    assert ("unified_learned_scale", "clip_pattern") in measured and ("siglip", "siglip_pattern") in measured
    assert all(float(r["model_ms"]) > 0 for r in rows)
    assert all(r["detail"] for r in rows if r["status"] == "skipped")
    assert "model ms" in (tmp_path / "bench_gpu_cpu.md").read_text()


def test_budget_skips_are_rows_that_say_why(tmp_path):
    bench_gpu.main(["--device", "cpu", "--sizes", "64", "--dims", "8", "--dtypes", "float32", "--repeats", "1",
                    "--warmup", "0", "--budget-s", "1e-9", "--out-dir", str(tmp_path)])
    rows = list(csv.DictReader((tmp_path / "bench_gpu_cpu.csv").open()))
    assert rows and all(r["status"] == "skipped" and "budget" in r["detail"] for r in rows)


def test_device_check_flags_a_wrong_loss(monkeypatch):
    assert bench_gpu.check_on_device(torch.device("cpu")) == {}
    monkeypatch.setattr(bench_gpu.vse_cuda, "unified_loss", lambda *xs, **kw: torch.tensor(0.0))
    assert "differs from the oracle" in bench_gpu.check_on_device(torch.device("cpu"))["unified"]


def test_device_check_flags_a_wrong_learnable_gradient(monkeypatch):
    """The learnable rows are checked on ∂L/∂scale and ∂L/∂bias too, not only on the value."""
    right = bench_gpu.vse_cuda.siglip_loss

    def detached_bias(img, txt, scale, bias, **kw):
        return right(img, txt, scale, bias.detach(), **kw)

    monkeypatch.setattr(bench_gpu.vse_cuda, "siglip_loss", detached_bias)
    problems = bench_gpu.check_on_device(torch.device("cpu"))
    assert list(problems) == ["siglip"] and "dbias differs from the oracle" in problems["siglip"]


def test_learnable_scalars_reach_every_method():
    """A learnable row's keywords are fresh 0-dim float32 tensors that require grad, and every
    method of the row runs with them in bfloat16."""
    kwargs, params = bench_gpu.loss_keywords("siglip", torch.device("cpu"))
    assert [p.requires_grad and p.dim() == 0 and p.dtype == torch.float32 for p in params] == [True, True]
    assert kwargs["scale"] is params[0] and kwargs["bias"] is params[1]
    assert bench_gpu.loss_keywords("unified", torch.device("cpu")) == ({"scale": 20.0, "margin": 0.0}, [])
    for method in bench_gpu.methods_for("siglip"):
        run = bench_gpu.call_for("siglip", method, 16, 4, torch.bfloat16, torch.device("cpu"))
        run()
    # The eager SigLIP pattern is open_clip's loss: the oracle's value in float64.
    img, txt = bench_gpu.make_inputs(16, 4, 2, torch.float64, torch.device("cpu"), grad=False)
    scale, bias = torch.tensor(7.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    torch.testing.assert_close(bench_gpu.siglip_pattern(img, txt, scale, bias).double(),
                               bench_gpu.reference.siglip_loss(img, txt, scale, bias), rtol=1e-12, atol=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_gpu.main(["--device", "cuda", "--out-dir", str(tmp_path)])
    assert "torch sees no CUDA GPU" in capsys.readouterr().err
