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


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_gpu.main(["--device", "cuda", "--out-dir", str(tmp_path)])
    assert "torch sees no CUDA GPU" in capsys.readouterr().err
