"""The training harness end to end on tiny configs: every loss learns, resume equals an
uninterrupted run bitwise, bad input fails before any training step and never replaces a good
checkpoint, and the evaluate CLI reproduces the run's table."""

from __future__ import annotations

import csv
import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
import torch

import vse_cuda
from vse_cuda import _checkpoint, evaluate, train
from vse_cuda.data import DataError

#: 300/100/100 synthetic images: chance rsum on the 100 test images is evaluate.chance_rsum(100) ≈ 32.
TEST_IMAGES = 100
TINY = ["--synthetic-train", "300", "--synthetic-dev", "100", "--synthetic-test", str(TEST_IMAGES),
        "--embed-dim", "64", "--batch-size", "50", "--lr", "2e-3", "--threads", "1", "--no-progress"]
LOSS_OPTIONS = {
    "vse++ (warm-up)": ["--loss", "triplet", "--mining", "hardest", "--warmup-epochs", "1"],
    "vse0": ["--loss", "triplet", "--mining", "all", "--warmup-epochs", "0"],
    "triplet top-3": ["--loss", "triplet", "--mining", "topk", "--topk", "3", "--warmup-epochs", "0"],
    "unified": ["--loss", "unified", "--warmup-epochs", "0"],
    "infonce (learned scale)": ["--loss", "infonce", "--warmup-epochs", "0"],
    "siglip (learned scale and bias)": ["--loss", "siglip", "--warmup-epochs", "0"],
    "goal": ["--loss", "goal", "--triplet-weight", "nca", "--pair-weight", "lin", "--warmup-epochs", "0"],
}
#: Deterministic columns of the log (the others are timings).
EXACT_FIELDS = ("round", "epoch", "loss", "lr", "train_loss", "steps") + tuple(f"dev_{m}" for m in evaluate.METRICS)


def train_run(run_dir: Path, *extra: str, epochs: int = 4) -> tuple[dict, str]:
    out = io.StringIO()
    table = train.run([*TINY, "--run-dir", str(run_dir), "--epochs", str(epochs), *extra], out=out)
    return table, out.getvalue()


def untrained_rsum(*extra: str) -> float:
    """Test rsum of the model a run starts from (same seed, same init)."""
    config, _, _ = train.parse_args([*TINY, *extra])
    trainer = train.Trainer(config, Path("unused"), progress=False)
    trainer.start(resume=False, overwrite=True)
    return evaluate.recall_at_k(*evaluate.embed_split(trainer.model, trainer.dataset.test))["rsum"]


@pytest.mark.parametrize("name", list(LOSS_OPTIONS))
def test_each_loss_learns(tmp_path, name):
    table, out = train_run(tmp_path, *LOSS_OPTIONS[name])
    rsum = table[f"{TEST_IMAGES} images"]["rsum"]
    chance = evaluate.chance_rsum(TEST_IMAGES)
    assert rsum > 4 * chance, out
    assert rsum > untrained_rsum(*LOSS_OPTIONS[name]) + 50, out
    rows = list(csv.DictReader((tmp_path / train.LOG).open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert (tmp_path / train.PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| protocol |" in (tmp_path / train.RESULTS).read_text()
    for name in (train.CHECKPOINT, train.BEST, train.LOG, train.PLOT, train.RESULTS):
        assert str(tmp_path / name) in out


def test_infonce_learns_its_temperature(tmp_path):
    # CLIP's recipe: γ = exp(logit_scale), a model parameter from log(1/0.07), kept in [1, 100].
    table, out = train_run(tmp_path, "--loss", "infonce", "--warmup-epochs", "1", epochs=3)
    learned = float(_checkpoint.load_checkpoint(tmp_path / train.CHECKPOINT)["model"]["logit_scale"])
    start = float(torch.tensor(1 / 0.07).log())
    assert 0.0 <= learned <= np.log(100) and abs(learned - start) > 1e-3, learned
    assert out.count("learned scale") == 3
    # A model built from the run's config holds the parameter, so the checkpoint evaluates.
    assert evaluate.main([str(tmp_path / train.BEST)]) == table


def test_infonce_with_label_positives_trains(tmp_path, monkeypatch):
    # The image's other captions in a batch are positives: the loss gets labels and the flag.
    calls = []
    original = vse_cuda.unified_loss

    def spy(*args, **kwargs):
        calls.append((kwargs.get("labels") is not None, kwargs.get("label_positives")))
        return original(*args, **kwargs)

    monkeypatch.setattr("vse_cuda.ops.unified.unified_loss", spy)
    train_run(tmp_path, "--loss", "infonce", "--label-positives", "--warmup-epochs", "0", epochs=1)
    assert calls and set(calls) == {(True, True)}


def test_label_positives_only_for_the_unified_losses(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        train.main(["--run-dir", str(tmp_path / "run"), "--loss", "triplet", "--label-positives"])
    assert exit.value.code == 2
    assert "--label-positives applies to --loss unified and infonce, not triplet" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_siglip_learns_its_temperature_and_bias(tmp_path):
    _, out = train_run(tmp_path, "--loss", "siglip", "--warmup-epochs", "0", "--mask-same-image", epochs=2)
    model = _checkpoint.load_checkpoint(tmp_path / train.CHECKPOINT)["model"]
    assert abs(float(model["logit_scale"]) - float(torch.tensor(10.0).log())) > 1e-3
    assert float(model["logit_bias"]) != -10.0
    assert out.count("learned scale") == 2 and out.count("learned bias") == 2


def test_warmup_epochs_use_vse0(tmp_path):
    train_run(tmp_path, "--warmup-epochs", "2", epochs=3)
    rows = list(csv.DictReader((tmp_path / train.LOG).open()))
    assert [r["loss"] for r in rows] == ["triplet-all (warm-up)"] * 2 + ["triplet-hardest"]


def test_lr_schedule_is_step_decay(tmp_path):
    train_run(tmp_path, "--lr-update", "2", "--lr-decay", "0.5", epochs=5)
    rows = list(csv.DictReader((tmp_path / train.LOG).open()))
    assert [float(r["lr"]) for r in rows] == pytest.approx([2e-3, 2e-3, 1e-3, 1e-3, 5e-4])


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    whole, part = tmp_path / "whole", tmp_path / "part"
    table_whole, _ = train_run(whole, epochs=3)

    # Interrupt the second run right after its second epoch's checkpoint.
    real_epoch = train.Trainer._epoch

    def crash_after_two(self, state):
        real_epoch(self, state)
        if state.epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train.Trainer, "_epoch", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        train_run(part, epochs=3)
    monkeypatch.setattr(train.Trainer, "_epoch", real_epoch)
    # Resuming needs no options but the run dir: the others come from the checkpoint.
    out = io.StringIO()
    table_part = train.run(["--run-dir", str(part), "--resume", "--epochs", "3", "--no-progress"], out=out)
    assert "epoch 3/3" in out.getvalue() and "epoch 2/3" not in out.getvalue()

    a = _checkpoint.load_checkpoint(whole / train.CHECKPOINT)
    b = _checkpoint.load_checkpoint(part / train.CHECKPOINT)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for key, value in a["optimizer"]["state"].items():
        for field, tensor in value.items():
            assert torch.equal(tensor, b["optimizer"]["state"][key][field]), (key, field)
    assert a["scheduler"] == b["scheduler"] and torch.equal(a["rng"], b["rng"])
    assert [{f: r[f] for f in EXACT_FIELDS} for r in a["history"]] == \
        [{f: r[f] for f in EXACT_FIELDS} for r in b["history"]]
    assert table_whole == table_part


def test_evaluate_cli_reproduces_the_run_table(tmp_path, capsys):
    table, _ = train_run(tmp_path, epochs=2)
    out_md = tmp_path / "eval.md"
    assert evaluate.main([str(tmp_path / train.BEST), "--out", str(out_md)]) == table
    assert "chance rsum" in out_md.read_text() and "| protocol |" in capsys.readouterr().out


def test_raw_captions_with_a_gru(tmp_path):
    # Images are sums of two of 12 concept vectors; captions name the two concepts in words,
    # in random order among filler words. Only a text encoder that reads words can match them.
    rng = np.random.default_rng(0)
    concepts = rng.standard_normal((12, 16)).astype(np.float32)
    names = [f"thing{i}" for i in range(12)]
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for split, n in (("train", 240), ("dev", 40), ("test", 40)):
        pairs = np.array([rng.choice(12, 2, replace=False) for _ in range(n)])
        ims = concepts[pairs].sum(1) + 0.1 * rng.standard_normal((n, 16)).astype(np.float32)
        caps = []
        for a, b in pairs:
            for _ in range(5):
                first, second = (a, b) if rng.random() < 0.5 else (b, a)
                caps.append(f"a {names[first]} and the {names[second]} {'here' if rng.random() < 0.5 else 'there'}")
        np.save(data_dir / f"{split}_ims.npy", ims.astype(np.float32))
        (data_dir / f"{split}_caps.txt").write_text("\n".join(caps) + "\n")
    table, out = train_run(tmp_path / "run", "--data", str(data_dir), "--word-dim", "32", "--warmup-epochs", "0",
                           epochs=4)
    assert table["40 images"]["rsum"] > 3 * evaluate.chance_rsum(40), out
    ckpt = _checkpoint.load_checkpoint(tmp_path / "run" / train.BEST)
    assert ckpt["vocab"][:2] == ["<pad>", "<unk>"] and "thing7" in ckpt["vocab"]


# ------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("argv, message", [
    (["--loss", "contrastive"], "invalid choice: 'contrastive'"),
    (["--no-such-option"], "unrecognized arguments"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--loss", "unified", "--scale", "-1"], "scale must be > 0"),
    (["--splits", "train,test"], "three splits"),
])
def test_bad_options_exit_before_training(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        train.main([*TINY, "--run-dir", str(tmp_path), *argv])
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_bad_data_fails_before_any_step(tmp_path):
    (tmp_path / "data").mkdir()
    np.save(tmp_path / "data" / "train_ims.npy", np.zeros((3, 4), np.float32))
    np.save(tmp_path / "data" / "train_caps.npy", np.zeros((14, 4), np.float32))
    with pytest.raises(DataError, match="needs 3 x 5 = 15 captions, but it has 14"):
        train.run([*TINY, "--run-dir", str(tmp_path / "run"), "--data", str(tmp_path / "data")])
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit, match="needs 3 x 5 = 15 captions"):
        train.main([*TINY, "--run-dir", str(tmp_path / "run"), "--data", str(tmp_path / "data")])


def test_aoq_pool_beyond_the_mined_lists_fails_before_training(tmp_path):
    with pytest.raises(train.ConfigError, match="--aoq-pool 300 needs 300 mined captions per image and 60 images "
                                                "per caption, but this run mines 100 and 20"):
        train.run([*TINY, "--run-dir", str(tmp_path), "--loss", "quintuplet", "--aoq-k-i2t", "100",
                   "--aoq-k-t2i", "20"])
    assert not any(tmp_path.iterdir())


def test_aoq_without_the_mining_module_fails_before_training(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vse_cuda.mining" else real_find_spec(name, *a))
    with pytest.raises(train.ConfigError, match="needs vse_cuda.mining"):
        train.run([*TINY, "--run-dir", str(tmp_path), "--loss", "quintuplet", "--aoq-pool", "30"])
    assert not any(tmp_path.iterdir())


def test_checkpoints_are_protected(tmp_path, monkeypatch):
    train_run(tmp_path, epochs=1)
    path = tmp_path / train.CHECKPOINT
    good = path.read_bytes()

    with pytest.raises(_checkpoint.CheckpointError, match="pass --resume .* or --overwrite"):
        train_run(tmp_path, epochs=2)
    with pytest.raises(_checkpoint.CheckpointError, match=r"another configuration.*margin: checkpoint 0.2, now 0.3"):
        train_run(tmp_path, "--resume", "--margin", "0.3", epochs=2)

    # A loss that turns NaN stops training before the next checkpoint.
    monkeypatch.setattr(train.losses.TripletLoss, "forward", lambda self, img, txt, labels=None:
                        (img * txt).sum() * float("nan"))
    with pytest.raises(train.TrainingError, match="loss is nan .* still holds the last good epoch"):
        train_run(tmp_path, "--resume", epochs=2)
    assert path.read_bytes() == good

    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(_checkpoint.CheckpointError, match="truncated or corrupt"):
        train_run(tmp_path, "--resume", epochs=2)
    with pytest.raises(SystemExit, match="truncated or corrupt"):
        evaluate.main([str(path)])
    (tmp_path / "foreign.pt").write_bytes(b"")
    with pytest.raises(_checkpoint.CheckpointError):
        _checkpoint.load_checkpoint(tmp_path / "foreign.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(_checkpoint.CheckpointError, match="not a vse_cuda.train checkpoint"):
        _checkpoint.load_checkpoint(tmp_path / "foreign.pt")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def failing(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _checkpoint.atomic_write(path, failing)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


# ---------------------------------------------------------------------------------- AOQ

def test_aoq_two_rounds(tmp_path):
    pytest.importorskip("vse_cuda.mining")
    table, out = train_run(tmp_path, "--loss", "quintuplet", "--aoq-pool", "30", "--aoq-k-i2t", "100",
                           "--aoq-k-t2i", "20", epochs=3)
    rows = list(csv.DictReader((tmp_path / train.LOG).open()))
    assert [(int(r["round"]), r["loss"]) for r in rows] == \
        [(1, "triplet-all (warm-up)"), (1, "triplet-hardest (AOQ round 1)"), (1, "triplet-hardest (AOQ round 1)"),
         (2, "quintuplet"), (2, "quintuplet"), (2, "quintuplet")]
    assert "AOQ: mined 100 captions per image and 20 images per caption" in out
    assert table[f"{TEST_IMAGES} images"]["rsum"] > 4 * evaluate.chance_rsum(TEST_IMAGES), out
    ckpt = _checkpoint.load_checkpoint(tmp_path / train.CANDIDATES, required=("i2t", "t2i"))
    assert ckpt["i2t"].shape == (300, 100) and ckpt["t2i"].shape == (1500, 20)
