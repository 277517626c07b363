"""``torchrun --nproc_per_node=2 -m vse_cuda.train`` against one process on the same config
(train.py's module docstring): both ranks hold bitwise identical parameters after every step,
the ranks' summed losses and their parameters follow the single process step by step, and an
AOQ run stopped in round two resumes under torchrun and ends where one process resuming from
the same checkpoint ends.

Tolerance (float32): each weight gradient is summed over a rank's 25 or 24 rows, then over
the ranks, instead of over 49 rows at once, so every step's gradient differs from the single
process's by float32 rounding (bf16 autocast would round each rank's sum to bf16: ~4e-3, hence
--precision fp32). Adam divides each element's step by its own gradient scale, so the
difference shows in absolute terms, bounded by a fraction of the step size: measured at most
~5e-7 on weights of size ~0.1 after 96 steps of lr 2e-3. atol 1e-5 (lr / 200) with rtol 1e-4
still fails on any real difference: one wrong step (a missing gradient all-reduce, another
shard or offline draw) moves elements by about lr.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vse_cuda import _checkpoint, train

import _train_rank as rank_hooks

IMAGES = 304
#: 5 · 304 = 1520 captions = 31 · 49 + 1: every batch of 49 splits 25 / 24 over two ranks, and the
#: last batch (1 pair) is rank 0's alone. AOQ: two rounds of two epochs (VSE0 warm-up, VSE++;
#: mining; AOQ, AOQ).
CONFIG = ["--synthetic-train", str(IMAGES), "--synthetic-dev", "100", "--synthetic-test", "100", "--embed-dim", "64",
          "--batch-size", "49", "--lr", "2e-3", "--threads", "1", "--no-progress", "--precision", "fp32",
          "--loss", "quintuplet", "--aoq-pool", "30", "--aoq-k-i2t", "100", "--aoq-k-t2i", "20", "--epochs", "2"]
STEPS = -(-5 * IMAGES // 49)
TOL = dict(rtol=1e-4, atol=1e-5)


def torchrun(*args: str) -> str:
    """Run ``args`` on 2 gloo ranks; returns their stdout (rank 0 alone prints)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> tuple[Path, list, list, str]:
    """Two ranks through round one and AOQ round two's first epoch, every step recorded: the
    run dir, rank 0's and rank 1's (loss, parameters) per step, and the output."""
    root = tmp_path_factory.mktemp("torchrun")
    out = torchrun(rank_hooks.__file__, str(root), "2", "1", "--", *CONFIG, "--run-dir", str(root / "run"))
    return root / "run", torch.load(root / "rank0.pt"), torch.load(root / "rank1.pt"), out


def test_ranks_hold_identical_parameters_after_every_step(stopped_run):
    _, rank0, rank1, out = stopped_run
    assert len(rank0) == len(rank1) == 3 * STEPS
    for step, ((loss0, params0), (loss1, params1)) in enumerate(zip(rank0, rank1), start=1):
        assert loss0 == loss1 and torch.equal(params0, params1), f"the ranks differ after step {step}"
    assert out.count("data: ") == 1 and "2 ranks share each global batch of 49 pairs" in out
    assert "round 2 epoch 1/2 [quintuplet]" in out and "AOQ: mined 100 captions per image" in out


def test_torchrun_takes_the_single_process_steps(stopped_run, tmp_path, monkeypatch):
    # Round one only: the mined lists may differ between the two runs where two candidates'
    # similarities tie to float32 rounding, so round two is compared from one checkpoint below.
    _, rank0, _, _ = stopped_run
    single: list = []
    monkeypatch.setattr(train.Trainer, "_step", rank_hooks.recording_step(single))
    monkeypatch.setattr(train.Trainer, "_epoch", rank_hooks.stopping_epoch(1, 2))
    with pytest.raises(rank_hooks.Stop):
        train.run([*CONFIG, "--run-dir", str(tmp_path)], out=io.StringIO())
    assert len(single) == 2 * STEPS
    for step, ((loss, params), (loss_ranks, params_ranks)) in enumerate(zip(single, rank0), start=1):
        assert loss_ranks == pytest.approx(loss, rel=1e-5), f"loss of step {step}"
        torch.testing.assert_close(params_ranks, params, **TOL, msg=lambda m: f"step {step}: {m}")


def test_resume_under_torchrun_ends_where_one_process_ends(stopped_run, tmp_path):
    run_dir = stopped_run[0]
    ranks_dir, single_dir = tmp_path / "ranks", tmp_path / "single"
    shutil.copytree(run_dir, ranks_dir)
    shutil.copytree(run_dir, single_dir)
    train.run(["--run-dir", str(single_dir), "--resume", "--no-progress"], out=io.StringIO())
    out = torchrun("-m", "vse_cuda.train", "--run-dir", str(ranks_dir), "--resume", "--no-progress")
    assert "round 2 epoch 2/2 [quintuplet]" in out and "epoch 1/2" not in out

    want = _checkpoint.load_checkpoint(single_dir / train.CHECKPOINT)
    got = _checkpoint.load_checkpoint(ranks_dir / train.CHECKPOINT)
    assert (got["round"], got["epoch"]) == (want["round"], want["epoch"]) == (2, 2)
    for name, value in want["model"].items():
        torch.testing.assert_close(got["model"][name], value, **TOL, msg=lambda m: f"{name}: {m}")
    assert got["history"][:-1] == want["history"][:-1]  # both read them from one checkpoint
    assert got["history"][-1]["train_loss"] == pytest.approx(want["history"][-1]["train_loss"], rel=1e-5)
    assert got["history"][-1]["dev_rsum"] == pytest.approx(want["history"][-1]["dev_rsum"], abs=1.0)
    assert (ranks_dir / train.RESULTS).is_file()
