"""Inputs, label patterns and comparisons shared by the loss tests (test_triplet.py,
test_unified.py, test_quintuplet.py, test_goal.py, test_loss_contract.py), and LOSSES: the table
of the four losses that test_loss_contract.py runs what every loss must satisfy over. Not a test
module."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

import vse_cuda
from vse_cuda import reference as ref

#: (rtol, atol relative to the largest expected magnitude) per input dtype: float64 to
#: 1e-10, float32 to 1e-5, half types at their own precision (the loss is rounded to them).
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

#: Label patterns: none; random ids; every pair shares its id with at least one other pair
#: (COCO's 5 captions per image); one id for all (no anchor has a negative).
LABEL_KINDS = (None, "random", "pairs", "same")


def random_inputs(n: int, d: int, dtype: torch.dtype = torch.float64, seed: int = 0, count: int = 2):
    """`count` [n, d] standard normal tensors (img, txt, then any further inputs)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype) for _ in range(count))


def grid_inputs(n: int, d: int, dtype: torch.dtype = torch.float64, seed: int = 0, count: int = 2):
    """Entries in {-3/4, …, 3/4}: exact in every dtype, and so is every similarity (a multiple
    of 1/16) in any summation order, so mining decisions, exact ties and hinges at exactly 0
    (margins that are multiples of 1/16) are the same for the engine and the oracle."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(-3, 4, (n, d), generator=g).to(dtype) / 4 for _ in range(count))


def with_duplicates(n: int, d: int, dtype: torch.dtype, which: str, seed: int):
    """Gaussian inputs in `dtype` in which pair i+1 copies pair i's caption ("captions"), image
    ("images") or both ("pairs"), for i = 0, 3, 6, ... (COCO batches hold such copies). The
    copy's score against the original's anchor equals that anchor's positive exactly, so at
    margin 0 its hinge is exactly 0 and passes no gradient (the oracle takes both values from
    one S; a positive computed by another reduction than the tile's GEMM is off by an ulp)."""
    return tuple(x.to(dtype) for x in copy_pairs(*random_inputs(n, d, seed=seed), which))


def copy_pairs(img: torch.Tensor, txt: torch.Tensor, which: str):
    """img and txt with pair i+1's caption, image or both copied from pair i (with_duplicates)."""
    img, txt = img.clone(), txt.clone()
    for i in range(0, img.shape[0] - 1, 3):
        if which in ("captions", "pairs"):
            txt[i + 1] = txt[i]
        if which in ("images", "pairs"):
            img[i + 1] = img[i]
    return img, txt


#: The "cuda" backend of a test's backend list: marked, and skipped where no GPU exists.
CUDA_BACKEND = pytest.param("cuda", marks=[pytest.mark.cuda,
                                           pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")])

#: Every kernel backend built here: conftest's `backend` fixture runs a test on each.
BACKENDS = ["cpu", "simt", CUDA_BACKEND]


def opcheck_setup(device, on_backend, labelled: bool, count: int = 2):
    """What the ops' opcheck tests call them with: `count` float32 [9, 5] inputs requiring grad,
    random labels or none, and the ops of the backend `on_backend` selects."""
    inputs = [x.float().to(device).requires_grad_() for x in random_inputs(9, 5, seed=3, count=count)]
    labels = (make_labels("random", 9) if labelled else torch.empty(0, dtype=torch.int64)).to(device)
    with on_backend():
        op = vse_cuda._lib.ops(*inputs)
    return inputs, labels, op


def per_backend(backends, cases, simt_cases):
    """Parameters (backend, *case) of a test grid: every case on each backend, but only
    `simt_cases` on "simt" (the SIMT executor runs each GPU thread as a CPU fiber, so its grid
    is trimmed to keep a test file's run short). A backend may be a pytest.param carrying
    marks (CUDA_BACKEND)."""
    params = []
    for backend in backends:
        name, marks = (backend.values[0], backend.marks) if hasattr(backend, "marks") else (backend, ())
        for case in simt_cases if name == "simt" else cases:
            params.append(pytest.param(name, *case, marks=marks))
    return params


def make_labels(kind: str | None, n: int, seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """Labels of pattern `kind` (LABEL_KINDS) for n pairs, on `device`; None for kind None."""
    if kind is None:
        return None
    if kind == "random":
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, max(1, n // 3), (n,), generator=g)
    elif kind == "pairs":  # ids 0,0,1,1,2,2,…, an odd last pair joins the previous id
        labels = (torch.arange(n) // 2).clamp(max=max(0, n // 2 - 1))
    elif kind == "same":
        labels = torch.zeros(n, dtype=torch.int64)
    else:
        raise ValueError(kind)
    return labels.to(device)


def chunk_options(n: int) -> list[int | None]:
    """The default plan (one chunk, which divides N), a smaller chunk size that divides N (one
    that keeps the number of chunks small) and one that does not (where N has one)."""
    options: list[int | None] = [None]
    divisor = next((c for c in (32, 1) if n % c == 0 and c < n and (c > 1 or n <= 3)), None)
    if divisor is not None:
        options.append(divisor)
    if n > 2:
        options.append(next(c for c in (48, 5, 3, 2) if n % c != 0 and c < n))
    return options


def oracle_grid(n: int):
    """The (normalize, reduction, chunk sizes) an oracle-grid test covers at batch size n: every
    normalize x reduction, with each of chunk_options(n) under "sum" and the default plan under
    "mean" (the reduction does not reach the chunked engine)."""
    for normalize in (False, True):
        for reduction in ("sum", "mean"):
            yield normalize, reduction, chunk_options(n) if reduction == "sum" else [None]


def loss_and_grads(fn, *inputs: torch.Tensor):
    """fn(*inputs) (e.g. img, txt) and its gradients with respect to every input (fresh leaves)."""
    leaves = tuple(x.detach().clone().requires_grad_(True) for x in inputs)
    loss = fn(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), grads


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str = "",
                 scale: float = 1.0, tol: float | None = None) -> None:
    """Same dtype and shape; values within `tol` (default TOL[dtype]), relative to the largest
    of `scale`, 1 and the largest expected magnitude."""
    assert got.dtype == want.dtype, what
    tol = TOL[dtype] if tol is None else tol
    scale = max(1.0, scale, float(want.detach().abs().max()) if want.numel() else 0.0)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def aligned_inputs(n: int, d: int, noise: float, dtype: torch.dtype = torch.float64, seed: int = 5):
    """Unit embeddings of a trained-like model: each caption near its image (txt = img + noise),
    so positives are high and GOAL's relative-similarity sets are partly full (random embeddings
    fill them almost entirely)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, d, generator=g, dtype=torch.float64)
    txt = img + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
    return tuple(torch.nn.functional.normalize(x, dim=1).to(dtype) for x in (img, txt))


def extra_peak_mib(setup: str, calls: str) -> float:
    """Runs `setup`, then `calls`, in a fresh interpreter (no earlier test's allocations hide
    the peak) and returns how much the peak RSS grew during `calls`, in MiB."""
    program = "\n".join(["import resource, torch, vse_cuda", textwrap.dedent(setup),
                         "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss", textwrap.dedent(calls),
                         "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss",
                         "print((after - before) / 1024)"])
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    return float(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------ the table of losses

#: A contract test's variants of one loss: (id, keyword options) pairs.
Variants = list[tuple[str, dict]]


@dataclass(frozen=True)
class LossCase:
    """One loss as test_loss_contract.py sees it. `inputs` names its embedding arguments, in
    order (the first half images, the second half captions); `bad_inputs` are (overrides of a
    valid call on [4, 5] inputs, error, match) and `bad_keywords` (module keywords, error,
    match); `variants` gives each contract test (by short name) the options it runs the loss
    with; `memory_calls` are the options of the calls that must stay within chunks (with
    ``labelled=True``: five captions per image as labels);
    `simt_inputs` makes the inputs of the worker-count test where random ones do not do."""

    name: str
    function: Callable[..., torch.Tensor]
    module: type[torch.nn.Module]
    oracle: Callable[..., torch.Tensor]
    inputs: tuple[str, ...]
    module_options: dict
    repr_shows: tuple[str, ...]
    bad_inputs: list[tuple[dict, type[Exception], str]]
    bad_keywords: list[tuple[dict, type[Exception], str]]
    variants: dict[str, Variants] = field(default_factory=dict)
    memory_calls: tuple[dict, ...] = ({},)
    simt_inputs: Callable[[], tuple[torch.Tensor, ...]] | None = None

    def make_inputs(self, n: int, d: int, dtype: torch.dtype = torch.float64, seed: int = 0):
        return random_inputs(n, d, dtype, seed, count=len(self.inputs))

    def ours(self, on_backend, **options):
        """The loss with `options`, called on the test's backend (conftest's on_backend)."""
        def call(*inputs):
            with on_backend():
                return self.function(*inputs, **options)
        return call

    def reference(self, **options):
        """The oracle with the same options (it has no chunk plan)."""
        options.pop("chunk_size", None)
        return lambda *inputs: self.oracle(*inputs, **options)


QUINTUPLET_INPUTS = ("img", "txt", "off_img", "off_txt", "img2", "txt2")

# Bad inputs that two-input losses share: wrong types, ranks and shapes of img and txt, no
# pair at all, and bad labels and common keywords.
_BAD_PAIR = [
    (dict(img=None), TypeError, "img"),
    (dict(txt=torch.randn(4, 5).int()), TypeError, "txt"),
    (dict(img=torch.randn(20)), ValueError, "img"),
    (dict(txt=torch.randn(4, 6)), ValueError, "txt"),
    (dict(txt=torch.randn(3, 5)), ValueError, "txt"),
]
_NO_PAIR = (dict(img=torch.randn(0, 5), txt=torch.randn(0, 5)), ValueError, "N=0")
_BAD_OPTIONS = [
    (dict(labels=torch.zeros(4, dtype=torch.int32)), TypeError, "labels"),
    (dict(labels=torch.zeros(4, 1, dtype=torch.int64)), ValueError, "labels"),
    (dict(normalize=None), TypeError, "normalize"),
    (dict(reduction="batchmean"), ValueError, "reduction"),
    (dict(chunk_size=-3), ValueError, "chunk_size"),
]

_MININGS_SPARSE = [("hardest-1", dict(mining="hardest", k=1)), ("all-1", dict(mining="all", k=1))]
_TRIPLET_DETERMINISM = [*_MININGS_SPARSE, ("topk-4", dict(mining="topk", k=4))]

TRIPLET = LossCase(
    name="triplet", function=vse_cuda.triplet_loss, module=vse_cuda.TripletLoss, oracle=ref.triplet_loss,
    inputs=("img", "txt"),
    module_options=dict(margin=0.3, mining="topk", k=2, normalize=True, reduction="mean"),
    repr_shows=("mining='topk', k=2",),
    bad_inputs=[
        (dict(img="img"), TypeError, "img"),
        (dict(img=torch.randn(4, 5).long()), TypeError, "img"),
        (dict(img=torch.randn(4, 5, 1)), ValueError, "img"),
        (dict(txt=torch.randn(4, 3)), ValueError, "txt"),
        (dict(txt=torch.randn(5, 5)), ValueError, "txt"),
        (dict(txt=torch.randn(4, 5).double()), TypeError, "txt"),
        (dict(txt=torch.randn(4, 5, device="meta")), ValueError, "txt"),
        _NO_PAIR,
        (dict(margin=float("nan")), ValueError, "margin"),
        (dict(margin="0.2"), TypeError, "margin"),
        (dict(mining="max"), ValueError, "mining"),
        (dict(mining="topk", k=0), ValueError, "k"),
        (dict(mining="topk", k=2.0), TypeError, "k"),
        (dict(labels=torch.zeros(4)), TypeError, "labels"),
        (dict(labels=torch.zeros(3, dtype=torch.int64)), ValueError, "labels"),
        (dict(labels=[0, 1, 2, 3]), TypeError, "labels"),
        (dict(normalize="yes"), TypeError, "normalize"),
        (dict(reduction="none"), ValueError, "reduction"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
    ],
    bad_keywords=[
        (dict(margin=float("inf")), ValueError, "margin"),
        (dict(mining="semi"), ValueError, "mining"),
        (dict(k=-1), ValueError, "k"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(normalize=1), TypeError, "normalize"),
    ],
    variants={
        "non_contiguous": [*_MININGS_SPARSE, ("topk-3", dict(mining="topk", k=3))],
        "single_pair": [(f"{name}", dict(options, margin=5.0))
                        for name, options in [*_MININGS_SPARSE, ("topk-3", dict(mining="topk", k=3))]],
        "deterministic": _TRIPLET_DETERMINISM,
        "simt_workers": _TRIPLET_DETERMINISM,
        "compile": [(mining, dict(mining=mining, k=2, normalize=True, reduction="mean"))
                    for mining in ("hardest", "topk")],
    },
    memory_calls=tuple(dict(mining=mining, k=5) for mining in ("hardest", "all", "topk")),
)

UNIFIED = LossCase(
    name="unified", function=vse_cuda.unified_loss, module=vse_cuda.UnifiedLoss, oracle=ref.unified_loss,
    inputs=("img", "txt"),
    module_options=dict(scale=30.0, margin=0.1, normalize=True, reduction="mean"),
    repr_shows=("scale=30.0",),
    memory_calls=({}, dict(label_positives=True, labelled=True)),
    bad_inputs=[
        *_BAD_PAIR,
        (dict(txt=torch.randn(4, 5).half()), TypeError, "txt"),
        _NO_PAIR,
        (dict(scale=0.0), ValueError, "scale"),
        (dict(scale=-20.0), ValueError, "scale"),
        (dict(scale=float("inf")), ValueError, "scale"),
        (dict(scale="20"), TypeError, "scale"),
        (dict(margin=float("nan")), ValueError, "margin"),
        *_BAD_OPTIONS,
        (dict(chunk_size=2.5), TypeError, "chunk_size"),
    ],
    bad_keywords=[
        (dict(scale=0), ValueError, "scale"),
        (dict(margin=float("-inf")), ValueError, "margin"),
        (dict(reduction="none"), ValueError, "reduction"),
        (dict(normalize="true"), TypeError, "normalize"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
    ],
    variants={
        "non_contiguous": [("", {})],
        "single_pair": [("", {})],
        "deterministic": [("", {}), ("label_positives", dict(label_positives=True))],
        "simt_workers": [("", {}), ("label_positives", dict(label_positives=True))],
        "compile": [("", dict(scale=10.0, normalize=True, reduction="mean")),
                    ("label_positives", dict(scale=10.0, reduction="mean", label_positives=True))],
    },
)

QUINTUPLET = LossCase(
    name="quintuplet", function=vse_cuda.quintuplet_loss, module=vse_cuda.QuintupletLoss,
    oracle=ref.quintuplet_loss, inputs=QUINTUPLET_INPUTS,
    module_options=dict(margin_online=0.3, margin_offline=0.1, alpha=0.5, beta=1.2, detach_weights=True,
                        normalize=True, reduction="mean"),
    repr_shows=("detach_weights=True", "alpha=0.5"),
    bad_inputs=[
        (dict(img="img"), TypeError, "img"),
        (dict(off_img=None), TypeError, "off_img"),
        (dict(txt2=torch.randn(4, 5).long()), TypeError, "txt2"),
        (dict(off_txt=torch.randn(4, 5, 1)), ValueError, "off_txt"),
        (dict(off_img=torch.randn(3, 5)), ValueError, "off_img"),
        (dict(off_txt=torch.randn(5, 5)), ValueError, "off_txt"),
        (dict(img2=torch.randn(2, 5)), ValueError, "img2"),
        (dict(txt2=torch.randn(4, 6)), ValueError, "txt2"),
        (dict(img2=torch.randn(4, 4)), ValueError, "img2"),
        (dict(txt=torch.randn(4, 3)), ValueError, "txt"),
        (dict(off_txt=torch.randn(4, 5).double()), TypeError, "off_txt"),
        (dict(img2=torch.randn(4, 5).half()), TypeError, "img2"),
        (dict(txt2=torch.randn(4, 5, device="meta")), ValueError, "txt2"),
        (dict(**{name: torch.randn(0, 5) for name in QUINTUPLET_INPUTS}), ValueError, "N=0"),
        (dict(margin_online=float("nan")), ValueError, "margin_online"),
        (dict(margin_offline=float("inf")), ValueError, "margin_offline"),
        (dict(margin_offline="0"), TypeError, "margin_offline"),
        (dict(alpha=0.0), ValueError, "alpha"),
        (dict(alpha=-0.3), ValueError, "alpha"),
        (dict(alpha=float("nan")), ValueError, "alpha"),
        (dict(alpha=float("inf")), ValueError, "alpha"),
        (dict(alpha="0.3"), TypeError, "alpha"),
        (dict(beta=float("-inf")), ValueError, "beta"),
        (dict(beta=None), TypeError, "beta"),
        (dict(detach_weights=1), TypeError, "detach_weights"),
        (dict(labels=torch.zeros(4)), TypeError, "labels"),
        (dict(labels=torch.zeros(3, dtype=torch.int64)), ValueError, "labels"),
        (dict(normalize="yes"), TypeError, "normalize"),
        (dict(reduction="none"), ValueError, "reduction"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
    ],
    bad_keywords=[
        (dict(margin_online=float("inf")), ValueError, "margin_online"),
        (dict(margin_offline=float("nan")), ValueError, "margin_offline"),
        (dict(alpha=0), ValueError, "alpha"),
        (dict(alpha=-1.0), ValueError, "alpha"),
        (dict(beta=float("nan")), ValueError, "beta"),
        (dict(detach_weights="no"), TypeError, "detach_weights"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(normalize=1), TypeError, "normalize"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
    ],
    variants={
        "non_contiguous": [("", {})],
        "deterministic": [(str(detach), dict(detach_weights=detach)) for detach in (False, True)],
        "simt_workers": [(str(detach), dict(detach_weights=detach)) for detach in (False, True)],
        "compile": [("", dict(margin_offline=0.05, normalize=True, reduction="mean"))],
    },
    memory_calls=tuple(dict(detach_weights=detach) for detach in (False, True)),
)

GOAL_PAIR_WEIGHTS = ("con", "lin", "sig", "lin_ms", "sig_ms")
_GOAL_DETERMINISM = [(weight, dict(triplet_weight="cir", pair_weight=weight)) for weight in ("con", "lin_ms", "sig_ms")]

GOAL = LossCase(
    name="goal", function=vse_cuda.goal_loss, module=vse_cuda.GoalLoss, oracle=ref.goal_loss, inputs=("img", "txt"),
    module_options=dict(triplet_weight="cir", pair_weight="lin_ms", tau=3.0, a=1.5, b=6.0, lam=0.3, normalize=True,
                        reduction="mean"),
    repr_shows=("triplet_weight='cir', pair_weight='lin_ms'",),
    bad_inputs=[
        *_BAD_PAIR,
        (dict(txt=torch.randn(4, 5).double()), TypeError, "txt"),
        _NO_PAIR,
        (dict(triplet_weight="ms"), ValueError, "triplet_weight"),
        (dict(triplet_weight=None), ValueError, "triplet_weight"),
        (dict(pair_weight="ms"), ValueError, "pair_weight"),
        (dict(pair_weight="SIG"), ValueError, "pair_weight"),
        (dict(tau=0.0), ValueError, "tau"),
        (dict(tau=-1.0), ValueError, "tau"),
        (dict(tau=float("nan")), ValueError, "tau"),
        (dict(tau="1"), TypeError, "tau"),
        (dict(a=0.0), ValueError, "a"),
        (dict(a=float("inf")), ValueError, "a"),
        (dict(b=-10.0), ValueError, "b"),
        (dict(b=float("nan")), ValueError, "b"),
        (dict(lam=float("inf")), ValueError, "lam"),
        (dict(lam=None), TypeError, "lam"),
        *_BAD_OPTIONS,
    ],
    bad_keywords=[
        (dict(triplet_weight="triplet"), ValueError, "triplet_weight"),
        (dict(pair_weight="lin-ms"), ValueError, "pair_weight"),
        (dict(tau=0), ValueError, "tau"),
        (dict(a=-2.0), ValueError, "a"),
        (dict(b=float("inf")), ValueError, "b"),
        (dict(lam=float("nan")), ValueError, "lam"),
        (dict(reduction="none"), ValueError, "reduction"),
        (dict(normalize="true"), TypeError, "normalize"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
    ],
    variants={
        "non_contiguous": [("", dict(triplet_weight="nca", pair_weight="sig_ms"))],
        "single_pair": [(weight, dict(triplet_weight="nca", pair_weight=weight)) for weight in GOAL_PAIR_WEIGHTS],
        "deterministic": [(weight, dict(options, normalize=True)) for weight, options in _GOAL_DETERMINISM],
        "simt_workers": _GOAL_DETERMINISM,
        "compile": [("", dict(triplet_weight="nca", pair_weight="sig_ms", normalize=True, reduction="mean"))],
    },
    memory_calls=tuple(dict(pair_weight=weight) for weight in ("con", "lin_ms", "sig_ms")),
    simt_inputs=lambda: aligned_inputs(150, 16, 0.8, torch.float32),
)

LOSSES = (TRIPLET, UNIFIED, QUINTUPLET, GOAL)
