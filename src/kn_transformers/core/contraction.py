"""Computing ``x @ (Σ_r A_r ⊗ B_r)ᵀ`` without building the product: the contraction strategies
and the fixed rule that picks one from the shapes.

For ``x`` viewed as ``X`` of shape ``(n1, n2)``, ``(A ⊗ B) x = vec(A X Bᵀ)`` (row-major ``vec``):
two small matrix products instead of one large one. Plain PyTorch, deterministic, differentiable
(autograd, ``torch.func``), traceable by ``torch.compile``, any device and dtype. Imports torch
only, so that it travels with the modeling files saved for ``trust_remote_code``. The timed
choice and the compiled CPU kernel are opt-in: :func:`kn_transformers.optimize_for_inference`.
"""

from __future__ import annotations

from typing import Optional

import torch

from .kronecker_math import kronecker_flops

__all__ = ["KRONECKER_ORDERS", "contraction_order", "kronecker_matmul"]

# ``A`` with at most this many rows (times the rank for the A-first orders) is batched as one
# ``bmm`` call; larger ones are broadcast by ``torch.matmul``
_BMM_MAX_ROWS = 64


def contraction_order(A: torch.Tensor, B: torch.Tensor) -> str:
    """The strategy ``order="auto"`` uses for factors ``A`` (rank, m1, n1) and ``B`` (rank, m2, n2).

    The order with fewer multiply-adds (:func:`kronecker_flops`; ``b_first`` on a tie), in its
    one-call ``bmm`` form when ``A`` has at most 64 rows (``m1``, times the rank for
    ``a_first``); with a one-column ``B`` the A-first order takes ``a_first_t`` (one flat
    matmul instead of ``N`` matrix-vector products). A rule on the shapes alone: the same model computes the same way in every
    process. It reproduces the winners that timing found across the splits in RESULTS.md
    (``b_first_bmm`` / ``a_first_bmm`` for small ``A``, ``b_first`` for ``A 384×48``).
    """
    r, m1, n1 = A.shape
    _, m2, n2 = B.shape
    fb, fa = kronecker_flops(m1, n1, m2, n2, r)
    if fb <= fa:
        return "b_first_bmm" if m1 <= _BMM_MAX_ROWS else "b_first"
    if n2 == 1:
        return "a_first_t"
    return "a_first_bmm" if m1 * r <= _BMM_MAX_ROWS else "a_first"


def graph_contraction_order(A: torch.Tensor, B: torch.Tensor) -> str:
    """The order for graph runtimes (ONNX Runtime), where a copy of the activations (a transpose)
    costs as much as a small matmul.

    The family with fewer multiply-adds (B first or A first), then the first form of it that fits:
    ``*_expand`` where multiplying by ``A ⊗ I`` still costs at most half the dense layer (two flat
    matmuls, no copy: ``A 384×48 ⊗ B 2×16``); the ``bmm`` forms for a tiny ``A`` (at most 32
    entries: one broadcast matmul, which the runtime runs well when ``A`` is tiny: FFN splits
    ``A 8×2``); ``a_first_cols`` for a ``B`` with at most two columns (``A 384×384 ⊗ B 2×2``);
    else the flat forms (``b_first_flat``, ``a_first_t``: each stage one 2-D matmul, with
    transposes). Each choice is the fastest form measured for its layer shape by
    ``benchmarks/bench_onnx_layers.py``.
    """
    r, m1, n1 = A.shape
    _, m2, n2 = B.shape
    dense = m1 * m2 * n1 * n2
    fb, fa = kronecker_flops(m1, n1, m2, n2, r)
    b_family = fb <= fa
    expand = (n1 * r * m2 * (n2 + m1 * m2) if b_family else m1 * r * n2 * (n1 * n2 + m2))
    if 2 * expand <= dense:
        return "b_first_expand" if b_family else "a_first_expand"
    if m1 * n1 * r <= 32:
        return "b_first_bmm" if b_family else "a_first_bmm"
    if n2 <= 2:
        return "a_first_cols"
    return "b_first_flat" if b_family else "a_first_t"


def kronecker_matmul(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, order: str = "auto") -> torch.Tensor:
    """``x @ (Σ_r A_r ⊗ B_r)ᵀ`` without building the product.

    Args:
        x: ``(..., n1*n2)``.
        A: ``(rank, m1, n1)``; B: ``(rank, m2, n2)``.
        order: the contraction strategy: ``"auto"`` (:func:`contraction_order`, a fixed rule on
            the shapes) or one of :data:`KRONECKER_ORDERS`:

            * ``"b_first"``: one flat matmul with ``B`` on the contiguous axis, then a
              broadcast matmul with ``A``;
            * ``"a_first"``: a broadcast matmul with ``A``, then one flat matmul with ``B``;
            * ``"b_first_bmm"`` / ``"a_first_bmm"``: as ``b_first`` / ``a_first``, the
              product with ``A`` one ``bmm`` call over the rows (no copies): fast when
              ``A`` is small (up to 64 rows);
            * ``"b_first_t"``: as ``b_first``, but the intermediate is transposed (one small
              copy) so that the product with ``A`` is also one flat matmul, and the output is
              transposed back: can be fast when ``B`` has few rows (e.g. ``B`` 2×16);
            * ``"a_first_t"``: as ``a_first``, the input transposed so that the product with ``A``
              is one flat matmul: for a ``B`` with one or a few columns (e.g. ``A 32×768``);
            * ``"b_first_ew"`` / ``"a_first_ew"``: the product with ``A`` as ``n1·rank``
              fused multiply-add passes instead of ``N`` tiny matmuls: for a tiny ``A``;
            * ``"b_first_expand"`` / ``"a_first_expand"``: both stages flat matmuls over all rows,
              with no copy of the activations: the stage with ``A`` multiplies by ``A ⊗ I`` (the
              identity of ``B``'s rows, resp. columns), built from ``A`` on each call. It costs
              ``m2`` (resp. ``n2``) times that stage's multiply-adds, a price worth paying where
              ``B`` is small and a graph runtime's transposes are slow (ONNX Runtime: built once,
              by constant folding);
            * ``"a_first_cols"``: one flat matmul with ``A`` per column ``j2`` of ``X`` (a strided
              slice), then its product with that column of ``B`` (a matmul over the rank), summed:
              no transpose, for a ``B`` with few columns and a large ``A`` (``A 384×384 ⊗ B 2×2``)
              in a graph runtime.

    Returns:
        ``(..., m1*m2)``.

    Every strategy computes the same product (to rounding); the rank is folded into the inner
    dimension of the matmuls, so a sum of terms costs two matmuls, not 2·rank. The same inputs
    and order give the same output in every process: nothing here is timed or cached.
    """
    return _kron_apply(x, A, B, order, None)


# The contraction strategies (see kronecker_matmul); all compute the same product.
KRONECKER_ORDERS = ("b_first", "a_first", "b_first_t", "a_first_t", "b_first_bmm", "a_first_bmm", "b_first_ew",
                    "a_first_ew", "b_first_flat", "b_first_expand", "a_first_expand", "a_first_cols")


def _kron_apply(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, order: str,
                bias: Optional[torch.Tensor], bias_last: bool = False) -> torch.Tensor:
    """``x @ (Σ_r A_r ⊗ B_r)ᵀ (+ bias)``, the bias folded into the last step where possible, or
    with ``bias_last`` added to the output in ``x``'s shape: the pattern a graph runtime fuses
    into what follows (ONNX Runtime: bias + GELU, bias + residual + LayerNorm)."""
    _, m1, n1 = A.shape
    _, m2, n2 = B.shape
    shape = x.shape
    if shape[-1] != n1 * n2:
        raise ValueError(f"input has {shape[-1]} features, the Kronecker factors expect {n1 * n2}")
    N = x.numel() // (n1 * n2)
    if order == "auto":
        order = contraction_order(A, B)
    strategy = _STRATEGY_FNS.get(order)
    if strategy is None:
        raise ValueError(f"order must be 'auto' or one of {KRONECKER_ORDERS}, got {order!r}")
    y = strategy(x.reshape(N, n1, n2), A, B, None if bias_last else bias)
    y = y.reshape(*shape[:-1], m1 * m2)
    return y + bias if bias_last and bias is not None else y


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


def _order_b_first_flat(x3, A, B, bias):
    # b_first_t with the bias added after the flat matmul instead of riding in it (its identity
    # block is N·m2² values: fine for the small m2 the tuner gives b_first_t, not for any m2)
    y = _order_b_first_t(x3, A, B, None)
    return y if bias is None else y + bias


def _order_a_first_t(x3, A, B, bias):
    N, n1, n2 = x3.shape
    r, m1, _ = A.shape
    m2 = B.shape[1]
    a_stack = A.permute(1, 0, 2).reshape(m1 * r, n1)
    # the product with A as one flat matmul over the rows (N, j2): for a B with few columns this
    # replaces N matrix-vector products (a copy of x when n2 > 1, none when n2 = 1)
    xt = x3.transpose(1, 2).reshape(N * n2, n1)
    t = (xt @ a_stack.T).view(N, n2, m1 * r).transpose(1, 2)  # (N, m1*r, n2)
    if n2 > 1:
        t = t.contiguous()
    return _add_bias_(_b_last(t, B, N * m1).view(N, m1 * m2), bias)


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


def _expand(M: torch.Tensor, k: int) -> torch.Tensor:
    """``M ⊗ I_k`` of ``M`` ``(p, q)``: ``(p*k, q*k)``, built by broadcasting (no ``torch.kron``)."""
    p, q = M.shape
    eye = torch.eye(k, dtype=M.dtype, device=M.device)
    return (M[:, None, :, None] * eye[None, :, None, :]).reshape(p * k, q * k)


def _order_b_first_expand(x3, A, B, bias):
    N = x3.shape[0]
    r, m1, n1 = A.shape
    m2 = B.shape[1]
    t = _b_stage(x3, B).reshape(N, n1 * r * m2)  # columns (j1, r, i2)
    y = t @ _expand(_a_cat(A).T, m2)  # (n1*r*m2, m1*m2): rows (j1, r, i2'), columns (i1, i2)
    return y if bias is None else y + bias


def _order_a_first_expand(x3, A, B, bias):
    N, n1, n2 = x3.shape
    r, m1, _ = A.shape
    a_stack = A.permute(1, 0, 2).reshape(m1 * r, n1)  # rows (i1, r)
    t = x3.reshape(N, n1 * n2) @ _expand(a_stack.T, n2)  # (N, m1*r*n2): columns (i1, r, j2)
    return _add_bias_(_b_last(t, B, N * m1).view(N, m1 * B.shape[1]), bias)


def _order_a_first_cols(x3, A, B, bias):
    N, n1, n2 = x3.shape
    r, m1, _ = A.shape
    m2 = B.shape[1]
    a_stack_t = A.permute(1, 0, 2).reshape(m1 * r, n1).T  # (n1, m1*r): columns (i1, r)
    y = None
    for j in range(n2):
        t = (x3[:, :, j] @ a_stack_t).reshape(N * m1, r)
        term = t @ B[:, :, j]  # (N*m1, m2): Σ_r t[(N, i1), r] B_r[i2, j]
        y = term if y is None else y + term
    y = y.reshape(N, m1 * m2)
    return y if bias is None else y + bias


_STRATEGY_FNS = {
    "b_first": _order_b_first,
    "a_first": _order_a_first,
    "b_first_t": _order_b_first_t,
    "b_first_flat": _order_b_first_flat,
    "b_first_bmm": _order_b_first_bmm,
    "a_first_bmm": _order_a_first_bmm,
    "a_first_t": _order_a_first_t,
    "b_first_ew": _order_b_first_ew,
    "a_first_ew": _order_a_first_ew,
    "b_first_expand": _order_b_first_expand,
    "a_first_expand": _order_a_first_expand,
    "a_first_cols": _order_a_first_cols,
}
