import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from kn_transformers import (
    KRONECKER_ORDERS,
    KroneckerEmbedding,
    KroneckerLinear,
    choose_kronecker_factors,
    kronecker_factor_choices,
    kronecker_flops,
    kronecker_matmul,
    kronecker_to_dense,
    nearest_kronecker,
)
from kn_transformers.core.kronecker_math import _rearrange

F64 = torch.float64


def random_factors(rank, a_shape, b_shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rank, *a_shape, generator=g, dtype=F64), torch.randn(rank, *b_shape, generator=g, dtype=F64))


def test_kronecker_to_dense_matches_torch_kron():
    A, B = random_factors(3, (4, 6), (5, 7))
    expected = sum(torch.kron(A[r], B[r]) for r in range(3))
    torch.testing.assert_close(kronecker_to_dense(A, B), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("a_shape,b_shape", [((4, 6), (5, 7)), ((1, 8), (6, 2)), ((12, 3), (2, 10))])
def test_exact_sum_is_recovered(rank, a_shape, b_shape):
    A, B = random_factors(rank, a_shape, b_shape)
    W = kronecker_to_dense(A, B)
    A2, B2 = nearest_kronecker(W, a_shape, rank=rank)
    assert A2.shape == (rank, *a_shape) and B2.shape == (rank, *b_shape)
    assert (kronecker_to_dense(A2, B2) - W).abs().max() < 1e-10


@pytest.mark.parametrize("rank", [1, 2, 5])
def test_error_equals_discarded_singular_values(rank):
    W = torch.randn(24, 30, dtype=F64, generator=torch.Generator().manual_seed(1))
    A, B, S = nearest_kronecker(W, (4, 5), rank=rank, return_singular_values=True)
    # the singular values are those of the rearranged matrix
    torch.testing.assert_close(S, torch.linalg.svdvals(_rearrange(W, 4, 5, 6, 6)), rtol=0, atol=1e-12)
    err = torch.linalg.norm(W - kronecker_to_dense(A, B))
    assert abs(err - S[rank:].norm()) < 1e-10
    # and the error shrinks as the rank grows
    if rank > 1:
        A1, B1 = nearest_kronecker(W, (4, 5), rank=rank - 1)
        assert torch.linalg.norm(W - kronecker_to_dense(A1, B1)) > err


def test_signs_are_deterministic_and_float32_path():
    W = torch.randn(16, 12, generator=torch.Generator().manual_seed(2))
    A1, B1 = nearest_kronecker(W, (4, 3), rank=2)
    A2, B2 = nearest_kronecker(-(-W), (4, 3), rank=2)
    assert torch.equal(A1, A2) and torch.equal(B1, B2)
    for r in range(2):
        u = A1[r].flatten()
        assert u[u.abs().argmax()] > 0
    A3, B3 = nearest_kronecker(W, (4, 3), rank=2, dtype=torch.float32)
    assert A3.dtype == torch.float32
    torch.testing.assert_close(kronecker_to_dense(A3, B3), kronecker_to_dense(A1, B1), rtol=1e-5, atol=1e-5)


def test_nearest_kronecker_errors():
    W = torch.randn(12, 10)
    with pytest.raises(ValueError, match=r"a_shape \(5, 2\) does not divide the weight shape \(12, 10\)"):
        nearest_kronecker(W, (5, 2))
    with pytest.raises(ValueError, match=r"n1 must divide 10"):
        nearest_kronecker(W, (3, 3))
    with pytest.raises(ValueError, match=r"rank must be in \[1, 4\]"):
        nearest_kronecker(W, (2, 2), rank=5)  # rearranged matrix is 4 x 30
    with pytest.raises(ValueError, match="2-D"):
        nearest_kronecker(torch.randn(2, 3, 4), (1, 1))


SHAPES = [  # (in, out, a_shape, rank)
    (12, 20, (4, 3), 1),
    (12, 20, (4, 3), 2),
    (30, 8, (2, 5), 3),
    (16, 16, (1, 4), 1),
    (64, 48, (8, 16), 2),
    (12, 24, (6, 12), 2),  # B with one column: a_first_t
]


@pytest.mark.parametrize("order", KRONECKER_ORDERS + ("auto",))
@pytest.mark.parametrize("n_in,n_out,a_shape,rank", SHAPES)
@pytest.mark.parametrize("lead", [(5,), (2, 3), (1, 1, 4)])
def test_linear_matches_dense_values_and_gradients(order, n_in, n_out, a_shape, rank, lead):
    torch.manual_seed(0)
    k = KroneckerLinear(n_in, n_out, a_shape, rank=rank, order=order).double()
    with torch.no_grad():
        k.bias.normal_()
    d = k.to_dense()
    x = torch.randn(*lead, n_in, dtype=F64, requires_grad=True)
    xd = x.detach().clone().requires_grad_(True)
    y, yd = k(x), d(xd)
    assert y.shape == (*lead, n_out)
    assert (y - yd).abs().max() < 1e-10
    g = torch.randn_like(y)
    y.backward(g)
    yd.backward(g)
    assert (x.grad - xd.grad).abs().max() < 1e-10
    # factor gradients by the chain rule through the dense weight W = Σ A_r ⊗ B_r
    A = k.A.detach().clone().requires_grad_(True)
    B = k.B.detach().clone().requires_grad_(True)
    W = kronecker_to_dense(A, B)
    W.backward(d.weight.grad)
    assert (k.A.grad - A.grad).abs().max() < 1e-10
    assert (k.B.grad - B.grad).abs().max() < 1e-10
    assert (k.bias.grad - d.bias.grad).abs().max() < 1e-10


def test_both_orders_agree_on_a_large_batch():
    A, B = random_factors(2, (6, 2), (64, 48))
    x = torch.randn(3, 7, 96, dtype=F64)
    ref = x @ kronecker_to_dense(A, B).T
    for order in KRONECKER_ORDERS + ("auto",):
        assert (kronecker_matmul(x, A, B, order) - ref).abs().max() < 1e-10


def test_forward_never_builds_the_dense_weight(monkeypatch):
    k = KroneckerLinear(16, 24, (4, 4))
    called = []
    monkeypatch.setattr(torch, "kron", lambda *a: called.append(1))
    monkeypatch.setattr("kn_transformers.core.layers.kronecker_to_dense", lambda *a: called.append(1))
    k(torch.randn(3, 16)).sum().backward()
    KroneckerEmbedding(10, 6, (5, 3))(torch.tensor([[1, 2]])).sum().backward()
    assert not called


@pytest.mark.parametrize("rank", [1, 2])
def test_from_dense_linear_and_conv1d_give_the_same_function(rank):
    A, B = random_factors(rank, (3, 4), (5, 2))
    W = kronecker_to_dense(A, B)  # (15, 8): exactly Kronecker
    lin = nn.Linear(8, 15).double()
    conv = Conv1D(15, 8).double()
    with torch.no_grad():
        lin.weight.copy_(W)
        conv.weight.copy_(W.T)  # Conv1D stores in × out
        lin.bias.normal_()
        conv.bias.copy_(lin.bias)
    x = torch.randn(4, 2, 8, dtype=F64)
    k_lin = KroneckerLinear.from_dense(lin, (3, 4), rank=rank)
    k_conv = KroneckerLinear.from_dense(conv, (3, 4), rank=rank)
    for k in (k_lin, k_conv):
        assert (k(x) - lin(x)).abs().max() < 1e-10
        assert (k(x) - conv(x)).abs().max() < 1e-10
    assert torch.equal(k_lin.bias, lin.bias)


def test_from_dense_normalize_restores_the_norm():
    lin = nn.Linear(32, 24).double()
    k = KroneckerLinear.from_dense(lin, (4, 4), rank=2)
    kn = KroneckerLinear.from_dense(lin, (4, 4), rank=2, normalize=True)
    assert kronecker_to_dense(k.A, k.B).norm() < lin.weight.norm() * 0.99
    assert abs(kronecker_to_dense(kn.A, kn.B).norm() - lin.weight.norm()) < 1e-10
    # same direction, only rescaled
    cos = torch.nn.functional.cosine_similarity(k.weight.flatten(), kn.weight.flatten(), dim=0)
    assert abs(cos - 1) < 1e-12


def test_from_dense_rejects_other_modules_and_bad_shapes():
    with pytest.raises(TypeError, match="nn.Linear or transformers' Conv1D"):
        KroneckerLinear.from_dense(nn.Conv2d(2, 2, 1), (1, 1))
    with pytest.raises(ValueError, match=r"a_shape \(3, 2\) does not divide"):
        KroneckerLinear(8, 16, (3, 2))
    with pytest.raises(ValueError, match="rank"):
        KroneckerLinear(8, 16, (2, 2), rank=0)
    with pytest.raises(ValueError, match="order"):
        KroneckerLinear(8, 16, (2, 2), order="fast")


def test_default_init_has_linear_scale():
    k = KroneckerLinear(768, 768, (32, 16), rank=2)
    std = k.weight.std().item()
    assert 0.5 < std * (3 * 768) ** 0.5 < 2


@pytest.mark.parametrize(
    "vocab,dim,a_shape,rank,padding_idx",
    [
        (20, 6, (5, 3), 1, None),  # exact split 5 x 4
        (23, 6, (5, 2), 2, 0),  # prime vocabulary: padded to 25 rows
        (29 * 7, 8, (29, 4), 1, None),  # the GPT-2-like split 29 x 7
        (50, 12, (50, 6), 1, 3),  # the papers' split: B is 1 x f
    ],
)
def test_embedding_matches_dense_values_and_gradients(vocab, dim, a_shape, rank, padding_idx):
    torch.manual_seed(0)
    e = KroneckerEmbedding(vocab, dim, a_shape, rank=rank, padding_idx=padding_idx).double()
    d = e.to_dense()
    assert d.weight.shape == (vocab, dim)
    ids = torch.randint(0, vocab, (3, 7))
    ids[0, 0] = vocab - 1
    if padding_idx is not None:
        ids[1, 2] = padding_idx
    y, yd = e(ids), d(ids)
    assert y.shape == (3, 7, dim)
    assert (y - yd).abs().max() < 1e-10
    g = torch.randn_like(y)
    y.backward(g)
    yd.backward(g)
    A = e.A.detach().clone().requires_grad_(True)
    B = e.B.detach().clone().requires_grad_(True)
    table = kronecker_to_dense(A, B)[:vocab]
    if padding_idx is not None:
        table = table.index_fill(0, torch.tensor([padding_idx]), 0.0)
    table.backward(d.weight.grad)
    assert (e.A.grad - A.grad).abs().max() < 1e-10
    assert (e.B.grad - B.grad).abs().max() < 1e-10
    # the factored output head: hidden @ E^T, padded rows dropped
    h = torch.randn(2, 5, dim, dtype=F64)
    logits = e.logits(h)
    assert logits.shape == (2, 5, vocab)
    assert (logits - h @ d.weight.T).abs().max() < 1e-10


def test_embedding_padding_rows_never_leak():
    e = KroneckerEmbedding(23, 6, (5, 2)).double()  # 25 rows, 2 of padding
    assert e.num_rows == 25
    with torch.no_grad():
        e.B[:, -1].fill_(1e6)  # rows 20..24 share B's last row; 23, 24 are padding
    h = torch.randn(4, 6, dtype=F64)
    logits = e.logits(h)
    assert logits.shape == (4, 23)
    assert (logits - h @ e.weight.T).abs().max() < 1e-6


def test_embedding_from_dense_exact_and_padded():
    A, B = random_factors(1, (4, 3), (5, 2))
    table = kronecker_to_dense(A, B)  # 20 x 6
    emb = nn.Embedding(20, 6).double()
    with torch.no_grad():
        emb.weight.copy_(table)
    e = KroneckerEmbedding.from_dense(emb, (4, 3))
    ids = torch.arange(20)
    assert (e(ids) - emb(ids)).abs().max() < 1e-10
    # a vocabulary that does not divide: fitted with zero padding, lookups stay in range
    emb2 = nn.Embedding(19, 6, padding_idx=1).double()
    e2 = KroneckerEmbedding.from_dense(emb2, (4, 3), rank=2)
    assert e2.padding_idx == 1 and e2.num_rows == 20
    assert e2(torch.arange(19)).shape == (19, 6)
    assert torch.equal(e2(torch.tensor([1])), torch.zeros(1, 6, dtype=F64))
    err = (e2.weight - emb2.weight).norm() / emb2.weight.norm()
    assert err < 1


def test_embedding_bad_shapes():
    with pytest.raises(ValueError, match="n1 dividing 6"):
        KroneckerEmbedding(10, 6, (5, 4))
    with pytest.raises(ValueError, match=r"1 <= m1 <= 10"):
        KroneckerEmbedding(10, 6, (11, 3))
    with pytest.raises(ValueError, match="padding_idx"):
        KroneckerEmbedding(10, 6, (5, 3), padding_idx=10)
    with pytest.raises(TypeError, match="nn.Embedding"):
        KroneckerEmbedding.from_dense(nn.Linear(2, 2), (1, 1))


def test_factor_choices_are_valid_and_the_pick_is_deterministic():
    choices = kronecker_factor_choices(768, 3072, ranks=(1, 2))
    assert choices, "a 768x3072 matrix has many splits"
    for c in choices[:50] + choices[-50:]:
        (m1, n1), (m2, n2) = c.a_shape, c.b_shape
        assert m1 * m2 == 768 and n1 * n2 == 3072
        assert c.params == c.rank * (m1 * n1 + m2 * n2) < 768 * 3072
        assert c.flop_ratio == pytest.approx(768 * 3072 / c.flops)
        assert c.flops == min(kronecker_flops(m1, n1, m2, n2, c.rank))
    pick = choose_kronecker_factors(768, 3072, target_fraction=0.25)
    assert pick == choose_kronecker_factors(768, 3072, target_fraction=0.25)
    # the closest to the budget in ratio (25.0002% here: A 2x2 and A 1x4 tie on parameters,
    # the FLOP count decides)
    assert pick.params == 4 + 768 * 3072 // 4
    tied = [c for c in kronecker_factor_choices(768, 3072) if c.params == pick.params]
    assert len(tied) > 1 and pick.flops == min(c.flops for c in tied)
    import math
    dist = lambda c: abs(math.log(c.params / (0.25 * 768 * 3072)))  # noqa: E731
    assert all(dist(pick) <= dist(c) + 1e-9 for c in kronecker_factor_choices(768, 3072))
    capped = kronecker_factor_choices(768, 3072, max_fraction=0.25)
    assert capped and all(c.params <= 0.25 * 768 * 3072 for c in capped)
    with pytest.raises(ValueError, match="keep it dense"):
        choose_kronecker_factors(2, 1, target_fraction=0.5)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        choose_kronecker_factors(4, 4, target_fraction=1.5)


def test_default_path_under_autocast_func_and_compile():
    """The default forward is plain PyTorch: bf16 autocast (what CPU supports), forward-mode and
    functional transforms, and torch.compile with fullgraph all go through it."""
    torch.manual_seed(0)
    k = KroneckerLinear(96, 64, (8, 8))
    x = torch.randn(2, 5, 96)
    ref = k.to_dense()(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = k(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())
    params = dict(k.named_parameters())
    v = torch.randn_like(x)
    with torch.no_grad():  # forward-mode derivatives need no autograd graph
        _, tangent = torch.func.jvp(lambda t: torch.func.functional_call(k, params, (t,)), (x,), (v,))
    torch.testing.assert_close(tangent, v @ k.weight.T, rtol=1e-5, atol=1e-5 * tangent.abs().max().item())
    grads = torch.func.grad(lambda p: torch.func.functional_call(k, p, (x,)).square().sum())(params)
    assert grads["A"].shape == k.A.shape and torch.isfinite(grads["A"]).all()
    compiled = torch.compile(k, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), k(x), rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_embedding_refuses_ids_outside_the_vocabulary():
    """101 rows as A 10x8: the table has 110 rows, and ids 101-109 (or -1, aliasing 109) would
    silently return padding rows; nn.Embedding raises, and so must this."""
    e = KroneckerEmbedding(101, 64, a_shape=(10, 8))
    assert e.num_rows == 110
    e(torch.tensor([0, 100]))
    for bad in (-1, 101, 105, 109):
        with pytest.raises(IndexError, match="outside"):
            e(torch.tensor([3, bad]))
    with pytest.raises(TypeError, match="integer"):
        e(torch.tensor([1.0]))
    compiled = torch.compile(e, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(torch.tensor([4, 7])), e(torch.tensor([4, 7])))
    with pytest.raises(RuntimeError, match="must be in"):
        compiled(torch.tensor([4, 109]))
