"""AOQ offline hard-negative mining and sampling (spec/losses.md §3.1–3.2).

Offline candidates (§3.1), computed once from a trained model's embeddings:

- ``i2t[i]``: the ``k_i2t`` captions c with the largest S(i, c) = ⟨img_i, cap_c⟩ among the
  captions that are not image i's own (cap_to_img[c] != i), best first;
- ``t2i[c]``: the ``k_t2i`` images j with the largest S(j, c) among the images other than
  caption c's own (j != cap_to_img[c]), best first.

Both lists come from :func:`vse_cuda.topk_similar` with label exclusion (images labelled by
their index, captions by their image), so the I×C similarity matrix is never materialized.

Per-sample sampling (§3.2), on every draw: :func:`sample_offline_negatives`.

Command line (writes OUT_DIR/i2t.npy, t2i.npy, meta.json)::

    python -m vse_cuda.mining EMB_DIR OUT_DIR [--k-i2t 2000] [--k-t2i 400] [--chunk-size N]
                              [--device cpu|cuda] [--dtype float32|float16] [--no-progress]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from ._checkpoint import output_dir_problem
from ._chunking import plan_chunks
from ._validation import check_bool, check_compatible, check_embeddings, check_has_data, check_int, check_strided
from .topk import topk_similar

__all__ = ["offline_candidates", "sample_offline_negatives", "main"]


# --------------------------------------------------------------------------------------------
# offline candidates (§3.1)
# --------------------------------------------------------------------------------------------

def offline_candidates(
    img_emb: torch.Tensor,
    cap_emb: torch.Tensor,
    cap_to_img: torch.Tensor,
    *,
    k_i2t: int = 2000,
    k_t2i: int = 400,
    chunk_size: int | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AOQ's offline candidate lists: every image's hardest foreign captions and every
    caption's hardest foreign images.

    With S(i, c) = ⟨img_emb_i, cap_emb_c⟩ (inner product, as the official tool; normalize the
    embeddings first for cosine):

    - ``i2t[i] = top-k_i2t over {c : cap_to_img[c] != i} of S(i, c)``
    - ``t2i[c] = top-k_t2i over {j : j != cap_to_img[c]} of S(j, c)``

    Each list is ordered best first; ties go to the lower index and NaN similarities rank
    above every number (the rules of :func:`vse_cuda.topk_similar`), so NaN embeddings show
    up at the head of the lists instead of being skipped; indices are always in range and
    never an anchor's own.

    Memory: the two int64 outputs, O((I + C)·k), plus one similarity tile at a time
    (``chunk_size`` query rows × as many keys as the tile budget allows); the similarity
    values are dropped chunk by chunk, never kept for all rows.

    Args:
        img_emb: [I, D] image embeddings, float16/bfloat16/float32/float64.
        cap_emb: [C, D] caption embeddings, same D, dtype and device.
        cap_to_img: int64 [C] on the same device; caption c belongs to image cap_to_img[c]
            in [0, I). Images may own any number of captions (including none).
        k_i2t: captions per image, 1 <= k_i2t <= C minus the largest caption count of an image.
        k_t2i: images per caption, 1 <= k_t2i <= I - 1.
        chunk_size: query rows per tile (default: :mod:`vse_cuda._chunking`'s row chunk).
        progress: show one tqdm progress bar over the I + C query rows.

    Returns:
        ``(i2t [I, k_i2t], t2i [C, k_t2i])``, int64, on the inputs' device.
    """
    _check_candidate_inputs(img_emb, cap_emb, cap_to_img, k_i2t, k_t2i, chunk_size)
    check_bool("progress", progress)
    n_img, n_cap = img_emb.size(0), cap_emb.size(0)
    img_labels = torch.arange(n_img, device=img_emb.device)
    bar = _progress_bar(n_img + n_cap) if progress else None
    try:
        i2t = _mine_direction(img_emb, cap_emb, img_labels, cap_to_img, k_i2t, chunk_size, bar, "i2t")
        t2i = _mine_direction(cap_emb, img_emb, cap_to_img, img_labels, k_t2i, chunk_size, bar, "t2i")
    finally:
        if bar is not None:
            bar.close()
    return i2t, t2i


def _check_candidate_inputs(img_emb: object, cap_emb: object, cap_to_img: object, k_i2t: object,
                            k_t2i: object, chunk_size: object) -> None:
    """DESIGN §6 checks; each error names the argument and what was expected."""
    check_embeddings("img_emb", img_emb)
    check_embeddings("cap_emb", cap_emb)
    check_compatible(("img_emb", "cap_emb"), (img_emb, cap_emb))
    n_img, n_cap = img_emb.size(0), cap_emb.size(0)
    if n_img == 0:  # else the cap_to_img range check below blames the captions
        raise ValueError(f"img_emb must hold at least one image, got shape {tuple(img_emb.shape)}")
    _check_cap_to_img(cap_to_img, n_img, n_cap, img_emb.device)
    most_owned = int(torch.bincount(cap_to_img, minlength=1).max()) if n_cap else 0
    _check_k("k_i2t", k_i2t, n_cap - most_owned,
             f"C={n_cap} captions minus the {most_owned} of the image owning the most")
    _check_k("k_t2i", k_t2i, n_img - 1, f"I-1={n_img - 1}, the images other than a caption's own")
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, 1)


def _check_cap_to_img(cap_to_img: object, n_img: int, n_cap: int, device: torch.device) -> None:
    if not isinstance(cap_to_img, torch.Tensor):
        raise TypeError(f"cap_to_img must be a torch.Tensor of int64, got {type(cap_to_img).__name__}")
    if cap_to_img.dtype != torch.int64:
        raise TypeError(f"cap_to_img must be int64, got {cap_to_img.dtype}")
    check_strided("cap_to_img", cap_to_img)
    if cap_to_img.dim() != 1 or cap_to_img.size(0) != n_cap:
        raise ValueError(f"cap_to_img must have shape ({n_cap},) (one image per caption), "
                         f"got {tuple(cap_to_img.shape)}")
    if cap_to_img.device != device:
        raise ValueError(f"cap_to_img is on {cap_to_img.device} but the embeddings are on {device}")
    check_has_data("cap_to_img", cap_to_img, "the k bounds are counted from its values")
    if n_cap and not bool(((cap_to_img >= 0) & (cap_to_img < n_img)).all()):
        low, high = int(cap_to_img.min()), int(cap_to_img.max())
        raise ValueError(f"cap_to_img values must be image indices in [0, {n_img}), got [{low}, {high}]")


def _check_k(name: str, k: object, candidates: int, why: str) -> None:
    """k in [1, candidates], with the count explained when it is exceeded."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if not 1 <= k <= candidates:
        raise ValueError(f"{name} must be in [1, {candidates}] ({why}), got {k}")


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="offline candidates", unit="row")


def _mine_direction(queries: torch.Tensor, keys: torch.Tensor, query_labels: torch.Tensor,
                    key_labels: torch.Tensor, k: int, chunk_size: int | None, bar, name: str) -> torch.Tensor:
    """Indices of every query's k best keys of another label, written chunk by chunk into a
    preallocated int64 output so the similarity values never pile up (they would cost as
    much memory as the indices, and a torch.cat of chunks would double the peak again)."""
    n = queries.size(0)
    out = torch.empty(n, k, dtype=torch.int64, device=queries.device)
    rows = plan_chunks(n, keys.size(0), queries.dtype, chunk_size).rows
    if bar is not None:
        bar.set_postfix_str(name)
    for start in range(0, n, rows):
        sl = slice(start, start + rows)
        _, indices = topk_similar(queries[sl], keys, k, query_labels=query_labels[sl],
                                  key_labels=key_labels, chunk_size=rows)
        out[sl] = indices
        if bar is not None:
            bar.update(indices.size(0))
    return out


# --------------------------------------------------------------------------------------------
# per-sample sampling (§3.2)
# --------------------------------------------------------------------------------------------

def sample_offline_negatives(
    i2t: torch.Tensor,
    t2i: torch.Tensor,
    captions: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    pool: int = 300,
    captions_per_image: int = 5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official AOQ draw of offline negatives for the pairs (image k // P, caption k),
    one per k in ``captions`` (P = ``captions_per_image``, h = ``pool``):

    - n ~ Uniform{0, …, h−1}, one draw per pair, shared by both directions;
    - ``off_txt = i2t[k // P, n]``        (T̃, offline hard caption of the image)
    - ``off_img = t2i[k, n // P]``        (Ĩ, offline hard image of the caption; rank < ⌈h/P⌉)
    - ``txt2 = off_img · P + u``, u ~ Uniform{0, …, P−1}   (T′, a caption of Ĩ)
    - ``img2 = off_txt // P``             (I′, the image of T̃)

    Random numbers: first all n (``torch.randint(pool, [B])``), then all u
    (``torch.randint(P, [B])``), from ``generator`` (the global RNG when None), so a seeded
    generator reproduces the draw exactly. A call that raises leaves the generator as it was.

    The layout is the official one: caption k belongs to image k // P, so C = I·P. A pool
    larger than the lists is refused rather than clipped, since clipping would silently
    change the distribution of n away from the official uniform one.

    Args:
        i2t: int64 [I, K_i2t] from :func:`offline_candidates`, K_i2t >= pool.
        t2i: int64 [I·P, K_t2i], K_t2i >= ⌈pool / P⌉ (= (pool − 1) // P + 1).
        captions: int64 [B] caption indices in [0, I·P) (the batch's pairs).
        generator: torch.Generator on the lists' device, or None.
        pool: h, the number of top candidates drawn from (official 300).
        captions_per_image: P (official 5).

    Returns:
        ``(off_txt, off_img, img2, txt2)``, int64 [B] each, on the lists' device.
    """
    _check_sampling_inputs(i2t, t2i, captions, generator, pool, captions_per_image)
    per = captions_per_image
    batch, device = captions.size(0), i2t.device
    # The lists' entries are checked only once drawn (O(B), not O(lists)); a draw that fails
    # that check gives its random numbers back, so a failed call leaves the RNG as it was.
    rng = generator if generator is not None else _default_generator(device)
    rng_state = rng.get_state()
    n = torch.randint(pool, (batch,), generator=generator, device=device)
    u = torch.randint(per, (batch,), generator=generator, device=device)
    off_txt = i2t[captions // per, n]
    off_img = t2i[captions, n // per]
    try:
        _check_drawn("i2t", off_txt, t2i.size(0), "caption")
        _check_drawn("t2i", off_img, i2t.size(0), "image")
    except ValueError:
        rng.set_state(rng_state)
        raise
    return off_txt, off_img, off_txt // per, off_img * per + u


def _default_generator(device: torch.device) -> torch.Generator:
    """The generator torch.randint(device=device) draws from when given none."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    return torch.default_generator


def _check_sampling_inputs(i2t: object, t2i: object, captions: object, generator: object,
                           pool: object, per: object) -> None:
    for name, t in (("i2t", i2t), ("t2i", t2i), ("captions", captions)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of int64, got {type(t).__name__}")
        if t.dtype != torch.int64:
            raise TypeError(f"{name} must be int64, got {t.dtype}")
        check_strided(name, t)
        if t.dim() != (1 if name == "captions" else 2):
            raise ValueError(f"{name} must be {'1' if name == 'captions' else '2'}-D, got shape {tuple(t.shape)}")
        if t.device != i2t.device:
            raise ValueError(f"{name} is on {t.device} but i2t is on {i2t.device}")
    check_has_data("captions", captions, "the draw indexes the lists with its values")
    check_int("captions_per_image", per, 1)
    if t2i.size(0) != i2t.size(0) * per:
        raise ValueError(f"t2i must have I*captions_per_image = {i2t.size(0)}*{per} rows (caption k belongs "
                         f"to image k // {per}), got {t2i.size(0)}")
    check_int("pool", pool, 1, i2t.size(1))  # n indexes i2t's columns
    if (pool - 1) // per >= t2i.size(1):
        raise ValueError(f"pool must be at most {t2i.size(1) * per} for t2i with {t2i.size(1)} columns "
                         f"(image rank n // {per} must be < {t2i.size(1)}), got {pool}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != i2t.device.type:
        raise ValueError(f"generator is on {generator.device} but i2t is on {i2t.device}")
    if captions.numel() and not bool(((captions >= 0) & (captions < t2i.size(0))).all()):
        raise ValueError(f"captions must be caption indices in [0, {t2i.size(0)}), "
                         f"got [{int(captions.min())}, {int(captions.max())}]")


def _check_drawn(name: str, drawn: torch.Tensor, limit: int, what: str) -> None:
    """The drawn entries index the other list; one out of range means mismatched lists. Only
    the B drawn entries are checked, not the whole lists, to keep a draw O(B)."""
    if drawn.numel() and not bool(((drawn >= 0) & (drawn < limit)).all()):
        raise ValueError(f"{name} holds {what} indices outside [0, {limit}) (got {int(drawn.min())}.."
                         f"{int(drawn.max())}): are i2t and t2i from the same offline_candidates call?")


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------

class _UsageError(Exception):
    """A one-line message for the user; main() prints it and exits with status 2."""


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m vse_cuda.mining",
        description="AOQ offline candidates: each image's hardest foreign captions (i2t) and each "
                    "caption's hardest foreign images (t2i), from precomputed embeddings.")
    parser.add_argument("emb_dir", type=Path, metavar="EMB_DIR",
                        help="holds images.npy [I, D], captions.npy [C, D], optional cap_to_img.npy [C]")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="where i2t.npy, t2i.npy, meta.json go")
    parser.add_argument("--k-i2t", type=int, default=2000, help="captions kept per image (default 2000)")
    parser.add_argument("--k-t2i", type=int, default=400, help="images kept per caption (default 400)")
    parser.add_argument("--chunk-size", type=int, default=None, help="query rows per tile (default from the memory budget)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to compute (default cpu)")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="dtype of the embeddings on the device (default float32; float16 accumulates in float32)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


#: Rows checked for NaN/inf at a time, so a memory-mapped file is never read whole at once.
_SCAN_ROWS = 4096


def _load_matrix(path: Path, name: str, dtype: str):
    """A 2-D float array from ``path`` (memory-mapped), finite once cast to ``dtype``: the check
    runs on the values the device will hold, so float32 data beyond float16's range (65504)
    is refused under ``--dtype float16`` instead of mining on infinities."""
    import numpy as np

    array = _load(path)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise _UsageError(f"{path} must hold a 2-D float array [{name}, D], got {array.dtype} shape {array.shape}")
    bad = {"NaN or inf": [], f"values beyond {dtype}'s range": []}  # row indices, per kind
    for start in range(0, array.shape[0], _SCAN_ROWS):
        block = np.asarray(array[start:start + _SCAN_ROWS])
        finite = np.isfinite(block).all(axis=1)
        with np.errstate(over="ignore"):
            fits = np.isfinite(block.astype(dtype)).all(axis=1)
        bad["NaN or inf"].extend(start + np.flatnonzero(~finite))
        bad[f"values beyond {dtype}'s range"].extend(start + np.flatnonzero(finite & ~fits))
    for kind, rows in bad.items():
        if rows:
            hint = "" if kind == "NaN or inf" else \
                f" (largest finite {float(np.finfo(dtype).max):g}; use --dtype float32 or rescale)"
            raise _UsageError(f"{path} has {kind} in {len(rows)} row(s) (first: row {rows[0]}){hint}")
    return array


def _load(path: Path):
    import numpy as np

    if not path.is_file():
        raise _UsageError(f"{path} not found")
    try:
        # Memory-mapped: a header that declares more data than the file holds is refused by
        # the mapping instead of allocating the declared size (a truncated file could ask for TiB).
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as error:
        raise _UsageError(f"{path} is not a readable .npy file ({error})") from error


def _load_cap_to_img(emb_dir: Path, n_img: int, n_cap: int):
    """cap_to_img.npy when present, else c // (C / I) for C a multiple of I."""
    import numpy as np

    path = emb_dir / "cap_to_img.npy"
    if not path.exists():
        if n_img == 0 or n_cap % n_img:
            raise _UsageError(f"{path} is needed: C={n_cap} captions is not a multiple of I={n_img} images, "
                              "so captions cannot be assigned to images as c // (C / I)")
        return np.arange(n_cap, dtype=np.int64) // (n_cap // n_img)
    array = _load(path)
    if array.shape != (n_cap,) or not np.issubdtype(array.dtype, np.integer):
        raise _UsageError(f"{path} must hold {n_cap} integers (one per caption), got {array.dtype} shape {array.shape}")
    if n_cap and (array.min() < 0 or array.max() >= n_img):
        raise _UsageError(f"{path} must hold image indices in [0, {n_img}), got [{array.min()}, {array.max()}]")
    return array.astype(np.int64)


def _load_inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = _load_matrix(args.emb_dir / "images.npy", "I", args.dtype)
    captions = _load_matrix(args.emb_dir / "captions.npy", "C", args.dtype)
    if images.shape[1] != captions.shape[1]:
        raise _UsageError(f"images.npy has D={images.shape[1]} but captions.npy has D={captions.shape[1]}")
    cap_to_img = _load_cap_to_img(args.emb_dir, images.shape[0], captions.shape[0])
    if args.device == "cuda" and not torch.cuda.is_available():
        raise _UsageError("--device cuda was asked for but torch.cuda.is_available() is False")
    dtype = getattr(torch, args.dtype)
    return (_to_tensor(images, args.device, dtype), _to_tensor(captions, args.device, dtype),
            torch.from_numpy(cap_to_img).to(args.device))


def _to_tensor(array, device: str, dtype: torch.dtype) -> torch.Tensor:
    """A memory map's rows copied into a tensor (torch.from_numpy refuses read-only maps)."""
    import numpy as np

    return torch.from_numpy(np.array(array)).to(device, dtype)


def _check_out_dir(out_dir: Path) -> None:
    """OUT_DIR must be (or become) a writable directory: checked before mining, so a bad path
    costs no computation (and the mined lists are never lost to it afterwards)."""
    problem = output_dir_problem(out_dir, ("i2t.npy", "t2i.npy", "meta.json"))
    if problem:
        raise _UsageError(f"OUT_DIR {out_dir}: {problem}")


def _write_outputs(args: argparse.Namespace, i2t: torch.Tensor, t2i: torch.Tensor, shapes: dict,
                   seconds: float) -> None:
    import numpy as np

    from . import __version__

    args.out_dir.mkdir(parents=True, exist_ok=True)
    np.save(args.out_dir / "i2t.npy", i2t.cpu().numpy())
    np.save(args.out_dir / "t2i.npy", t2i.cpu().numpy())
    sources = {name: str((args.emb_dir / f"{name}.npy").resolve())
               for name in ("images", "captions", "cap_to_img") if (args.emb_dir / f"{name}.npy").exists()}
    meta = {"i2t_shape": list(i2t.shape), "t2i_shape": list(t2i.shape), **shapes,
            "k_i2t": args.k_i2t, "k_t2i": args.k_t2i, "chunk_size": args.chunk_size,
            "device": args.device, "dtype": args.dtype, "sources": sources,
            "cap_to_img": "file" if "cap_to_img" in sources else "c // (C / I)",
            "seconds": round(seconds, 3), "vse_cuda": __version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    (args.out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vse_cuda.mining``; returns the exit status (0, or 2 with a one-line error)."""
    args = _parse_args(argv)
    try:
        _check_out_dir(args.out_dir)
        images, captions, cap_to_img = _load_inputs(args)
        start = time.perf_counter()
        i2t, t2i = offline_candidates(images, captions, cap_to_img, k_i2t=args.k_i2t, k_t2i=args.k_t2i,
                                      chunk_size=args.chunk_size, progress=not args.no_progress)
        seconds = time.perf_counter() - start
    except (_UsageError, ValueError, TypeError) as error:
        print(f"python -m vse_cuda.mining: error: {error}", file=sys.stderr)
        return 2
    shapes = {"images_shape": list(images.shape), "captions_shape": list(captions.shape)}
    try:
        _write_outputs(args, i2t, t2i, shapes, seconds)
    except OSError as error:  # e.g. the disk filled up or the directory went away meanwhile
        print(f"python -m vse_cuda.mining: error: cannot write to OUT_DIR {args.out_dir}: {error}", file=sys.stderr)
        return 2
    print(f"mined {images.size(0)} images x {captions.size(0)} captions (D={images.size(1)}, {args.dtype}, "
          f"{args.device}) in {seconds:.1f} s: i2t {list(i2t.shape)}, t2i {list(t2i.shape)} -> {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
