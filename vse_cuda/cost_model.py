"""A FLOP / byte cost model of the chunked engine's calls (DESIGN §8-9), and predicted times.

For a call (loss, N, D, dtype) the model takes the engine's tile plan from
:func:`vse_cuda._chunking.plan_chunks` (the same call the losses make, so a change of tile
sizes there moves the model too) and counts, per pass over the tiles:

* GEMM FLOPs: ``2·rows·cols·D`` per tile GEMM, i.e. ``2·N²·D`` per full similarity GEMM;
* DRAM/HBM bytes, each counted once per pass, as the fewest bytes the pass must move:
  the tile's A rows (``rows·D·e``) and B rows (``cols·D·e``, e the input's itemsize), the score
  tile written by the GEMM and read back by the fused reduction (``2·rows·cols·s``, s the score
  itemsize: 4 for half and float32 inputs, 8 for float64), per-row/column state and index lists,
  and the gradients.

Forward (every loss): one GEMM per tile plus its reduction pass. Backward:

* dense losses (unified, triplet "all"): each tile is recomputed (GEMM), G_c is formed in place
  (read the score tile, write G_c in the input dtype), then ``dA_c = G_c·B`` and ``dB += G_cᵀ·A_c``:
  ``3·2·N²·D`` FLOPs in all, plus the dB accumulator read and written (float32) once per tile;
* sparse losses (triplet "hardest"/"topk", quintuplet, GOAL): a gather/scatter over the saved
  index lists, ``(k + 2)·N`` non-zeros per direction, each moving one D-row in and out:
  ``2·2·(k + 2)·N·D`` FLOPs (negligible) and the rows' bytes.

Predicted time of a pass on a device: ``max(FLOPs / peak FLOP/s, bytes / bandwidth)`` (a
roofline per pass); a call's time is the sum over its passes. Launch overheads and cache reuse
are not modelled; on a CPU the "bandwidth" is the measured copy rate.

Eager InfoNCE (open_clip's ``ClipLoss`` pattern: ``logits = scale·img·txtᵀ``, cross-entropy of
the rows and of the columns, under bf16 autocast for half inputs) materializes N×N tensors; its
model counts the GEMM, the N² tensors written and read (logits in the input dtype,
log-softmax and gradients in float32) and the two backward GEMMs.

The model's numbers are predictions: benchmarks print them beside measurements as "model",
never in place of them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ._chunking import plan_chunks, score_bytes

#: Loss variants the model knows: (dense gradient?, embedding inputs, negatives listed per anchor).
LOSSES: dict[str, tuple[bool, int, int]] = {
    "triplet_hardest": (False, 2, 1),
    "triplet_all": (True, 2, 0),
    "triplet_topk": (False, 2, 0),  # k from the call
    "unified": (True, 2, 0),
    "quintuplet": (False, 6, 1),
    "goal": (False, 2, 1),
    "topk_similar": (False, 2, 0),  # forward only, k from the call
    "eager_infonce": (True, 2, 0),
}
_INDEX_BYTES = 8  # int64 index lists


@dataclass(frozen=True)
class Device:
    """Peak rates of a device: FLOP/s per input dtype of the GEMM, and memory bandwidth (B/s)."""

    name: str
    flops: dict[str, float]
    bandwidth: float
    note: str = ""

    def gemm_rate(self, dtype: torch.dtype) -> float:
        key = _dtype_name(dtype)
        if key not in self.flops:
            raise ValueError(f"device {self.name!r} has no GEMM rate for dtype {key}; it knows {sorted(self.flops)}")
        return self.flops[key]


#: Named devices. H200 rates: NVIDIA's datasheet (dense, no sparsity), and as measured on such a
#: machine of this workplace (8192³ bf16 GEMM 769-798 TFLOP/s, device copy ~4.3 TB/s; fp32 was not
#: measured there, so the datasheet's 67 TFLOP/s stands).
DEVICES: dict[str, Device] = {
    "h200": Device("h200", {"bfloat16": 990e12, "float16": 990e12, "float32": 67e12, "float64": 34e12}, 4.8e12,
                   "NVIDIA H200 SXM datasheet: dense bf16 ~990 TFLOP/s, fp32 ~67 TFLOP/s, HBM3e 4.8 TB/s"),
    "h200-measured": Device("h200-measured", {"bfloat16": 790e12, "float16": 790e12, "float32": 67e12,
                                              "float64": 34e12}, 4.3e12,
                            "H200 as measured here: bf16 GEMM ~790 TFLOP/s, copy ~4.3 TB/s (fp32, fp64: datasheet)"),
}


@dataclass(frozen=True)
class Pass:
    """One pass over the data: what it computes and moves."""

    name: str
    flops: float
    bytes: float

    def seconds(self, device: Device, dtype: torch.dtype) -> float:
        """Roofline: the larger of compute time and memory time."""
        gemm = self.flops / device.gemm_rate(dtype) if self.flops else 0.0
        return max(gemm, self.bytes / device.bandwidth)


@dataclass(frozen=True)
class Cost:
    """The modelled cost of one call: its tile plan and passes, forward and backward."""

    loss: str
    n: int
    dim: int
    dtype: torch.dtype
    rows: int
    cols: int
    forward: tuple[Pass, ...]
    backward: tuple[Pass, ...] = field(default=())

    @property
    def passes(self) -> tuple[Pass, ...]:
        return self.forward + self.backward

    @property
    def flops(self) -> float:
        return sum(p.flops for p in self.passes)

    @property
    def bytes(self) -> float:
        return sum(p.bytes for p in self.passes)

    @property
    def gemm_equivalents(self) -> float:
        """FLOPs in units of one full N×N×D GEMM (2·N²·D)."""
        return self.flops / (2.0 * self.n * self.n * self.dim)

    def seconds(self, device: Device | str) -> float:
        """Predicted seconds of the call (forward + backward) on ``device``."""
        device = get_device(device)
        return sum(p.seconds(device, self.dtype) for p in self.passes)


def get_device(device: Device | str) -> Device:
    """A :class:`Device`, or one of :data:`DEVICES` by name."""
    if isinstance(device, Device):
        return device
    if not isinstance(device, str):
        raise TypeError(f"device must be a Device or a name, got {type(device).__name__}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {sorted(DEVICES)} or a Device, got {device!r}")
    return DEVICES[device]


def gemm_cost(n: int, m: int, dim: int, dtype: torch.dtype) -> Cost:
    """One [n, D]×[D, m] GEMM writing its n×m output in the input dtype: the benchmarks' floor."""
    _check_shape(n, dim)
    e = _itemsize(dtype)
    p = Pass("gemm", 2.0 * n * m * dim, (n + m) * dim * e + n * m * e)
    return Cost("gemm", n, dim, dtype, n, m, (p,))


def loss_cost(loss: str, n: int, dim: int, dtype: torch.dtype = torch.float32, *, k: int = 1,
              row_chunk: int | None = None, backward: bool = True) -> Cost:
    """The modelled cost of ``loss`` on an [N, D] batch (forward, and backward unless
    ``backward=False``; ``topk_similar`` has no backward). ``k``: negatives per anchor of
    ``triplet_topk`` and the list length of ``topk_similar``. ``row_chunk``: the call's
    ``chunk_size`` (default: the engine's)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")
    _check_shape(n, dim)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if loss == "eager_infonce":
        return _eager_infonce(n, dim, dtype, backward)
    dense, inputs, listed = LOSSES[loss]
    listed = min(k, n) if loss in ("triplet_topk", "topk_similar") else listed
    chunks = plan_chunks(n, n, dtype, row_chunk)
    e, s = _itemsize(dtype), score_bytes(dtype)
    row_tiles, col_tiles = math.ceil(n / chunks.rows), math.ceil(n / chunks.cols)
    # Every tile reads its A rows and B rows: A once per column tile, B once per row tile.
    inputs_read = (col_tiles + row_tiles) * n * dim * e
    tile_bytes = n * n * s  # the whole S, summed over tiles
    state = 2 * n * max(listed, 1) * (s + _INDEX_BYTES)  # per-row and per-column state / lists
    forward = [Pass("forward: tile GEMMs + fused reduction", 2.0 * n * n * dim,
                    inputs_read + 2 * tile_bytes + state)]
    if loss == "quintuplet":  # the four offline row-wise dot products read four more [N, D]
        forward.append(Pass("forward: offline scores", 4 * 2.0 * n * dim, 4 * n * dim * e))
    if loss == "topk_similar" or not backward:
        return Cost(loss, n, dim, dtype, chunks.rows, chunks.cols, tuple(forward))
    grads = inputs * n * dim * e  # every gradient written once
    if dense:
        acc = row_tiles * n * dim * 4 * 2  # dB accumulator (float32) read and written per row tile
        back = [Pass("backward: recompute tiles", 2.0 * n * n * dim, inputs_read + tile_bytes),
                Pass("backward: form G in place", 0.0, tile_bytes + n * n * e + state),
                Pass("backward: dA = G·B, dB += Gᵀ·A", 2 * 2.0 * n * n * dim,
                     2 * n * n * e + inputs_read + acc + grads)]
    else:
        nnz = 2 * (max(listed, 1) + 2) * n  # both directions: negatives + the diagonal
        back = [Pass("backward: gather/scatter over the saved lists", 2 * 2.0 * nnz * dim,
                     nnz * _INDEX_BYTES + 2 * nnz * dim * e + (inputs - 2) * n * dim * e + grads)]
    return Cost(loss, n, dim, dtype, chunks.rows, chunks.cols, tuple(forward), tuple(back))


def _eager_infonce(n: int, dim: int, dtype: torch.dtype, backward: bool) -> Cost:
    """open_clip's ClipLoss pattern, materialized: logits (input dtype) = scale·img·txtᵀ, then
    cross-entropy over rows and over columns in float32 (autocast runs it in float32)."""
    e, f = _itemsize(dtype), 4 if dtype != torch.float64 else 8
    nn = float(n) * n
    forward = [Pass("eager: logits GEMM", 2.0 * nn * dim, 2 * n * dim * e + nn * e),
               Pass("eager: scale", 0.0, 2 * nn * e),
               Pass("eager: log_softmax both ways (saved, float32)", 0.0, 2 * (nn * e + nn * f))]
    if not backward:
        return Cost("eager_infonce", n, dim, dtype, n, n, tuple(forward))
    back = [Pass("eager: softmax gradient both ways", 0.0, 2 * (nn * f + nn * f)),
            Pass("eager: sum, cast and scale the gradient", 0.0, 2 * nn * f + nn * f + nn * e + 2 * nn * e),
            Pass("eager: dA = G·B, dB = Gᵀ·A", 2 * 2.0 * nn * dim, 2 * nn * e + 4 * n * dim * e)]
    return Cost("eager_infonce", n, dim, dtype, n, n, tuple(forward), tuple(back))


def measure_cpu_device(*, gemm_size: int = 1024, copy_mib: int = 256, repeats: int = 5) -> Device:
    """A "cpu-here" :class:`Device` whose rates are measured now: the median of ``repeats``
    ``torch.mm`` of [gemm_size]² in float32 and bfloat16, and a ``copy_mib`` MiB tensor copy
    (bytes read + written per second)."""
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(gemm_size, gemm_size).to(dtype)
        b = torch.randn(gemm_size, gemm_size).to(dtype)
        out = torch.empty(gemm_size, gemm_size, dtype=dtype)
        seconds = _median_time(lambda: torch.mm(a, b, out=out), repeats)
        rates[_dtype_name(dtype)] = 2.0 * gemm_size ** 3 / seconds
    rates["float16"] = rates["bfloat16"]
    rates["float64"] = rates["float32"] / 2
    src = torch.randn(copy_mib * 2**20 // 4)
    dst = torch.empty_like(src)
    seconds = _median_time(lambda: dst.copy_(src), repeats)
    return Device("cpu-here", rates, 2 * src.numel() * 4 / seconds,
                  f"measured now: torch.mm {gemm_size}³, copy {copy_mib} MiB, {torch.get_num_threads()} threads")


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _check_shape(n: object, dim: object) -> None:
    for name, value in (("n", n), ("dim", dim)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _itemsize(dtype: object) -> int:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return dtype.itemsize


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
