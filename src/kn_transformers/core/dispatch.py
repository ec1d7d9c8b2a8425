"""The module table: which dense module types become which Kronecker layer (PEFT's dispatcher pattern).

One :class:`KroneckerDispatch` per dense type: how to read its ``(out, in)`` matrix, how to build
an empty Kronecker layer of the same shape (on the meta device when loading) and how to build one
from the dense weights. Lookup walks the module's MRO, so subclasses of ``nn.Embedding`` (OPT's
learned positions, Gemma's scaled embedding) find an entry; a type with a more specific entry
(Gemma's) gets that one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .layers import KroneckerEmbedding, KroneckerLinear

__all__ = ["KroneckerDispatch", "KRONECKER_DISPATCH", "ScaledKroneckerEmbedding", "TiedKroneckerHead",
           "apply_kronecker_factors", "dispatch_for", "dense_matrix", "kronecker_like", "replace_module"]


class ScaledKroneckerEmbedding(KroneckerEmbedding):
    """A Kronecker embedding whose rows are multiplied by a constant, as Gemma's scaled embedding
    (``embed_scale = √d``; the tied head reads the unscaled table).

    The scale is a Python float rounded to the factors' dtype at each call, as Gemma rounds its
    buffer; not a buffer here, so that a layer built on the meta device needs no init.
    """

    def __init__(self, *args, embed_scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.scalar_embed_scale = float(embed_scale)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        scale = torch.tensor(self.scalar_embed_scale, dtype=self.A.dtype, device=self.A.device)
        return super().forward(input_ids) * scale

    def extra_repr(self) -> str:
        return super().extra_repr() + f", embed_scale={self.scalar_embed_scale:g}"


class TiedKroneckerHead(nn.Module):
    """An output head tied to a :class:`KroneckerEmbedding`: ``(..., d) -> (..., V)`` through
    :meth:`KroneckerEmbedding.logits`, no ``V × d`` matrix. The embedding is referenced, not owned:
    the head has no parameters and no state-dict entries of its own."""

    def __init__(self, embedding: KroneckerEmbedding, bias: Optional[torch.Tensor] = None):
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)  # not a submodule: one owner per parameter
        self.bias = None if bias is None else nn.Parameter(bias)
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings

    @property
    def embedding(self) -> KroneckerEmbedding:
        return self._embedding

    def tie_to(self, embedding: KroneckerEmbedding) -> None:
        """Read ``embedding`` from now on (after the model's input embedding module was replaced)."""
        if (embedding.num_embeddings, embedding.embedding_dim) != (self.out_features, self.in_features):
            raise ValueError(f"a head of {self.out_features} x {self.in_features} cannot be tied to an embedding of "
                             f"{embedding.num_embeddings} x {embedding.embedding_dim}")
        object.__setattr__(self, "_embedding", embedding)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = self._embedding.logits(hidden_states)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied to a KroneckerEmbedding"


@dataclass(frozen=True)
class KroneckerDispatch:
    """How one dense module type maps to a Kronecker layer.

    kind: ``"linear"`` (``(out, in)`` weight, ``y = x Wᵀ + b``) or ``"embedding"`` (``(V, d)`` table).
    shape: the dense matrix's shape, in that layout.
    build: ``(dense, a_shape, rank, **factory) -> layer`` with the dense module's shape, bias,
        device and dtype (``factory`` overrides ``device=`` / ``dtype=``), factors given the
        layers' default random init — overwritten by a decomposition, ``_init_weights`` or a checkpoint.
    weight: the dense matrix in that layout (``Conv1D`` stores in × out).
    """

    kind: str
    shape: Callable[[nn.Module], tuple[int, int]]
    build: Callable[..., nn.Module]
    weight: Callable[[nn.Module], torch.Tensor]


def _factory(module: nn.Module, overrides: dict) -> dict:
    w = module.weight
    return {"device": w.device, "dtype": w.dtype, **overrides}


def _build_linear(dense: nn.Linear, a_shape, rank, **factory) -> KroneckerLinear:
    return KroneckerLinear(dense.in_features, dense.out_features, a_shape, rank=rank,
                           bias=dense.bias is not None, **_factory(dense, factory))


def _build_conv1d(dense: Conv1D, a_shape, rank, **factory) -> KroneckerLinear:
    return KroneckerLinear(dense.nx, dense.nf, a_shape, rank=rank, bias=dense.bias is not None,
                           **_factory(dense, factory))


def _build_embedding(dense: nn.Embedding, a_shape, rank, **factory) -> KroneckerEmbedding:
    # no padding_idx: nn.Embedding only freezes that row's gradient; a shared Kronecker table cannot
    # without zeroing the row's output, i.e. computing another function than the teacher
    return KroneckerEmbedding(dense.num_embeddings, dense.embedding_dim, a_shape, rank=rank,
                              **_factory(dense, factory))


def _build_scaled_embedding(dense: nn.Embedding, a_shape, rank, **factory) -> ScaledKroneckerEmbedding:
    # the teacher's buffer value where it has one (it may be rounded to float32), else the exact scale
    buffer = getattr(dense, "embed_scale", None)
    scale = float(buffer) if isinstance(buffer, torch.Tensor) and not buffer.is_meta else dense.scalar_embed_scale
    return ScaledKroneckerEmbedding(dense.num_embeddings, dense.embedding_dim, a_shape, rank=rank,
                                    embed_scale=float(scale), **_factory(dense, factory))


_LINEAR = KroneckerDispatch("linear", lambda m: (m.out_features, m.in_features), _build_linear, lambda m: m.weight)
_CONV1D = KroneckerDispatch("linear", lambda m: (m.nf, m.nx), _build_conv1d, lambda m: m.weight.T)
_EMBEDDING = KroneckerDispatch("embedding", lambda m: (m.num_embeddings, m.embedding_dim), _build_embedding,
                               lambda m: m.weight)
_SCALED_EMBEDDING = KroneckerDispatch("embedding", _EMBEDDING.shape, _build_scaled_embedding, lambda m: m.weight)

#: Dense module type (or its class name, for types whose module may not import) -> dispatch.
KRONECKER_DISPATCH: dict = {
    nn.Linear: _LINEAR,
    Conv1D: _CONV1D,
    nn.Embedding: _EMBEDDING,
    # Gemma's (and Gemma 2/3's) `embed_tokens`: rows times √d, a non-persistent buffer
    "GemmaTextScaledWordEmbedding": _SCALED_EMBEDDING,
    "Gemma2TextScaledWordEmbedding": _SCALED_EMBEDDING,
    "Gemma3TextScaledWordEmbedding": _SCALED_EMBEDDING,
}


def dispatch_for(module: nn.Module) -> Optional[KroneckerDispatch]:
    """The table entry of ``module``'s type (most specific class first), or ``None``."""
    if isinstance(module, (KroneckerLinear, KroneckerEmbedding, TiedKroneckerHead)):
        return None
    for cls in type(module).__mro__:
        entry = KRONECKER_DISPATCH.get(cls) or KRONECKER_DISPATCH.get(cls.__name__)
        if entry is not None:
            return entry
    return None


def dense_matrix(module: nn.Module) -> torch.Tensor:
    """The dense matrix of a table module, ``(out, in)`` or ``(V, d)``."""
    entry = dispatch_for(module)
    if entry is None:
        raise TypeError(f"{type(module).__name__} is not in the Kronecker module table")
    return entry.weight(module)


def kronecker_like(dense: nn.Module, a_shape, rank: int = 1, name: str = "module", **factory) -> nn.Module:
    """A Kronecker layer with ``dense``'s shape, bias, device and dtype (``factory``: ``device=`` /
    ``dtype=`` overrides), randomly initialised: the shape a checkpoint or a decomposition fills."""
    entry = dispatch_for(dense)
    if entry is None:
        raise ValueError(f"module {name!r} is a {type(dense).__name__}, which the Kronecker module table does not know")
    return entry.build(dense, tuple(a_shape), rank, **factory)


def apply_kronecker_factors(root: nn.Module, factors: Optional[dict], **factory) -> None:
    """Swap each module named in ``factors`` (``{name: {"a_shape": [m1, n1], "rank": r}}``, names
    relative to ``root``) for :func:`kronecker_like` of it — how a Kronecker model class builds
    its layers from its config before ``post_init()``; no decomposition happens here."""
    for name, spec in (factors or {}).items():
        replace_module(root, name, kronecker_like(root.get_submodule(name), spec["a_shape"], spec["rank"], name,
                                                  **factory))


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Set the submodule at dotted path ``name`` of ``root`` to ``new`` (the one module swap)."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
