"""The one validator of Kronecker factor specs, and the one random-init formula.

A spec ``{"a_shape": [m1, n1], "rank": r}`` says that an ``(out, in)`` matrix is
``Σ_{k<r} A_k ⊗ B_k`` with ``A_k`` of shape ``m1×n1`` and ``B_k`` of ``(out/m1)×(in/n1)``; for an
embedding (``(vocab, dim)``) ``m1`` need not divide the vocabulary (the table is padded). Both
paper configs (``KnGPT2Config``, ``KroneckerBertConfig``) and ``kroneckerize`` check their maps
here, so a bad split reads the same wherever it is given.

Standard library only: this file travels with saved model code (``trust_remote_code``).
"""

import math
import numbers

__all__ = ["canonical_factor_spec", "factor_split", "factor_std"]


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def factor_split(shape, a_shape, rank, kind: str, where: str) -> tuple:
    """``(m1, n1, m2, n2)`` of ``a_shape`` on a matrix of ``shape`` (``(out, in)``, or ``(vocab, dim)``
    when ``kind == "embedding"``); ``ValueError`` starting with ``where`` when it does not fit or
    ``rank`` is outside ``[1, min(m1·n1, m2·n2)]``."""
    m, n = shape
    if (not isinstance(a_shape, (list, tuple)) or len(a_shape) != 2 or not all(_is_int(v) for v in a_shape)):
        raise ValueError(f"{where}: a_shape must be two integers [m1, n1], got {a_shape!r}")
    m1, n1 = int(a_shape[0]), int(a_shape[1])
    if kind == "embedding":
        if not (1 <= m1 <= m and n1 >= 1 and n % n1 == 0):
            raise ValueError(f"{where}: a_shape [{m1}, {n1}] does not fit the ({m}, {n}) embedding: need "
                             f"1 <= m1 <= {m} and n1 dividing {n}")
        m2 = -(-m // m1)
    else:
        if m1 < 1 or n1 < 1 or m % m1 or n % n1:
            raise ValueError(f"{where}: a_shape [{m1}, {n1}] does not divide the (out, in) shape ({m}, {n}): "
                             f"m1 must divide {m} and n1 must divide {n}")
        m2 = m // m1
    n2 = n // n1
    max_rank = min(m1 * n1, m2 * n2)
    if not _is_int(rank) or not 1 <= rank <= max_rank:
        raise ValueError(f"{where}: rank {rank!r} is not possible for A {m1}x{n1} and B {m2}x{n2}: use 1..{max_rank}")
    return m1, n1, m2, n2


def canonical_factor_spec(spec, shape, kind: str, where: str) -> dict:
    """``spec`` checked against ``shape`` and returned as ``{"a_shape": [int, int], "rank": int}``
    (lists, so that the JSON round trip is exact; ``rank`` defaults to 1)."""
    if not isinstance(spec, dict) or "a_shape" not in spec:
        raise ValueError(f'{where} must be a dict like {{"a_shape": [m1, n1], "rank": 1}}, got {spec!r}')
    unknown = set(spec) - {"a_shape", "rank"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: 'a_shape', 'rank'")
    rank = spec.get("rank", 1)
    m1, n1, _, _ = factor_split(shape, spec["a_shape"], rank, kind, where)
    return {"a_shape": [m1, n1], "rank": int(rank)}


def factor_std(std: float, rank: int) -> float:
    """Std of each factor's entries so that ``Σ_{k<rank} A_k ⊗ B_k`` has entries of std ``std``
    (an entry of the sum has variance ``rank·s⁴`` for factors of std ``s``)."""
    return math.sqrt(std / math.sqrt(rank))
