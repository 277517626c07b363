"""Forward + backward of every vse_cuda loss against the GEMM floor, the eager oracle and
pytorch-metric-learning (DESIGN §8: triplet hardest ≤ 1.3× one GEMM, ≥ 5× faster than the
oracle with ≤ 1/20 of its extra memory; unified no slower than the oracle with ≤ 1/20 of its
extra memory; N=131072, D=128 triplet hardest within 1.5 GB extra peak memory).

Every call measured is ``loss = f(img, txt, ...); loss.backward()`` on L2-normalized seeded
Gaussian inputs with ``requires_grad=True`` (all six inputs for the quintuplet loss). Methods,
each (method, configuration) in a fresh process through ``_harness.run_isolated``:

- ``gemm_floor``: one ``torch.mm(img, txt.T, out=S)`` of the same shape [N, D] × [D, N] in the
  same dtype (no autograd), measured once per (N, D, dtype): the floor every method pays at
  least once. S is allocated and touched outside the timed call, so the floor is the GEMM's
  compute alone (allocating and first-touching a fresh N×N output adds 10–35 % on a 2-core
  machine at D=256, which would flatter every "× GEMM" ratio);
- ``gemm_floor_tiled`` (the N=131072 configuration, where S would need 64 GiB): the same GEMM
  in the engine's tiles (``plan_chunks``), ``torch.mm`` into one preallocated, touched tile;
- ``vse_cuda``: the fused op (``vse_cuda.triplet_loss`` etc., default memory budget);
- ``oracle``: ``vse_cuda.reference.<loss>``, the materialized eager PyTorch oracle (for
  ``unified_label_positives``, whose oracle is N³, the O(N²) eager form ``eager_label_positives``);
- ``pml_triplet_bh`` (beside triplet hardest): pytorch-metric-learning
  ``TripletMarginLoss(margin=0.2)`` with ``miners.BatchHardMiner()``, and ``pml_ntxent``
  (beside unified, which runs with margin=0, scale=20 = 1/0.05): ``NTXentLoss(temperature=0.05)``,
  both on ``embeddings = cat(img, txt)``, ``labels = cat(arange(N), arange(N))``, their natural
  use for paired data. They are *not* the same losses (see ``PEER_NOTES``); float32 only.

The fused loss and gradients are checked against the oracle's (relative differences); a
difference above the tolerance marks the row WRONG and makes the script exit with status 1.

Cases that cannot finish are not started, never silently: an oracle or peer case whose time,
extrapolated (∝ N²) from the same case at the next smaller N, exceeds ``--max-case-seconds``,
or whose memory, extrapolated likewise (or, for NT-Xent, from its [2N, 2N·(2N−2)] mask),
exceeds ``--mem-fraction`` of the memory available, or that failed at a smaller N, is recorded
as "skipped" with the reason. Repeats adapt to the predicted time (``--case-budget``): long
cases run once, without the unmeasured warm-up (every case first runs its method once on a
64-row input, so libraries and thread pools are initialized either way).

Usage (from the repository root)::

    python benchmarks/bench_losses.py             # the DESIGN §8 grid (≈ 40 min on 2 cores)
    python benchmarks/bench_losses.py --quick     # smoke run, tiny sizes
    python benchmarks/bench_losses.py --losses triplet_hardest unified --sizes 1024 4096 --dims 256

Writes ``<out-dir>/losses.csv``, ``losses.md`` and ``losses.png`` (``losses_quick.*`` with
``--quick``, so a smoke run never overwrites the real tables). CSV and Markdown are rewritten
after every configuration, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from _harness import Measurement, available_memory_bytes, machine_info, malloc_trim, run_isolated
from _report import (add_common_arguments, div, fmt, heading, log_log, new_parser, parse_profile, print_written,
                     pyplot, run_line, run_saving_each, save_figure, start_run, status_cell, table, write_csv)

_MiB = 2**20
_GiB = 2**30

#: The loss variants: vse_cuda / reference function, its keywords, the number of [N, D] inputs,
#: whether its gradient w.r.t. S is dense (all N² entries) and the peer method beside it.
VARIANTS: dict[str, dict[str, Any]] = {
    "triplet_hardest": {"fn": "triplet_loss", "kwargs": {"margin": 0.2, "mining": "hardest"},
                        "inputs": 2, "dense": False, "peer": "pml_triplet_bh"},
    "triplet_all": {"fn": "triplet_loss", "kwargs": {"margin": 0.2, "mining": "all"},
                    "inputs": 2, "dense": True, "peer": None},
    "triplet_topk10": {"fn": "triplet_loss", "kwargs": {"margin": 0.2, "mining": "topk", "k": 10},
                       "inputs": 2, "dense": False, "peer": None},
    "unified": {"fn": "unified_loss", "kwargs": {"scale": 20.0, "margin": 0.0},
                "inputs": 2, "dense": True, "peer": "pml_ntxent"},
    # The same with a learnable temperature: the forward also accumulates ∂L/∂γ.
    "unified_learned_scale": {"fn": "unified_loss", "kwargs": {"scale": torch.tensor(20.0, requires_grad=True),
                                                                "margin": 0.0},
                              "inputs": 2, "dense": True, "peer": None},
    "siglip": {"fn": "siglip_loss", "kwargs": {"scale": 10.0, "bias": -10.0}, "inputs": 2, "dense": True,
               "peer": None},
    # Five captions per image as positives (labels = arange(N) // 5). The oracle materializes
    # N × N × N, so the eager baseline is the O(N²) form a user would write (eager_label_positives).
    "unified_label_positives": {"fn": "unified_loss", "kwargs": {"scale": 20.0, "margin": 0.0,
                                                                 "label_positives": True},
                                "inputs": 2, "dense": True, "peer": None, "captions_per_image": 5,
                                "eager": "eager_label_positives"},
    "quintuplet": {"fn": "quintuplet_loss", "kwargs": {}, "inputs": 6, "dense": False, "peer": None},
    "goal_nca_sigms": {"fn": "goal_loss", "kwargs": {"triplet_weight": "nca", "pair_weight": "sig_ms"},
                       "inputs": 2, "dense": False, "peer": None},
    "goal_con_con": {"fn": "goal_loss", "kwargs": {"triplet_weight": "con", "pair_weight": "con"},
                     "inputs": 2, "dense": False, "peer": None},
}
#: Variants also measured in bfloat16 (DESIGN §8 grid); the others run in float32 only.
BF16_VARIANTS = ("triplet_hardest", "unified", "unified_learned_scale", "siglip", "unified_label_positives")
PEERS = ("pml_triplet_bh", "pml_ntxent")
METHODS = ("gemm_floor", "vse_cuda", "oracle", "peer")
PEER_NOTES = {
    "pml_triplet_bh": (
        "pytorch-metric-learning `TripletMarginLoss(margin=0.2)` + `miners.BatchHardMiner()` on the 2N "
        "embeddings `cat(img, txt)` with labels `cat(arange(N), arange(N))`: Euclidean distance of the "
        "(re-)normalized embeddings, for each of the 2N anchors its one positive (the paired item) and its "
        "hardest negative among all 2N−2 others, *the same modality included*, hinge averaged over the "
        "non-zero triplets. Not the identical loss: VSE++ (triplet hardest) uses inner products, only "
        "cross-modal negatives and a sum. Its 2N×2N distance matrix is built twice (miner, loss)."),
    "pml_ntxent": (
        "pytorch-metric-learning `NTXentLoss(temperature=0.05)` on `cat(img, txt)` with labels "
        "`cat(arange(N), arange(N))`: cosine similarity / 0.05, for each of the 2N anchors a softmax of its "
        "positive against all 2N−2 negatives, *the same modality included*, averaged over the 2N positive "
        "pairs. Not the identical loss: unified with margin 0 and scale 20 is the symmetric InfoNCE over "
        "cross-modal negatives only, summed. Its implementation builds a [2N, 2N·(2N−2)] mask, so its "
        "memory grows as 8N³ elements."),
}
#: (loss relative difference, gradient relative Frobenius difference) accepted against the oracle.
TOLERANCE = {"float32": (1e-4, 1e-3), "bfloat16": (2e-2, 2e-2)}
#: DESIGN §8 thresholds.
TARGET_GEMM_RATIO = 1.3
TARGET_SPEEDUP = 5.0
TARGET_MEM_FRACTION = 1 / 20
TARGET_BIG_BYTES = 1.5e9

DEFAULTS = {"sizes": [1024, 4096, 8192, 16384], "dims": [256, 1024], "dtypes": ["float32", "bfloat16"],
            "peer_sizes": [256], "big": [131072, 128], "repeats": 3}
#: The smoke run measures the two variants with peers and bfloat16 (a sparse- and a dense-gradient
#: loss) in 14 cases of ~2-3 s each, mostly interpreter start-up; every variant in both dtypes is
#: still run and checked against the oracle by the in-process preflight.
QUICK = {"sizes": [128], "dims": [32], "dtypes": ["float32", "bfloat16"], "peer_sizes": [],
         "big": [4096, 16], "repeats": 2, "losses": ["triplet_hardest", "unified"]}
PRIME_ROWS = 64


# ------------------------------------------------------------------------- child side: cases

def make_inputs(n: int, dim: int, count: int, dtype: str, seed: int, grad: bool = True) -> list[torch.Tensor]:
    """``count`` seeded L2-normalized Gaussian [n, dim] tensors in ``dtype`` (leaf tensors)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        x = torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=1).to(getattr(torch, dtype))
        out.append(x.requires_grad_(grad))
    return out


def eager_label_positives(img: torch.Tensor, txt: torch.Tensor, *, scale: float, margin: float,
                          labels: torch.Tensor, label_positives: bool) -> torch.Tensor:
    """unified_loss(label_positives=True) in eager PyTorch with O(N²) memory: per anchor the
    log-sum-exp Λ_i over its negatives, then the mean over its positives p of
    softplus(Λ_i + γ(S_ii − S_ip)) (csrc/common/unified.h derives it). Half inputs are computed
    in float32, as the oracle computes them."""
    import vse_cuda.reference

    assert label_positives
    compute = vse_cuda.reference.compute_dtype(img.dtype)
    S = img.to(compute) @ txt.to(compute).T
    same = labels[:, None] == labels[None, :]

    def direction(S: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
        positive = S.diagonal()[:, None]
        lse = torch.logsumexp((scale * (S - positive + margin)).masked_fill(same, float("-inf")), dim=1)
        terms = torch.nn.functional.softplus(lse[:, None] + scale * (positive - S)).masked_fill(~same, 0.0)
        return (terms.sum(1) / same.sum(1)).sum()

    return (direction(S, same) + direction(S.T, same.T)).to(img.dtype)


EAGER = {"eager_label_positives": eager_label_positives}


def loss_function(method: str, variant: str) -> Callable[..., torch.Tensor]:
    """``f(*inputs) -> loss`` of ``method`` for ``variant``."""
    spec = VARIANTS[variant]
    if method in ("vse_cuda", "oracle"):
        import vse_cuda
        import vse_cuda.reference

        module = vse_cuda if method == "vse_cuda" else vse_cuda.reference
        fn, kwargs = getattr(module, spec["fn"]), spec["kwargs"]
        if method == "oracle" and "eager" in spec:
            fn = EAGER[spec["eager"]]
        if "captions_per_image" in spec:
            per_image = spec["captions_per_image"]
            return lambda *xs: fn(*xs, labels=torch.arange(xs[0].shape[0]) // per_image, **kwargs)
        return lambda *xs: fn(*xs, **kwargs)
    if method == "pml_triplet_bh":
        from pytorch_metric_learning import losses, miners

        loss_fn, miner = losses.TripletMarginLoss(margin=0.2), miners.BatchHardMiner()

        def triplet_bh(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
            emb = torch.cat([img, txt])
            labels = torch.arange(img.shape[0]).repeat(2)
            return loss_fn(emb, labels, miner(emb, labels))

        return triplet_bh
    if method == "pml_ntxent":
        from pytorch_metric_learning import losses

        ntxent = losses.NTXentLoss(temperature=0.05)

        def nt_xent(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
            return ntxent(torch.cat([img, txt]), torch.arange(img.shape[0]).repeat(2))

        return nt_xent
    raise ValueError(f"unknown method {method!r}")


def forward_backward(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``loss = fn(*inputs); loss.backward()``; returns (loss, *gradients) and clears ``.grad``."""
    loss = fn(*inputs)
    loss.backward()
    grads = tuple(x.grad for x in inputs)
    for x in inputs:
        x.grad = None
    return (loss.detach(), *grads)


def _exact_first_measured_call(fn: Callable[[], Any], warmup: int) -> Callable[[], Any]:
    """Wrap the measured call so that the harness's extra-peak figure is exact for the first
    measured call.

    ``_harness`` reports peak RSS during a call minus RSS before it (the max over the measured
    calls). glibc keeps memory freed by earlier calls (the warm-up's temporaries and gradients,
    below its mmap threshold of up to 32 MiB) resident in its heap, and a later call reuses it
    without RSS growing, so a call after a warm-up under-reports. Hence: after the last warm-up
    (or at the end of setup when there is none) its result is kept alive, not freed, and
    ``malloc_trim`` returns every free heap page to the kernel; the first measured call then
    starts from a clean heap and its peak counts everything it allocates. Later measured calls
    run on a warm heap as a training loop does (their median time is the headline; the first
    measured call pays the page faults, which the median ignores when there are 3 calls).
    """
    state: dict[str, Any] = {"calls": 0, "keep": None}

    def call() -> Any:
        out = fn()
        state["calls"] += 1
        if state["calls"] == warmup:
            state["keep"] = out
            malloc_trim()
        return out

    if warmup == 0:
        malloc_trim()
    return call


def make_case(method: str, variant: str, n: int, dim: int, dtype: str, seed: int,
              warmup: int = 1) -> Callable[[], Any]:
    """Harness factory: builds the inputs, runs the method once on a tiny batch (library and
    thread-pool initialization), and returns the call to measure (``warmup``: the harness's
    unmeasured calls, see :func:`_exact_first_measured_call`)."""
    return _exact_first_measured_call(_make_call(method, variant, n, dim, dtype, seed), warmup)


def _make_call(method: str, variant: str, n: int, dim: int, dtype: str, seed: int) -> Callable[[], Any]:
    if method == "gemm_floor":
        a, b = make_inputs(n, dim, 2, dtype, seed, grad=False)
        out = torch.zeros(n, n, dtype=a.dtype)  # allocated and touched here, outside the call
        torch.mm(a[:PRIME_ROWS], b[:PRIME_ROWS].T)

        def gemm() -> None:
            torch.mm(a, b.T, out=out)

        return gemm
    if method == "gemm_floor_tiled":
        from vse_cuda._chunking import plan_chunks

        a, b = make_inputs(n, dim, 2, dtype, seed, grad=False)
        chunks = plan_chunks(n, n, a.dtype)
        tile = torch.zeros(chunks.rows, chunks.cols, dtype=a.dtype)

        def gemm_tiled() -> None:
            for r0 in range(0, n, chunks.rows):
                rows = a[r0:r0 + chunks.rows]
                for c0 in range(0, n, chunks.cols):
                    cols = b[c0:c0 + chunks.cols]
                    torch.mm(rows, cols.T, out=tile[:rows.shape[0], :cols.shape[0]])

        return gemm_tiled
    fn = loss_function(method, variant)
    count = VARIANTS[variant]["inputs"]
    forward_backward(fn, make_inputs(min(n, PRIME_ROWS), dim, count, dtype, seed + 1))
    inputs = make_inputs(n, dim, count, dtype, seed)
    return lambda: forward_backward(fn, inputs)


# ------------------------------------------------------------------------ parent side: plan

def plan_configs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """(n, dim, dtype, variant, big) of every configuration, N ascending (so that each case can be
    extrapolated from the same case at a smaller N)."""
    configs = []
    for n in sorted(set(args.sizes) | set(args.peer_sizes)):
        peer_only = n not in args.sizes
        for dim in args.dims:
            for dtype in args.dtypes:
                for variant in args.losses:
                    if dtype != "float32" and variant not in BF16_VARIANTS:
                        continue
                    if peer_only and (dtype != "float32" or VARIANTS[variant]["peer"] is None):
                        continue
                    configs.append({"n": n, "dim": dim, "dtype": dtype, "variant": variant, "big": False})
    if args.big and "triplet_hardest" in args.losses:
        configs.append({"n": args.big[0], "dim": args.big[1], "dtype": "float32", "variant": "triplet_hardest",
                        "big": True})
    return configs


class Runner:
    """Runs the cases of every configuration, keeps the history used for skips and repeats."""

    def __init__(self, args: argparse.Namespace, tmp: Path):
        self.args = args
        self.tmp = tmp
        self.history: dict[tuple, list[tuple[int, Measurement]]] = {}
        self.floors: dict[tuple, dict[str, Any]] = {}
        self.rows: list[dict[str, Any]] = []

    # -------------------------------------------------------------- predictions and skips

    def _previous(self, key: tuple, n: int) -> tuple[int, Measurement] | None:
        before = [(m_n, m) for m_n, m in self.history.get(key, []) if m_n < n]
        return max(before, key=lambda item: item[0]) if before else None

    def predict(self, key: tuple, n: int) -> tuple[float | None, float | None, str]:
        """(seconds per call, extra peak bytes, basis) extrapolated ∝ N² from the same case at the
        largest smaller N measured ok; Nones when there is none."""
        prev = self._previous(key, n)
        if prev is None or not prev[1].ok:
            return None, None, ""
        m_n, m = prev
        scale = (n / m_n) ** 2
        return m.median_s * scale, m.extra_peak_bytes * scale, f"N={m_n}: {m.median_s:.3g} s, " \
            f"{m.extra_peak_mib:.0f} MiB"

    def skip_reason(self, method: str, key: tuple, n: int) -> str:
        """Why an oracle or peer case is not started (empty: run it). vse_cuda and the floor
        always run."""
        if method in ("vse_cuda", "gemm_floor"):
            return ""
        prev = self._previous(key, n)
        if prev is not None and not prev[1].ok:
            return f"{prev[1].status} at N={prev[0]}, so not tried at a larger N"
        available = available_memory_bytes()
        limit = None if available is None else self.args.mem_fraction * available
        if method == "pml_ntxent":
            # n_per_p = (a2[None] == a1[:, None]) is [2N, 2N(2N-2)]; with the masked copies and
            # exp() about 16 bytes per element are alive at once.
            need = 16.0 * (2 * n) * (2 * n) * (2 * n - 2)
            if limit is not None and need > limit:
                return (f"its [2N, 2N(2N−2)] mask needs ≈ {need / _GiB:.0f} GiB, over {self.args.mem_fraction:g} "
                        f"of the {available / _GiB:.1f} GiB available")
        seconds, extra, basis = self.predict(key, n)
        if seconds is not None and seconds > self.args.max_case_seconds:
            return (f"predicted ≈ {seconds:.0f} s per call (∝ N² from {basis}) > "
                    f"--max-case-seconds {self.args.max_case_seconds:g}")
        if extra is not None and limit is not None and extra > limit:
            return (f"predicted ≈ {extra / _GiB:.1f} GiB extra (∝ N² from {basis}) > {self.args.mem_fraction:g} "
                    f"of the {available / _GiB:.1f} GiB available")
        return ""

    def calls(self, seconds: float | None, big: bool) -> tuple[int, int]:
        """(warm-up calls, measured calls) for a case predicted to take ``seconds`` per call."""
        if big:
            return 0, 1
        if seconds is None:
            return self.args.warmup, self.args.repeats
        budget = self.args.case_budget
        repeats = max(1, min(self.args.repeats, int(budget // max(seconds, 1e-9))))
        warmup = self.args.warmup if seconds * (repeats + self.args.warmup) <= budget else 0
        return warmup, repeats

    # -------------------------------------------------------------------------- measuring

    def measure(self, method: str, variant: str, n: int, dim: int, dtype: str, big: bool,
                save: Path | None) -> tuple[Measurement, float, tuple[int, int]]:
        key = (variant if method != "gemm_floor" else "-", method, dim, dtype)
        reason = self.skip_reason(method, key, n)
        load = os.getloadavg()[0]
        if reason:
            m = Measurement("skipped", detail=reason)
            calls = (0, 0)
        else:
            seconds, _, _ = self.predict(key, n)
            if seconds is None and method == "vse_cuda":  # from the floor, for repeats only
                floor = self.floors.get((n, dim, dtype))
                if floor and floor["m"].ok:
                    seconds = floor["m"].median_s * (4 if VARIANTS[variant]["dense"] else 1.5)
            calls = self.calls(seconds, big)
            case_method = method if method != "gemm_floor" or not big else "gemm_floor_tiled"
            m = run_isolated("bench_losses:make_case",
                             {"method": case_method, "variant": variant, "n": n, "dim": dim, "dtype": dtype,
                              "seed": self.args.seed, "warmup": calls[0]},
                             repeats=calls[1], warmup=calls[0], threads=self.args.threads,
                             timeout_s=self.args.timeout, save_result=save)
        self.history.setdefault(key, []).append((n, m))
        label = f"N={n} D={dim} {dtype} {variant if method != 'gemm_floor' else ''} {method}"
        print(f"[bench_losses] {label}: {m.status} {fmt(m.median_s, '.4g')} s, extra peak "
              f"{fmt(m.extra_peak_mib, '.0f')} MiB, {calls[0]}+{calls[1]} calls {m.detail}", flush=True)
        return m, load, calls

    def floor(self, n: int, dim: int, dtype: str, big: bool) -> dict[str, Any]:
        key = (n, dim, dtype)
        if key not in self.floors:
            m, load, calls = self.measure("gemm_floor", "triplet_hardest", n, dim, dtype, big, None)
            self.floors[key] = {"m": m, "load": load, "calls": calls,
                                "method": "gemm_floor_tiled" if big else "gemm_floor"}
        return self.floors[key]

    def run_config(self, cfg: dict[str, Any]) -> None:
        n, dim, dtype, variant, big = cfg["n"], cfg["dim"], cfg["dtype"], cfg["variant"], cfg["big"]
        methods = self.args.methods
        floor = self.floor(n, dim, dtype, big) if "gemm_floor" in methods else None
        wanted = ["vse_cuda"] if big else [m for m in ("vse_cuda", "oracle", "peer") if m in methods]
        measured: dict[str, tuple[Measurement, float, tuple[int, int]]] = {}
        saved: dict[str, Path] = {}
        for method in wanted:
            if method == "peer":
                peer = VARIANTS[variant]["peer"]
                if peer is None:
                    continue
                if dtype != "float32":
                    measured[peer] = (Measurement("skipped", detail="peers are measured in float32 only"),
                                      os.getloadavg()[0], (0, 0))
                    continue
                method = peer
            save = None
            if method in ("vse_cuda", "oracle"):
                save = saved[method] = self.tmp / f"{method}.pt"
            key_method = method
            measured[key_method] = self.measure(method, variant, n, dim, dtype, big, save)
        check = self.check(saved, measured, dtype)
        for path in saved.values():
            path.unlink(missing_ok=True)
        fused = measured.get("vse_cuda", (None,))[0]
        fused_ok = fused is not None and fused.ok
        floor_s = floor["m"].median_s if floor and floor["m"].ok else None
        # the gradients every method must return: inputs × N × D in the input dtype
        grad_bytes = VARIANTS[variant]["inputs"] * n * dim * getattr(torch, dtype).itemsize
        fused_work = max(fused.extra_peak_bytes - grad_bytes, 0) if fused_ok else None
        entries = list(measured.items())
        if floor is not None:
            entries.insert(0, (floor["method"], (floor["m"], floor["load"], floor["calls"])))
        for method, (m, load, calls) in entries:
            grads = 0 if method.startswith("gemm_floor") else grad_bytes
            work = None if m.extra_peak_bytes is None else max(m.extra_peak_bytes - grads, 0)
            row = {"variant": variant, "n": n, "dim": dim, "dtype": dtype, "threads": self.args.threads,
                   "method": method, "status": m.status, "detail": m.detail, "seconds": m.median_s,
                   "all_seconds": m.seconds, "cpu_seconds": m.median_cpu_s, "warmup": calls[0],
                   "repeats": calls[1], "extra_peak_mib": m.extra_peak_mib, "load_before": load,
                   "x_gemm": div(m.median_s, floor_s),
                   "x_fused": div(m.median_s, fused.median_s if fused and fused.ok else None),
                   "mem_x_fused": div(m.extra_peak_bytes, fused.extra_peak_bytes if fused_ok else None),
                   "grad_mib": grads / _MiB, "working_mib": None if work is None else work / _MiB,
                   "work_x_fused": div(work, fused_work),
                   "loss_rel_diff": None, "grad_rel_diff": None}
            if method == "vse_cuda" and check is not None:
                row["loss_rel_diff"], row["grad_rel_diff"] = check
                tol_loss, tol_grad = TOLERANCE.get(dtype, TOLERANCE["bfloat16"])
                if not (check[0] <= tol_loss and check[1] <= tol_grad):  # also catches NaN
                    row["status"] = "WRONG"
                    row["detail"] = (f"differs from the oracle: loss {check[0]:.2e} (tol {tol_loss:g}), "
                                     f"gradients {check[1]:.2e} (tol {tol_grad:g})")
            self.rows.append(row)

    @staticmethod
    def check(saved: dict[str, Path], measured: dict, dtype: str) -> tuple[float, float] | None:
        """(|Δloss| / |loss|, ‖Δgrad‖ / ‖grad‖ over all inputs) of vse_cuda against the oracle."""
        if not all(method in measured and measured[method][0].ok and saved[method].exists()
                   for method in ("vse_cuda", "oracle")):
            return None
        got, ref = torch.load(saved["vse_cuda"]), torch.load(saved["oracle"])
        loss, ref_loss = got[0].double(), ref[0].double()
        loss_diff = ((loss - ref_loss).abs() / ref_loss.abs().clamp_min(1e-30)).item()
        num = sum(((g.double() - r.double()) ** 2).sum() for g, r in zip(got[1:], ref[1:]))
        den = sum((r.double() ** 2).sum() for r in ref[1:])
        grad_diff = (num.sqrt() / den.sqrt().clamp_min(1e-30)).item()
        return loss_diff, grad_diff


def preflight(variants: list[str], dtypes: list[str], seed: int) -> None:
    """Run every variant (forward + backward), fused and oracle, on a 16-row batch in this process
    and compare the losses, so that a broken configuration fails in a second, not mid-run."""
    for variant in variants:
        for dtype in dtypes:
            if dtype != "float32" and variant not in BF16_VARIANTS:
                continue
            count = VARIANTS[variant]["inputs"]
            got = forward_backward(loss_function("vse_cuda", variant), make_inputs(16, 8, count, dtype, seed))
            ref = forward_backward(loss_function("oracle", variant), make_inputs(16, 8, count, dtype, seed))
            tol = TOLERANCE.get(dtype, TOLERANCE["bfloat16"])[0] * 10
            if not torch.allclose(got[0].double(), ref[0].double(), rtol=tol, atol=tol):
                raise SystemExit(f"[bench_losses] preflight: {variant} {dtype}: vse_cuda loss {got[0].item():.6g} "
                                 f"!= oracle {ref[0].item():.6g}")


# ------------------------------------------------------------------------------- reports

#: One line per (configuration, method); the GEMM floor is repeated for every variant.
CSV_FIELDS = ["variant", "n", "dim", "dtype", "threads", "method", "status", "seconds", "x_gemm", "x_fused",
              "cpu_seconds", "extra_peak_mib", "mem_x_fused", "grad_mib", "working_mib", "work_x_fused",
              "loss_rel_diff", "grad_rel_diff", "warmup", "repeats", "load_before", "all_seconds", "detail"]


def _find(rows: list[dict[str, Any]], variant: str, n: int, dim: int, dtype: str, method: str) -> dict | None:
    return next((r for r in rows if r["variant"] == variant and r["n"] == n and r["dim"] == dim
                 and r["dtype"] == dtype and r["method"] == method), None)


def _verdict(ok: bool) -> str:
    return "**PASS**" if ok else "**FAIL**"


def _mem_verdict(fused_mib: float | None, ratio: float | None) -> str:
    """PASS/FAIL of "fused extra memory ≤ 1/20 of the oracle's"; n/a where fused's extra peak is
    below the 1 MiB that RSS resolves (tiny sizes), as the ratio is then meaningless."""
    if fused_mib is None or fused_mib < 1:
        return "n/a (fused < 1 MiB)"
    return _verdict(ratio is not None and ratio >= 1 / TARGET_MEM_FRACTION)


def targets_section(rows: list[dict[str, Any]], big: list[int] | None) -> list[str]:
    """DESIGN §8 targets, each with the measured figure."""
    lines = ["## DESIGN §8 targets", ""]
    fused = _find(rows, "triplet_hardest", 8192, 1024, "float32", "vse_cuda")
    oracle = _find(rows, "triplet_hardest", 8192, 1024, "float32", "oracle")
    head = "Triplet hardest, N=8192, D=1024, float32, forward+backward"
    if fused is None or fused["status"] != "ok":
        lines.append(f"- {head}: not measured in this run"
                     + (f" ({fused['status']}: {fused['detail']})" if fused else "") + ".")
    else:
        x_gemm = fused["x_gemm"]
        lines.append(f"- {head} ≤ {TARGET_GEMM_RATIO}× one GEMM: "
                     + (f"{x_gemm:.2f}× ({fused['seconds']:.3f} s vs GEMM {fused['seconds'] / x_gemm:.3f} s) "
                        f"{_verdict(x_gemm <= TARGET_GEMM_RATIO)}" if x_gemm else "GEMM floor not measured"))
        if oracle is not None and oracle["status"] == "ok":
            speedup = oracle["seconds"] / fused["seconds"]
            mem_ratio, work_ratio = oracle["mem_x_fused"], oracle["work_x_fused"]
            lines.append(f"- {head}, ≥ {TARGET_SPEEDUP:g}× faster than the oracle: {speedup:.2f}× "
                         f"({oracle['seconds']:.3f} s vs {fused['seconds']:.3f} s) "
                         f"{_verdict(speedup >= TARGET_SPEEDUP)}")
            lines.append(f"- {head}, extra peak ≤ 1/20 of the oracle's, as measured (the {fused['grad_mib']:.0f} MiB "
                         f"of gradients included): fused {fused['extra_peak_mib']:.0f} MiB, oracle "
                         f"{oracle['extra_peak_mib']:.0f} MiB, fused = 1/{fmt(mem_ratio, '.1f')} "
                         f"{_mem_verdict(fused['extra_peak_mib'], mem_ratio)}; working memory (gradients "
                         f"subtracted from both): fused {fused['working_mib']:.0f} MiB, oracle "
                         f"{oracle['working_mib']:.0f} MiB, fused = 1/{fmt(work_ratio, '.1f')} "
                         f"{_mem_verdict(fused['working_mib'], work_ratio)}")
        else:
            lines.append(f"- {head}, against the oracle: oracle not measured"
                         + (f" ({oracle['status']}: {oracle['detail']})" if oracle else "") + ".")
    pairs = [(f, _find(rows, "unified", f["n"], f["dim"], f["dtype"], "oracle"))
             for f in rows if f["variant"] == "unified" and f["method"] == "vse_cuda" and f["status"] == "ok"]
    pairs = [(f, o) for f, o in pairs if o is not None and o["status"] == "ok"]
    if not pairs:
        lines.append("- Unified, no slower than the oracle with ≤ 1/20 of its extra memory: no configuration "
                     "with both measured.")
    else:
        lines += ["- Unified forward+backward, no slower than the oracle, extra peak ≤ 1/20 of the oracle's "
                  "(every configuration where both ran):", ""]
        cells = []
        for f, o in pairs:
            speed = o["seconds"] / f["seconds"]
            mem, work = o["mem_x_fused"], o["work_x_fused"]
            cells.append([f["n"], f["dim"], f["dtype"], f"{f['seconds']:.3f}", f"{o['seconds']:.3f}", f"{speed:.2f}",
                          f"{f['extra_peak_mib']:.0f}", f"{o['extra_peak_mib']:.0f}", fmt(mem, ".1f"),
                          fmt(work, ".1f"), _verdict(speed >= 1), _mem_verdict(f["extra_peak_mib"], mem),
                          _mem_verdict(f["working_mib"], work)])
        lines += ["  " + line for line in table(
            ["N", "D", "dtype", "fused s", "oracle s", "oracle ÷ fused time", "fused MiB", "oracle MiB",
             "oracle ÷ fused memory", "the same, gradients subtracted", "time", "memory",
             "memory, gradients subtracted"], "rrlrrrrrrrlll", cells)]
        lines.append("")
    if big:
        row = _find(rows, "triplet_hardest", big[0], big[1], "float32", "vse_cuda")
        head = (f"Triplet hardest, N={big[0]}, D={big[1]}, float32, extra peak ≤ 1.5 GB "
                f"({TARGET_BIG_BYTES / _MiB:.0f} MiB)")
        if row is None or row["status"] != "ok":
            lines.append(f"- {head}: not measured" + (f" ({row['status']}: {row['detail']})" if row else "") + ".")
        else:
            lines.append(f"- {head}: {row['extra_peak_mib']:.0f} MiB (of which {row['grad_mib']:.1f} MiB are the two "
                         f"gradients), {row['seconds']:.1f} s, {fmt(row['x_gemm'], '.2f')}× the tiled GEMM "
                         f"{_verdict(row['extra_peak_mib'] * _MiB <= TARGET_BIG_BYTES)}")
    return lines


def write_markdown(rows: list[dict[str, Any]], path: Path, args: argparse.Namespace, command: str,
                   info: dict[str, str], started: datetime.datetime, loads: tuple, finished: bool) -> None:
    lines = heading("vse_cuda losses, forward + backward: fused vs GEMM floor vs eager oracle vs "
                    "pytorch-metric-learning", command) + [
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory']}; {info['threads']} threads for every "
        f"method; torch {info['torch']}, vse_cuda {info['vse_cuda']}, pytorch-metric-learning {info['pytorch-metric-learning']}, "
        f"Python {info['python']}.",
        "",
        run_line(rows, started, loads, finished, "this benchmark adds about its thread count; more means other "
                 "processes shared the CPU, and the CPU s column tells a slow method from a busy machine"),
        "",
        "How: each call is `loss = f(img, txt, ...)` then `loss.backward()` with respect to every input "
        f"(requires_grad; L2-normalized seeded Gaussian data, seed {args.seed}), each (method, configuration) "
        "in a fresh process. **seconds**: median wall time of the measured calls (`calls` = warm-up + "
        f"measured; up to {args.repeats} measured, fewer for long cases, see `--case-budget`). **× GEMM**: "
        "seconds ÷ one `torch.mm(img, txt.T, out=S)` [N, D]×[D, N] of the same dtype in the same run, S "
        "preallocated and touched beforehand, i.e. the GEMM's compute alone (the floor; at the largest N "
        "the same GEMM in the engine's tiles). **× fused**: "
        "seconds ÷ vse_cuda's (for the oracle: how much slower it is than fused). **extra MiB**: peak RSS "
        "during the call minus RSS before it (inputs excluded; the gradients, 2 or 6 × N×D, included). "
        "**mem ÷ fused**: extra MiB ÷ vse_cuda's (the oracle row is the ratio of oracle memory to fused memory); "
        "**work ÷ fused**: the same with the gradients (identical for every method) subtracted from both, i.e. "
        "the working memory DESIGN §3 bounds by O(C·N + N·k). "
        "**check**: vse_cuda against the oracle, |Δloss|/|loss| and ‖Δgrad‖/‖grad‖ over all inputs. "
        "Unified runs with scale 20, margin 0 (symmetric InfoNCE at τ = 0.05, beside NT-Xent; the margin does "
        "not change the work). Quintuplet takes six inputs (img, txt, off_img, off_txt, img2, txt2) with the "
        "defaults; GOAL runs nca × sig_ms and con × con. For bfloat16 the floor is a bfloat16 `torch.mm` "
        "(the float32 floor of the same shape is in the GEMM floor table); vse_cuda and the oracle compute "
        "half types in float32.",
        "",
        "Cases: " + ", ".join(f"{sum(r['status'] == s for r in rows)} {s}"
                              for s in ("ok", "WRONG", "skipped", "oom", "timeout", "error")
                              if any(r["status"] == s for r in rows)) + " (GEMM floors counted once per variant).",
        "",
        "Peers (float32 only; they compute a related loss, not the same one):",
        "",
    ]
    lines += [f"- `{name}`: {note}" for name, note in PEER_NOTES.items()]
    lines += [""] + targets_section(rows, args.big) + [""]
    floors = [r for r in rows if r["method"].startswith("gemm_floor")]
    seen = set()
    cells = []
    for r in floors:
        key = (r["n"], r["dim"], r["dtype"])
        if key in seen:
            continue
        seen.add(key)
        gflops = div(2 * r["n"] ** 2 * r["dim"] / 1e9, r["seconds"])
        cells.append([r["n"], r["dim"], r["dtype"], r["method"], fmt(r["seconds"], ".4f"), fmt(gflops, ".0f"),
                      fmt(r["extra_peak_mib"], ".0f"), f"{r['warmup']}+{r['repeats']}", fmt(r["load_before"], ".1f"),
                      status_cell(r)])
    lines += ["## GEMM floor", ""] + table(
        ["N", "D", "dtype", "method", "seconds", "GFLOP/s", "extra MiB", "calls", "load", "status"], "rrllrrrrrl",
        cells)
    for variant in VARIANTS:
        vrows = [r for r in rows if r["variant"] == variant and not r["method"].startswith("gemm_floor")]
        if not vrows:
            continue
        kwargs = ", ".join(f"{k}={v!r}" for k, v in VARIANTS[variant]["kwargs"].items())
        if "captions_per_image" in VARIANTS[variant]:
            kwargs += f", labels=arange(N) // {VARIANTS[variant]['captions_per_image']}"
        lines += ["", f"## {variant} (`{VARIANTS[variant]['fn']}({kwargs})`)", ""] + table(
            ["N", "D", "dtype", "method", "seconds", "× GEMM", "× fused", "CPU s", "extra MiB", "mem ÷ fused",
             "work ÷ fused", "check Δloss / Δgrad", "calls", "load", "status"], "rrllrrrrrrrlrrl",
            ([r["n"], r["dim"], r["dtype"], r["method"], fmt(r["seconds"], ".4f"), fmt(r["x_gemm"], ".2f"),
              fmt(r["x_fused"], ".2f"), fmt(r["cpu_seconds"], ".3g"), fmt(r["extra_peak_mib"], ".1f"),
              fmt(r["mem_x_fused"], ".1f"), fmt(r["work_x_fused"], ".1f"),
              "-" if r["loss_rel_diff"] is None else f"{r['loss_rel_diff']:.1e} / {r['grad_rel_diff']:.1e}",
              f"{r['warmup']}+{r['repeats']}", fmt(r["load_before"], ".1f"), status_cell(r)] for r in vrows))
    path.write_text("\n".join(lines) + "\n")


def write_plot(rows: list[dict[str, Any]], path: Path, dims: list[int]) -> bool:
    """Time and extra memory against N (log-log), one line per method, for triplet hardest and
    unified at D=1024 (else the largest D) in float32, and a last row with every variant's fused
    time ÷ GEMM and oracle ÷ fused time; False when matplotlib or the data is missing."""
    plt = pyplot()
    if plt is None:
        return False
    dim = 1024 if 1024 in dims else max(dims)
    variants = [v for v in ("triplet_hardest", "unified") if any(r["variant"] == v for r in rows)]
    if not variants:
        return False
    fig, axes = plt.subplots(len(variants) + 1, 2, figsize=(11, 4 * (len(variants) + 1)), squeeze=False)
    for row_axes, variant in zip(axes, variants):
        sel = [r for r in rows if r["variant"] == variant and r["dim"] == dim and r["dtype"] == "float32"
               and r["status"] in ("ok", "WRONG")]
        methods = list(dict.fromkeys(r["method"] for r in sel))
        failed = {}  # method -> "status at N=..." for the legend: never drop a method silently
        for r in rows:
            if (r["variant"] == variant and r["dim"] == dim and r["dtype"] == "float32"
                    and r["status"] not in ("ok", "WRONG") and r["method"] not in failed):
                failed[r["method"]] = f"{r['status']} from N={r['n']}"
                if r["method"] not in methods:
                    methods.append(r["method"])
        for ax, field, label in ((row_axes[0], "seconds", "seconds (median)"),
                                 (row_axes[1], "extra_peak_mib", "extra peak memory (MiB)")):
            for method in methods:
                pts = sorted((r["n"], r[field]) for r in sel if r["method"] == method and r[field])
                name = method + (f" ({failed[method]})" if method in failed else "")
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
            log_log(ax, "N (pairs in the batch)", label, f"{variant}, D={dim}, float32: {label.split(' (')[0]}")
            ax.legend(fontsize=8)
    for ax, field, label in ((axes[-1][0], "x_gemm", "vse_cuda time ÷ one GEMM"),
                             (axes[-1][1], "x_fused", "oracle ÷ vse_cuda time")):
        method = "vse_cuda" if field == "x_gemm" else "oracle"
        for variant in VARIANTS:
            pts = sorted((r["n"], r[field]) for r in rows if r["variant"] == variant and r["method"] == method
                         and r["dim"] == dim and r["dtype"] == "float32" and r[field])
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=variant)
        ax.axhline(TARGET_GEMM_RATIO if field == "x_gemm" else 1.0, color="gray", linestyle="--", linewidth=1)
        log_log(ax, "N (pairs in the batch)", label, f"every variant, D={dim}, float32: {label}")
        ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=110)


# ---------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = new_parser(__doc__)
    parser.add_argument("--losses", nargs="+", choices=list(VARIANTS),
                        help=f"loss variants (default all; with --quick {QUICK['losses']})")
    parser.add_argument("--sizes", type=int, nargs="+", help=f"batch sizes N (default {DEFAULTS['sizes']})")
    parser.add_argument("--dims", type=int, nargs="+", help=f"embedding widths D (default {DEFAULTS['dims']})")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"],
                        help=f"dtypes (default {DEFAULTS['dtypes']}); bfloat16 applies to {BF16_VARIANTS} only")
    parser.add_argument("--peer-sizes", type=int, nargs="*",
                        help=f"extra N, float32, only for the variants with a peer, where the peers fit "
                             f"(default {DEFAULTS['peer_sizes']})")
    parser.add_argument("--big", type=int, nargs=2, metavar=("N", "D"),
                        help=f"the large triplet-hardest configuration, fused only (default {DEFAULTS['big']})")
    parser.add_argument("--no-big", action="store_true", help="skip the large configuration")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="methods to run (peer = the pytorch-metric-learning loss, where there is one)")
    parser.add_argument("--case-budget", type=float, default=20.0,
                        help="seconds of calls per case that set the repeats (long cases: 1 call, no warm-up)")
    parser.add_argument("--max-case-seconds", type=float, default=300.0,
                        help="oracle/peer cases predicted slower than this per call are skipped")
    parser.add_argument("--mem-fraction", type=float, default=0.7,
                        help="oracle/peer cases predicted to need more than this fraction of the available "
                             "memory are skipped")
    # --repeats is the most: long cases measure fewer calls (--case-budget), short ones --warmup more.
    add_common_arguments(parser, stem="losses", defaults=DEFAULTS, quick=QUICK,
                         threads=(torch.get_num_threads(), "torch's intra-op work"), timeout=900.0)
    args = parse_profile(parser, argv, {**DEFAULTS, "losses": list(VARIANTS)}, QUICK)
    if args.no_big:
        args.big = None
    for name in ("sizes", "dims", "peer_sizes"):
        if any(v < 1 for v in getattr(args, name)):
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.big and min(args.big) < 1:
        parser.error("--big N D must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 1 when vse_cuda disagrees with the oracle somewhere."""
    args = parse_args(argv)
    command, stem = start_run(args, argv, "losses")
    started = datetime.datetime.now(datetime.timezone.utc)
    start_load = os.getloadavg()[0]
    t0 = time.perf_counter()
    info = machine_info(args.threads, ("vse_cuda", "pytorch-metric-learning"))
    configs = plan_configs(args)
    preflight(list(VARIANTS), args.dtypes, args.seed)
    print(f"[bench_losses] {len(configs)} configurations; writing {stem}.* to {args.out_dir}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_losses_") as tmp:
        runner = Runner(args, Path(tmp))

        def save(loads: tuple, finished: bool) -> None:
            write_csv(args.out_dir / f"{stem}.csv", CSV_FIELDS, runner.rows, joined={"all_seconds": ".4f"})
            write_markdown(runner.rows, args.out_dir / f"{stem}.md", args, command, info, started, loads, finished)

        run_saving_each(configs, runner.run_config, save, start_load)
    rows = runner.rows
    print_written("bench_losses", args.out_dir, stem, write_plot(rows, args.out_dir / f"{stem}.png", args.dims),
                  f" after {(time.perf_counter() - t0) / 60:.1f} min")
    return 1 if any(r["status"] == "WRONG" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
