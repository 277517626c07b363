"""topk_similar on every backend against the oracle (vse_cuda.reference.topk_similar).

On simt (and cuda) this runs topk_tile_kernel (csrc/cuda/topk.cuh) and its block bitonic sort."""

from __future__ import annotations

import pytest
import torch

import vse_cuda
from vse_cuda import reference as ref
from vse_cuda._chunking import plan_chunks

from _loss_cases import extra_peak_mib

TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def assert_topk_valid(values, indices, queries, keys, k, query_labels=None, key_labels=None):
    """Checks what must hold whatever the GEMM's summation order: the oracle's k best
    values, returned at distinct in-range indices whose true similarity is that value."""
    n, m = queries.size(0), keys.size(0)
    assert values.shape == (n, k) and indices.shape == (n, k)
    assert values.dtype == queries.dtype and indices.dtype == torch.int64
    assert bool(((indices >= 0) & (indices < m)).all()), "index out of range"
    assert all(len(set(row.tolist())) == k for row in indices), "repeated index in a row"
    if query_labels is not None:
        assert not bool((key_labels[indices] == query_labels[:, None]).any()), "same-label key returned"
    expected_values, _ = ref.topk_similar(queries, keys, k, query_labels=query_labels, key_labels=key_labels)
    S = queries.double() @ keys.double().T
    tol = TOL[queries.dtype]
    torch.testing.assert_close(values.double(), expected_values.double(), atol=tol, rtol=tol)
    torch.testing.assert_close(S.gather(1, indices), expected_values.double(), atol=tol, rtol=tol)


@pytest.mark.parametrize("n,m,d,k,chunk", [
    (1, 1, 1, 1, None), (2, 3, 2, 2, None), (7, 13, 5, 13, 3), (31, 97, 16, 10, 8),
    (64, 300, 33, 257, None), (5, 2100, 8, 2048, 2), (129, 517, 64, 1, 64),
])
def test_matches_oracle_float64(backend, device, on_backend, n, m, d, k, chunk):
    g = torch.Generator().manual_seed(n * 1000 + m)
    q = torch.randn(n, d, generator=g, dtype=torch.float64).to(device)
    keys = torch.randn(m, d, generator=g, dtype=torch.float64).to(device)
    with on_backend():
        values, indices = vse_cuda.topk_similar(q, keys, k, chunk_size=chunk)
    expected_values, expected_indices = ref.topk_similar(q, keys, k)
    torch.testing.assert_close(values, expected_values, atol=1e-12, rtol=1e-12)
    assert torch.equal(indices, expected_indices)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_oracle_low_precision(backend, device, on_backend, dtype):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(37, 24, generator=g).to(device, dtype)
    keys = torch.randn(211, 24, generator=g).to(device, dtype)
    with on_backend():
        values, indices = vse_cuda.topk_similar(q, keys, 17, chunk_size=16)
    assert_topk_valid(values, indices, q, keys, 17)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_ties_go_to_the_lowest_index(backend, device, on_backend, dtype):
    # Small integers make every similarity exact in any dtype and summation order, with
    # many exact ties, so indices must equal the oracle's stable sort exactly.
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-2, 3, (23, 3), generator=g).to(device, dtype)
    keys = torch.randint(-2, 3, (301, 3), generator=g).to(device, dtype)
    for k in (1, 5, 64, 301):
        with on_backend():
            values, indices = vse_cuda.topk_similar(q, keys, k, chunk_size=6)
        expected_values, expected_indices = ref.topk_similar(q, keys, k)
        assert torch.equal(indices, expected_indices), f"k={k}"
        assert torch.equal(values, expected_values)


def test_label_exclusion(backend, device, on_backend):
    # 5 captions per image: an image never retrieves its own captions.
    g = torch.Generator().manual_seed(11)
    images = torch.randn(40, 12, generator=g, dtype=torch.float64).to(device)
    captions = images.repeat_interleave(5, 0) + 0.1 * torch.randn(200, 12, generator=g, dtype=torch.float64).to(device)
    image_ids = torch.arange(40, device=device)
    caption_ids = image_ids.repeat_interleave(5)
    for k in (1, 7, 195):
        with on_backend():
            values, indices = vse_cuda.topk_similar(images, captions, k, query_labels=image_ids,
                                                    key_labels=caption_ids, chunk_size=9)
        expected_values, expected_indices = ref.topk_similar(images, captions, k, query_labels=image_ids,
                                                             key_labels=caption_ids)
        assert torch.equal(indices, expected_indices)
        torch.testing.assert_close(values, expected_values, atol=1e-12, rtol=1e-12)
        assert not bool((caption_ids[indices] == image_ids[:, None]).any())


def test_k_beyond_the_candidates_left_by_labels_is_refused():
    q, keys = torch.randn(3, 4), torch.randn(10, 4)
    ql, kl = torch.tensor([0, 1, 2]), torch.tensor([0, 0, 0, 1, 2, 3, 4, 5, 6, 7])
    vse_cuda.topk_similar(q, keys, 7, query_labels=ql, key_labels=kl)  # 10 - 3 same-label keys
    with pytest.raises(ValueError, match="k"):
        vse_cuda.topk_similar(q, keys, 8, query_labels=ql, key_labels=kl)


def test_nan_ranks_first_and_indices_stay_in_range(backend, device, on_backend):
    g = torch.Generator().manual_seed(5)
    q = torch.randn(9, 6, generator=g, dtype=torch.float64).to(device)
    keys = torch.randn(50, 6, generator=g, dtype=torch.float64).to(device)
    q[2, 0] = float("nan")       # a whole row of NaN similarities
    keys[17, 3] = float("nan")   # a whole column
    keys[40, 1] = float("nan")
    with on_backend():
        values, indices = vse_cuda.topk_similar(q, keys, 5, chunk_size=4)
    expected_values, expected_indices = ref.topk_similar(q, keys, 5)
    assert torch.equal(indices, expected_indices)
    assert bool(((indices >= 0) & (indices < 50)).all())
    torch.testing.assert_close(values, expected_values, equal_nan=True, atol=1e-12, rtol=1e-12)
    assert indices[2].tolist() == [0, 1, 2, 3, 4]
    assert indices[0, :2].tolist() == [17, 40]


def test_non_contiguous_and_normalize(backend, device, on_backend):
    g = torch.Generator().manual_seed(9)
    q = torch.randn(12, 40, generator=g, dtype=torch.float64).to(device)[:, ::2]
    keys = torch.randn(20, 60, generator=g, dtype=torch.float64).to(device).T[::3].T.contiguous().T.T
    keys = torch.randn(30, 20, generator=g, dtype=torch.float64).to(device).T.contiguous().T  # column-major
    assert not q.is_contiguous() and not keys.is_contiguous()
    with on_backend():
        values, indices = vse_cuda.topk_similar(q, keys, 4, normalize=True)
    expected_values, expected_indices = ref.topk_similar(q, keys, 4, normalize=True)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(values, expected_values)


def test_progress_bar_and_chunking_give_the_same_result(capsys):
    q, keys = torch.randn(50, 8, dtype=torch.float64), torch.randn(70, 8, dtype=torch.float64)
    whole = vse_cuda.topk_similar(q, keys, 6)
    chunked = vse_cuda.topk_similar(q, keys, 6, chunk_size=7, progress=True)
    assert torch.equal(whole[1], chunked[1])
    torch.testing.assert_close(whole[0], chunked[0], atol=1e-12, rtol=1e-12)  # GEMM shapes differ
    assert "topk_similar" in capsys.readouterr().err


def test_opcheck():
    q, keys = torch.randn(6, 5), torch.randn(9, 5)
    labels = torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(9) % 4
    torch.library.opcheck(torch.ops.vse_cuda.topk_similar.default, (q, keys, 3, *labels, 4, 5))
    torch.library.opcheck(torch.ops.vse_cuda.topk_similar.default,
                          (q, keys, 3, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), 6, 9))


def test_chunk_plan_respects_the_budget():
    chunks = plan_chunks(20000, 200000, torch.float32, None, budget=256 * 2**20)
    assert chunks.rows * chunks.cols * 4 <= 256 * 2**20
    assert plan_chunks(3, 5, torch.float64, 100).rows == 3


def test_memory_stays_within_one_tile():
    # S would be 4000 × 100000 float32 = 1.6 GB; one tile is at most 256 MiB.
    extra_mib = extra_peak_mib("q, keys = torch.randn(4000, 16), torch.randn(100000, 16)",
                               "vse_cuda.topk_similar(q, keys, 10)")
    assert extra_mib < 600, f"topk_similar used {extra_mib:.0f} MiB extra; S would need 1526 MiB"


@pytest.mark.parametrize("call, error, match", [
    (lambda q, k: vse_cuda.topk_similar(q[0], k, 1), ValueError, "queries"),
    (lambda q, k: vse_cuda.topk_similar(q, k[:, :3], 1), ValueError, "keys"),
    (lambda q, k: vse_cuda.topk_similar(q, k, 0), ValueError, "k"),
    (lambda q, k: vse_cuda.topk_similar(q, k, 11), ValueError, "k"),
    (lambda q, k: vse_cuda.topk_similar(q, k, 2.0), TypeError, "k"),
    (lambda q, k: vse_cuda.topk_similar(q.long(), k.long(), 1), TypeError, "queries"),
    (lambda q, k: vse_cuda.topk_similar(q, k.double(), 1), TypeError, "keys"),
    (lambda q, k: vse_cuda.topk_similar(q, k.to("meta"), 1), ValueError, "keys"),
    (lambda q, k: vse_cuda.topk_similar(q, k, 1, query_labels=torch.zeros(4, dtype=torch.long)), ValueError, "labels"),
    (lambda q, k: vse_cuda.topk_similar(q, k, 1, query_labels=torch.zeros(4), key_labels=torch.zeros(10)), TypeError, "query_labels"),
    (lambda q, k: vse_cuda.topk_similar(q, k, 1, query_labels=torch.zeros(3, dtype=torch.long),
                                        key_labels=torch.zeros(10, dtype=torch.long)), ValueError, "query_labels"),
    (lambda q, k: vse_cuda.topk_similar(q, k, 1, chunk_size=0), ValueError, "chunk_size"),
    (lambda q, k: vse_cuda.topk_similar("q", k, 1), TypeError, "queries"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(4, 5), torch.randn(10, 5))
