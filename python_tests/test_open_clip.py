"""vse_cuda.contrib.open_clip.ClipLoss and SigLipLoss against open_clip: its losses as written out
in vse_cuda.reference.clip (from open_clip's src/open_clip/loss.py), and open_clip's own
ClipLoss and SigLipLoss classes (open-clip-torch 3.3.0, which the Makefile's venv installs; see
``_open_clip_loss``): the loss and the gradients of both feature tensors, of logit_scale and of
logit_bias, one process on every backend, and 2 gloo ranks (equal shards, as open_clip
requires), ClipLoss with local_loss on and off, SigLipLoss with each of open_clip's dist_impl."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import vse_cuda
from vse_cuda.contrib.open_clip import ClipLoss, SigLipLoss
from vse_cuda.reference.clip import clip_loss, siglip_rank_loss

from _loss_cases import loss_and_grads, random_inputs

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}
#: open_clip's SigLipLoss exchanges (all give the same numbers).
DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


def _open_clip_loss():
    """open_clip's own loss module: ``open_clip/loss.py`` of the installed open-clip-torch, loaded
    from its file, and None; or None and why not. The package's ``__init__`` imports its model zoo
    (torchvision, timm, huggingface-hub), loss.py only torch, so the Makefile's venv installs the
    wheel without its dependencies (requirements-nodeps.txt) and this loads loss.py alone."""
    try:
        distribution = importlib.metadata.distribution("open-clip-torch")
    except importlib.metadata.PackageNotFoundError:
        return None, "open-clip-torch is not installed (`make build` installs it: requirements-nodeps.txt)"
    path = Path(distribution.locate_file("open_clip/loss.py"))
    if not path.is_file():
        return None, f"open-clip-torch {distribution.version} has no {path}"
    spec = importlib.util.spec_from_file_location("_open_clip_loss", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as err:
        return None, f"{path} of open-clip-torch {distribution.version} does not import: {err}"
    return module, None


OPEN_CLIP, NO_OPEN_CLIP = _open_clip_loss()
needs_open_clip = pytest.mark.skipif(OPEN_CLIP is None, reason=f"against open_clip itself: {NO_OPEN_CLIP}")


def features(n: int, d: int, dtype: torch.dtype, seed: int):
    img, txt = random_inputs(n, d, torch.float64, seed=seed)
    return F.normalize(img, dim=1).to(dtype), F.normalize(img + 0.8 * txt, dim=1).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [1, 7, 64])
def test_matches_open_clip_in_one_process(backend, device, on_backend, n, dtype):
    img, txt = (x.to(device) for x in features(n, 16, dtype, seed=n))
    logit_scale = torch.tensor(1 / 0.07, dtype=dtype, device=device)
    ours = ClipLoss()

    def call(a, b, s):
        with on_backend():
            return ours(a, b, s)

    loss, grads = loss_and_grads(call, img, txt, logit_scale)
    want_loss, want_grads = loss_and_grads(clip_loss, img, txt, logit_scale)
    torch.testing.assert_close(loss, want_loss, **TOL[dtype])
    for what, got, want in zip(("image", "text", "logit_scale"), grads, want_grads):
        torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m: f"d {what}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [1, 7, 64])
def test_siglip_matches_open_clip_in_one_process(backend, device, on_backend, n, dtype):
    img, txt = (x.to(device) for x in features(n, 16, dtype, seed=n))
    scale, bias = torch.tensor(10.0, dtype=dtype, device=device), torch.tensor(-10.0, dtype=dtype, device=device)

    def call(a, b, s, t):
        with on_backend():
            return SigLipLoss()(a, b, s, t)

    loss, grads = loss_and_grads(call, img, txt, scale, bias)
    want_loss, want_grads = loss_and_grads(siglip_rank_loss, img, txt, scale, bias)
    torch.testing.assert_close(loss, want_loss, **TOL[dtype])
    for what, got, want in zip(("image", "text", "logit_scale", "logit_bias"), grads, want_grads):
        torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m: f"d {what}: {m}")


def grads_of(fn, *inputs: torch.Tensor):
    """fn(*inputs) and its gradients with respect to every input (fresh leaves), zeros for an
    input it does not use (our ClipLoss ignores logit_bias, which no softmax sees)."""
    leaves = tuple(x.detach().clone().requires_grad_(True) for x in inputs)
    loss = fn(*leaves)
    return loss.detach(), torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)


def assert_same(got, want, dtype: torch.dtype, names, case: str = "") -> None:
    """(loss, grads) against (loss, grads), named per input."""
    torch.testing.assert_close(got[0], want[0], **TOL[dtype], msg=lambda m: f"loss {case}: {m}")
    for what, g, w in zip(names, got[1], want[1], strict=True):
        torch.testing.assert_close(g, w, **TOL[dtype], msg=lambda m: f"d {what} {case}: {m}")


@needs_open_clip
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [1, 7, 64])
def test_equals_open_clips_own_clip_loss(backend, device, on_backend, n, dtype, with_bias):
    img, txt = (x.to(device) for x in features(n, 16, dtype, seed=n))
    scalars = [torch.tensor(1 / 0.07, dtype=dtype, device=device)]
    if with_bias:
        scalars.append(torch.tensor(-2.5, dtype=dtype, device=device))

    def ours(*xs):
        with on_backend():
            return ClipLoss()(*xs)

    assert_same(grads_of(ours, img, txt, *scalars), grads_of(OPEN_CLIP.ClipLoss(), img, txt, *scalars), dtype,
                ("image", "text", "logit_scale", "logit_bias")[:2 + len(scalars)])


@needs_open_clip
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [1, 7, 64])
def test_equals_open_clips_own_siglip_loss(backend, device, on_backend, n, dtype):
    img, txt = (x.to(device) for x in features(n, 16, dtype, seed=n))
    scale, bias = torch.tensor(10.0, dtype=dtype, device=device), torch.tensor(-10.0, dtype=dtype, device=device)

    def ours(*xs):
        with on_backend():
            return SigLipLoss()(*xs)

    assert_same(grads_of(ours, img, txt, scale, bias), grads_of(OPEN_CLIP.SigLipLoss(), img, txt, scale, bias),
                dtype, ("image", "text", "logit_scale", "logit_bias"))


def test_output_dict_and_logit_bias():
    img, txt = features(9, 4, torch.float64, seed=1)
    loss = ClipLoss()(img, txt, 10.0)
    out = ClipLoss()(img, txt, 10.0, logit_bias=torch.tensor(-3.0), output_dict=True)
    assert list(out) == ["contrastive_loss"] and torch.equal(out["contrastive_loss"], loss)


def test_unsupported_modes_are_refused():
    with pytest.raises(NotImplementedError, match="horovod"):
        ClipLoss(use_horovod=True)
    with pytest.raises(NotImplementedError, match="gather_with_grad=True"):
        ClipLoss(rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        ClipLoss(rank=2, world_size=2)
    with pytest.raises(ValueError, match="default process group"):
        ClipLoss(gather_with_grad=True, rank=0, world_size=2)(*features(3, 4, torch.float64, 0), 10.0)
    with pytest.raises(NotImplementedError, match="horovod"):
        SigLipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="dist_impl"):
        SigLipLoss(dist_impl="ring")
    with pytest.raises(ValueError, match="default process group"):
        SigLipLoss(rank=1, world_size=2)(*features(3, 4, torch.float64, 0), 10.0, -10.0)


# ------------------------------------------------------------------------------ two ranks

def _rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        img, txt = features(6 * world, 8, torch.float64, seed=5)
        shard = slice(6 * rank, 6 * (rank + 1))
        results = {}
        for local_loss in (False, True):
            options = dict(local_loss=local_loss, rank=rank, world_size=world)
            ours = ClipLoss(gather_with_grad=True, **options)
            results[local_loss] = (loss_and_grads(ours, img[shard], txt[shard], torch.tensor(12.0, dtype=torch.float64)),
                                   loss_and_grads(lambda a, b, s: clip_loss(a, b, s, **options), img[shard], txt[shard],
                                                  torch.tensor(12.0, dtype=torch.float64)))
        ours = SigLipLoss(rank=rank, world_size=world)
        results["siglip"] = (loss_and_grads(ours, img[shard], txt[shard], *_siglip_scalars()),
                             loss_and_grads(lambda a, b, s, t: siglip_rank_loss(a, b, s, t, world_size=world),
                                            img[shard], txt[shard], *_siglip_scalars()))
        if OPEN_CLIP is not None:  # open_clip's own classes, each mode against ours in the same mode
            scale = torch.tensor(12.0, dtype=torch.float64)
            for local_loss in (False, True):
                options = dict(local_loss=local_loss, gather_with_grad=True, rank=rank, world_size=world)
                results["own", local_loss] = (grads_of(ClipLoss(**options), img[shard], txt[shard], scale),
                                              grads_of(OPEN_CLIP.ClipLoss(**options), img[shard], txt[shard], scale))
            for impl in DIST_IMPLS:
                options = dict(rank=rank, world_size=world, dist_impl=impl)
                results["own", impl] = (grads_of(SigLipLoss(**options), img[shard], txt[shard], *_siglip_scalars()),
                                        grads_of(OPEN_CLIP.SigLipLoss(**options), img[shard], txt[shard],
                                                 *_siglip_scalars()))
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _siglip_scalars():
    return torch.tensor(10.0, dtype=torch.float64), torch.tensor(-4.0, dtype=torch.float64)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """What each of 2 gloo ranks computed in ``_rank`` (one spawn for the tests below)."""
    tmp_path = tmp_path_factory.mktemp("two_ranks")
    mp.spawn(_rank, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def test_matches_open_clip_on_two_ranks(two_ranks):
    ranks = two_ranks
    for local_loss in (False, True):
        for rank, results in enumerate(ranks):
            (loss, grads), (want_loss, want_grads) = results[local_loss]
            case = f"local_loss={local_loss} rank={rank}"
            torch.testing.assert_close(loss, want_loss, **TOL[torch.float64], msg=lambda m: f"loss, {case}: {m}")
            for what, got, want in zip(("image", "text"), grads[:2], want_grads[:2]):
                torch.testing.assert_close(got, want, **TOL[torch.float64], msg=lambda m: f"d {what}, {case}: {m}")
        # logit_scale is replicated: what DDP averages, the ranks' sum, is the same.
        got = sum(r[local_loss][0][1][2] for r in ranks)
        want = sum(r[local_loss][1][1][2] for r in ranks)
        torch.testing.assert_close(got, want, **TOL[torch.float64])
    # SigLIP: each rank's own images against every rank's texts, as open_clip splits the terms.
    for rank, results in enumerate(ranks):
        (loss, grads), (want_loss, want_grads) = results["siglip"]
        torch.testing.assert_close(loss, want_loss, **TOL[torch.float64], msg=lambda m: f"siglip loss, rank {rank}: {m}")
        for what, got, want in zip(("image", "text", "logit_scale", "logit_bias"), grads, want_grads):
            torch.testing.assert_close(got, want, **TOL[torch.float64], msg=lambda m: f"siglip d {what}, rank {rank}: {m}")


@needs_open_clip
def test_equals_open_clips_own_classes_on_two_ranks(two_ranks):
    """Each rank's loss and gradients equal those of open_clip's class in the same mode, but for
    ClipLoss(local_loss=False)'s logit_scale: open_clip's every rank holds the whole loss's
    ∂/∂logit_scale, each of ours its own anchors' share, and what DDP averages, the ranks' sum,
    is the same."""
    for local_loss in (False, True):
        for rank, results in enumerate(two_ranks):
            ours, theirs = results["own", local_loss]
            names = ("image", "text") if not local_loss else ("image", "text", "logit_scale")
            assert_same((ours[0], ours[1][:len(names)]), (theirs[0], theirs[1][:len(names)]), torch.float64, names,
                        f"ClipLoss(local_loss={local_loss}) rank {rank}")
        torch.testing.assert_close(sum(r["own", local_loss][0][1][2] for r in two_ranks),
                                   sum(r["own", local_loss][1][1][2] for r in two_ranks), **TOL[torch.float64])
    for impl in DIST_IMPLS:
        for rank, results in enumerate(two_ranks):
            assert_same(*results["own", impl], torch.float64, ("image", "text", "logit_scale", "logit_bias"),
                        f"SigLipLoss(dist_impl={impl!r}) rank {rank}")
