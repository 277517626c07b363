"""Input checks shared by every public function (DESIGN §6): each failure raises
ValueError/TypeError naming the argument and what was expected."""

from __future__ import annotations

import math
from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_embeddings(name: str, x: object) -> torch.Tensor:
    """A floating 2-D tensor [N, D] with D >= 1."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(x.shape)}")
    if x.size(1) == 0:
        raise ValueError(f"{name} must have D >= 1 features, got shape {tuple(x.shape)}")
    return x


def check_compatible(names: Iterable[str], tensors: Iterable[torch.Tensor]) -> None:
    """Same feature size D, dtype and device across the given embeddings."""
    names, tensors = list(names), list(tensors)
    first_name, first = names[0], tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.size(1) != first.size(1):
            raise ValueError(f"{name} has D={t.size(1)} features but {first_name} has D={first.size(1)}")
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def check_labels(name: str, labels: object, n: int, device: torch.device) -> torch.Tensor | None:
    """None, or an int64 tensor [n] on `device`."""
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int64 or None, got {type(labels).__name__}")
    if labels.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {labels.dtype}")
    if labels.dim() != 1 or labels.size(0) != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but the embeddings are on {device}")
    return labels


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """An integer in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_finite(name: str, value: object, *, positive: bool = False, non_negative: bool = False) -> float:
    """A finite real number (optionally > 0 or >= 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if non_negative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value  # type: ignore[return-value]


def check_group(name: str, group: object) -> None:
    """None, or a torch.distributed process group this process belongs to.

    ``new_group`` hands non-members the sentinel NON_GROUP_MEMBER (an int), so it is told
    apart from other non-groups to say what actually went wrong."""
    if group is None:
        return
    if not torch.distributed.is_available():
        raise RuntimeError(f"{name}= needs a PyTorch built with torch.distributed")
    if group is torch.distributed.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(f"{name}: this process is not a member of the given process group")
    if not isinstance(group, torch.distributed.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
