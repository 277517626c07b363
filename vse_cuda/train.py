"""Training harness: ``python -m vse_cuda.train [options]`` (DESIGN §7).

Trains a dual encoder on the embedded synthetic dataset (default) or a VSE/SCAN
precomputed-feature directory (``--data DIR``) with any of the four fused losses, evaluates
Recall@K on the dev split every epoch and on the test split at the end, and writes into
``--run-dir``: ``checkpoint.pt`` (latest, atomic, for ``--resume``), ``model_best.pt`` (best dev
rsum), ``log.csv``, ``curves.png`` and ``results.md``.

Crash safety: every file is replaced atomically, so a run killed at any point (even SIGKILL,
even mid-write) is continued by ``--resume`` and ends bitwise where an uninterrupted run would
(timing and memory columns of the log aside); killed before its first checkpoint, it is started
again without ``--resume``. A damaged, foreign or other-configuration checkpoint is refused
with a one-line message and nothing in the run dir is touched.

AOQ (``--loss quintuplet``) runs the official two rounds: VSE++ training, offline candidate
mining with the round-one model (:mod:`vse_cuda.mining`), then AOQ training of a fresh model.

Data parallel: ``torchrun --nproc_per_node=N -m vse_cuda.train [options]`` (WORLD_SIZE > 1)
joins a process group: NCCL when the run trains on CUDA (``--device``, by default cuda when a GPU
is visible; each rank on its LOCAL_RANK's GPU), gloo on CPU. ``--batch-size`` stays the *global*
batch: every rank draws the same seeded epoch order (and, for AOQ, the same offline
negatives), encodes its contiguous share of each global batch (sizes differ by at most one)
and calls the loss with ``group=WORLD``, so negatives come from the whole global batch. A last
batch with fewer pairs than ranks is computed by rank 0 alone (the other ranks add zero
gradients). The ranks' losses sum to the single-process loss and their parameter gradients
are partial sums of its gradient: one all-reduce (SUM) of all gradients, flattened in
parameter order, precedes clipping and the Adam step, so every rank takes the step one process
would take on the whole batch (up to rounding: the gradient is summed in another order, and
under bf16 autocast each rank's weight gradient is rounded to bf16 before the sum) and all
ranks hold bitwise identical parameters. The logged loss is the sum over ranks. Rank 0 alone
evaluates (the others wait for its result), mines AOQ candidates (sent to the others), prints
and writes the run directory, which every rank must see: ``--resume`` loads the same
checkpoint on every rank.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import io
import math
import os
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from . import losses
from ._checkpoint import (CheckpointError, atomic_write, load_checkpoint, output_dir_problem, remove_stale_temporaries,
                          save_checkpoint)
from .data import CAPTIONS_PER_IMAGE, Dataset, DataError, SyntheticConfig, epoch_order, load_vse_dataset, \
    synthetic_dataset
from .evaluate import METRICS, embed_split, format_table, recall_at_k, recall_table
from .models import DualEncoder, build_model

LOSSES = ("triplet", "unified", "quintuplet", "goal")
DEVICES = ("cpu", "cuda")
#: Config fields a resumed run may change: they do not alter what the finished run computes
#: (``epochs`` extends a run; the schedule depends on ``lr_update`` only).
RESUMABLE_CHANGES = ("epochs", "threads")
CHECKPOINT, BEST, LOG, PLOT, RESULTS = "checkpoint.pt", "model_best.pt", "log.csv", "curves.png", "results.md"
CANDIDATES = "aoq_candidates.pt"
#: Every file the harness writes into the run dir (all through atomic_write).
RUN_FILES = (CHECKPOINT, BEST, LOG, PLOT, RESULTS, CANDIDATES)
LOG_FIELDS = ("round", "epoch", "loss", "lr", "train_loss", "steps", "seconds", "ms_per_step", "peak_rss_mib",
              *(f"dev_{m}" for m in METRICS))
T = TypeVar("T")


class ConfigError(ValueError):
    """Options that cannot work with this data (found before any training step)."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


@dataclass
class Config:
    """Everything that determines a run's result; stored in every checkpoint."""

    data: str = "synthetic"
    splits: str = "train,dev,test"
    min_word_count: int = 1
    synthetic_train: int = SyntheticConfig.train_images
    synthetic_dev: int = SyntheticConfig.dev_images
    synthetic_test: int = SyntheticConfig.test_images
    seed: int = 0
    loss: str = "triplet"
    margin: float = 0.2
    mining: str = "hardest"
    topk: int = 1
    scale: float = 20.0
    triplet_weight: str = "con"
    pair_weight: str = "con"
    tau: float = 1.0
    goal_a: float = 2.0
    goal_b: float = 10.0
    goal_lam: float = 0.5
    margin_offline: float = 0.0
    alpha: float = 0.3
    beta: float = 1.5
    detach_weights: bool = False
    aoq_k_i2t: int = 2000
    aoq_k_t2i: int = 400
    aoq_pool: int = 300
    mask_same_image: bool = False
    warmup_epochs: int = 1
    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-4
    lr_update: int = 15
    lr_decay: float = 0.1
    grad_clip: float = 2.0
    embed_dim: int = 1024
    head_hidden: int = 0
    word_dim: int = 300
    precision: str = "bf16"
    threads: int = 0

    @property
    def rounds(self) -> int:
        """AOQ trains twice (base model, then AOQ on its mined candidates); the others once."""
        return 2 if self.loss == "quintuplet" else 1


# ---------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    d = Config()
    p = argparse.ArgumentParser(prog="python -m vse_cuda.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--run-dir", type=Path, default=Path("runs/vse"), help="where checkpoints, log and plot go")
    g.add_argument("--resume", action="store_true",
                   help="continue from RUN_DIR/checkpoint.pt; options not given are the checkpoint's")
    g.add_argument("--overwrite", action="store_true", help="start afresh even if RUN_DIR holds a checkpoint")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    g.add_argument("--device", choices=DEVICES, default=None,
                   help="where data, model, loss and evaluation run (default: cuda when a GPU is visible, else cpu)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=d.data, help="'synthetic' (embedded) or a VSE/SCAN precomputed-feature dir")
    g.add_argument("--splits", default=d.splits, help="train,dev,test file prefixes in --data (e.g. train,dev,testall)")
    g.add_argument("--min-word-count", type=int, default=d.min_word_count, help="vocabulary threshold (raw captions)")
    for split in ("train", "dev", "test"):
        g.add_argument(f"--synthetic-{split}", type=int, default=getattr(d, f"synthetic_{split}"),
                       help=f"images in the synthetic {split} split")
    g = p.add_argument_group("loss")
    g.add_argument("--loss", choices=LOSSES, default=d.loss, help="training objective")
    g.add_argument("--margin", type=float, default=d.margin, help="triplet/unified margin; AOQ online margin m1")
    g.add_argument("--mining", choices=losses.MINING_MODES, default=d.mining, help="triplet: all=VSE0, hardest=VSE++")
    g.add_argument("--topk", type=int, default=d.topk, help="triplet --mining topk: negatives per anchor")
    g.add_argument("--scale", type=float, default=d.scale, help="unified: gamma")
    g.add_argument("--triplet-weight", choices=losses.TRIPLET_WEIGHTS, default=d.triplet_weight, help="GOAL")
    g.add_argument("--pair-weight", choices=losses.PAIR_WEIGHTS, default=d.pair_weight, help="GOAL")
    g.add_argument("--tau", type=float, default=d.tau, help="GOAL: tau")
    g.add_argument("--goal-a", type=float, default=d.goal_a, help="GOAL: a")
    g.add_argument("--goal-b", type=float, default=d.goal_b, help="GOAL: b")
    g.add_argument("--goal-lam", type=float, default=d.goal_lam, help="GOAL: lambda")
    g.add_argument("--margin-offline", type=float, default=d.margin_offline, help="AOQ: m2")
    g.add_argument("--alpha", type=float, default=d.alpha, help="AOQ: alpha")
    g.add_argument("--beta", type=float, default=d.beta, help="AOQ: beta")
    g.add_argument("--detach-weights", action="store_true", help="AOQ: constant adaptive weights")
    g.add_argument("--aoq-k-i2t", type=int, default=d.aoq_k_i2t, help="AOQ: mined captions per image")
    g.add_argument("--aoq-k-t2i", type=int, default=d.aoq_k_t2i, help="AOQ: mined images per caption")
    g.add_argument("--aoq-pool", type=int, default=d.aoq_pool, help="AOQ: offline candidates drawn from (h)")
    g.add_argument("--mask-same-image", action="store_true", help="never use an image's other captions as negatives")
    g.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs,
                   help="first epochs with VSE0 (triplet, sum over negatives) before the chosen loss (VSE∞)")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=d.epochs, help="epochs (per round for AOQ)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="pairs per step")
    g.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    g.add_argument("--lr-update", type=int, default=d.lr_update, help="multiply lr by --lr-decay every N epochs")
    g.add_argument("--lr-decay", type=float, default=d.lr_decay, help="step decay factor")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="gradient-norm clip (0: none)")
    g.add_argument("--precision", choices=("bf16", "fp32"), default=d.precision, help="encoder autocast dtype")
    g.add_argument("--threads", type=int, default=d.threads, help="torch threads (0: torch's default)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of data order, init and the synthetic data")
    g = p.add_argument_group("model")
    g.add_argument("--embed-dim", type=int, default=d.embed_dim, help="joint embedding width")
    g.add_argument("--head-hidden", type=int, default=d.head_hidden,
                   help="MLP width beside the linear head (0: linear)")
    g.add_argument("--word-dim", type=int, default=d.word_dim, help="word embedding width (raw captions)")
    return p


def parse_args(argv: list[str] | None) -> tuple[Config, argparse.Namespace, set[str]]:
    """The run's Config, the run options (run dir, resume, ...) and the names of the Config
    fields given on the command line; range errors exit via argparse."""
    parser = build_parser()
    args = parser.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(Config)}
    config = Config(**{k: v for k, v in vars(args).items() if k in fields})
    try:
        check_config(config)
    except ValueError as err:
        parser.error(str(err))
    return config, args, _given_options(argv) & fields


def _given_options(argv: list[str] | None) -> set[str]:
    """Destinations set explicitly in ``argv``: a parser without defaults leaves the others out."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def check_config(c: Config) -> None:
    """Ranges of every numeric option and the loss keywords (the loss modules check the rest)."""
    positive = ("epochs", "batch_size", "lr_update", "embed_dim", "word_dim", "topk", "aoq_k_i2t", "aoq_k_t2i",
                "aoq_pool", "min_word_count", "synthetic_train", "synthetic_dev", "synthetic_test")
    for name in positive:
        if getattr(c, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(c, name)}")
    for name in ("warmup_epochs", "head_hidden", "threads"):
        if getattr(c, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(c, name)}")
    for name in ("lr", "lr_decay", "grad_clip"):  # inf passes the range checks below, then trains to NaN
        if not math.isfinite(getattr(c, name)):
            raise ValueError(f"--{name.replace('_', '-')} must be finite, got {getattr(c, name)}")
    if not (c.lr > 0 and c.lr_decay > 0 and c.grad_clip >= 0):
        raise ValueError(f"--lr and --lr-decay must be > 0 and --grad-clip >= 0, got {c.lr}, {c.lr_decay}, "
                         f"{c.grad_clip}")
    if len(c.splits.split(",")) != 3:
        raise ValueError(f"--splits must name three splits (train,dev,test), got {c.splits!r}")
    make_loss(c, warmup=False, round_=c.rounds)
    make_loss(c, warmup=True, round_=1)


# ------------------------------------------------------------------------------ ranks

@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel run: rank 0 of 1 without torchrun."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None

    @property
    def main(self) -> bool:
        """The rank that evaluates, prints and writes the run directory."""
        return self.rank == 0

    def shard(self, ids: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a global batch (the first ``len % size`` ranks get one
        more; rank order is the gather's order, so the ranks' shards concatenate to the batch)."""
        return ids.tensor_split(self.size)[self.rank]


def current_world() -> World:
    """The default process group's World when it spans several processes, else a single one."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return World(dist.get_rank(), dist.get_world_size(), dist.group.WORLD)
    return World()


def resolve_device(name: str | None) -> torch.device:
    """The device a run trains on: ``name`` ("cpu" or "cuda"), or cuda when a GPU is visible.
    Under torchrun each rank takes the GPU of its LOCAL_RANK.

    Raises:
        ConfigError: "cuda" was asked for but torch sees no CUDA GPU.
    """
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in DEVICES:
        raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("--device cuda, but torch sees no CUDA GPU (torch.cuda.is_available() is False); "
                          "use --device cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


@contextmanager
def process_group(device: torch.device | None = None) -> Iterator[World]:
    """Under torchrun with WORLD_SIZE > 1, a process group for the block's duration: NCCL when
    the run trains on CUDA (each rank on its LOCAL_RANK's GPU), gloo on CPU, where NCCL cannot
    run; otherwise the current World as it is."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    if launched:
        cuda = device is not None and device.type == "cuda"
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield current_world()
        if launched:  # no rank tears its group down while another still uses it
            dist.barrier()
    finally:
        if launched:
            dist.destroy_process_group()


# ------------------------------------------------------------------------- data, model, loss

def load_data(config: Config, vocab: list[str] | None = None) -> Dataset:
    """The dataset a config names (a checkpoint's vocabulary reproduces its token ids)."""
    if config.data == "synthetic":
        return synthetic_dataset(SyntheticConfig(seed=config.seed, train_images=config.synthetic_train,
                                                 dev_images=config.synthetic_dev, test_images=config.synthetic_test))
    splits = tuple(config.splits.split(","))
    return load_vse_dataset(config.data, splits=splits, vocab=vocab, min_word_count=config.min_word_count)


def make_model(config: Config, dataset: Dataset) -> DualEncoder:
    return build_model(image_dim=dataset.image_dim, caption_dim=dataset.caption_dim,
                       vocab_size=None if dataset.vocab is None else len(dataset.vocab),
                       embed_dim=config.embed_dim, head_hidden=config.head_hidden, word_dim=config.word_dim)


def make_loss(config: Config, *, warmup: bool, round_: int, group: dist.ProcessGroup | None = None) -> nn.Module:
    """The loss of an epoch: VSE0 during warm-up, VSE++ in AOQ's first round, else ``--loss``;
    with ``group``, negatives come from every rank's shard."""
    c = config
    if warmup:
        return losses.TripletLoss(margin=c.margin, mining="all", group=group)
    if c.loss == "triplet":
        return losses.TripletLoss(margin=c.margin, mining=c.mining, k=c.topk, group=group)
    if c.loss == "unified":
        return losses.UnifiedLoss(scale=c.scale, margin=c.margin, group=group)
    if c.loss == "goal":
        return losses.GoalLoss(triplet_weight=c.triplet_weight, pair_weight=c.pair_weight, tau=c.tau, a=c.goal_a,
                               b=c.goal_b, lam=c.goal_lam, group=group)
    if round_ == 1:
        return losses.TripletLoss(margin=c.margin, mining="hardest", group=group)
    return losses.QuintupletLoss(margin_online=c.margin, margin_offline=c.margin_offline, alpha=c.alpha, beta=c.beta,
                                 detach_weights=c.detach_weights, group=group)


# ------------------------------------------------------------------------------ the loop

@dataclass
class RunState:
    """Where a run stands: round (1-based), epochs done in that round, per-epoch log rows,
    and the best dev rsum of the round."""

    round: int = 1
    epoch: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    best_rsum: float = float("-inf")


class Trainer:
    """One run: builds everything from a Config, trains round by round, writes the run dir.
    Under torchrun one Trainer per rank (``world``: the current process group's by default)."""

    def __init__(self, config: Config, run_dir: Path, *, progress: bool = True, out=None, world: World | None = None,
                 device: torch.device | str = "cpu"):
        self.config, self.run_dir = config, Path(run_dir)
        # Not part of Config: a checkpoint (loaded to CPU, then onto the model's device) resumes on either device.
        self.device = torch.device(device)
        self.world = world or current_world()
        self.progress = progress and self.world.main
        self.out = out or sys.stdout
        self.dataset: Dataset | None = None
        self.candidates: tuple[torch.Tensor, torch.Tensor] | None = None

    # --- setup

    def start(self, *, resume: bool, overwrite: bool, given: set[str] | None = None) -> RunState:
        """Validate inputs (data, checkpoint) and set up the model; nothing is written yet.

        On ``resume``, Config fields not in ``given`` (all fields when None) come from the
        checkpoint; given ones must equal the checkpoint's, except ``RESUMABLE_CHANGES``.
        """
        ckpt = None
        path = self.run_dir / CHECKPOINT
        check_run_dir(self.run_dir)
        if resume:
            if not path.exists():
                raise CheckpointError(f"no checkpoint at {path} to resume from: start without --resume")
            ckpt = load_checkpoint(path)
            saved = ckpt["config"]
            if given is not None:
                current = asdict(self.config)
                self.config = Config(**{**current, **{k: saved[k] for k in saved if k not in given}})
            _check_same_config(path, saved, asdict(self.config))
        elif path.exists() and not overwrite:
            raise CheckpointError(f"{path} exists: pass --resume to continue it or --overwrite to start afresh")
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        self.dataset = load_data(self.config, vocab=None if ckpt is None else ckpt.get("vocab"))
        if self.config.loss == "quintuplet":
            self._check_aoq()
        state = RunState()
        if ckpt is None:
            self._new_round(state.round)
        else:
            state = self._restore(ckpt)
        return state

    def _new_round(self, round_: int) -> None:
        """A fresh model, optimizer and schedule; the init depends on (seed, round) only."""
        torch.manual_seed(self.config.seed * 100 + round_)
        self.model = make_model(self.config, self.dataset).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.config.lr)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, self.config.lr_update, self.config.lr_decay)
        self._broadcast_model()

    def _broadcast_model(self) -> None:
        """Rank 0's initial weights on every rank (as DDP does): the init is seeded by the config
        alone, and this keeps it so should a module ever draw rank-dependent numbers."""
        if self.world.size > 1:
            for tensor in self.model.state_dict().values():
                dist.broadcast(tensor, src=0, group=self.world.group)

    def _restore(self, ckpt: dict[str, Any]) -> RunState:
        state = RunState(ckpt["round"], ckpt["epoch"], list(ckpt["history"]), ckpt["best_rsum"])
        self._new_round(state.round)
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as err:  # same options, but the data's feature widths changed
            raise CheckpointError(f"{self.run_dir / CHECKPOINT} does not fit the data: {err}") from err
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"])
        if state.round == 2:
            self.candidates = self._load_candidates()
        return state

    # --- training

    def run(self, state: RunState) -> dict[str, dict[str, float]]:
        """Train the remaining epochs of every round, then evaluate the best model on test."""
        c = self.config
        if self.world.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # A process killed mid-write leaves its temporary file; the run's own writes start now.
            remove_stale_temporaries(self.run_dir, RUN_FILES)
            if state.history:
                # Killed after the checkpoint's rename but before the log's or plot's (maybe
                # at the last epoch, after which nothing would rewrite them): catch them up.
                write_log(state.history, self.run_dir / LOG)
                write_plot(state.history, self.run_dir / PLOT)
            else:
                # A fresh start (--overwrite, or again after a kill before the first checkpoint):
                # an older run's checkpoint must not outlive the new run's first writes, or a
                # kill before the new first checkpoint would let --resume mix the two runs.
                for name in RUN_FILES:
                    (self.run_dir / name).unlink(missing_ok=True)
        self._say(f"data: {self.dataset.description}")
        self._say(f"device: {self.device}" + (f" ({torch.cuda.get_device_name(self.device)})"
                                             if self.device.type == "cuda" else ""))
        if self.world.size > 1:
            self._say(f"data parallel: {self.world.size} ranks share each global batch of {c.batch_size} pairs")
        while True:
            while state.epoch < c.epochs:
                self._epoch(state)
            if state.round == c.rounds:
                break
            self._mine_candidates()
            state.round, state.epoch, state.best_rsum = state.round + 1, 0, float("-inf")
            self._new_round(state.round)
            if self.world.main:
                # Round two's first epoch replaces model_best.pt before its checkpoint: resuming
                # from round one's last checkpoint then would mine with round two's model.
                # Checkpointing the new round's start makes a resume load the mined lists instead.
                save_checkpoint(self._payload(state, full=True), self.run_dir / CHECKPOINT)
        return self._final_test()

    def _epoch(self, state: RunState) -> None:
        c, split = self.config, self.dataset.train
        warmup = state.round == 1 and state.epoch < c.warmup_epochs
        loss_fn = make_loss(c, warmup=warmup, round_=state.round, group=self.world.group)
        # A batch with fewer pairs than ranks (a short last batch) is computed whole by rank 0,
        # without a group; the other ranks add zero gradients.
        short_fn = make_loss(c, warmup=warmup, round_=state.round)
        loss_name = "triplet-all (warm-up)" if warmup else _loss_name(c, state.round)
        # The same order and generator on every rank: each takes its shard of the same global batches.
        order = epoch_order(split.num_captions, c.seed * 10 + state.round, state.epoch)
        gen = torch.Generator().manual_seed(c.seed * 1_000_003 + state.round * 7919 + state.epoch)
        batches = list(order.split(c.batch_size))
        lr = self.optimizer.param_groups[0]["lr"]
        self.model.train()
        start, total = time.perf_counter(), 0.0
        for step, captions in enumerate(self._progress(batches, state)):
            total += self._step(captions, loss_fn if len(captions) >= self.world.size else short_fn, gen, state, step)
        seconds = time.perf_counter() - start
        self.scheduler.step()
        state.epoch += 1
        train = {"round": state.round, "epoch": state.epoch, "loss": loss_name, "lr": lr,
                 "train_loss": total / len(batches), "steps": len(batches), "seconds": round(seconds, 3),
                 "ms_per_step": round(1e3 * seconds / len(batches), 3), "peak_rss_mib": _peak_rss_mib()}
        row = self._on_main(lambda: {**train, **self._dev_recall()})
        state.history.append(row)
        self._save(state, row["dev_rsum"])
        self._say(f"round {state.round} epoch {state.epoch}/{c.epochs} [{loss_name}] loss {row['train_loss']:.4f} "
                  f"dev rsum {row['dev_rsum']:.1f} ({seconds:.1f} s, {row['ms_per_step']:.1f} ms/step)")

    def _dev_recall(self) -> dict[str, float]:
        dev = recall_at_k(*embed_split(self.model, self.dataset.dev, autocast=self.config.precision == "bf16"))
        return {f"dev_{m}": v for m, v in dev.items()}

    def _progress(self, batches: list[torch.Tensor], state: RunState):
        if not self.progress:
            return batches
        from tqdm.auto import tqdm

        return tqdm(batches, desc=f"round {state.round} epoch {state.epoch + 1}/{self.config.epochs}", unit="step",
                    leave=False)

    def _step(self, captions: torch.Tensor, loss_fn: nn.Module, gen: torch.Generator, state: RunState,
              step: int) -> float:
        """One optimizer step on the global batch ``captions``; this rank computes its shard's
        part of the loss. Returns the batch's loss (summed over the ranks)."""
        c = self.config
        image_ids, caption_ids = [captions // CAPTIONS_PER_IMAGE], [captions]
        if isinstance(loss_fn, losses.QuintupletLoss):
            # Drawn for the global batch on every rank, then sharded: the draw one process makes.
            image_ids, caption_ids = self._offline_batch(captions, gen)
        loss = self._shard_loss(loss_fn, image_ids, caption_ids)
        total = self._sum_over_ranks(loss.detach())
        if not torch.isfinite(total):  # the same sum on every rank: all of them stop here
            raise TrainingError(f"the loss is {total.item()} at round {state.round} epoch {state.epoch + 1} step "
                                f"{step + 1}; stopped before it reached a checkpoint, so "
                                f"{self.run_dir / CHECKPOINT} still holds the last good epoch")
        self.optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:  # not on a rank that sits out a short batch
            loss.backward()
        self._reduce_gradients()
        if c.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        self.optimizer.step()
        return total.item()

    def _shard_loss(self, loss_fn: nn.Module, image_ids: list[torch.Tensor],
                    caption_ids: list[torch.Tensor]) -> torch.Tensor:
        """The loss terms of this rank's pairs against the negatives of the whole batch. Ids are
        per role: (I, T), or for AOQ (I, T), (Ĩ, T̃), (I′, T′), each of the global batch's length."""
        c, split, shard = self.config, self.dataset.train, self.world.shard
        if loss_fn.group is None and self.world.size > 1:  # a short batch, whole on rank 0
            if not self.world.main:
                return torch.zeros((), device=self.device)
            shard = World().shard
        image_ids, caption_ids = [shard(i) for i in image_ids], [shard(t) for t in caption_ids]
        features = split.image_batch(torch.cat(image_ids)).to(self.device)
        captions, lengths = split.caption_batch(torch.cat(caption_ids))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=c.precision == "bf16"):
            img = self.model.image(features)
            txt = self.model.text(captions.to(self.device), lengths)
        # One encoder pass over the shard and, for AOQ, its offline pairs; split back per role.
        img, txt = img.split(len(image_ids[0])), txt.split(len(caption_ids[0]))
        labels = (caption_ids[0] // CAPTIONS_PER_IMAGE).to(self.device) if c.mask_same_image else None
        if len(img) == 1:
            return loss_fn(img[0], txt[0], labels=labels)
        return loss_fn(img[0], txt[0], img[1], txt[1], img[2], txt[2], labels=labels)

    def _sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        if self.world.size > 1:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM, group=self.world.group)
        return value

    def _reduce_gradients(self) -> None:
        """Sum the ranks' partial gradients (their losses sum to the global batch's loss), so every
        rank clips and steps with the single-process gradient. One flat buffer in parameter order:
        one collective, and the same reduction on every rank. A parameter without a gradient here
        (a rank with no pairs) adds zeros."""
        if self.world.size == 1:
            return
        params = list(self.model.parameters())
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.world.group)
        for p, grad in zip(params, flat.split([p.numel() for p in params])):
            p.grad = grad.view_as(p)

    def _offline_batch(self, captions: torch.Tensor,
                       gen: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """AOQ's per-sample draw (spec §3.2): image ids of (I, Ĩ, I′) and caption ids of (T, T̃, T′)."""
        from . import mining

        i2t, t2i = self.candidates
        off_txt, off_img, img2, txt2 = mining.sample_offline_negatives(i2t, t2i, captions, generator=gen,
                                                                       pool=self.config.aoq_pool)
        return [captions // CAPTIONS_PER_IMAGE, off_img, img2], [captions, off_txt, txt2]

    # --- AOQ mining

    def _mine_candidates(self) -> None:
        """Rank 0 mines (and saves) the offline candidates with round one's best model; the other
        ranks receive them, so every rank draws offline negatives from the same lists."""
        self.candidates = self._share_candidates(self._mine() if self.world.main else None)

    def _share_candidates(self, mined: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.world.size == 1:
            return mined
        (k_i2t, k_t2i), split = self._aoq_k(), self.dataset.train
        i2t, t2i = mined or (torch.empty(split.num_images, k_i2t, dtype=torch.int64),
                             torch.empty(split.num_captions, k_t2i, dtype=torch.int64))
        # NCCL moves device tensors only; the lists stay on the CPU, where the draw indexes them.
        i2t, t2i = i2t.to(self.device), t2i.to(self.device)
        for lists in (i2t, t2i):
            dist.broadcast(lists, src=0, group=self.world.group)
        return i2t.cpu(), t2i.cpu()

    def _mine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Round one's best model embeds the training split; its offline candidates are saved once."""
        from . import mining

        c, split = self.config, self.dataset.train
        best = load_checkpoint(self.run_dir / BEST)
        if best.get("round") != 1:
            raise CheckpointError(f"{self.run_dir / BEST} holds round {best.get('round')}'s model, but AOQ mines with "
                                  f"round 1's: restart the run with --overwrite")
        self.model.load_state_dict(best["model"])
        img, cap = embed_split(self.model, split, autocast=c.precision == "bf16")
        cap_to_img = torch.arange(split.num_images, device=img.device).repeat_interleave(CAPTIONS_PER_IMAGE)
        k_i2t, k_t2i = self._aoq_k()
        i2t, t2i = mining.offline_candidates(img, cap, cap_to_img, k_i2t=k_i2t, k_t2i=k_t2i, progress=self.progress)
        i2t, t2i = i2t.cpu(), t2i.cpu()  # saved and drawn from on the CPU, whatever the device
        save_checkpoint({"config": asdict(c), "i2t": i2t, "t2i": t2i}, self.run_dir / CANDIDATES)
        self._say(f"AOQ: mined {k_i2t} captions per image and {k_t2i} images per caption with the round-1 model "
                  f"(epoch {best['epoch']}) -> {self.run_dir / CANDIDATES}")
        return i2t, t2i

    def _aoq_k(self) -> tuple[int, int]:
        """Mined captions per image and images per caption: the options, capped by the train split."""
        split = self.dataset.train
        return (min(self.config.aoq_k_i2t, split.num_captions - CAPTIONS_PER_IMAGE),
                min(self.config.aoq_k_t2i, split.num_images - 1))

    def _check_aoq(self) -> None:
        """What round two needs, checked now rather than after round one: lists long enough for
        its draw (rank n < pool of the captions, n // 5 of the images), and the mining module."""
        pool, (k_i2t, k_t2i) = self.config.aoq_pool, self._aoq_k()
        if pool > k_i2t or (pool - 1) // CAPTIONS_PER_IMAGE >= k_t2i:
            raise ConfigError(f"--aoq-pool {pool} needs {pool} mined captions per image and "
                              f"{(pool - 1) // CAPTIONS_PER_IMAGE + 1} images per caption, but this run mines "
                              f"{k_i2t} and {k_t2i} (--aoq-k-i2t, --aoq-k-t2i, capped by the train split)")
        if importlib.util.find_spec("vse_cuda.mining") is None:
            raise ConfigError("--loss quintuplet needs vse_cuda.mining (offline candidates), which this "
                              "installation lacks")

    def _load_candidates(self) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.run_dir / CANDIDATES
        ckpt = load_checkpoint(path, required=("config", "i2t", "t2i"))
        _check_same_config(path, ckpt["config"], asdict(self.config))
        return ckpt["i2t"], ckpt["t2i"]

    # --- outputs

    def _save(self, state: RunState, dev_rsum: float) -> None:
        """Checkpoint (and best model), then the log and plot (rank 0); refuses non-finite weights
        (checked on every rank: they hold the same weights, so all of them stop)."""
        for name, p in self.model.state_dict().items():
            if not torch.isfinite(p).all():
                raise TrainingError(f"parameter {name} is not finite after round {state.round} epoch "
                                    f"{state.epoch}; {self.run_dir / CHECKPOINT} keeps the last good epoch")
        best = dev_rsum > state.best_rsum
        state.best_rsum = max(state.best_rsum, dev_rsum)
        if not self.world.main:
            return
        if best:
            save_checkpoint(self._payload(state, full=False), self.run_dir / BEST)
        save_checkpoint(self._payload(state, full=True), self.run_dir / CHECKPOINT)
        write_log(state.history, self.run_dir / LOG)
        write_plot(state.history, self.run_dir / PLOT)

    def _payload(self, state: RunState, *, full: bool) -> dict[str, Any]:
        payload = {"config": asdict(self.config), "vocab": self.dataset.vocab, "model": self.model.state_dict(),
                   "round": state.round, "epoch": state.epoch, "dev": state.history[-1]}
        if full:
            payload.update(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                           rng=torch.get_rng_state(), history=state.history, best_rsum=state.best_rsum)
        return payload

    def _final_test(self) -> dict[str, dict[str, float]]:
        return self._on_main(self._test_best)

    def _test_best(self) -> dict[str, dict[str, float]]:
        best = load_checkpoint(self.run_dir / BEST)
        self.model.load_state_dict(best["model"])
        split = self.dataset.test
        table = recall_table(*embed_split(self.model, split, autocast=self.config.precision == "bf16"))
        text = format_table(table, num_images=split.num_images)
        header = (f"Test recall of {self.run_dir / BEST} (round {best['round']} epoch {best['epoch']}, best dev rsum "
                  f"{best['dev']['dev_rsum']:.1f}); {split.num_images} images, {split.num_captions} captions")
        atomic_write(self.run_dir / RESULTS, lambda tmp: tmp.write_text(f"{header}\n\n{text}\n"))
        self._say(f"\n{header}\n{text}\n")
        for what, name in (("checkpoint", CHECKPOINT), ("best model", BEST), ("log", LOG), ("plot", PLOT),
                           ("table", RESULTS)):
            self._say(f"{what:>11}: {self.run_dir / name}")
        return table

    def _on_main(self, compute: Callable[[], T]) -> T:
        """``compute()`` on rank 0 only and its (picklable) result on every rank: evaluation runs
        once, and all ranks keep the same history. Should rank 0 fail, torchrun stops the others."""
        result = [compute() if self.world.main else None]
        if self.world.size > 1:
            dist.broadcast_object_list(result, src=0, group=self.world.group)
        return result[0]

    def _say(self, text: str) -> None:
        if self.world.main:
            print(text, file=self.out)


def _loss_name(config: Config, round_: int) -> str:
    if config.loss == "triplet":
        return f"triplet-{config.mining}" + (f"{config.topk}" if config.mining == "topk" else "")
    if config.loss == "quintuplet" and round_ == 1:
        return "triplet-hardest (AOQ round 1)"
    return config.loss


def check_run_dir(run_dir: Path) -> None:
    """``--run-dir`` must be (or become) a writable directory whose file names are free for the
    run's files; checked before any data is loaded or anything written (ConfigError otherwise)."""
    problem = output_dir_problem(run_dir, RUN_FILES)
    if problem:
        raise ConfigError(f"--run-dir {run_dir}: {problem}")


def _check_same_config(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {current[k]!r}" for k in current
            if k not in RESUMABLE_CHANGES and saved.get(k) != current[k]]
    if diff:
        raise CheckpointError(f"{path} was written by another configuration; resume with the same options "
                              f"({'; '.join(diff)})")


def _peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def write_log(history: list[dict[str, Any]], path: Path) -> None:
    """The per-epoch CSV, rewritten whole from the checkpointed history (a resumed run's log
    has no duplicate or missing rows)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write(path, lambda tmp: tmp.write_text(buf.getvalue()))


def write_plot(history: list[dict[str, Any]], path: Path) -> None:
    """Training loss and dev rsum per epoch, rounds side by side on one time axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(1, len(history) + 1))
    fig, (ax_loss, ax_rsum) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(x, [r["train_loss"] for r in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="mean training loss per step", yscale="log", title="loss")
    ax_rsum.plot(x, [r["dev_rsum"] for r in history], marker="o", color="tab:green")
    ax_rsum.set(xlabel="epoch", ylabel="rsum (dev)", title="dev rsum (max 600)")
    switches = [i + 0.5 for i in range(1, len(history)) if history[i]["loss"] != history[i - 1]["loss"]]
    for ax in (ax_loss, ax_rsum):
        for i, x_switch in enumerate(switches):  # warm-up end, AOQ round two
            ax.axvline(x_switch, color="grey", linestyle=":", label="loss changes" if i == 0 else None)
        if switches:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def run(argv: list[str] | None = None, *, out=None) -> dict[str, dict[str, float]]:
    """Parse ``argv``, train, evaluate; returns the test recall table. Raises on bad input."""
    config, args, given = parse_args(argv)
    device = resolve_device(args.device)
    with process_group(device) as world:
        trainer = Trainer(config, args.run_dir, progress=not args.no_progress, out=out, world=world, device=device)
        state = trainer.start(resume=args.resume, overwrite=args.overwrite, given=given)
        return trainer.run(state)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """CLI entry: like :func:`run`, but bad input ends the process with a one-line message
    (from rank 0 only under torchrun: every rank meets the same error)."""
    try:
        return run(argv)
    except (CheckpointError, ConfigError, DataError, TrainingError) as err:
        sys.exit(f"python -m vse_cuda.train: error: {err}" if int(os.environ.get("RANK", "0")) == 0 else 1)


if __name__ == "__main__":
    main()
