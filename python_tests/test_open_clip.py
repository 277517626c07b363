"""vse_cuda.contrib.open_clip.ClipLoss and SigLipLoss against open_clip's losses as written out
in vse_cuda.reference.clip (from open_clip's src/open_clip/loss.py): the loss and the gradients
of both feature tensors, of logit_scale and of logit_bias, one process on every backend, and 2
gloo ranks (equal shards, as open_clip requires), ClipLoss with local_loss on and off."""

from __future__ import annotations

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
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _siglip_scalars():
    return torch.tensor(10.0, dtype=torch.float64), torch.tensor(-4.0, dtype=torch.float64)


def test_matches_open_clip_on_two_ranks(tmp_path):
    mp.spawn(_rank, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
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
