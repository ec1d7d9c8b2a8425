"""The low-rank baseline ``W ≈ U·V`` at a given parameter fraction: plain truncated SVD, or
activation-aware (SVD-LLM: whiten by the Cholesky factor of the input covariance, truncate, undo).

For the init study only (``study_init.py``): which structure keeps more of a layer at equal size.
"""

from __future__ import annotations

import torch
from torch import nn

from kn_transformers.core.dispatch import dispatch_for, replace_module
from kn_transformers.core.weighted_kronecker import _psd_cholesky, damped


class LowRankLinear(nn.Module):
    """``y = U (V x) + b``: ``V`` is ``(k, in)``, ``U`` is ``(out, k)``; ``k·(in + out)`` parameters."""

    def __init__(self, U: torch.Tensor, V: torch.Tensor, bias):
        super().__init__()
        self.U = nn.Parameter(U.contiguous())
        self.V = nn.Parameter(V.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, x):
        y = (x @ self.V.T) @ self.U.T
        return y if self.bias is None else y + self.bias


def low_rank_factors(W: torch.Tensor, k: int, covariance=None, damping: float = 0.01):
    """``(U, V)`` with ``U V`` the best rank-``k`` approximation of ``W`` (``(out, in)``) in Frobenius
    norm, or in output error over inputs of ``covariance`` (whitened SVD, exact for that objective)."""
    Wd = W.detach().double()
    if covariance is None:
        U, S, Vh = torch.linalg.svd(Wd, full_matrices=False)
        root = S[:k].sqrt()
        return (U[:, :k] * root).to(W.dtype), (root[:, None] * Vh[:k]).to(W.dtype)
    L = _psd_cholesky(damped(covariance, damping))
    U, S, Vh = torch.linalg.svd(Wd @ L, full_matrices=False)
    # W ≈ U_k S_k V_kᵀ L⁻¹
    right = torch.linalg.solve_triangular(L.T, (S[:k, None] * Vh[:k]).T, upper=True).T
    return U[:, :k].to(W.dtype), right.to(W.dtype)


@torch.no_grad()
def low_rank_model(model: nn.Module, targets: dict, fraction: float, statistics=None, damping: float = 0.01):
    """A copy of ``model`` with each of ``targets`` (``{name: module}``) replaced by a
    :class:`LowRankLinear` of rank ``round(fraction·out·in / (out + in))`` (at least 1)."""
    import copy

    student = copy.deepcopy(model)
    report = []
    for name, module in targets.items():
        entry = dispatch_for(module)
        W = entry.weight(module).detach()
        m, n = W.shape
        k = max(1, round(fraction * m * n / (m + n)))
        cov = None if statistics is None else statistics[name].covariance
        U, V = low_rank_factors(W, k, cov, damping)
        replace_module(student, name, LowRankLinear(U, V, getattr(module, "bias", None)))
        report.append({"name": name, "rank": k, "params": k * (m + n), "dense": m * n})
    return student, report
