"""Kronecker-product layers and the nearest-Kronecker-product decomposition.

A weight ``W`` of shape ``(m, n)`` is represented as ``sum_r A_r ⊗ B_r`` with
``A_r`` of shape ``(m1, n1)`` and ``B_r`` of shape ``(m2, n2)``, ``m = m1*m2`` and
``n = n1*n2``. Such a matrix never needs to be built: for an input ``x`` viewed as
``X`` of shape ``(n1, n2)``, ``(A ⊗ B) x = vec(A X Bᵀ)`` (row-major ``vec``), i.e.
two small matrix products instead of one large one.

This module imports torch only, so that it can travel next to the modeling files
when a model is saved with its code (``trust_remote_code``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

__all__ = [
    "nearest_kronecker",
    "kronecker_to_dense",
    "kronecker_matmul",
    "kronecker_flops",
    "set_kronecker_autotune",
    "KroneckerLinear",
    "KroneckerEmbedding",
    "FactorChoice",
    "kronecker_factor_choices",
    "choose_kronecker_factors",
]

ShapeLike = Union[Sequence[int], torch.Size]


# ----------------------------------------------------------------------------------------
# The math
# ----------------------------------------------------------------------------------------


def _check_split(m: int, n: int, a_shape: ShapeLike, what: str = "weight") -> tuple[int, int, int, int]:
    if len(a_shape) != 2:
        raise ValueError(f"a_shape must be (m1, n1), got {tuple(a_shape)!r}")
    m1, n1 = int(a_shape[0]), int(a_shape[1])
    if m1 <= 0 or n1 <= 0 or m % m1 or n % n1:
        raise ValueError(
            f"a_shape {(m1, n1)} does not divide the {what} shape {(m, n)}: "
            f"m1 must divide {m} and n1 must divide {n}"
        )
    return m1, n1, m // m1, n // n1


def _rearrange(weight: torch.Tensor, m1: int, n1: int, m2: int, n2: int) -> torch.Tensor:
    """Van Loan–Pitsianis rearrangement: R[(i1,j1),(i2,j2)] = W[i1*m2+i2, j1*n2+j2]."""
    return weight.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


def nearest_kronecker(
    weight: torch.Tensor,
    a_shape: ShapeLike,
    rank: int = 1,
    dtype: torch.dtype = torch.float64,
    return_singular_values: bool = False,
):
    """Factors ``A`` (rank, m1, n1) and ``B`` (rank, m2, n2) minimising ``‖W − Σ A_r⊗B_r‖_F``.

    The optimum is the truncated SVD of the rearranged weight (Van Loan & Pitsianis, 1993):
    ``A_r = √σ_r u_r`` and ``B_r = √σ_r v_r``, reshaped. The Frobenius error equals the norm
    of the discarded singular values. Signs are made deterministic: the entry of largest
    magnitude of each ``u_r`` is positive.

    Args:
        weight: ``(m, n)`` matrix (``nn.Linear`` layout, out × in).
        a_shape: ``(m1, n1)``; ``m1`` must divide ``m`` and ``n1`` must divide ``n``.
        rank: number of Kronecker terms; at most ``min(m1*n1, m2*n2)``.
        dtype: precision of the SVD (``torch.float64`` or ``torch.float32``); the factors are
            returned in ``weight.dtype``.
        return_singular_values: also return all singular values of the rearranged matrix.
    """
    if weight.dim() != 2:
        raise ValueError(f"nearest_kronecker expects a 2-D weight, got shape {tuple(weight.shape)}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    m, n = weight.shape
    m1, n1, m2, n2 = _check_split(m, n, a_shape)
    max_rank = min(m1 * n1, m2 * n2)
    if not isinstance(rank, int) or rank < 1 or rank > max_rank:
        raise ValueError(
            f"rank {rank} is not possible for a_shape {(m1, n1)} and B shape {(m2, n2)}: "
            f"the rearranged matrix is {m1 * n1}x{m2 * n2}, so rank must be in [1, {max_rank}]"
        )
    R = _rearrange(weight.detach().to(dtype), m1, n1, m2, n2)
    U, S, Vh = torch.linalg.svd(R, full_matrices=False)
    U, S, Vh = U[:, :rank], S, Vh[:rank]
    # deterministic signs: the largest-magnitude entry of each left vector is positive
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U[idx, torch.arange(rank)])
    signs[signs == 0] = 1
    U = U * signs
    Vh = Vh * signs[:, None]
    root = S[:rank].sqrt()
    A = (U * root).T.reshape(rank, m1, n1).to(weight.dtype).contiguous()
    B = (Vh * root[:, None]).reshape(rank, m2, n2).to(weight.dtype).contiguous()
    if return_singular_values:
        return A, B, S.to(weight.dtype)
    return A, B


def kronecker_to_dense(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``Σ_r A_r ⊗ B_r`` as a dense ``(m1*m2, n1*n2)`` matrix (for tests and export only)."""
    r, m1, n1 = A.shape
    _, m2, n2 = B.shape
    W = torch.einsum("rij,rkl->ikjl", A, B)
    return W.reshape(m1 * m2, n1 * n2)


def _kronecker_norm(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``‖Σ_r A_r ⊗ B_r‖_F`` from the factors alone: Σ_rs <A_r,A_s><B_r,B_s>."""
    a = A.reshape(A.shape[0], -1)
    b = B.reshape(B.shape[0], -1)
    return ((a @ a.T) * (b @ b.T)).sum().clamp_min(0).sqrt()


def kronecker_flops(m1: int, n1: int, m2: int, n2: int, rank: int = 1) -> tuple[int, int]:
    """Multiply-adds per input row of the two contraction orders ``(b_first, a_first)``.

    ``b_first``: ``T = X Bᵀ`` (n1·n2·m2) then ``A T`` (m1·n1·m2);
    ``a_first``: ``T = A X`` (m1·n1·n2) then ``T Bᵀ`` (m1·n2·m2). Each times ``rank``.
    """
    b_first = rank * (n1 * n2 * m2 + m1 * n1 * m2)
    a_first = rank * (m1 * n1 * n2 + m1 * n2 * m2)
    return b_first, a_first


def kronecker_matmul(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, order: str = "auto") -> torch.Tensor:
    """``x @ (Σ_r A_r ⊗ B_r)ᵀ`` without building the product.

    Args:
        x: ``(..., n1*n2)``.
        A: ``(rank, m1, n1)``; B: ``(rank, m2, n2)``.
        order: ``"b_first"``, ``"a_first"`` or ``"auto"`` (the faster, timed once per shape).

    Returns:
        ``(..., m1*m2)``.

    Both orders are one flat matrix product against the factor acting on the contiguous
    axis and one broadcast product with the other; the rank is folded into the inner
    dimension of the second product, so a sum of terms costs two matmuls, not 2·rank.
    """
    r, m1, n1 = A.shape
    _, m2, n2 = B.shape
    lead = x.shape[:-1]
    if x.shape[-1] != n1 * n2:
        raise ValueError(f"input has {x.shape[-1]} features, the Kronecker factors expect {n1 * n2}")
    N = x.numel() // (n1 * n2)
    if order == "auto":
        order = _pick_order(x, A, B, N)
    if order == "b_first":
        # (N*n1, n2) @ (n2, r*m2) -> (N, n1, r, m2) == (N, n1*r, m2) ; (m1, n1*r) @ that -> (N, m1, m2)
        b_stack = B.reshape(r * m2, n2).T
        t = x.reshape(N * n1, n2) @ b_stack
        a_cat = A.permute(1, 2, 0).reshape(m1, n1 * r)
        y = torch.matmul(a_cat, t.reshape(N, n1 * r, m2))
    elif order == "a_first":
        # (m1*r, n1) @ (N, n1, n2) -> (N, m1*r, n2) == (N*m1, r*n2) ; @ (r*n2, m2) -> (N*m1, m2)
        a_stack = A.permute(1, 0, 2).reshape(m1 * r, n1)
        t = torch.matmul(a_stack, x.reshape(N, n1, n2))
        b_cat = B.permute(0, 2, 1).reshape(r * n2, m2)
        y = t.reshape(N * m1, r * n2) @ b_cat
    else:
        raise ValueError(f"order must be 'auto', 'b_first' or 'a_first', got {order!r}")
    return y.reshape(*lead, m1 * m2)


# Which contraction order is faster depends on the shapes and the matmul kernels more than
# on FLOPs (up to 2x off): "auto" times both once per (shapes, rows rounded up to a power of
# two, dtype, device) and remembers the winner. Both orders compute the same product.
_ORDER_CACHE: dict = {}
_AUTOTUNE = True


def set_kronecker_autotune(enabled: bool) -> None:
    """Turn timing-based order selection on (default) or off (then the FLOP count decides)."""
    global _AUTOTUNE
    _AUTOTUNE = bool(enabled)
    _ORDER_CACHE.clear()


def _flop_order(A: torch.Tensor, B: torch.Tensor) -> str:
    fb, fa = kronecker_flops(A.shape[1], A.shape[2], B.shape[1], B.shape[2], A.shape[0])
    return "b_first" if fb <= fa else "a_first"


def _pick_order(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, rows: int) -> str:
    if not _AUTOTUNE or rows == 0 or x.device.type == "meta" or torch.compiler.is_compiling():
        return _flop_order(A, B)
    bucket = 1 << max(rows - 1, 0).bit_length()
    key = (tuple(A.shape), tuple(B.shape), bucket, x.dtype, x.device.type)
    order = _ORDER_CACHE.get(key)
    if order is None:
        order = _ORDER_CACHE[key] = _time_orders(A.detach(), B.detach(), bucket, x.dtype, x.device)
    return order


def _time_orders(A, B, rows, dtype, device) -> str:
    n = A.shape[2] * B.shape[2]
    x = torch.ones(rows, n, dtype=dtype, device=device)  # no RNG draw: training stays reproducible
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {}
    with torch.no_grad():
        for order in ("b_first", "a_first"):
            kronecker_matmul(x, A, B, order)  # warm-up
            runs = []
            for _ in range(3):
                sync()
                t0 = time.perf_counter()
                kronecker_matmul(x, A, B, order)
                sync()
                runs.append(time.perf_counter() - t0)
            times[order] = sorted(runs)[1]
    flop_order = _flop_order(A, B)
    other = "a_first" if flop_order == "b_first" else "b_first"
    # keep the FLOP choice unless the other order is clearly (5%) faster
    return other if times[other] < 0.95 * times[flop_order] else flop_order


# ----------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of an ``nn.Linear`` or of transformers' ``Conv1D`` (stored in×out)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx"):
        return module.weight.T
    raise TypeError(
        f"from_dense expects nn.Linear or transformers' Conv1D, got {type(module).__name__}"
    )


class KroneckerLinear(nn.Module):
    """A linear map whose weight is ``Σ_r A_r ⊗ B_r``: ``y = x (Σ_r A_r⊗B_r)ᵀ + b``.

    Args:
        in_features: ``n = n1*n2``.
        out_features: ``m = m1*m2``.
        a_shape: ``(m1, n1)``, the shape of each ``A_r``; ``B_r`` is ``(m/m1, n/n1)``.
        rank: number of Kronecker terms summed.
        bias: learn an additive bias of size ``out_features``.
        order: contraction order, ``"auto"`` (timed once per shape), ``"b_first"`` or ``"a_first"``.

    Parameters ``A`` (rank, m1, n1) and ``B`` (rank, m2, n2). The forward accepts any
    number of leading dimensions and never materialises the ``(m, n)`` weight.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        a_shape: ShapeLike,
        rank: int = 1,
        bias: bool = True,
        order: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        m1, n1, m2, n2 = _check_split(out_features, in_features, a_shape, "(out_features, in_features)")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        if order not in ("auto", "b_first", "a_first"):
            raise ValueError(f"order must be 'auto', 'b_first' or 'a_first', got {order!r}")
        self.in_features, self.out_features = in_features, out_features
        self.a_shape, self.b_shape, self.rank = (m1, n1), (m2, n2), rank
        factory = {"device": device, "dtype": dtype}
        self.A = nn.Parameter(torch.empty(rank, m1, n1, **factory))
        self.B = nn.Parameter(torch.empty(rank, m2, n2, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.order = order
        self.reset_parameters()

    def reset_parameters(self, std: Optional[float] = None) -> None:
        """Random init whose product has the variance of ``nn.Linear``'s (or entries of std ``std``).

        Entries of ``Σ A_r⊗B_r`` have variance ``rank·σ_A²·σ_B²``; the factors get equal std.
        """
        if self.A.is_meta:
            return
        target = std if std is not None else 1.0 / math.sqrt(3 * self.in_features)
        s = math.sqrt(target / math.sqrt(self.rank))
        with torch.no_grad():
            nn.init.normal_(self.A, std=s)
            nn.init.normal_(self.B, std=s)
            if self.bias is not None:
                self.bias.zero_()

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(out, in)`` weight, built on demand (for inspection, never in forward)."""
        return kronecker_to_dense(self.A, self.B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = kronecker_matmul(x, self.A, self.B, self.order)
        if self.bias is not None:
            y = y + self.bias
        return y

    @classmethod
    def from_dense(
        cls, module: nn.Module, a_shape: ShapeLike, rank: int = 1, normalize: bool = False, svd_dtype=torch.float64
    ) -> "KroneckerLinear":
        """The nearest Kronecker layer to ``module`` (``nn.Linear`` or ``Conv1D``); bias copied.

        ``normalize=True`` rescales both factors so that ``‖Σ A_r⊗B_r‖_F = ‖W‖_F``
        (Krony-PT's adaptive normalisation: the truncated product keeps less norm than ``W``).
        """
        W = _dense_weight(module)
        out_f, in_f = W.shape
        has_bias = getattr(module, "bias", None) is not None
        layer = cls(in_f, out_f, a_shape, rank=rank, bias=has_bias, device=W.device, dtype=W.dtype)
        A, B = nearest_kronecker(W, a_shape, rank=rank, dtype=svd_dtype)
        if normalize:
            A, B = _normalize(A, B, W)
        with torch.no_grad():
            layer.A.copy_(A)
            layer.B.copy_(B)
            if has_bias:
                layer.bias.copy_(module.bias)
        return layer

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` computing the same function."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.A.device, dtype=self.A.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, a_shape={self.a_shape}, "
            f"b_shape={self.b_shape}, rank={self.rank}, bias={self.bias is not None}, order={self.order!r}"
        )


def _normalize(A: torch.Tensor, B: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    norm = _kronecker_norm(A.double(), B.double())
    if norm == 0:
        return A, B
    scale = (W.detach().double().norm() / norm).sqrt().to(A.dtype)
    return A * scale, B * scale


class KroneckerEmbedding(nn.Module):
    """An embedding table ``E = Σ_r A_r ⊗ B_r`` looked up row by row, never built.

    Row ``i`` is ``Σ_r kron(A_r[i // m2], B_r[i % m2])``. The table has ``m1*m2 >= num_embeddings``
    rows: a vocabulary that does not factor as wanted (GPT-2's 50,257 = 29 × 1,733; a prime)
    is padded with rows that no id reaches and that :meth:`logits` drops.

    Args:
        num_embeddings: vocabulary size ``V``.
        embedding_dim: ``d = n1*n2``.
        a_shape: ``(m1, n1)``; ``n1`` must divide ``d``; ``m2 = ceil(V / m1)``.
            The papers' split is ``(V, d // f)``, i.e. ``B`` of shape ``(1, f)``.
        rank: number of Kronecker terms.
        padding_idx: as ``nn.Embedding``: that row's output is zero and gets no gradient.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        a_shape: ShapeLike,
        rank: int = 1,
        padding_idx: Optional[int] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if len(a_shape) != 2:
            raise ValueError(f"a_shape must be (m1, n1), got {tuple(a_shape)!r}")
        m1, n1 = int(a_shape[0]), int(a_shape[1])
        if m1 <= 0 or m1 > num_embeddings or n1 <= 0 or embedding_dim % n1:
            raise ValueError(
                f"a_shape {(m1, n1)} does not fit an embedding of {num_embeddings}x{embedding_dim}: "
                f"need 1 <= m1 <= {num_embeddings} and n1 dividing {embedding_dim}"
            )
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        if padding_idx is not None:
            if padding_idx < 0:
                padding_idx += num_embeddings
            if not 0 <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx {padding_idx} is outside [0, {num_embeddings})")
        m2 = -(-num_embeddings // m1)
        n2 = embedding_dim // n1
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.a_shape, self.b_shape, self.rank = (m1, n1), (m2, n2), rank
        self.padding_idx = padding_idx
        self.num_rows = m1 * m2  # rows of the (padded) Kronecker table
        factory = {"device": device, "dtype": dtype}
        self.A = nn.Parameter(torch.empty(rank, m1, n1, **factory))
        self.B = nn.Parameter(torch.empty(rank, m2, n2, **factory))
        self.order = "auto"
        self.reset_parameters()

    def reset_parameters(self, std: float = 1.0) -> None:
        """Random init whose rows have entries of std ``std`` (``nn.Embedding`` uses 1)."""
        if self.A.is_meta:
            return
        s = math.sqrt(std / math.sqrt(self.rank))
        with torch.no_grad():
            nn.init.normal_(self.A, std=s)
            nn.init.normal_(self.B, std=s)

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(num_embeddings, embedding_dim)`` table, built on demand."""
        W = kronecker_to_dense(self.A, self.B)[: self.num_embeddings]
        if self.padding_idx is not None:
            W = W.index_fill(0, torch.tensor([self.padding_idx], device=W.device), 0.0)
        return W

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        m2 = self.b_shape[0]
        i1 = torch.div(input_ids, m2, rounding_mode="floor")
        i2 = input_ids - i1 * m2
        if self.rank == 1:
            a = self.A[0][i1]  # (..., n1)
            b = self.B[0][i2]  # (..., n2)
            out = (a.unsqueeze(-1) * b.unsqueeze(-2)).flatten(-2)
        else:
            a = self.A.permute(1, 0, 2)[i1]  # (..., r, n1)
            b = self.B.permute(1, 0, 2)[i2]  # (..., r, n2)
            out = torch.matmul(a.transpose(-1, -2), b).flatten(-2)
        if self.padding_idx is not None:
            out = out.masked_fill((input_ids == self.padding_idx).unsqueeze(-1), 0.0)
        return out

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``hidden_states @ Eᵀ`` computed factored: ``(..., d) -> (..., num_embeddings)``.

        For an output head tied to this embedding: costs two small matmuls instead of a
        ``V × d`` one, and the padded rows are dropped.
        """
        out = kronecker_matmul(hidden_states, self.A, self.B, self.order)[..., : self.num_embeddings]
        if self.padding_idx is not None:
            out = out.index_fill(-1, torch.tensor([self.padding_idx], device=out.device), 0.0)
        return out

    @classmethod
    def from_dense(
        cls,
        module: nn.Embedding,
        a_shape: ShapeLike,
        rank: int = 1,
        normalize: bool = False,
        svd_dtype=torch.float64,
    ) -> "KroneckerEmbedding":
        """The nearest Kronecker table to ``module.weight``; padded rows are fitted as zeros."""
        if not isinstance(module, nn.Embedding):
            raise TypeError(f"from_dense expects nn.Embedding, got {type(module).__name__}")
        W = module.weight
        V, d = W.shape
        layer = cls(V, d, a_shape, rank=rank, padding_idx=module.padding_idx, device=W.device, dtype=W.dtype)
        padded = W.detach()
        if layer.num_rows > V:
            padded = torch.cat([padded, padded.new_zeros(layer.num_rows - V, d)])
        A, B = nearest_kronecker(padded, layer.a_shape, rank=rank, dtype=svd_dtype)
        if normalize:
            A, B = _normalize(A, B, W)
        with torch.no_grad():
            layer.A.copy_(A)
            layer.B.copy_(B)
        return layer

    def to_dense(self) -> nn.Embedding:
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                           device=self.A.device, dtype=self.A.dtype)
        with torch.no_grad():
            emb.weight.copy_(self.weight)
        return emb

    def extra_repr(self) -> str:
        s = (f"{self.num_embeddings}, {self.embedding_dim}, a_shape={self.a_shape}, b_shape={self.b_shape}, "
             f"rank={self.rank}")
        if self.num_rows != self.num_embeddings:
            s += f", padded_rows={self.num_rows - self.num_embeddings}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        return s


# ----------------------------------------------------------------------------------------
# Choosing factor shapes
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FactorChoice:
    """One way to factor an ``(out, in)`` matrix: ``A`` is ``a_shape``, ``B`` is ``b_shape``."""

    a_shape: tuple[int, int]
    b_shape: tuple[int, int]
    rank: int
    params: int  # factor parameters, bias excluded
    flops: int  # multiply-adds per input row, cheaper contraction order
    fraction: float  # params / (out * in)

    @property
    def flop_ratio(self) -> float:
        """Dense multiply-adds over Kronecker multiply-adds, per row."""
        m = self.a_shape[0] * self.b_shape[0]
        n = self.a_shape[1] * self.b_shape[1]
        return m * n / self.flops


def _divisors(k: int) -> list[int]:
    return [d for d in range(1, k + 1) if k % d == 0]


def kronecker_factor_choices(
    out_features: int, in_features: int, ranks: Iterable[int] = (1,), max_fraction: Optional[float] = None
) -> list[FactorChoice]:
    """Every valid ``(a_shape, rank)`` for an ``(out, in)`` matrix, with parameters and FLOPs.

    Trivial splits (``A`` or ``B`` of shape 1×1) are left out, as are ranks above the
    rearranged matrix's rank and choices with at least as many parameters as the dense
    matrix. ``max_fraction`` keeps only choices with ``params <= max_fraction * out * in``.
    Sorted by parameters, descending, then FLOPs, then ``a_shape``.
    """
    dense = out_features * in_features
    out = []
    for m1 in _divisors(out_features):
        for n1 in _divisors(in_features):
            m2, n2 = out_features // m1, in_features // n1
            if m1 * n1 == 1 or m2 * n2 == 1:
                continue
            for r in ranks:
                if r < 1 or r > min(m1 * n1, m2 * n2):
                    continue
                params = r * (m1 * n1 + m2 * n2)
                if params >= dense or (max_fraction is not None and params > max_fraction * dense):
                    continue
                flops = min(kronecker_flops(m1, n1, m2, n2, r))
                out.append(FactorChoice((m1, n1), (m2, n2), r, params, flops, params / dense))
    out.sort(key=lambda c: (-c.params, c.flops, c.a_shape, c.rank))
    return out


def choose_kronecker_factors(
    out_features: int, in_features: int, target_fraction: float, ranks: Iterable[int] = (1,)
) -> FactorChoice:
    """The deterministic pick for a target parameter fraction.

    The choice whose parameter count is closest to ``target_fraction`` of the dense matrix
    (in ratio: 0.5x and 2x the target are equally far); ties go to fewer FLOPs, then to the
    smaller ``a_shape`` and rank. Use :func:`kronecker_factor_choices` with ``max_fraction``
    for a hard cap instead.
    """
    if not 0 < target_fraction < 1:
        raise ValueError(f"target_fraction must be in (0, 1), got {target_fraction}")
    choices = kronecker_factor_choices(out_features, in_features, ranks)
    if not choices:
        raise ValueError(
            f"a {out_features}x{in_features} matrix has no Kronecker split with fewer parameters "
            f"than the dense matrix for ranks {tuple(ranks)}; keep it dense"
        )
    target = target_fraction * out_features * in_features
    return min(choices, key=lambda c: (round(abs(math.log(c.params / target)), 9), c.flops, c.a_shape, c.rank))
