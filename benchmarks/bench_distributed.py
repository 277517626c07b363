"""Losses with exact global negatives across ranks (``group=``) against the materialized local
loss of open_clip, on CPU with gloo (issue 4, item 5).

Every step measured is one rank's ``loss = f(img_shard, txt_shard, group); loss.backward()``
on its [n, D] float32 shard (L2-normalized seeded Gaussian pairs) of a global batch of
N = world · n pairs. Methods:

- ``ours``: ``vse_cuda.triplet_loss(..., mining="hardest", margin=0.2, group=WORLD)`` (VSE++)
  and ``vse_cuda.unified_loss(..., scale=20, margin=0, group=WORLD)`` (symmetric InfoNCE at
  τ = 0.05): ``gather_with_grad`` of the embeddings, then the rank's own rows and columns of
  S in chunks, never an n × N matrix;
- ``baseline``: open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)`` pattern:
  ``torch.distributed.nn.functional.all_gather`` of both embeddings, the two materialized
  [n, N] logits ``img_local @ txt_globalᵀ`` and ``txt_local @ img_globalᵀ``, then for unified
  ``F.cross_entropy(20 · logits, positives, reduction="sum")`` per direction (with margin 0
  this *is* the unified loss: log(1 + Σ_{j≠i} e^{γ(S_ij − S_ii)}) = lse_j(γ S_ij) − γ S_ii),
  and for triplet the VSE++ ``max_violation`` code (hinge matrix, diagonal masked, row max)
  on each. The same loss value as ours, computed eagerly.

Each (method, configuration) runs in a fresh set of ``world`` processes (torch.multiprocessing
spawn, gloo, 1 intra-op thread per rank). Per rank: ``--warmup`` unmeasured steps, then
``malloc_trim`` (so that the first measured step's peak RSS counts every page it touches
instead of reusing heap pages the warm-up freed), then ``--repeats`` steps, each after a
``dist.barrier()`` and a ``gc.collect()`` outside the measurement (``_harness.measure_calls``).

- **seconds**: per step the slowest rank's wall time (the step ends when the last rank does),
  then the median over the measured steps. **CPU s**: the same for process CPU time.
- **extra MiB**: per rank the peak RSS during a step minus RSS just before it (exact: the
  kernel's high-water mark is reset first, ``_harness._PeakRSS``), the largest over steps and
  ranks. The shards, the gathered embeddings and the gradients count for both methods.
- **sent MiB**: bytes one rank sends per step, analytic (fp32, payload only, assuming gloo's
  ring all-gather and ring reduce-scatter): see :func:`bytes_sent_per_rank`.
- **check**: the sum of the ranks' losses, ours against the baseline (relative difference)
  and, at the smallest n of every (world, D, loss), against the single-process oracle
  ``vse_cuda.reference`` on the whole batch in float64; the concatenated gradients, ours
  against the baseline (‖Δ‖/‖g‖). Above ``LOSS_TOLERANCE`` / ``GRAD_TOLERANCE`` the row is
  WRONG and the script exits with status 1.

Caveats: the machine has 2 cores, so 4 ranks oversubscribe it (the ranks time-share the cores
and 4-rank times are not comparable to 2-rank ones, nor to a real cluster); gloo over loopback
costs memory copies, not network time; the byte counts are analytic, not measured; the load
average of other jobs on the machine is recorded beside each case because it inflates wall
time (CPU s is less affected). Configurations whose baseline work per rank exceeds
``--max-gflop`` (12·n·N·D flops: two [n, N] GEMMs forward, four backward) are not started and
are listed as skipped, so the run fits its time budget.

Usage (from the repository root)::

    python benchmarks/bench_distributed.py            # worlds 2 4, n 1024 2048 4096, D 256 1024
                                                      # (12–20 min; 4 of the 12 shapes skipped)
    python benchmarks/bench_distributed.py --quick    # smoke run, tiny sizes (≈ 3 min: process start-up)
    python benchmarks/bench_distributed.py --worlds 4 --sizes 4096 --dims 256 --max-gflop 1000

Writes ``<out-dir>/distributed.csv``, ``distributed.md`` and ``distributed.png``
(``distributed_quick.*`` with ``--quick``); CSV and Markdown are rewritten after every
configuration, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import signal
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (the autograd all_gather of the baseline; not imported by dist)
import torch.multiprocessing as mp
import torch.nn.functional as F

from _harness import available_memory_bytes, machine_info, malloc_trim, measure_calls, offer_to_oom_killer
from _report import (add_common_arguments, fmt, heading, log_log, new_parser, parse_profile, print_written, pyplot,
                     run_line, run_saving_each, save_figure, start_run, status_cell, table, write_csv)

METHODS = ("ours", "baseline")
LOSSES = ("triplet_hardest", "unified")
MARGIN = 0.2  # triplet hinge margin (VSE++'s default)
SCALE = 20.0  # unified γ = 1/τ, τ = 0.05; margin 0 (InfoNCE)
NOISE = 3.0  # txt = normalize(img + NOISE·ε): positives near cos 0.3, so many triplet hinges are active
LOSS_TOLERANCE = 1e-4  # relative, fp32 sums of ~N terms
GRAD_TOLERANCE = 1e-4  # ‖Δg‖/‖g‖ over the concatenated shards
#: Bytes of the shape checks ours exchanges per peer: three all_gathers of one int64 width and
#: the int64 metadata (6 numbers for img with the labels flag, 5 per gather_with_grad).
SHAPE_CHECK_BYTES = (8 + 6 * 8) + 2 * (8 + 5 * 8)
#: The baseline's resident [n, N] float32/bool buffers, a rough count for the memory skip.
BASELINE_MATRICES = 12
DEFAULTS = {"worlds": [2, 4], "sizes": [1024, 2048, 4096], "dims": [256, 1024], "repeats": 3}
QUICK = {"worlds": [2, 4], "sizes": [64, 256], "dims": [32], "repeats": 2}
_MiB = 2**20
_GiB = 2**30


# ------------------------------------------------------------------------ rank side: losses

def global_batch(n_global: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded L2-normalized float32 pairs [n_global, dim]; every rank builds the same one."""
    gen = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n_global, dim, generator=gen), dim=1)
    txt = F.normalize(img + NOISE * torch.randn(n_global, dim, generator=gen), dim=1)
    return img, txt


def ours_loss(loss: str, img: torch.Tensor, txt: torch.Tensor, group) -> torch.Tensor:
    import vse_cuda

    if loss == "triplet_hardest":
        return vse_cuda.triplet_loss(img, txt, margin=MARGIN, mining="hardest", group=group)
    return vse_cuda.unified_loss(img, txt, scale=SCALE, margin=0.0, group=group)


def open_clip_gather(x: torch.Tensor, group) -> torch.Tensor:
    """open_clip's ``gather_features(..., gather_with_grad=True)``: the autograd all_gather of
    torch.distributed.nn (its backward, on gloo, is an all-to-all of the gradient blocks)."""
    return torch.cat(torch.distributed.nn.functional.all_gather(x, group=group), dim=0)


def vsepp_hardest(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """VSE++ ``ContrastiveLoss(max_violation=True)`` for the anchors of ``scores`` [n, N]
    (anchor i's positive in column ``positives[i]``): hinge matrix, positive masked, row max."""
    rows = torch.arange(scores.size(0))
    d = scores[rows, positives].view(-1, 1)
    cost = (MARGIN + scores - d).clamp(min=0)
    mask = torch.zeros_like(cost, dtype=torch.bool)
    mask[rows, positives] = True
    return cost.masked_fill_(mask, 0).max(1)[0].sum()


def baseline_loss(loss: str, img: torch.Tensor, txt: torch.Tensor, group) -> torch.Tensor:
    """open_clip ``ClipLoss(local_loss=True, gather_with_grad=True)`` with sum reduction (and
    VSE++'s hinge for the triplet loss): the rank's anchors against the gathered batch."""
    all_img, all_txt = open_clip_gather(img, group), open_clip_gather(txt, group)
    positives = torch.arange(img.size(0)) + img.size(0) * dist.get_rank(group)  # equal shards
    if loss == "unified":
        # open_clip scales the [n, D] features, not the logits: logit_scale * img @ all_txt.T
        per_image = (SCALE * img) @ all_txt.T
        per_text = (SCALE * txt) @ all_img.T
        return (F.cross_entropy(per_image, positives, reduction="sum")
                + F.cross_entropy(per_text, positives, reduction="sum"))
    return vsepp_hardest(img @ all_txt.T, positives) + vsepp_hardest(txt @ all_img.T, positives)


def make_step(method: str, loss: str, img: torch.Tensor, txt: torch.Tensor, group) -> Callable[[], tuple]:
    """The measured call: fresh leaves on the shard, loss, backward; returns (loss, dimg, dtxt)."""
    fn = ours_loss if method == "ours" else baseline_loss

    def step() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, b = img.detach().requires_grad_(), txt.detach().requires_grad_()
        value = fn(loss, a, b, group)
        value.backward()
        return value.detach(), a.grad, b.grad

    return step


# ------------------------------------------------------------------ rank side: measurement

def rank_main(rank: int, request: dict[str, Any], case_dir: str) -> None:
    """torch.multiprocessing entry point of one rank: measure, write rank{r}.json (and the
    gradients of the last step to rank{r}.pt)."""
    offer_to_oom_killer()
    torch.set_num_threads(1)
    # open_clip still gathers with torch.distributed.nn's all_gather, which warns once per call.
    warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated")
    out = Path(case_dir)
    dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank,
                            world_size=request["world"], timeout=datetime.timedelta(seconds=request["timeout_s"]))
    try:
        report = measure_rank(rank, request, out)
    except Exception as error:
        text = str(error).strip().splitlines()[:1]
        oom = isinstance(error, MemoryError) or "allocate" in str(error).lower()
        report = {"status": "oom" if oom else "error", "detail": f"{type(error).__name__}: {' '.join(text)}"}
        (out / f"rank{rank}.json").write_text(json.dumps(report))
        raise  # the parent's join() then stops the ranks that would wait in a collective
    dist.destroy_process_group()
    (out / f"rank{rank}.json").write_text(json.dumps(report))


def measure_rank(rank: int, request: dict[str, Any], out: Path) -> dict[str, Any]:
    n = request["n"]
    img, txt = global_batch(request["world"] * n, request["dim"], request["seed"])
    img, txt = img[rank * n:(rank + 1) * n].clone(), txt[rank * n:(rank + 1) * n].clone()  # frees the rest
    group = dist.group.WORLD
    step = make_step(request["method"], request["loss"], img, txt, group)
    kept = [step() for _ in range(request["warmup"])]  # kept alive so the trim below cannot be undone
    malloc_trim()
    calls = measure_calls(step, request["repeats"], before_each=lambda: dist.barrier(group))
    value, grad_img, grad_txt = calls.result
    torch.save({"grad_img": grad_img, "grad_txt": grad_txt}, out / f"rank{rank}.pt")
    del kept
    return {"status": "ok", "seconds": calls.seconds, "cpu_seconds": calls.cpu_seconds,
            "extra_bytes": calls.extra_bytes, "loss": float(value)}


# ----------------------------------------------------------------------- parent side: cases

def bytes_sent_per_rank(method: str, world: int, n: int, dim: int, itemsize: int = 4) -> int:
    """Payload one rank sends per step. Forward, both: all_gather of img and txt, the rank's
    [n, D] block to each of the W−1 others, 2(W−1)·nD·4. Backward, ours: gather_with_grad
    reduce-scatters each [N, D] gradient, (W−1)/W·ND·4 per tensor for a ring, so 2(W−1)·nD·4,
    plus the shape checks (SHAPE_CHECK_BYTES per peer). Backward, baseline: the all-to-all of
    the gradient blocks, (W−1)·nD·4 per tensor, 2(W−1)·nD·4. In all: ours 16(W−1)nD + 152(W−1)
    bytes, baseline 16(W−1)nD bytes."""
    block = (world - 1) * n * dim * itemsize
    forward = 2 * block
    if method == "ours":
        return forward + 2 * block + SHAPE_CHECK_BYTES * (world - 1)
    return forward + 2 * block


def baseline_gflop(world: int, n: int, dim: int) -> float:
    """Per rank and step: two [n, N] GEMMs forward, four backward (dS·B and dSᵀ·A per direction)."""
    return 12 * n * (world * n) * dim / 1e9


def skip_reason(method: str, cfg: dict[str, Any], args: argparse.Namespace) -> str:
    """Why a case is not started (empty when it runs)."""
    world, n, dim = cfg["world"], cfg["n"], cfg["dim"]
    work = baseline_gflop(world, n, dim)
    if work > args.max_gflop:
        return f"baseline work {work:.0f} GFLOP/rank/step > --max-gflop {args.max_gflop:g} (time budget)"
    if method == "baseline":
        need = world * BASELINE_MATRICES * n * world * n * 4
        available = available_memory_bytes()
        if available is not None and need > args.mem_fraction * available:
            return f"~{need / _GiB:.1f} GiB of [n, N] buffers over {world} ranks, {available / _GiB:.1f} GiB available"
    return ""


def run_case(method: str, cfg: dict[str, Any], args: argparse.Namespace, case_dir: Path) -> dict[str, Any]:
    """Spawn ``world`` fresh ranks for one (method, configuration); returns the merged result."""
    case_dir.mkdir(parents=True)
    request = {**cfg, "method": method, "seed": args.seed, "warmup": args.warmup, "repeats": args.repeats,
               "timeout_s": args.timeout}
    context = mp.start_processes(rank_main, args=(request, str(case_dir)), nprocs=cfg["world"], join=False,
                                 start_method="spawn")
    status, detail = wait(context, args.timeout)
    reports = [json.loads(p.read_text()) for p in sorted(case_dir.glob("rank*.json"))]
    failed = [r for r in reports if r["status"] != "ok"]
    if failed:  # the rank that failed says why better than the exit code of the others
        status, detail = failed[0]["status"], failed[0]["detail"]
    elif status == "ok" and len(reports) != cfg["world"]:
        status, detail = "error", f"{len(reports)} of {cfg['world']} ranks reported"
    return merge(reports, cfg["world"]) if status == "ok" else {"status": status, "detail": detail}


def wait(context, timeout_s: float) -> tuple[str, str]:
    """Join the ranks; kill them (only them) past ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=2):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                for process in context.processes:
                    process.join()
                return "timeout", f"no result within {timeout_s:g} s"
    except mp.ProcessExitedException as error:
        if error.exit_code == -signal.SIGKILL:
            return "oom", "a rank was killed by SIGKILL (out of memory)"
        return "error", str(error).strip().splitlines()[0]
    except mp.ProcessRaisedException as error:
        return "error", str(error).strip().splitlines()[-1]
    return "ok", ""


def merge(reports: list[dict[str, Any]], world: int) -> dict[str, Any]:
    """Per step the slowest rank (time) and per rank its largest step (memory)."""
    steps = len(reports[0]["seconds"])
    seconds = [max(r["seconds"][i] for r in reports) for i in range(steps)]
    cpu = [max(r["cpu_seconds"][i] for r in reports) for i in range(steps)]
    per_rank = [max(r["extra_bytes"]) / _MiB for r in reports]
    return {"status": "ok", "detail": "", "seconds": statistics.median(seconds), "all_seconds": seconds,
            "cpu_seconds": statistics.median(cpu), "extra_peak_mib": max(per_rank),
            "extra_peak_mib_ranks": per_rank, "loss_sum": math.fsum(r["loss"] for r in reports)}


def gathered_grads(case_dir: Path, world: int) -> torch.Tensor:
    """The ranks' gradients concatenated in rank order, img then txt, as one flat float64 vector."""
    parts = [torch.load(case_dir / f"rank{r}.pt") for r in range(world)]
    return torch.cat([p[key].double().flatten() for key in ("grad_img", "grad_txt") for p in parts])


def oracle_loss(cfg: dict[str, Any], seed: int) -> float:
    """Single-process ``vse_cuda.reference`` loss of the whole global batch, in float64."""
    from vse_cuda import reference

    img, txt = (x.double() for x in global_batch(cfg["world"] * cfg["n"], cfg["dim"], seed))
    if cfg["loss"] == "triplet_hardest":
        return float(reference.triplet_loss(img, txt, margin=MARGIN, mining="hardest"))
    return float(reference.unified_loss(img, txt, scale=SCALE, margin=0.0))


# ------------------------------------------------------------------ parent side: configurations

def plan_configs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (world, loss, n, D), smallest work first, so that an interrupted run keeps the most."""
    configs = [{"world": w, "loss": loss, "n": n, "dim": d}
               for w in args.worlds for d in args.dims for n in args.sizes for loss in args.losses]
    return sorted(configs, key=lambda c: (baseline_gflop(c["world"], c["n"], c["dim"]), c["world"], c["loss"]))


def new_row(cfg: dict[str, Any], method: str) -> dict[str, Any]:
    return {**cfg, "n_global": cfg["world"] * cfg["n"], "method": method, "status": "", "detail": "",
            "seconds": None, "all_seconds": [], "cpu_seconds": None, "extra_peak_mib": None,
            "extra_peak_mib_ranks": [], "sent_mib": bytes_sent_per_rank(method, cfg["world"], cfg["n"], cfg["dim"])
            / _MiB, "loss_sum": None, "loss_rel_diff": None, "grad_rel_diff": None, "oracle_rel_diff": None,
            "time_ratio": None, "cpu_ratio": None, "mem_ratio": None, "load_before": None}


def run_config(cfg: dict[str, Any], args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    """Both methods at one configuration, checked against each other (and the oracle)."""
    rows, dirs = {}, {}
    for method in args.methods:
        row = rows[method] = new_row(cfg, method)
        row["load_before"] = os.getloadavg()[0]
        reason = skip_reason(method, cfg, args)
        if reason:
            row.update(status="skipped", detail=reason)
        else:
            dirs[method] = tmp / f"{method}_w{cfg['world']}_{cfg['loss']}_n{cfg['n']}_d{cfg['dim']}"
            row.update(run_case(method, cfg, args, dirs[method]))
        print(f"[bench_distributed] world={cfg['world']} {cfg['loss']} n={cfg['n']} D={cfg['dim']} {method}: "
              f"{row['status']} {fmt(row['seconds'], '.3f')} s, {fmt(row['extra_peak_mib'], '.0f')} MiB/rank "
              f"{row['detail']}", flush=True)
    check(rows, dirs, cfg, args)
    for row in rows.values():
        row["time_ratio"] = _ratio(rows, "seconds")
        row["cpu_ratio"] = _ratio(rows, "cpu_seconds")
        row["mem_ratio"] = _ratio(rows, "extra_peak_mib")
    for case_dir in dirs.values():
        for path in case_dir.iterdir():
            path.unlink()
        case_dir.rmdir()
    return list(rows.values())


def check(rows: dict[str, dict], dirs: dict[str, Path], cfg: dict[str, Any], args: argparse.Namespace) -> None:
    """Relative differences ours vs baseline (loss, gradients) and vs the oracle; WRONG beyond
    the tolerances (NaN included)."""
    ok = {m: r for m, r in rows.items() if r["status"] == "ok"}
    if len(ok) == 2:
        loss_diff = _rel(ok["ours"]["loss_sum"], ok["baseline"]["loss_sum"])
        g_ours, g_base = (gathered_grads(dirs[m], cfg["world"]) for m in ("ours", "baseline"))
        grad_diff = float((g_ours - g_base).norm() / g_base.norm().clamp_min(1e-30))
        for row in ok.values():
            row["loss_rel_diff"], row["grad_rel_diff"] = loss_diff, grad_diff
    if ok and cfg["n"] == min(args.sizes):
        oracle = oracle_loss(cfg, args.seed)
        for row in ok.values():
            row["oracle_rel_diff"] = _rel(row["loss_sum"], oracle)
    for row in ok.values():
        bad = [f"{name} {value:.2g}" for name, value, tol in
               (("Δloss vs other", row["loss_rel_diff"], LOSS_TOLERANCE),
                ("Δgrad vs other", row["grad_rel_diff"], GRAD_TOLERANCE),
                ("Δloss vs oracle", row["oracle_rel_diff"], LOSS_TOLERANCE))
               if value is not None and not value <= tol]
        if bad:
            row.update(status="WRONG", detail="; ".join(bad))


def _ratio(rows: dict[str, dict], key: str) -> float | None:
    """baseline ÷ ours of ``key`` (> 1: ours is faster or smaller)."""
    if "ours" not in rows or "baseline" not in rows:
        return None
    ours, base = rows["ours"][key], rows["baseline"][key]
    return base / ours if ours and base is not None else None


def _rel(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return abs(a - b) / max(abs(b), 1e-30)


# --------------------------------------------------------------------------------- reports

#: One line per (configuration, method); ratios are baseline ÷ ours on both lines.
CSV_FIELDS = ["world", "loss", "n", "n_global", "dim", "method", "status", "seconds", "cpu_seconds",
              "extra_peak_mib", "time_ratio", "cpu_ratio", "mem_ratio", "sent_mib", "loss_sum", "loss_rel_diff",
              "grad_rel_diff", "oracle_rel_diff", "load_before", "all_seconds", "extra_peak_mib_ranks", "detail"]


def _pairs(rows: list[dict[str, Any]]) -> list[tuple[dict, dict]]:
    """(ours row, baseline row) per configuration, in run order."""
    out = []
    for ours in (r for r in rows if r["method"] == "ours"):
        base = next((r for r in rows if r["method"] == "baseline" and all(
            r[k] == ours[k] for k in ("world", "loss", "n", "dim"))), None)
        if base is not None:
            out.append((ours, base))
    return out


def _cell_status(ours: dict, base: dict) -> str:
    if ours["status"] == base["status"] == "ok":
        return "ok"
    if ours["status"] == base["status"] and ours["detail"] == base["detail"]:
        return status_cell(ours)
    return f"ours {status_cell(ours)}; baseline {status_cell(base)}"


def results_table(rows: list[dict[str, Any]]) -> list[str]:
    cells = []
    for ours, base in _pairs(rows):
        oracle = ("-" if ours["oracle_rel_diff"] is None and base["oracle_rel_diff"] is None
                  else f"{fmt(ours['oracle_rel_diff'], '.1e')} / {fmt(base['oracle_rel_diff'], '.1e')}")
        cells.append([ours["world"], ours["loss"], ours["n"], ours["n_global"], ours["dim"],
                      fmt(ours["seconds"], ".3f"), fmt(base["seconds"], ".3f"), fmt(ours["time_ratio"], ".2f"),
                      fmt(ours["cpu_seconds"], ".3f"), fmt(base["cpu_seconds"], ".3f"), fmt(ours["cpu_ratio"], ".2f"),
                      fmt(ours["extra_peak_mib"], ".1f"), fmt(base["extra_peak_mib"], ".1f"),
                      fmt(ours["mem_ratio"], ".1f"), f"{ours['sent_mib']:.2f} / {base['sent_mib']:.2f}",
                      fmt(ours["loss_rel_diff"], ".1e"), fmt(ours["grad_rel_diff"], ".1e"), oracle,
                      fmt(ours["load_before"], ".1f"), _cell_status(ours, base)])
    return table(["ranks", "loss", "n", "N", "D", "ours s", "baseline s", "**time ÷**", "ours CPU s", "baseline CPU s",
                  "CPU ÷", "ours MiB/rank", "baseline MiB/rank", "**mem ÷**", "sent MiB/rank ours / baseline",
                  "Δloss ours vs baseline", "Δgrad", "Δloss vs oracle ours / baseline", "load", "status"],
                 "rlrrrrrrrrrrrrlrrlrl", cells)


def headline(rows: list[dict[str, Any]]) -> list[str]:
    """Range of the ratios per (ranks, loss) over the configurations where both methods ran."""
    lines = []
    for world in sorted({r["world"] for r in rows}):
        for loss in LOSSES:
            pairs = [(o, b) for o, b in _pairs(rows) if o["world"] == world and o["loss"] == loss
                     and o["time_ratio"] is not None and o["mem_ratio"] is not None]
            if not pairs:
                continue
            times = [o["time_ratio"] for o, _ in pairs]
            cpus = [o["cpu_ratio"] for o, _ in pairs]
            mems = [o["mem_ratio"] for o, _ in pairs]
            ours, base = max(pairs, key=lambda p: (p[0]["n_global"], p[0]["dim"]))
            lines.append(f"- {world} ranks, {loss}: baseline ÷ ours wall time {min(times):.2f}–{max(times):.2f}×, "
                         f"CPU time {min(cpus):.2f}–{max(cpus):.2f}×, per-rank memory "
                         f"{min(mems):.1f}–{max(mems):.1f}× (largest N={ours['n_global']}, D={ours['dim']}: "
                         f"{ours['seconds']:.2f} s vs {base['seconds']:.2f} s, {ours['extra_peak_mib']:.0f} vs "
                         f"{base['extra_peak_mib']:.0f} MiB/rank).")
    return lines


def write_markdown(rows: list[dict[str, Any]], path: Path, args: argparse.Namespace, command: str,
                   info: dict[str, str], started: datetime.datetime, loads: tuple, finished: bool) -> None:
    skipped = sorted({f"{r['world']} ranks n={r['n']} D={r['dim']}" for r in rows if r["status"] == "skipped"})
    lines = heading("Exact global negatives across ranks: vse_cuda `group=` vs open_clip-style materialized local "
                    "loss", command) + [
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory']}; torch {info['torch']}, "
        f"vse_cuda {info['vse_cuda']}, Python {info['python']}; gloo over loopback, **1 intra-op thread per "
        "rank: 2 ranks fill the 2 cores, 4 ranks oversubscribe them** (ranks time-share the cores, so 4-rank "
        "times are not comparable with 2-rank times nor with a real cluster).",
        "",
        run_line(rows, started, loads, finished, "this benchmark adds about its rank count; more means other jobs "
                 "shared the CPU and inflated wall time; CPU s is less affected"),
        "",
        "How: per step, each rank runs `loss = f(img_shard, txt_shard, group=WORLD); loss.backward()` on its "
        f"[n, D] float32 shard (L2-normalized seeded pairs, seed {args.seed}) of N = ranks·n pairs; "
        f"{args.warmup} warm-up step(s), then {args.repeats} measured, each after a barrier; each (method, "
        "configuration) in a fresh set of spawned processes. **ours**: `vse_cuda.triplet_loss(mining=\"hardest\", "
        f"margin={MARGIN})` / `vse_cuda.unified_loss(scale={SCALE:g}, margin=0)` with `group=` (chunked, no "
        "n×N matrix). **baseline**: open_clip `ClipLoss(local_loss=True, gather_with_grad=True)` style — "
        "`torch.distributed.nn.functional.all_gather`, the two materialized [n, N] logits, summed "
        "`F.cross_entropy` (unified) or VSE++ `max_violation` hinge (triplet) — the same loss value. "
        "**s**: median over steps of the slowest rank's wall time. **MiB/rank**: peak RSS during a step minus "
        "RSS before it, largest over ranks and steps (gathered embeddings and gradients included for both). "
        "**time ÷, CPU ÷, mem ÷**: baseline ÷ ours (> 1: ours faster / smaller); CPU s is the median over steps of "
        "the largest rank's process CPU time, which excludes waiting for other ranks and for the cores other jobs "
        "hold, so on this shared machine CPU ÷ is the steadier compute comparison. **sent MiB/rank**: analytic "
        "payload one rank sends per step in fp32, assuming ring all-gather / reduce-scatter: ours 16(W−1)·n·D + 152(W−1) "
        "bytes (all_gather of img and txt forward, reduce-scatter of the two [N, D] gradients backward, shape "
        "checks), baseline 16(W−1)·n·D bytes (all_gather forward, all-to-all of the gradient blocks "
        "backward). **Δ**: relative differences of the summed losses and of the concatenated gradients "
        "(‖Δ‖/‖g‖), ours vs baseline; vs oracle: against single-process `vse_cuda.reference` in float64 "
        f"on the whole batch, at the smallest n. Tolerance {LOSS_TOLERANCE:g} (loss), {GRAD_TOLERANCE:g} (grad).",
        "",
    ]
    if skipped:
        lines += [f"Not run (baseline work per rank above `--max-gflop {args.max_gflop:g}`, to keep the run "
                  "within its time budget on this loaded machine, or not enough memory): " + ", ".join(skipped)
                  + ".", ""]
    lines += ["Headline (baseline ÷ ours):", ""] + (headline(rows) or ["- no configuration finished both methods"])
    lines += ["", *results_table(rows)]
    path.write_text("\n".join(lines) + "\n")


def write_plot(rows: list[dict[str, Any]], path: Path) -> bool:
    """Time and per-rank memory against global N (log-log): one panel per (metric, loss), one
    line per (method, ranks, D); False when matplotlib is missing or nothing ran."""
    plt = pyplot()
    if plt is None:
        return False
    done = [r for r in rows if r["status"] == "ok"]
    losses = [loss for loss in LOSSES if any(r["loss"] == loss for r in done)]
    if not losses:
        return False
    fig, axes = plt.subplots(2, len(losses), figsize=(6 * len(losses), 8), squeeze=False)
    for col, loss in enumerate(losses):
        for row_i, (key, label) in enumerate((("seconds", "seconds per step (slowest rank)"),
                                              ("extra_peak_mib", "extra peak MiB per rank"))):
            _plot_panel(axes[row_i][col], [r for r in done if r["loss"] == loss], key)
            axes[row_i][col].set_ylabel(label)
            axes[row_i][col].set_title(f"{loss}: {label}")
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, path, dpi=110)


def _plot_panel(ax, rows: list[dict[str, Any]], key: str) -> None:
    colors = {"ours": "tab:blue", "baseline": "tab:red"}
    markers = {2: "o", 4: "s"}
    for method in METHODS:
        for world in sorted({r["world"] for r in rows}):
            for dim in sorted({r["dim"] for r in rows}):
                line = sorted((r for r in rows if r["method"] == method and r["world"] == world and r["dim"] == dim),
                              key=lambda r: r["n_global"])
                if line:
                    ax.plot([r["n_global"] for r in line], [r[key] for r in line], color=colors[method],
                            marker=markers.get(world, "^"), linestyle="-" if dim == min(r["dim"] for r in rows)
                            else "--", label=f"{method}, {world} ranks, D={dim}")
    log_log(ax, "global N = ranks · n")


# ------------------------------------------------------------------------------------ main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = new_parser(__doc__)
    parser.add_argument("--worlds", type=int, nargs="+", help=f"ranks (default {DEFAULTS['worlds']})")
    parser.add_argument("--sizes", type=int, nargs="+", help=f"per-rank batch n (default {DEFAULTS['sizes']})")
    parser.add_argument("--dims", type=int, nargs="+", help=f"embedding widths D (default {DEFAULTS['dims']})")
    parser.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    # 110 keeps the default grid within 20 minutes on the loaded 2-core machine (12 min measured,
    # process start-up of ~15 s per case included); it leaves out 4 ranks × n=4096 and n=2048 × D=1024 on 4 ranks,
    # n=4096 × D=1024 on 2 ranks (206–825 GFLOP per rank and step, 4 steps per case).
    parser.add_argument("--max-gflop", type=float, default=110.0,
                        help="skip configurations whose baseline work per rank and step (12·n·N·D) is above this")
    parser.add_argument("--mem-fraction", type=float, default=0.6,
                        help="skip baselines whose [n, N] buffers over all ranks would need more than this "
                             "fraction of the available memory")
    add_common_arguments(parser, stem="distributed", defaults=DEFAULTS, quick=QUICK, unit="steps", timeout=600.0)
    args = parse_profile(parser, argv, DEFAULTS, QUICK)
    if min(args.worlds) < 2 or min(args.sizes) < 2 or min(args.dims) < 1:
        parser.error("need --worlds >= 2, --sizes >= 2, --dims >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 1 when ours and the baseline (or the oracle) disagree."""
    args = parse_args(argv)
    command, stem = start_run(args, argv, "distributed")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"  # inherited by the spawned ranks: 1 intra-op thread each
    started, start_load, t0 = datetime.datetime.now(datetime.timezone.utc), os.getloadavg()[0], time.perf_counter()
    info = machine_info(1, ("vse_cuda",))
    configs = plan_configs(args)
    print(f"[bench_distributed] {len(configs)} configurations; writing {stem}.* to {args.out_dir}", flush=True)
    rows: list[dict[str, Any]] = []

    def save(loads: tuple, finished: bool) -> None:
        write_csv(args.out_dir / f"{stem}.csv", CSV_FIELDS, rows,
                  joined={"all_seconds": ".4f", "extra_peak_mib_ranks": ".1f"})
        write_markdown(rows, args.out_dir / f"{stem}.md", args, command, info, started, loads, finished)

    with tempfile.TemporaryDirectory(prefix="bench_distributed_") as tmp:
        run_saving_each(configs, lambda cfg: rows.extend(run_config(cfg, args, Path(tmp))), save, start_load)
    print_written("bench_distributed", args.out_dir, stem, write_plot(rows, args.out_dir / f"{stem}.png"),
                  f" after {(time.perf_counter() - t0) / 60:.1f} min")
    return 1 if any(r["status"] == "WRONG" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
