"""Recall@K evaluation (vse_cuda.evaluate) against hand-computed recalls and a direct
computation on the materialized similarity matrix."""

from __future__ import annotations

import itertools

import pytest
import torch

from vse_cuda import evaluate


def embeddings_for(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and caption embeddings whose similarity img·capᵀ is exactly ``scores`` [n, m]."""
    return torch.eye(scores.size(0), dtype=scores.dtype), scores.T.contiguous()


def direct_recall(scores: torch.Tensor, cpi: int) -> dict[str, float]:
    """Recall from the full matrix: ranks in a stable descending sort (ties to the lower index)."""
    n, m = scores.shape
    def positions(s: torch.Tensor) -> torch.Tensor:
        order = torch.argsort(s, dim=1, descending=True, stable=True)
        return torch.argsort(order, dim=1)  # position of every column in its row's ranking

    i2t_rank = positions(scores).view(n, n, cpi)[torch.arange(n), torch.arange(n)].amin(dim=1)
    t2i_rank = positions(scores.T)[torch.arange(m), torch.arange(m) // cpi]
    result = {f"{d}_r{k}": 100.0 * (rank < k).double().mean().item()
              for d, rank in (("i2t", i2t_rank), ("t2i", t2i_rank)) for k in evaluate.RECALL_AT}
    result["rsum"] = sum(result.values())
    return result


def test_hand_computed_recall():
    # 3 images x 2 captions. Image 0 ranks its caption 0 first, image 1 its caption 3 first,
    # image 2 its best caption (5) third. Captions 3 and 5 rank their image first; caption 4's
    # image ties with image 1 (0.2) and loses the tie (lower index first) to rank third.
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.3, 0.4],
                           [0.5, 0.6, 0.1, 0.7, 0.2, 0.3],
                           [0.95, 0.9, 0.3, 0.1, 0.2, 0.85]])
    got = evaluate.recall_at_k(*embeddings_for(scores), captions_per_image=2)
    expected = {"i2t_r1": 200 / 3, "i2t_r5": 100.0, "i2t_r10": 100.0,
                "t2i_r1": 100 / 3, "t2i_r5": 100.0, "t2i_r10": 100.0}
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key
    assert got["rsum"] == pytest.approx(500.0)


@pytest.mark.parametrize("n, cpi, seed", [(30, 5, 0), (12, 5, 1), (40, 1, 2), (25, 3, 3)])
def test_matches_direct_computation_with_ties(n, cpi, seed):
    # Small integers in float64: every product is exact, and many scores tie.
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(-3, 4, (n, n * cpi), generator=gen).double()
    got = evaluate.recall_at_k(*embeddings_for(scores), captions_per_image=cpi)
    assert got == pytest.approx(direct_recall(scores, cpi))


def test_random_embeddings_match_direct_computation_in_chunks():
    gen = torch.Generator().manual_seed(5)
    img = torch.nn.functional.normalize(torch.randn(64, 8, generator=gen), dim=1)
    cap = torch.nn.functional.normalize(img.repeat_interleave(5, 0) + torch.randn(320, 8, generator=gen), dim=1)
    got = evaluate.recall_at_k(img, cap, chunk_size=7)
    assert got == pytest.approx(direct_recall(img @ cap.T, 5))
    assert got["rsum"] > evaluate.chance_rsum(64)  # the captions carry their image's signal


def test_fold_recall_is_the_mean_over_folds():
    gen = torch.Generator().manual_seed(3)
    img, cap = torch.randn(40, 6, generator=gen), torch.randn(200, 6, generator=gen)
    folds = [evaluate.recall_at_k(img[f:f + 10], cap[5 * f:5 * f + 50]) for f in range(0, 40, 10)]
    got = evaluate.fold_recall(img, cap, fold_images=10)
    for metric in evaluate.METRICS:
        assert got[metric] == pytest.approx(sum(f[metric] for f in folds) / 4), metric
    with pytest.raises(ValueError, match="fold_images"):
        evaluate.fold_recall(img, cap, fold_images=15)


def test_recall_table_protocols():
    def keys(n: int) -> list[str]:
        img = torch.randn(n, 4)
        return list(evaluate.recall_table(img, img.repeat_interleave(5, 0)))

    assert keys(5000) == ["1K (5-fold mean)", "5K"]
    assert keys(1000) == ["1K"]
    assert keys(120) == ["120 images"]


def test_chance_rsum_by_enumeration():
    # 3 images x 2 captions: i2t chance of K is the fraction of the 6! caption orders with one
    # of image 0's two captions in the top K; t2i chance is min(K, 3)/3.
    n, cpi = 3, 2
    orders = list(itertools.permutations(range(n * cpi)))
    i2t = {k: sum(any(c in (0, 1) for c in order[:k]) for order in orders) / len(orders) for k in evaluate.RECALL_AT}
    expected = 100 * sum(i2t[k] + min(k, n) / n for k in evaluate.RECALL_AT)
    assert evaluate.chance_rsum(n, cpi) == pytest.approx(expected)
    assert evaluate.chance_rsum(1000) == pytest.approx(3.2, abs=0.01)  # ≈ 2·(1+5+10)/1000·100


def test_rejects_caption_count_mismatch():
    with pytest.raises(ValueError, match="5 captions per image"):
        evaluate.recall_at_k(torch.randn(4, 3), torch.randn(19, 3))


def test_format_table_has_every_metric():
    img = torch.randn(10, 4)
    text = evaluate.format_table(evaluate.recall_table(img, img.repeat_interleave(5, 0)), num_images=10)
    header, rule, row, *rest = text.splitlines()
    assert header.count("|") == rule.count("|") == row.count("|") == 9
    assert "chance rsum" in text
