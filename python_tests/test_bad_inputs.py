"""The bad-input battery (issue 6, DESIGN §6): one table of malformed calls across the whole
public API, each expected to raise ValueError/TypeError (RuntimeError where the environment,
not an argument, is at fault) with a message that names the argument.

Sparse and other non-strided layouts are refused by name (category "layout"); ints beyond
int64 are refused as out of range rather than failing in the dispatcher's argument cast.

Covered: vse_cuda.similarity, topk_similar, triplet_loss, unified_loss, quintuplet_loss,
goal_loss; TripletLoss, UnifiedLoss, QuintupletLoss, GoalLoss (__init__ keywords and forward);
vse_cuda.mining.offline_candidates and sample_offline_negatives;
vse_cuda.distributed.gather_with_grad; vse_cuda.use_backend; vse_cuda.evaluate's recall_at_k,
fold_recall, recall_table, chance_rsum, format_table and embed_split. Categories: wrong ranks,
shapes, dtypes, devices, labels, enum strings, k, non-finite hyper-parameters, empty tensors,
tensors that require grad where they must not, and wrong `group`.

Devices: there is no GPU here, so a device mismatch is a tensor on `meta` beside one on
`cpu`. Inputs all on `meta` are not bad input on the cpu backend (the fake kernels trace
them, as torch.compile does), but the simt backend runs CPU tensors only, and a gather has no
data to send from `meta`.

Requires grad: the index tensors (labels, cap_to_img, captions, i2t/t2i) must be int64, and
PyTorch lets only floating tensors require grad, so a float index tensor that requires grad is
refused by the dtype check. Hyper-parameters must be Python numbers: a learnable margin (a
tensor that requires grad) is refused rather than silently read as a constant, which would cut
its gradient. The unified loss's scale is the exception: a 0-dim floating tensor is its
learnable temperature, with a gradient of its own (test_unified.py).

Wrong group: not a ProcessGroup (str, int, list), and a group this process is not in
(`new_group` hands non-members GroupMember.NON_GROUP_MEMBER); a single-process gloo group
in a FileStore is the good group.

Every case runs on the cpu and simt backends. After each bad call, the global state must be as
before (active backend, autograd mode, default dtype, threads, chunk budget, the global RNG),
and a bundle of correct calls made before the battery must give bitwise the same results.
The whole battery also runs once in a fresh interpreter with a timeout, before the in-process
cases, so that a crash or a hang fails the cases it hit instead of killing the test run.

Run `python python_tests/test_bad_inputs.py` for that subprocess's report by hand.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torch.distributed as dist

import vse_cuda
from vse_cuda import _chunking, _lib, distributed, evaluate, mining
from vse_cuda.data import Split

from _loss_cases import QUINTUPLET_INPUTS

BACKENDS = ("cpu", "simt")
NAN, INF = float("nan"), float("inf")
NON_MEMBER = dist.GroupMember.NON_GROUP_MEMBER  # what new_group returns to a non-member
SUBPROCESS_TIMEOUT_S = 120
MAX_RESTARTS = 3  # fresh interpreters started after a crash, at most


# ------------------------------------------------------------------------------ inputs

def emb(n: int = 4, d: int = 3, *, dtype=torch.float32, device="cpu", seed: int = 0) -> torch.Tensor:
    """Fresh embeddings for each call, so no case can reach another's tensors."""
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.to(device=device, dtype=dtype)


def meta(*shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def ids(n: int = 4) -> torch.Tensor:
    return torch.arange(n)


def float_ids_requiring_grad(n: int = 4) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32).requires_grad_()


def six(n: int = 4, d: int = 3, **replace: torch.Tensor) -> list[torch.Tensor]:
    """quintuplet_loss's six inputs, some replaced by name."""
    return [replace.get(name, emb(n, d, seed=i)) for i, name in enumerate(QUINTUPLET_INPUTS)]


def cap_to_img() -> torch.Tensor:
    return torch.arange(8) // 2  # 4 images, 2 captions each


def lists() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Valid (i2t, t2i, captions) for 2 images x 5 captions with pool <= 6."""
    gen = torch.Generator().manual_seed(1)
    i2t, t2i = torch.randint(0, 10, (2, 6), generator=gen), torch.randint(0, 2, (10, 2), generator=gen)
    return i2t, t2i, torch.tensor([0, 3, 9])


def tiny_split() -> Split:
    return Split("test", np.zeros((2, 3), np.float32), np.zeros((10, 3), np.float32))


# ------------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[dist.ProcessGroup], object]  # given the good (single-process) group
    error: type[Exception]
    match: str  # searched in the message; names the argument
    backends: tuple[str, ...] = BACKENDS


C = Case  # short, for the table


V, T, R = ValueError, TypeError, RuntimeError
sim, topk = vse_cuda.similarity, vse_cuda.topk_similar
trip, uni, quin, goal = vse_cuda.triplet_loss, vse_cuda.unified_loss, vse_cuda.quintuplet_loss, vse_cuda.goal_loss


def oc(img=None, cap=None, c2i=None, **kw):
    """offline_candidates on 4 images x 8 captions, some arguments replaced."""
    return mining.offline_candidates(emb(4) if img is None else img, emb(8, seed=1) if cap is None else cap,
                                     cap_to_img() if c2i is None else c2i,
                                     **{"k_i2t": 2, "k_t2i": 2, "progress": False, **kw})


def so(**kw):
    """sample_offline_negatives on valid lists, some arguments replaced."""
    i2t, t2i, captions = lists()
    args = {"i2t": i2t, "t2i": t2i, "captions": captions, "pool": 5, **kw}
    return mining.sample_offline_negatives(args.pop("i2t"), args.pop("t2i"), args.pop("captions"), **args)


CASES: list[Case] = [
    # --- similarity(a, b, *, normalize)
    C("similarity/rank/a-1d", lambda g: sim(emb()[0], emb()), V, r"\ba must be 2-D"),
    C("similarity/dtype/b-int64", lambda g: sim(emb(), ids(12).view(4, 3)), T, r"\bb must be float16"),
    C("similarity/device/b-meta", lambda g: sim(emb(), meta(4, 3)), V, r"\bb is on meta"),
    C("similarity/shape/b-other-D", lambda g: sim(emb(4, 3), emb(4, 2)), V, r"\bb has D=2"),
    C("similarity/empty/a-D0", lambda g: sim(emb(4, 0), emb(4, 0)), V, r"\ba must have D >= 1"),
    C("similarity/type/a-list", lambda g: sim([[1.0, 2.0]], emb(1, 2)), T, r"\ba must be a torch.Tensor"),
    C("similarity/enum/normalize-str", lambda g: sim(emb(), emb(), normalize="yes"), T, "normalize must be a bool"),

    # --- topk_similar(queries, keys, k, ...)
    C("topk/k/zero", lambda g: topk(emb(), emb(), 0), V, r"\bk must be in \[1, 4\]"),
    C("topk/k/above-M", lambda g: topk(emb(), emb(), 5), V, r"\bk must be in \[1, 4\]"),
    C("topk/k/float", lambda g: topk(emb(), emb(), 1.0), T, r"\bk must be an int"),
    C("topk/k/bool", lambda g: topk(emb(), emb(), True), T, r"\bk must be an int"),
    C("topk/k/above-unexcluded-keys", lambda g: topk(emb(), emb(), 3, query_labels=torch.tensor([0, 0, 1, 1]),
                                                     key_labels=torch.tensor([0, 0, 1, 1])),
      V, r"\bk must be in \[1, 2\]"),
    C("topk/labels/exclude-every-key", lambda g: topk(emb(), emb(), 1, query_labels=torch.zeros(4, dtype=torch.long),
                                                      key_labels=torch.zeros(4, dtype=torch.long)),
      V, "query_labels and key_labels leave query 0"),
    C("topk/labels/only-query-labels", lambda g: topk(emb(), emb(), 1, query_labels=ids()), V,
      "query_labels and key_labels must be given together"),
    C("topk/labels/key-labels-short", lambda g: topk(emb(), emb(), 1, query_labels=ids(), key_labels=ids(3)), V,
      r"key_labels must have shape \(4,\)"),
    C("topk/requires-grad/key-labels-float", lambda g: topk(emb(), emb(), 1, query_labels=ids(),
                                                            key_labels=float_ids_requiring_grad()),
      T, "key_labels must be int64"),
    C("topk/device/query-labels-meta", lambda g: topk(emb(), emb(), 1, query_labels=meta(4, dtype=torch.long),
                                                      key_labels=ids()), V, "query_labels is on meta"),
    C("topk/device/keys-meta", lambda g: topk(emb(), meta(4, 3), 1), V, "keys is on meta"),
    C("topk/device/simt-on-meta", lambda g: topk(meta(4, 3), meta(4, 3), 1), V, "queries is on meta.*simt",
      backends=("simt",)),
    C("topk/empty/no-keys", lambda g: topk(emb(), emb(0), 1), V, "keys must hold at least one row"),
    C("topk/rank/keys-3d", lambda g: topk(emb(), emb()[None], 1), V, "keys must be 2-D"),
    C("topk/dtype/keys-half-vs-float", lambda g: topk(emb(), emb(dtype=torch.float16), 1), T, "keys has dtype"),
    C("topk/enum/progress-str", lambda g: topk(emb(), emb(), 1, progress="no"), T, "progress must be a bool"),
    C("topk/enum/normalize-int", lambda g: topk(emb(), emb(), 1, normalize=1), T, "normalize must be a bool"),
    C("topk/count/chunk-size-zero", lambda g: topk(emb(), emb(), 1, chunk_size=0), V, "chunk_size must be >= 1"),
    C("topk/k/above-int64", lambda g: topk(emb(), emb(), 2**63), V, r"\bk must be in \[1, 4\]"),
    C("topk/count/chunk-size-above-int64", lambda g: topk(emb(), emb(), 1, chunk_size=2**64), V,
      r"chunk_size must be <= 2\*\*63 - 1"),
    C("topk/layout/keys-sparse-coo", lambda g: topk(emb(), emb().to_sparse(), 1), T,
      r"\bkeys must be a dense \(strided\) tensor, got layout torch.sparse_coo"),
    C("topk/layout/key-labels-sparse", lambda g: topk(emb(), emb(), 1, query_labels=ids(),
                                                      key_labels=ids().to_sparse()), T,
      r"key_labels must be a dense \(strided\) tensor"),
    C("similarity/layout/a-sparse-csr", lambda g: sim(emb().to_sparse_csr(), emb()), T,
      r"\ba must be a dense \(strided\) tensor, got layout torch.sparse_csr"),

    # --- triplet_loss
    C("triplet/rank/img-3d", lambda g: trip(emb()[None], emb()[None]), V, r"\bimg must be 2-D"),
    C("triplet/shape/txt-other-N", lambda g: trip(emb(4), emb(3)), V, r"\btxt has N=3 rows"),
    C("triplet/dtype/txt-float64", lambda g: trip(emb(), emb(dtype=torch.float64)), T, r"\btxt has dtype"),
    C("triplet/dtype/complex", lambda g: trip(emb().to(torch.complex64), emb().to(torch.complex64)), T,
      r"\bimg must be float16"),
    C("triplet/device/txt-meta", lambda g: trip(emb(), meta(4, 3)), V, r"\btxt is on meta"),
    C("triplet/device/simt-on-meta", lambda g: trip(meta(4, 3), meta(4, 3)), V, r"\bimg is on meta.*simt",
      backends=("simt",)),
    C("triplet/empty/N0", lambda g: trip(emb(0), emb(0)), V, "img and txt must hold at least one pair"),
    C("triplet/labels/int32", lambda g: trip(emb(), emb(), labels=ids().int()), T, "labels must be int64"),
    C("triplet/labels/shape", lambda g: trip(emb(), emb(), labels=ids(3)), V, r"labels must have shape \(4,\)"),
    C("triplet/labels/0-d", lambda g: trip(emb(), emb(), labels=torch.tensor(1)), V, r"labels must have shape \(4,\)"),
    C("triplet/labels/list", lambda g: trip(emb(), emb(), labels=[0, 1, 2, 3]), T, "labels must be a torch.Tensor"),
    C("triplet/device/labels-meta", lambda g: trip(emb(), emb(), labels=meta(4, dtype=torch.long)), V,
      "labels is on meta"),
    C("triplet/requires-grad/labels-float", lambda g: trip(emb(), emb(), labels=float_ids_requiring_grad()), T,
      "labels must be int64"),
    C("triplet/requires-grad/margin-parameter",
      lambda g: trip(emb(), emb(), margin=torch.nn.Parameter(torch.tensor(0.2))), T, "margin must be a real number"),
    C("triplet/enum/mining-unknown", lambda g: trip(emb(), emb(), mining="semi-hard"), V, "mining must be one of"),
    C("triplet/enum/mining-case", lambda g: trip(emb(), emb(), mining="Hardest"), V, "mining must be one of"),
    C("triplet/enum/reduction-none", lambda g: trip(emb(), emb(), reduction="none"), V, "reduction must be one of"),
    C("triplet/k/zero-topk", lambda g: trip(emb(), emb(), mining="topk", k=0), V, r"\bk must be >= 1"),
    C("triplet/k/float", lambda g: trip(emb(), emb(), mining="topk", k=2.0), T, r"\bk must be an int"),
    C("triplet/k/above-int64", lambda g: trip(emb(), emb(), mining="topk", k=2**63), V,
      r"\bk must be <= 2\*\*63 - 1"),
    C("triplet/k/above-int64-hardest", lambda g: trip(emb(), emb(), k=2**70), V, r"\bk must be <= 2\*\*63 - 1"),
    C("triplet/layout/img-sparse-coo", lambda g: trip(emb().to_sparse(), emb().to_sparse()), T,
      r"\bimg must be a dense \(strided\) tensor"),
    C("triplet/layout/labels-sparse", lambda g: trip(emb(), emb(), labels=ids().to_sparse()), T,
      r"\blabels must be a dense \(strided\) tensor"),
    C("triplet/finite/margin-bool", lambda g: trip(emb(), emb(), margin=True), T, "margin must be a real number"),
    C("triplet/finite/margin-numpy-bool", lambda g: trip(emb(), emb(), margin=np.bool_(False)), T,
      "margin must be a real number"),
    C("triplet/finite/margin-numpy-nan", lambda g: trip(emb(), emb(), margin=np.float32("nan")), V,
      "margin must be finite"),
    C("triplet/finite/margin-nan", lambda g: trip(emb(), emb(), margin=NAN), V, "margin must be finite"),
    C("triplet/count/chunk-size-float", lambda g: trip(emb(), emb(), chunk_size=2.0), T, "chunk_size must be an int"),
    C("triplet/group/str", lambda g: trip(emb(), emb(), group="WORLD"), T,
      "group must be a torch.distributed.ProcessGroup"),
    C("triplet/group/non-member", lambda g: trip(emb(), emb(), group=NON_MEMBER), V,
      "group: this process is not a member"),
    C("triplet/device/meta-under-group", lambda g: trip(meta(4, 3), meta(4, 3), group=g), V, r"\bimg is on meta"),

    # --- unified_loss
    C("unified/finite/scale-zero", lambda g: uni(emb(), emb(), scale=0), V, "scale must be > 0"),
    C("unified/finite/scale-inf", lambda g: uni(emb(), emb(), scale=INF), V, "scale must be finite"),
    C("unified/finite/margin-str", lambda g: uni(emb(), emb(), margin="0.2"), T, "margin must be a real number"),
    C("unified/shape/scale-1d-tensor", lambda g: uni(emb(), emb(), scale=torch.tensor([20.0])), T,
      "scale must be a real number or a 0-dim floating-point tensor"),
    C("unified/dtype/scale-int-tensor", lambda g: uni(emb(), emb(), scale=torch.tensor(20)), T,
      "scale must be a real number or a 0-dim floating-point tensor"),
    C("unified/finite/scale-nan-tensor", lambda g: uni(emb(), emb(), scale=torch.tensor(NAN, requires_grad=True)), V,
      "scale must be finite"),
    C("unified/finite/scale-negative-tensor", lambda g: uni(emb(), emb(), scale=torch.tensor(-1.0)), V,
      "scale must be > 0"),
    C("unified/device/scale-meta", lambda g: uni(emb(), emb(), scale=torch.tensor(2.0, device="meta")), V,
      "scale is on meta"),
    C("unified/dtype/txt-int", lambda g: uni(emb(), ids(12).view(4, 3)), T, r"\btxt must be float16"),
    C("unified/empty/D0", lambda g: uni(emb(4, 0), emb(4, 0)), V, r"\bimg must have D >= 1"),
    C("unified/labels/2-d", lambda g: uni(emb(), emb(), labels=ids()[None]), V, r"labels must have shape \(4,\)"),
    C("unified/enum/normalize-str", lambda g: uni(emb(), emb(), normalize="true"), T, "normalize must be a bool"),
    C("unified/group/int", lambda g: uni(emb(), emb(), group=0), T, "group must be a torch.distributed.ProcessGroup"),

    # --- quintuplet_loss
    C("quintuplet/shape/off_txt-other-D", lambda g: quin(*six(off_txt=emb(4, 2))), V, r"\boff_txt has D=2"),
    C("quintuplet/shape/img2-other-N", lambda g: quin(*six(img2=emb(3))), V, r"\bimg2 has N=3 rows"),
    C("quintuplet/device/txt2-meta", lambda g: quin(*six(txt2=meta(4, 3))), V, r"\btxt2 is on meta"),
    C("quintuplet/type/off_img-None", lambda g: quin(*six(off_img=None)), T, r"\boff_img must be a torch.Tensor"),
    C("quintuplet/dtype/off_img-float64", lambda g: quin(*six(off_img=emb(dtype=torch.float64))), T,
      r"\boff_img has dtype"),
    C("quintuplet/finite/alpha-zero", lambda g: quin(*six(), alpha=0.0), V, "alpha must be > 0"),
    C("quintuplet/finite/beta-nan", lambda g: quin(*six(), beta=NAN), V, "beta must be finite"),
    C("quintuplet/finite/margin_offline-inf", lambda g: quin(*six(), margin_offline=-INF), V,
      "margin_offline must be finite"),
    C("quintuplet/enum/detach_weights-str", lambda g: quin(*six(), detach_weights="no"), T,
      "detach_weights must be a bool"),
    C("quintuplet/requires-grad/labels-float", lambda g: quin(*six(), labels=float_ids_requiring_grad()), T,
      "labels must be int64"),
    C("quintuplet/layout/txt2-sparse", lambda g: quin(*six(txt2=emb().to_sparse())), T,
      r"\btxt2 must be a dense \(strided\) tensor"),
    C("unified/finite/scale-numpy-inf", lambda g: uni(emb(), emb(), scale=np.float64("inf")), V,
      "scale must be finite"),
    C("quintuplet/group/non-member", lambda g: quin(*six(), group=NON_MEMBER), V,
      "group: this process is not a member"),

    # --- goal_loss
    C("goal/enum/triplet_weight-case", lambda g: goal(emb(), emb(), triplet_weight="NCA"), V,
      "triplet_weight must be one of"),
    C("goal/enum/pair_weight-unknown", lambda g: goal(emb(), emb(), pair_weight="ms"), V, "pair_weight must be one of"),
    C("goal/enum/pair_weight-None", lambda g: goal(emb(), emb(), pair_weight=None), V, "pair_weight must be one of"),
    C("goal/finite/tau-negative", lambda g: goal(emb(), emb(), tau=-1.0), V, "tau must be > 0"),
    C("goal/finite/a-nan", lambda g: goal(emb(), emb(), a=NAN), V, r"\ba must be finite"),
    C("goal/finite/b-zero", lambda g: goal(emb(), emb(), b=0), V, r"\bb must be > 0"),
    C("goal/finite/lam-inf", lambda g: goal(emb(), emb(), lam=INF), V, "lam must be finite"),
    C("goal/enum/reduction-avg", lambda g: goal(emb(), emb(), reduction="avg"), V, "reduction must be one of"),
    C("goal/empty/N0", lambda g: goal(emb(0), emb(0)), V, "img and txt must hold at least one pair"),
    C("goal/device/labels-meta", lambda g: goal(emb(), emb(), labels=meta(4, dtype=torch.long)), V,
      "labels is on meta"),
    C("goal/group/list", lambda g: goal(emb(), emb(), group=[0]), T, "group must be a torch.distributed.ProcessGroup"),

    # --- the nn.Modules: keywords checked in __init__, the batch in forward
    C("TripletLoss/keyword/init-unknown", lambda g: vse_cuda.TripletLoss(marign=0.2), T, "keyword argument 'marign'"),
    C("TripletLoss/k/init-zero", lambda g: vse_cuda.TripletLoss(mining="topk", k=0), V, r"\bk must be >= 1"),
    C("TripletLoss/enum/init-mining-unknown", lambda g: vse_cuda.TripletLoss(mining="semi"), V, "mining must be one of"),
    C("TripletLoss/group/init-str", lambda g: vse_cuda.TripletLoss(group="WORLD"), T,
      "group must be a torch.distributed.ProcessGroup"),
    C("TripletLoss/count/init-chunk-size-zero", lambda g: vse_cuda.TripletLoss(chunk_size=0), V, "chunk_size must be >= 1"),
    C("TripletLoss/labels/forward-shape", lambda g: vse_cuda.TripletLoss()(emb(), emb(), ids(3)), V,
      r"labels must have shape \(4,\)"),
    C("UnifiedLoss/keyword/init-unknown", lambda g: vse_cuda.UnifiedLoss(temperature=0.05), T,
      "keyword argument 'temperature'"),
    C("UnifiedLoss/finite/init-scale-negative", lambda g: vse_cuda.UnifiedLoss(scale=-1), V, "scale must be > 0"),
    C("UnifiedLoss/rank/forward-txt-1d", lambda g: vse_cuda.UnifiedLoss()(emb(), emb()[0]), V, r"\btxt must be 2-D"),
    C("QuintupletLoss/keyword/init-unknown", lambda g: vse_cuda.QuintupletLoss(margin=0.2), T,
      "keyword argument 'margin'"),
    C("QuintupletLoss/finite/init-alpha-nan", lambda g: vse_cuda.QuintupletLoss(alpha=NAN), V, "alpha must be finite"),
    C("QuintupletLoss/keyword/forward-missing-inputs", lambda g: vse_cuda.QuintupletLoss()(emb(), emb()), T, "'off_img'"),
    C("GoalLoss/keyword/init-labels", lambda g: vse_cuda.GoalLoss(labels=ids()), T, "keyword argument 'labels'"),
    C("GoalLoss/enum/init-pair_weight-unknown", lambda g: vse_cuda.GoalLoss(pair_weight="lin-ms"), V,
      "pair_weight must be one of"),
    C("GoalLoss/group/init-non-member", lambda g: vse_cuda.GoalLoss(group=NON_MEMBER), V,
      "group: this process is not a member"),

    # --- mining.offline_candidates
    C("offline_candidates/requires-grad/cap_to_img-float", lambda g: oc(c2i=float_ids_requiring_grad(8)), T,
      "cap_to_img must be int64"),
    C("offline_candidates/labels/cap_to_img-out-of-range", lambda g: oc(c2i=ids(8)), V,
      r"cap_to_img values must be image indices in \[0, 4\)"),
    C("offline_candidates/labels/cap_to_img-shape", lambda g: oc(c2i=ids(7)), V, r"cap_to_img must have shape \(8,\)"),
    C("offline_candidates/device/cap_to_img-meta", lambda g: oc(c2i=meta(8, dtype=torch.long)), V,
      "cap_to_img is on meta"),
    C("offline_candidates/device/cap_emb-meta", lambda g: oc(cap=meta(8, 3)), V, "cap_emb is on meta"),
    C("offline_candidates/dtype/img_emb-int", lambda g: oc(img=ids(12).view(4, 3)), T, "img_emb must be float16"),
    C("offline_candidates/empty/no-images", lambda g: oc(img=emb(0)), V, "img_emb must hold at least one image"),
    C("offline_candidates/k/k_i2t-above-candidates", lambda g: oc(k_i2t=7), V, r"k_i2t must be in \[1, 6\]"),
    C("offline_candidates/k/k_t2i-zero", lambda g: oc(k_t2i=0), V, r"k_t2i must be in \[1, 3\]"),
    C("offline_candidates/k/k_i2t-float", lambda g: oc(k_i2t=2.0), T, "k_i2t must be an int"),
    C("offline_candidates/k/k_i2t-above-int64", lambda g: oc(k_i2t=2**63), V, r"k_i2t must be in \[1, 6\]"),
    C("offline_candidates/layout/cap_emb-sparse", lambda g: oc(cap=emb(8, seed=1).to_sparse()), T,
      r"cap_emb must be a dense \(strided\) tensor"),
    C("offline_candidates/layout/cap_to_img-sparse", lambda g: oc(c2i=cap_to_img().to_sparse()), T,
      r"cap_to_img must be a dense \(strided\) tensor"),
    C("offline_candidates/device/all-meta", lambda g: oc(img=meta(4, 3), cap=meta(8, 3), c2i=meta(8, dtype=torch.long)),
      V, "cap_to_img is on meta, which holds no data"),
    C("offline_candidates/enum/progress-str", lambda g: oc(progress="no"), T, "progress must be a bool"),
    C("offline_candidates/count/chunk-size-negative", lambda g: oc(chunk_size=-1), V, "chunk_size must be >= 1"),

    # --- mining.sample_offline_negatives
    C("sample_offline_negatives/requires-grad/captions-float", lambda g: so(captions=float_ids_requiring_grad(3)), T,
      "captions must be int64"),
    C("sample_offline_negatives/labels/captions-out-of-range", lambda g: so(captions=torch.tensor([10])), V,
      r"captions must be caption indices in \[0, 10\)"),
    C("sample_offline_negatives/rank/captions-2d", lambda g: so(captions=torch.tensor([[0, 3]])), V,
      "captions must be 1-D"),
    C("sample_offline_negatives/dtype/i2t-float", lambda g: so(i2t=torch.zeros(2, 6)), T, "i2t must be int64"),
    C("sample_offline_negatives/shape/t2i-rows", lambda g: so(captions_per_image=4), V,
      r"t2i must have I\*captions_per_image"),
    C("sample_offline_negatives/count/pool-above-list", lambda g: so(pool=7), V, r"pool must be in \[1, 6\]"),
    C("sample_offline_negatives/layout/t2i-sparse", lambda g: so(t2i=lists()[1].to_sparse()), T,
      r"t2i must be a dense \(strided\) tensor"),
    C("sample_offline_negatives/count/pool-above-int64", lambda g: so(pool=2**64), V, r"pool must be in \[1, 6\]"),
    C("sample_offline_negatives/device/all-meta", lambda g: so(i2t=meta(2, 6, dtype=torch.long),
                                                                t2i=meta(10, 2, dtype=torch.long),
                                                                captions=meta(3, dtype=torch.long)),
      V, "captions is on meta, which holds no data"),
    C("sample_offline_negatives/count/pool-float", lambda g: so(pool=5.0), T, "pool must be an int"),
    C("sample_offline_negatives/count/captions_per_image-zero", lambda g: so(captions_per_image=0), V,
      "captions_per_image must be >= 1"),
    C("sample_offline_negatives/type/generator-int", lambda g: so(generator=0), T,
      "generator must be a torch.Generator"),
    C("sample_offline_negatives/device/captions-meta", lambda g: so(captions=meta(3, dtype=torch.long)), V,
      "captions is on meta"),
    # The lists are checked only where drawn; the failed draw must give back its random numbers.
    C("sample_offline_negatives/labels/i2t-foreign-entries", lambda g: so(i2t=torch.full((2, 6), 100)), V,
      "i2t holds caption indices outside"),

    # --- distributed.gather_with_grad
    C("gather_with_grad/type/x-list", lambda g: distributed.gather_with_grad([1.0], g), T,
      r"\bx must be a torch.Tensor"),
    C("gather_with_grad/rank/x-0-d", lambda g: distributed.gather_with_grad(torch.tensor(1.0), g), V,
      r"\bx must have at least one dimension"),
    C("gather_with_grad/dtype/x-int32", lambda g: distributed.gather_with_grad(ids().int(), g), T, r"\bx has dtype"),
    C("gather_with_grad/layout/x-sparse-coo", lambda g: distributed.gather_with_grad(emb().to_sparse(), g), T,
      r"\bx must be a dense \(strided\) tensor, got layout torch.sparse_coo"),
    C("gather_with_grad/layout/x-sparse-csr", lambda g: distributed.gather_with_grad(emb().to_sparse_csr(), g), T,
      r"\bx must be a dense \(strided\) tensor, got layout torch.sparse_csr"),
    C("gather_with_grad/layout/x-nested", lambda g: distributed.gather_with_grad(
        torch.nested.nested_tensor([emb(2), emb(3)], layout=torch.jagged), g), T, r"\bx must be a dense \(strided\) tensor, got a nested"),
    C("gather_with_grad/device/x-meta", lambda g: distributed.gather_with_grad(meta(4, 3), g), V, r"\bx is on meta"),
    C("gather_with_grad/group/str", lambda g: distributed.gather_with_grad(emb(), "WORLD"), T,
      "group must be a torch.distributed.ProcessGroup"),
    C("gather_with_grad/group/non-member", lambda g: distributed.gather_with_grad(emb(), NON_MEMBER), V,
      "group: this process is not a member"),

    # --- use_backend (raises at the call, not only on entering the block)
    C("use_backend/enum/unknown", lambda g: vse_cuda.use_backend("gpu"), V, "backend name must be one of"),
    C("use_backend/enum/upper-case", lambda g: vse_cuda.use_backend("CPU"), V, "backend name must be one of"),
    C("use_backend/type/None", lambda g: vse_cuda.use_backend(None), T, "backend name must be a str"),

    # --- evaluate
    C("recall_at_k/type/img_emb-list", lambda g: evaluate.recall_at_k([[1.0]], emb(5)), T,
      "img_emb must be a torch.Tensor"),
    C("recall_at_k/count/captions_per_image-zero", lambda g: evaluate.recall_at_k(emb(4), emb(4), captions_per_image=0), V,
      "captions_per_image must be >= 1"),
    C("recall_at_k/count/captions_per_image-float", lambda g: evaluate.recall_at_k(emb(4), emb(8), captions_per_image=2.0),
      T, "captions_per_image must be an int"),
    C("recall_at_k/shape/caption-count", lambda g: evaluate.recall_at_k(emb(4), emb(19)), V,
      "cap_emb must hold 5 captions per image"),
    C("recall_at_k/empty/no-images", lambda g: evaluate.recall_at_k(emb(0), emb(0)), V,
      "img_emb must hold at least one image"),
    C("recall_at_k/shape/cap_emb-other-D", lambda g: evaluate.recall_at_k(emb(4, 3), emb(20, 2)), V, "cap_emb has D=2"),
    C("recall_at_k/device/cap_emb-meta", lambda g: evaluate.recall_at_k(emb(4), meta(20, 3)), V, "cap_emb is on meta"),
    C("recall_at_k/device/all-meta", lambda g: evaluate.recall_at_k(meta(4, 3), meta(20, 3)), V,
      "img_emb is on meta, which holds no data"),
    C("fold_recall/device/all-meta", lambda g: evaluate.fold_recall(meta(4, 3), meta(20, 3), fold_images=2), V,
      "img_emb is on meta, which holds no data"),
    C("recall_at_k/count/chunk-size-zero", lambda g: evaluate.recall_at_k(emb(4), emb(20), chunk_size=0), V,
      "chunk_size must be >= 1"),
    C("fold_recall/count/fold_images-float", lambda g: evaluate.fold_recall(emb(4), emb(20), fold_images=2.0), T,
      "fold_images must be an int"),
    C("fold_recall/count/fold_images-not-dividing", lambda g: evaluate.fold_recall(emb(4), emb(20), fold_images=3), V,
      "fold_images=3 must divide"),
    C("recall_table/type/img_emb-list", lambda g: evaluate.recall_table([1.0], emb(5)), T,
      "img_emb must be a torch.Tensor"),
    C("chance_rsum/count/num_images-zero", lambda g: evaluate.chance_rsum(0), V, "num_images must be >= 1"),
    C("chance_rsum/count/captions_per_image-zero", lambda g: evaluate.chance_rsum(3, 0), V,
      "captions_per_image must be >= 1"),
    C("format_table/shape/missing-metric", lambda g: evaluate.format_table({"1K": {"rsum": 1.0}}), V,
      r"table\['1K'\] must hold every metric"),
    C("format_table/type/not-a-dict", lambda g: evaluate.format_table(None), T, "table must be a dict"),
    C("embed_split/type/model-None", lambda g: evaluate.embed_split(None, tiny_split()), T,
      "model must be a torch.nn.Module"),
    C("embed_split/count/batch_size-zero", lambda g: evaluate.embed_split(torch.nn.Identity(), tiny_split(), batch_size=0),
      V, "batch_size must be >= 1"),
]
if "cuda" not in _lib.backends():
    CASES.append(C("use_backend/device/cuda-not-built", lambda g: vse_cuda.use_backend("cuda"), R,
                   "backend 'cuda' is not compiled"))

RUNS = [(case, backend) for case in CASES for backend in case.backends]


# ----------------------------------------------------------------------- running one case

@contextlib.contextmanager
def process_group(directory: str):
    """A single-process gloo group (the good `group`), or the one already initialized."""
    if dist.is_initialized():
        yield dist.group.WORLD
        return
    store = dist.FileStore(os.path.join(directory, "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def global_state() -> dict:
    """Process state a failed call must not change."""
    return {
        "backend": _lib._active_backend.get(),
        "grad_enabled": torch.is_grad_enabled(),
        "inference_mode": torch.is_inference_mode_enabled(),
        "anomaly": torch.is_anomaly_enabled(),
        "default_dtype": torch.get_default_dtype(),
        "threads": torch.get_num_threads(),
        "budget": (_chunking.DEFAULT_MEMORY_BUDGET, _chunking.DEFAULT_ROW_CHUNK),
        "rng": torch.random.get_rng_state().tolist(),
        "distributed": dist.is_initialized(),
    }


def bad_call(case: Case, backend: str, group) -> str | None:
    """Makes the bad call on `backend`; None when it raised what the table expects and left
    the global state as it was (inside and after the backend block), else what went wrong."""
    before = global_state()
    raised = None
    with vse_cuda.use_backend(backend):
        inside = global_state()
        try:
            case.call(group)
        except Exception as error:  # noqa: BLE001 - the type is what is being tested
            raised = error
        changed_inside = global_state() != inside
    if changed_inside or global_state() != before:
        return f"{case.id}: changed the global state ({_changed(before, global_state())})"
    return verdict(case, raised)


def _changed(before: dict, after: dict) -> str:
    return ", ".join(k for k in before if before[k] != after[k]) or "inside the use_backend block"


def verdict(case: Case, raised: BaseException | None) -> str | None:
    """None when `raised` is what the table expects, else what went wrong."""
    if raised is None:
        return f"{case.id}: raised nothing, expected {case.error.__name__} matching {case.match!r}"
    if type(raised) is not case.error:
        return f"{case.id}: raised {type(raised).__name__}({raised}), expected {case.error.__name__}"
    if not re.search(case.match, str(raised)):
        return f"{case.id}: message {str(raised)!r} does not match {case.match!r}"
    return None


def correct_calls(group) -> dict[str, torch.Tensor]:
    """One correct call of every public function (losses with their gradients), on the
    active backend: what every bad call must leave unchanged, bitwise."""
    out = {}
    labels = torch.tensor([0, 0, 1, 2, 3, 3])

    def loss_and_grads(name, fn, count=2, **kw):
        leaves = [emb(6, 5, seed=10 + i).requires_grad_() for i in range(count)]
        loss = fn(*leaves, labels=labels, **kw)
        loss.backward()
        out[name] = loss.detach()
        for i, leaf in enumerate(leaves):
            out[f"{name}.grad{i}"] = leaf.grad

    out["similarity"] = vse_cuda.similarity(emb(6, 5), emb(7, 5, seed=1), normalize=True)
    out["topk.values"], out["topk.indices"] = vse_cuda.topk_similar(
        emb(6, 5), emb(7, 5, seed=1), 2, query_labels=labels, key_labels=torch.tensor([0, 1, 1, 2, 3, 3, 4]))
    loss_and_grads("triplet", vse_cuda.triplet_loss, mining="topk", k=2)
    loss_and_grads("triplet_group", vse_cuda.TripletLoss(group=group))
    loss_and_grads("unified", vse_cuda.unified_loss, scale=10.0)
    loss_and_grads("quintuplet", vse_cuda.quintuplet_loss, count=6)
    loss_and_grads("goal", vse_cuda.GoalLoss(triplet_weight="nca", pair_weight="sig_ms"))
    out["i2t"], out["t2i"] = mining.offline_candidates(emb(4), emb(8, seed=1), cap_to_img(), k_i2t=3, k_t2i=2,
                                                       progress=False)
    i2t, t2i, captions = lists()
    drawn = mining.sample_offline_negatives(i2t, t2i, captions, pool=5, generator=torch.Generator().manual_seed(7))
    out.update({f"sample{i}": t for i, t in enumerate(drawn)})
    x = emb(3, 2).requires_grad_()
    distributed.gather_with_grad(x, group).pow(2).sum().backward()
    out["gather.grad"] = x.grad
    recall = evaluate.recall_at_k(emb(4), emb(20, seed=1))
    out["recall"] = torch.tensor([recall[m] for m in evaluate.METRICS], dtype=torch.float64)
    return out


def assert_bitwise_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], case_id: str) -> None:
    assert got.keys() == want.keys()
    for name in want:
        a, b = got[name], want[name]
        assert a.dtype == b.dtype and a.shape == b.shape, f"after {case_id}: {name} changed dtype or shape"
        if a.is_floating_point():
            a, b = a.view(torch.int64 if a.dtype == torch.float64 else torch.int32), \
                b.view(torch.int64 if b.dtype == torch.float64 else torch.int32)
        assert torch.equal(a, b), f"after {case_id}: {name} is not bitwise the same as before the battery"


# ---------------------------------------------------------------- in a fresh interpreter

def main(start: int = 0) -> int:
    """Runs RUNS[start:] (every case once per backend), printing `start` before and `done`
    after each, so the parent can tell which case a crash or a hang hit."""
    failures = 0
    with tempfile.TemporaryDirectory() as directory, process_group(directory) as group:
        for index in range(start, len(RUNS)):
            case, backend = RUNS[index]
            print(f"start {index} {backend} {case.id}", flush=True)
            problem = bad_call(case, backend, group)
            failures += problem is not None
            print(f"done {index} {backend} {case.id} {'ok' if problem is None else 'FAIL ' + problem}", flush=True)
    return 1 if failures else 0


def run_fresh(start: int) -> tuple[dict[int, str], int | None, str]:
    """RUNS[start:] in a subprocess: the verdict line of each finished run by index, the index
    that was running when the interpreter died or timed out (None if none), and stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    here = str(Path(__file__).resolve().parent)
    env["PYTHONPATH"] = os.pathsep.join([here, env.get("PYTHONPATH", "")])
    command = [sys.executable, "-c", f"import sys, test_bad_inputs as t; sys.exit(t.main({start}))"]
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
        stdout, stderr = proc.stdout, proc.stderr
        if proc.returncode < 0:  # killed by a signal: a segfault shows as -11
            stderr += f"\nkilled by signal {-proc.returncode}"
    except subprocess.TimeoutExpired as error:
        stdout = error.stdout.decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
        stderr = f"timed out after {SUBPROCESS_TIMEOUT_S} s"
    finished, running = {}, None
    for line in stdout.splitlines():
        word, index, _backend, _case_id, *rest = line.split(" ", 4) + [""]
        if word == "start":
            running = int(index)
        elif word == "done":
            finished[int(index)] = rest[0]
            running = None
    if running is None and len(finished) < len(RUNS) - start:  # died outside any case
        running = start + len(finished)
    return finished, running, stderr[-3000:]


@pytest.fixture(scope="module")
def fresh_run() -> dict:
    """The battery in fresh interpreters: after a crash or a hang, a new one goes on from the
    next case (a few times at most), so only the case at fault is lost."""
    finished, crashed, errors, start = {}, {}, [], 0
    while start < len(RUNS) and len(crashed) < MAX_RESTARTS:
        done, running, stderr = run_fresh(start)
        finished.update(done)
        if running is None:
            break
        crashed[running] = stderr
        start = running + 1
    return {"finished": finished, "crashed": crashed}


def test_battery_in_a_fresh_interpreter(fresh_run):
    # Runs first: a case that crashes or hangs the interpreter shows up here and in its own
    # test below, which then does not run it in pytest's process.
    crashed = {f"{RUNS[i][1]}:{RUNS[i][0].id}": stderr for i, stderr in fresh_run["crashed"].items()}
    assert not crashed, f"the interpreter died or hung in {crashed}"
    failed = [line for line in fresh_run["finished"].values() if line != "ok"]
    assert not failed, "\n".join(failed)


def test_table_covers_the_api():
    # At least 40 cases (the issue), every public function and every category.
    assert len(CASES) >= 60
    functions = {case.id.split("/")[0] for case in CASES}
    assert functions >= {"similarity", "topk", "triplet", "unified", "quintuplet", "goal", "TripletLoss",
                         "UnifiedLoss", "QuintupletLoss", "GoalLoss", "offline_candidates",
                         "sample_offline_negatives", "gather_with_grad", "use_backend", "recall_at_k",
                         "fold_recall", "recall_table", "chance_rsum", "format_table", "embed_split"}
    categories = {case.id.split("/")[1] for case in CASES}
    assert categories >= {"rank", "shape", "dtype", "device", "labels", "enum", "k", "finite", "empty",
                          "requires-grad", "group", "type", "count", "keyword"}
    assert len({case.id for case in CASES}) == len(CASES), "case ids must be unique"


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    with process_group(str(tmp_path_factory.mktemp("bad_inputs_store"))) as group:
        yield group


@pytest.fixture(scope="module")
def reference(group) -> dict[str, dict[str, torch.Tensor]]:
    """The correct calls' results on each backend, made before any bad call."""
    results = {}
    for backend in BACKENDS:
        with vse_cuda.use_backend(backend):
            results[backend] = correct_calls(group)
    return results


@pytest.mark.parametrize("case, backend", RUNS, ids=[f"{backend}:{case.id}" for case, backend in RUNS])
def test_bad_input(case, backend, fresh_run, group, reference):
    index = RUNS.index((case, backend))
    if index not in fresh_run["finished"]:
        why = fresh_run["crashed"].get(index, "a run before it crashed too often")
        pytest.fail(f"not run here: it crashed or hung a fresh interpreter: {why}")
    problem = bad_call(case, backend, group)
    assert problem is None, problem
    with vse_cuda.use_backend(backend):
        after = correct_calls(group)
    assert_bitwise_equal(after, reference[backend], case.id)


if __name__ == "__main__":
    sys.exit(main())


# ------------------------------------------------- the ops' own index lists (torch.ops level)

def _mined_backward_calls(ops, index_fill: int):
    """Each mined loss's backward op called directly with its forward's saved state, but with
    one entry of row_index replaced by `index_fill`. Yields (op name, thunk)."""
    g = torch.Generator().manual_seed(0)
    img, txt, *offline = (torch.randn(6, 3, generator=g, dtype=torch.float64) for _ in range(6))
    none, one = torch.empty(0, dtype=torch.int64), torch.ones((), dtype=torch.float64)

    def bad(index):
        index = index.clone()
        index[2, 0] = index_fill
        return index

    _, rs, cs, ri, ci = ops.triplet_forward(img, txt, none, 0.2, "hardest", 1, 0, 6, 6, 6)
    yield "triplet_backward", lambda: ops.triplet_backward(one, img, txt, none, 0.2, "hardest", rs, cs, bad(ri), ci,
                                                             0, 6, 6, 6)
    _, saved, ri, ci = ops.quintuplet_forward(img, txt, *offline, none, 0.2, 0.0, 0.3, 1.5, False, 0, 6, 6, 6)
    yield "quintuplet_backward", lambda: ops.quintuplet_backward(one, img, txt, *offline, saved, bad(ri), ci)
    _, rs, cs, ri, ci = ops.goal_forward(img, txt, none, "nca", "sig_ms", 1.0, 2.0, 10.0, 0.5, 0, 6, 6, 6)
    yield "goal_backward", lambda: ops.goal_backward(one, img, txt, rs, cs, bad(ri), ci)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index_fill", [6, 99, -2, -(2**40)])
def test_backward_ops_refuse_out_of_range_indices(backend, index_fill):
    """The backward ops are public (torch.ops.vse_cuda.*), so their index lists may come from a
    caller instead of the forward: an entry outside {-1} ∪ [0, N) raises instead of reading
    and writing out of bounds. -1 (an empty slot) stays valid."""
    ops = torch.ops.vse_cuda if backend == "cpu" else _lib.simt_ops()
    for name, call in _mined_backward_calls(ops, index_fill):
        with pytest.raises(RuntimeError, match=r"row_index must hold -1 or indices in \[0, 6\)"):
            call()
    for name, call in _mined_backward_calls(ops, -1):
        grads = call()
        assert all(torch.isfinite(grad).all() for grad in grads), name
