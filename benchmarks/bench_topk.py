"""topk_similar against faiss-cpu and a materialized baseline (DESIGN §8: at least as fast as
faiss-cpu ``IndexFlatIP.search`` on the same data).

Methods, each (method, configuration) measured in a fresh process by ``_harness.run_isolated``:

- ``vse_cuda``: ``vse_cuda.topk_similar(queries, keys, k)`` (GEMM tiles + fused per-row top-k);
- ``faiss``: ``faiss.IndexFlatIP.search`` (index built outside the timed call), with
  ``faiss.omp_set_num_threads`` set to torch's thread count;
- ``materialized``: ``torch.topk(queries @ keys.T, k)``, the whole N×M S in memory;
- ``gemm_floor``: the GEMMs alone of the tiles vse_cuda computes (``torch.mm`` per tile, no
  selection), measured once per shape: the floor any tiled method pays, so
  ``vse_cuda - gemm_floor`` is the time of the selection and its overheads.

vse_cuda's and the materialized top-k values are checked against faiss's (max abs difference,
fraction of identical indices); a difference above ``VALUE_TOLERANCE`` marks the row WRONG and
makes the script exit with status 1, so a fast but wrong result cannot pass.

Usage (from the repository root)::

    python benchmarks/bench_topk.py                 # 20k x 200k, D=256, k in {10, 100, 2000}
    python benchmarks/bench_topk.py --quick         # tiny smoke run, < 30 s
    python benchmarks/bench_topk.py --skip-materialized --k 10 100

Writes ``<out-dir>/topk.csv``, ``topk.md`` and, when matplotlib is installed, ``topk.png``
(``topk_quick.*`` with ``--quick``, so a smoke run never overwrites the real table).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from _harness import Measurement, available_memory_bytes, machine_info, run_isolated, shared_machine_note
from _report import (add_common_arguments, fmt, heading, new_parser, parse_profile, pct, print_written, pyplot,
                     save_figure, start_run, status_cell, table, write_csv)

METHODS = ("vse_cuda", "faiss", "materialized", "gemm_floor")
#: Largest |value difference| to faiss accepted for unit-norm float32 data (GEMM rounding).
VALUE_TOLERANCE = 1e-4
#: Wall-clock limit of one (method, configuration) subprocess.
CASE_TIMEOUT_S = 3600
DEFAULTS = {"queries": 20_000, "keys": 200_000, "dim": 256, "k": [10, 100, 2000], "repeats": 3}
QUICK = {"queries": 512, "keys": 8192, "dim": 64, "k": [10, 100], "repeats": 2}
_MiB = 2**20
_GiB = 2**30


def make_data(queries: int, keys: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded L2-normalized Gaussian queries [queries, dim] and keys [keys, dim], float32."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(queries, dim, generator=gen), dim=1)
    kv = torch.nn.functional.normalize(torch.randn(keys, dim, generator=gen), dim=1)
    return q, kv


def make_case(method: str, queries: int, keys: int, dim: int, k: int, seed: int,
              threads: int) -> Callable[[], Any]:
    """Harness factory: builds the data (and faiss index) and returns the call to measure.

    The call returns ``(values, indices)``, except ``gemm_floor`` which returns None.
    """
    q, kv = make_data(queries, keys, dim, seed)
    if method == "vse_cuda":
        import vse_cuda

        return lambda: vse_cuda.topk_similar(q, kv, k)
    if method == "faiss":
        import faiss

        faiss.omp_set_num_threads(threads)
        index = faiss.IndexFlatIP(dim)
        index.add(kv.numpy())
        q_np = q.numpy()

        def search() -> tuple[torch.Tensor, torch.Tensor]:
            values, indices = index.search(q_np, k)
            return torch.from_numpy(values), torch.from_numpy(indices)

        return search
    if method == "materialized":
        def materialized() -> tuple[torch.Tensor, torch.Tensor]:
            values, indices = torch.topk(q @ kv.T, k, dim=1)
            return values, indices

        return materialized
    if method == "gemm_floor":
        from vse_cuda._chunking import plan_chunks

        chunks = plan_chunks(queries, keys, q.dtype)

        def gemm_floor() -> None:
            for r0 in range(0, queries, chunks.rows):
                for c0 in range(0, keys, chunks.cols):
                    torch.mm(q[r0:r0 + chunks.rows], kv[c0:c0 + chunks.cols].T)

        return gemm_floor
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def compare(result: Path, reference: Path) -> tuple[float, float]:
    """(max |values - reference values|, fraction of equal indices) of two saved results."""
    values, indices = torch.load(result)
    ref_values, ref_indices = torch.load(reference)
    diff = (values.float() - ref_values.float()).abs().max().item()
    same = (indices == ref_indices).double().mean().item()
    return diff, same


def run_config(args: argparse.Namespace, methods: list[str], k: int,
               floor: tuple[Measurement, float] | None, tmp: Path) -> list[dict[str, Any]]:
    """Measure every method at one k and return one table row per method.

    ``floor`` is the gemm_floor measurement (made once for every k) and the load before it.
    """
    shape = {"queries": args.queries, "keys": args.keys, "dim": args.dim}
    measured: dict[str, Measurement] = {}
    saved: dict[str, Path] = {}
    loads: dict[str, float] = {}
    for method in methods:
        if method == "gemm_floor":
            measured[method], loads[method] = floor
            continue
        if method == "materialized":
            skip = materialized_skip_reason(args.queries, args.keys, k)
            if skip:
                measured[method] = Measurement("skipped", detail=skip)
                print(f"[bench_topk] k={k} {method}: skipped, {skip}", flush=True)
                continue
        saved[method] = tmp / f"{method}_k{k}.pt"
        loads[method] = os.getloadavg()[0]
        measured[method] = run_isolated("bench_topk:make_case",
                                        {"method": method, **shape, "k": k, "seed": args.seed,
                                         "threads": args.threads},
                                        repeats=args.repeats, warmup=args.warmup,
                                        threads=args.threads, timeout_s=CASE_TIMEOUT_S,
                                        save_result=saved[method])
        m = measured[method]
        print(f"[bench_topk] k={k} {method}: {m.status} {fmt(m.median_s, '.3f')} s, extra peak "
              f"{fmt(m.extra_peak_mib, '.0f')} MiB {m.detail}", flush=True)
    faiss_ok = "faiss" in measured and measured["faiss"].ok
    rows = []
    for method, m in measured.items():
        row: dict[str, Any] = {**shape, "k": k, "dtype": "float32", "threads": args.threads,
                               "method": method, "status": m.status, "detail": m.detail,
                               "seconds": m.median_s, "all_seconds": m.seconds,
                               "cpu_seconds": m.median_cpu_s,
                               "extra_peak_mib": m.extra_peak_mib,
                               "max_abs_diff_vs_faiss": None, "same_indices_vs_faiss": None,
                               "load_before": loads.get(method)}
        if m.ok and faiss_ok and method in ("vse_cuda", "materialized"):
            diff, same = compare(saved[method], saved["faiss"])
            row["max_abs_diff_vs_faiss"], row["same_indices_vs_faiss"] = diff, same
            if not diff <= VALUE_TOLERANCE:  # also catches NaN
                row["status"], row["detail"] = "WRONG", f"values differ from faiss by {diff:.3g}"
        rows.append(row)
    for path in saved.values():
        path.unlink(missing_ok=True)
    for row in rows:
        row["ratio_to_faiss"] = _ratio(row, rows, "faiss")
        row["ratio_to_vse_cuda"] = _ratio(row, rows, "vse_cuda")
    return rows


def materialized_skip_reason(queries: int, keys: int, k: int) -> str:
    """Why the materialized baseline should not be started (empty when it may run): its S
    would not fit in the memory available now, and starting it would only wake the OOM killer."""
    need = queries * keys * 4 + queries * k * 12
    available = available_memory_bytes()
    if available is not None and need > available:
        return f"S needs {need / _GiB:.1f} GiB, {available / _GiB:.1f} GiB available"
    return ""


def _ratio(row: dict[str, Any], rows: list[dict[str, Any]], method: str) -> float | None:
    base = next((r["seconds"] for r in rows if r["method"] == method and r["status"] == "ok"), None)
    if row["seconds"] is None or not base:
        return None
    return row["seconds"] / base


#: One line per (configuration, method), every measured call in ``all_seconds``.
CSV_FIELDS = ["queries", "keys", "dim", "k", "dtype", "threads", "method", "status", "seconds", "cpu_seconds",
              "ratio_to_faiss", "ratio_to_vse_cuda", "extra_peak_mib", "max_abs_diff_vs_faiss", "same_indices_vs_faiss",
              "load_before", "all_seconds", "detail"]


def write_markdown(rows: list[dict[str, Any]], path: Path, args: argparse.Namespace,
                   command: str, info: dict[str, str]) -> None:
    """The results table, how it was measured, and the selection time (vse_cuda - GEMM floor)."""
    lines = heading("topk_similar vs faiss-cpu IndexFlatIP vs materialized S + torch.topk", command) + [
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory']}; "
        f"{info['threads']} threads for every method; torch {info['torch']}, faiss-cpu "
        f"{info['faiss-cpu']}, numpy {info['numpy']}, Python {info['python']}; {info['date']}.",
        "",
        f"Data: queries {args.queries} × {args.dim}, keys {args.keys} × {args.dim}, float32, "
        f"L2-normalized Gaussian (seed {args.seed}). Seconds: median of {args.repeats} calls after "
        f"{args.warmup} warm-up, each (method, configuration) in a fresh process. Extra peak: "
        "peak RSS during the call minus RSS before it (data and faiss index excluded). Ratios: "
        "seconds / the same k's faiss (or vse_cuda) seconds; > 1 is slower. CPU s: median "
        "process CPU time (user + system, all threads) of a call. `gemm_floor` is the "
        "tile GEMMs of vse_cuda without selection, measured once per shape. max |Δ| and "
        "same idx: top-k values and indices against faiss's. load: the 1-minute load average "
        "just before the case (this benchmark itself adds about its thread count; more means "
        "other processes shared the CPU).",
        "",
    ]
    lines += table(
        ["N × M × D", "k", "method", "seconds", "× faiss", "× vse_cuda", "CPU s", "extra peak MiB",
         "max abs Δ vs faiss", "same idx", "load", "status"], "lrlrrrrrrrrl",
        ([f"{r['queries']} × {r['keys']} × {r['dim']}", r["k"], r["method"], fmt(r["seconds"], ".3f"),
          fmt(r["ratio_to_faiss"], ".2f"), fmt(r["ratio_to_vse_cuda"], ".2f"), fmt(r["cpu_seconds"], ".3g"),
          fmt(r["extra_peak_mib"], ".0f"), fmt(r["max_abs_diff_vs_faiss"], ".2e"),
          pct(r["same_indices_vs_faiss"]), fmt(r["load_before"], ".1f"), status_cell(r)] for r in rows))
    lines += shared_machine_note([r["load_before"] for r in rows], args.threads)
    split = _time_split(rows)
    if split:
        flops = 2 * args.queries * args.keys * args.dim
        lines += ["", "Where vse_cuda's time goes (GEMM floor = the same tiles' torch.mm alone):", ""]
        lines += table(["k", "vse_cuda s", "GEMM floor s", "selection + overhead s", "share", "GEMM GFLOP/s"],
                       "rrrrrr", ([k, f"{total:.3f}", f"{floor:.3f}", f"{total - floor:.3f}",
                                   f"{100 * (total - floor) / total:.0f}%", f"{flops / floor / 1e9:.0f}"]
                                  for k, total, floor in split))
    path.write_text("\n".join(lines) + "\n")


def _time_split(rows: list[dict[str, Any]]) -> list[tuple[int, float, float]]:
    """(k, vse_cuda seconds, GEMM floor seconds) for every k where both were measured."""
    out = []
    for k in sorted({r["k"] for r in rows}):
        times = {r["method"]: r["seconds"] for r in rows if r["k"] == k and r["status"] == "ok"}
        if "vse_cuda" in times and "gemm_floor" in times:
            out.append((k, times["vse_cuda"], times["gemm_floor"]))
    return out


def write_plot(rows: list[dict[str, Any]], path: Path) -> bool:
    """Grouped bar chart of seconds per method and k; False when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    ks = sorted({r["k"] for r in rows})
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, method in enumerate(methods):
        cells = [next((r for r in rows if r["k"] == k and r["method"] == method), None) for k in ks]
        xs = [x + i * width for x in range(len(ks))]
        ax.bar(xs, [(c or {}).get("seconds") or 0.0 for c in cells], width, label=method)
        for x, cell in zip(xs, cells):
            if cell is not None and cell["status"] != "ok":  # name what is missing or wrong
                ax.text(x, 0, cell["status"], rotation=90, ha="center", va="bottom", fontsize=8)
    ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(ks))], [f"k={k}" for k in ks])
    ax.set_ylabel("seconds (median)")
    r0 = rows[0]
    ax.set_title(f"top-k of {r0['queries']} × {r0['keys']} × {r0['dim']} fp32, {r0['threads']} threads")
    ax.legend()
    return save_figure(fig, path, dpi=120)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = new_parser(__doc__)
    parser.add_argument("--queries", type=int, help=f"query rows N (default {DEFAULTS['queries']})")
    parser.add_argument("--keys", type=int, help=f"key rows M (default {DEFAULTS['keys']})")
    parser.add_argument("--dim", type=int, help=f"embedding width D (default {DEFAULTS['dim']})")
    parser.add_argument("--k", type=int, nargs="+", help=f"k values (default {DEFAULTS['k']})")
    add_common_arguments(parser, stem="topk", defaults=DEFAULTS, quick=QUICK,
                         threads=(torch.get_num_threads(), "torch, MKL and faiss alike"))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="methods to run")
    parser.add_argument("--skip-materialized", action="store_true",
                        help="do not run the materialized baseline (its S is N×M×4 bytes)")
    args = parse_profile(parser, argv, DEFAULTS, QUICK)
    if args.skip_materialized and "materialized" in args.methods:
        args.methods.remove("materialized")
    for name in ("queries", "keys", "dim"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if any(k < 1 or k > args.keys for k in args.k):
        parser.error(f"every --k must be in [1, --keys={args.keys}]")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 1 when a method's results disagree with faiss's."""
    args = parse_args(argv)
    command, stem = start_run(args, argv, "topk")
    floor = None
    if "gemm_floor" in args.methods:
        print("[bench_topk] gemm_floor ...", flush=True)
        load = os.getloadavg()[0]
        floor = run_isolated("bench_topk:make_case",
                             {"method": "gemm_floor", "queries": args.queries, "keys": args.keys,
                              "dim": args.dim, "k": 1, "seed": args.seed, "threads": args.threads},
                             repeats=args.repeats, warmup=args.warmup, threads=args.threads,
                             timeout_s=CASE_TIMEOUT_S), load
        print(f"[bench_topk] gemm_floor: {floor[0].status} {fmt(floor[0].median_s, '.3f')} s "
              f"{floor[0].detail}", flush=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_topk_") as tmp:
        for k in args.k:
            rows += run_config(args, args.methods, k, floor, Path(tmp))
    info = machine_info(args.threads, ("faiss-cpu", "numpy"))
    write_csv(args.out_dir / f"{stem}.csv", CSV_FIELDS, rows, joined={"all_seconds": ".4f"})
    write_markdown(rows, args.out_dir / f"{stem}.md", args, command, info)
    print_written("bench_topk", args.out_dir, stem, write_plot(rows, args.out_dir / f"{stem}.png"))
    return 1 if any(r["status"] == "WRONG" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
