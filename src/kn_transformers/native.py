"""An optional native CPU kernel for Kronecker layers whose ``B`` factor has few rows.

With ``B`` of shape ``(m2, n2)`` and ``m2`` in 2..16 (KroneckerBERT's attention splits, e.g.
``A 384×48 ⊗ B 2×16``), the product with ``A`` has no fast BLAS form: it is either ``N`` tiny
matmuls or a flat matmul whose ``(N, m2, m1)`` output must be transposed into ``(N, m1, m2)``
order, a full pass over the output. ``csrc/kron_fused.c`` computes that product with the
interleave fused (AVX-512, float32, inference only).

The kernel is compiled on first use with the system C compiler (about a second, cached under
``$KN_TRANSFORMERS_CACHE`` or ``~/.cache/kn_transformers``) and loaded with ``ctypes``.
Without a compiler, on a CPU without AVX-512, or with ``KN_TRANSFORMERS_NATIVE=0`` it is
simply not offered to the strategy picker: every other strategy is pure PyTorch.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import weakref
from typing import Optional

import torch

logger = logging.getLogger(__name__)

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "kron_fused.c")
# -fopenmp: the kernel's threads come from the OpenMP runtime torch has already loaded
# (libgomp.so.1 is matched by soname), so they never spin against torch's own threads.
_FLAGS = ["-O3", "-std=gnu11", "-mavx512f", "-mavx512dq", "-mfma", "-fopenmp", "-shared", "-fPIC"]
_M2_SUPPORTED = (1, 2, 4, 8, 16)
_BLOCK = 64  # columns per packed block of A (csrc/kron_fused.c: CW)

_lib = None
_tried = False
_lock = threading.Lock()
_packed: dict = {}
# byte comparison of a cached factor with its saved copy: a few µs where torch.equal costs ~10
_memcmp = ctypes.CDLL(None).memcmp if sys.platform.startswith("linux") else None
if _memcmp is not None:
    _memcmp.restype = ctypes.c_int
    _memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]


def _cache_dir() -> str:
    root = os.environ.get("KN_TRANSFORMERS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kn_transformers")
    return os.path.join(root, "native")


def _build() -> Optional[ctypes.CDLL]:
    if os.environ.get("KN_TRANSFORMERS_NATIVE", "1").lower() in ("0", "false", "no", "off"):
        return None
    if not sys.platform.startswith("linux") or not os.path.exists(_SOURCE):
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.info("kn_transformers: no C compiler found; the fused Kronecker CPU kernel is not used")
        return None
    with open(_SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read() + " ".join(_FLAGS).encode()).hexdigest()[:16]
    path = os.path.join(_cache_dir(), f"kron_fused_{digest}.so")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
        os.close(fd)
        try:
            subprocess.run([compiler, *_FLAGS, _SOURCE, "-o", tmp], check=True, capture_output=True, timeout=120)
            os.replace(tmp, path)  # atomic: concurrent processes never load a half-written file
        except (OSError, subprocess.SubprocessError) as err:
            detail = getattr(err, "stderr", b"") or b""
            logger.info("kn_transformers: building the fused Kronecker CPU kernel failed (%s); not used. %s",
                        err, detail.decode(errors="replace")[-500:])
            if os.path.exists(tmp):
                os.remove(tmp)
            return None
    lib = ctypes.CDLL(path)
    if not lib.kn_cpu_has_avx512():
        return None
    f = lib.kn_kron_forward
    f.restype = ctypes.c_int
    f.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_long] + [ctypes.c_int] * 6
    return lib


def _library() -> Optional[ctypes.CDLL]:
    global _lib, _tried
    if not _tried:
        with _lock:
            if not _tried:
                _lib = _build()
                _tried = True
    return _lib


def native_supported(A: torch.Tensor, B: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether :func:`native_kronecker_linear` can compute ``x @ (Σ A_r ⊗ B_r)ᵀ`` here:
    float32 CPU tensors, ``B`` with 1, 2, 4, 8 or 16 rows, ``m1·m2`` a multiple of 16, no
    autograd, and the kernel built (on the first call)."""
    m2 = B.shape[1]
    if x.device.type != "cpu" or A.device.type != "cpu" or x.dtype != torch.float32 or A.dtype != torch.float32:
        return False
    if m2 not in _M2_SUPPORTED or (A.shape[1] * m2) % 16:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad):
        return False
    return _library() is not None


def _pack_a(A: torch.Tensor, m2: int) -> torch.Tensor:
    """``A`` as the kernel reads it: ``a_dup[k, i1*m2 + i2] = A_r[i1, j1]`` (``k = (j1, r)``),
    stored in column blocks of 64 (each block row-major ``(K, 64)``).

    Cached per factor tensor, so inference pays for the packing once; a hit also needs the
    factor's values to equal a saved copy (updates through ``.data`` do not bump the version).
    """
    key = id(A)
    hit = _packed.get(key)
    if hit is not None and hit[0]() is A and hit[1] == (A._version, m2, A.data_ptr()) and A.is_contiguous():
        saved = hit[2]
        if _memcmp(saved.data_ptr(), A.data_ptr(), saved.numel() * saved.element_size()) == 0:
            return hit[3]
    r, m1, n1 = A.shape
    K, M = n1 * r, m1 * m2
    a_dup = A.detach().permute(2, 0, 1).reshape(K, m1).repeat_interleave(m2, dim=1)  # (K, M)
    full = M - M % _BLOCK
    parts = [a_dup[:, :full].reshape(K, full // _BLOCK, _BLOCK).transpose(0, 1).reshape(-1)]
    if full < M:
        parts.append(a_dup[:, full:].reshape(-1))
    packed = torch.cat(parts).contiguous()
    try:
        ref = weakref.ref(A, lambda _, k=key: _packed.pop(k, None))
    except TypeError:
        return packed
    _packed[key] = (ref, (A._version, m2, A.data_ptr()), A.detach().clone(), packed)
    return packed


def native_kronecker_linear(x3: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                            bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x @ (Σ_r A_r ⊗ B_r)ᵀ + bias`` in one fused pass (see ``csrc/kron_fused.c``).

    Args:
        x3: ``(N, n1, n2)`` float32.
        A: ``(rank, m1, n1)``; B: ``(rank, m2, n2)``; bias: ``(m1*m2,)`` or ``None``.

    Returns:
        ``(N, m1*m2)``. No autograd: check :func:`native_supported` first.
    """
    lib = _library()
    N, n1, n2 = x3.shape
    r, m1, _ = A.shape
    m2 = B.shape[1]
    # the cache key is the factor itself: with rank folded in, A is (rank, m1, n1) already
    adp = _pack_a(A, m2)
    b = bias.contiguous() if bias is not None else None  # data_ptr needs no detach
    y = torch.empty(N, m1 * m2, dtype=x3.dtype, device=x3.device)
    Bc = B.contiguous()
    if n1 % 16 == 0 and n2 % 16 == 0 and r * m2 in _M2_SUPPORTED:
        # both stages in the kernel, tile by tile (x is read once, t never leaves the cache)
        x3 = x3.contiguous()
        rc = lib.kn_kron_forward(x3.data_ptr(), Bc.data_ptr(), None, adp.data_ptr(),
                                 b.data_ptr() if b is not None else None, y.data_ptr(),
                                 N, n1, n2, r, m2, m1 * m2, torch.get_num_threads())
    else:
        # B-stage by BLAS, t[n, (j1, r), i2] = Σ_j2 x[n, j1, j2] B_r[i2, j2] (one flat matmul);
        # the A-stage, the interleave and the bias in the kernel
        t = (x3.reshape(N * n1, n2) @ Bc.detach().reshape(r * m2, n2).T).contiguous()
        rc = lib.kn_kron_forward(None, None, t.data_ptr(), adp.data_ptr(), b.data_ptr() if b is not None else None,
                                 y.data_ptr(), N, n1, n2, r, m2, m1 * m2, torch.get_num_threads())
    if rc:
        raise RuntimeError(f"the native Kronecker kernel failed for x {tuple(x3.shape)}, A {tuple(A.shape)}, "
                           f"B {tuple(B.shape)} (out of memory?)")
    return y
