"""Kronecker-factored layers: ``KroneckerLinear`` (a linear map whose weight is ``Σ_r A_r ⊗ B_r``)
and ``KroneckerEmbedding`` (an embedding table of that form, looked up row by row).

Neither builds the dense matrix in its forward. Plain PyTorch (see :mod:`.contraction`); this
module and what it imports travel with the modeling files saved for ``trust_remote_code``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from transformers import initialization as hf_init

from .contraction import KRONECKER_ORDERS, _kron_apply, kronecker_matmul
from .factor_spec import factor_std
from .kronecker_math import ShapeLike, _check_split, kronecker_to_dense, nearest_kronecker, normalize_kronecker

__all__ = ["KroneckerLinear", "KroneckerEmbedding"]


def _check_ids(input_ids: torch.Tensor, num_embeddings: int) -> None:
    """Refuse ids outside ``[0, num_embeddings)``, as ``nn.Embedding`` does: the factored table
    has padded rows that such ids would silently reach (and ``-1`` would alias the last one)."""
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"embedding ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.numel() == 0:
        return
    if torch.compiler.is_compiling() or input_ids.device.type != "cpu":
        # no host sync, no graph break: an asynchronous device-side check
        torch._assert_async(((input_ids >= 0) & (input_ids < num_embeddings)).all(),
                            f"embedding ids must be in [0, {num_embeddings})")
        return
    lo, hi = torch.aminmax(input_ids)
    if lo < 0 or hi >= num_embeddings:
        bad = int(lo) if lo < 0 else int(hi)
        raise IndexError(f"index out of range in self: embedding id {bad} is outside [0, {num_embeddings})")


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of an ``nn.Linear`` or of transformers' ``Conv1D`` (stored in×out)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx"):
        return module.weight.T
    raise TypeError(
        f"from_dense expects nn.Linear or transformers' Conv1D, got {type(module).__name__}"
    )


@torch.no_grad()
def _fit_factors_(layer: nn.Module, target: torch.Tensor, weight: torch.Tensor, normalize: bool, svd_dtype):
    """The one SVD init: ``layer``'s factors become the nearest Kronecker product of ``target``
    (optionally rescaled to ``weight``'s Frobenius norm, Krony-PT)."""
    A, B = nearest_kronecker(target, layer.a_shape, rank=layer.rank, dtype=svd_dtype)
    if normalize:
        A, B = normalize_kronecker(A, B, weight)
    layer.A.copy_(A)
    layer.B.copy_(B)
    return layer


def init_kronecker_(module: nn.Module, std: float) -> None:
    """Random factors of a Kronecker layer whose product has entries of std ``std``; zero bias.

    For models' ``_init_weights``: the same scheme as ``reset_parameters``, through
    ``transformers.initialization``, which skips tensors already loaded from a checkpoint.
    """
    s = factor_std(std, module.rank)
    hf_init.normal_(module.A, mean=0.0, std=s)
    hf_init.normal_(module.B, mean=0.0, std=s)
    if getattr(module, "bias", None) is not None:
        hf_init.zeros_(module.bias)


class KroneckerLinear(nn.Module):
    """A linear map whose weight is ``Σ_r A_r ⊗ B_r``: ``y = x (Σ_r A_r⊗B_r)ᵀ + b``.

    Args:
        in_features: ``n = n1*n2``.
        out_features: ``m = m1*m2``.
        a_shape: ``(m1, n1)``, the shape of each ``A_r``; ``B_r`` is ``(m/m1, n/n1)``.
        rank: number of Kronecker terms summed.
        bias: learn an additive bias of size ``out_features``.
        order: contraction strategy, ``"auto"`` (a fixed rule on the shapes,
            :func:`~kn_transformers.core.contraction.contraction_order`) or one of ``KRONECKER_ORDERS``
            (see :func:`~kn_transformers.core.contraction.kronecker_matmul`).

    Parameters ``A`` (rank, m1, n1) and ``B`` (rank, m2, n2). The forward accepts any
    number of leading dimensions and never materialises the ``(m, n)`` weight.
    """

    #: add the bias to the output in the input's shape rather than inside the contraction (set by
    #: ``export_onnx`` so that ONNX Runtime fuses it with the GELU or residual LayerNorm after it)
    bias_last: bool = False

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
        if order != "auto" and order not in KRONECKER_ORDERS:
            raise ValueError(f"order must be 'auto' or one of {KRONECKER_ORDERS}, got {order!r}")
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
        s = factor_std(target, self.rank)
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
        return _kron_apply(x, self.A, self.B, self.order, self.bias, self.bias_last)

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
        layer.init_from_weight_(W, normalize=normalize, svd_dtype=svd_dtype)
        if has_bias:
            with torch.no_grad():
                layer.bias.copy_(module.bias)
        return layer

    def init_from_weight_(self, weight: torch.Tensor, normalize: bool = False, svd_dtype=torch.float64):
        """Set the factors to the nearest Kronecker product of ``weight`` (``(out, in)``); returns self."""
        return _fit_factors_(self, weight, weight, normalize, svd_dtype)

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
        s = factor_std(std, self.rank)
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
        _check_ids(input_ids, self.num_embeddings)
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
        return layer.init_from_weight_(W, normalize=normalize, svd_dtype=svd_dtype)

    def init_from_weight_(self, weight: torch.Tensor, normalize: bool = False, svd_dtype=torch.float64):
        """Set the factors to the nearest Kronecker table to ``weight`` (``(vocab, dim)``; the padded
        rows no id reaches are fitted as zeros); returns self."""
        padded = weight.detach()
        if self.num_rows > weight.shape[0]:
            padded = torch.cat([padded, padded.new_zeros(self.num_rows - weight.shape[0], weight.shape[1])])
        return _fit_factors_(self, padded, weight, normalize, svd_dtype)

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
