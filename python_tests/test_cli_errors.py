"""One-line errors of the command lines (issue 11): every path or file argument of
``vse_cuda.train``, ``vse_cuda.evaluate`` and ``vse_cuda.mining`` that cannot work stops the
command with one line naming the file or option and a nonzero status, before any work, and
nothing already on disk is written over or lost."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from vse_cuda import evaluate, mining, train

TINY = ["--synthetic-train", "60", "--synthetic-dev", "20", "--synthetic-test", "20", "--embed-dim", "8",
        "--batch-size", "20", "--epochs", "1", "--threads", "1", "--no-progress"]
#: Declares 1.5e9 x 2000 float32 (10.9 TiB) but holds 64 bytes: a truncated or forged file.
HUGE_SHAPE = (1_500_000_000, 2000)


def write_huge_header(path: Path) -> None:
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": HUGE_SHAPE})
        f.write(b"\0" * 64)


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def train_exit(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY, *argv])
    assert exit_info.value.code not in (0, None)
    message = exit_info.value.code if isinstance(exit_info.value.code, str) else capsys.readouterr().err
    if message.startswith("usage:"):  # argparse's option errors: the usage, then one error line
        message = message.strip().splitlines()[-1]
    return one_line(message)


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


# ---------------------------------------------------------------------------------- train

def test_train_run_dir_below_a_regular_file(tmp_path, capsys):
    (tmp_path / "file").write_text("keep me\n")
    before = snapshot(tmp_path)
    line = train_exit(["--run-dir", str(tmp_path / "file" / "run")], capsys)
    assert "--run-dir" in line and f"{tmp_path / 'file'} is a file" in line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("flag", ["--overwrite", "--resume", None])
def test_train_checkpoint_path_is_a_directory(tmp_path, capsys, flag):
    taken = tmp_path / "run" / "checkpoint.pt"
    taken.mkdir(parents=True)
    (taken / "precious.txt").write_text("do not delete\n")
    before = snapshot(tmp_path)
    line = train_exit(["--run-dir", str(tmp_path / "run"), *([flag] if flag else [])], capsys)
    assert str(taken) in line and "is a directory" in line
    assert snapshot(tmp_path) == before


def test_train_read_only_run_dir(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(0o555)
    try:
        if os.access(run_dir, os.W_OK):  # root ignores the mode bits
            pytest.skip("a read-only directory cannot be set up for this user (root?)")
        line = train_exit(["--run-dir", str(run_dir)], capsys)
        assert f"--run-dir {run_dir}" in line and "is not writable" in line
        assert list(run_dir.iterdir()) == []
    finally:
        run_dir.chmod(0o755)


#: A directory in which nobody, root included, can create a file, but whose mode bits root passes
#: (os.access calls it writable for root, as it does a 0o555 directory).
UNWRITABLE = Path("/proc")
needs_unwritable = pytest.mark.skipif(not (UNWRITABLE / "self").is_dir(), reason="no /proc file system")


@needs_unwritable
def test_train_run_dir_where_no_file_can_be_created(capsys):
    run_dir = UNWRITABLE / "vse_cuda_run"
    line = train_exit(["--run-dir", str(run_dir)], capsys)
    assert f"--run-dir {run_dir}" in line and f"{UNWRITABLE} is not writable" in line


def _vse_dir(root: Path, caps: bytes | None = None) -> Path:
    root.mkdir()
    for split in ("train", "dev", "test"):
        np.save(root / f"{split}_ims.npy", np.zeros((2, 3), np.float32))
        (root / f"{split}_caps.txt").write_bytes(caps if caps is not None else b"a dog\n" * 10)
    return root


def test_train_non_utf8_captions(tmp_path, capsys):
    data = _vse_dir(tmp_path / "data", caps=b"a dog\n" * 6 + b"caf\xe9 au lait\n" + b"a cat\n" * 3)
    line = train_exit(["--run-dir", str(tmp_path / "run"), "--data", str(data)], capsys)
    assert f"{data / 'train_caps.txt'} is not UTF-8" in line and "line 7" in line
    assert not (tmp_path / "run").exists()


def test_train_truncated_npy_with_a_huge_header(tmp_path, capsys):
    data = _vse_dir(tmp_path / "data")
    write_huge_header(data / "train_ims.npy")
    line = train_exit(["--run-dir", str(tmp_path / "run"), "--data", str(data)], capsys)
    assert str(data / "train_ims.npy") in line
    assert not (tmp_path / "run").exists()


def test_train_features_beyond_float32(tmp_path, capsys):
    data = _vse_dir(tmp_path / "data")
    np.save(data / "train_ims.npy", np.array([[1.0, 2.0, 3.0], [1e300, 0.0, 0.0]]))
    line = train_exit(["--run-dir", str(tmp_path / "run"), "--data", str(data)], capsys)
    assert f"{data / 'train_ims.npy'}: row 1 holds features beyond float32's range" in line


@pytest.mark.parametrize("option", ["--lr", "--lr-decay", "--grad-clip"])
def test_train_infinite_optimizer_options(tmp_path, capsys, option):
    line = train_exit(["--run-dir", str(tmp_path / "run"), option, "inf"], capsys)
    assert f"{option} must be finite" in line
    assert not (tmp_path / "run").exists()


def test_train_data_is_a_file(tmp_path, capsys):
    (tmp_path / "data").write_text("not a directory")
    line = train_exit(["--run-dir", str(tmp_path / "run"), "--data", str(tmp_path / "data")], capsys)
    assert f"data directory {tmp_path / 'data'} is a file" in line


# ------------------------------------------------------------------------------- evaluate

def test_evaluate_out_is_a_directory_checked_before_loading(tmp_path):
    (tmp_path / "table").mkdir()
    with pytest.raises(SystemExit) as exit_info:  # the checkpoint does not even exist: --out is checked first
        evaluate.main([str(tmp_path / "model.pt"), "--out", str(tmp_path / "table")])
    line = one_line(str(exit_info.value.code))
    assert f"--out {tmp_path / 'table'} is a directory" in line


def test_evaluate_out_below_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([str(tmp_path / "model.pt"), "--out", str(tmp_path / "file" / "table.md")])
    assert "--out" in one_line(str(exit_info.value.code))


# --------------------------------------------------------------------------------- mining

def _embeddings(root: Path, scale: float = 1.0) -> Path:
    root.mkdir()
    rng = np.random.default_rng(0)
    np.save(root / "images.npy", (scale * rng.standard_normal((4, 3))).astype(np.float32))
    np.save(root / "captions.npy", (scale * rng.standard_normal((8, 3))).astype(np.float32))
    return root


def mine(argv: list[str], capsys, monkeypatch) -> str:
    def no_mining(*args, **kwargs):
        raise AssertionError("mining ran before the arguments were checked")

    monkeypatch.setattr(mining, "offline_candidates", no_mining)
    assert mining.main([*argv, "--k-i2t", "2", "--k-t2i", "2", "--no-progress"]) == 2
    return one_line(capsys.readouterr().err)


def test_mining_float16_overflow_is_refused(tmp_path, capsys, monkeypatch):
    emb = _embeddings(tmp_path / "emb", scale=1e5)  # finite in float32, inf in float16
    line = mine([str(emb), str(tmp_path / "out"), "--dtype", "float16"], capsys, monkeypatch)
    assert "images.npy has values beyond float16's range" in line
    assert not (tmp_path / "out").exists()


def test_mining_out_dir_is_a_file_checked_before_mining(tmp_path, capsys, monkeypatch):
    emb = _embeddings(tmp_path / "emb")
    (tmp_path / "out").write_text("keep\n")
    line = mine([str(emb), str(tmp_path / "out")], capsys, monkeypatch)
    assert f"OUT_DIR {tmp_path / 'out'}" in line and "is a file" in line
    assert (tmp_path / "out").read_text() == "keep\n"


@needs_unwritable
def test_mining_out_dir_where_no_file_can_be_created(tmp_path, capsys, monkeypatch):
    emb = _embeddings(tmp_path / "emb")
    line = mine([str(emb), str(UNWRITABLE / "vse_cuda_out")], capsys, monkeypatch)
    assert f"OUT_DIR {UNWRITABLE / 'vse_cuda_out'}" in line and f"{UNWRITABLE} is not writable" in line


def test_mining_output_name_taken_by_a_directory(tmp_path, capsys, monkeypatch):
    emb = _embeddings(tmp_path / "emb")
    (tmp_path / "out" / "t2i.npy").mkdir(parents=True)
    line = mine([str(emb), str(tmp_path / "out")], capsys, monkeypatch)
    assert "t2i.npy is a directory" in line


def test_mining_truncated_npy_with_a_huge_header(tmp_path, capsys, monkeypatch):
    emb = _embeddings(tmp_path / "emb")
    write_huge_header(emb / "captions.npy")
    line = mine([str(emb), str(tmp_path / "out")], capsys, monkeypatch)
    assert "captions.npy is not a readable .npy file" in line
    assert not (tmp_path / "out").exists()
