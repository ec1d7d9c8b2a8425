"""Choosing factor shapes: every valid ``(a_shape, rank)`` of a matrix with its parameters and
FLOPs, and the deterministic pick for a parameter fraction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

from .kronecker_math import kronecker_flops

__all__ = ["FactorChoice", "kronecker_factor_choices", "choose_kronecker_factors", "choose_embedding_factors"]


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


def choose_embedding_factors(num_embeddings: int, embedding_dim: int, target_fraction: float, rank: int = 1) -> tuple[int, int]:
    """The papers' embedding split for a parameter fraction: ``A`` is ``V × d/n``, ``B`` is ``1 × n``,
    with the smallest ``n`` (a divisor of ``d``, at least 2) whose parameters fit ``target_fraction`` of ``V·d``.

    Returns ``a_shape = (V, d/n)``. Each row is then a fixed ``n``-vector pattern scaled per
    ``d/n`` slot, which keeps token identity (every row has its own ``A`` row).
    """
    if not 0 < target_fraction < 1:
        raise ValueError(f"target_fraction must be in (0, 1), got {target_fraction}")
    V, d = num_embeddings, embedding_dim
    for n in range(2, d + 1):
        if d % n == 0 and rank * (V * d // n + n) <= target_fraction * V * d:
            return (V, d // n)
    raise ValueError(
        f"no embedding split {V} x {d}/n fits fraction={target_fraction} at rank {rank}; raise the fraction"
    )
