"""Hard-negative mining demo: ``python -m vse_cuda.demo``.

A seeded synthetic image–caption set stands in for a trained dual encoder's embeddings: every
image has a latent vector, its embedding is the latent plus noise, its captions are the latent
plus more noise, and a fraction of images are near-duplicates of another image (latent plus a
little noise), so that the hardest negatives are often false negatives in all but name.

The demo

1. mines every image's top-``k`` captions excluding its own (``query_labels``/``key_labels``)
   and every caption's top-5 images excluding its own, with :func:`vse_cuda.topk_similar`;
2. prints Recall@1/5/10 in both directions, from separate top-10 calls without labels (an
   image's own captions are what recall looks for), the time of ``topk_similar`` against the
   materialized oracle :func:`vse_cuda.reference.topk_similar`, and the memory a materialized
   similarity matrix would take;
3. shows the three hardest image→caption negatives and whether each caption belongs to a
   near-duplicate of the image.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.nn.functional as F

import vse_cuda
from vse_cuda import reference
from vse_cuda._chunking import plan_chunks, score_bytes

#: Recall@K levels reported (the VSE literature's).
RECALL_AT = (1, 5, 10)
#: Images each caption mines (its hard negative images).
CAPTION_TOP_IMAGES = 5
#: Fraction of images drawn to become near-duplicates of another (original) image; a few
#: draws collide (an image already copied or a copy), so slightly fewer become one.
DUPLICATE_FRACTION = 0.2
#: Noise scales, relative to the latent: an image's embedding, a caption, a near-duplicate's latent.
#: The caption noise puts default Recall@1 near published VSE numbers (~75 i2t, ~50 t2i).
IMAGE_NOISE, CAPTION_NOISE, DUPLICATE_NOISE = 0.7, 3.6, 0.35
#: COCO train split (Karpathy) sizes, to put the materialized memory into perspective.
COCO_IMAGES, COCO_CAPTIONS = 113_287, 566_435
#: Timed calls of topk_similar (after one warm-up) and of the much slower oracle (one call).
FUSED_REPEATS, ORACLE_REPEATS = 3, 1
_MiB, _GiB = 2**20, 2**30
T = TypeVar("T")


@dataclass
class SyntheticSet:
    """Unit-norm embeddings of a synthetic image–caption set.

    ``caption_image[c]`` is caption c's image (captions are stored image by image);
    ``group[i]`` is shared by an image and its near-duplicates (and only by them).
    """

    images: torch.Tensor
    captions: torch.Tensor
    caption_image: torch.Tensor
    group: torch.Tensor


def make_synthetic_set(images: int, captions_per_image: int, dim: int, seed: int,
                       device: torch.device) -> SyntheticSet:
    """Seeded latents, near-duplicate images, noisy image and caption embeddings."""
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(images, dim, generator=gen)
    group = torch.arange(images)
    duplicates = torch.randperm(images, generator=gen)[: int(DUPLICATE_FRACTION * images)]
    sources = torch.randint(0, images, (duplicates.numel(),), generator=gen)
    is_source = torch.zeros(images, dtype=torch.bool)
    for dup, src in zip(duplicates.tolist(), sources.tolist()):
        # A copy is made only of an original, and never becomes a source itself: groups stay
        # stars around their source, and no latent changes after it has been copied.
        if group[src] == src and group[dup] == dup and not is_source[dup] and src != dup:
            latent[dup] = latent[src] + DUPLICATE_NOISE * torch.randn(dim, generator=gen)
            group[dup] = src
            is_source[src] = True
    image_emb = latent + IMAGE_NOISE * torch.randn(images, dim, generator=gen)
    caption_image = torch.arange(images).repeat_interleave(captions_per_image)
    caption_emb = latent[caption_image] + CAPTION_NOISE * torch.randn(caption_image.numel(), dim, generator=gen)
    return SyntheticSet(F.normalize(image_emb, dim=1).to(device), F.normalize(caption_emb, dim=1).to(device),
                        caption_image.to(device), group.to(device))


def recall_at(hits: torch.Tensor) -> dict[int, float]:
    """Recall@K in percent from a [N, 10] boolean matrix "result j is a true match"."""
    return {k: 100.0 * hits[:, :k].any(dim=1).double().mean().item() for k in RECALL_AT}


def timed(fn: Callable[[], T], device: torch.device, *, warmup: int, repeats: int) -> tuple[float, T]:
    """Median wall-clock seconds of ``repeats`` calls after ``warmup`` unmeasured ones, and the
    last call's result (on CUDA, each call is timed up to the completion of its kernels)."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vse_cuda.demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="number of images")
    parser.add_argument("--captions-per-image", type=int, default=5, help="captions per image")
    parser.add_argument("--dim", type=int, default=256, help="embedding width")
    parser.add_argument("--k", type=int, default=10, help="hard-negative captions mined per image")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic set")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device for the embeddings and the kernels")
    args = parser.parse_args(argv)
    if args.images < max(RECALL_AT) + 1:
        parser.error(f"--images must be >= {max(RECALL_AT) + 1} (Recall@{max(RECALL_AT)} and mining)")
    for name in ("captions_per_image", "dim", "k"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    negatives = (args.images - 1) * args.captions_per_image
    if args.k > negatives:
        parser.error(f"--k must be <= {negatives} (the captions of other images)")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but no CUDA device is available")
    return args


def main(argv: list[str] | None = None) -> dict[str, dict[int, float]]:
    """Run the demo and print its report; returns Recall@K (percent) per direction."""
    args = parse_args(argv)
    device = torch.device(args.device)
    data = make_synthetic_set(args.images, args.captions_per_image, args.dim, args.seed, device)
    n_img, n_cap = data.images.size(0), data.captions.size(0)
    image_ids = torch.arange(n_img, device=device)
    has_duplicate = torch.bincount(data.group, minlength=n_img)[data.group] > 1

    # (a) Mining: hard negatives, the pair's own captions / image excluded by labels.
    neg_caption_values, neg_captions = vse_cuda.topk_similar(
        data.images, data.captions, args.k, query_labels=image_ids, key_labels=data.caption_image)
    _, neg_images = vse_cuda.topk_similar(
        data.captions, data.images, CAPTION_TOP_IMAGES, query_labels=data.caption_image, key_labels=image_ids)

    # (b) Recall: the same search without labels, where the own captions / image are the hits.
    top = max(RECALL_AT)
    i2t_values, i2t = vse_cuda.topk_similar(data.images, data.captions, top)
    _, t2i = vse_cuda.topk_similar(data.captions, data.images, top)
    recalls = {"image->caption": recall_at(data.caption_image[i2t] == image_ids[:, None]),
               "caption->image": recall_at(t2i == data.caption_image[:, None])}

    fused_s, _ = timed(lambda: vse_cuda.topk_similar(data.images, data.captions, top), device,
                       warmup=1, repeats=FUSED_REPEATS)
    oracle_s, (oracle_values, _) = timed(lambda: reference.topk_similar(data.images, data.captions, top),
                                         device, warmup=0, repeats=ORACLE_REPEATS)
    max_diff = (i2t_values - oracle_values).abs().max().item()
    bytes_per_score = score_bytes(data.images.dtype)
    chunks = plan_chunks(n_img, n_cap, data.images.dtype)

    print("vse_cuda demo: top-k hard-negative mining on a synthetic image-caption set")
    print(f"  {n_img} images x {args.captions_per_image} captions = {n_cap} captions, D={args.dim}, "
          f"seed {args.seed}, device {device}; {100 * has_duplicate.double().mean().item():.0f}% of "
          "images belong to a near-duplicate group")
    print()
    print("Retrieval, from topk_similar top-10 lists (no label masking)")
    print(f"  {'direction':<16}" + "".join(f"{'R@' + str(k):>8}" for k in RECALL_AT))
    for direction, recall in recalls.items():
        print(f"  {direction:<16}" + "".join(f"{recall[k]:8.1f}" for k in RECALL_AT))
    print(f"  (chance R@1: {100 / n_img:.2f})")
    print()
    print(f"Time, top-{top} captions of every image")
    print(f"  vse_cuda.topk_similar            {1e3 * fused_s:9.1f} ms   (median of {FUSED_REPEATS})")
    print(f"  reference.topk_similar (full S)  {1e3 * oracle_s:9.1f} ms   "
          f"({ORACLE_REPEATS} call; {oracle_s / fused_s:.1f}x slower, max |value diff| {max_diff:.1e})")
    print()
    print("Memory for the similarity matrix")
    print(f"  materialized S, {n_img} x {n_cap}: {n_img * n_cap * bytes_per_score / _MiB:10.1f} MiB")
    print(f"  topk_similar, one {chunks.rows} x {chunks.cols} tile at most: "
          f"{chunks.rows * chunks.cols * bytes_per_score / _MiB:.1f} MiB")
    print(f"  at COCO train scale ({COCO_IMAGES} x {COCO_CAPTIONS}) S would take "
          f"{COCO_IMAGES * COCO_CAPTIONS * bytes_per_score / _GiB:.0f} GiB")
    print()
    caption_dup = data.group[data.caption_image[neg_captions[:, 0]]] == data.group
    image_dup = data.group[neg_images[:, 0]] == data.group[data.caption_image]
    print(f"Mining: top-{args.k} captions per image {tuple(neg_captions.shape)} and top-{CAPTION_TOP_IMAGES} "
          f"images per caption {tuple(neg_images.shape)}, own pairs excluded by labels")
    print(f"  hardest negative belongs to a near-duplicate: {100 * caption_dup.double().mean().item():.1f}% "
          f"of images, {100 * image_dup.double().mean().item():.1f}% of captions")
    print()
    print("Hardest image->caption negatives")
    own_best = (data.images[:, None, :] * data.captions.view(n_img, args.captions_per_image, -1)).sum(-1).amax(1)
    print(f"  {'image':>6} {'caption':>8} {'of image':>9} {'similarity':>11} {'own best':>9} {'near-dup':>9}")
    for i in torch.argsort(neg_caption_values[:, 0], descending=True, stable=True)[:3].tolist():
        c = neg_captions[i, 0].item()
        print(f"  {i:>6} {c:>8} {data.caption_image[c].item():>9} {neg_caption_values[i, 0].item():>11.4f} "
              f"{own_best[i].item():>9.4f} {'yes' if caption_dup[i] else 'no':>9}")
    return recalls


if __name__ == "__main__":
    main()
