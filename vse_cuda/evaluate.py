"""Retrieval evaluation (spec §1): Recall@1/5/10 for image→text and text→image, and rsum, on
the COCO 1K (mean over 1000-image folds) and 5K protocols.

``python -m vse_cuda.evaluate CKPT [--split test]`` embeds a split with a checkpoint's model and
prints the recall table. Recall comes from :func:`vse_cuda.topk_similar` top-10 lists, so no
N×M similarity matrix is ever built: memory stays O(chunk·M + N·10) at any split size.

Ranks follow :func:`vse_cuda.topk_similar`'s order (larger similarity first, ties to the lower
index). image→text uses the best-ranked of an image's 5 captions; text→image the rank of the
caption's image; R@K is the percentage of queries whose rank is < K.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from ._validation import check_bool, check_compatible, check_embeddings, check_has_data, check_int
from .data import CAPTIONS_PER_IMAGE, Split
from .topk import topk_similar

#: Recall@K levels of the VSE literature.
RECALL_AT = (1, 5, 10)
#: Images per fold of the COCO 1K protocol.
FOLD_IMAGES = 1000
METRICS = tuple(f"{d}_r{k}" for d in ("i2t", "t2i") for k in RECALL_AT) + ("rsum",)


def recall_at_k(img_emb: torch.Tensor, cap_emb: torch.Tensor, *, captions_per_image: int = CAPTIONS_PER_IMAGE,
                chunk_size: int | None = None) -> dict[str, float]:
    """R@1/5/10 (percent) both ways and rsum for ``n`` images and their ``captions_per_image·n``
    captions stored image by image (caption c belongs to image c // captions_per_image)."""
    n = _check_split_embeddings(img_emb, cap_emb, captions_per_image)
    image_ids = torch.arange(n, device=img_emb.device)
    caption_image = image_ids.repeat_interleave(captions_per_image)
    top = max(RECALL_AT)
    _, i2t = topk_similar(img_emb, cap_emb, min(top, cap_emb.size(0)), chunk_size=chunk_size)
    _, t2i = topk_similar(cap_emb, img_emb, min(top, n), chunk_size=chunk_size)
    result = {}
    for direction, hits in (("i2t", caption_image[i2t] == image_ids[:, None]),
                            ("t2i", t2i == caption_image[:, None])):
        for k in RECALL_AT:
            result[f"{direction}_r{k}"] = 100.0 * hits[:, :k].any(dim=1).double().mean().item()
    result["rsum"] = sum(result[m] for m in METRICS[:-1])
    return result


def fold_recall(img_emb: torch.Tensor, cap_emb: torch.Tensor, *, fold_images: int = FOLD_IMAGES,
                captions_per_image: int = CAPTIONS_PER_IMAGE) -> dict[str, float]:
    """The mean of every metric over consecutive folds of ``fold_images`` images (COCO 1K);
    rsum is the sum of the mean recalls, as vsepp reports it."""
    n = _check_split_embeddings(img_emb, cap_emb, captions_per_image)
    check_int("fold_images", fold_images, 1)
    if n % fold_images:
        raise ValueError(f"fold_images={fold_images} must divide the {n} images")
    folds = [recall_at_k(img_emb[f:f + fold_images],
                         cap_emb[f * captions_per_image:(f + fold_images) * captions_per_image],
                         captions_per_image=captions_per_image)
             for f in range(0, n, fold_images)]
    mean = {m: sum(fold[m] for fold in folds) / len(folds) for m in METRICS[:-1]}
    mean["rsum"] = sum(mean.values())
    return mean


def recall_table(img_emb: torch.Tensor, cap_emb: torch.Tensor) -> dict[str, dict[str, float]]:
    """Every protocol the split supports: with a multiple of 1000 images above 1000, the 1K
    fold mean and the whole split (COCO 1K and 5K on 5000 images); otherwise the whole split."""
    n = _check_split_embeddings(img_emb, cap_emb, CAPTIONS_PER_IMAGE)
    table = {}
    if n > FOLD_IMAGES and n % FOLD_IMAGES == 0:
        table[f"1K ({n // FOLD_IMAGES}-fold mean)"] = fold_recall(img_emb, cap_emb)
    table[_size_name(n)] = recall_at_k(img_emb, cap_emb)
    return table


def chance_rsum(num_images: int, captions_per_image: int = CAPTIONS_PER_IMAGE) -> float:
    """rsum of a random ranking: i2t R@K = 1 − C(c·n − c, K)/C(c·n, K) (one of c captions in the
    top K), t2i R@K = K/n."""
    n = check_int("num_images", num_images, 1)
    c = check_int("captions_per_image", captions_per_image, 1)
    total = 0.0
    for k in RECALL_AT:
        i2t = 1.0 - math.comb(c * n - c, min(k, c * n)) / math.comb(c * n, min(k, c * n))
        total += i2t + min(k, n) / n
    return 100.0 * total


def format_table(table: dict[str, dict[str, float]], *, num_images: int | None = None) -> str:
    """A markdown table, one row per protocol; with ``num_images`` a chance line under it."""
    if not isinstance(table, dict):
        raise TypeError(f"table must be a dict of protocol -> metrics, got {type(table).__name__}")
    for name, metrics in table.items():
        missing = [m for m in METRICS if not isinstance(metrics, dict) or m not in metrics]
        if missing:
            raise ValueError(f"table[{name!r}] must hold every metric of {METRICS}; missing {missing}")
    if num_images is not None:
        check_int("num_images", num_images, 1)
    head = "| protocol | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | rsum |"
    lines = [head, "|---|" + "---:|" * 7]
    for name, m in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.1f}" for k in METRICS) + " |")
    if num_images is not None:
        chance = {n: chance_rsum(n) for n in {min(num_images, FOLD_IMAGES), num_images}}
        lines.append("")
        lines.append("chance rsum: " + ", ".join(f"{v:.2f} on {_size_name(n)}" for n, v in sorted(chance.items())))
    return "\n".join(lines)


@torch.no_grad()
def embed_split(model: torch.nn.Module, split: Split, *, batch_size: int = 2048,
                autocast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm image [n, E] and caption [5n, E] embeddings of a split, in batches, computed
    on the model's device (bf16 autocast on that device's type when ``autocast``)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(split, Split):
        raise TypeError(f"split must be a vse_cuda.data.Split, got {type(split).__name__}")
    check_int("batch_size", batch_size, 1)
    check_bool("autocast", autocast)
    was_training = model.training
    device = next(model.parameters(), torch.empty(0)).device
    model.eval()
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            imgs = [model.image(split.image_batch(torch.arange(s, min(s + batch_size, split.num_images))).to(device))
                    for s in range(0, split.num_images, batch_size)]
            caps = [model.text(*_on(device, *split.caption_batch(torch.arange(s, min(s + batch_size,
                                                                                     split.num_captions)))))
                    for s in range(0, split.num_captions, batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(imgs), torch.cat(caps)


def _on(device: torch.device, captions: torch.Tensor, lengths: torch.Tensor | None):
    """A caption batch with its token ids or features on ``device`` (GRU lengths stay on the CPU,
    where pack_padded_sequence wants them)."""
    return captions.to(device), lengths


def _check_split_embeddings(img_emb: object, cap_emb: object, captions_per_image: object) -> int:
    """Image [n, D] and caption [captions_per_image·n, D] embeddings, n >= 1; returns n."""
    check_embeddings("img_emb", img_emb)
    check_embeddings("cap_emb", cap_emb)
    check_compatible(("img_emb", "cap_emb"), (img_emb, cap_emb))
    check_has_data("img_emb", img_emb, "recall is computed from the embeddings' values")
    check_int("captions_per_image", captions_per_image, 1)
    n = img_emb.size(0)
    if n == 0:
        raise ValueError(f"img_emb must hold at least one image, got shape {tuple(img_emb.shape)}")
    if cap_emb.size(0) != captions_per_image * n:
        raise ValueError(f"cap_emb must hold {captions_per_image} captions per image: {n} images need "
                         f"{captions_per_image * n} captions, got {cap_emb.size(0)}")
    return n


def _size_name(n: int) -> str:
    return f"{n // 1000}K" if n % 1000 == 0 else f"{n} images"


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """CLI: evaluate a checkpoint written by ``python -m vse_cuda.train``; returns the table."""
    parser = argparse.ArgumentParser(prog="python -m vse_cuda.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="checkpoint.pt or model_best.pt of a training run")
    parser.add_argument("--split", choices=("train", "dev", "test"), default="test", help="split to evaluate")
    parser.add_argument("--data", type=Path, default=None,
                        help="VSE-layout data directory, if it moved since training (default: the checkpoint's)")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="where the model embeds and ranks (default: cuda when a GPU is visible, else cpu)")
    args = parser.parse_args(argv)
    # The run builders are imported here, not at module level: recall functions stay light.
    from . import train_config
    from ._checkpoint import CheckpointError, load_checkpoint
    from .data import DataError

    try:
        if args.out is not None:  # before the work, so a bad path costs none of it
            _check_out_file(args.out)
        ckpt = load_checkpoint(args.checkpoint)
        config = train_config.Config(**ckpt["config"])
        if args.data is not None:
            config.data = str(args.data)
        dataset = train_config.load_data(config, vocab=ckpt.get("vocab"))
        model = train_config.make_model(config, dataset).to(train_config.resolve_device(args.device))
    except (CheckpointError, DataError, ValueError, TypeError) as err:
        sys.exit(f"python -m vse_cuda.evaluate: error: {err}")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:  # e.g. --data holds features of another width
        sys.exit(f"python -m vse_cuda.evaluate: error: {args.checkpoint}'s model does not fit the data: {err}")
    split = dataset.split(args.split)
    img, cap = embed_split(model, split, autocast=config.precision == "bf16")
    table = recall_table(img, cap)
    text = format_table(table, num_images=split.num_images)
    print(f"{args.checkpoint} (epoch {ckpt['epoch']}) on {args.split}: {split.num_images} images, "
          f"{split.num_captions} captions")
    print(text)
    if args.out is not None:
        try:
            args.out.write_text(text + "\n")
        except OSError as err:
            sys.exit(f"python -m vse_cuda.evaluate: error: --out {args.out}: cannot write it ({err.strerror or err})")
    return table


def _check_out_file(out: Path) -> None:
    """``--out`` must name a file that can be written: not a directory, in an existing
    writable directory."""
    import os

    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; name the file to write the table to")
    parent = out.parent
    if not parent.is_dir():
        raise ValueError(f"--out {out}: the directory {parent} does not exist (or is not a directory)")
    if not os.access(parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ValueError(f"--out {out} is not writable")


if __name__ == "__main__":
    main()
