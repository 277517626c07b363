"""GPU benchmark (DESIGN §8): every vse_cuda loss, forward + backward, against one GEMM of the
same shape and dtype (the floor), the eager oracle (vse_cuda.reference), open_clip's ClipLoss
and SigLipLoss patterns written out, and inf-cl / memeff on InfoNCE when they are importable,
with the cost model's predicted time and bytes beside every row as "model" (never mixed with
measurements).

The CLIP family as it is trained: ``unified_learned_scale`` is InfoNCE (unified, margin 0) with
the temperature a learnable 0-dim tensor, and ``siglip`` is ``vse_cuda.siglip_loss`` (open_clip's
``SigLipLoss`` scale: sum / N) with learnable scale and bias. Learnable scalars are float32 0-dim
tensors on the device that require grad (as open_clip's ``logit_scale`` / ``logit_bias``
parameters under autocast), made for each case and given to every method of the row alike; their
``.grad`` is cleared after each call like the inputs'. Beside them, the eager patterns of
open_clip with the same learnable scalars: ``clip_pattern`` and ``siglip_pattern``.

Timing on CUDA: ``torch.cuda.Event`` around each call, ``--warmup`` unmeasured calls, then the
median of ``--repeats`` (>= 10 by default) measured ones; memory: ``torch.cuda.max_memory_allocated``
during the calls minus what was allocated before them (inputs excluded). On CPU (``--device
cpu``, the dry run of gpu_check.sh) the same script runs tiny shapes with wall-clock timing and
peak RSS (``_harness.measure_calls``).

Achieved TFLOP/s counts the model's GEMM FLOPs (2·N²·D per full GEMM; dense losses do 4, sparse
ones 1, the eager patterns 3) over the measured time. Cases are run smallest first; a case whose
model-predicted time for all its calls exceeds what is left of ``--budget-s`` is skipped, and so
is an eager case whose N×N tensors (model bytes) would not fit in the device's free memory:
each skip is a row saying why.

Before the sweep every loss is checked on the device against the oracle at N=256 (float32);
a mismatch marks it WRONG in the table and the exit status is 1.

inf-cl and memeff are not on the GPU machine; they travel as wheels (see the device README:
``python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl inf-cl``,
carry ``.whl``, ``pip install --target /tmp/site`` there and ``PYTHONPATH=/tmp/site``); this
script imports them optionally and records "not importable" otherwise.

Usage::

    python benchmarks/bench_gpu.py --device cuda --out-dir OUT --budget-s 150
    python benchmarks/bench_gpu.py --device cpu --quick --out-dir OUT     # tiny CPU version
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import machine_info, measure_calls  # noqa: E402
from _report import add_common_arguments, fmt, new_parser, parse_profile, table, write_csv  # noqa: E402

import vse_cuda  # noqa: E402
import vse_cuda.reference as reference  # noqa: E402
from vse_cuda import cost_model  # noqa: E402

#: loss -> (vse_cuda / reference function, keywords, inputs, cost-model name, backward?)
LOSSES: dict[str, tuple[str, dict[str, Any], int, str, bool]] = {
    "triplet_hardest": ("triplet_loss", {"mining": "hardest"}, 2, "triplet_hardest", True),
    "triplet_all": ("triplet_loss", {"mining": "all"}, 2, "triplet_all", True),
    "unified": ("unified_loss", {"scale": 20.0, "margin": 0.0}, 2, "unified", True),
    # The same with a learnable temperature (LEARNABLE): ∂L/∂γ comes from the same sweeps, no extra
    # GEMM, so the model's unified stands for it.
    "unified_learned_scale": ("unified_loss", {"scale": 20.0, "margin": 0.0}, 2, "unified", True),
    # SigLIP with learnable scale and bias (LEARNABLE), reduction "mean" (open_clip's / N): the dense
    # op of the unified loss (one forward sweep, recompute + two GEMMs backward), so its model too.
    "siglip": ("siglip_loss", {"scale": 10.0, "bias": -10.0}, 2, "unified", True),
    "quintuplet": ("quintuplet_loss", {}, 6, "quintuplet", True),
    "goal": ("goal_loss", {"triplet_weight": "nca", "pair_weight": "sig_ms"}, 2, "goal", True),
    "topk_similar": ("topk_similar", {"k": 10}, 2, "topk_similar", False),
}
#: Keywords of a loss that are learnable: each becomes a float32 0-dim tensor on the device that
#: requires grad, for every method of the row (fused, oracle and the peers).
LEARNABLE: dict[str, tuple[str, ...]] = {"unified_learned_scale": ("scale",), "siglip": ("scale", "bias")}
#: Methods per loss: fused (vse_cuda), oracle (reference), and these peers: the InfoNCE ones beside
#: unified, open_clip's patterns beside the learnable-scalar rows.
PEERS: dict[str, tuple[str, ...]] = {"unified": ("clip_pattern", "inf_cl", "memeff"),
                                     "unified_learned_scale": ("clip_pattern",),
                                     "siglip": ("siglip_pattern",)}
ALL_PEERS = frozenset(method for methods in PEERS.values() for method in methods)
FULL = {"sizes": [8192, 32768, 131072], "dims": [512, 768, 1024], "dtypes": ["bfloat16", "float32"], "warmup": 2,
        "repeats": 10, "budget_s": 150.0}
QUICK = {"sizes": [128], "dims": [16], "dtypes": ["float32", "bfloat16"], "warmup": 1, "repeats": 3,
         "budget_s": 30.0}
CSV_FIELDS = ["loss", "method", "n", "dim", "dtype", "status", "median_ms", "x_gemm", "tflops", "extra_mib",
              "model_ms", "model_gb", "calls", "detail"]


# ----------------------------------------------------------------------------- the calls

def make_inputs(n: int, dim: int, count: int, dtype: torch.dtype, device: torch.device, grad: bool):
    gen = torch.Generator(device="cpu").manual_seed(n * 31 + dim)
    return [F.normalize(torch.randn(n, dim, generator=gen), dim=1).to(device, dtype).requires_grad_(grad)
            for _ in range(count)]


def clip_pattern(img: torch.Tensor, txt: torch.Tensor, scale: float | torch.Tensor = 20.0) -> torch.Tensor:
    """open_clip ``ClipLoss`` (world size 1) written out: local logits both ways, cross-entropy
    against the diagonal, averaged; under autocast, cross-entropy runs in float32."""
    logits = scale * img @ txt.T
    labels = torch.arange(img.size(0), device=img.device)
    return (F.cross_entropy(logits.float(), labels) + F.cross_entropy(logits.T.float(), labels)) / 2


def siglip_pattern(img: torch.Tensor, txt: torch.Tensor, scale: float | torch.Tensor = 10.0,
                   bias: float | torch.Tensor = -10.0) -> torch.Tensor:
    """open_clip ``SigLipLoss`` (world size 1, its ``_loss``) written out: ``logits = scale·img·txtᵀ
    + bias`` and the labels ``2·I − 1`` (``get_ground_truth``) in the input dtype, then
    ``−logsigmoid(labels·logits)`` summed and divided by N. Under autocast only the sum runs in
    float32 (``sum`` is on autocast's float32 list, ``log_sigmoid`` is not): so here (float64
    stays float64)."""
    n = img.size(0)
    logits = scale * img @ txt.T + bias
    labels = -torch.ones((n, n), device=img.device, dtype=img.dtype)
    labels = 2 * torch.eye(n, device=img.device, dtype=img.dtype) + labels
    return -F.logsigmoid(labels * logits).sum(dtype=reference.compute_dtype(img.dtype)) / n


def peer_function(method: str) -> Callable[..., torch.Tensor] | str:
    """The peer's ``f(img, txt, scale[, bias])``, or why it cannot run."""
    if method == "clip_pattern":
        return clip_pattern
    if method == "siglip_pattern":
        return siglip_pattern
    if method == "inf_cl":
        try:
            from inf_cl import cal_inf_loss
        except ImportError as err:
            return f"not importable ({err.__class__.__name__}: carry its wheel, see the docstring)"
        return lambda img, txt, scale: cal_inf_loss(img, txt, scale=scale).mean()
    try:
        import memeff  # noqa: F401
    except ImportError as err:
        return f"not importable ({err.__class__.__name__}: carry its wheel, see the docstring)"
    return "importable, but no adapter to its InfoNCE entry point is written yet"


def loss_keywords(loss: str, device: torch.device) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """The keywords of ``loss``, its LEARNABLE ones as fresh float32 0-dim tensors on ``device``
    that require grad, and the list of those tensors (whose ``.grad`` a call must clear)."""
    kwargs = dict(LOSSES[loss][1])
    params = []
    for name in LEARNABLE.get(loss, ()):
        kwargs[name] = torch.tensor(float(kwargs[name]), dtype=torch.float32, device=device, requires_grad=True)
        params.append(kwargs[name])
    return kwargs, params


def call_for(loss: str, method: str, n: int, dim: int, dtype: torch.dtype, device: torch.device):
    """A zero-argument callable running one forward (+ backward) of ``method``, or a reason."""
    fn_name, _, count, _, backward = LOSSES[loss]
    if method == "gemm":
        a, b = make_inputs(n, dim, 2, dtype, device, grad=False)
        out = torch.empty(n, n, dtype=dtype, device=device)
        return lambda: torch.mm(a, b.T, out=out)
    kwargs, params = loss_keywords(loss, device)
    if method in ALL_PEERS:
        fn = peer_function(method)
        if isinstance(fn, str):
            return fn
        count, kwargs = 2, {k: v for k, v in kwargs.items() if k in ("scale", "bias")}
    else:
        fn = getattr(vse_cuda if method == "fused" else reference, fn_name)
    xs = make_inputs(n, dim, count, dtype, device, grad=backward)

    def run() -> None:
        out = fn(*xs, **kwargs)
        if backward:
            out.backward()
            for x in (*xs, *params):
                x.grad = None

    return run


def measure(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> tuple[float, float]:
    """(median seconds, extra peak bytes) of ``fn``: CUDA events and max_memory_allocated on a
    GPU, wall clock and peak RSS (_harness) on the CPU."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        calls = measure_calls(fn, repeats)
        return statistics.median(calls.seconds), float(max(calls.extra_bytes))
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), float(torch.cuda.max_memory_allocated(device) - base)


def model_cost(loss: str, method: str, n: int, dim: int, dtype: torch.dtype) -> cost_model.Cost:
    if method == "gemm":
        return cost_model.gemm_cost(n, n, dim, dtype)
    if method != "fused":  # the eager patterns materialize N×N: InfoNCE's model stands for them
        return cost_model.loss_cost("eager_infonce", n, dim, dtype, backward=LOSSES[loss][4])
    name, k = LOSSES[loss][3], LOSSES[loss][1].get("k", 1)
    return cost_model.loss_cost(name, n, dim, dtype, k=k)


# ------------------------------------------------------------------------------ the sweep

def check_on_device(device: torch.device) -> dict[str, str]:
    """Every loss, fused against the oracle, N=256, float32, on ``device``: loss name -> problem.
    A loss with LEARNABLE keywords is also checked on their gradients."""
    problems = {}
    for loss, (fn_name, _, count, _, _) in LOSSES.items():
        xs = make_inputs(256, 32, count, torch.float32, device, grad=False)
        kwargs, params = loss_keywords(loss, device)
        got = getattr(vse_cuda, fn_name)(*xs, **kwargs)
        want_kwargs, want_params = loss_keywords(loss, device)
        want = getattr(reference, fn_name)(*xs, **want_kwargs)
        got, want = (got[0], want[0]) if isinstance(got, tuple) else (got, want)
        if not torch.allclose(got.double().cpu(), want.double().cpu(), rtol=1e-4, atol=1e-4):
            problems[loss] = f"differs from the oracle at N=256 (max |Δ| {(got - want).abs().max().item():.3g})"
        elif params and (why := _learnable_gradients_differ(loss, got, want, params, want_params)):
            problems[loss] = why
    return problems


def _learnable_gradients_differ(loss: str, got, want, params, want_params) -> str:
    """Why the fused loss's gradients of its learnable scalars differ from the oracle's ('' if not)."""
    want.backward()
    if not got.requires_grad:
        return "differs from the oracle at N=256: no gradient reaches " + ", ".join(LEARNABLE[loss])
    got.backward()
    for name, p, q in zip(LEARNABLE[loss], params, want_params):
        if p.grad is None or not torch.allclose(p.grad.double().cpu(), q.grad.double().cpu(), rtol=1e-4, atol=1e-4):
            seen = "none" if p.grad is None else f"{p.grad.item():.6g}"
            return f"d{name} differs from the oracle at N=256 ({seen} vs {q.grad.item():.6g})"
    return ""


def methods_for(loss: str) -> list[str]:
    return ["fused", "oracle", *PEERS.get(loss, ())]


def free_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    from _harness import available_memory_bytes

    return float(available_memory_bytes() or 0)


def run_sweep(args: argparse.Namespace, device: torch.device, rate_device: cost_model.Device) -> list[dict]:
    rows: list[dict] = []
    deadline = time.perf_counter() + args.budget_s
    problems = check_on_device(device)
    calls = args.warmup + args.repeats
    for n in sorted(args.sizes):
        for dim in args.dims:
            for dtype_name in args.dtypes:
                dtype = getattr(torch, dtype_name)
                if n > args.fp32_max_n and dtype == torch.float32:
                    continue
                gemm_s = None
                for loss in ["gemm", *LOSSES]:
                    for method in (["gemm"] if loss == "gemm" else methods_for(loss)):
                        key = loss if loss != "gemm" else "triplet_hardest"
                        cost = model_cost(key, method, n, dim, dtype)
                        row = {"loss": loss, "method": method, "n": n, "dim": dim, "dtype": dtype_name,
                               "model_ms": 1e3 * cost.seconds(rate_device), "model_gb": cost.bytes / 1e9,
                               "calls": 0, "detail": ""}
                        row.update(run_case(key, method, n, dim, dtype, device, cost, rate_device, deadline,
                                            calls, args, problems))
                        if method == "gemm" and row["status"] == "ok":
                            gemm_s = row["median_ms"] / 1e3
                        if row.get("median_ms") and gemm_s:
                            row["x_gemm"] = row["median_ms"] / 1e3 / gemm_s
                        rows.append(row)
                        print(f"[bench_gpu] {loss} {method} N={n} D={dim} {dtype_name}: {row['status']} "
                              f"{fmt(row.get('median_ms'), '.3f')} ms (model {row['model_ms']:.3f} ms) {row['detail']}",
                              flush=True)
    return rows


def run_case(loss, method, n, dim, dtype, device, cost, rate_device, deadline, calls, args, problems) -> dict:
    left = deadline - time.perf_counter()
    predicted = cost.seconds(rate_device) * calls
    if predicted > left:
        return {"status": "skipped", "detail": f"model predicts {predicted:.1f} s for {calls} calls, {left:.1f} s "
                                                f"of the budget left"}
    if method != "fused" and method != "gemm" and n * n * 4 * 4 > args.mem_fraction * free_bytes(device):
        return {"status": "skipped", "detail": "would OOM: its N×N float32 tensors exceed the free memory"}
    if method == "gemm" and n * n * dtype.itemsize > args.mem_fraction * free_bytes(device):
        return {"status": "skipped", "detail": "the N×N output does not fit in the free memory"}
    fn = call_for(loss, method, n, dim, dtype, device)
    if isinstance(fn, str):
        return {"status": "skipped", "detail": fn}
    try:
        seconds, extra = measure(fn, device, args.warmup, args.repeats)
    except torch.OutOfMemoryError as err:
        return {"status": "oom", "detail": str(err).splitlines()[0][:120]}
    except Exception as err:  # recorded, the sweep goes on
        return {"status": "error", "detail": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
    finally:
        fn = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    status = "WRONG" if method == "fused" and loss in problems else "ok"
    return {"status": status, "median_ms": 1e3 * seconds, "extra_mib": extra / 2**20,
            "tflops": cost.flops / seconds / 1e12, "calls": calls,
            "detail": problems.get(loss, "") if method == "fused" else ""}


# ------------------------------------------------------------------------------ reports

def write_reports(rows: list[dict], out_dir: Path, stem: str, header: list[str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / f"{stem}.csv", CSV_FIELDS, rows)
    lines = [*header, ""] + table(
        ["loss", "method", "N", "D", "dtype", "status", "median ms", "× GEMM", "TFLOP/s", "extra MiB", "model ms",
         "model GB", "detail"], "llrrllrrrrrrl",
        ([r["loss"], r["method"], r["n"], r["dim"], r["dtype"], r["status"], fmt(r.get("median_ms"), ".3f"),
          fmt(r.get("x_gemm"), ".2f"), fmt(r.get("tflops"), ".3g"), fmt(r.get("extra_mib"), ".1f"),
          f"{r['model_ms']:.3f}", f"{r['model_gb']:.3f}", r["detail"]] for r in rows))
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = new_parser(__doc__, show_defaults=False)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", type=int, nargs="+")
    p.add_argument("--dims", type=int, nargs="+")
    p.add_argument("--dtypes", nargs="+", choices=["bfloat16", "float32"])
    p.add_argument("--fp32-max-n", type=int, default=32768, help="float32 cases only up to this N")
    p.add_argument("--budget-s", type=float, help="seconds the sweep may take, by the model's predictions "
                                                  "(default 150)")
    p.add_argument("--mem-fraction", type=float, default=0.8)
    add_common_arguments(p, stem="bench_gpu", defaults=FULL, quick=QUICK, warmup=None, seed=False, out_dir=None)
    args = parse_profile(p, argv, FULL, QUICK)
    if args.budget_s <= 0:
        p.error("need --budget-s > 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA GPU; use --device cpu")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        rate_device, what = cost_model.get_device("h200-measured"), torch.cuda.get_device_name(device)
    else:
        rate_device, what = cost_model.measure_cpu_device(gemm_size=256, copy_mib=32), "CPU (wall clock)"
    info = machine_info(torch.get_num_threads())
    started = time.perf_counter()
    rows = run_sweep(args, device, rate_device)
    header = [f"# bench_gpu: {what}, {info['torch']}, {info['date']}",
              "", f"Command: `python benchmarks/bench_gpu.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
              f"Load (1-min) {os.getloadavg()[0]:.1f}; sweep {time.perf_counter() - started:.0f} s; backends "
              f"{vse_cuda.backends()}; model device `{rate_device.name}` ({rate_device.note}).",
              "", "median ms: CUDA events (GPU) or wall clock (CPU), median of the measured calls; × GEMM: ÷ the "
              "`gemm` row of the same shape; TFLOP/s: the model's GEMM FLOPs ÷ median; model ms / model GB: "
              "the cost model's prediction (not a measurement)."]
    stem = "bench_gpu" if device.type == "cuda" else "bench_gpu_cpu"
    write_reports(rows, args.out_dir, stem, header)
    print((args.out_dir / f"{stem}.md").read_text())
    return 1 if any(r["status"] in ("WRONG", "error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
