"""One rank of test_train_distributed.py's torchrun runs: ``vse_cuda.train.main`` (what
``python -m vse_cuda.train`` runs) with every step's loss and parameters recorded, optionally
stopping cleanly after a given epoch. The test uses the same hooks in-process for its
single-process reference.

    torchrun --nproc_per_node=2 _train_rank.py OUT_DIR ROUND EPOCH -- [train options]

writes OUT_DIR/rank{r}.pt: a list of (loss summed over ranks, flat float32 parameters) per step.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import torch

from vse_cuda import train

Record = list[tuple[float, torch.Tensor]]


class Stop(Exception):
    """Raised after the epoch the run was asked to stop at (its checkpoint is written)."""


def flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def recording_step(record: Record) -> Callable:
    """Trainer._step that appends (loss, parameters after the step) to ``record``."""
    real = train.Trainer._step

    def step(self, *args, **kwargs) -> float:
        loss = real(self, *args, **kwargs)
        record.append((loss, flat_parameters(self.model)))
        return loss

    return step


def stopping_epoch(round_: int, epoch: int) -> Callable:
    """Trainer._epoch that raises Stop once (round_, epoch) is done and checkpointed."""
    real = train.Trainer._epoch

    def run_epoch(self, state) -> None:
        real(self, state)
        if (state.round, state.epoch) == (round_, epoch):
            raise Stop

    return run_epoch


def main() -> int:
    out_dir, round_, epoch, separator, *argv = sys.argv[1:]
    assert separator == "--", "usage: _train_rank.py OUT_DIR ROUND EPOCH -- [train options]"
    record: Record = []
    train.Trainer._step = recording_step(record)
    train.Trainer._epoch = stopping_epoch(int(round_), int(epoch))
    try:
        train.main(argv)
    except Stop:
        pass
    torch.save(record, Path(out_dir) / f"rank{os.environ['RANK']}.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
