"""The math of Kronecker-factored matrices: the nearest Kronecker product, the dense product,
norms and FLOP counts.

A weight ``W`` of shape ``(m, n)`` is represented as ``Σ_r A_r ⊗ B_r`` with ``A_r`` of shape
``(m1, n1)`` and ``B_r`` of shape ``(m2, n2)``, ``m = m1*m2`` and ``n = n1*n2``. This module
imports torch only, so that it travels next to the modeling files that ``save_pretrained`` copies
for ``trust_remote_code``.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

__all__ = ["nearest_kronecker", "kronecker_to_dense", "kronecker_flops", "normalize_kronecker"]

ShapeLike = Union[Sequence[int], torch.Size]


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


def normalize_kronecker(A: torch.Tensor, B: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` and ``B`` scaled alike so that ``‖Σ A_r⊗B_r‖_F = ‖W‖_F`` (Krony-PT's adaptive
    normalisation: a truncated product keeps less norm than ``W``)."""
    norm = _kronecker_norm(A.double(), B.double())
    if norm == 0:
        return A, B
    scale = (W.detach().double().norm() / norm).sqrt().to(A.dtype)
    return A * scale, B * scale
