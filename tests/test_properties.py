"""Property-based tests of the layers: random shapes, splits, ranks, batch shapes and strides, both
paths (default and optimize_for_inference), against a float64 dense reference."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from kn_transformers import KroneckerEmbedding, KroneckerLinear, kronecker_to_dense, optimize_for_inference

# bounded: the whole file runs in seconds in CI; `--hypothesis-profile=thorough` for more
settings.register_profile("ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")

DIMS = st.sampled_from([1, 2, 3, 4, 5, 6, 8, 12, 16, 32])


@st.composite
def linear_cases(draw):
    m1, n1, m2, n2 = draw(DIMS), draw(DIMS), draw(DIMS), draw(DIMS)
    rank = draw(st.integers(1, min(3, m1 * n1, m2 * n2)))
    lead = draw(st.lists(st.integers(0, 5), min_size=1, max_size=3))
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded", "negative"]))
    return m1, n1, m2, n2, rank, tuple(lead), layout, draw(st.booleans()), draw(st.integers(0, 2**16))


def _input(lead, n, layout, gen):
    if layout == "transposed":  # (..., n) as the transpose of a (n, ...) tensor: last dim strided
        return torch.randn(n, *lead, generator=gen).movedim(0, -1)
    if layout == "sliced":
        return torch.randn(*lead, n + 3, generator=gen)[..., 1:n + 1]
    if layout == "expanded":
        return torch.randn(*lead[:-1], 1, n, generator=gen).expand(*lead, n)
    if layout == "negative":
        return torch._neg_view(torch.randn(*lead, n, generator=gen))
    return torch.randn(*lead, n, generator=gen)


@given(linear_cases())
def test_linear_matches_the_dense_reference(case):
    m1, n1, m2, n2, rank, lead, layout, bias, seed = case
    gen = torch.Generator().manual_seed(seed)
    k = KroneckerLinear(n1 * n2, m1 * m2, (m1, n1), rank=rank, bias=bias)
    with torch.no_grad():
        k.A.copy_(torch.randn(k.A.shape, generator=gen))
        k.B.copy_(torch.randn(k.B.shape, generator=gen))
        if bias:
            k.bias.copy_(torch.randn(k.bias.shape, generator=gen))
    x = _input(lead, n1 * n2, layout, gen)
    ref = x.double() @ kronecker_to_dense(k.A.double(), k.B.double()).T
    if bias:
        ref = ref + k.bias.double()
    scale = ref.abs().max().item() if ref.numel() else 1.0
    optimized = optimize_for_inference(copy.deepcopy(k), autotune=False)
    with torch.no_grad():
        for layer in (k, optimized):
            y = layer(x)
            assert y.shape == ref.shape
            torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * scale)
    # float64: the default path to rounding
    k64 = k.double()
    y64 = k64(x.double())
    torch.testing.assert_close(y64, ref, rtol=1e-11, atol=1e-11 * scale)


VOCABS = st.one_of(st.sampled_from([2, 7, 13, 97, 101, 127, 128, 1000]), st.integers(2, 300))


@st.composite
def embedding_cases(draw):
    vocab = draw(VOCABS)
    n1, n2 = draw(DIMS), draw(DIMS)
    m1 = draw(st.integers(1, vocab))
    rank = draw(st.integers(1, 2))
    padding = draw(st.one_of(st.none(), st.integers(-vocab, vocab - 1)))
    ids = draw(st.lists(st.integers(0, vocab - 1), min_size=0, max_size=12))
    bad = draw(st.one_of(st.integers(-2 * vocab - 5, -1), st.integers(vocab, 3 * vocab + 5)))
    return vocab, m1, n1, n2, rank, padding, ids, bad, draw(st.integers(0, 2**16))


@given(embedding_cases())
def test_embedding_matches_the_dense_table_and_refuses_bad_ids(case):
    vocab, m1, n1, n2, rank, padding, ids, bad, seed = case
    gen = torch.Generator().manual_seed(seed)
    e = KroneckerEmbedding(vocab, n1 * n2, (m1, n1), rank=rank, padding_idx=padding).double()
    with torch.no_grad():
        e.A.copy_(torch.randn(e.A.shape, generator=gen, dtype=torch.float64))
        e.B.copy_(torch.randn(e.B.shape, generator=gen, dtype=torch.float64))
    table = e.weight
    assert table.shape == (vocab, n1 * n2)
    dense = nn.Embedding.from_pretrained(table, padding_idx=e.padding_idx)
    idx = torch.tensor(ids, dtype=torch.long)
    torch.testing.assert_close(e(idx), dense(idx), rtol=1e-12, atol=1e-12)
    with pytest.raises(IndexError):
        dense(torch.tensor([bad]))  # what nn.Embedding does...
    with pytest.raises(IndexError, match="outside"):
        e(torch.tensor(ids + [bad]))  # ...and so does the Kronecker table
