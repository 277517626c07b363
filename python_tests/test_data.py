"""Data for the harness (vse_cuda.data): the synthetic dataset, the VSE/SCAN file layout on
small fixture files, the tokenizer and vocabulary, and the errors on bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vse_cuda import data

SMALL = data.SyntheticConfig(seed=3, train_images=60, dev_images=20, test_images=30, image_dim=24, caption_dim=12,
                             latent_dim=8, concepts=16)


def test_synthetic_is_seeded_and_shaped():
    a, b = data.synthetic_dataset(SMALL), data.synthetic_dataset(SMALL)
    other = data.synthetic_dataset(data.SyntheticConfig(**{**SMALL.__dict__, "seed": 4}))
    for name, n in (("train", 60), ("dev", 20), ("test", 30)):
        split = a.split(name)
        assert split.images.shape == (n, 24) and split.captions.shape == (5 * n, 12)
        assert np.array_equal(split.images, b.split(name).images)
        assert np.array_equal(split.captions, b.split(name).captions)
        assert not np.array_equal(split.images, other.split(name).images)
        assert np.isfinite(split.images).all() and np.isfinite(split.captions).all()
    assert a.vocab is None and a.caption_dim == 12 and a.image_dim == 24


def test_synthetic_default_test_split_supports_both_coco_protocols():
    assert data.SyntheticConfig().test_images == 5000


def test_synthetic_has_near_duplicate_images():
    # A near-duplicate is much closer to its source than unrelated images are to each other.
    cfg = data.SyntheticConfig(seed=0, train_images=400, dev_images=10, test_images=10, nuisance_dims=0,
                               feature_noise=0.0, image_noise=0.0)
    ims = torch.from_numpy(data.synthetic_dataset(cfg).train.images)
    dist = torch.cdist(ims, ims)
    dist.fill_diagonal_(float("inf"))
    nearest = dist.min(dim=1).values
    typical = dist[torch.isfinite(dist)].median()
    close = (nearest < 0.25 * typical).double().mean().item()
    assert 0.3 <= close <= 0.7  # the copies (30%) and their sources


def test_caption_batch_and_image_batch():
    split = data.synthetic_dataset(SMALL).train
    caps, lengths = split.caption_batch(torch.tensor([7, 0]))
    assert lengths is None and torch.equal(caps, torch.from_numpy(split.captions[[7, 0]]))
    assert split.image_batch(torch.tensor([7 // 5])).shape == (1, 24)


def test_epoch_order_is_a_function_of_seed_and_epoch():
    a = data.epoch_order(50, seed=1, epoch=2)
    assert torch.equal(a, data.epoch_order(50, seed=1, epoch=2))
    assert not torch.equal(a, data.epoch_order(50, seed=1, epoch=3))
    assert torch.equal(torch.sort(a).values, torch.arange(50))


# ------------------------------------------------------------------------------ file layout

def write_split(root: Path, name: str, images: np.ndarray, captions: np.ndarray | list[str]) -> None:
    np.save(root / f"{name}_ims.npy", images)
    if isinstance(captions, list):
        (root / f"{name}_caps.txt").write_text("\n".join(captions) + "\n")
    else:
        np.save(root / f"{name}_caps.npy", captions)


def feature_layout(root: Path, *, regions: int | None = None) -> Path:
    rng = np.random.default_rng(0)
    for name, n in (("train", 4), ("dev", 2), ("test", 3)):
        shape = (n, 8) if regions is None else (n, regions, 8)
        write_split(root, name, rng.standard_normal(shape).astype(np.float32),
                    rng.standard_normal((5 * n, 6)).astype(np.float16))
    return root


def test_reads_pooled_features_and_caption_features(tmp_path):
    ds = data.load_vse_dataset(feature_layout(tmp_path))
    assert (ds.train.num_images, ds.dev.num_images, ds.test.num_images) == (4, 2, 3)
    assert ds.image_dim == 8 and ds.caption_dim == 6 and ds.vocab is None
    caps, lengths = ds.test.caption_batch(torch.tensor([14, 2]))
    assert lengths is None and caps.dtype == torch.float32
    assert torch.equal(caps, torch.from_numpy(np.load(tmp_path / "test_caps.npy")[[14, 2]].astype(np.float32)))


def test_reads_region_features(tmp_path):
    ds = data.load_vse_dataset(feature_layout(tmp_path, regions=3))
    assert ds.image_dim == 8
    batch = ds.dev.image_batch(torch.tensor([1, 0]))
    assert batch.shape == (2, 3, 8)
    assert torch.equal(batch[0], torch.from_numpy(np.load(tmp_path / "dev_ims.npy")[1]))


def test_reads_raw_captions_with_a_training_vocabulary(tmp_path):
    train_caps = [f"A dog, number {i}!" for i in range(10)]
    test_caps = ["a cat"] * 4 + [""]
    write_split(tmp_path, "train", np.zeros((2, 4), np.float32), train_caps)
    write_split(tmp_path, "dev", np.zeros((1, 4), np.float32), train_caps[:5])
    write_split(tmp_path, "test", np.zeros((1, 4), np.float32), test_caps)
    ds = data.load_vse_dataset(tmp_path)
    assert ds.vocab[:4] == [data.PAD, data.UNK, "a", "dog"]  # most frequent first
    assert "cat" not in ds.vocab and ds.caption_dim is None
    tokens, lengths = ds.test.caption_batch(torch.tensor([0, 4]))
    a, unk = ds.vocab.index("a"), ds.vocab.index(data.UNK)
    assert lengths.tolist() == [2, 1]  # an empty caption is one UNK
    assert tokens.tolist() == [[a, unk], [unk, 0]]  # trimmed to the batch's longest caption
    again = data.load_vse_dataset(tmp_path, vocab=["<pad>", "<unk>", "dog"])
    assert again.vocab == ["<pad>", "<unk>", "dog"]  # a checkpoint's vocabulary wins


def test_tokenize_and_vocab():
    assert data.tokenize("Two dogs' toys, 3 balls; it's fine.") == ["two", "dogs", "toys", "3", "balls", "it's",
                                                                   "fine"]
    assert data.build_vocab(["b a", "a c", "b"], min_count=2) == [data.PAD, data.UNK, "a", "b"]
    tokens, lengths = data.encode(["a b zz"], [data.PAD, data.UNK, "a", "b"])
    assert tokens.tolist() == [[2, 3, 1]] and lengths.tolist() == [3]


@pytest.mark.parametrize("break_it, message", [
    (lambda root: (root / "dev_ims.npy").unlink(), r"missing data file .*dev_ims\.npy"),
    (lambda root: (root / "test_caps.npy").unlink(), r"neither .*test_caps\.txt nor .*test_caps\.npy"),
    (lambda root: np.save(root / "train_caps.npy", np.zeros((19, 6), np.float32)),
     r"train_ims\.npy has 4 images, so .*train_caps\.npy needs 4 x 5 = 20 captions, but it has 19"),
    (lambda root: np.save(root / "dev_ims.npy", np.full((2, 8), np.nan, np.float32)),
     r"dev_ims\.npy: row 0 holds NaN"),
    (lambda root: np.save(root / "test_caps.npy", np.r_[np.zeros((7, 6)), np.full((8, 6), np.inf)].astype(np.float32)),
     r"test_caps\.npy: row 7 holds NaN or inf"),
    (lambda root: np.save(root / "dev_ims.npy", np.zeros((2, 9), np.float32)), r"per-image shape \(9,\)"),
    (lambda root: (root / "train_ims.npy").write_bytes(b"not numpy"), r"cannot read .*train_ims\.npy"),
    (lambda root: np.save(root / "dev_ims.npy", np.zeros((2, 8), np.int64)), r"expected float features"),
])
def test_bad_files_are_named(tmp_path, break_it, message):
    feature_layout(tmp_path)
    break_it(tmp_path)
    with pytest.raises(data.DataError, match=message):
        data.load_vse_dataset(tmp_path)


def test_missing_directory_and_mixed_caption_kinds(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_vse_dataset(tmp_path / "nope")
    feature_layout(tmp_path)
    (tmp_path / "dev_caps.npy").unlink()
    (tmp_path / "dev_caps.txt").write_text("x\n" * 10)
    with pytest.raises(data.DataError, match="same caption kind"):
        data.load_vse_dataset(tmp_path)
