"""The training loop: :class:`Trainer` runs a :class:`~vse_cuda.train_config.Config`'s rounds
(two for AOQ) of epochs, warm-up first, one optimizer step per global batch with the ranks'
gradients summed under torchrun, AOQ's offline candidates mined between the rounds, dev recall
and a checkpoint after every epoch, and the test recall of the best model at the end. What a
run writes, how it resumes and how ranks share a batch: :mod:`vse_cuda.train`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from . import losses
from ._checkpoint import CheckpointError, load_checkpoint, remove_stale_temporaries, save_checkpoint
from .data import CAPTIONS_PER_IMAGE, Dataset, epoch_order
from .evaluate import embed_split, format_table, recall_at_k, recall_table
from .train_config import Config, ConfigError, World, current_world, load_data, make_loss, make_model
from .train_files import (BEST, CANDIDATES, CHECKPOINT, LOG, PLOT, RESULTS, RUN_FILES, check_run_dir,
                          check_same_config, write_log, write_plot, write_results)

T = TypeVar("T")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


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
            check_same_config(path, saved, asdict(self.config))
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
        with torch.no_grad():
            learned = "".join(f", learned {name} {v.item():.2f}" for name, v in self.model.logit_options().items())
        self._say(f"round {state.round} epoch {state.epoch}/{c.epochs} [{loss_name}{learned}] loss "
                  f"{row['train_loss']:.4f} dev rsum {row['dev_rsum']:.1f} ({seconds:.1f} s, "
                  f"{row['ms_per_step']:.1f} ms/step)")

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
        self.model.clamp_logit_scale()
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
        same_image = c.mask_same_image or c.label_positives
        labels = (caption_ids[0] // CAPTIONS_PER_IMAGE).to(self.device) if same_image else None
        if len(img) == 1:
            # --loss infonce / siglip: the model's learned scale (and bias); not for the warm-up's VSE0.
            learned = self.model.logit_options() if isinstance(loss_fn, (losses.UnifiedLoss, losses.SigLipLoss)) else {}
            return loss_fn(img[0], txt[0], labels=labels, **learned)
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
        check_same_config(path, ckpt["config"], asdict(self.config))
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
        write_results(self.run_dir / RESULTS, header, text)
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


def _peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB
