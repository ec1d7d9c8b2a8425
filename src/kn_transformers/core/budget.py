"""A global parameter budget: each matrix's ``(a_shape, rank)`` chosen so that the summed error is
smallest and the budget is never exceeded (a multiple-choice knapsack).

Every candidate's error comes from one SVD per split: the squared relative error of the rank-``r``
truncation is the tail of the rearranged matrix's squared singular values. With calibration
statistics the matrix is first whitened by the Kronecker approximation ``L₁⊗L₂`` of its input
covariance (:func:`~.weighted_kronecker.kronecker_whitened`'s objective), so the error is the
activation-weighted one (the embedding's rows are weighted by token frequency, exact for the
papers' ``V × d/n`` split). Errors are relative per matrix, so that every matrix counts alike.

The solver is a dynamic program over the budget in a few thousand units (parameters rounded up,
so the budget holds), exact when the budget is that small; tests compare it with an exact
solver on small instances at a coarse resolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from .factor_search import _divisors
from .kronecker_math import _rearrange
from .weighted_kronecker import _psd_cholesky, damped, kronecker_covariance

__all__ = ["Candidate", "matrix_candidates", "embedding_candidates", "solve_budget"]


@dataclass(frozen=True)
class Candidate:
    """One ``(a_shape, rank)`` of a matrix, its factor parameters and its squared relative error."""

    a_shape: tuple[int, int]
    rank: int
    params: int
    error: float


def _tail_errors(R: torch.Tensor, max_rank: int) -> list[float]:
    """``[Σ_{k>r} σ_k² / Σ σ_k² for r in 1..max_rank]`` of ``R``: all singular values when ``R`` is
    small, else the leading ``max_rank`` by a seeded randomized SVD (the tail is the total minus them)."""
    total = float((R.double() ** 2).sum().clamp_min(1e-300))
    if min(R.shape) <= 4 * max_rank + 32:
        s = torch.linalg.svdvals(R.float())
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            s = torch.svd_lowrank(R.float(), q=max_rank + 8, niter=4)[1]
    head = torch.cumsum(s[:max_rank].double() ** 2, 0)
    return ((total - head).clamp_min(0) / total).tolist()


#: With a covariance, a candidate must keep ALS's normal equations (``rank·n1`` and ``rank·n2``
#: unknowns) at most this size, unless ``n1`` or ``n2`` is 1 (then the fit is closed-form).
MAX_NORMAL_SIZE = 2048


def matrix_candidates(weight: torch.Tensor, max_rank: int = 1, covariance: Optional[torch.Tensor] = None,
                      damping: float = 0.01) -> list[Candidate]:
    """Every non-trivial ``(a_shape, rank ≤ max_rank)`` of an ``(out, in)`` weight with fewer parameters
    than the dense matrix, with its squared relative error (activation-weighted when ``covariance``
    ``(in, in)`` is given; then only ranks whose fit stays within :data:`MAX_NORMAL_SIZE`)."""
    W = weight.detach().double()
    m, n = W.shape
    out: list[Candidate] = []
    for n1 in _divisors(n):
        n2 = n // n1
        if covariance is None:
            Wt = W
        else:
            C1, C2 = kronecker_covariance(damped(covariance, damping), n1)
            L1, L2 = _psd_cholesky(C1), _psd_cholesky(C2)
            Wt = torch.einsum("ijk,ja,kb->iab", W.reshape(m, n1, n2), L1, L2).reshape(m, n)
        for m1 in _divisors(m):
            m2 = m // m1
            if m1 * n1 == 1 or m2 * n2 == 1:
                continue
            top = min(max_rank, m1 * n1, m2 * n2)
            if covariance is not None and n1 > 1 and n2 > 1:
                top = min(top, MAX_NORMAL_SIZE // max(n1, n2))
            if min(top, (m * n - 1) // (m1 * n1 + m2 * n2)) < 1:
                continue
            errors = _tail_errors(_rearrange(Wt, m1, n1, m2, n2), top)
            for r, err in enumerate(errors, start=1):
                params = r * (m1 * n1 + m2 * n2)
                if params < m * n:
                    out.append(Candidate((m1, n1), r, params, err))
    return out


def embedding_candidates(weight: torch.Tensor, max_rank: int = 1, token_counts: Optional[torch.Tensor] = None,
                         damping: float = 0.01) -> list[Candidate]:
    """The papers' embedding splits ``A: V × d/k``, ``B: 1 × k`` (``k`` a divisor of ``d``, at least 2)
    at ranks up to ``max_rank``, errors row-weighted by ``token_counts`` when given."""
    W = weight.detach().double()
    V, d = W.shape
    if token_counts is not None:
        w = token_counts.double()
        W = W * (w + damping * w.mean().clamp_min(1e-30)).sqrt()[:, None]
    out = []
    for k in _divisors(d):
        if k < 2:
            continue
        n1 = d // k
        top = min(max_rank, k, V * n1)
        errors = _tail_errors(_rearrange(W, V, n1, 1, k), top)
        for r, err in enumerate(errors, start=1):
            params = r * (V * n1 + k)
            if params < V * d:
                out.append(Candidate((V, n1), r, params, err))
    return out


def _frontier(cands: list[Candidate]) -> list[Candidate]:
    """The Pareto frontier of ``(params, error)``: fewest parameters first, error strictly falling."""
    frontier: list[Candidate] = []
    for c in sorted(cands, key=lambda c: (c.params, c.error, c.a_shape, c.rank)):
        if not frontier or c.error < frontier[-1].error:
            frontier.append(c)
    return frontier


def solve_budget(candidates: Mapping[str, list[Candidate]], budget: int, resolution: int = 4096) -> dict[str, Candidate]:
    """One candidate per matrix with ``Σ params ≤ budget`` and ``Σ error`` (near) smallest.

    Dynamic programming over the budget in ``resolution`` units, each candidate's parameters
    rounded *up* to whole units (so the budget is never exceeded, and the result is exact when
    ``budget ≤ resolution``), then the rounding's leftover spent on the single upgrades that
    lower the error most. Raises ``ValueError`` (one line) when even the smallest choices do not fit.
    """
    for name, cands in candidates.items():
        if not cands:
            raise ValueError(f"module {name!r} has no Kronecker split smaller than itself; exclude it")
    frontiers = {name: _frontier(cands) for name, cands in candidates.items()}
    smallest = sum(f[0].params for f in frontiers.values())
    if smallest > budget:
        raise ValueError(f"budget of {budget:,} parameters for the targeted matrices is below the smallest "
                         f"Kronecker choices ({smallest:,}); raise the budget or target fewer modules")
    unit = max(1, -(-budget // resolution))
    capacity = budget // unit
    inf = float("inf")
    best = torch.full((capacity + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    picks = []
    for name, front in frontiers.items():
        new = torch.full_like(best, inf)
        pick = torch.full((capacity + 1,), -1, dtype=torch.long)
        for i, c in enumerate(front):
            cost = -(-c.params // unit)
            if cost > capacity:
                break
            shifted = torch.full_like(best, inf)
            shifted[cost:] = best[: capacity + 1 - cost] + c.error
            better = shifted < new
            new = torch.where(better, shifted, new)
            pick = torch.where(better, torch.full_like(pick, i), pick)
        best = new
        picks.append((name, pick))
    if not torch.isfinite(best).any():  # the rounding up left no room: the smallest choices fit exactly only
        chosen = {name: f[0] for name, f in frontiers.items()}
    else:
        u = int(torch.argmin(best))
        chosen = {}
        for name, pick in reversed(picks):
            c = frontiers[name][int(pick[u])]
            chosen[name] = c
            u -= -(-c.params // unit)
        chosen = {name: chosen[name] for name in frontiers}
    used = sum(c.params for c in chosen.values())
    # fill: the single upgrade (any candidate) with the largest error reduction that still fits
    while True:
        top = None
        for name, cands in frontiers.items():
            cur = chosen[name]
            for c in cands:
                if c.error < cur.error and used + c.params - cur.params <= budget:
                    if top is None or cur.error - c.error > top[0]:
                        top = (cur.error - c.error, name, c)
        if top is None:
            break
        _, name, c = top
        used += c.params - chosen[name].params
        chosen[name] = c
    return chosen
