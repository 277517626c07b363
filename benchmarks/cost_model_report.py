"""Tables of the cost model (vse_cuda.cost_model): predictions for one shape on a named device,
and the CPU check (predicted against measured CPU times, so the model's error is known).

Usage (from the repository root)::

    python benchmarks/cost_model_report.py predict --n 65536 --dim 768 --dtype bfloat16 --device h200 \
        --out benchmarks/results/cost_model_65536x768_bf16.md
    python benchmarks/cost_model_report.py cpu-check --out benchmarks/results/cost_model_cpu.md
    python benchmarks/cost_model_report.py cpu-check --sizes 256 --dims 32 --out /tmp/x.md   # tiny (dry run)
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

import vse_cuda
from vse_cuda import cost_model

#: (model name, vse_cuda function, keywords, inputs) of every loss the tables cover.
CALLS = {
    "triplet_hardest": ("triplet_loss", {"mining": "hardest"}, 2),
    "triplet_all": ("triplet_loss", {"mining": "all"}, 2),
    "triplet_topk": ("triplet_loss", {"mining": "topk", "k": 10}, 2),
    "unified": ("unified_loss", {}, 2),
    "quintuplet": ("quintuplet_loss", {}, 6),
    "goal": ("goal_loss", {"triplet_weight": "nca", "pair_weight": "sig_ms"}, 2),
}


def predict_table(n: int, dim: int, dtype: torch.dtype, devices: list[str]) -> list[str]:
    """Markdown rows: every loss, topk_similar and eager InfoNCE, forward + backward."""
    head = "| call | tile rows × cols | GFLOP | GEMMs of 2N²D | GB moved | " + \
        " | ".join(f"model ms ({d})" for d in devices) + " |"
    lines = [head, "|---|---|---:|---:|---:|" + "---:|" * len(devices)]
    costs = [("gemm (one N×N×D, the floor)", cost_model.gemm_cost(n, n, dim, dtype))]
    for name in CALLS:
        k = CALLS[name][1].get("k", 1)
        costs.append((name, cost_model.loss_cost(name, n, dim, dtype, k=k)))
    costs.append(("topk_similar (k=10, forward)", cost_model.loss_cost("topk_similar", n, dim, dtype, k=10)))
    costs.append(("eager InfoNCE (ClipLoss pattern)", cost_model.loss_cost("eager_infonce", n, dim, dtype)))
    for name, c in costs:
        times = " | ".join(f"{1e3 * c.seconds(d):.2f}" for d in devices)
        lines.append(f"| {name} | {c.rows} × {c.cols} | {c.flops / 1e9:.0f} | {c.gemm_equivalents:.2f} | "
                     f"{c.bytes / 1e9:.2f} | {times} |")
    return lines


def measure_loss(name: str, n: int, dim: int, dtype: torch.dtype, repeats: int) -> float:
    """Median wall seconds of forward + backward of vse_cuda's ``name`` on seeded unit-norm data."""
    fn_name, kwargs, count = CALLS[name]
    fn = getattr(vse_cuda, fn_name)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=1).to(dtype).requires_grad_()
          for _ in range(count)]

    def call() -> None:
        fn(*xs, **kwargs).backward()
        for x in xs:
            x.grad = None

    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_check(sizes: list[int], dims: list[int], losses: list[str], repeats: int) -> list[str]:
    device = cost_model.measure_cpu_device()
    lines = [f"Device `cpu-here`: {device.note}; float32 GEMM {device.flops['float32'] / 1e9:.1f} GFLOP/s, "
             f"bfloat16 GEMM {device.flops['bfloat16'] / 1e9:.1f} GFLOP/s, copy {device.bandwidth / 1e9:.2f} GB/s.",
             "", "| loss | N | D | dtype | measured s | model s | model ÷ measured |", "|---|---:|---:|---|---:|---:|---:|"]
    for n in sizes:
        for dim in dims:
            for name in losses:
                k = CALLS[name][1].get("k", 1)
                measured = measure_loss(name, n, dim, torch.float32, repeats)
                model = cost_model.loss_cost(name, n, dim, torch.float32, k=k).seconds(device)
                lines.append(f"| {name} | {n} | {dim} | float32 | {measured:.4f} | {model:.4f} | "
                             f"{model / measured:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("predict", help="model predictions for one shape")
    p.add_argument("--n", type=int, default=65536)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--device", nargs="+", default=["h200", "h200-measured"], choices=sorted(cost_model.DEVICES))
    p.add_argument("--out", type=Path, required=True)
    c = sub.add_parser("cpu-check", help="predicted vs measured CPU times")
    c.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    c.add_argument("--dims", type=int, nargs="+", default=[256])
    c.add_argument("--losses", nargs="+", choices=list(CALLS), default=["triplet_hardest", "unified", "goal"])
    c.add_argument("--repeats", type=int, default=3)
    c.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    command = "python " + shlex.join([os.path.relpath(sys.argv[0])] + (sys.argv[1:] if argv is None else argv))
    load = os.getloadavg()
    if args.what == "predict":
        dtype = getattr(torch, args.dtype)
        title = f"# Cost model: N={args.n}, D={args.dim}, {args.dtype}, forward + backward (model, not measured)"
        body = predict_table(args.n, args.dim, dtype, args.device)
        notes = [f"Devices: " + "; ".join(f"`{d}`: {cost_model.DEVICES[d].note}" for d in args.device) + "."]
    else:
        title = "# Cost model against measured CPU times (forward + backward, vse_cuda on this machine)"
        body = cpu_check(args.sizes, args.dims, args.losses, args.repeats)
        notes = [f"Load (1/5/15-min average) at the start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; at the end: "
                 + " ".join(f"{x:.2f}" for x in os.getloadavg()) + f"; {torch.get_num_threads()} torch threads."]
    text = "\n".join([title, "", f"Command: `{command}`", "", *notes, "",
                      "The model: `vse_cuda/cost_model.py` (tile plan from `plan_chunks`; per pass "
                      "max(FLOPs / peak, bytes / bandwidth), summed).", "", *body]) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
