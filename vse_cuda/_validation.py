"""Input checks shared by every public function (DESIGN §6): each failure raises
ValueError/TypeError naming the argument and what was expected."""

from __future__ import annotations

import numbers
from typing import Iterable

import torch

try:  # numpy registers its scalars with numbers.Real, but its bool is no number here either
    from numpy import bool_ as np_bool
except ImportError:  # pragma: no cover - numpy ships with torch's usual installs
    np_bool = bool

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Largest value of an ``int`` schema argument of the ops (a C++ int64_t).
INT64_MAX = 2**63 - 1


def check_strided(name: str, x: torch.Tensor) -> None:
    """A dense (strided) tensor: the kernels read raw memory, so sparse COO/CSR and mkldnn
    layouts are refused here by name instead of failing deep in the dispatcher."""
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")


def check_has_data(name: str, x: torch.Tensor, why: str) -> None:
    """Not a meta tensor: a function whose checks or results need values (counts, ranges,
    recalls) cannot run on shapes alone, so it says so instead of failing in ``.item()``."""
    if x.device.type == "meta":
        raise ValueError(f"{name} is on meta, which holds no data, but {why}")


def check_embeddings(name: str, x: object) -> torch.Tensor:
    """A floating 2-D tensor [N, D] with D >= 1."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    check_strided(name, x)
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
    check_strided(name, labels)
    if labels.dim() != 1 or labels.size(0) != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but the embeddings are on {device}")
    return labels


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """An integer in [low, high]; ``high`` defaults to INT64_MAX, the most an op's int64
    argument holds (a larger Python int would fail in the dispatcher's argument cast)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if high is not None and not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if value > INT64_MAX:
        raise ValueError(f"{name} must be <= 2**63 - 1 (an int64), got {value}")
    return value


def check_finite(name: str, value: object, *, positive: bool = False, non_negative: bool = False) -> float:
    """A finite real number (optionally > 0 or >= 0), returned as a Python float.

    Accepted: any ``numbers.Real`` (int, float, fractions.Fraction, numpy integer and floating
    scalars such as numpy.float32) and torch.SymInt/SymFloat (what torch.compile(dynamic=True)
    passes for a number). Refused: bools (a flag is not a number here) and tensors, 0-dim
    included: the ops take a constant, so a tensor's gradient would be cut silently.
    Finite means ``value - value == 0`` (false for NaN and ±inf). While torch.compile traces,
    only the type is checked: a raise would end the trace in dynamo's "Unsupported", so the op
    checks the value when the graph runs and raises the same ValueError
    (csrc/common/loss_args.h checked_option)."""
    if isinstance(value, (bool, np_bool)) or not isinstance(value, (numbers.Real, torch.SymInt, torch.SymFloat)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not isinstance(value, (torch.SymInt, torch.SymFloat)):
        value = float(value)
    if torch.compiler.is_compiling():
        return value  # a raise would end the trace: the op checks the value (loss_args.h checked_option)
    if not value - value == 0:
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if non_negative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_scalar_tensor(name: str, value: object, *, device: torch.device | None = None,
                        positive: bool = False) -> object:
    """A real number (as :func:`check_finite`) or a 0-dim floating-point tensor on the CPU or
    on ``device`` (any device when None), such as a learnable temperature: a tensor is returned
    as it is, so autograd reaches it. Its value is checked here too, except while torch.compile
    traces (reading a value would break the graph); the op then checks it."""
    if not isinstance(value, torch.Tensor):
        return check_finite(name, value, positive=positive)
    if value.dim() != 0 or value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a real number or a 0-dim floating-point tensor, "
                        f"got a {value.dtype} tensor of shape {tuple(value.shape)}")
    check_strided(name, value)
    if device is not None and value.device.type != "cpu" and value.device != device:
        raise ValueError(f"{name} is on {value.device} but the embeddings are on {device}")
    if value.device.type != "meta" and not torch.compiler.is_compiling():
        check_finite(name, float(value.detach()), positive=positive)
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
