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

from .native import _layout as _native_layout
from .native import native_kronecker_linear, native_supported

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
        order: the contraction strategy: ``"auto"`` (the fastest, timed once per shape) or
            one of :data:`KRONECKER_ORDERS`:

            * ``"b_first"``: one flat matmul with ``B`` on the contiguous axis, then a
              broadcast matmul with ``A``;
            * ``"a_first"``: a broadcast matmul with ``A``, then one flat matmul with ``B``;
            * ``"b_first_bmm"`` / ``"a_first_bmm"``: as ``b_first`` / ``a_first``, the
              product with ``A`` one ``bmm`` call over the rows (no copies): fast when
              ``A`` is small (e.g. 8×2 or 2×8);
            * ``"b_first_t"``: as ``b_first``, but the intermediate is transposed (one small
              copy) so that the product with ``A`` is also one flat matmul, and the output is
              transposed back: fast when ``B`` has few rows (e.g. ``B`` 2×16);
            * ``"b_first_ew"`` / ``"a_first_ew"``: the product with ``A`` as ``n1·rank``
              fused multiply-add passes instead of ``N`` tiny matmuls: fast when ``A`` is
              tiny (e.g. 2×2 or 2×8);
            * ``"native"``: both products in one fused CPU kernel (:mod:`kn_transformers.native`,
              AVX-512, float32, inference) that writes the output in place, with no transpose:
              fast when ``B`` has 2-16 rows (e.g. ``A 384×48 ⊗ B 2×16``). Where the kernel
              does not apply (autograd, float64, GPU, no compiler) it computes ``"b_first_t"``.

    Returns:
        ``(..., m1*m2)``.

    Every strategy computes the same product; the rank is folded into the inner dimension
    of the matmuls, so a sum of terms costs two matmuls, not 2·rank.
    """
    return _kron_apply(x, A, B, order, None)


# The contraction strategies (see kronecker_matmul); all compute the same product.
KRONECKER_ORDERS = ("b_first", "a_first", "b_first_t", "b_first_bmm", "a_first_bmm", "b_first_ew", "a_first_ew",
                    "native")


def _kron_apply(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, order: str,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x @ (Σ_r A_r ⊗ B_r)ᵀ (+ bias)``, the bias folded into the last step where possible."""
    _, m1, n1 = A.shape
    _, m2, n2 = B.shape
    shape = x.shape
    if shape[-1] != n1 * n2:
        raise ValueError(f"input has {shape[-1]} features, the Kronecker factors expect {n1 * n2}")
    N = x.numel() // (n1 * n2)
    if order == "auto":
        order = _pick_order(x, A, B, N, bias)
    strategy = _STRATEGY_FNS.get(order)
    if strategy is None:
        raise ValueError(f"order must be 'auto' or one of {KRONECKER_ORDERS}, got {order!r}")
    y = strategy(x.reshape(N, n1, n2), A, B, bias)
    return y.reshape(*shape[:-1], m1 * m2)


def _b_stage(x3: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``T[N, j1, r, i2] = Σ_j2 x[N, j1, j2] B_r[i2, j2]`` as one flat matmul: ``(N, n1*r, m2)``."""
    N, n1, n2 = x3.shape
    r, m2, _ = B.shape
    t = x3.reshape(N * n1, n2) @ B.reshape(r * m2, n2).T
    return t.view(N, n1 * r, m2)


def _a_cat(A: torch.Tensor) -> torch.Tensor:
    """``A`` as ``(m1, n1*r)``, column ``(j1, r)``: matches the middle axis of :func:`_b_stage`."""
    r, m1, n1 = A.shape
    return A.permute(1, 2, 0).reshape(m1, n1 * r)


def _b_last(t: torch.Tensor, B: torch.Tensor, rows: int) -> torch.Tensor:
    """``y[(N, i1), i2] = Σ_r Σ_j2 t[N, (i1, r), j2] B_r[i2, j2]``: the B-stage of the A-first
    orders, ``(rows, m2)`` from ``t`` ``(N, m1*r, n2)`` with ``rows = N*m1``.

    Rank 1 is one matmul with a view of ``B``; higher ranks accumulate one matmul per term
    on strided views. Folding the rank into one matmul would copy ``B`` into ``(r*n2, m2)``
    order on every call, which for a large ``B`` (e.g. 2304x256) costs more than the product
    itself at a few tokens (1 ms per call in generation).
    """
    r, m2, n2 = B.shape
    tv = t.reshape(rows, r, n2)
    y = tv[:, 0, :] @ B[0].T
    for k in range(1, r):
        y = y.addmm_(tv[:, k, :], B[k].T)
    return y


def _add_bias_(y: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    # In place on a fresh matmul output (its backward does not need it): saves a full-size
    # allocation and a pass compared with ``y + bias``.
    if bias is None:
        return y
    m = bias.shape[0]
    return y.view(-1, m).add_(bias)


def _order_b_first(x3, A, B, bias):
    N = x3.shape[0]
    r, m1, n1 = A.shape
    m2 = B.shape[1]
    t = _b_stage(x3, B)  # (N, n1*r, m2)
    y = torch.matmul(_a_cat(A), t)  # N broadcast (m1, n1*r) @ (n1*r, m2)
    return _add_bias_(y.reshape(N, m1 * m2), bias)


def _order_a_first(x3, A, B, bias):
    N, n1, n2 = x3.shape
    r, m1, _ = A.shape
    m2 = B.shape[1]
    # (m1*r, n1) @ (N, n1, n2) -> (N, m1*r, n2) == (N*m1, r*n2) ; @ (r*n2, m2) -> (N*m1, m2)
    a_stack = A.permute(1, 0, 2).reshape(m1 * r, n1)
    t = torch.matmul(a_stack, x3)
    return _add_bias_(_b_last(t, B, N * m1).view(N, m1 * m2), bias)


def _order_b_first_bmm(x3, A, B, bias):
    N = x3.shape[0]
    r, m1, n1 = A.shape
    m2 = B.shape[1]
    t = _b_stage(x3, B)  # (N, n1*r, m2)
    a_cat = _a_cat(A)
    y = torch.bmm(a_cat.expand(N, m1, n1 * r), t)  # one batched call, no copies
    return _add_bias_(y.view(N, m1 * m2), bias)


def _order_a_first_bmm(x3, A, B, bias):
    N, n1, n2 = x3.shape
    r, m1, _ = A.shape
    m2 = B.shape[1]
    a_stack = A.permute(1, 0, 2).reshape(m1 * r, n1)
    t = torch.bmm(a_stack.expand(N, m1 * r, n1), x3)  # (N, m1*r, n2), contiguous
    return _add_bias_(_b_last(t, B, N * m1).view(N, m1 * m2), bias)


def _order_b_first_t(x3, A, B, bias):
    N = x3.shape[0]
    r, m1, n1 = A.shape
    m2 = B.shape[1]
    t = _b_stage(x3, B)  # (N, n1*r, m2)
    tp = t.transpose(1, 2)  # (N, m2, n1*r), copied below
    a_t = _a_cat(A).T  # (n1*r, m1)
    if bias is not None:
        # the bias rides in the matmul: one-hot columns on the left, bias rows on the right
        eye = torch.eye(m2, dtype=t.dtype, device=t.device).expand(N, m2, m2)
        tp = torch.cat([tp, eye], dim=2)
        a_t = torch.cat([a_t, bias.view(m1, m2).T], dim=0)
    k = tp.shape[2]
    yp = tp.reshape(N * m2, k) @ a_t  # (N*m2, m1): rows (N, i2)
    return yp.view(N, m2, m1).transpose(1, 2).reshape(N, m1 * m2)


def _order_b_first_ew(x3, A, B, bias):
    N = x3.shape[0]
    r, m1, n1 = A.shape
    m2 = B.shape[1]
    t = _b_stage(x3, B)  # (N, n1*r, m2)
    a_cat = _a_cat(A)  # (m1, n1*r)
    y = None
    for k in range(n1 * r):
        tk = t[:, k:k + 1, :]  # (N, 1, m2)
        ak = a_cat[:, k:k + 1].unsqueeze(0)  # (1, m1, 1)
        if y is None:
            y = torch.addcmul(bias.view(1, m1, m2), tk, ak) if bias is not None else tk * ak
        else:
            y.addcmul_(tk, ak)
    return y.reshape(N, m1 * m2)


def _order_a_first_ew(x3, A, B, bias):
    N, n1, n2 = x3.shape
    r, m1, _ = A.shape
    m2 = B.shape[1]
    a_stack = A.permute(1, 0, 2).reshape(m1 * r, n1)  # rows (i1, r)
    t = None
    for j in range(n1):
        xj = x3[:, j:j + 1, :]  # (N, 1, n2)
        aj = a_stack[:, j:j + 1].unsqueeze(0)  # (1, m1*r, 1)
        if t is None:
            t = xj * aj
        else:
            t.addcmul_(xj, aj)
    return _add_bias_(_b_last(t, B, N * m1).view(N, m1 * m2), bias)


def _order_native(x3, A, B, bias):
    N, n1, n2 = x3.shape
    y = native_kronecker_linear(x3.reshape(N, n1 * n2), A, B, bias)  # None where the kernel does not apply
    return y if y is not None else _order_b_first_t(x3, A, B, bias)


_STRATEGY_FNS = {
    "native": _order_native,
    "b_first": _order_b_first,
    "a_first": _order_a_first,
    "b_first_t": _order_b_first_t,
    "b_first_bmm": _order_b_first_bmm,
    "a_first_bmm": _order_a_first_bmm,
    "b_first_ew": _order_b_first_ew,
    "a_first_ew": _order_a_first_ew,
}


# Which strategy is fastest depends on the shapes and the matmul kernels more than on FLOPs
# (up to 2x off, and N tiny matmuls are slow whatever their FLOPs): "auto" times the
# candidates once per (shapes, rows rounded up to a power of two, dtype, device, bias,
# training) and remembers the winner. In training (grad enabled and something requires
# grad) it times forward+backward, since that is what a step pays.
_ORDER_CACHE: dict = {}
_AUTOTUNE = True
# a new object whenever _ORDER_CACHE is cleared: layers' memos of a cached choice (see
# KroneckerLinear.forward) hold it and match by identity, so a memo from before the clear, or
# one copied along with its layer (pickled, deep-copied), never counts
_ORDER_TOKEN = object()


def set_kronecker_autotune(enabled: bool) -> None:
    """Turn timing-based order selection on (default) or off (then the FLOP count decides the
    order, deterministically)."""
    global _AUTOTUNE, _ORDER_TOKEN
    _AUTOTUNE = bool(enabled)
    _ORDER_CACHE.clear()
    _ORDER_TOKEN = object()


def _rows_bucket(rows: int) -> int:
    """The autotuner times one row count per power of two: ``rows`` rounded up to one."""
    return 1 << max(rows - 1, 0).bit_length()


def _flop_order(A: torch.Tensor, B: torch.Tensor) -> str:
    fb, fa = kronecker_flops(A.shape[1], A.shape[2], B.shape[1], B.shape[2], A.shape[0])
    return "b_first" if fb <= fa else "a_first"


def _default_order(A: torch.Tensor, B: torch.Tensor) -> str:
    """The FLOP-cheaper order; with a small ``A`` on the batched side, its one-call bmm form
    (measured never slower here than ``torch.matmul``'s broadcast, often 1.5-2x faster)."""
    r, m1, n1 = A.shape
    order = _flop_order(A, B)
    if order == "b_first" and m1 <= 16:
        return "b_first_bmm"
    if order == "a_first" and m1 * r <= 16:
        return "a_first_bmm"
    return order


def _candidates(A: torch.Tensor, B: torch.Tensor, x: Optional[torch.Tensor] = None) -> list[str]:
    """The strategies worth timing: the two orders, and the variants that suit tiny factors
    (and the native kernel where it applies to ``x``).

    An order with more than three times the other's FLOPs is not tried (it never wins, and
    timing it under load could only pick it by mistake).
    """
    r, m1, n1 = A.shape
    _, m2, n2 = B.shape
    fb, fa = kronecker_flops(m1, n1, m2, n2, r)
    out = []
    if fb <= 3 * fa:
        out.append("b_first")
        if m1 <= 64:
            out.append("b_first_bmm")  # N batched (m1, n1*r) @ (n1*r, m2) in one call
        if m2 <= 64:
            out.append("b_first_t")  # few output columns per A-block: transpose to flat matmuls
        if n1 * r <= 8:
            out.append("b_first_ew")  # A tiny: a few fused passes beat N tiny matmuls
        if x is not None and native_supported(A, B, x):
            out.append("native")  # B with few rows: one fused pass, no output transpose; tiny A: bias fused
    if fa <= 3 * fb:
        out.append("a_first")
        if m1 * r <= 64:
            out.append("a_first_bmm")
        if n1 <= 16:
            out.append("a_first_ew")
    return out


def _pick_order(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, rows: int,
                bias: Optional[torch.Tensor] = None) -> str:
    # the cache lookup first: this runs on every call, often with caches just flushed by the
    # previous layer's kernel, so the hit path touches as little as it can
    has_bias = bias is not None
    a_grad = A.requires_grad
    train = torch.is_grad_enabled() and (a_grad or x.requires_grad or B.requires_grad
                                         or (has_bias and bias.requires_grad))
    device = x.device.type
    # Outside training A's flag still counts: torch.matmul takes another (2-4x slower) path for
    # a 2-D operand that requires grad, even under no_grad (a parameter's views keep the flag),
    # so b_first / a_first are timed the way they will run
    key = (A.shape, B.shape, _rows_bucket(rows), x.dtype, device, has_bias, train, a_grad)
    order = _ORDER_CACHE.get(key)
    if order is not None:
        # the native kernel is opaque to torch.compile: traced code takes the default order
        return _default_order(A, B) if order == "native" and torch.compiler.is_compiling() else order
    if not _AUTOTUNE or rows == 0 or device == "meta" or torch.compiler.is_compiling():
        return _default_order(A, B)
    order = _ORDER_CACHE[key] = _time_orders(A.detach(), B.detach(), key[2], x.dtype, x.device, has_bias, train,
                                             a_grad)
    return order


def _time_orders(A, B, rows, dtype, device, has_bias: bool = False, train: bool = False,
                 a_requires_grad: bool = False) -> str:
    n = A.shape[2] * B.shape[2]
    m = A.shape[1] * B.shape[1]
    # no RNG draw: training stays reproducible
    x = torch.ones(rows, n, dtype=dtype, device=device)
    bias = torch.zeros(m, dtype=dtype, device=device) if has_bias else None
    if train:
        A, B = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
        x.requires_grad_(True)
        if bias is not None:
            bias.requires_grad_(True)
        g = torch.ones(rows, m, dtype=dtype, device=device)
    elif a_requires_grad:
        A = A.detach().requires_grad_(True)  # (see _pick_order: torch.matmul's path depends on it)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(order):
        if train:
            with torch.enable_grad():
                _kron_apply(x, A, B, order, bias).backward(g)
        else:
            with torch.no_grad():
                _kron_apply(x, A, B, order, bias)

    # Rounds over all candidates, best of each: load from other processes only ever adds
    # time, and alternating spreads it over the candidates alike.
    cands = _candidates(A, B, x)
    times = {order: math.inf for order in cands}
    t0 = time.perf_counter()
    for order in cands:
        run(order)  # warm-up
    sync()
    # 5 to 50 rounds: about 50 ms in all for small shapes, and under load at most about
    # 1 s after the fifth round
    rounds = min(50, max(5, int(0.05 / max(time.perf_counter() - t0, 1e-6))))
    start = time.perf_counter()
    for i in range(rounds):
        if i >= 5 and time.perf_counter() - start > 1.0:
            break
        for order in cands:
            sync()
            t0 = time.perf_counter()
            run(order)
            sync()
            times[order] = min(times[order], time.perf_counter() - t0)
    default = _default_order(A, B)
    best = min(times, key=times.get)
    # keep the default unless another strategy is clearly (5%) faster
    return best if times[best] < 0.95 * times[default] else default


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
        order: contraction strategy, ``"auto"`` (timed once per shape) or one of
            ``KRONECKER_ORDERS`` (see :func:`kronecker_matmul`).

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
        if order != "auto" and order not in KRONECKER_ORDERS:
            raise ValueError(f"order must be 'auto' or one of {KRONECKER_ORDERS}, got {order!r}")
        self.in_features, self.out_features = in_features, out_features
        self.a_shape, self.b_shape, self.rank = (m1, n1), (m2, n2), rank
        factory = {"device": device, "dtype": dtype}
        self.A = nn.Parameter(torch.empty(rank, m1, n1, **factory))
        self.B = nn.Parameter(torch.empty(rank, m2, n2, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.order = order
        self._native_shapes = _native_layout(self.A, self.B) is not None
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

    # (rows bucket, _ORDER_TOKEN, has bias) for which "auto" last chose the native kernel
    _native_memo: Optional[tuple] = None
    # whether the kernel covers the factor shapes (set in __init__; layers made without it ask)
    _native_shapes = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A, B, bias, order = self.A, self.B, self.bias, self.order
        native = order == "native" or (order == "auto" and self._native_shapes
                                        and not torch.compiler.is_compiling())
        if native and x.shape[-1] == self.in_features:  # (a wrong shape: _kron_apply raises)
            if order == "auto":
                # The native kernel's calls take 0.01-1 ms, and the Python around them costs tens
                # of µs with the caches the kernel leaves cold: once "auto" has chosen it for this
                # many rows, the layer goes straight to it. The kernel's own checks (dtype, device,
                # autograd, A's state) still decide whether it runs.
                rows = x.numel() // self.in_features
                memo = (_rows_bucket(rows), _ORDER_TOKEN, bias is not None)
                if memo != self._native_memo:
                    order = _pick_order(x, A, B, rows, bias)
                    if order != "native":
                        return _kron_apply(x, A, B, order, bias)
                    self._native_memo = memo
            y = native_kronecker_linear(x, A, B, bias)
            if y is not None:
                return y
        return _kron_apply(x, A, B, self.order, bias)

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
