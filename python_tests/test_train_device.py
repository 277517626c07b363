"""``--device`` of the training harness and evaluate CLI: cpu trains and checkpoints exactly as
the default does here; cuda without a GPU stops with one line before anything is written; on a
GPU (the `cuda` marker) a tiny run trains there and its checkpoint loads on the CPU."""

from __future__ import annotations

import io

import pytest
import torch

from vse_cuda import _checkpoint, evaluate, train

TINY = ["--synthetic-train", "200", "--synthetic-dev", "100", "--synthetic-test", "100", "--embed-dim", "32",
        "--batch-size", "50", "--lr", "2e-3", "--threads", "1", "--no-progress", "--epochs", "1"]


def _run(run_dir, *extra):
    out = io.StringIO()
    table = train.run([*TINY, "--run-dir", str(run_dir), *extra], out=out)
    return table, out.getvalue()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the default is cuda where a GPU exists")
def test_device_cpu_equals_the_default_here(tmp_path):
    table_default, _ = _run(tmp_path / "default")
    table_cpu, out = _run(tmp_path / "cpu", "--device", "cpu")
    assert "device: cpu" in out and table_cpu == table_default
    a = _checkpoint.load_checkpoint(tmp_path / "default" / train.CHECKPOINT)
    b = _checkpoint.load_checkpoint(tmp_path / "cpu" / train.CHECKPOINT)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu_fails_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY, "--run-dir", str(tmp_path / "run"), "--device", "cuda"])
    message = str(exit_info.value.code)
    assert message == ("python -m vse_cuda.train: error: --device cuda, but torch sees no CUDA GPU "
                       "(torch.cuda.is_available() is False); use --device cpu")
    assert not (tmp_path / "run").exists()
    with pytest.raises(train.ConfigError, match="--device must be one of cpu, cuda"):
        train.resolve_device("tpu")


def test_evaluate_takes_a_device(tmp_path):
    table, _ = _run(tmp_path, "--device", "cpu")
    assert evaluate.main([str(tmp_path / train.BEST), "--device", "cpu"]) == table


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_trains_on_cuda_and_the_checkpoint_loads_on_cpu(tmp_path):
    _, out = _run(tmp_path, "--device", "cuda")
    assert "device: cuda" in out
    ckpt = _checkpoint.load_checkpoint(tmp_path / train.CHECKPOINT)
    assert all(t.device.type == "cpu" for t in ckpt["model"].values())
    assert evaluate.main([str(tmp_path / train.BEST), "--device", "cpu"])
