"""Tests of the oracle vse_cuda/reference/ against hand-computed values, the special cases of
spec/losses.md, independent loop implementations and torch.autograd.gradcheck (float64).

The oracle is loaded standalone from its path (it imports only torch), so these tests do not
need the compiled extension.
"""

import importlib.util
import math
import pathlib
import sys

import pytest
import torch
import torch.nn.functional as F

_root = pathlib.Path(__file__).resolve().parents[1] / "vse_cuda" / "reference"
_spec = importlib.util.spec_from_file_location("vse_reference", _root / "__init__.py",
                                               submodule_search_locations=[str(_root)])
ref = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = ref  # its modules import each other relative to the package
_spec.loader.exec_module(ref)

F64 = torch.float64
NAN = float("nan")
INF = float("inf")

# Hand-chosen 3x3 similarity matrix; every entry is a dyadic rational, so values are exact.
# Rows = images (i2t anchors), columns = captions (t2i anchors). Column 0 has a tie (0.375 at
# rows 1 and 2) for the lowest-index rule.
S3 = [[1.0, 0.4375, 0.1875],
      [0.375, 0.75, 0.625],
      [0.375, 0.875, 0.5]]
M3 = 0.25  # margin used with S3; no hinge argument of S3 is exactly 0 with it


def _from_S(S, requires_grad=True):
    """img = I, txt = S^T, so img @ txt.T == S exactly and dL/dS == txt.grad.T."""
    S = torch.as_tensor(S, dtype=F64)
    img = torch.eye(S.shape[0], dtype=F64)
    txt = S.T.clone().requires_grad_(requires_grad)
    return img, txt


def _hinge_args(S, valid, margin):
    """All hinge arguments m + S_ij - S_ii (rows) and m + S_ij - S_jj (columns) over valid."""
    P = S.diagonal()
    return torch.cat([(margin + S - P[:, None])[valid], (margin + S - P[None, :])[valid]])


def _sorted_gaps(S, valid):
    """Gaps between consecutive valid values of each row and of each column (incl. NaN-free)."""
    gaps = []
    for M, V in ((S, valid), (S.T, valid.T)):
        for i in range(M.shape[0]):
            v = torch.sort(M[i][V[i]], descending=True).values
            if v.numel() > 1:
                gaps.append(v[:-1] - v[1:])
    return torch.cat(gaps) if gaps else torch.zeros(1, dtype=S.dtype) + 1


def _separated(n, d, margin, *, labels=None, normalize=False, gap=1e-3, seed=0, extra=0):
    """Random float64 inputs (img, txt, *extra more) whose similarity matrix has no hinge
    argument within ``gap`` of 0 and no near-tie among each row's / column's valid values,
    so that finite differences never cross a kink."""
    for s in range(seed, seed + 2000):
        g = torch.Generator().manual_seed(s)
        xs = [torch.randn(n, d, generator=g, dtype=F64) for _ in range(2 + extra)]
        v, t = xs[0], xs[1]
        if normalize:
            v, t = F.normalize(v, dim=1), F.normalize(t, dim=1)
        S = v @ t.T
        valid = ref.negative_mask(n, labels)
        if n > 1 and _hinge_args(S, valid, margin).abs().min() < gap:
            continue
        if _sorted_gaps(S, valid).min() < gap:
            continue
        return xs
    raise AssertionError("no separated inputs found")


def _grads(loss, *xs):
    return torch.autograd.grad(loss, xs, allow_unused=False)


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------

def test_negative_mask():
    m = ref.negative_mask(3, None)
    assert m.dtype == torch.bool
    assert m.tolist() == [[False, True, True], [True, False, True], [True, True, False]]
    m = ref.negative_mask(4, torch.tensor([0, 1, 0, 2]))
    assert m.tolist() == [[False, True, False, True],
                          [True, False, True, True],
                          [False, True, False, True],
                          [True, True, True, False]]


def test_hardest_negative_ties_nan_inf_and_empty_rows():
    S = torch.tensor([[9.0, 2.0, 5.0, 5.0],     # tie between 2 and 3 -> 2
                      [0.0, NAN, 1.0, NAN],     # NaN ranks first; diagonal NaN ignored -> 3
                      [-INF, -INF, 7.0, 1.0],   # valid -inf vs invalid: first valid is 0
                      [1.0, 2.0, 3.0, 4.0]], dtype=F64)
    valid = ref.negative_mask(4, None)
    valid[2, 3] = False
    valid[3] = False                            # row 3: nothing valid
    vals, idx, has = ref.hardest_negative(S, valid)
    assert idx.tolist() == [2, 3, 0, 0]
    assert has.tolist() == [True, True, True, False]
    assert vals[0] == 5.0 and torch.isnan(vals[1]) and vals[2] == -INF
    assert idx.dtype == torch.int64


def test_rank_candidates_and_topk_negatives_order():
    S = torch.tensor([[0.0, 3.0, NAN, 3.0, -1.0, NAN]], dtype=F64)
    valid = torch.tensor([[False, True, True, True, True, False]])
    order, count = ref.rank_candidates(S, valid)
    assert count.tolist() == [4]
    assert order[0, :4].tolist() == [2, 1, 3, 4]
    vals, idx, slot = ref.topk_negatives(S, valid, 6)
    assert idx[0, :4].tolist() == [2, 1, 3, 4]
    assert slot.tolist() == [[True] * 4 + [False] * 2]


def test_similarity():
    a = torch.tensor([[3.0, 4.0], [1.0, 0.0]], dtype=F64)
    b = torch.tensor([[1.0, 1.0], [0.0, 2.0], [2.0, 0.0]], dtype=F64)
    assert torch.equal(ref.similarity(a, b), a @ b.T)
    Sn = ref.similarity(a, b, normalize=True)
    r = 1 / math.sqrt(2)
    exp = torch.tensor([[0.6 * r + 0.8 * r, 0.8, 0.6], [r, 0.0, 1.0]], dtype=F64)
    torch.testing.assert_close(Sn, exp)
    Sb = ref.similarity(a.bfloat16(), b.bfloat16())
    assert Sb.dtype == torch.bfloat16
    torch.testing.assert_close(Sb.double(), a @ b.T)


def test_public_signatures():
    import inspect
    expected = {
        "similarity": (["a", "b"], {"normalize": False}),
        "topk_similar": (["queries", "keys", "k"], {"normalize": False, "query_labels": None,
                                                    "key_labels": None}),
        "triplet_loss": (["img", "txt"], {"margin": 0.2, "mining": "hardest", "k": 1,
                                          "labels": None, "normalize": False,
                                          "reduction": "sum"}),
        "unified_loss": (["img", "txt"], {"scale": 20.0, "margin": 0.2, "labels": None,
                                          "normalize": False, "reduction": "sum",
                                          "label_positives": False}),
        "quintuplet_loss": (["img", "txt", "off_img", "off_txt", "img2", "txt2"],
                            {"margin_online": 0.2, "margin_offline": 0.0, "alpha": 0.3,
                             "beta": 1.5, "detach_weights": False, "labels": None,
                             "normalize": False, "reduction": "sum"}),
        "goal_loss": (["img", "txt"], {"triplet_weight": "con", "pair_weight": "con",
                                       "tau": 1.0, "a": 2.0, "b": 10.0, "lam": 0.5,
                                       "labels": None, "normalize": False,
                                       "reduction": "sum"}),
    }
    for name, (pos, kw) in expected.items():
        params = inspect.signature(getattr(ref, name)).parameters.values()
        got_pos = [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
        got_kw = {p.name: p.default for p in params if p.kind == p.KEYWORD_ONLY}
        assert got_pos == pos, name
        assert got_kw == kw, name
        assert getattr(ref, name).__doc__


# --------------------------------------------------------------------------------------------
# topk_similar
# --------------------------------------------------------------------------------------------

def test_topk_similar_ties_lowest_index_first():
    q = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.0]])
    v, i = ref.topk_similar(q, keys, 3)
    assert i.dtype == torch.int64 and v.dtype == torch.float32
    assert i.tolist() == [[0, 2, 3]]
    assert v.tolist() == [[1.0, 1.0, 0.5]]


def test_topk_similar_label_exclusion_and_padding():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.0]])
    v, i = ref.topk_similar(q, keys, 3, query_labels=torch.tensor([5, 1]),
                            key_labels=torch.tensor([5, 0, 1, 2]))
    assert i.tolist() == [[2, 3, 1], [1, 0, 3]]
    assert v.tolist() == [[1.0, 0.5, 0.0], [1.0, 0.0, 0.0]]
    # fewer eligible keys than k: value -inf, index -1 in the missing slots
    v, i = ref.topk_similar(q, keys, 4, query_labels=torch.tensor([5, 1]),
                            key_labels=torch.tensor([5, 0, 1, 2]))
    assert i[:, 3].tolist() == [-1, -1] and v[:, 3].tolist() == [-INF, -INF]
    v, i = ref.topk_similar(q[:1], keys[:2], 3)  # k > M
    assert i.tolist() == [[0, 1, -1]]
    with pytest.raises(ValueError):
        ref.topk_similar(q, keys, 1, query_labels=torch.tensor([0, 1]))


def test_topk_similar_nan_ranks_first():
    q = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[1.0, 0.0], [NAN, 0.0], [2.0, 0.0], [NAN, 0.0]])
    v, i = ref.topk_similar(q, keys, 4)
    assert i.tolist() == [[1, 3, 2, 0]]
    assert torch.isnan(v[0, :2]).all() and v[0, 2:].tolist() == [2.0, 1.0]


def test_topk_similar_normalize_and_random_matches_topk():
    q = torch.tensor([[3.0, 0.0]])
    keys = torch.tensor([[2.0, 0.0], [0.0, 5.0], [1.0, 1.0]])
    v, i = ref.topk_similar(q, keys, 2, normalize=True)
    assert i.tolist() == [[0, 2]]
    torch.testing.assert_close(v, torch.tensor([[1.0, 1 / math.sqrt(2)]]))
    g = torch.Generator().manual_seed(3)
    qs, ks = torch.randn(9, 5, generator=g), torch.randn(40, 5, generator=g)
    v, i = ref.topk_similar(qs, ks, 7)
    tv, ti = torch.topk(qs @ ks.T, 7, dim=1)
    torch.testing.assert_close(v, tv)
    assert torch.equal(i, ti)
    vb, ib = ref.topk_similar(qs.bfloat16(), ks.bfloat16(), 7)
    assert vb.dtype == torch.bfloat16 and ib.dtype == torch.int64


# --------------------------------------------------------------------------------------------
# triplet: hand values and hand gradients
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mining,k,labels,expected", [
    ("all", 1, None, 1.625),
    ("hardest", 1, None, 1.5),
    ("topk", 1, None, 1.5),
    ("topk", 2, None, 0.8125),
    ("topk", 5, None, 0.8125),            # k > N-1: mean over the 2 negatives each anchor has
    ("all", 1, [0, 1, 1], 0.125),
    ("hardest", 1, [0, 1, 1], 0.125),
    ("topk", 2, [0, 1, 1], 0.125),        # row 2 has a single valid negative: mean over 1
    ("all", 1, [7, 7, 7], 0.0),
    ("hardest", 1, [7, 7, 7], 0.0),
    ("topk", 2, [7, 7, 7], 0.0),
])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_triplet_hand_values(mining, k, labels, expected, reduction):
    img, txt = _from_S(S3)
    lab = None if labels is None else torch.tensor(labels)
    loss = ref.triplet_loss(img, txt, margin=M3, mining=mining, k=k, labels=lab,
                            reduction=reduction)
    exp = expected / 3 if reduction == "mean" else expected
    assert loss.dtype == F64 and loss.shape == ()
    assert loss.item() == pytest.approx(exp, abs=1e-15)


def test_triplet_hand_gradients():
    img, txt = _from_S(S3)
    (g,) = _grads(ref.triplet_loss(img, txt, margin=M3, mining="hardest"), txt)
    assert g.T.tolist() == [[0, 0, 0], [0, -2, 2], [0, 2, -2]]
    (g,) = _grads(ref.triplet_loss(img, txt, margin=M3, mining="all"), txt)
    assert g.T.tolist() == [[0, 0, 0], [0, -2, 2], [1, 2, -3]]
    (g,) = _grads(ref.triplet_loss(img, txt, margin=M3, mining="topk", k=2), txt)
    # row1: only (1,2) active, mean over 2 -> 0.5; row2: (2,1),(2,0) active -> 0.5 each;
    # col1: (2,1) active -> 0.5; col2: (1,2) active -> 0.5
    assert g.T.tolist() == [[0, 0, 0], [0, -1, 1], [0.5, 1, -1.5]]
    (g,) = _grads(ref.triplet_loss(img, txt, margin=M3, mining="hardest",
                                   reduction="mean"), txt)
    assert g.T.tolist() == [[0, 0, 0], [0, -2 / 3, 2 / 3], [0, 2 / 3, -2 / 3]]


def test_triplet_tie_gradient_goes_to_lowest_index():
    S = [[0.5, 0.75, 0.75],
         [0.0, 1.0, 0.0],
         [0.0, 0.0, 1.0]]
    img, txt = _from_S(S)
    for mining in ("hardest", "topk"):
        loss = ref.triplet_loss(img, txt, margin=0.125, mining=mining, k=1)
        assert loss.item() == 0.375
        (g,) = _grads(loss, txt)
        assert g.T.tolist() == [[-1, 1, 0], [0, 0, 0], [0, 0, 0]]


def test_hinge_exactly_at_zero_has_zero_gradient():
    """The hinge derivative is the indicator 1[arg > 0]: an argument of exactly 0 passes no
    gradient (what the kernels must reproduce)."""
    img, txt = _from_S([[0.5, 0.25], [0.25, 0.5]])  # every hinge argument is exactly 0
    for mining in ("all", "hardest", "topk"):
        loss = ref.triplet_loss(img, txt, margin=0.25, mining=mining, k=1)
        assert loss.item() == 0.0
        (g,) = _grads(loss, txt)
        assert torch.equal(g, torch.zeros_like(g))
    S = torch.tensor([[0.5, 0.25], [0.25, 0.5]], dtype=F64, requires_grad=True)
    x, y, q, z = (torch.full((2,), 0.5, dtype=F64, requires_grad=True) for _ in range(4))
    loss = ref.quintuplet_loss_from_scores(S, x, y, q, z, margin_online=0.25, margin_offline=0.0)
    assert loss.item() == 0.0
    for g in _grads(loss, S, x, y, q, z):
        assert torch.equal(g, torch.zeros_like(g))


def test_triplet_topk1_equals_hardest_and_topk_all_equals_mean_of_all():
    img, txt = _separated(7, 4, 0.2, seed=11)
    lab = torch.tensor([0, 1, 2, 0, 3, 1, 4])
    for labels in (None, lab):
        h = ref.triplet_loss(img, txt, mining="hardest", labels=labels)
        t1 = ref.triplet_loss(img, txt, mining="topk", k=1, labels=labels)
        torch.testing.assert_close(h, t1, rtol=0, atol=0)
    # with k >= N-1 (no labels) the per-anchor mean is over all N-1 negatives
    a = ref.triplet_loss(img, txt, mining="all")
    tk = ref.triplet_loss(img, txt, mining="topk", k=6)
    torch.testing.assert_close(tk, a / 6)


def test_triplet_unknown_enums():
    img, txt = _from_S(S3)
    with pytest.raises(ValueError):
        ref.triplet_loss(img, txt, mining="semihard")
    with pytest.raises(ValueError):
        ref.triplet_loss(img, txt, reduction="none")
    with pytest.raises(ValueError):
        ref.unified_loss(img, txt, reduction="avg")
    with pytest.raises(ValueError):
        ref.goal_loss(img, txt, triplet_weight="foo")
    with pytest.raises(ValueError):
        ref.goal_loss(img, txt, pair_weight="ms")
    with pytest.raises(ValueError):
        ref.quintuplet_loss(img, txt, img, txt, img, txt, reduction="max")


# --------------------------------------------------------------------------------------------
# gradcheck (float64)
# --------------------------------------------------------------------------------------------

_LAB6 = torch.tensor([0, 1, 0, 2, 1, 3])


@pytest.mark.parametrize("mining,k", [("all", 1), ("hardest", 1), ("topk", 2)])
@pytest.mark.parametrize("use_labels", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_gradcheck_triplet(mining, k, use_labels, normalize):
    labels = _LAB6 if use_labels else None
    margin = 0.5 if normalize else 0.2
    img, txt = _separated(6, 4, margin, labels=labels, normalize=normalize, seed=1)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    fn = lambda a, b: ref.triplet_loss(a, b, margin=margin, mining=mining, k=k, labels=labels,
                                       normalize=normalize)
    assert fn(img, txt).item() > 0  # some hinge active: the check is not vacuous
    assert torch.autograd.gradcheck(fn, (img, txt))


@pytest.mark.parametrize("use_labels", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_gradcheck_unified(use_labels, normalize):
    labels = _LAB6 if use_labels else None
    g = torch.Generator().manual_seed(2)
    img = torch.randn(6, 4, generator=g, dtype=F64, requires_grad=True)
    txt = torch.randn(6, 4, generator=g, dtype=F64, requires_grad=True)
    scale = 5.0 if normalize else 1.5
    fn = lambda a, b: ref.unified_loss(a, b, scale=scale, margin=0.3, labels=labels,
                                       normalize=normalize, reduction="mean")
    assert torch.autograd.gradcheck(fn, (img, txt))


def _quint_inputs(n, seed, labels=None, normalize=False, gap=1e-3):
    """Separated inputs for AOQ: no online or offline hinge argument near 0."""
    m1, m2 = 0.2, 0.05
    for s in range(seed, seed + 2000):
        img, txt, oi, ot, i2, t2 = _separated(n, 4, m1, labels=labels, normalize=normalize,
                                             seed=s, extra=4, gap=gap)
        prep = (lambda x: F.normalize(x, dim=1)) if normalize else (lambda x: x)
        v, t, vo, to, v2, tt2 = map(prep, (img, txt, oi, ot, i2, t2))
        p = (v * t).sum(1)
        offl = torch.stack([(v * to).sum(1), (vo * t).sum(1), (vo * to).sum(1),
                            (v2 * tt2).sum(1)])
        args = m2 + offl - p
        if args.abs().min() < gap or not (args > 0).any():
            continue
        return [img, txt, oi, ot, i2, t2], m1, m2
    raise AssertionError("no separated inputs found")


@pytest.mark.parametrize("use_labels,normalize", [(False, False), (True, False), (False, True)])
def test_gradcheck_quintuplet(use_labels, normalize):
    """detach_weights=False: the gradient is the true gradient of the value."""
    labels = _LAB6 if use_labels else None
    xs, m1, m2 = _quint_inputs(6, 5, labels=labels, normalize=normalize)
    xs = [x.requires_grad_(True) for x in xs]
    fn = lambda *a: ref.quintuplet_loss(*a, margin_online=m1, margin_offline=m2, alpha=0.3,
                                        beta=1.5, labels=labels, normalize=normalize)
    assert torch.autograd.gradcheck(fn, tuple(xs))


def _quint_surrogate(xs, m1, m2, alpha, beta, labels, normalize, weights=None):
    """Test-side AOQ written from spec §3.3 with torch.max mining (inputs are untied).
    With ``weights=(omega, nu)`` those are used as constants (detach_weights=True)."""
    prep = (lambda x: F.normalize(x, dim=1)) if normalize else (lambda x: x)
    v, t, vo, to, v2, t2 = map(prep, xs)
    S = v @ t.T
    n = S.shape[0]
    masked = S.masked_fill(~ref.negative_mask(n, labels), -INF)
    p = S.diagonal()
    u, w = masked.max(dim=1).values, masked.max(dim=0).values
    x, y, q, z = (v * to).sum(1), (vo * t).sum(1), (vo * to).sum(1), (v2 * t2).sum(1)
    omega, nu = (beta - (x - u) / alpha, beta - (y - w) / alpha) if weights is None else weights
    loss = (omega * torch.relu(m1 + u - p) + nu * torch.relu(m1 + w - p)
            + sum(torch.relu(m2 + s - p) for s in (x, y, q, z))).sum()
    return loss, (omega.detach(), nu.detach())


@pytest.mark.parametrize("use_labels,normalize", [(False, False), (True, True)])
def test_quintuplet_gradients_match_surrogate(use_labels, normalize):
    """detach_weights=True cannot be gradchecked (its gradient is not the derivative of the
    value): compare both modes with a test-side surrogate, the detached one using constant
    weights evaluated at the same point."""
    labels = _LAB6 if use_labels else None
    xs, m1, m2 = _quint_inputs(6, 7, labels=labels, normalize=normalize)
    xs = [x.requires_grad_(True) for x in xs]
    kw = dict(margin_online=m1, margin_offline=m2, alpha=0.3, beta=1.5, labels=labels,
              normalize=normalize)
    sur, wts = _quint_surrogate(xs, m1, m2, 0.3, 1.5, labels, normalize)
    sur_c, _ = _quint_surrogate(xs, m1, m2, 0.3, 1.5, labels, normalize, weights=wts)
    for detach, exp in ((False, sur), (True, sur_c)):
        loss = ref.quintuplet_loss(*xs, detach_weights=detach, **kw)
        torch.testing.assert_close(loss, exp, rtol=1e-13, atol=1e-13)
        for a, b in zip(_grads(loss, *xs), _grads(exp, *xs)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_quintuplet_detach_changes_gradient():
    xs, m1, m2 = _quint_inputs(6, 5)
    xs = [x.requires_grad_(True) for x in xs]
    g0 = _grads(ref.quintuplet_loss(*xs, margin_online=m1, margin_offline=m2), *xs)
    g1 = _grads(ref.quintuplet_loss(*xs, margin_online=m1, margin_offline=m2,
                                    detach_weights=True), *xs)
    assert not torch.allclose(g0[0], g1[0])
    l0 = ref.quintuplet_loss(*xs, margin_online=m1, margin_offline=m2)
    l1 = ref.quintuplet_loss(*xs, margin_online=m1, margin_offline=m2, detach_weights=True)
    assert l0.item() == l1.item()


# --------------------------------------------------------------------------------------------
# unified: hand values and special cases
# --------------------------------------------------------------------------------------------

def test_unified_hand_values():
    S = [[1.0, 0.5], [0.25, 0.75]]
    img, txt = _from_S(S)
    exp = 2 * math.log1p(math.exp(-0.5)) + math.log1p(math.exp(-1.0)) + math.log(2.0)
    loss = ref.unified_loss(img, txt, scale=2.0, margin=0.25)
    assert loss.item() == pytest.approx(exp, rel=1e-14)
    loss = ref.unified_loss(img, txt, scale=2.0, margin=0.25, reduction="mean")
    assert loss.item() == pytest.approx(exp / 2, rel=1e-14)
    # labels: the two pairs share a label -> no negatives -> 0
    loss = ref.unified_loss(img, txt, scale=2.0, margin=0.25, labels=torch.tensor([3, 3]))
    assert loss.item() == 0.0


def test_unified_hand_values_with_labels():
    img, txt = _from_S(S3)
    g, m = 3.0, 0.25
    S = S3

    def term(negs, pos):
        return math.log(1 + sum(math.exp(g * (s - pos + m)) for s in negs))

    # labels [0, 1, 1]: items 1 and 2 are never negatives of each other
    exp = (term([S[0][1], S[0][2]], S[0][0]) + term([S[1][0]], S[1][1]) + term([S[2][0]], S[2][2])
           + term([S[1][0], S[2][0]], S[0][0]) + term([S[0][1]], S[1][1])
           + term([S[0][2]], S[2][2]))
    loss = ref.unified_loss(img, txt, scale=g, margin=m, labels=torch.tensor([0, 1, 1]))
    assert loss.item() == pytest.approx(exp, rel=1e-14)


@pytest.mark.parametrize("normalize", [False, True])
def test_unified_is_symmetric_infonce(normalize):
    g = torch.Generator().manual_seed(4)
    img = torch.randn(7, 5, generator=g, dtype=F64, requires_grad=True)
    txt = torch.randn(7, 5, generator=g, dtype=F64, requires_grad=True)
    tau = 0.07 if normalize else 0.8
    loss = ref.unified_loss(img, txt, scale=1 / tau, margin=0.0, normalize=normalize)
    v, t = (F.normalize(img, dim=1), F.normalize(txt, dim=1)) if normalize else (img, txt)
    logits = v @ t.T / tau
    tgt = torch.arange(7)
    exp = (F.cross_entropy(logits, tgt, reduction="sum")
           + F.cross_entropy(logits.T, tgt, reduction="sum"))
    torch.testing.assert_close(loss, exp, rtol=1e-12, atol=1e-12)
    for a, b in zip(_grads(loss, img, txt), _grads(exp, img, txt)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("use_labels", [False, True])
def test_unified_over_scale_tends_to_triplet_hardest(use_labels):
    labels = torch.tensor([0, 1, 0, 2, 1, 3, 4]) if use_labels else None
    img, txt = _separated(7, 4, 0.2, labels=labels, seed=21, gap=2e-2)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    gamma = 1000.0
    uni = ref.unified_loss(img, txt, scale=gamma, margin=0.2, labels=labels) / gamma
    tri = ref.triplet_loss(img, txt, margin=0.2, mining="hardest", labels=labels)
    assert tri.item() > 0
    torch.testing.assert_close(uni, tri, rtol=1e-6, atol=0)
    for a, b in zip(_grads(uni, img, txt), _grads(tri, img, txt)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_unified_large_scale_is_finite_in_float32():
    g = torch.Generator().manual_seed(5)
    img = torch.randn(8, 16, generator=g, requires_grad=True)
    txt = torch.randn(8, 16, generator=g, requires_grad=True)
    loss = ref.unified_loss(img, txt, scale=1000.0, margin=0.2, normalize=True)
    gi, gt = _grads(loss, img, txt)
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(gi).all() and torch.isfinite(gt).all()


def test_unified_hand_gradient_closed_form():
    """G of spec §4.3 on a hand S: G_ij = g(pi_ij + rho_ij), G_ii = -g(row + column sums)."""
    img, txt = _from_S(S3)
    g, m = 2.0, 0.25
    (gt,) = _grads(ref.unified_loss(img, txt, scale=g, margin=m), txt)
    n = 3
    G = [[0.0] * n for _ in range(n)]
    for i in range(n):
        zr = [math.exp(g * (S3[i][j] - S3[i][i] + m)) for j in range(n)]
        Zr = 1 + sum(zr[j] for j in range(n) if j != i)
        zc = [math.exp(g * (S3[k][i] - S3[i][i] + m)) for k in range(n)]
        Zc = 1 + sum(zc[k] for k in range(n) if k != i)
        for j in range(n):
            if j != i:
                G[i][j] += g * zr[j] / Zr
                G[i][i] -= g * zr[j] / Zr
                G[j][i] += g * zc[j] / Zc
                G[i][i] -= g * zc[j] / Zc
    torch.testing.assert_close(gt.T, torch.tensor(G, dtype=F64), rtol=1e-13, atol=1e-14)


# --------------------------------------------------------------------------------------------
# quintuplet: hand value and the closed-form gradient of spec §3.5
# --------------------------------------------------------------------------------------------

# With S3: u = [0.4375, 0.625, 0.875] at c = [1, 2, 1]; w = [0.375, 0.875, 0.625] at
# r = [1, 2, 1] (column 0 tie -> row 1); p = [1, 0.75, 0.5].
Q_X = [0.5, 0.875, 0.25]
Q_Y = [0.75, 0.5, 0.625]
Q_Q = [0.25, 0.625, 0.5]
Q_Z = [0.125, 0.5, 0.75]
Q_KW = dict(margin_online=0.25, margin_offline=0.0625, alpha=0.5, beta=1.5)


def _quint_hand_leaves():
    S = torch.tensor(S3, dtype=F64, requires_grad=True)
    x, y, q, z = (torch.tensor(v, dtype=F64, requires_grad=True) for v in (Q_X, Q_Y, Q_Q, Q_Z))
    return S, x, y, q, z


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_quintuplet_hand_value(reduction):
    # omega = [1.375, 1.0, 2.75], nu = [0.75, 2.25, 1.5]; h_u = [0, .125, .625],
    # h_w = [0, .375, .375] -> online 3.25; offline x .1875 + y .1875 + q .0625 + z .3125
    S, x, y, q, z = _quint_hand_leaves()
    loss = ref.quintuplet_loss_from_scores(S, x, y, q, z, reduction=reduction, **Q_KW)
    assert loss.item() == (4.0 if reduction == "sum" else 4.0 / 3)
    # the same through the embedding path: img = I, txt = S^T, rows chosen for the offline dots
    img, txt = _from_S(S3)
    off_txt = torch.diag(torch.tensor(Q_X, dtype=F64))          # x_i = <e_i, off_txt_i>
    t = txt.detach()
    off_img = torch.tensor(Q_Y, dtype=F64)[:, None] * t / (t * t).sum(1, keepdim=True)
    y_chk = (off_img * txt.detach()).sum(1)
    torch.testing.assert_close(y_chk, torch.tensor(Q_Y, dtype=F64))
    q_now = (off_img * off_txt).sum(1)
    img2 = torch.eye(3, dtype=F64)
    txt2 = torch.diag(torch.tensor(Q_Z, dtype=F64))
    loss2 = ref.quintuplet_loss(img, txt, off_img, off_txt, img2, txt2, reduction=reduction,
                                **Q_KW)
    exp2 = ref.quintuplet_loss_from_scores(torch.tensor(S3, dtype=F64),
                                           torch.tensor(Q_X, dtype=F64),
                                           torch.tensor(Q_Y, dtype=F64), q_now,
                                           torch.tensor(Q_Z, dtype=F64), reduction=reduction,
                                           **Q_KW)
    torch.testing.assert_close(loss2, exp2, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("detach", [False, True])
def test_quintuplet_closed_form_gradient(detach):
    S, x, y, q, z = _quint_hand_leaves()
    loss = ref.quintuplet_loss_from_scores(S, x, y, q, z, detach_weights=detach, **Q_KW)
    gS, gx, gy, gq, gz = _grads(loss, S, x, y, q, z)
    m1, m2, al, be = Q_KW["margin_online"], Q_KW["margin_offline"], Q_KW["alpha"], Q_KW["beta"]
    p = [S3[i][i] for i in range(3)]
    c, r = [1, 2, 1], [1, 2, 1]
    u = [S3[i][c[i]] for i in range(3)]
    w = [S3[r[i]][i] for i in range(3)]
    G = [[0.0] * 3 for _ in range(3)]
    ex, ey, eq, ez = [], [], [], []
    for i in range(3):
        om = be - (Q_X[i] - u[i]) / al
        nu = be - (Q_Y[i] - w[i]) / al
        hu, hw = max(0.0, m1 + u[i] - p[i]), max(0.0, m1 + w[i] - p[i])
        a_, b_ = float(hu > 0), float(hw > 0)
        e = [float(m2 + v[i] - p[i] > 0) for v in (Q_X, Q_Y, Q_Q, Q_Z)]
        bold = 0.0 if detach else 1.0
        G[i][i] -= om * a_ + nu * b_ + sum(e)
        G[i][c[i]] += om * a_ + bold * hu / al
        G[r[i]][i] += nu * b_ + bold * hw / al
        ex.append(e[0] - bold * hu / al)
        ey.append(e[1] - bold * hw / al)
        eq.append(e[2])
        ez.append(e[3])
    torch.testing.assert_close(gS, torch.tensor(G, dtype=F64), rtol=0, atol=1e-15)
    for got, exp in ((gx, ex), (gy, ey), (gq, eq), (gz, ez)):
        torch.testing.assert_close(got, torch.tensor(exp, dtype=F64), rtol=0, atol=1e-15)


def test_quintuplet_labels_and_single_pair():
    # labels [0, 1, 1]: online negatives of 1 and 2 are only 0 -> u = [0.4375, .375, .375],
    # w = [0.375, .4375, .1875]; only anchor 2's i2t hinge is active: 0.25 + .375 - .5 = .125,
    # omega_2 = 1.5 - 2 (0.25 - 0.375) = 1.75 -> 0.21875; offline terms as before: 0.75
    S, x, y, q, z = _quint_hand_leaves()
    loss = ref.quintuplet_loss_from_scores(S, x, y, q, z, labels=torch.tensor([0, 1, 1]), **Q_KW)
    assert loss.item() == 0.21875 + 0.75
    # all labels equal: online terms vanish (no gradient through the weights), offline count
    loss = ref.quintuplet_loss_from_scores(S, x, y, q, z, labels=torch.tensor([4, 4, 4]), **Q_KW)
    assert loss.item() == 0.75
    gS, gx = _grads(loss, S, x)
    assert gx.tolist() == [0.0, 1.0, 0.0]
    assert gS.tolist() == [[0, 0, 0], [0, -1, 0], [0, 0, -3]]
    # N = 1 through the embedding path: only the offline terms
    g = torch.Generator().manual_seed(9)
    xs = [torch.randn(1, 4, generator=g, dtype=F64, requires_grad=True) for _ in range(6)]
    loss = ref.quintuplet_loss(*xs, margin_offline=10.0)
    v, t, vo, to, v2, t2 = xs
    p = (v * t).sum()
    exp = 4 * 10.0 + (v * to).sum() + (vo * t).sum() + (vo * to).sum() + (v2 * t2).sum() - 4 * p
    torch.testing.assert_close(loss, exp)
    assert all(torch.isfinite(gg).all() for gg in _grads(loss, *xs))


# --------------------------------------------------------------------------------------------
# GOAL
# --------------------------------------------------------------------------------------------

def _goal_loop(S, tw, pw, tau=1.0, a=2.0, b=10.0, lam=0.5, labels=None):
    """Independent scalar-loop implementation of spec §5 (value, G)."""
    n = len(S)
    G = [[0.0] * n for _ in range(n)]
    value = 0.0
    for direction in (0, 1):
        M = S if direction == 0 else [list(col) for col in zip(*S)]
        P = [M[i][i] for i in range(n)]
        minP = min(P)
        for i in range(n):
            cands = [j for j in range(n)
                     if j != i and (labels is None or labels[j] != labels[i])]
            if not cands:
                continue
            c = cands[0]
            for j in cands:
                if M[i][j] > M[i][c]:
                    c = j
            Pi, Ni = P[i], M[i][c]
            if tw == "con":
                wt = 1.0
            elif tw == "nca":
                wt = 1 / (1 + math.exp(tau * (Pi - Ni)))
            else:
                wt = 1 / (1 + math.exp(-tau * ((1 - Pi) ** 2 + Ni ** 2 - 0.5)))
            pset = [k for k in range(n) if k != i and P[k] <= Ni + 0.1]
            nset = [j for j in cands if j != c and M[i][j] >= minP - 0.1]
            if pw == "con":
                wp, wn = 1.0, 1.0
            elif pw == "lin":
                wp, wn = 1 - Pi, Ni
            elif pw == "sig":
                wp = 1 / (math.exp(a * (Pi - lam)) + 1)
                wn = 1 / (math.exp(-b * (Ni - lam)) + 1)
            elif pw == "sig_ms":
                rp = sum(math.exp(a * (Pi - P[k])) for k in pset) / len(pset) if pset else 0.0
                rn = sum(math.exp(b * (M[i][j] - Ni)) for j in nset) / len(nset) if nset else 0.0
                wp = 1 / (math.exp(a * (Pi - lam)) + rp)
                wn = 1 / (math.exp(-b * (Ni - lam)) + rn)
            else:  # lin_ms
                rp = sum(Pi - P[k] for k in pset) / len(pset) if pset else 0.0
                rn = sum(Ni - M[i][j] for j in nset) / len(nset) if nset else 0.0
                wp = (1 - rp) * (1 - Pi)
                wn = (1 + rn) * Ni
            value += Ni - Pi
            G[i][i] -= wt * wp
            if direction == 0:
                G[i][c] += wt * wn
            else:
                G[c][i] += wt * wn
    return value, G


def _goal_S(seed, n=7):
    g = torch.Generator().manual_seed(seed)
    S = torch.rand(n, n, generator=g, dtype=F64) * 1.3 - 0.4
    S.diagonal().copy_(torch.rand(n, generator=g, dtype=F64) * 0.6 + 0.3)
    return S


def test_goal_hand_value_and_gradient():
    img, txt = _from_S(S3)
    for reduction, scale in (("sum", 1.0), ("mean", 1 / 3)):
        loss = ref.goal_loss(img, txt, reduction=reduction)
        assert loss.item() == pytest.approx(-0.6875 * scale, abs=1e-15)
        (g,) = _grads(loss, txt)
        exp = torch.tensor([[-2, 1, 0], [1, -2, 2], [0, 2, -2]], dtype=F64) * scale
        torch.testing.assert_close(g.T, exp, rtol=0, atol=1e-15)
    loss = ref.goal_loss(img, txt, labels=torch.tensor([0, 1, 1]))
    # rows: (0.4375-1) + (0.375-0.75) + (0.375-0.5); cols: (0.375-1) + (0.4375-0.75)
    # + (0.1875-0.5)
    assert loss.item() == pytest.approx(-0.5625 - 0.375 - 0.125 - 0.625 - 0.3125 - 0.3125)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("use_labels", [False, True])
def test_goal_con_con_equals_vsepp_gradient_when_all_hinges_active(normalize, use_labels):
    labels = _LAB6 if use_labels else None
    img, txt = _separated(6, 4, 10.0, labels=labels, normalize=normalize, seed=31)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    goal = ref.goal_loss(img, txt, labels=labels, normalize=normalize)
    tri = ref.triplet_loss(img, txt, margin=10.0, mining="hardest", labels=labels,
                           normalize=normalize)
    torch.testing.assert_close(tri, goal + 10.0 * 12)  # every anchor has a valid negative
    for a, b in zip(_grads(goal, img, txt), _grads(tri, img, txt)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_goal_nca_con_is_gradient_of_softplus(tau):
    img, txt = _separated(6, 4, 0.0, seed=41)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    goal = ref.goal_loss(img, txt, triplet_weight="nca", pair_weight="con", tau=tau)
    S = img @ txt.T
    P = S.diagonal()
    off = torch.eye(6, dtype=torch.bool)
    Nr = S.masked_fill(off, -INF).max(dim=1).values
    Nc = S.masked_fill(off, -INF).max(dim=0).values
    sur = (F.softplus(tau * (Nr - P)) + F.softplus(tau * (Nc - P))).sum() / tau
    torch.testing.assert_close(goal, (Nr - P).sum() + (Nc - P).sum())
    for x, y in zip(_grads(goal, img, txt), _grads(sur, img, txt)):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_goal_sig_con_is_gradient_of_ms_pair_loss():
    a, b, lam = 3.0, 7.0, 0.25
    img, txt = _separated(6, 4, 0.0, seed=43, normalize=True)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    goal = ref.goal_loss(img, txt, pair_weight="sig", a=a, b=b, lam=lam, normalize=True)
    v, t = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    S = v @ t.T
    P = S.diagonal()
    off = torch.eye(6, dtype=torch.bool)
    sur = 0
    for Nv in (S.masked_fill(off, -INF).max(dim=1).values,
               S.masked_fill(off, -INF).max(dim=0).values):
        sur = sur + (F.softplus(-a * (P - lam)) / a + F.softplus(b * (Nv - lam)) / b).sum()
    for x, y in zip(_grads(goal, img, txt), _grads(sur, img, txt)):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tw", ["con", "nca", "cir"])
@pytest.mark.parametrize("pw", ["con", "lin", "sig", "lin_ms", "sig_ms"])
def test_goal_matches_loop_implementation(tw, pw):
    for seed, labels in ((51, None), (52, [0, 1, 0, 2, 1, 3, 0])):
        S = _goal_S(seed).requires_grad_(True)
        kw = dict(tau=2.0, a=2.5, b=8.0, lam=0.4)
        lab = None if labels is None else torch.tensor(labels)
        loss = ref.goal_loss_from_similarity(S, triplet_weight=tw, pair_weight=pw,
                                             labels=lab, **kw)
        (gS,) = _grads(loss, S)
        value, G = _goal_loop(S.detach().tolist(), tw, pw, labels=labels, **kw)
        assert loss.item() == pytest.approx(value, rel=1e-13)
        torch.testing.assert_close(gS, torch.tensor(G, dtype=F64), rtol=1e-12, atol=1e-13)
        v2, G2 = ref.goal_value_and_grad(S, triplet_weight=tw, pair_weight=pw, labels=lab, **kw)
        torch.testing.assert_close(G2, gS, rtol=0, atol=0)


def test_goal_ms_sets_are_exercised():
    """The loop comparison above is only meaningful if the MS sets are neither all empty nor
    all full on the test matrices: check it, and that sig_ms differs from sig."""
    S = _goal_S(51)
    n = S.shape[0]
    P = S.diagonal()
    off = ~torch.eye(n, dtype=torch.bool)
    Nr = S.masked_fill(~off, -INF).max(dim=1).values
    psize = (off & (P[None, :] <= Nr[:, None] + 0.1)).sum(1)
    nsize = (off & (S >= P.min() - 0.1)).sum(1) - 1
    assert 0 < psize.sum() < n * (n - 1) and 0 < nsize.sum() < n * (n - 1)
    _, G1 = ref.goal_value_and_grad(S, pair_weight="sig")
    _, G2 = ref.goal_value_and_grad(S, pair_weight="sig_ms")
    assert not torch.allclose(G1, G2)


def test_goal_backward_scales_with_grad_output():
    img, txt = _separated(6, 4, 0.0, seed=61)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    kw = dict(triplet_weight="cir", pair_weight="sig_ms", tau=2.0)
    g1 = _grads(ref.goal_loss(img, txt, **kw), img, txt)
    g3 = _grads(-2.5 * ref.goal_loss(img, txt, **kw), img, txt)
    gm = _grads(ref.goal_loss(img, txt, reduction="mean", **kw), img, txt)
    for a, b, c in zip(g1, g3, gm):
        assert a.abs().max() > 0
        torch.testing.assert_close(b, -2.5 * a, rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(c, a / 6, rtol=1e-14, atol=1e-15)
    # sum of a GOAL loss and another loss: each gets its own gradient
    loss = ref.goal_loss(img, txt, **kw) + ref.triplet_loss(img, txt)
    gsum = _grads(loss, img, txt)
    gt = _grads(ref.triplet_loss(img, txt), img, txt)
    for a, b, c in zip(gsum, g1, gt):
        torch.testing.assert_close(a, b + c)


# --------------------------------------------------------------------------------------------
# N = 1, NaN, half precision
# --------------------------------------------------------------------------------------------

_SINGLE = [
    ("triplet-all", lambda a, b, nz: ref.triplet_loss(a, b, mining="all", normalize=nz)),
    ("triplet-hardest", lambda a, b, nz: ref.triplet_loss(a, b, normalize=nz)),
    ("triplet-topk", lambda a, b, nz: ref.triplet_loss(a, b, mining="topk", k=3, normalize=nz)),
    ("unified", lambda a, b, nz: ref.unified_loss(a, b, scale=1000.0, normalize=nz)),
    ("goal-con", lambda a, b, nz: ref.goal_loss(a, b, normalize=nz)),
    ("goal-nca-sig_ms", lambda a, b, nz: ref.goal_loss(a, b, triplet_weight="nca",
                                                      pair_weight="sig_ms", normalize=nz)),
    ("goal-cir-lin_ms", lambda a, b, nz: ref.goal_loss(a, b, triplet_weight="cir",
                                                      pair_weight="lin_ms", normalize=nz)),
]


@pytest.mark.parametrize("name,fn", _SINGLE, ids=[s[0] for s in _SINGLE])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_pair_gives_exact_zero(name, fn, normalize, dtype):
    img = torch.randn(1, 4).to(dtype).requires_grad_(True)
    txt = torch.randn(1, 4).to(dtype).requires_grad_(True)
    loss = fn(img, txt, normalize)
    assert loss.dtype == dtype and loss.item() == 0.0
    gi, gt = _grads(loss, img, txt)
    assert gi.dtype == dtype and torch.equal(gi, torch.zeros_like(gi))
    assert torch.equal(gt, torch.zeros_like(gt))


def test_all_same_label_gives_exact_zero():
    g = torch.Generator().manual_seed(7)
    img = torch.randn(4, 3, generator=g, dtype=F64, requires_grad=True)
    txt = torch.randn(4, 3, generator=g, dtype=F64, requires_grad=True)
    lab = torch.full((4,), 2)
    for loss in (ref.triplet_loss(img, txt, labels=lab, mining="all"),
                 ref.triplet_loss(img, txt, labels=lab),
                 ref.triplet_loss(img, txt, labels=lab, mining="topk", k=2),
                 ref.unified_loss(img, txt, labels=lab),
                 ref.goal_loss(img, txt, labels=lab, pair_weight="sig_ms")):
        assert loss.item() == 0.0
        for gg in _grads(loss, img, txt):
            assert torch.equal(gg, torch.zeros_like(gg))


def test_nan_input_gives_nan_loss():
    g = torch.Generator().manual_seed(8)
    img = torch.randn(5, 3, generator=g, dtype=F64)
    txt = torch.randn(5, 3, generator=g, dtype=F64)
    img[2, 1] = NAN
    losses = [ref.triplet_loss(img, txt, mining=m, k=2) for m in ("all", "hardest", "topk")]
    losses += [ref.unified_loss(img, txt), ref.goal_loss(img, txt, pair_weight="sig_ms"),
               ref.quintuplet_loss(img, txt, img, txt, img, txt)]
    for loss in losses:
        assert torch.isnan(loss)
    # hardest mining picks the NaN entries (they rank first), never an out-of-range index
    S = img @ txt.T
    _, idx, _ = ref.hardest_negative(S.T, ref.negative_mask(5))
    col2 = S[:, 2].clone()
    col2[2] = -INF  # column 2's only NaN is its own (excluded) positive
    assert idx.tolist() == [2, 2, int(col2.argmax()), 2, 2]


_HALF_LOSSES = [
    ("triplet-all", lambda a, b, *ex: ref.triplet_loss(a, b, mining="all", normalize=True)),
    ("triplet-hardest", lambda a, b, *ex: ref.triplet_loss(a, b, margin=0.5, normalize=True)),
    ("triplet-topk", lambda a, b, *ex: ref.triplet_loss(a, b, mining="topk", k=3, normalize=True)),
    ("unified", lambda a, b, *ex: ref.unified_loss(a, b, normalize=True)),
    ("quintuplet", lambda a, b, *ex: ref.quintuplet_loss(a, b, *ex, normalize=True)),
    ("goal", lambda a, b, *ex: ref.goal_loss(a, b, triplet_weight="nca", pair_weight="sig_ms",
                                        normalize=True)),
]


@pytest.mark.parametrize("name,fn", _HALF_LOSSES, ids=[s[0] for s in _HALF_LOSSES])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(name, fn, dtype):
    g = torch.Generator().manual_seed(12)
    img32 = torch.randn(16, 32, generator=g)
    txt32 = torch.randn(16, 32, generator=g)
    ex32 = [torch.randn(16, 32, generator=g) for _ in range(4)]  # AOQ's offline inputs
    ex = [e.to(dtype) for e in ex32]
    img = img32.to(dtype).requires_grad_(True)
    txt = txt32.to(dtype).requires_grad_(True)
    loss = fn(img, txt, *ex)
    assert loss.dtype == dtype
    # close to the float32 value on the original (unrounded) inputs
    loss32 = fn(img32, txt32, *ex32)
    assert abs(loss.float().item() - loss32.item()) <= 0.03 * abs(loss32.item()) + 0.05
    # computed in float32: equal to float32 on the rounded inputs, rounded once at the end
    a = img.detach().float().requires_grad_(True)
    b = txt.detach().float().requires_grad_(True)
    lr = fn(a, b, *[e.float() for e in ex])
    assert loss.item() == lr.to(dtype).item()
    gi, gt = _grads(loss, img, txt)
    ga, gb = _grads(lr, a, b)
    assert gi.dtype == dtype and gt.dtype == dtype
    assert torch.isfinite(gi).all() and torch.isfinite(gt).all()
    torch.testing.assert_close(gi, ga.to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(gt, gb.to(dtype), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# unified: tensor scale (learnable temperature) and positives from labels (issue 15)
# --------------------------------------------------------------------------------------------

def _unified_scale_grad_by_hand(S, scale, margin, valid):
    """sum over row and column anchors of sum_j p_ij (S_ij - S_ii + m), p the softmax weights."""
    total = S.new_zeros(())
    for M, V in ((S, valid), (S.T, valid.T)):
        d = M - M.diagonal()[:, None] + margin
        z = (scale * d).masked_fill(~V, float("-inf"))
        zero = torch.zeros(M.shape[0], 1, dtype=M.dtype)
        p = torch.softmax(torch.cat([zero, z], dim=1), dim=1)[:, 1:]
        total = total + (p * d.masked_fill(~V, 0.0)).sum()
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("use_labels", [False, True])
def test_unified_tensor_scale_gradient(dtype, use_labels):
    g = torch.Generator().manual_seed(15)
    n = 7
    img = torch.randn(n, 5, generator=g, dtype=dtype)
    txt = torch.randn(n, 5, generator=g, dtype=dtype)
    labels = torch.tensor([0, 1, 0, 2, 3, 1, 4]) if use_labels else None
    scale = torch.tensor(3.0, dtype=dtype, requires_grad=True)
    loss = ref.unified_loss(img, txt, scale=scale, margin=0.2, labels=labels)
    (got,) = torch.autograd.grad(loss, scale)
    valid = ref.negative_mask(n, labels)
    want = _unified_scale_grad_by_hand(img @ txt.T, 3.0, 0.2, valid)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(loss.detach(), ref.unified_loss(img, txt, scale=3.0, margin=0.2,
                                                               labels=labels))


def test_unified_label_positives_unique_labels_equal_default():
    g = torch.Generator().manual_seed(3)
    img = torch.randn(9, 4, generator=g, dtype=torch.float64)
    txt = torch.randn(9, 4, generator=g, dtype=torch.float64)
    labels = torch.arange(9)
    for reduction in ("sum", "mean"):
        a = ref.unified_loss(img, txt, labels=labels, label_positives=True, reduction=reduction)
        b = ref.unified_loss(img, txt, reduction=reduction)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_unified_label_positives_hand_value():
    # 3 pairs, pairs 0 and 1 share a label; g = 1, m = 0.
    S = torch.tensor([[0.9, 0.5, 0.1], [0.4, 0.8, 0.2], [0.3, 0.6, 0.7]], dtype=torch.float64)
    labels = torch.tensor([5, 5, 6])
    got = ref.unified_loss_from_similarity(S, scale=1.0, margin=0.0, labels=labels,
                                           label_positives=True)
    l = lambda *zs: math.log(1 + sum(math.exp(z) for z in zs))
    rows = ((l(0.1 - 0.9) + l(0.1 - 0.5)) / 2 + (l(0.2 - 0.4) + l(0.2 - 0.8)) / 2
            + l(0.3 - 0.7, 0.6 - 0.7))
    cols = ((l(0.3 - 0.9) + l(0.3 - 0.4)) / 2 + (l(0.6 - 0.5) + l(0.6 - 0.8)) / 2
            + l(0.1 - 0.7, 0.2 - 0.7))
    torch.testing.assert_close(got, torch.tensor(rows + cols, dtype=torch.float64),
                               rtol=0, atol=1e-12)


def test_unified_label_positives_needs_labels():
    with pytest.raises(ValueError, match="needs labels"):
        ref.unified_loss(torch.randn(3, 2), torch.randn(3, 2), label_positives=True)


@pytest.mark.parametrize("use_labels", [False, True])
def test_unified_scale_gradient_from_similarity_gradient(use_labels):
    # dL/dg = <dL/dS, S> / g + m sum_anchors (1 - e^-L_anchor): what an engine can form from
    # its dA (<dL/dS, A B^T> = <dL/dS B, A>) and saved L without another GEMM.
    g = torch.Generator().manual_seed(16)
    n, scale, margin = 7, 3.0, 0.2
    img = torch.randn(n, 5, generator=g, dtype=torch.float64)
    txt = torch.randn(n, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 3, 1, 4]) if use_labels else None
    S = (img @ txt.T).requires_grad_()
    gamma = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    loss = ref.unified_loss_from_similarity(S, scale=gamma, margin=margin, labels=labels)
    dS, dgamma = torch.autograd.grad(loss, (S, gamma))
    valid = ref.negative_mask(n, labels)
    anchor_losses = []
    for M, V in ((S.detach(), valid), (S.detach().T, valid.T)):
        z = (scale * (M - M.diagonal()[:, None] + margin)).masked_fill(~V, float("-inf"))
        anchor_losses.append(torch.logsumexp(torch.cat([torch.zeros(n, 1, dtype=M.dtype), z], 1), 1))
    L = torch.cat(anchor_losses)
    want = (dS * S.detach()).sum() / scale + margin * (-torch.expm1(-L)).sum()
    torch.testing.assert_close(dgamma, want, rtol=1e-12, atol=0)
