"""Crash safety of the training harness: a run SIGKILLed again and again and resumed each time
ends exactly where an uninterrupted run does, and a truncated, corrupt, foreign, other-config or
missing checkpoint is refused by the CLI with one line naming the file, leaving the run
directory byte for byte as it was.

Kills come two ways. The private hook ``_VSE_CUDA_KILL_AT_WRITE`` (vse_cuda/_checkpoint.py)
makes the training process SIGKILL itself at a chosen atomic write -- inside a checkpoint write,
before the first checkpoint exists, after mining, between the best model and its checkpoint --
so those points are hit on any machine however loaded. The test also SIGKILLs the process
after seeded pseudo-random delays spread over an uninterrupted run's wall time. Only kills of
a live process count. Nothing here asserts on time: a delay only picks where a kill lands.
"""

from __future__ import annotations

import csv
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import vse_cuda
from vse_cuda import _checkpoint, evaluate, train

#: AOQ on 300/100/100 synthetic images, two epochs a round: round one is a VSE0 warm-up epoch
#: then a VSE++ epoch, offline mining with its best model, then two AOQ epochs of a fresh model;
#: the lr steps after every epoch.
ARGV = ["--synthetic-train", "300", "--synthetic-dev", "100", "--synthetic-test", "100", "--embed-dim", "64",
        "--batch-size", "50", "--lr", "2e-3", "--threads", "1", "--no-progress", "--loss", "quintuplet",
        "--aoq-pool", "30", "--aoq-k-i2t", "100", "--aoq-k-t2i", "20", "--epochs", "2", "--warmup-epochs", "1",
        "--lr-update", "1", "--lr-decay", "0.5", "--seed", "3"]
#: The only run-dependent values the harness writes: the log/history columns that measure the
#: process rather than the computation (wall-clock time of the epoch, and the peak RSS of the
#: process that ran it, which a freshly resumed process has not reached). Everything else --
#: weights, optimizer and scheduler state, RNG state, epochs, losses, lrs, dev and test recall,
#: mined candidates, the plot -- must be identical.
RUN_DEPENDENT = ("seconds", "ms_per_step", "peak_rss_mib")
HOOK = _checkpoint._KILL_ENV
#: Hook points, in the order the run reaches them, each one killed in turn (then it runs on).
PLAN = (
    ("checkpoint.pt:1", "fresh run, first checkpoint's temp file written, not renamed (no checkpoint yet)"),
    ("aoq_candidates.pt:1", "mining finished, the candidates file not renamed"),
    ("model_best.pt:1:after", "round two's first best model renamed, its checkpoint not written"),
    ("checkpoint.pt:2", "mid checkpoint write, the previous checkpoint in place"),
    ("checkpoint.pt:1:after", "a checkpoint renamed, its log row and plot not written"),
    ("results.md:1", "the final table written, not renamed"),
)
#: Epochs of the run (two rounds of two), and how many a checkpoint's (round, epoch) has done.
EPOCHS = 4
EPOCHS_DONE = {(0, 0): 0, (1, 1): 1, (1, 2): 2, (2, 0): 2, (2, 1): 3, (2, 2): 4}
#: Attempts with random kill points before the run is left to finish.
RANDOM_ATTEMPTS = 7
SEED = 20261122
#: Not a time limit on the harness: only so that a hung child fails the test instead of hanging it.
HANG_SECONDS = 600


def child_env(kill_at: str | None = None) -> dict[str, str]:
    """This interpreter's environment, with the vse_cuda under test first on the path."""
    env = dict(os.environ)
    root = str(Path(vse_cuda.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop(HOOK, None)
    if kill_at:
        env[HOOK] = kill_at
    return env


def command(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vse_cuda.train", *ARGV, "--run-dir", str(run_dir), *extra]


def wait_for_setup(proc: subprocess.Popen, log: Path) -> None:
    """Until the process has printed its data line (imports, data and model set up; the run
    begins) or ended."""
    give_up = time.monotonic() + HANG_SECONDS
    while proc.poll() is None and "data:" not in log.read_text() and time.monotonic() < give_up:
        time.sleep(0.02)


def launch(run_dir: Path, log: Path, *, kill_at: str | None = None, delay: float | None = None,
           after_setup: bool = False) -> tuple[int, bool]:
    """One training process: ``--resume`` when a checkpoint exists, else a fresh start (the
    harness refuses ``--resume`` without one). SIGKILLed after ``delay`` seconds (counted from
    the end of its set-up with ``after_setup``) if still alive. Returns the exit status and
    whether the timer's kill hit a live process."""
    resume = ["--resume"] if (run_dir / train.CHECKPOINT).exists() else []
    with log.open("w") as out:
        proc = subprocess.Popen(command(run_dir, *resume), stdout=out, stderr=subprocess.STDOUT,
                                env=child_env(kill_at))
        if delay is not None and after_setup:
            wait_for_setup(proc, log)
        try:
            return proc.wait(timeout=HANG_SECONDS if delay is None else delay), False
        except subprocess.TimeoutExpired:
            alive = proc.poll() is None
            if alive:
                proc.send_signal(signal.SIGKILL)
            assert delay is not None, f"the training process hung:\n{log.read_text()}"
            return proc.wait(), alive


def progress(run_dir: Path) -> tuple[int, int]:
    """(round, epoch) of the run dir's checkpoint, which must load whenever it exists."""
    path = run_dir / train.CHECKPOINT
    if not path.exists():
        return (0, 0)
    ckpt = _checkpoint.load_checkpoint(path)
    return ckpt["round"], ckpt["epoch"]


def temporaries(run_dir: Path) -> set[str]:
    return {p.name for p in run_dir.glob(f".*{_checkpoint.TMP_SUFFIX}")}


def where(run_dir: Path, log: Path, new_temps: set[str]) -> str:
    """Where a kill landed, from what the run dir and the process's output show."""
    if new_temps:
        return "writing " + ", ".join(sorted(t.split(".")[1] + "." + t.split(".")[2] for t in new_temps))
    lines = [s for s in log.read_text().splitlines() if s.startswith(("data:", "round", "AOQ", "Test recall"))]
    if not lines:
        return "starting up"
    stage = lines[-1][:40]
    if stage.startswith("AOQ"):
        return "mined, starting round 2"
    if stage.startswith("Test recall"):
        return "after the test evaluation"
    if not (run_dir / train.CHECKPOINT).exists():
        return f"before the first checkpoint (after {stage!r})"
    return f"training/evaluating/mining after {stage!r}"


class Crasher:
    """Runs the training in ``run_dir`` attempt after attempt, checking after every kill that
    the checkpoint still loads and never goes back."""

    def __init__(self, run_dir: Path, logs: Path):
        self.run_dir, self.logs, self.attempts, self.landed = run_dir, logs, 0, []
        logs.mkdir()

    def attempt(self, *, kill_at: str | None = None, delay: float | None = None, after_setup: bool = False,
                what: str | None = None) -> int:
        before, temps = progress(self.run_dir), temporaries(self.run_dir) if self.run_dir.exists() else set()
        self.attempts += 1
        log = self.logs / f"attempt{self.attempts}.out"
        rc, timer_hit = launch(self.run_dir, log, kill_at=kill_at, delay=delay, after_setup=after_setup)
        output = log.read_text()
        assert rc in (0, -signal.SIGKILL), f"exit status {rc}:\n{output}"
        assert "Traceback" not in output, output
        if rc == -signal.SIGKILL:
            after = progress(self.run_dir)
            assert after >= before, f"the checkpoint went back from {before} to {after}"
            how = f"timer {delay:.2f} s{' after set-up' if after_setup else ''}" if timer_hit else f"hook {kill_at}"
            landed = what if what and not timer_hit else where(self.run_dir, log, temporaries(self.run_dir) - temps)
            self.landed.append(f"{how}: {landed}; checkpoint at (round, epoch) {after}")
        return rc


def load_run(run_dir: Path) -> dict[str, object]:
    """Everything the run dir holds, for comparison (paths inside results.md made relative),
    and the test recall dict of its best model."""
    files = sorted(p.name for p in run_dir.iterdir())
    with (run_dir / train.LOG).open() as f:
        log = list(csv.reader(f))
    return {
        "files": files,
        **{name: _checkpoint.load_checkpoint(run_dir / name, required=())
           for name in (train.CHECKPOINT, train.BEST, train.CANDIDATES)},
        train.LOG: log,
        train.RESULTS: (run_dir / train.RESULTS).read_text().replace(str(run_dir), "RUN_DIR"),
        train.PLOT: (run_dir / train.PLOT).read_bytes(),
        "test recall": evaluate.main([str(run_dir / train.BEST)]),
    }


def assert_same(want: object, got: object, at: str = "") -> None:
    """Equal values, tensors bitwise (dtype, shape and every bit); dict keys in RUN_DEPENDENT
    are skipped, and so are those columns of the CSV log."""
    assert type(want) is type(got), f"{at}: {type(want).__name__} vs {type(got).__name__}"
    if isinstance(want, torch.Tensor):
        assert want.dtype == got.dtype and want.shape == got.shape, at
        if not torch.equal(want, got):  # finite values only: the harness refuses others
            pytest.fail(f"{at}: tensors differ")
    elif isinstance(want, dict):
        assert set(want) == set(got), f"{at}: keys {sorted(map(str, want))} vs {sorted(map(str, got))}"
        for key in want:
            if key not in RUN_DEPENDENT:
                assert_same(want[key], got[key], f"{at}/{key}")
    elif isinstance(want, (list, tuple)):
        assert len(want) == len(got), f"{at}: length {len(want)} vs {len(got)}"
        if at == f"/{train.LOG}":
            drop = {want[0].index(c) for c in RUN_DEPENDENT}
            want, got = ([[v for i, v in enumerate(row) if i not in drop] for row in rows] for rows in (want, got))
        for i, (w, g) in enumerate(zip(want, got)):
            assert_same(w, g, f"{at}[{i}]")
    else:
        assert want == got, f"{at}: {want!r} vs {got!r}"


def milestone(line: str) -> tuple[int, int] | None:
    """The (round, epoch) checkpoint that an output line announces, if any."""
    if line.startswith("AOQ: mined"):
        return (2, 0)
    match = re.match(r"round (\d+) epoch (\d+)/", line)
    return (int(match[1]), int(match[2])) if match else None


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, float, dict[tuple[int, int], float]]:
    """An uninterrupted run; the wall time of its set-up (imports, data, model); and when,
    in seconds after its set-up, it reached each checkpoint (and its end, under None). These
    times only spread the random kills over the run."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    log = run_dir.parent / "reference.out"
    with log.open("w") as out:
        start = time.monotonic()
        proc = subprocess.Popen(command(run_dir), stdout=out, stderr=subprocess.STDOUT, env=child_env())
        wait_for_setup(proc, log)
        setup = time.monotonic()
        reached = {(0, 0): 0.0}
        while True:
            running = proc.poll() is None
            for line in log.read_text().splitlines():  # after the exit too: lines of the last poll
                if milestone(line):
                    reached.setdefault(milestone(line), time.monotonic() - setup)
            if not running:
                break
            time.sleep(0.02)
        reached[None] = time.monotonic() - setup
    assert proc.returncode == 0, log.read_text()
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(train.RUN_FILES)
    return run_dir, setup - start, reached


@pytest.mark.slow
def test_killed_at_every_write_stage_and_resumed_equals_uninterrupted(tmp_path, reference):
    ref_dir = reference[0]
    crasher = Crasher(tmp_path / "run", tmp_path / "logs")
    for kill_at, what in PLAN:
        # Every hook point lies ahead of where the previous kill left the run, so each lands.
        assert crasher.attempt(kill_at=kill_at, what=what) == -signal.SIGKILL, \
            f"the kill at {kill_at} ({what}) did not land"
        if kill_at == "checkpoint.pt:1":  # killed before the first checkpoint existed: the next start is fresh
            assert not (crasher.run_dir / train.CHECKPOINT).exists() and (crasher.run_dir / train.BEST).exists()
            assert any(t.startswith(f".{train.CHECKPOINT}.") for t in temporaries(crasher.run_dir))
        if kill_at == "checkpoint.pt:2":  # the previous good checkpoint is intact (progress() loaded it)
            assert progress(crasher.run_dir) >= (2, 1)
            assert any(t.startswith(f".{train.CHECKPOINT}.") for t in temporaries(crasher.run_dir))
    assert crasher.attempt() == 0
    print("\n".join(["", *crasher.landed]))
    assert len(crasher.landed) == len(PLAN) >= 5
    assert_same(load_run(ref_dir), load_run(crasher.run_dir))  # also: no stray temporary files


@pytest.mark.slow
def test_killed_at_random_points_and_resumed_equals_uninterrupted(tmp_path, reference):
    ref_dir, setup_seconds, reached = reference
    rng = random.Random(SEED)
    # Kill moments spread over the reference run after its set-up (training, evaluation,
    # mining, writes), in order; a few more during a set-up (imports, data, model).
    moments = sorted(rng.uniform(0.0, reached[None]) for _ in range(RANDOM_ATTEMPTS - 2))
    moments[rng.randrange(len(moments)):0] = [None]
    moments[rng.randrange(len(moments)):0] = [None]
    crasher = Crasher(tmp_path / "run", tmp_path / "logs")
    for moment in moments:
        # The kill comes at that moment, counted from where the reference was when it had
        # written the checkpoint this process resumes from, or at a random one of the writes
        # still ahead (at most 4 an epoch and the table, after the log and plot a resumed
        # process rewrites first), whichever comes first.
        done = progress(crasher.run_dir)
        kill_at = f"*:{rng.randint(3, 4 * (EPOCHS - EPOCHS_DONE[done]) + 3)}"
        if moment is None:
            delay = rng.uniform(0.0, setup_seconds)
        elif moment > reached[done]:
            delay = moment - reached[done]
        else:  # this process starts past the moment
            continue
        if crasher.attempt(kill_at=kill_at, delay=delay, after_setup=moment is not None) == 0:
            break
    else:
        assert crasher.attempt() == 0  # the cap: let it finish
    print("\n".join(["", *crasher.landed]))
    assert_same(load_run(ref_dir), load_run(crasher.run_dir))


@pytest.mark.slow
def test_a_run_started_over_cannot_resume_the_old_one(tmp_path, reference):
    # --overwrite on a finished run, killed before the new run's first checkpoint: the old
    # checkpoint must be gone, not left for --resume beside the new run's best model.
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    done = subprocess.run(command(run_dir, "--overwrite"), capture_output=True, text=True,
                          env=child_env("model_best.pt:1:after"), timeout=HANG_SECONDS)
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == [train.BEST]


# --------------------------------------------------------------------- refused checkpoints

def other_config(path: Path) -> None:
    """The same file written by a run with another --lr (which the resuming command gives)."""
    ckpt = _checkpoint.load_checkpoint(path, required=())
    ckpt["config"]["lr"] = 1e-3
    _checkpoint.save_checkpoint({k: v for k, v in ckpt.items() if k != "format"}, path)


def flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))


def truncate(fraction: float | int):
    def cut(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[:fraction if isinstance(fraction, int) else int(len(data) * fraction)])
    return cut


DAMAGE = {
    "empty": (train.CHECKPOINT, truncate(0), "is truncated or corrupt"),
    "1 byte": (train.CHECKPOINT, truncate(1), "is truncated or corrupt"),
    "100 bytes": (train.CHECKPOINT, truncate(100), "is truncated or corrupt"),
    "half": (train.CHECKPOINT, truncate(0.5), "is truncated or corrupt"),
    "all but 1 byte": (train.CHECKPOINT, truncate(-1), "is truncated or corrupt"),
    "flipped bytes": (train.CHECKPOINT, flip_middle, "fails its CRC check"),
    "random bytes": (train.CHECKPOINT, lambda p: p.write_bytes(random.Random(1).randbytes(4096)),
                     "is truncated or corrupt"),
    "text": (train.CHECKPOINT, lambda p: p.write_text("not a checkpoint\n"), "is truncated or corrupt"),
    "pickled object": (train.CHECKPOINT, lambda p: p.write_bytes(pickle.dumps(Path("x"))), "not a torch file"),
    "other torch file": (train.CHECKPOINT, lambda p: torch.save({"weights": torch.zeros(3)}, p),
                         "is not a vse_cuda.train checkpoint"),
    "other config": (train.CHECKPOINT, other_config, "was written by another configuration"),
    "missing": (train.CHECKPOINT, lambda p: p.unlink(), "no checkpoint at"),
    "candidates cut": (train.CANDIDATES, truncate(0.5), "is truncated or corrupt"),
    "candidates of another config": (train.CANDIDATES, other_config, "was written by another configuration"),
}


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir())}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(DAMAGE))
def test_resume_refuses_a_damaged_or_foreign_checkpoint(tmp_path, reference, case):
    name, damage, problem = DAMAGE[case]
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    damage(run_dir / name)
    before = snapshot(run_dir)
    with pytest.raises(SystemExit) as exit_:
        train.main([*ARGV, "--run-dir", str(run_dir), "--resume"])
    message = exit_.value.code
    assert isinstance(message, str) and "\n" not in message, message
    assert message.startswith("python -m vse_cuda.train: error: ") and str(run_dir / name) in message, message
    assert problem in message, message
    assert snapshot(run_dir) == before


@pytest.mark.slow
def test_cli_reports_a_refused_checkpoint_in_one_line(tmp_path, reference):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    truncate(0.5)(run_dir / train.CHECKPOINT)
    before = snapshot(run_dir)
    done = subprocess.run(command(run_dir, "--resume"), capture_output=True, text=True, env=child_env())
    assert done.returncode == 1 and done.stdout == "", done.stdout + done.stderr
    assert done.stderr.startswith(f"python -m vse_cuda.train: error: checkpoint {run_dir / train.CHECKPOINT} is "
                                  f"truncated or corrupt") and done.stderr.count("\n") == 1, done.stderr
    assert snapshot(run_dir) == before
