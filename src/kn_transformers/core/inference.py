"""``optimize_for_inference``: an explicit call that prepares Kronecker layers for fast CPU inference.

The default forward of :class:`~kn_transformers.KroneckerLinear` is plain PyTorch with a fixed
contraction order, the same in every process. This module is the opt-in fast path, in the shape
of Intel's ``ipex.optimize(model)``: it times the contraction strategies per layer shape and row
count, and where the native kernel (:mod:`kn_transformers.core.kernels`) covers a layer it packs
``A`` once into the kernel's layout.

What happens when a factor changes afterwards: each call compares ``A``'s version counter and data
pointer with those its packed copy was made from (two integer reads) and repacks on a mismatch, so
optimizer steps, ``copy_``, ``load_state_dict``, ``.to()`` and assigning ``A.data`` are all seen.
Writes that bypass the version counter (``A.data.copy_(...)``, through a NumPy view) are not: after
such a write call :func:`optimize_for_inference` again (it repacks). Training (anything requiring
grad under grad mode) always runs the default path.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Optional

import torch
from torch import nn

from .contraction import _kron_apply, contraction_order
from .kernels import (KernelUnavailable, kernel_layout, kronecker_linear_native, kronecker_linear_op, load_kernels,
                      pack_a)
from .layers import KroneckerLinear
from .kronecker_math import kronecker_flops

logger = logging.getLogger(__name__)

__all__ = ["optimize_for_inference", "OptimizedKroneckerLinear"]

NATIVE = "native"


def _rows_bucket(rows: int) -> int:
    """Strategies are timed once per power of two of rows: ``rows`` rounded up to one."""
    return 1 << max(rows - 1, 0).bit_length()


def _candidates(A: torch.Tensor, B: torch.Tensor, native: bool) -> list[str]:
    """The strategies worth timing for these factors: the two orders, the variants that suit tiny
    factors, and the native kernel where it covers them. An order with more than three times the
    other's FLOPs is not tried (it never wins, and timing it under load could pick it by mistake)."""
    r, m1, n1 = A.shape
    _, m2, n2 = B.shape
    fb, fa = kronecker_flops(m1, n1, m2, n2, r)
    out = []
    if fb <= 3 * fa:
        out.append("b_first")
        if m1 <= 64:
            out.append("b_first_bmm")
        if m2 <= 64:
            out.append("b_first_t")
        if n1 * r <= 8:
            out.append("b_first_ew")
        if native:
            out.append(NATIVE)
    if fa <= 3 * fb:
        out.append("a_first")
        if m1 * r <= 64:
            out.append("a_first_bmm")
        if n1 <= 16:
            out.append("a_first_ew")
        if n2 <= 16:
            out.append("a_first_t")
    return out


class _Tuner:
    """The strategies timed by one :func:`optimize_for_inference` call, shared by its layers (layers
    of one shape are timed once). Lives as long as the layers it prepared; nothing is global."""

    def __init__(self, autotune: bool):
        self.autotune = autotune
        self.choices: dict = {}

    def order(self, layer: "OptimizedKroneckerLinear", x: torch.Tensor, rows: int) -> str:
        A, B, bias = layer.A, layer.B, layer.bias
        native = layer._native_layout is not None and _native_operands(x, A, B, bias)
        key = (A.shape, B.shape, _rows_bucket(rows), x.dtype, x.device.type, bias is not None, A.requires_grad,
               native)
        order = self.choices.get(key)
        if order is None:
            if not self.autotune or rows == 0:
                order = NATIVE if native else contraction_order(A, B)
            else:
                order = _time_orders(layer, key[2], x.dtype, x.device, _candidates(A, B, native))
            self.choices[key] = order
        return order


def _native_operands(x, A, B, bias) -> bool:
    f32 = torch.float32
    return (x.dtype == f32 and A.dtype == f32 and B.dtype == f32 and x.is_cpu and A.is_cpu and B.is_cpu
            and (bias is None or (bias.dtype == f32 and bias.is_cpu)))


def _time_orders(layer, rows: int, dtype, device, candidates: list[str]) -> str:
    """The fastest of ``candidates`` on ``rows`` rows (inference), keeping the default order unless
    another is clearly (5%) faster. Best of rounds over all candidates: load from other processes
    only ever adds time, and alternating spreads it over the candidates alike."""
    A, B, bias = layer.A, layer.B, layer.bias
    x = torch.ones(rows, layer.in_features, dtype=dtype, device=device)  # no RNG draw
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(order):
        with torch.no_grad():
            if order == NATIVE:
                layer._native_forward(x)
            else:
                _kron_apply(x, A, B, order, bias)

    times = {order: math.inf for order in candidates}
    t0 = time.perf_counter()
    for order in candidates:
        run(order)  # warm-up
    sync()
    rounds = min(50, max(5, int(0.05 / max(time.perf_counter() - t0, 1e-6))))
    start = time.perf_counter()
    for i in range(rounds):
        if i >= 5 and time.perf_counter() - start > 1.0:
            break
        for order in candidates:
            sync()
            t0 = time.perf_counter()
            run(order)
            sync()
            times[order] = min(times[order], time.perf_counter() - t0)
    default = contraction_order(A, B)
    best = min(times, key=times.get)
    return best if times[best] < 0.95 * times.get(default, math.inf) else default


class OptimizedKroneckerLinear(KroneckerLinear):
    """A :class:`KroneckerLinear` prepared by :func:`optimize_for_inference` (same parameters, same
    state dict). Inference takes the timed strategy or the native kernel; training, and anything the
    fast path does not cover, takes the default forward."""

    _tuner: _Tuner
    _native_layout: Optional[str] = None
    _packed = None  # (A packed for the kernel, A's version, A's data pointer)
    _last = (-1, None)  # (rows, order) of the previous call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A, B, bias = self.A, self.B, self.bias
        if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            return super().forward(x)  # training: the default path
        if x.shape[-1] != self.in_features:
            return super().forward(x)  # (raises the default path's error)
        if torch.compiler.is_compiling():
            # traced: the kernel as the custom op, A packed inside the graph
            if self._native_layout is not None and _native_operands(x, A, B, bias):
                return kronecker_linear_op(x, pack_a(A, self.b_shape[0], self._native_layout), B, bias,
                                           self.a_shape[0], self.a_shape[1], self._native_layout)
            return super().forward(x)
        rows = x.numel() // self.in_features
        last_rows, order = self._last
        if rows != last_rows:
            order = self._tuner.order(self, x, rows)
            self._last = (rows, order)
        if order == NATIVE and _native_operands(x, A, B, bias):
            return self._native_forward(x)
        if order == NATIVE:
            order = contraction_order(A, B)
        return _kron_apply(x, A, B, order, bias)

    def _packed_a(self) -> torch.Tensor:
        A = self.A
        p = self._packed
        if p is None or p[1] != A._version or p[2] != A.data_ptr():
            p = self._packed = (pack_a(A, self.b_shape[0], self._native_layout), A._version, A.data_ptr())
        return p[0]

    def _native_forward(self, x: torch.Tensor) -> torch.Tensor:
        return kronecker_linear_native(x, self._packed_a(), self.B, self.bias, self.a_shape[0], self.a_shape[1],
                                       self._native_layout)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", optimized=True, native={self._native_layout is not None}"


def optimize_for_inference(module: nn.Module, native: bool = True, autotune: bool = True) -> nn.Module:
    """Prepare every :class:`KroneckerLinear` in ``module`` (a whole model or one layer) for fast
    inference, in place, and return ``module``.

    Args:
        module: any ``nn.Module`` holding Kronecker layers.
        native: use the native CPU kernel where it covers a layer's shapes (float32, CPU). It is
            compiled on first use (see :mod:`kn_transformers.core.kernels`); where it cannot be had
            (no AVX-512, no compiler, not x86-64 Linux) one warning says why and the layers use
            plain PyTorch.
        autotune: time the contraction strategies (and the kernel) once per layer shape and
            power-of-two row count at first use, and keep the fastest; ``False`` uses the default
            order, or the kernel where it applies.

    The parameters and the state dict are unchanged (``save_pretrained`` writes the same files),
    and training still works (it takes the default path). Calling it again repacks the factors.
    Results can differ from the default path's at rounding level (another summation order).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"optimize_for_inference expects an nn.Module, got {type(module).__name__}")
    layers = [m for m in module.modules() if isinstance(m, KroneckerLinear)]
    if not layers:
        raise ValueError(f"optimize_for_inference found no Kronecker layers in {type(module).__name__}")
    use_native = False
    if native:
        try:
            load_kernels()
            use_native = True
        except KernelUnavailable as err:
            logger.warning("kn_transformers: the native Kronecker kernel is not used (%s); plain PyTorch", err)
    tuner = _Tuner(autotune)
    for layer in layers:
        layer.__class__ = OptimizedKroneckerLinear
        layer._tuner = tuner
        layer._packed = None
        layer._last = (-1, None)
        layout = kernel_layout(layer.A.shape, layer.B.shape) if use_native else None
        if layout is not None and layer.A.is_inference():
            # no version counter to tell a changed factor: such layers stay on plain PyTorch
            logger.warning("kn_transformers: %s was made under torch.inference_mode; it runs without the native "
                           "kernel (load the model outside inference_mode to use it)", type(layer).__name__)
            layout = None
        layer._native_layout = layout
    return module
