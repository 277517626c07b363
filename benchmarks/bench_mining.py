"""AOQ offline mining (spec §3.1): ``vse_cuda.mining.offline_candidates`` against the official
tool's row-by-row style and faiss-cpu, on COCO-like sizes.

Methods, each measured in a fresh process by ``_harness.run_isolated``:

- ``vse_cuda``: ``offline_candidates(images, captions, cap_to_img, k_i2t=, k_t2i=)``, both
  directions in one call (GEMM tiles + fused top-k with label exclusion).
- ``faiss``: ``faiss.IndexFlatIP.search``, an index over the captions for i2t and over the
  images for t2i (built outside the timed call). faiss cannot exclude an anchor's own items,
  so each query over-fetches k + the most own items any query has (the largest per-image
  caption count for i2t, 1 for t2i), drops its own ones keeping the order of the rest (a
  stable argsort of the "own" mask) and keeps the first k: exact, as at most that many can go.
- ``official`` (i2t and t2i measured separately): the released AOQ tool's loop, one query at
  a time: ``s = torch.mv(keys, query)``, own items set to -inf, ``torch.topk(s, k)``. In full
  it would take hours here, so it runs on a seeded random subset of query rows and its time is
  **extrapolated linearly** to all rows (time × rows / subset: every row costs the same mat-vec
  and top-k); its extra peak memory is the subset's plus the output rows it did not write
  (rows − subset) × k × 8 bytes. (The released tool computes in fp16 on a GPU; fp32 here, as
  for the other methods.)

Agreement: the fraction of identical entries (same index at the same rank) and of shared
entries (same index anywhere in the row) between each method's lists and vse_cuda's, per
direction; the official style is compared on its subset rows.

Data: L2-normalized Gaussian images; each caption is its image plus Gaussian noise of the
same norm, renormalized (own captions are then the nearest, as in trained models, so the own
exclusion matters), 5 captions per image in blocks (caption c belongs to image c // 5).

Usage (from the repository root)::

    python benchmarks/bench_mining.py            # 20k images x 100k captions, D=1024, k 2000 / 400
    python benchmarks/bench_mining.py --quick    # small smoke run (writes mining_quick.*)

Writes ``<out-dir>/mining.csv``, ``mining.md`` and ``mining.png`` (``mining_quick.*`` with
``--quick``). Exits with status 1 when faiss and vse_cuda disagree on more than
``MIN_SET_AGREEMENT`` of the entries (a wrong but fast result must not pass).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from _harness import Measurement, machine_info, run_isolated, shared_machine_note
from _report import (add_common_arguments, fmt, heading, new_parser, parse_profile, pct, print_written, pyplot,
                     save_figure, start_run, status_cell, table, write_csv)

CASE_TIMEOUT_S = 3600
#: Smallest fraction of shared entries with vse_cuda accepted from faiss (fp32 GEMMs of
#: different blocking reorder near-ties at the end of a list; anything lower is a bug).
MIN_SET_AGREEMENT = 0.99
DEFAULTS = {"images": 20_000, "per_image": 5, "dim": 1024, "k_i2t": 2000, "k_t2i": 400,
            "subset_i2t": 200, "subset_t2i": 1000, "repeats": 1, "warmup": 0}
QUICK = {"images": 400, "per_image": 5, "dim": 64, "k_i2t": 200, "k_t2i": 40,
         "subset_i2t": 40, "subset_t2i": 200, "repeats": 2, "warmup": 1}
_MiB = 2**20


def make_data(images: int, per_image: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images [I, D], captions [I·P, D], cap_to_img [I·P]) as described in the module doc."""
    gen = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(images, dim, generator=gen), dim=1)
    cap_to_img = torch.arange(images * per_image) // per_image
    noise = torch.nn.functional.normalize(torch.randn(images * per_image, dim, generator=gen), dim=1)
    cap = torch.nn.functional.normalize(img[cap_to_img] + noise, dim=1)
    return img, cap, cap_to_img


def make_case(method: str, images: int, per_image: int, dim: int, k_i2t: int, k_t2i: int,
              subset: int, seed: int, threads: int) -> Callable[[], Any]:
    """Harness factory: data (and faiss indexes) outside the timing; returns the call.

    vse_cuda and faiss return ``(i2t, t2i)``; official_* return ``(rows, lists)``."""
    img, cap, cap_to_img = make_data(images, per_image, dim, seed)
    if method == "vse_cuda":
        from vse_cuda import mining

        return lambda: mining.offline_candidates(img, cap, cap_to_img, k_i2t=k_i2t, k_t2i=k_t2i, progress=False)
    if method == "faiss":
        return _faiss_case(img, cap, cap_to_img, k_i2t, k_t2i, threads)
    if method in ("official_i2t", "official_t2i"):
        rows = torch.randperm(images if method == "official_i2t" else cap.size(0),
                              generator=torch.Generator().manual_seed(seed + 1))[:subset].sort().values
        if method == "official_i2t":
            return lambda: (rows, _official_i2t(img, cap, per_image, k_i2t, rows))
        return lambda: (rows, _official_t2i(img, cap, cap_to_img, k_t2i, rows))
    raise ValueError(f"unknown method {method!r}")


def _official_i2t(img: torch.Tensor, cap: torch.Tensor, per_image: int, k: int, rows: torch.Tensor) -> torch.Tensor:
    """One mat-vec and one torch.topk per image, its own (block of) captions masked."""
    out = torch.empty(rows.numel(), k, dtype=torch.int64)
    for j, i in enumerate(rows.tolist()):
        s = torch.mv(cap, img[i])
        s[i * per_image:(i + 1) * per_image] = float("-inf")
        out[j] = torch.topk(s, k).indices
    return out


def _official_t2i(img: torch.Tensor, cap: torch.Tensor, cap_to_img: torch.Tensor, k: int,
                  rows: torch.Tensor) -> torch.Tensor:
    """One mat-vec and one torch.topk per caption, its own image masked."""
    out = torch.empty(rows.numel(), k, dtype=torch.int64)
    for j, c in enumerate(rows.tolist()):
        s = torch.mv(img, cap[c])
        s[cap_to_img[c]] = float("-inf")
        out[j] = torch.topk(s, k).indices
    return out


def _faiss_case(img: torch.Tensor, cap: torch.Tensor, cap_to_img: torch.Tensor, k_i2t: int, k_t2i: int,
                threads: int) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    import faiss

    faiss.omp_set_num_threads(threads)
    cap_index, img_index = faiss.IndexFlatIP(cap.size(1)), faiss.IndexFlatIP(img.size(1))
    cap_index.add(cap.numpy())
    img_index.add(img.numpy())
    img_np, cap_np = img.numpy(), cap.numpy()
    img_ids = torch.arange(img.size(0))
    most_owned = int(torch.bincount(cap_to_img).max())

    def search() -> tuple[torch.Tensor, torch.Tensor]:
        _, found = cap_index.search(img_np, k_i2t + most_owned)
        i2t = _drop_own(torch.from_numpy(found), cap_to_img, img_ids, k_i2t)
        _, found = img_index.search(cap_np, k_t2i + 1)
        t2i = _drop_own(torch.from_numpy(found), img_ids, cap_to_img, k_t2i)
        return i2t, t2i

    return search


def _drop_own(found: torch.Tensor, key_owner: torch.Tensor, query_owner: torch.Tensor, k: int) -> torch.Tensor:
    """The first k entries of each row whose key is not the query's own, order kept."""
    own = key_owner[found] == query_owner[:, None]
    keep_first = torch.argsort(own.to(torch.int8), dim=1, stable=True)[:, :k]
    return found.gather(1, keep_first)


def agreement(lists: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(fraction of identical entries at the same rank, fraction of entries also in the
    reference's row) of two [N, k] index lists."""
    same_rank = (lists == reference).double().mean().item()
    ref_sorted = reference.sort(dim=1).values
    pos = torch.searchsorted(ref_sorted, lists).clamp(max=reference.size(1) - 1)
    shared = (ref_sorted.gather(1, pos) == lists).double().mean().item()
    return same_rank, shared


def run_all(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    """Measure every case and return one table row per (method, direction)."""
    shape = {"images": args.images, "per_image": args.per_image, "dim": args.dim,
             "k_i2t": args.k_i2t, "k_t2i": args.k_t2i, "seed": args.seed, "threads": args.threads}
    cases = {"vse_cuda": 0, "faiss": 0, "official_i2t": args.subset_i2t, "official_t2i": args.subset_t2i}
    measured, loads, saved = {}, {}, {}
    for method, subset in cases.items():
        saved[method] = tmp / f"{method}.pt"
        loads[method] = os.getloadavg()[0]
        print(f"[bench_mining] {method} ...", flush=True)
        measured[method] = run_isolated("bench_mining:make_case", {"method": method, "subset": subset, **shape},
                                        repeats=args.repeats, warmup=args.warmup, threads=args.threads,
                                        timeout_s=CASE_TIMEOUT_S, save_result=saved[method])
        m = measured[method]
        print(f"[bench_mining] {method}: {m.status} {fmt(m.median_s, '.2f')} s, extra peak "
              f"{fmt(m.extra_peak_mib, '.0f')} MiB {m.detail}", flush=True)
    return _rows(args, measured, loads, saved)


def _rows(args: argparse.Namespace, measured: dict[str, Measurement], loads: dict[str, float],
          saved: dict[str, Path]) -> list[dict[str, Any]]:
    ours = torch.load(saved["vse_cuda"]) if measured["vse_cuda"].ok else None
    n_cap = args.images * args.per_image
    rows = [_row("vse_cuda", "both", args.images + n_cap, measured["vse_cuda"], loads["vse_cuda"], 1.0, 0)]
    faiss_row = _row("faiss", "both", args.images + n_cap, measured["faiss"], loads["faiss"], 1.0, 0)
    if ours is not None and measured["faiss"].ok:
        theirs = torch.load(saved["faiss"])
        for i, direction in enumerate(("i2t", "t2i")):
            faiss_row[f"same_rank_{direction}"], faiss_row[f"shared_{direction}"] = agreement(theirs[i], ours[i])
    rows.append(faiss_row)
    for i, (direction, n, k) in enumerate((("i2t", args.images, args.k_i2t), ("t2i", n_cap, args.k_t2i))):
        method = f"official_{direction}"
        m = measured[method]
        row = _row("official", direction, getattr(args, f"subset_{direction}"), m, loads[method],
                   n / getattr(args, f"subset_{direction}"), (n - getattr(args, f"subset_{direction}")) * k * 8)
        if ours is not None and m.ok:
            subset_rows, lists = torch.load(saved[method])
            row[f"same_rank_{direction}"], row[f"shared_{direction}"] = agreement(lists, ours[i][subset_rows])
        rows.append(row)
    rows.append(_official_total(rows[-2:], args.images * args.k_i2t * 8 / _MiB))
    base = rows[0]["seconds"]
    for row in rows:
        row["ratio_to_vse_cuda"] = row["seconds"] / base if row["seconds"] and base else None
    return rows


def _row(method: str, direction: str, timed_rows: int, m: Measurement, load: float, scale: float,
         missing_output_bytes: int) -> dict[str, Any]:
    """One table row; ``scale`` > 1 extrapolates a subset's time (and CPU time) to all rows."""
    extrapolated = scale != 1.0
    return {"method": method, "direction": direction, "timed_rows": timed_rows, "status": m.status,
            "detail": m.detail, "extrapolated": extrapolated,
            "seconds": None if m.median_s is None else m.median_s * scale,
            "cpu_seconds": None if m.median_cpu_s is None else m.median_cpu_s * scale,
            "measured_seconds": m.median_s,
            "extra_peak_mib": None if m.extra_peak_bytes is None else (m.extra_peak_bytes + missing_output_bytes) / _MiB,
            "same_rank_i2t": None, "shared_i2t": None, "same_rank_t2i": None, "shared_t2i": None,
            "load_before": load}


def _official_total(parts: list[dict[str, Any]], i2t_output_mib: float) -> dict[str, Any]:
    """Both directions of the official style, i2t then t2i: seconds add up; the t2i loop runs
    while the finished i2t output is held, so the peak is max(i2t peak, i2t output + t2i peak)."""
    ok = all(p["status"] == "ok" for p in parts)
    row = {**parts[0], "direction": "both", "timed_rows": sum(p["timed_rows"] for p in parts),
           "status": "ok" if ok else "incomplete", "detail": "" if ok else "a direction failed",
           "measured_seconds": None, "load_before": max(p["load_before"] for p in parts)}
    for key in ("same_rank_i2t", "shared_i2t"):
        row[key] = parts[0][key]
    for key in ("same_rank_t2i", "shared_t2i"):
        row[key] = parts[1][key]
    if ok:
        row["seconds"] = sum(p["seconds"] for p in parts)
        row["cpu_seconds"] = sum(p["cpu_seconds"] for p in parts)
        row["extra_peak_mib"] = max(parts[0]["extra_peak_mib"], i2t_output_mib + parts[1]["extra_peak_mib"])
    return row


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}" if value < 10 else f"{value:.1f}"


CSV_FIELDS = ["method", "direction", "timed_rows", "extrapolated", "seconds", "measured_seconds", "cpu_seconds",
              "ratio_to_vse_cuda", "extra_peak_mib", "same_rank_i2t", "shared_i2t", "same_rank_t2i",
              "shared_t2i", "load_before", "status", "detail"]


def csv_config(args: argparse.Namespace) -> dict[str, Any]:
    """The run's configuration: the first columns of every CSV line."""
    return {"images": args.images, "captions": args.images * args.per_image, "dim": args.dim,
            "k_i2t": args.k_i2t, "k_t2i": args.k_t2i, "dtype": "float32", "threads": args.threads}


def write_markdown(rows: list[dict[str, Any]], path: Path, args: argparse.Namespace, command: str,
                   info: dict[str, str]) -> None:
    n_cap = args.images * args.per_image
    lines = heading("AOQ offline mining: offline_candidates vs the official row-by-row loop vs faiss-cpu", command) + [
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory']}; {info['threads']} threads for "
        f"every method; torch {info['torch']}, faiss-cpu {info['faiss-cpu']}, Python {info['python']}; "
        f"{info['date']}.", "",
        f"Data: {args.images} images × {n_cap} captions ({args.per_image} per image), D={args.dim}, float32, "
        f"unit-norm, captions near their image (seed {args.seed}); k_i2t={args.k_i2t} captions per image, "
        f"k_t2i={args.k_t2i} images per caption, own ones excluded. Seconds: median of {args.repeats} call(s) "
        f"after {args.warmup} warm-up, each case in a fresh process. **Official rows are extrapolated**: "
        f"timed on {args.subset_i2t} random images (i2t) and {args.subset_t2i} random captions (t2i), "
        "scaled linearly to all rows; their memory adds the output rows not written. Extra peak: peak RSS "
        "during the call minus RSS before it (inputs and faiss indexes excluded; the int64 outputs, "
        f"{(args.images * args.k_i2t + n_cap * args.k_t2i) * 8 / _MiB:.0f} MiB, included). Agreement: "
        "same rank = identical index at the same position as vse_cuda's list; shared = index anywhere in "
        "vse_cuda's row. load: 1-minute load average before the case.", "",
    ]
    lines += table(
        ["method", "direction", "rows timed", "seconds", "× vse_cuda", "CPU s", "extra peak MiB", "i2t same rank",
         "i2t shared", "t2i same rank", "t2i shared", "load", "status"], "llrrrrrrrrrrl",
        ([r["method"] + (" (extrapolated)" if r["extrapolated"] else ""), r["direction"], r["timed_rows"],
          _secs(r["seconds"]), fmt(r["ratio_to_vse_cuda"], ".2f"), _secs(r["cpu_seconds"]),
          fmt(r["extra_peak_mib"], ".0f"), pct(r["same_rank_i2t"]), pct(r["shared_i2t"]), pct(r["same_rank_t2i"]),
          pct(r["shared_t2i"]), fmt(r["load_before"], ".1f"), status_cell(r)] for r in rows))
    lines += shared_machine_note([r["load_before"] for r in rows], args.threads)
    path.write_text("\n".join(lines) + "\n")


def write_plot(rows: list[dict[str, Any]], path: Path, args: argparse.Namespace) -> bool:
    """Seconds (log scale) and extra peak MiB of each method for the whole job; hatched bars
    are extrapolated. False when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    whole = [r for r in rows if r["direction"] == "both"]
    names = [r["method"] + ("\n(extrapolated)" if r["extrapolated"] else "") for r in whole]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, key, label in ((axes[0], "seconds", "seconds (log)"), (axes[1], "extra_peak_mib", "extra peak MiB")):
        bars = ax.bar(names, [r[key] or 0.0 for r in whole], color=["C0", "C1", "C2"][:len(whole)])
        for bar, r in zip(bars, whole):
            if r["extrapolated"]:
                bar.set_hatch("//")
            if r["status"] != "ok":
                ax.text(bar.get_x() + bar.get_width() / 2, 0, r["status"], rotation=90, ha="center", va="bottom")
        ax.set_ylabel(label)
    axes[0].set_yscale("log")
    fig.suptitle(f"AOQ mining {args.images} img × {args.images * args.per_image} cap × D={args.dim}, "
                 f"k {args.k_i2t}/{args.k_t2i}, fp32, {args.threads} threads")
    return save_figure(fig, path, dpi=120)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = new_parser(__doc__, show_defaults=False)
    for name, help_text in (("images", "images I"), ("per_image", "captions per image"), ("dim", "embedding D"),
                            ("k_i2t", "captions kept per image"), ("k_t2i", "images kept per caption"),
                            ("subset_i2t", "images timed for the official i2t loop"),
                            ("subset_t2i", "captions timed for the official t2i loop")):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int,
                            help=f"{help_text} (default {DEFAULTS[name]}, --quick {QUICK[name]})")
    add_common_arguments(parser, stem="mining", defaults=DEFAULTS, quick=QUICK, warmup=None,
                         threads=(2, "torch, MKL and faiss alike"))
    args = parse_profile(parser, argv, DEFAULTS, QUICK)
    if min(args.images, args.per_image, args.dim) < 1:
        parser.error("sizes must be >= 1")
    if not 1 <= args.k_i2t <= (args.images - 1) * args.per_image or not 1 <= args.k_t2i <= args.images - 1:
        parser.error("--k-i2t must be in [1, (images-1)*per_image] and --k-t2i in [1, images-1]")
    if not 1 <= args.subset_i2t <= args.images or not 1 <= args.subset_t2i <= args.images * args.per_image:
        parser.error("--subset-i2t must be in [1, images] and --subset-t2i in [1, captions]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command, stem = start_run(args, argv, "mining")
    with tempfile.TemporaryDirectory(prefix="bench_mining_") as tmp:
        rows = run_all(args, Path(tmp))
    write_csv(args.out_dir / f"{stem}.csv", CSV_FIELDS, rows, constant=csv_config(args))
    write_markdown(rows, args.out_dir / f"{stem}.md", args, command, machine_info(args.threads, ("faiss-cpu",)))
    print_written("bench_mining", args.out_dir, stem, write_plot(rows, args.out_dir / f"{stem}.png", args))
    faiss_row = rows[1]
    wrong = faiss_row["status"] == "ok" and min(faiss_row["shared_i2t"] or 0, faiss_row["shared_t2i"] or 0) < MIN_SET_AGREEMENT
    if wrong:
        print(f"[bench_mining] faiss and vse_cuda share fewer than {MIN_SET_AGREEMENT:.0%} of the entries")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
