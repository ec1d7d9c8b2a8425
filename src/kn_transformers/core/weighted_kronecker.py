"""Activation-aware Kronecker factors: ``Σ_r A_r ⊗ B_r`` minimising the layer's *output* error.

For a linear layer with inputs ``x`` (columns of ``X``) the error that matters downstream is
``‖(W − Σ_r A_r⊗B_r) X‖_F² = tr(E C Eᵀ)`` with ``E = W − Ŵ`` and ``C = X Xᵀ`` (``n × n``, streamed
by :mod:`.calibration`), not the papers' ``‖W − Ŵ‖_F``. Two solvers:

* :func:`kronecker_whitened`: the closed form when ``C`` is (approximated by) a Kronecker product
  ``C₁⊗C₂``: with ``Cᵢ = LᵢLᵢᵀ`` the mixed-product rule gives ``(W − A⊗B)(L₁⊗L₂) = W(L₁⊗L₂) −
  (AL₁)⊗(BL₂)``, so the truncated SVD of the rearranged ``W(L₁⊗L₂)`` is the exact optimum.
* :func:`weighted_nearest_kronecker`: alternating least squares on the exact objective. With ``B``
  fixed the objective is quadratic in ``A`` and every row of ``A`` solves the same ``(r·n1)²``
  normal equations, built from ``C`` contracted with ``B_rᵀB_s``; likewise for ``B``. Each step
  cannot increase the objective, so started from the better of the plain SVD and the whitened
  closed form, the result is never worse than either.

Damping: ``C + δ·mean(diag C)·I`` (GPTQ's ``percdamp``) makes the normal equations well posed
when the calibration tokens do not span the input space; it is the objective
``‖E X‖² + δ'‖E‖²``, a blend with the papers' objective (``δ → ∞`` gives the plain SVD back).

Imports torch only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .kronecker_math import _check_split, _rearrange, nearest_kronecker

__all__ = ["damped", "weighted_error", "kronecker_whitened", "weighted_nearest_kronecker", "WeightedFit",
           "row_weighted_nearest_kronecker"]


def damped(C: torch.Tensor, damping: float) -> torch.Tensor:
    """``C + damping·mean(diag C)·I`` in float64 (``damping`` relative, as GPTQ's ``percdamp``)."""
    C = C.double()
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    scale = C.diagonal().mean().clamp_min(1e-30)
    return C + (damping * scale) * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)


def weighted_error(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   relative: bool = True) -> float:
    """``tr(E C Eᵀ)`` with ``E = W − Σ A_r⊗B_r`` (float64), over ``tr(W C Wᵀ)`` when ``relative``:
    the squared output error over the calibration inputs, as a fraction of the output's energy."""
    from .kronecker_math import kronecker_to_dense

    W = W.detach().double()
    C = C.detach().double()
    E = W - kronecker_to_dense(A.detach().double(), B.detach().double())
    err = ((E @ C) * E).sum().clamp_min(0)
    if relative:
        err = err / ((W @ C) * W).sum().clamp_min(1e-300)
    return float(err)


def _psd_cholesky(M: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of a symmetric positive (semi)definite matrix, jittered until it exists."""
    M = 0.5 * (M + M.T)
    jitter = 0.0
    scale = M.diagonal().abs().mean().clamp_min(1e-30)
    eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(M + jitter * scale * eye)
        if int(info) == 0:
            return L
        jitter = 1e-10 if jitter == 0 else jitter * 100
    raise ValueError("the calibration covariance is not positive semidefinite (NaN or Inf in the inputs?)")


def kronecker_covariance(C: torch.Tensor, n1: int, iters: int = 100, tol: float = 1e-9) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C₁, C₂)``, ``n1×n1`` and ``n2×n2``, with ``C₁⊗C₂`` the nearest Kronecker product to ``C``:
    the leading singular pair of its rearrangement, by power iteration from ``vec(I)`` (deterministic,
    no full SVD), signs fixed so that both traces are positive."""
    n = C.shape[0]
    if n % n1:
        raise ValueError(f"n1={n1} does not divide the covariance size {n}")
    n2 = n // n1
    R = _rearrange(C.double(), n1, n1, n2, n2)  # (n1², n2²)
    v = torch.eye(n2, dtype=R.dtype, device=R.device).reshape(-1)
    v = v / v.norm()
    for _ in range(iters):
        u = R @ v
        new = R.T @ (u / u.norm().clamp_min(1e-300))
        new = new / new.norm().clamp_min(1e-300)
        converged = (new - v).norm() < tol
        v = new
        if converged:
            break
    C1, C2 = (R @ v).reshape(n1, n1), v.reshape(n2, n2)
    if C1.trace() < 0:
        C1, C2 = -C1, -C2
    return 0.5 * (C1 + C1.T), 0.5 * (C2 + C2.T)


def kronecker_whitened(W: torch.Tensor, a_shape, rank: int, C: torch.Tensor, damping: float = 0.0,
                       return_singular_values: bool = False):
    """Factors minimising ``‖(W − Σ A_r⊗B_r)(L₁⊗L₂)‖_F`` with ``C₁⊗C₂ ≈ C`` (exact when ``C`` is a
    Kronecker product): the nearest Kronecker product of ``W(L₁⊗L₂)``, mapped back by ``Lᵢ⁻¹``.

    Args:
        W: ``(m, n)``; a_shape ``(m1, n1)``; rank; C: ``(n, n)`` input covariance; damping: as :func:`damped`,
            applied to each of ``C₁`` and ``C₂``.
    Returns ``A`` (rank, m1, n1), ``B`` (rank, m2, n2) in float64 (and the whitened singular values).
    """
    m, n = W.shape
    m1, n1, m2, n2 = _check_split(m, n, a_shape)
    C1, C2 = kronecker_covariance(C, n1)
    L1, L2 = _psd_cholesky(damped(C1, damping)), _psd_cholesky(damped(C2, damping))
    W4 = W.double().reshape(m, n1, n2)
    Wt = torch.einsum("ijk,ja,kb->iab", W4, L1, L2).reshape(m, n)  # W (L1 ⊗ L2)
    out = nearest_kronecker(Wt, (m1, n1), rank, return_singular_values=return_singular_values)
    A_hat, B_hat = out[0], out[1]
    # A = Â L1⁻¹, B = B̂ L2⁻¹: solve X L = Â, i.e. Lᵀ Xᵀ = Âᵀ
    A = torch.linalg.solve_triangular(L1.T, A_hat.transpose(1, 2), upper=True).transpose(1, 2)
    B = torch.linalg.solve_triangular(L2.T, B_hat.transpose(1, 2), upper=True).transpose(1, 2)
    return (A, B, out[2]) if return_singular_values else (A, B)


@dataclass
class WeightedFit:
    """What :func:`weighted_nearest_kronecker` did: the start it took, its iterations, and the
    relative weighted error (of the damped objective) at the start and at the end."""

    start: str
    iterations: int
    start_error: float
    error: float


def _spd_solve(G: torch.Tensor, rhs: torch.Tensor, eye: torch.Tensor) -> torch.Tensor:
    """``G⁻¹ rhs`` for the symmetric positive semidefinite normal matrix ``G``: Cholesky, with a tiny
    jitter (and an LU fallback) when the factors leave it singular."""
    G = G + 1e-12 * G.diagonal().mean().clamp_min(1e-300) * eye
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, L)
    return torch.linalg.solve(G, rhs)


def _balance(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale each pair so that ``‖A_r‖ = ‖B_r‖`` (the product is unchanged; keeps ALS well scaled)."""
    na = A.flatten(1).norm(dim=1).clamp_min(1e-300)
    nb = B.flatten(1).norm(dim=1).clamp_min(1e-300)
    s = (nb / na).sqrt()
    return A * s[:, None, None], B / s[:, None, None]


def weighted_nearest_kronecker(
    W: torch.Tensor, a_shape, rank: int, C: torch.Tensor, *, damping: float = 0.01, max_iter: int = 30,
    tol: float = 1e-5, start: str = "best", dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, WeightedFit]:
    """``A`` (rank, m1, n1) and ``B`` (rank, m2, n2) minimising ``tr(E C_δ Eᵀ)``, ``E = W − Σ A_r⊗B_r``,
    ``C_δ`` the damped covariance, by alternating least squares.

    Started (``start="best"``) from the better, on that objective, of the plain nearest Kronecker
    product (``"svd"``) and :func:`kronecker_whitened` (``"whitened"``); stops when an iteration lowers the objective by less than ``tol``
    (relative) or after ``max_iter`` iterations; when ``n1`` or ``n2`` is 1 (``C`` trivially a
    Kronecker product, e.g. the outer-product split that is plain low rank) the closed form is
    returned as it is. Deterministic. Returns the factors in ``W.dtype``
    and a :class:`WeightedFit`.
    """
    m, n = W.shape
    m1, n1, m2, n2 = _check_split(m, n, a_shape)
    if C.shape != (n, n):
        raise ValueError(f"the input covariance must be {n}x{n} for a weight of shape {(m, n)}, got {tuple(C.shape)}")
    Wd = W.detach().to(dtype)
    Cd = damped(C.to(dtype), damping).to(dtype)
    C4 = Cd.reshape(n1, n2, n1, n2)
    WC = Wd @ Cd
    WC4 = WC.reshape(m1, m2, n1, n2)
    total = float((WC * Wd).sum().clamp_min(1e-300))  # tr(W C Wᵀ)

    def objective(A, B) -> float:
        return weighted_error(Wd, A, B, Cd, relative=False) / total

    if start not in ("best", "svd", "whitened"):
        raise ValueError(f"start must be 'best', 'svd' or 'whitened', got {start!r}")
    starts = {}
    if start in ("best", "svd"):
        starts["svd"] = nearest_kronecker(Wd, (m1, n1), rank, dtype=dtype)
    if start in ("best", "whitened"):
        starts["whitened"] = kronecker_whitened(Wd, (m1, n1), rank, Cd)
    scored = {k: objective(*v) for k, v in starts.items()}
    start = min(scored, key=lambda k: (scored[k], k != "svd"))
    A, B = (t.to(dtype) for t in starts[start])
    err = start_err = scored[start]
    if start == "whitened" and (n1 == 1 or n2 == 1):
        # C is trivially C₁⊗C₂ (one factor is 1×1): the whitened closed form is the optimum already
        return A.to(W.dtype).contiguous(), B.to(W.dtype).contiguous(), WeightedFit(start, 0, start_err, start_err)
    eye_a = torch.eye(rank * n1, dtype=dtype)
    eye_b = torch.eye(rank * n2, dtype=dtype)
    it = 0
    for it in range(1, max_iter + 1):
        # A-step: rows of A (stacked over r) solve G a = h, G[(r,j),(s,k)] = Σ C4[j,b,k,c] (B_rᵀB_s)[b,c]
        M = torch.einsum("rab,sac->rsbc", B, B)
        G = torch.einsum("jbkc,rsbc->rjsk", C4, M).reshape(rank * n1, rank * n1)
        H = torch.einsum("iajb,rab->irj", WC4, B).reshape(m1, rank * n1)
        A = _spd_solve(G, H.T, eye_a).T.reshape(m1, rank, n1).permute(1, 0, 2)
        # B-step, symmetric: G'[(r,b),(s,c)] = Σ C4[j,b,k,c] (A_rᵀA_s)[j,k]
        N = torch.einsum("rij,sik->rsjk", A, A)
        G = torch.einsum("jbkc,rsjk->rbsc", C4, N).reshape(rank * n2, rank * n2)
        H = torch.einsum("iajb,rij->arb", WC4, A).reshape(m2, rank * n2)
        Bf = _spd_solve(G, H.T, eye_b).T  # (m2, r·n2)
        # objective from the normal equations: tr(WCWᵀ) − 2⟨H, B⟩ + Σ_rows bᵀ G b
        new_err = float((total - 2 * (H * Bf).sum() + ((Bf @ G) * Bf).sum()) / total)
        B = Bf.reshape(m2, rank, n2).permute(1, 0, 2)
        A, B = _balance(A, B)
        done = err - new_err < tol * max(err, 1e-300)
        err = min(err, new_err)
        if done:
            break
    return (A.to(W.dtype).contiguous(), B.to(W.dtype).contiguous(),
            WeightedFit(start, it, start_err, objective(A, B)))


def row_weighted_nearest_kronecker(weight: torch.Tensor, a_shape, rank: int, row_weights: torch.Tensor,
                                   damping: float = 0.01):
    """Factors minimising ``Σ_v w_v ‖W_v − (Σ A_r⊗B_r)_v‖²`` when ``B`` has one row (``m2 == 1``,
    the papers' embedding split): each row of the rearranged matrix is one table row, so scaling
    rows by ``√w`` before the SVD and unscaling ``A`` after is the exact optimum.

    ``row_weights`` (``m``,) are e.g. token counts; damped as ``w + damping·mean(w)`` so that rows
    never seen keep a small weight (and are still fitted).
    """
    m, n = weight.shape
    m1, n1, m2, n2 = _check_split(m, n, a_shape, "embedding table")
    if m2 != 1:
        raise ValueError(f"row weighting has a closed form only for B with one row (a_shape [{m}, n1]), got {a_shape}")
    w = row_weights.double()
    w = w + damping * w.mean().clamp_min(1e-30)
    root = w.sqrt()[:, None]
    A, B = nearest_kronecker(weight.double() * root, (m1, n1), rank)
    return (A / root[None]).to(weight.dtype), B.to(weight.dtype)
