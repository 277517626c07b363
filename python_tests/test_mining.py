"""AOQ offline mining (vse_cuda.mining): offline_candidates against a materialized oracle on
every backend, the §3.2 sampling draw, the command line and bad input.

On simt (and cuda) offline_candidates runs topk_tile_kernel (csrc/cuda/topk.cuh) with labels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import vse_cuda
from vse_cuda import mining

REPO = Path(__file__).resolve().parents[1]


def oracle(img, cap, cap_to_img, k_i2t, k_t2i):
    """Materialized S in float64, own pairs masked to -inf, stable descending sort (ties keep
    the lower index first; NaN sorts above every number), first k columns."""
    S = img.double() @ cap.double().T
    own = cap_to_img[None, :] == torch.arange(img.size(0), device=img.device)[:, None]
    S_i2t = S.masked_fill(own, float("-inf"))
    S_t2i = S.T.masked_fill(own.T, float("-inf"))
    i2t = torch.sort(S_i2t, dim=1, descending=True, stable=True).indices[:, :k_i2t]
    t2i = torch.sort(S_t2i, dim=1, descending=True, stable=True).indices[:, :k_t2i]
    return i2t, t2i


def uneven_owners(n_img: int, n_cap: int, gen: torch.Generator, device) -> torch.Tensor:
    """Captions in shuffled order, images owning 0 to many captions (never in blocks of 5)."""
    weights = torch.rand(n_img, generator=gen) ** 3
    return torch.multinomial(weights, n_cap, replacement=True, generator=gen).to(device)


def max_k(cap_to_img: torch.Tensor, n_img: int) -> tuple[int, int]:
    return cap_to_img.numel() - int(torch.bincount(cap_to_img, minlength=n_img).max()), n_img - 1


@pytest.mark.parametrize("n_img,per,d,k_i2t,k_t2i,chunk", [
    (2, 1, 3, 1, 1, None), (6, 5, 7, 11, 4, 4), (13, 3, 16, 20, 12, 5), (9, 5, 4, 40, 8, None),
])
def test_matches_oracle_five_per_image(backend, device, on_backend, n_img, per, d, k_i2t, k_t2i, chunk):
    g = torch.Generator().manual_seed(n_img * 100 + d)
    img = torch.randn(n_img, d, generator=g, dtype=torch.float64).to(device)
    cap = (img.repeat_interleave(per, 0) + torch.randn(n_img * per, d, generator=g, dtype=torch.float64).to(device))
    cap_to_img = torch.arange(n_img * per, device=device) // per
    with on_backend():
        i2t, t2i = mining.offline_candidates(img, cap, cap_to_img, k_i2t=k_i2t, k_t2i=k_t2i,
                                             chunk_size=chunk, progress=False)
    expected = oracle(img, cap, cap_to_img, k_i2t, k_t2i)
    assert i2t.dtype == t2i.dtype == torch.int64 and i2t.device == t2i.device == img.device
    assert torch.equal(i2t, expected[0]) and torch.equal(t2i, expected[1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_exact_ties_uneven_owners_and_k_at_its_maximum(backend, device, on_backend, dtype):
    # Integer embeddings in {-1, 0, 1}: every similarity is exact in any dtype and summation
    # order, with many ties, so the lists must equal the stable oracle index for index.
    g = torch.Generator().manual_seed(21)
    n_img, n_cap = 11, 47
    img = torch.randint(-1, 2, (n_img, 3), generator=g).to(device, dtype)
    cap = torch.randint(-1, 2, (n_cap, 3), generator=g).to(device, dtype)
    cap_to_img = uneven_owners(n_img, n_cap, g, device)
    top_i2t, top_t2i = max_k(cap_to_img, n_img)
    for k_i2t, k_t2i, chunk in ((1, 1, 2), (9, 4, 3), (top_i2t, top_t2i, None)):
        with on_backend():
            i2t, t2i = mining.offline_candidates(img, cap, cap_to_img, k_i2t=k_i2t, k_t2i=k_t2i,
                                                 chunk_size=chunk, progress=False)
        expected = oracle(img, cap, cap_to_img, k_i2t, k_t2i)
        assert torch.equal(i2t, expected[0]), f"i2t k={k_i2t}"
        assert torch.equal(t2i, expected[1]), f"t2i k={k_t2i}"
    # At the maximum the image owning the most captions lists every foreign caption once.
    busiest = int(torch.bincount(cap_to_img, minlength=n_img).argmax())
    assert sorted(i2t[busiest].tolist()) == (cap_to_img != busiest).nonzero().flatten().tolist()
    assert all(sorted(row) == [j for j in range(n_img) if j != own]
               for row, own in zip(t2i.tolist(), cap_to_img.tolist()))


def test_nan_embeddings_rank_first_and_stay_in_range(backend, device, on_backend):
    g = torch.Generator().manual_seed(4)
    img = torch.randn(8, 5, generator=g, dtype=torch.float64).to(device)
    cap = torch.randn(24, 5, generator=g, dtype=torch.float64).to(device)
    cap_to_img = torch.arange(24, device=device) // 3
    cap[10, 2] = float("nan")  # caption of image 3
    img[6, 0] = float("nan")
    with on_backend():
        i2t, t2i = mining.offline_candidates(img, cap, cap_to_img, k_i2t=6, k_t2i=4, progress=False)
    expected = oracle(img, cap, cap_to_img, 6, 4)
    assert torch.equal(i2t, expected[0]) and torch.equal(t2i, expected[1])
    assert bool(((i2t >= 0) & (i2t < 24)).all()) and bool(((t2i >= 0) & (t2i < 8)).all())
    assert i2t[0, 0] == 10 and i2t[3, 0] != 10  # NaN shows at the head, but never as an own caption
    assert t2i[0, 0] == 6 and (t2i[18:21, 0] != 6).all()


def test_chunking_does_not_change_the_lists_and_progress_shows(capsys):
    g = torch.Generator().manual_seed(8)
    img, cap = torch.randn(30, 6, generator=g, dtype=torch.float64), torch.randn(90, 6, generator=g, dtype=torch.float64)
    cap_to_img = torch.arange(90) // 3
    whole = mining.offline_candidates(img, cap, cap_to_img, k_i2t=12, k_t2i=5, progress=False)
    assert "offline candidates" not in capsys.readouterr().err
    chunked = mining.offline_candidates(img, cap, cap_to_img, k_i2t=12, k_t2i=5, chunk_size=7, progress=True)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
    err = capsys.readouterr().err
    assert "offline candidates" in err and "120/120" in err  # one bar over I + C rows


def test_memory_is_not_the_similarity_matrix_and_the_module_loads_lazily():
    # S would be 2000 × 25000 float32 = 191 MiB per direction; with 128-row tiles the extra
    # memory is the outputs (2000·10 + 25000·10 int64 = 2 MiB), a 12 MiB tile and the
    # kernel's and allocator's slack (56 MiB measured in all), well under half of S.
    script = textwrap.dedent("""
        import resource, sys, torch, vse_cuda
        assert "vse_cuda.mining" not in sys.modules  # not loaded by `import vse_cuda` ...
        mining = vse_cuda.mining                      # ... but on first use
        img, cap = torch.randn(2000, 8), torch.randn(25000, 8)
        cap_to_img = torch.arange(25000) // 12 % 2000
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        mining.offline_candidates(img, cap, cap_to_img, k_i2t=10, k_t2i=10, chunk_size=128, progress=False)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=_env())
    extra_mib = float(out.stdout.strip().splitlines()[-1])
    assert extra_mib < 96, f"offline_candidates used {extra_mib:.0f} MiB extra; S would need 191 MiB"


# --------------------------------------------------------------------------------------------
# sampling (§3.2)
# --------------------------------------------------------------------------------------------

def random_lists(n_img: int, per: int, k_i2t: int, k_t2i: int, seed: int):
    """Lists shaped like offline_candidates' output: distinct foreign indices per row."""
    g = torch.Generator().manual_seed(seed)
    n_cap = n_img * per
    i2t = torch.stack([_foreign(torch.arange(n_cap) // per != i, k_i2t, g) for i in range(n_img)])
    t2i = torch.stack([_foreign(torch.arange(n_img) != c // per, k_t2i, g) for c in range(n_cap)])
    return i2t, t2i


def _foreign(allowed: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    candidates = allowed.nonzero().flatten()
    return candidates[torch.randperm(candidates.numel(), generator=g)[:k]]


def test_sampling_is_reproducible_with_a_seeded_generator():
    i2t, t2i = random_lists(20, 5, 40, 10, seed=1)
    captions = torch.randint(0, 100, (64,), generator=torch.Generator().manual_seed(2))
    draw = lambda seed: mining.sample_offline_negatives(i2t, t2i, captions, pool=30,
                                                        generator=torch.Generator().manual_seed(seed))
    first, again, other = draw(7), draw(7), draw(8)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    assert all(t.dtype == torch.int64 and t.shape == (64,) for t in first)
    torch.manual_seed(3)  # generator=None draws from the global RNG
    global_a = mining.sample_offline_negatives(i2t, t2i, captions, pool=30)
    torch.manual_seed(3)
    global_b = mining.sample_offline_negatives(i2t, t2i, captions, pool=30)
    assert all(torch.equal(a, b) for a, b in zip(global_a, global_b))


@pytest.mark.parametrize("per,pool", [(5, 300), (5, 7), (3, 40), (1, 12)])
def test_every_draw_satisfies_the_official_definition(per, pool):
    n_img = 80
    i2t, t2i = random_lists(n_img, per, max(pool, 3), (pool - 1) // per + 1, seed=per * 1000 + pool)
    captions = torch.arange(n_img * per).repeat(5)
    off_txt, off_img, img2, txt2 = mining.sample_offline_negatives(
        i2t, t2i, captions, pool=pool, captions_per_image=per, generator=torch.Generator().manual_seed(0))
    image = captions // per
    # i2t rows hold distinct captions, so off_txt pins down the rank n that was drawn ...
    hits = i2t[image] == off_txt[:, None]
    assert bool((hits.sum(1) == 1).all())
    n = hits.int().argmax(1)
    assert bool((n < pool).all())
    # ... and the same n must have picked the image: t2i[k, n // P] (the official coupling).
    assert torch.equal(off_img, t2i[captions, n // per])
    assert bool((off_img != image).all()) and bool((off_txt // per != image).all())
    assert torch.equal(txt2 // per, off_img)    # T′ is one of Ĩ's captions
    assert torch.equal(img2, off_txt // per)    # I′ owns T̃


def test_drawn_ranks_and_caption_choices_are_uniform():
    pool, per, draws = 300, 5, 150_000
    i2t, t2i = random_lists(70, per, 300, 60, seed=5)
    captions = torch.zeros(draws, dtype=torch.int64)  # caption 0 of image 0, drawn many times
    off_txt, _, _, txt2 = mining.sample_offline_negatives(i2t, t2i, captions, pool=pool,
                                                          generator=torch.Generator().manual_seed(11))
    position = torch.full((i2t.size(0) * per,), -1, dtype=torch.int64)
    position[i2t[0]] = torch.arange(i2t.size(1))
    counts = torch.bincount(position[off_txt], minlength=pool)
    expected = draws / pool  # 500, binomial sd ≈ 22: these bounds fail only for a broken draw
    assert counts.numel() == pool and int(counts.min()) > 0.6 * expected and int(counts.max()) < 1.4 * expected
    choice = torch.bincount(txt2 % per, minlength=per)
    assert choice.numel() == per and bool((choice - draws / per).abs().lt(0.05 * draws / per).all())


def test_pool_too_large_for_the_lists_is_refused_not_clipped():
    i2t, t2i = random_lists(10, 5, 30, 6, seed=2)
    captions = torch.arange(50)
    mining.sample_offline_negatives(i2t, t2i, captions, pool=30)  # n ≤ 29, image rank ≤ 5: fits
    with pytest.raises(ValueError, match="pool"):
        mining.sample_offline_negatives(i2t, t2i, captions, pool=31)  # beyond i2t's 30 columns
    with pytest.raises(ValueError, match="pool must be at most 25"):
        mining.sample_offline_negatives(i2t, t2i[:, :5], captions, pool=30)  # rank 29 // 5 = 5 ≥ 5
    mining.sample_offline_negatives(i2t, t2i[:, :5], captions, pool=25)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------

def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "2"}


def _write_embeddings(root: Path, n_img: int = 6, per: int = 4, d: int = 5, cap_to_img=None) -> tuple:
    rng = np.random.default_rng(0)
    img = rng.standard_normal((n_img, d)).astype(np.float32)
    cap = rng.standard_normal((n_img * per, d)).astype(np.float32)
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "images.npy", img)
    np.save(root / "captions.npy", cap)
    if cap_to_img is not None:
        np.save(root / "cap_to_img.npy", cap_to_img)
    return img, cap


def test_cli_end_to_end(tmp_path):
    img, cap = _write_embeddings(tmp_path / "emb")
    out = subprocess.run([sys.executable, "-m", "vse_cuda.mining", str(tmp_path / "emb"), str(tmp_path / "out"),
                          "--k-i2t", "7", "--k-t2i", "3", "--chunk-size", "2"],
                         capture_output=True, text=True, env=_env(), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "RuntimeWarning" not in out.stderr  # runpy: module imported twice
    assert "i2t [6, 7]" in out.stdout and "t2i [24, 3]" in out.stdout
    i2t, t2i = np.load(tmp_path / "out" / "i2t.npy"), np.load(tmp_path / "out" / "t2i.npy")
    assert i2t.dtype == t2i.dtype == np.int64
    expected = oracle(torch.from_numpy(img), torch.from_numpy(cap), torch.arange(24) // 4, 7, 3)
    assert (i2t == expected[0].numpy()).all() and (t2i == expected[1].numpy()).all()
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["i2t_shape"] == [6, 7] and meta["t2i_shape"] == [24, 3] and meta["k_i2t"] == 7
    assert meta["cap_to_img"] == "c // (C / I)" and "cap_to_img" not in meta["sources"]
    assert meta["sources"]["images"].endswith("images.npy") and meta["seconds"] >= 0 and meta["date"]


def test_cli_reads_cap_to_img_and_float16(tmp_path, capsys):
    owners = np.array([2, 0, 0, 1, 2, 2, 2, 3, 0, 1, 3, 1, 0, 2, 3, 3, 1, 0, 0, 2], dtype=np.int32)
    img, cap = _write_embeddings(tmp_path / "emb", n_img=4, per=5, cap_to_img=owners)
    img[:], cap[:] = np.round(img * 2), np.round(cap * 2)  # exact in float16: ties decided by index
    np.save(tmp_path / "emb" / "images.npy", img)
    np.save(tmp_path / "emb" / "captions.npy", cap)
    argv = [str(tmp_path / "emb"), str(tmp_path / "out"), "--k-i2t", "13", "--k-t2i", "3",
            "--dtype", "float16", "--no-progress"]
    assert mining.main(argv) == 0
    expected = oracle(torch.from_numpy(img), torch.from_numpy(cap), torch.from_numpy(owners).long(), 13, 3)
    assert (np.load(tmp_path / "out" / "i2t.npy") == expected[0].numpy()).all()
    assert (np.load(tmp_path / "out" / "t2i.npy") == expected[1].numpy()).all()
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["cap_to_img"] == "file"
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("setup, extra, message", [
    ("missing_images", [], "images.npy not found"),
    ("d_mismatch", [], "images.npy has D=5 but captions.npy has D=4"),
    ("nan", [], "captions.npy has NaN or inf in 1 row(s) (first: row 3)"),
    ("uneven", [], "cap_to_img.npy is needed: C=23 captions is not a multiple of I=6 images"),
    ("bad_owner", [], "cap_to_img.npy must hold image indices in [0, 6), got [0, 6]"),
    ("short_owner", [], "cap_to_img.npy must hold 24 integers"),
    ("ok", ["--k-i2t", "21"], "k_i2t must be in [1, 20]"),
    ("ok", ["--k-t2i", "0"], "k_t2i must be in [1, 5]"),
    ("ok", ["--chunk-size", "0"], "chunk_size must be"),
    ("one_d", [], "images.npy must hold a 2-D float array"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, setup, extra, message):
    emb = tmp_path / "emb"
    _write_embeddings(emb)
    if setup == "missing_images":
        (emb / "images.npy").unlink()
    elif setup == "d_mismatch":
        np.save(emb / "captions.npy", np.zeros((24, 4), np.float32))
    elif setup == "nan":
        cap = np.load(emb / "captions.npy")
        cap[3, 1] = np.nan
        np.save(emb / "captions.npy", cap)
    elif setup == "uneven":
        np.save(emb / "captions.npy", np.zeros((23, 5), np.float32))
    elif setup == "bad_owner":
        np.save(emb / "cap_to_img.npy", np.arange(24) // 4 + (np.arange(24) == 23))
    elif setup == "short_owner":
        np.save(emb / "cap_to_img.npy", np.arange(23) // 4)
    elif setup == "one_d":
        np.save(emb / "images.npy", np.zeros(6, np.float32))
    status = mining.main([str(emb), str(tmp_path / "out"), "--no-progress", "--k-i2t", "5", "--k-t2i", "2", *extra])
    err = capsys.readouterr().err
    assert status == 2
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_cli_error_from_a_subprocess(tmp_path):
    out = subprocess.run([sys.executable, "-m", "vse_cuda.mining", str(tmp_path / "nowhere"), str(tmp_path / "o")],
                         capture_output=True, text=True, env=_env())
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [f"python -m vse_cuda.mining: error: {tmp_path / 'nowhere' / 'images.npy'} not found"]


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------

def _cands(**change):
    g = torch.Generator().manual_seed(0)
    args = {"img_emb": torch.randn(4, 3, generator=g), "cap_emb": torch.randn(12, 3, generator=g),
            "cap_to_img": torch.arange(12) // 3}
    args.update({k: v for k, v in change.items() if k in args})
    kwargs = {k: v for k, v in change.items() if k not in args}
    return mining.offline_candidates(args["img_emb"], args["cap_emb"], args["cap_to_img"],
                                     **{"k_i2t": 2, "k_t2i": 2, "progress": False, **kwargs})


@pytest.mark.parametrize("change, error, match", [
    ({"img_emb": torch.randn(4)}, ValueError, "img_emb must be 2-D"),
    ({"cap_emb": torch.randn(12, 5)}, ValueError, "cap_emb has D=5"),
    ({"cap_emb": torch.randn(12, 3, dtype=torch.float64)}, TypeError, "cap_emb has dtype"),
    ({"img_emb": torch.zeros(4, 3, dtype=torch.int64)}, TypeError, "img_emb must be float"),
    ({"cap_emb": torch.randn(12, 3, device="meta")}, ValueError, "cap_emb is on meta"),
    ({"cap_to_img": [0] * 12}, TypeError, "cap_to_img must be a torch.Tensor"),
    ({"cap_to_img": torch.zeros(12, dtype=torch.int32)}, TypeError, "cap_to_img must be int64"),
    ({"cap_to_img": torch.zeros(11, dtype=torch.int64)}, ValueError, r"cap_to_img must have shape \(12,\)"),
    ({"cap_to_img": torch.arange(12) // 3 - 1}, ValueError, r"cap_to_img values must be image indices in \[0, 4\)"),
    ({"cap_to_img": torch.arange(12) // 3 + 1}, ValueError, r"cap_to_img values"),
    ({"k_i2t": 0}, ValueError, "k_i2t must be in"),
    ({"k_i2t": 10}, ValueError, r"k_i2t must be in \[1, 9\]"),
    ({"k_i2t": 2.0}, TypeError, "k_i2t must be an int"),
    ({"k_t2i": 4}, ValueError, r"k_t2i must be in \[1, 3\]"),
    ({"k_t2i": True}, TypeError, "k_t2i must be an int"),
    ({"img_emb": torch.randn(1, 3), "cap_to_img": torch.zeros(12, dtype=torch.int64), "k_i2t": 1, "k_t2i": 1},
     ValueError, r"k_i2t must be in \[1, 0\]"),
    ({"chunk_size": 0}, ValueError, "chunk_size"),
])
def test_offline_candidates_bad_input(change, error, match):
    with pytest.raises(error, match=match):
        _cands(**change)


@pytest.mark.parametrize("change, error, match", [
    ({"i2t": torch.zeros(4, 10, dtype=torch.int32)}, TypeError, "i2t must be int64"),
    ({"t2i": torch.zeros(20, 10)}, TypeError, "t2i must be int64"),
    ({"captions": [0, 1]}, TypeError, "captions must be a torch.Tensor"),
    ({"captions": torch.zeros(2, 1, dtype=torch.int64)}, ValueError, "captions must be 1-D"),
    ({"t2i": torch.zeros(20, dtype=torch.int64)}, ValueError, "t2i must be 2-D"),
    ({"t2i": torch.zeros(19, 4, dtype=torch.int64)}, ValueError, "t2i must have I\\*captions_per_image = 4\\*5 rows"),
    ({"captions": torch.tensor([0, 20])}, ValueError, r"captions must be caption indices in \[0, 20\)"),
    ({"captions": torch.tensor([-1])}, ValueError, "captions must be caption indices"),
    ({"pool": 0}, ValueError, "pool must be in"),
    ({"pool": 3.0}, TypeError, "pool must be an int"),
    ({"captions_per_image": 0}, ValueError, "captions_per_image must be"),
    ({"generator": 1}, TypeError, "generator must be a torch.Generator"),
    ({"i2t": torch.full((4, 10), 20, dtype=torch.int64)}, ValueError, "i2t holds caption indices outside"),
    ({"t2i": torch.full((20, 4), 4, dtype=torch.int64)}, ValueError, "t2i holds image indices outside"),
])
def test_sampling_bad_input(change, error, match):
    args = {"i2t": torch.zeros(4, 10, dtype=torch.int64) + 5, "t2i": torch.zeros(20, 4, dtype=torch.int64),
            "captions": torch.arange(20)}
    args.update({k: v for k, v in change.items() if k in args})
    kwargs = {"pool": 10, **{k: v for k, v in change.items() if k not in args}}
    with pytest.raises(error, match=match):
        mining.sample_offline_negatives(args["i2t"], args["t2i"], args["captions"], **kwargs)
