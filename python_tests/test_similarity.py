"""similarity against the oracle, with gradients."""

from __future__ import annotations

import pytest
import torch

import vse_cuda
from vse_cuda import reference as ref


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (3, 7, 5), (17, 2, 64)])
def test_matches_oracle_with_gradients(normalize, n, m, d):
    a = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    b = torch.randn(m, d, dtype=torch.float64, requires_grad=True)
    got = vse_cuda.similarity(a, b, normalize=normalize)
    want = ref.similarity(a, b, normalize=normalize)
    torch.testing.assert_close(got, want)
    w = torch.randn(n, m, dtype=torch.float64)
    grads = torch.autograd.grad((got * w).sum(), (a, b))
    expected = torch.autograd.grad((want * w).sum(), (a, b))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)
    assert torch.autograd.gradcheck(lambda x, y: vse_cuda.similarity(x, y, normalize=normalize), (a, b))


@pytest.mark.parametrize("bad, error", [
    (lambda a, b: vse_cuda.similarity(a[0], b), ValueError),
    (lambda a, b: vse_cuda.similarity(a, b[:, :2]), ValueError),
    (lambda a, b: vse_cuda.similarity(a, b.half()), TypeError),
    (lambda a, b: vse_cuda.similarity(a.int(), b.int()), TypeError),
])
def test_bad_input(bad, error):
    with pytest.raises(error):
        bad(torch.randn(3, 4), torch.randn(5, 4))
