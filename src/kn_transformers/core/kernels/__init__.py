"""The optional native CPU kernel for Kronecker layers (``kron_fused.c``, AVX-512, float32).

Nothing here runs unless asked for: :func:`kn_transformers.optimize_for_inference` or
``kn-transformers build-kernels`` compile ``kron_fused.c`` (shipped as package data) with the
system C compiler and load it with ``ctypes``. The default forward of every layer is plain
PyTorch and never imports this package, and it is not among the files that ``save_pretrained``
copies for ``trust_remote_code``.

The binary is cached under ``$KN_TRANSFORMERS_CACHE/kernels`` (default
``~/.cache/kn_transformers/kernels``, created with mode 0700), named by a hash of the source,
the flags and the compiler's identity; a second file records the SHA-256 of the binary, checked
before it is loaded (a binary that does not match is rebuilt, never loaded).

The kernel is registered as the ``torch.library`` custom op ``kn_transformers::kronecker_linear``
with a fake (meta) implementation, so that ``torch.compile`` and ``torch.export`` see it; eager
calls go straight to the implementation (the dispatcher's overhead is a sizeable part of a call
at a few tokens).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)

__all__ = ["KernelUnavailable", "build_kernels", "kernel_cache_dir", "load_kernels", "kernel_layout",
           "pack_a", "kronecker_linear_native"]

SOURCE = Path(__file__).with_name("kron_fused.c")
# -fopenmp: the kernel's threads come from the OpenMP runtime torch has already loaded
# (libgomp.so.1 is matched by soname), so they never spin against torch's own threads.
FLAGS = ("-O3", "-std=gnu11", "-mavx512f", "-mavx512dq", "-mfma", "-fopenmp", "-shared", "-fPIC")
_M2_SUPPORTED = (1, 2, 4, 8, 16)
_BLOCK = 64  # columns per packed block of A (kron_fused.c: CW)
_SMALL_A = 256  # A (rank, m1, n1) with at most this many entries takes the small-A kernel
# Up to this many rows of x as (N*n1, n2), a small A computes both stages in kn_small_a_rows;
# above it the B-stage goes to BLAS (measured crossover: 128-256 rows for B 384x384).
_FEW_ROWS = 128

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_failure: Optional[str] = None


class KernelUnavailable(RuntimeError):
    """The native kernel cannot be used on this machine (the message says why)."""


def kernel_cache_dir() -> Path:
    """Where compiled kernels are kept: ``$KN_TRANSFORMERS_CACHE/kernels`` or
    ``~/.cache/kn_transformers/kernels``."""
    root = os.environ.get("KN_TRANSFORMERS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                   "kn_transformers")
    return Path(root) / "kernels"


def _private_dir(path: Path) -> Path:
    """``path`` created with mode 0700, and refused unless this user owns it and nobody else may
    write to it (a binary others can replace must never be loaded)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise KernelUnavailable(f"the kernel cache {path} belongs to another user; set KN_TRANSFORMERS_CACHE")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        os.chmod(path, 0o700)
    return path


def _machine_problem() -> Optional[str]:
    """Why this machine cannot run the kernel, or ``None``."""
    if os.environ.get("KN_TRANSFORMERS_NATIVE", "1").lower() in ("0", "false", "no", "off"):
        return "disabled by KN_TRANSFORMERS_NATIVE=0"
    if not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"):
        return f"it needs Linux on x86-64 (this is {sys.platform} on {platform.machine()})"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512",):
        return f"this CPU has no AVX-512 ({torch.backends.cpu.get_cpu_capability()})"
    return None


def _compiler() -> tuple[str, str]:
    """The C compiler and its identity (first line of ``--version``), or raise."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise KernelUnavailable("no C compiler found (install gcc, or set CC)")
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        raise KernelUnavailable(f"the C compiler {cc!r} does not run ({err})") from None
    return cc, (out.stdout.splitlines() or [""])[0]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_kernels(force: bool = False) -> Path:
    """Compile ``kron_fused.c`` into the cache (if not there already) and return the binary's path.

    Raises :class:`KernelUnavailable` with the reason where the machine cannot run it.
    """
    problem = _machine_problem()
    if problem:
        raise KernelUnavailable(problem)
    cc, identity = _compiler()
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + "\0".join((*FLAGS, cc, identity)).encode()).hexdigest()[:20]
    folder = _private_dir(kernel_cache_dir())
    so = folder / f"kron_fused-{key}.so"
    digest = folder / f"kron_fused-{key}.sha256"
    if not force and so.exists() and digest.exists() and digest.read_text().strip() == _sha256(so):
        return so
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
        if proc.returncode:
            raise KernelUnavailable(f"compiling {SOURCE.name} failed: {proc.stderr.strip()[-300:]}")
        tmp_digest = _sha256(Path(tmp))
        os.replace(tmp, so)  # atomic: concurrent processes never load a half-written file
        fd, tmpd = tempfile.mkstemp(suffix=".sha256", dir=folder)
        with os.fdopen(fd, "w") as f:
            f.write(tmp_digest)
        os.replace(tmpd, digest)
    except (OSError, subprocess.SubprocessError) as err:
        raise KernelUnavailable(f"compiling {SOURCE.name} failed ({err})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return so


def _load(path: Path) -> ctypes.CDLL:
    digest = path.with_suffix(".sha256")
    if not digest.exists() or digest.read_text().strip() != _sha256(path):
        raise KernelUnavailable(f"{path} does not match its recorded SHA-256; not loaded")
    lib = ctypes.CDLL(str(path))
    if not lib.kn_cpu_has_avx512():
        raise KernelUnavailable("this CPU has no AVX-512F/DQ")
    ptrs = [ctypes.c_void_p]
    lib.kn_small_a_rows.restype = ctypes.c_int
    lib.kn_small_a_rows.argtypes = ptrs * 5 + [ctypes.c_long] + [ctypes.c_int] * 6
    lib.kn_small_a_stage.restype = ctypes.c_int
    lib.kn_small_a_stage.argtypes = ptrs * 4 + [ctypes.c_long] + [ctypes.c_int] * 4
    lib.kn_fuses_b_stage.restype = ctypes.c_int
    lib.kn_fuses_b_stage.argtypes = [ctypes.c_int] * 4
    lib.kn_kron_forward.restype = ctypes.c_int
    lib.kn_kron_forward.argtypes = ptrs * 6 + [ctypes.c_long] + [ctypes.c_int] * 6
    return lib


def load_kernels() -> ctypes.CDLL:
    """The loaded kernel library (built first if needed); raises :class:`KernelUnavailable`.

    Tried once per process: a failure is remembered and raised again."""
    global _lib, _failure
    if _lib is not None:  # every layer call comes here: no lock once loaded
        return _lib
    with _lock:
        if _lib is None and _failure is None:
            try:
                path = build_kernels()
                try:
                    _lib = _load(path)
                except KernelUnavailable:  # a damaged cache entry: rebuilt once, then trusted by hash
                    _lib = _load(build_kernels(force=True))
            except KernelUnavailable as err:
                _failure = str(err)
        if _lib is None:
            raise KernelUnavailable(_failure)
        return _lib


def kernel_layout(A_shape, B_shape) -> Optional[str]:
    """Which kernel fits factors of shapes ``(rank, m1, n1)`` and ``(rank, m2, n2)``:
    ``"large_a"`` (B with 1-16 rows, ``m1·m2`` a multiple of 16: the fused interleave),
    ``"small_a"`` (A with at most 256 entries and B with more than 16 rows: the bias-fused
    streaming A-stage), or ``None``."""
    r, m1, n1 = A_shape
    m2 = B_shape[1]
    if m2 in _M2_SUPPORTED and (m1 * m2) % 16 == 0:
        return "large_a"
    if m2 > 16 and r * m1 * n1 <= _SMALL_A:
        return "small_a"
    return None


def pack_a(A: torch.Tensor, m2: int, layout: str) -> torch.Tensor:
    """``A`` (rank, m1, n1) in the kernel's layout (plain torch ops, so traceable), flat float32.

    ``small_a``: ``(m1, n1*rank)``, column ``(j1, r)``. ``large_a``: ``Ad[k, i1*m2 + i2] = A_r[i1, j1]``
    (``k = (j1, r)``, A's columns repeated ``m2`` times) in column blocks of 64, each ``(K, 64)``.
    """
    r, m1, n1 = A.shape
    A = A.detach().resolve_conj().resolve_neg()
    K = n1 * r
    if layout == "small_a":
        return A.permute(1, 2, 0).reshape(-1).contiguous()
    M = m1 * m2
    a_dup = A.permute(2, 0, 1).reshape(K, m1).repeat_interleave(m2, dim=1)
    full = M - M % _BLOCK
    parts = [a_dup[:, :full].reshape(K, full // _BLOCK, _BLOCK).transpose(0, 1).reshape(-1)]
    if full < M:
        parts.append(a_dup[:, full:].reshape(-1))
    return torch.cat(parts).contiguous()


def _plain(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A contiguous tensor without the conjugate/negative bits (whose bytes are what they read);
    ``t`` itself when it already is one."""
    if t is None:
        return None
    return t.resolve_conj().resolve_neg().contiguous()


def kronecker_linear_native(x: torch.Tensor, packed: torch.Tensor, B: torch.Tensor, bias: Optional[torch.Tensor],
                            m1: int, n1: int, layout: str) -> torch.Tensor:
    """``x @ (Σ_r A_r ⊗ B_r)ᵀ + bias`` by the native kernel, ``A`` given as :func:`pack_a` made it.

    Args:
        x: ``(..., n1*n2)`` float32 CPU; B: ``(rank, m2, n2)``; bias: ``(m1*m2,)`` or ``None``.

    Returns ``(..., m1*m2)`` float32, without autograd. Raises :class:`KernelUnavailable` where the
    kernel cannot be loaded. Eager calls of the op land here directly.
    """
    lib = load_kernels()
    r, m2, n2 = B.shape
    M = m1 * m2
    shape = x.shape
    if shape[-1] != n1 * n2 or (bias is not None and bias.numel() != M):
        raise ValueError(f"x {tuple(shape)} and bias {None if bias is None else tuple(bias.shape)} do not fit "
                         f"A ({r}, {m1}, {n1}) and B {tuple(B.shape)}: need x (..., {n1 * n2}) and bias ({M},)")
    y = torch.empty((*shape[:-1], M), dtype=torch.float32, device="cpu")
    N = x.numel() // (n1 * n2)
    if N == 0:  # (an empty tensor's data pointer may be NULL, which the kernel reads as "no input")
        return y
    # the tensors whose pointers the kernel reads stay referenced until it returns
    # B detached: torch.mm takes a slower path for an operand that requires grad, even under no_grad
    x, B, bias = _plain(x), _plain(B.detach()), _plain(bias)
    b = bias.data_ptr() if bias is not None else None
    threads = torch.get_num_threads()
    a = packed.data_ptr()
    if layout == "small_a" and n2 % 16 == 0 and m2 % 16 == 0 and r <= 16 and N * n1 <= _FEW_ROWS:
        # few rows: both stages in one call, without BLAS's call overhead
        rc = lib.kn_small_a_rows(x.data_ptr(), B.data_ptr(), a, b, y.data_ptr(), N, n1, n2, r, m1, m2, threads)
    elif layout == "large_a" and lib.kn_fuses_b_stage(n1, n2, r, m2):
        # both stages in the kernel, tile by tile (x is read once, t never leaves the cache)
        rc = lib.kn_kron_forward(x.data_ptr(), B.data_ptr(), None, a, b, y.data_ptr(), N, n1, n2, r, m2, M,
                                 threads)
    else:
        # B-stage by BLAS, t[n, (j1, r), i2] = Σ_j2 x[n, j1, j2] B_r[i2, j2]
        t = torch.mm(x.view(N * n1, n2), B.view(r * m2, n2).T)
        if layout == "small_a":  # then the A-stage and the bias in one streaming pass
            rc = lib.kn_small_a_stage(t.data_ptr(), a, b, y.data_ptr(), N, n1 * r, m1, m2, threads)
        else:  # then the A-stage, the interleave and the bias
            rc = lib.kn_kron_forward(None, None, t.data_ptr(), a, b, y.data_ptr(), N, n1, n2, r, m2, M, threads)
    if rc:
        raise RuntimeError(f"the native Kronecker kernel failed for x {tuple(shape)}, A ({r}, {m1}, {n1}), "
                           f"B {tuple(B.shape)} (out of memory?)")
    return y


@torch.library.custom_op("kn_transformers::kronecker_linear", mutates_args=())
def _kronecker_linear_op(x: torch.Tensor, packed: torch.Tensor, B: torch.Tensor, bias: Optional[torch.Tensor],
                         m1: int, n1: int, layout: str) -> torch.Tensor:
    return kronecker_linear_native(x, packed, B, bias, m1, n1, layout)


@_kronecker_linear_op.register_fake
def _(x, packed, B, bias, m1, n1, layout):
    return x.new_empty((*x.shape[:-1], m1 * B.shape[1]), dtype=torch.float32)


kronecker_linear_op = torch.ops.kn_transformers.kronecker_linear
