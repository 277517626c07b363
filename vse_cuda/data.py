"""Image–caption data for the training harness (DESIGN §7): the embedded synthetic dataset, the
VSE/SCAN precomputed-feature layout, a tokenizer and vocabulary for raw captions.

Every split is caption-indexed as in vsepp / SCAN / VSE∞: item ``c`` is the pair
(image ``c // 5``, caption ``c``), so a split of ``n`` images holds ``5 n`` captions stored
image by image.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

#: Captions per image (COCO and Flickr30K; every layout here stores them image by image).
CAPTIONS_PER_IMAGE = 5
#: Token ids reserved in every vocabulary: padding and words not in the vocabulary.
PAD, UNK = "<pad>", "<unk>"
#: Rows checked for NaN/inf at a time (features may be memory-mapped and larger than RAM).
_SCAN_ROWS = 4096
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


class DataError(ValueError):
    """Missing, mismatched or non-finite data; the message names the file and what is wrong."""


@dataclass
class Split:
    """One split: image features and its captions (features, or token ids with lengths).

    ``images`` is [n, d] (pooled) or [n, r, d] (regions), possibly a read-only memory map;
    ``captions`` is [5n, d'] float features, or [5n, L] int64 token ids padded with 0 when
    ``lengths`` ([5n] int64) is given.
    """

    name: str
    images: np.ndarray
    captions: np.ndarray
    lengths: np.ndarray | None = None

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_captions(self) -> int:
        return int(self.captions.shape[0])

    def image_batch(self, image_ids: torch.Tensor) -> torch.Tensor:
        """float32 features of the given images (regions kept; the encoder pools them)."""
        rows = self.images[image_ids.numpy()]
        return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))

    def caption_batch(self, caption_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Caption features (float32), or token ids trimmed to the batch's longest caption and
        their lengths."""
        ids = caption_ids.numpy()
        if self.lengths is None:
            return torch.from_numpy(np.ascontiguousarray(self.captions[ids], dtype=np.float32)), None
        lengths = torch.from_numpy(self.lengths[ids])
        tokens = torch.from_numpy(np.ascontiguousarray(self.captions[ids, : int(lengths.max())]))
        return tokens, lengths


@dataclass
class Dataset:
    """The train/dev/test splits, the vocabulary of raw captions (None for features) and a
    one-line description for logs."""

    train: Split
    dev: Split
    test: Split
    vocab: list[str] | None
    description: str

    @property
    def image_dim(self) -> int:
        return int(self.train.images.shape[-1])

    @property
    def caption_dim(self) -> int | None:
        """Width of caption features; None for raw captions."""
        return None if self.vocab is not None else int(self.train.captions.shape[1])

    def split(self, name: str) -> Split:
        if name not in ("train", "dev", "test"):
            raise ValueError(f"split must be 'train', 'dev' or 'test', got {name!r}")
        return getattr(self, name)


# ------------------------------------------------------------------------ synthetic data

@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and difficulty of the embedded dataset.

    Each image has a latent vector: a weighted mix of ``concepts_per_image`` shared concepts
    plus an image-specific part. Image features and caption features are two different
    random linear views of that latent, each buried under its own high-variance nuisance
    directions and noise, so an encoder must learn which directions carry meaning. About 30%
    of each split's images are near-duplicates of another image (latent plus a little noise):
    their captions are the hardest negatives, which is what in-batch hard-negative mining is for.
    """

    seed: int = 0
    train_images: int = 10_000
    dev_images: int = 1_000
    test_images: int = 5_000
    image_dim: int = 256
    caption_dim: int = 128
    latent_dim: int = 64
    concepts: int = 256
    concepts_per_image: int = 3
    nuisance_dims: int = 24
    nuisance_scale: float = 3.0
    specific_scale: float = 0.6
    image_noise: float = 1.0
    caption_noise: float = 4.0
    feature_noise: float = 0.3
    duplicate_fraction: float = 0.3
    duplicate_noise: float = 0.3


def synthetic_dataset(config: SyntheticConfig = SyntheticConfig()) -> Dataset:
    """The embedded dataset, generated from ``config.seed`` (bitwise the same for the same config)."""
    for name in ("train_images", "dev_images", "test_images", "image_dim", "caption_dim", "latent_dim", "concepts"):
        if getattr(config, name) < 1:
            raise ValueError(f"synthetic {name} must be >= 1, got {getattr(config, name)}")
    gen = torch.Generator().manual_seed(config.seed)
    world = _SyntheticWorld(config, gen)
    splits = [world.split(name, n) for name, n in
              (("train", config.train_images), ("dev", config.dev_images), ("test", config.test_images))]
    desc = (f"synthetic (seed {config.seed}): {config.train_images}/{config.dev_images}/{config.test_images} "
            f"train/dev/test images x {CAPTIONS_PER_IMAGE} captions, image features {config.image_dim}-d, "
            f"caption features {config.caption_dim}-d")
    return Dataset(*splits, vocab=None, description=desc)


class _SyntheticWorld:
    """The parameters shared by all splits (concepts, views, nuisance bases) and the sampler of a split."""

    def __init__(self, config: SyntheticConfig, gen: torch.Generator):
        self.c, self.gen = config, gen
        d = config.latent_dim
        self.concepts = torch.randn(config.concepts, d, generator=gen) / d**0.5
        self.image_view = torch.randn(d, config.image_dim, generator=gen)
        self.caption_view = torch.randn(d, config.caption_dim, generator=gen)
        self.image_nuisance = self._basis(config.image_dim)
        self.caption_nuisance = self._basis(config.caption_dim)
        # Noise is relative to the signal's spread, measured once on the first (train) split
        # so that every split has the same noise level.
        self.scales: dict[int, torch.Tensor] = {}  # keyed by the view's data_ptr

    def _basis(self, dim: int) -> torch.Tensor:
        """Orthonormal nuisance directions of the feature space (at most ``dim``)."""
        k = min(self.c.nuisance_dims, dim)
        return torch.linalg.qr(torch.randn(dim, k, generator=self.gen)).Q.T

    def split(self, name: str, n: int) -> Split:
        latent = self._latents(n)
        cap_latent = latent.repeat_interleave(CAPTIONS_PER_IMAGE, 0)
        cap_latent = cap_latent + self.c.caption_noise * torch.randn(cap_latent.shape, generator=self.gen) / \
            self.c.latent_dim**0.5
        img_latent = latent + self.c.image_noise * torch.randn(latent.shape, generator=self.gen) / \
            self.c.latent_dim**0.5
        images = self._features(img_latent, self.image_view, self.image_nuisance)
        captions = self._features(cap_latent, self.caption_view, self.caption_nuisance)
        return Split(name, images.numpy(), captions.numpy())

    def _latents(self, n: int) -> torch.Tensor:
        c, gen = self.c, self.gen
        picks = torch.randint(0, c.concepts, (n, c.concepts_per_image), generator=gen)
        weights = torch.rand(n, c.concepts_per_image, generator=gen) + 0.5
        latent = (weights[:, :, None] * self.concepts[picks]).sum(1)
        latent = latent + c.specific_scale * torch.randn(n, c.latent_dim, generator=gen) / c.latent_dim**0.5
        # Near-duplicates copy an image that is not itself a copy, so every group is a star
        # around an original.
        copies = torch.randperm(n, generator=gen)[: int(c.duplicate_fraction * n)]
        originals = torch.ones(n, dtype=torch.bool)
        originals[copies] = False
        pool = torch.nonzero(originals).squeeze(1)
        if pool.numel() and copies.numel():
            sources = pool[torch.randint(0, pool.numel(), (copies.numel(),), generator=gen)]
            latent[copies] = latent[sources] + c.duplicate_noise * torch.randn(
                copies.numel(), c.latent_dim, generator=gen) / c.latent_dim**0.5
        return latent

    def _features(self, latent: torch.Tensor, view: torch.Tensor, nuisance: torch.Tensor) -> torch.Tensor:
        signal = latent @ view
        scale = self.scales.setdefault(view.data_ptr(), signal.std())
        coeff = self.c.nuisance_scale * scale * torch.randn(latent.size(0), nuisance.size(0), generator=self.gen)
        noise = self.c.feature_noise * scale * torch.randn(signal.shape, generator=self.gen)
        return (signal + coeff @ nuisance + noise).float()


# ------------------------------------------------------------------- VSE/SCAN file layout

def load_vse_dataset(data_dir: str | Path, *, splits: tuple[str, str, str] = ("train", "dev", "test"),
                     vocab: list[str] | None = None, min_word_count: int = 1) -> Dataset:
    """The VSE/SCAN precomputed-feature layout in ``data_dir``.

    For each split name: ``{split}_ims.npy`` (images, [n, d] pooled or [n, r, d] regions) and
    ``{split}_caps.npy`` (caption features [5n, d']) or ``{split}_caps.txt`` (5 raw captions per
    image, one per line). Raw captions are tokenized by :func:`tokenize`; the vocabulary is
    ``vocab`` when given (a checkpoint's), else built from the first (training) split with
    :func:`build_vocab`. ``splits`` names the train, dev and test files (e.g. SCAN's COCO
    5K test is ``testall``).

    Raises:
        DataError: a file is missing or unreadable, the image and caption counts disagree
            (images × 5 ≠ captions), the splits disagree on feature shapes or caption kind,
            or a feature is NaN/inf.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data directory {root} " + ("is a file, not a directory" if root.exists() else "does not exist"))
    raw = [_read_split(root, name) for name in splits]
    kinds = {isinstance(caps, list) for _, caps in raw}
    if len(kinds) > 1:
        raise DataError(f"{root}: every split needs the same caption kind (all *_caps.txt or all *_caps.npy)")
    _check_shapes(root, splits, raw)
    if isinstance(raw[0][1], list):
        vocab = vocab if vocab is not None else build_vocab(raw[0][1], min_word_count)
        built = [Split(name, ims, *encode(caps, vocab)) for name, (ims, caps) in zip(splits, raw)]
    else:
        vocab = None
        built = [Split(name, ims, caps) for name, (ims, caps) in zip(splits, raw)]
    n = [s.num_images for s in built]
    desc = f"VSE layout {root}: {n[0]}/{n[1]}/{n[2]} {'/'.join(splits)} images x {CAPTIONS_PER_IMAGE} captions"
    return Dataset(*built, vocab=vocab, description=desc)


def _read_split(root: Path, name: str) -> tuple[np.ndarray, np.ndarray | list[str]]:
    ims_path = root / f"{name}_ims.npy"
    images = _load_npy(ims_path)
    if images.ndim not in (2, 3) or not np.issubdtype(images.dtype, np.floating):
        raise DataError(f"{ims_path}: expected float features [n, d] or [n, regions, d], "
                        f"got {images.dtype} {images.shape}")
    txt, npy = root / f"{name}_caps.txt", root / f"{name}_caps.npy"
    if txt.exists():
        captions: np.ndarray | list[str] = _read_captions(txt)
        cap_path = txt
    elif npy.exists():
        captions = _load_npy(npy)
        cap_path = npy
        if captions.ndim != 2 or not np.issubdtype(captions.dtype, np.floating):
            raise DataError(f"{npy}: expected float caption features [5n, d], got {captions.dtype} {captions.shape}")
        _check_finite(npy, captions)
    else:
        raise DataError(f"split {name!r}: neither {txt} nor {npy} exists")
    if len(captions) != CAPTIONS_PER_IMAGE * images.shape[0]:
        raise DataError(f"{ims_path} has {images.shape[0]} images, so {cap_path} needs "
                        f"{images.shape[0]} x {CAPTIONS_PER_IMAGE} = {CAPTIONS_PER_IMAGE * images.shape[0]} "
                        f"captions, but it has {len(captions)}")
    if images.shape[0] == 0:
        raise DataError(f"{ims_path} holds no images")
    _check_finite(ims_path, images)
    return images, captions


def _read_captions(path: Path) -> list[str]:
    """One caption per line of a UTF-8 text file."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise DataError(f"{path} is not UTF-8 text: line {line} holds byte 0x{err.object[err.start]:02x} "
                        f"(at byte offset {err.start}); re-encode the captions as UTF-8") from err
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from err


def _load_npy(path: Path) -> np.ndarray:
    if not path.exists():
        raise DataError(f"missing data file {path}")
    try:
        # Memory-mapped: COCO region features are tens of GB; batches gather their rows.
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DataError(f"cannot read {path} as a .npy array: {err}") from err


def _check_finite(path: Path, array: np.ndarray) -> None:
    """Raise on the first row holding NaN/inf, or a value float32 cannot hold (the batches are
    cast to float32, so a finite float64 1e300 would reach the model as inf); scans in slices
    so memory maps stay cheap."""
    for start in range(0, array.shape[0], _SCAN_ROWS):
        block = np.asarray(array[start:start + _SCAN_ROWS])
        block = block.reshape(block.shape[0], -1)
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            raise DataError(f"{path}: row {start + int(np.argmax(bad))} holds NaN or inf features")
        with np.errstate(over="ignore"):
            bad = ~np.isfinite(block.astype(np.float32)).all(axis=1)
        if bad.any():
            raise DataError(f"{path}: row {start + int(np.argmax(bad))} holds features beyond float32's range "
                            f"(|x| > {float(np.finfo(np.float32).max):g}), which the batches are cast to")


def _check_shapes(root: Path, names: tuple[str, ...], raw: list) -> None:
    first_ims, first_caps = raw[0]
    for name, (ims, caps) in zip(names[1:], raw[1:]):
        if ims.shape[1:] != first_ims.shape[1:]:
            raise DataError(f"{root}: {name}_ims.npy has per-image shape {ims.shape[1:]} but "
                            f"{names[0]}_ims.npy has {first_ims.shape[1:]}")
        if not isinstance(caps, list) and caps.shape[1] != first_caps.shape[1]:
            raise DataError(f"{root}: {name}_caps.npy has {caps.shape[1]} features but "
                            f"{names[0]}_caps.npy has {first_caps.shape[1]}")


# ------------------------------------------------------------------ tokenizer, vocabulary

def tokenize(text: str) -> list[str]:
    """Lower-cased words and numbers (an apostrophe suffix stays attached); punctuation dropped.
    No downloads, no language model: the same text always gives the same tokens."""
    return _WORD.findall(text.lower())


def build_vocab(captions: list[str], min_count: int = 1) -> list[str]:
    """``[PAD, UNK]`` followed by the words seen at least ``min_count`` times, most frequent
    first (ties alphabetically, so the vocabulary does not depend on dict order)."""
    if min_count < 1:
        raise ValueError(f"min_word_count must be >= 1, got {min_count}")
    counts = Counter(word for caption in captions for word in tokenize(caption))
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return [PAD, UNK, *words]


def encode(captions: list[str], vocab: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [len(captions), L] padded with 0 and lengths (>= 1: an empty caption is one UNK)."""
    index = {w: i for i, w in enumerate(vocab)}
    unk = index[UNK]
    ids = [[index.get(w, unk) for w in tokenize(c)] or [unk] for c in captions]
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    tokens = np.zeros((len(ids), int(lengths.max(initial=1))), dtype=np.int64)
    for row, x in enumerate(ids):
        tokens[row, : len(x)] = x
    return tokens, lengths


# ------------------------------------------------------------------------------ sampling

def epoch_order(num_captions: int, seed: int, epoch: int) -> torch.Tensor:
    """The caption order of one epoch, a function of (seed, epoch) only: a resumed run visits
    the same batches as an uninterrupted one without saving the sampler."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_captions, generator=gen)
