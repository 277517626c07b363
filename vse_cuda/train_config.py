"""What a training run is and what it builds: the :class:`Config` every checkpoint stores and
its checks, the device and ranks a run uses (:func:`resolve_device`, :class:`World`,
:func:`process_group`), and the dataset, model and loss a Config names (:func:`load_data`,
:func:`make_model`, :func:`make_loss`). Shared by ``python -m vse_cuda.train`` and
``python -m vse_cuda.evaluate``; the harness itself is described in :mod:`vse_cuda.train`.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from . import losses
from .data import Dataset, SyntheticConfig, load_vse_dataset, synthetic_dataset
from .models import DualEncoder, build_model

LOSSES = ("triplet", "unified", "infonce", "siglip", "quintuplet", "goal")
#: CLIP's initial temperature τ = 0.07 (γ = 1/τ), the start of ``--loss infonce``'s learned scale.
INFONCE_INITIAL_SCALE = 1 / 0.07
#: The SigLIP paper's initial temperature t = 10 and bias b = −10 of ``--loss siglip``.
SIGLIP_INITIAL_SCALE, SIGLIP_INITIAL_BIAS = 10.0, -10.0
DEVICES = ("cpu", "cuda")
#: Config fields a resumed run may change: they do not alter what the finished run computes
#: (``epochs`` extends a run; the schedule depends on ``lr_update`` only).
RESUMABLE_CHANGES = ("epochs", "threads")


class ConfigError(ValueError):
    """Options that cannot work with this data (found before any training step)."""


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
    label_positives: bool = False
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
    if c.label_positives and c.loss not in ("unified", "infonce"):
        raise ValueError(f"--label-positives applies to --loss unified and infonce, not {c.loss}")
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
    """The encoders; with ``--loss infonce`` also the learnable log-temperature, at log(1/0.07),
    and with ``--loss siglip`` the log-temperature and the bias, at log 10 and −10."""
    logit_scale, logit_bias = {"infonce": (math.log(INFONCE_INITIAL_SCALE), None),
                               "siglip": (math.log(SIGLIP_INITIAL_SCALE), SIGLIP_INITIAL_BIAS)}.get(config.loss,
                                                                                                  (None, None))
    return build_model(image_dim=dataset.image_dim, caption_dim=dataset.caption_dim,
                       vocab_size=None if dataset.vocab is None else len(dataset.vocab),
                       embed_dim=config.embed_dim, head_hidden=config.head_hidden, word_dim=config.word_dim,
                       logit_scale=logit_scale, logit_bias=logit_bias)


def make_loss(config: Config, *, warmup: bool, round_: int, group: dist.ProcessGroup | None = None) -> nn.Module:
    """The loss of an epoch: VSE0 during warm-up, VSE++ in AOQ's first round, else ``--loss``;
    with ``group``, negatives come from every rank's shard."""
    c = config
    if warmup:
        return losses.TripletLoss(margin=c.margin, mining="all", group=group)
    if c.loss == "triplet":
        return losses.TripletLoss(margin=c.margin, mining=c.mining, k=c.topk, group=group)
    if c.loss == "unified":
        return losses.UnifiedLoss(scale=c.scale, margin=c.margin, group=group, label_positives=c.label_positives)
    if c.loss == "infonce":  # symmetric InfoNCE; the trainer passes the model's learned scale
        return losses.UnifiedLoss(scale=INFONCE_INITIAL_SCALE, margin=0.0, group=group,
                                  label_positives=c.label_positives)
    if c.loss == "siglip":  # the trainer passes the model's learned scale and bias
        return losses.SigLipLoss(learnable=False, group=group)
    if c.loss == "goal":
        return losses.GoalLoss(triplet_weight=c.triplet_weight, pair_weight=c.pair_weight, tau=c.tau, a=c.goal_a,
                               b=c.goal_b, lam=c.goal_lam, group=group)
    if round_ == 1:
        return losses.TripletLoss(margin=c.margin, mining="hardest", group=group)
    return losses.QuintupletLoss(margin_online=c.margin, margin_offline=c.margin_offline, alpha=c.alpha, beta=c.beta,
                                 detach_weights=c.detach_weights, group=group)
