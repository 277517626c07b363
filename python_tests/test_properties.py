"""Property-based tests (hypothesis): every public op and loss against the oracle
vse_cuda.reference, forward values and gradients, on backends cpu and simt (and cuda where a
GPU exists).

Each example draws the sizes N, M, D (small ranges that include 1, 2 and primes), the dtype
(float64 at TOL's tight tolerance, float32, bfloat16, float16 at TOL's), a label pattern (none,
all distinct, heavy duplication, pairs, all equal), reduction, normalize, chunk_size (none, a
divisor of N, any size up to N + 2) and the tiles' width (through the memory budget), the op's
hyper-parameters within their documented ranges, the upstream gradient (GOAL scales its
injected gradient by it), the function or its module, contiguous or column-major inputs, and
a seed for the entries. The engine at the drawn dtype is compared with the oracle in float64 on
the same (exactly upcast) inputs, rounded to that dtype.

Mining decisions (hardest / top-k negatives, hinges at 0, GOAL's relative-similarity sets)
are discontinuous: at a near-tie a rounding difference flips them, and the gradient with them.
So an op that mines gets Gaussian inputs only in float64 (where a near-tie within 1e-15
essentially never occurs), and otherwise exact ones: multiples of 1/4 (grid_inputs, times a
power of two), whose similarities are exact in every dtype and summation order, or, with
normalize, rows that L2-normalize exactly (`unit_exact_inputs`). Exact ties are then common,
and the lowest index must win on both sides. The smooth unified loss gets every kind in every
dtype, with a tolerance that grows with γ·|S| (its conditioning). Errors are measured against
the magnitude of the terms summed where the result may cancel (similarity, unified).

Counts: conftest.HYPOTHESIS_EXAMPLES, per profile. The default properties (small sizes) run
its "default" count of examples each, i.e. per op and backend; each has a @pytest.mark.slow
twin with larger sizes that runs the "slow" count. Profile "ci" is the default; "sanitize"
(`--hypothesis-profile=sanitize`) is for the simt reruns under ASan/TSan. Every profile is
derandomized and database-less: CI tries the same examples on every run, and a failure prints
the draws that reproduce it.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vse_cuda
from vse_cuda import reference as ref
from vse_cuda._chunking import plan_chunks, score_bytes

from _loss_cases import CUDA_BACKEND, TOL, assert_close, grid_inputs, loss_and_grads, make_labels
from conftest import hypothesis_examples

BACKENDS = pytest.mark.parametrize("backend", ["cpu", "simt", CUDA_BACKEND])
SLOW = settings(max_examples=hypothesis_examples("slow"))

#: Largest N (and M) and D per backend: small enough that an example takes milliseconds, the
#: executor's (one CPU fiber per GPU thread) smaller still.
SMALL = {"cpu": (40, 12), "simt": (24, 12), "cuda": (40, 12)}
LARGE = {"cpu": (96, 32), "simt": (48, 16), "cuda": (96, 32)}
PRIMES = (2, 3, 5, 7, 11, 13, 17, 23, 31, 37, 47, 61, 89)

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
LABEL_KINDS = (None, "distinct", "random", "pairs", "same")
UPSTREAM = (1.0, 0.5, -2.0, 3.0)


# ------------------------------------------------------------------------------- strategies

def draw_size(data, limit: int, label: str) -> int:
    """Any size (hypothesis favours the small ones and the bounds, 1 first when shrinking) or
    a prime (which chunk sizes rarely divide)."""
    return data.draw(st.one_of(st.integers(1, limit), st.sampled_from([p for p in PRIMES if p <= limit])),
                     label=label)


def draw_chunk(data, n: int) -> int | None:
    divisors = [c for c in range(1, n + 1) if n % c == 0]
    return data.draw(st.one_of(st.none(), st.sampled_from(divisors), st.integers(1, n + 2)), label="chunk_size")


@contextlib.contextmanager
def tile_columns(cols: int | None):
    """The engine's tiles `cols` columns wide, through the memory budget that gives them (None:
    the default budget, whole rows at these sizes). Narrower tiles happen at scale, where one
    row chunk of S exceeds the budget; they merge each row's state across column tiles."""
    if cols is None:
        yield
        return

    def plan(n, m, dtype, row_chunk=None):
        rows = plan_chunks(n, m, dtype, row_chunk).rows
        return plan_chunks(n, m, dtype, row_chunk, budget=cols * rows * score_bytes(dtype))

    with mock.patch("vse_cuda.ops._engine.plan_chunks", plan), mock.patch("vse_cuda.ops.topk.plan_chunks", plan):
        yield


def draw_columns(data, m: int) -> int | None:
    return data.draw(st.one_of(st.none(), st.integers(1, m)), label="tile columns")


def draw_margin(data, label: str = "margin") -> float:
    """Multiples of 1/16 put hinges at exactly 0 on exact inputs (they must pass no gradient);
    0.2, the default, is 1/80 away from every similarity of exact inputs."""
    return data.draw(st.one_of(st.integers(0, 16).map(lambda i: i / 16), st.just(0.2)), label=label)


def make_pair_labels(kind: str | None, n: int, seed: int) -> torch.Tensor | None:
    """make_labels' patterns ("random": ids from n // 3, heavy duplication), and all distinct
    ids in a random order (only the diagonal is masked, through the labelled code path)."""
    if kind == "distinct":
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return make_labels(kind, n, seed)


def unit_exact_inputs(n: int, d: int, dtype: torch.dtype, seed: int, count: int = 2):
    """Rows with 1 or (D >= 4) 4 non-zero entries ±2^e, e in -2..1 per row: norms 2^e or 2^(e+1),
    so F.normalize is exact (entries 0, ±1/2, ±1) in every dtype, and so are the similarities
    before and after it. No zero rows (their normalization gradient is 1/eps)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        nonzeros = 1 + 3 * torch.randint(0, 2 if d >= 4 else 1, (n, 1), generator=g)
        ranks = torch.rand(n, d, generator=g).argsort(dim=1).argsort(dim=1)
        signs = 2.0 * torch.randint(0, 2, (n, d), generator=g) - 1.0
        scales = 2.0 ** torch.randint(-2, 2, (n, 1), generator=g)
        out.append(((ranks < nonzeros) * signs * scales).to(dtype))
    return tuple(out)


def draw_inputs(data, n: int, d: int, dtype: torch.dtype, normalize: bool, count: int = 2,
                smooth: bool = False):
    """`count` [n, d] inputs. Gaussian ones (|S| of order 1, as embeddings have) where a
    rounding difference cannot flip a decision: for smooth ops, and in float64 (near-ties within
    1e-15 essentially never occur). Otherwise inputs whose similarities are exact: with
    normalize, rows that normalize exactly; without, those or multiples of 1/4 in [-3/4, 3/4]
    times 2^e (which may include zero rows and all-zero inputs)."""
    kinds = ["grid", "unit", "gaussian"] if smooth or dtype == torch.float64 else ["grid", "unit"]
    if normalize:
        kinds.remove("grid")
    kind = data.draw(st.sampled_from(kinds), label="inputs")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    if kind == "unit":
        return unit_exact_inputs(n, d, dtype, seed, count)
    if kind == "gaussian":
        g = torch.Generator().manual_seed(seed)
        return tuple((torch.randn(n, d, generator=g, dtype=torch.float64) / d**0.5).to(dtype) for _ in range(count))
    scale = data.draw(st.sampled_from([1.0, 0.5, 2.0, 0.25, 0.0]), label="scale")
    return tuple(x * scale for x in grid_inputs(n, d, dtype, seed, count))


def draw_common(data, backend: str, sizes: dict, count: int = 2, smooth: bool = False):
    """What every loss draws: inputs, labels, normalize, reduction, chunk_size, upstream gradient."""
    max_n, max_d = sizes[backend]
    n, d = draw_size(data, max_n, "N"), draw_size(data, max_d, "D")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    normalize = data.draw(st.booleans(), label="normalize")
    inputs = draw_inputs(data, n, d, dtype, normalize, count, smooth)
    label_seed = data.draw(st.integers(0, 2**31 - 1), label="label seed")
    labels = make_pair_labels(data.draw(st.sampled_from(LABEL_KINDS), label="labels"), n, label_seed)
    device = torch.device("cuda" if backend == "cuda" else "cpu")
    options = dict(labels=None if labels is None else labels.to(device), normalize=normalize,
                   reduction=data.draw(st.sampled_from(["sum", "mean"]), label="reduction"))
    tiles = draw_chunk(data, n), draw_columns(data, n)
    upstream = data.draw(st.sampled_from(UPSTREAM), label="upstream gradient")
    inputs = [x.to(device) for x in inputs]
    if data.draw(st.booleans(), label="column-major inputs"):  # non-contiguous, same values
        inputs = [x.T.contiguous().T for x in inputs]
    return inputs, dtype, options, tiles, upstream


# ------------------------------------------------------------------------------- comparison

MODULES = {vse_cuda.triplet_loss: vse_cuda.TripletLoss, vse_cuda.unified_loss: vse_cuda.UnifiedLoss,
           vse_cuda.quintuplet_loss: vse_cuda.QuintupletLoss, vse_cuda.goal_loss: vse_cuda.GoalLoss}


def ours(data, fn, backend: str, upstream: float, tiles: tuple, **options):
    """The loss function or its module (drawn) on `backend` with `tiles` = (chunk_size, tile
    columns); the factor is the grad_output its backward receives."""
    options["chunk_size"] = tiles[0]
    module = None
    if data.draw(st.booleans(), label="as module"):
        module = MODULES[fn](**{k: v for k, v in options.items() if k != "labels"})

    def loss(*inputs):
        with vse_cuda.use_backend(backend), tile_columns(tiles[1]):
            if module is None:
                return upstream * fn(*inputs, **options)
            return upstream * module(*inputs, labels=options["labels"])
    return loss


def oracle(fn, upstream: float, **options):
    return lambda *inputs: upstream * fn(*inputs, **options)


def check_against_oracle(engine, reference, inputs, dtype, scale: float = 1.0, tol: float | None = None):
    """Loss and every gradient of the engine at `dtype` against the float64 oracle on the same
    values, rounded to `dtype`."""
    got_loss, got_grads = loss_and_grads(engine, *inputs)
    want_loss, want_grads = loss_and_grads(reference, *(x.double() for x in inputs))
    assert got_loss.dtype == dtype and all(g.dtype == dtype for g in got_grads)
    assert_close(got_loss, want_loss.to(dtype), dtype, "loss", tol=tol)
    for i, (got, want) in enumerate(zip(got_grads, want_grads)):
        assert_close(got, want.to(dtype), dtype, f"d input {i}", scale, tol=tol)


def gradient_terms(G: torch.Tensor, img: torch.Tensor, txt: torch.Tensor, normalize: bool) -> float:
    """The largest sum of magnitudes of the terms of d img = G·txt and d txt = Gᵀ·img (through
    the normalization: over the norm): the scale of their rounding errors, whereas the
    gradients themselves may cancel (exactly, with normalize and D = 1)."""
    img, txt = img.double(), txt.double()
    norms = [x.norm(dim=1) if normalize else torch.ones(x.size(0), dtype=x.dtype) for x in (img, txt)]
    img_hat, txt_hat = (x / n.clamp_min(1e-12)[:, None] for x, n in zip((img, txt), norms))
    first = (G.abs() @ txt_hat.abs()).amax(dim=1) / norms[0].clamp_min(1e-12)
    second = (G.abs().T @ img_hat.abs()).amax(dim=1) / norms[1].clamp_min(1e-12)
    return float(torch.cat([first, second]).max()) if G.numel() and img.size(1) else 0.0


# --------------------------------------------------------------------------------- similarity

def similarity_property(data, sizes):
    # similarity is one GEMM in torch whatever the backend: checked once, on the CPU.
    max_n, max_d = sizes["cpu"]
    n, m, d = draw_size(data, max_n, "N"), draw_size(data, max_n, "M"), draw_size(data, max_d, "D")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    normalize = data.draw(st.booleans(), label="normalize")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    a, b = (torch.randn(rows, d, generator=g, dtype=torch.float64).to(dtype) for rows in (n, m))
    upstream = torch.randn(n, m, generator=g, dtype=torch.float64).to(dtype)
    leaves = [x.clone().requires_grad_() for x in (a, b)]
    got = vse_cuda.similarity(*leaves, normalize=normalize)
    got_grads = torch.autograd.grad(got, leaves, upstream)
    leaves = [x.double().clone().requires_grad_() for x in (a, b)]
    want = ref.similarity(*leaves, normalize=normalize)
    want_grads = torch.autograd.grad(want, leaves, upstream.double())
    # The error of a dot product scales with Σ|a_k·b_k|, not with the result (which may cancel).
    terms = ref.similarity(a.double().abs(), b.double().abs(), normalize=normalize)
    assert_close(got.detach(), want.detach().to(dtype), dtype, "S", scale=float(terms.max()))
    scale = gradient_terms(upstream.double(), a, b, normalize)
    assert_close(got_grads[0], want_grads[0].to(dtype), dtype, "d a", scale)
    assert_close(got_grads[1], want_grads[1].to(dtype), dtype, "d b", scale)


@given(data=st.data())
def test_similarity(data):
    similarity_property(data, SMALL)


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_similarity_large(data):
    similarity_property(data, LARGE)


# ------------------------------------------------------------------------------- topk_similar

def topk_property(data, backend, sizes):
    max_n, max_d = sizes[backend]
    n, m, d = draw_size(data, max_n, "N"), draw_size(data, max_n, "M"), draw_size(data, max_d, "D")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    normalize = data.draw(st.booleans(), label="normalize")
    # One kind for both: Gaussian queries against grid keys would tie exactly (duplicate keys)
    # in values that are not exact, where GEMMs of different shapes round differently.
    queries, keys = draw_inputs(data, n + m, d, dtype, normalize, count=1)[0].split([n, m])
    ids = data.draw(st.one_of(st.none(), st.integers(1, max(n, m))), label="label ids")
    labels = {}
    if ids is not None:
        g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="label seed"))
        labels = dict(query_labels=torch.randint(0, ids, (n,), generator=g),
                      key_labels=torch.randint(0, ids, (m,), generator=g))
    candidates = m if ids is None else min(int((labels["key_labels"] != q).sum()) for q in labels["query_labels"])
    if candidates == 0:  # some query has no key of another label: refused (test_topk checks that)
        labels, candidates = {}, m
    k = data.draw(st.integers(1, candidates), label="k")
    chunk = draw_chunk(data, n)
    columns = draw_columns(data, m)
    device = torch.device("cuda" if backend == "cuda" else "cpu")
    with vse_cuda.use_backend(backend), tile_columns(columns):
        values, indices = vse_cuda.topk_similar(queries.to(device), keys.to(device), k, normalize=normalize,
                                                chunk_size=chunk, **{k_: v.to(device) for k_, v in labels.items()})
    want_values, want_indices = ref.topk_similar(queries.double(), keys.double(), k, normalize=normalize, **labels)
    # Ties go to the lowest key index (exact inputs have many); exact similarities are the same
    # values in any dtype and summation order, float64 Gaussian ones only close.
    assert torch.equal(indices.cpu(), want_indices)
    assert values.dtype == dtype
    assert_close(values.cpu(), want_values.to(dtype), dtype, "values", tol=1e-12 if dtype == torch.float64 else 0.0)


@BACKENDS
@given(data=st.data())
def test_topk_similar(backend, data):
    topk_property(data, backend, SMALL)


@pytest.mark.slow
@BACKENDS
@SLOW
@given(data=st.data())
def test_topk_similar_large(backend, data):
    topk_property(data, backend, LARGE)


# ------------------------------------------------------------------------------------ triplet

def triplet_property(data, backend, sizes):
    inputs, dtype, options, tiles, upstream = draw_common(data, backend, sizes)
    n = inputs[0].size(0)
    options["margin"] = draw_margin(data)
    options["mining"] = data.draw(st.sampled_from(["hardest", "all", "topk"]), label="mining")
    if options["mining"] == "topk":  # k > N is allowed: fewer negatives exist than asked for
        options["k"] = data.draw(st.integers(1, n + 1), label="k")
    check_against_oracle(ours(data, vse_cuda.triplet_loss, backend, upstream, tiles, **options),
                         oracle(ref.triplet_loss, upstream, **options), inputs, dtype)


@BACKENDS
@given(data=st.data())
def test_triplet_loss(backend, data):
    triplet_property(data, backend, SMALL)


@pytest.mark.slow
@BACKENDS
@SLOW
@given(data=st.data())
def test_triplet_loss_large(backend, data):
    triplet_property(data, backend, LARGE)


# ------------------------------------------------------------------------------------ unified

def unified_property(data, backend, sizes):
    inputs, dtype, options, tiles, upstream = draw_common(data, backend, sizes, smooth=True)
    options["scale"] = data.draw(st.floats(0.05, 100.0), label="scale")
    options["margin"] = data.draw(st.floats(0.0, 1.0), label="margin")
    img, txt = (x.double().cpu() for x in inputs)
    if options["normalize"]:
        img, txt = (torch.nn.functional.normalize(x, dim=1) for x in (img, txt))
    # Conditioning: an error e in S_ij moves exp(γ(S_ij − S_ii + m)) by the factor e^{γe}, and
    # the engine's S carries e ≈ eps·Σ|img_k·txt_k| (float32 for half inputs).
    terms = float((img.abs() @ txt.abs().T).max())
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    tol = max(TOL[dtype], 4 * options["scale"] * terms * eps)
    S = (img @ txt.T).requires_grad_()
    labels = None if options["labels"] is None else options["labels"].cpu()
    G, = torch.autograd.grad(upstream * ref.unified_loss_from_similarity(
        S, scale=options["scale"], margin=options["margin"], labels=labels, reduction=options["reduction"]), S)
    check_against_oracle(ours(data, vse_cuda.unified_loss, backend, upstream, tiles, **options),
                         oracle(ref.unified_loss, upstream, **options), inputs, dtype,
                         scale=gradient_terms(G, *(x.cpu() for x in inputs), options["normalize"]), tol=tol)


@BACKENDS
@given(data=st.data())
def test_unified_loss(backend, data):
    unified_property(data, backend, SMALL)


@pytest.mark.slow
@BACKENDS
@SLOW
@given(data=st.data())
def test_unified_loss_large(backend, data):
    unified_property(data, backend, LARGE)


# --------------------------------------------------------------------------------- quintuplet

def quintuplet_property(data, backend, sizes):
    inputs, dtype, options, tiles, upstream = draw_common(data, backend, sizes, count=6)
    options["margin_online"] = draw_margin(data, "margin_online")
    options["margin_offline"] = draw_margin(data, "margin_offline")
    options["alpha"] = data.draw(st.floats(0.05, 2.0), label="alpha")
    options["beta"] = data.draw(st.floats(-1.0, 3.0), label="beta")
    options["detach_weights"] = data.draw(st.booleans(), label="detach_weights")
    check_against_oracle(ours(data, vse_cuda.quintuplet_loss, backend, upstream, tiles, **options),
                         oracle(ref.quintuplet_loss, upstream, **options), inputs, dtype)


@BACKENDS
@given(data=st.data())
def test_quintuplet_loss(backend, data):
    quintuplet_property(data, backend, SMALL)


@pytest.mark.slow
@BACKENDS
@SLOW
@given(data=st.data())
def test_quintuplet_loss_large(backend, data):
    quintuplet_property(data, backend, LARGE)


# --------------------------------------------------------------------------------------- GOAL

def goal_property(data, backend, sizes):
    inputs, dtype, options, tiles, upstream = draw_common(data, backend, sizes)
    # |S| <= 4: sig_ms's exact weight e^{b(N−λ)} leaves float32's range for large similarities
    # (goal_loss's docstring; here b(N−λ) <= 54); halving keeps the inputs exact.
    img, txt = inputs
    while float((img.double() @ txt.double().T).abs().max()) > 4 and not options["normalize"]:
        img, txt = img / 2, txt / 2
    options.update(triplet_weight=data.draw(st.sampled_from(["con", "nca", "cir"]), label="triplet_weight"),
                   pair_weight=data.draw(st.sampled_from(["con", "lin", "sig", "lin_ms", "sig_ms"]),
                                         label="pair_weight"),
                   tau=data.draw(st.floats(0.1, 10.0), label="tau"),
                   a=data.draw(st.floats(0.5, 8.0), label="a"),
                   b=data.draw(st.floats(1.0, 12.0), label="b"),
                   lam=data.draw(st.floats(-0.5, 1.0), label="lam"))
    check_against_oracle(ours(data, vse_cuda.goal_loss, backend, upstream, tiles, **options),
                         oracle(ref.goal_loss, upstream, **options), (img, txt), dtype)


@BACKENDS
@given(data=st.data())
def test_goal_loss(backend, data):
    goal_property(data, backend, SMALL)


@pytest.mark.slow
@BACKENDS
@SLOW
@given(data=st.data())
def test_goal_loss_large(backend, data):
    goal_property(data, backend, LARGE)
