"""How far each loss's value and gradients are from float64, in bf16 and float32: vse_cuda
against eager PyTorch in the same dtype (bf16 as users run it, under torch.autocast).

Every method gets the same inputs (L2-normalized Gaussian embeddings rounded to bf16, so that
all dtypes see the same values); the truth is the oracle (vse_cuda.reference) in float64 on
those values. Reported per method: the loss's relative error and the relative error
‖g − g₆₄‖ / ‖g₆₄‖ of each gradient. Eager bf16 is the oracle on float32 leaves under
torch.autocast(device, torch.bfloat16): its GEMM runs in bf16 and the loss in whatever dtype
autocast leaves it, as an eager training step would. The errors are deterministic: no
timings, so the machine's load does not matter.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import machine_info  # noqa: E402
from _report import RESULTS, heading, new_parser, print_written, start_run, table, write_csv  # noqa: E402

import vse_cuda  # noqa: E402
from vse_cuda import reference  # noqa: E402

#: (name, vse_cuda function, oracle function, options) of every loss measured.
LOSSES: dict[str, tuple[Callable, Callable, dict[str, Any]]] = {
    "triplet_hardest": (vse_cuda.triplet_loss, reference.triplet_loss, dict(margin=0.2, mining="hardest")),
    "triplet_all": (vse_cuda.triplet_loss, reference.triplet_loss, dict(margin=0.2, mining="all")),
    "unified": (vse_cuda.unified_loss, reference.unified_loss, dict(scale=20.0, margin=0.2)),
    "infonce": (vse_cuda.unified_loss, reference.unified_loss, dict(scale=1 / 0.07, margin=0.0)),
}
METHODS = ("vse_cuda bf16", "eager bf16 (autocast)", "vse_cuda fp32", "eager fp32")
DEFAULTS = dict(sizes=[1024, 4096], dims=[256])
QUICK = dict(sizes=[64], dims=[16])
FIELDS = ["loss", "n", "dim", "method", "loss_rel_err", "d_img_rel_err", "d_txt_rel_err"]


def inputs(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two [n, d] L2-normalized Gaussian embeddings, matched pairs at cosine ~0.3 (so that hard
    negatives come within the margin and every hinge loss is nonzero), rounded to bf16 and
    returned in float64 (the values every method sees)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, d, generator=g)
    txt = img + 3 * torch.randn(n, d, generator=g)
    return tuple(F.normalize(x, dim=1).bfloat16().double() for x in (img, txt))


def loss_and_grads(fn: Callable, img: torch.Tensor, txt: torch.Tensor, dtype: torch.dtype,
                   autocast: bool = False) -> tuple[torch.Tensor, ...]:
    """fn's loss and its two gradients on leaves of `dtype`, all in float64."""
    a, b = (x.to(dtype, copy=True).requires_grad_() for x in (img, txt))
    with torch.autocast(a.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = fn(a, b)
    loss.backward()
    return loss.detach().double(), a.grad.double(), b.grad.double()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(torch.finfo(torch.float64).tiny))


def measure(name: str, n: int, d: int, seed: int) -> list[dict[str, Any]]:
    ours, oracle, options = LOSSES[name]
    img, txt = inputs(n, d, seed)
    truth = loss_and_grads(lambda a, b: oracle(a, b, **options), img, txt, torch.float64)
    runs = {
        "vse_cuda bf16": (lambda a, b: ours(a, b, **options), torch.bfloat16, False),
        "eager bf16 (autocast)": (lambda a, b: oracle(a, b, **options), torch.float32, True),
        "vse_cuda fp32": (lambda a, b: ours(a, b, **options), torch.float32, False),
        "eager fp32": (lambda a, b: oracle(a, b, **options), torch.float32, False),
    }
    rows = []
    for method in METHODS:
        fn, dtype, autocast = runs[method]
        got = loss_and_grads(fn, img, txt, dtype, autocast)
        rows.append(dict(loss=name, n=n, dim=d, method=method, loss_rel_err=rel_err(got[0], truth[0]),
                         d_img_rel_err=rel_err(got[1], truth[1]), d_txt_rel_err=rel_err(got[2], truth[2])))
    return rows


def write_markdown(rows: list[dict[str, Any]], path: Path, command: str, info: dict[str, str]) -> None:
    lines = heading("Precision against float64: vse_cuda vs eager PyTorch in bf16 and float32", command) + [
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['threads']} threads; torch {info['torch']}, "
        f"vse_cuda {vse_cuda.__version__}; device cpu; {info['date']}. Errors are deterministic (no timings), "
        "so the machine's load does not matter.",
        "",
        "On CPU, vse_cuda multiplies bf16 tiles in float32 (README, Precision); on CUDA it uses a bf16 GEMM "
        "that accumulates in float32, which this table has not measured (no GPU yet). vse_cuda bf16 takes bf16 "
        "leaves and returns its loss and gradients in bf16, so its errors include that final rounding (~2e-3 "
        "relative); eager bf16 takes float32 leaves under autocast and returns float32 gradients.",
        "",
        *table(["loss", "N", "D", "method", "loss rel. err", "d img rel. err", "d txt rel. err"], "lrrlrrr",
               ([r["loss"], r["n"], r["dim"], r["method"], f"{r['loss_rel_err']:.2e}", f"{r['d_img_rel_err']:.2e}",
                 f"{r['d_txt_rel_err']:.2e}"] for r in rows)),
    ]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = new_parser(__doc__)
    parser.add_argument("--losses", nargs="+", choices=list(LOSSES), default=list(LOSSES))
    parser.add_argument("--sizes", nargs="+", type=int, help=f"batch sizes N (default {DEFAULTS['sizes']})")
    parser.add_argument("--dims", nargs="+", type=int, help=f"embedding widths D (default {DEFAULTS['dims']})")
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where precision.csv / precision.md go")
    parser.add_argument("--quick", action="store_true", help=f"tiny sizes for a smoke test ({QUICK})")
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    command, stem = start_run(args, argv, "precision")
    rows = [row for name in args.losses for n in args.sizes for d in args.dims
            for row in measure(name, n, d, args.seed)]
    write_csv(args.out_dir / f"{stem}.csv", FIELDS, rows)
    write_markdown(rows, args.out_dir / f"{stem}.md", command, machine_info(torch.get_num_threads()))
    print_written("bench_precision", args.out_dir, stem, plotted=False)


if __name__ == "__main__":
    main()
