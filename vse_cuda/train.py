"""Training harness: ``python -m vse_cuda.train [options]`` (DESIGN §7).

Trains a dual encoder on the embedded synthetic dataset (default) or a VSE/SCAN
precomputed-feature directory (``--data DIR``) with any of the fused losses, evaluates
Recall@K on the dev split every epoch and on the test split at the end, and writes into
``--run-dir``: ``checkpoint.pt`` (latest, atomic, for ``--resume``), ``model_best.pt`` (best dev
rsum), ``log.csv``, ``curves.png`` and ``results.md``.

Crash safety: every file is replaced atomically, so a run killed at any point (even SIGKILL,
even mid-write) is continued by ``--resume`` and ends bitwise where an uninterrupted run would
(timing and memory columns of the log aside); killed before its first checkpoint, it is started
again without ``--resume``. A damaged, foreign or other-configuration checkpoint is refused
with a one-line message and nothing in the run dir is touched.

``--loss infonce`` is CLIP's objective: the unified loss at margin 0 (symmetric InfoNCE) with a
learnable temperature γ = exp(logit_scale), a model parameter initialised at log(1/0.07),
optimized with the encoders and clamped to γ ≤ 100 after every step, as open_clip does.
``--loss siglip`` is SigLIP's sigmoid loss (mean over the batch) with a learnable temperature
t = exp(logit_scale) from 10 and bias b from −10, as in the SigLIP paper.

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

The harness is split by concern: :mod:`vse_cuda.train_config` (Config, device and ranks, the
data, model and loss builders), :mod:`vse_cuda.trainer` (the training loop) and
:mod:`vse_cuda.train_files` (the run directory's files). This module is the command line, and
every name of the three is importable from it too.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from . import losses
from ._checkpoint import CheckpointError
from .data import DataError
from .train_config import (DEVICES, LOSSES, RESUMABLE_CHANGES, Config, ConfigError, World, check_config,
                           current_world, load_data, make_loss, make_model, process_group, resolve_device)
from .train_files import (BEST, CANDIDATES, CHECKPOINT, LOG, LOG_FIELDS, PLOT, RESULTS, RUN_FILES, check_run_dir,
                          check_same_config, write_log, write_plot, write_results)
from .trainer import RunState, Trainer, TrainingError

__all__ = ["BEST", "CANDIDATES", "CHECKPOINT", "DEVICES", "LOG", "LOG_FIELDS", "LOSSES", "PLOT", "RESULTS",
           "RESUMABLE_CHANGES", "RUN_FILES", "Config", "ConfigError", "RunState", "Trainer", "TrainingError", "World",
           "build_parser", "check_config", "check_run_dir", "check_same_config", "current_world", "load_data", "main",
           "make_loss", "make_model", "parse_args", "process_group", "resolve_device", "run", "write_log",
           "write_plot", "write_results"]


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
    g.add_argument("--scale", type=float, default=d.scale, help="unified: gamma (infonce learns its own, from 1/0.07)")
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
    g.add_argument("--mask-same-image", action="store_true",
                   help="never use an image's other captions as negatives (siglip: they are positives)")
    g.add_argument("--label-positives", action="store_true",
                   help="unified, infonce: an image's other captions in the batch are positives, "
                        "each anchor's term the mean over them (implies --mask-same-image)")
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
