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
import re

__all__ = ["FactorMapLayout", "canonical_factor_spec", "factor_split", "factor_std"]


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


class FactorMapLayout:
    """Which matrices of a paper model may be Kronecker and their ``(out, in)`` shapes: one token
    embedding plus a fixed set of matrices in each of ``num_layers`` repeated blocks.

    ``embedding`` is ``(name, (vocab, dim))``; ``layer_shapes`` maps each per-block module name
    (relative to ``<layer_prefix><i>.``) to its shape, in forward order; ``num_layers_field`` names
    the config field that holds ``num_layers`` (for the error messages). ``KnGPT2Config`` and
    ``KroneckerBertConfig`` each build one; :meth:`canonical` is their only validator.
    """

    def __init__(self, *, embedding, layer_prefix: str, layer_shapes: dict, num_layers: int,
                 num_layers_field: str, field: str = "kronecker_factors"):
        self.embedding_name, self.embedding_shape = embedding[0], tuple(embedding[1])
        self.layer_prefix = layer_prefix
        self.layer_shapes = {name: tuple(shape) for name, shape in layer_shapes.items()}
        self.num_layers, self.num_layers_field, self.field = num_layers, num_layers_field, field
        self._key = re.compile(rf"^{re.escape(layer_prefix)}(0|[1-9][0-9]*)\.(.+)$")

    def _locate(self, name):
        """``(layer, module)`` of a per-block ``name``, ``(-1, embedding)`` for the embedding;
        ``ValueError`` naming the entry when the module is unknown or the layer out of range."""
        where = f"{self.field}[{name!r}]"
        if name == self.embedding_name:
            return -1, name
        match = self._key.match(name) if isinstance(name, str) else None
        if match is None or match.group(2) not in self.layer_shapes:
            raise ValueError(
                f"{where}: unknown module name; use {self.embedding_name!r} or '{self.layer_prefix}<layer>.<module>' "
                f"with <module> one of {', '.join(self.layer_shapes)}"
            )
        layer = int(match.group(1))
        if layer >= self.num_layers:
            raise ValueError(
                f"{where}: layer index {layer} is out of range for {self.num_layers_field}={self.num_layers} "
                f"(valid: 0..{self.num_layers - 1})"
            )
        return layer, match.group(2)

    def shape(self, name: str) -> tuple:
        """``(out, in)`` of the matrix at ``name`` (``(vocab, dim)`` for the embedding)."""
        layer, module = self._locate(name)
        return self.embedding_shape if layer < 0 else self.layer_shapes[module]

    def canonical(self, factors) -> dict:
        """``factors`` (``{module name: spec}``) checked entry by entry and returned canonical:
        specs as :func:`canonical_factor_spec` gives them, the embedding first, then layers in
        order and modules in forward order (so that equal maps serialise equally)."""
        if factors is None:
            factors = {}
        if not isinstance(factors, dict):
            raise ValueError(f"{self.field} must be a dict of module name -> spec, got {type(factors).__name__}")
        order, out = list(self.layer_shapes), {}
        for name, spec in factors.items():
            layer, module = self._locate(name)
            if layer < 0:
                position, shape, kind = (layer, -1), self.embedding_shape, "embedding"
            else:
                position, shape, kind = (layer, order.index(module)), self.layer_shapes[module], "linear"
            out[name] = (position, canonical_factor_spec(spec, shape, kind, f"{self.field}[{name!r}]"))
        return {name: spec for name, (_, spec) in sorted(out.items(), key=lambda item: item[1][0])}


def factor_std(std: float, rank: int) -> float:
    """Std of each factor's entries so that ``Σ_{k<rank} A_k ⊗ B_k`` has entries of std ``std``
    (an entry of the sum has variance ``rank·s⁴`` for factors of std ``s``)."""
    return math.sqrt(std / math.sqrt(rank))
