"""An optional native CPU kernel for Kronecker layers where BLAS has no fast form.

- ``B`` with few rows: with ``B`` of shape ``(m2, n2)`` and ``m2`` in 1..16 (KroneckerBERT's
  attention splits, e.g. ``A 384×48 ⊗ B 2×16``), the product with ``A`` is either ``N`` tiny
  matmuls or a flat matmul whose ``(N, m2, m1)`` output must be transposed into ``(N, m1, m2)``
  order, a full pass over the output. The kernel computes it with the interleave fused.
- A tiny ``A`` with a wide ``B`` (the papers' ``A 2×2 ⊗ B 384×384``): the A-stage and the bias
  in one pass; at few tokens both stages in one call, without BLAS's call overhead.

The C source is at the end of this file (``KERNEL_SOURCE``; AVX-512, float32, inference only).

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

# -fopenmp: the kernel's threads come from the OpenMP runtime torch has already loaded
# (libgomp.so.1 is matched by soname), so they never spin against torch's own threads.
_FLAGS = ["-O3", "-std=gnu11", "-mavx512f", "-mavx512dq", "-mfma", "-fopenmp", "-shared", "-fPIC"]
_M2_SUPPORTED = (1, 2, 4, 8, 16)
_BLOCK = 64  # columns per packed block of A (KERNEL_SOURCE: CW)

_lib = None
_tried = False
_lock = threading.Lock()
_plans: dict = {}
_STALE = 1  # what a kernel returns when the factor's bytes differ from its plan's saved copy


def _cache_dir() -> str:
    root = os.environ.get("KN_TRANSFORMERS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kn_transformers")
    return os.path.join(root, "native")


def _build() -> Optional[ctypes.CDLL]:
    if os.environ.get("KN_TRANSFORMERS_NATIVE", "1").lower() in ("0", "false", "no", "off"):
        return None
    if not sys.platform.startswith("linux"):
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.info("kn_transformers: no C compiler found; the fused Kronecker CPU kernel is not used")
        return None
    digest = hashlib.sha256((KERNEL_SOURCE + " ".join(_FLAGS)).encode()).hexdigest()[:16]
    path = os.path.join(_cache_dir(), f"kron_fused_{digest}.so")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
        os.close(fd)
        src = tmp[:-3] + ".c"
        try:
            with open(src, "w") as f:
                f.write(KERNEL_SOURCE)
            subprocess.run([compiler, *_FLAGS, src, "-o", tmp], check=True, capture_output=True, timeout=120)
            os.replace(tmp, path)  # atomic: concurrent processes never load a half-written file
        except (OSError, subprocess.SubprocessError) as err:
            detail = getattr(err, "stderr", b"") or b""
            logger.info("kn_transformers: building the fused Kronecker CPU kernel failed (%s); not used. %s",
                        err, detail.decode(errors="replace")[-500:])
            if os.path.exists(tmp):
                os.remove(tmp)
            return None
        finally:
            if os.path.exists(src):
                os.remove(src)
    lib = ctypes.CDLL(path)
    if not lib.kn_cpu_has_avx512():
        return None
    h = lib.kn_small_a_rows
    h.restype = ctypes.c_int
    check = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]  # A, its saved copy, bytes: see _Plan
    h.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_long] + [ctypes.c_int] * 6 + check
    g = lib.kn_small_a_stage
    g.restype = ctypes.c_int
    g.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] + [ctypes.c_int] * 4 + check
    lib.kn_fuses_b_stage.restype = ctypes.c_int
    lib.kn_fuses_b_stage.argtypes = [ctypes.c_int] * 4
    f = lib.kn_kron_forward
    f.restype = ctypes.c_int
    f.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_long] + [ctypes.c_int] * 6 + check
    return lib


def _library() -> Optional[ctypes.CDLL]:
    global _lib, _tried
    if not _tried:
        with _lock:
            if not _tried:
                _lib = _build()
                _tried = True
    return _lib


_SMALL_A = 256  # A (rank, m1, n1) with at most this many entries takes the small-A kernel
# Up to this many rows of x as (N*n1, n2), a small A computes both stages in kn_small_a_rows;
# above it the B-stage goes to BLAS (measured crossover: 128-256 rows for B 384x384).
_FEW_ROWS = 128


def _layout(A: torch.Tensor, B: torch.Tensor) -> Optional[str]:
    """Which kernel fits: ``"large_a"`` (B with 1-16 rows, ``m1·m2`` a multiple of 16: the
    fused interleave), ``"small_a"`` (A with at most 256 entries and B with more than 16
    rows: the bias-fused streaming A-stage), or ``None``."""
    r, m1, n1 = A.shape
    m2 = B.shape[1]
    if m2 in _M2_SUPPORTED and (m1 * m2) % 16 == 0:
        return "large_a"
    if m2 > 16 and r * m1 * n1 <= _SMALL_A:
        return "small_a"
    return None


def _operands_ok(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """``x``, ``B`` and ``bias`` float32 on CPU, and no autograd (nothing that requires grad, the
    bias included, while grad mode is on). ``A``'s own dtype and device are not checked here: a
    cached plan vouches for them (see :meth:`_Plan.matches`)."""
    f32 = torch.float32
    return not (x.dtype != f32 or B.dtype != f32 or not (x.is_cpu and B.is_cpu)
                or (bias is not None and (bias.dtype != f32 or not bias.is_cpu))
                or (torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad
                                                 or (bias is not None and bias.requires_grad))))


def native_supported(A: torch.Tensor, B: torch.Tensor, x: torch.Tensor,
                     bias: Optional[torch.Tensor] = None) -> bool:
    """Whether :func:`native_kronecker_linear` can compute ``x @ (Σ A_r ⊗ B_r)ᵀ (+ bias)`` here:
    float32 CPU tensors, a shape one of the kernels covers (see :func:`_layout`), no autograd
    (nothing that requires grad, the bias included, while grad mode is on), and the kernel built
    (on the first call)."""
    return (A.is_cpu and A.dtype == torch.float32 and _operands_ok(x, A, B, bias) and _layout(A, B) is not None
            and _library() is not None)


def _version(t: torch.Tensor) -> int:
    # inference tensors (made under torch.inference_mode) have no version counter: for them the
    # byte comparison alone decides
    return -1 if t.is_inference() else t._version


class _Plan:
    """What a call needs from ``A`` besides pointers, built once: the kernel's layout of ``A``,
    the shapes, which kernel path applies, and what to check that ``A`` has not changed since."""

    __slots__ = ("layout", "a", "a_ptr", "dims", "fuses", "rows_kernel", "ref", "version", "ptr", "a_shape",
                 "b_shape", "saved", "check")

    def __init__(self, A: torch.Tensor, B: torch.Tensor, layout: str, lib):
        r, m1, n1 = A.shape
        m2, n2 = B.shape[1], B.shape[2]
        A = A.detach()
        K = n1 * r
        self.layout = layout
        if layout == "small_a":
            self.a = A.permute(1, 2, 0).reshape(m1, K).contiguous()  # column (j1, r), like t
        else:
            # a_dup[k, i1*m2 + i2] = A_r[i1, j1] (k = (j1, r)), in column blocks of 64, each (K, 64)
            M = m1 * m2
            a_dup = A.permute(2, 0, 1).reshape(K, m1).repeat_interleave(m2, dim=1)
            full = M - M % _BLOCK
            parts = [a_dup[:, :full].reshape(K, full // _BLOCK, _BLOCK).transpose(0, 1).reshape(-1)]
            if full < M:
                parts.append(a_dup[:, full:].reshape(-1))
            self.a = torch.cat(parts).contiguous()
        self.a_ptr = self.a.data_ptr()
        self.dims = (n1, n2, r, m1, m2, m1 * m2)
        self.fuses = layout == "large_a" and bool(lib.kn_fuses_b_stage(n1, n2, r, m2))
        # small A at few rows: both stages in kn_small_a_rows (its shape conditions)
        self.rows_kernel = layout == "small_a" and n2 % 16 == 0 and m2 % 16 == 0 and r <= 16
        # the state of A the plan was built from (see _cached_plan)
        self.ref = None
        self.version, self.ptr = _version(A), A.data_ptr()
        self.a_shape, self.b_shape = A.shape, B.shape
        self.saved = A.clone()
        # the kernels compare A's bytes with the saved copy before they start (returning _STALE
        # if they differ): updates through ``.data`` do not bump the version. A non-contiguous A
        # (a slice, an expanded view) is not compared bytewise: its plan is never reused.
        contiguous = A.is_contiguous()
        self.check = (self.ptr, self.saved.data_ptr(), A.numel() * A.element_size()) if contiguous else (None, None, 0)

    def matches(self, A: torch.Tensor, B: torch.Tensor) -> bool:
        """Whether ``A`` is the tensor the plan was built from, in place and unchanged as far as
        its version counter tells (its bytes are compared in the kernel call)."""
        return (self.ref() is A and _version(A) == self.version and A.data_ptr() == self.ptr
                and A.shape == self.a_shape and B.shape == self.b_shape and A.dtype == torch.float32
                and A.is_cpu and A.is_contiguous())


def _cached_plan(A: torch.Tensor, B: torch.Tensor) -> Optional[_Plan]:
    """The cached :class:`_Plan` of the factor ``A`` (B is only ever read in place), or ``None``.

    Keyed by the factor object; a hit also needs its version, storage and shapes to equal what
    the plan was built from. Its values are compared bytewise by the kernel itself, on all its
    threads, since updates through ``.data`` do not bump the version (a few µs, A being the
    small factor or a few hundred KB; 3-4 µs less than a separate ``memcmp`` call, measured).
    Packing ``A`` on every call instead was measured slower: it must be read either way, and the
    packed copy is twice its size.
    """
    plan = _plans.get(id(A))
    return plan if plan is not None and plan.matches(A, B) else None


def _new_plan(A: torch.Tensor, B: torch.Tensor, lib) -> _Plan:
    """Build ``A``'s plan and cache it for as long as ``A`` lives."""
    key = id(A)
    plan = _Plan(A, B, _layout(A, B), lib)
    try:
        plan.ref = weakref.ref(A, lambda _, k=key, plans=_plans: plans.pop(k, None))
    except TypeError:
        return plan
    _plans[key] = plan
    return plan


def native_kronecker_linear(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                            bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``x @ (Σ_r A_r ⊗ B_r)ᵀ + bias`` in one fused pass (see ``KERNEL_SOURCE``), or ``None``
    where the kernel does not apply (:func:`native_supported`, and a float32 CPU bias).

    Args:
        x: ``(..., n1*n2)`` float32.
        A: ``(rank, m1, n1)``; B: ``(rank, m2, n2)``; bias: ``(m1*m2,)`` or ``None``.

    Returns:
        ``(..., m1*m2)``, without autograd, or ``None``.
    """
    # Once A has a plan, only what can change without changing A is checked (x, B, bias, grad
    # mode): every layer call pays for this, usually with the caches just flushed by the previous
    # kernel, where each Python-level step costs about a µs. Hence no reshapes: the kernel reads
    # x's rows through its pointer, and the output is allocated in its final shape.
    if not _operands_ok(x, A, B, bias):
        return None
    p = _cached_plan(A, B)
    if p is None:
        if not native_supported(A, B, x, bias):
            return None
        p = _new_plan(A, B, _lib)
    n1, n2, r, m1, m2, M = p.dims
    shape = x.shape
    if shape[-1] != n1 * n2 or (bias is not None and bias.numel() != M):
        raise ValueError(f"x {tuple(shape)} and bias {None if bias is None else tuple(bias.shape)} do not fit "
                         f"A {tuple(A.shape)} and B {tuple(B.shape)}: need x (..., {n1 * n2}) and bias ({M},)")
    y = torch.empty((*shape[:-1], M), dtype=torch.float32, device="cpu")  # not the default dtype/device
    N = x.numel() // (n1 * n2)
    if N == 0:  # (an empty tensor's data pointer may be NULL, which the kernel reads as "no input")
        return y
    # the tensors whose pointers the kernel reads stay referenced until it returns (a temporary
    # from .contiguous() inside the call's arguments would be freed before the kernel runs)
    if not x.is_contiguous():
        x = x.contiguous()
    if not B.is_contiguous():
        B = B.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    b = bias.data_ptr() if bias is not None else None
    lib = _lib
    threads = torch.get_num_threads()
    for _ in range(2):  # a second time only if A's bytes changed since its plan was built
        if p.rows_kernel and N * n1 <= _FEW_ROWS:
            rc = lib.kn_small_a_rows(x.data_ptr(), B.data_ptr(), p.a_ptr, b, y.data_ptr(), N, n1, n2, r, m1, m2,
                                     threads, *p.check)
        elif p.fuses:
            # both stages in the kernel, tile by tile (x is read once, t never leaves the cache)
            rc = lib.kn_kron_forward(x.data_ptr(), B.data_ptr(), None, p.a_ptr, b, y.data_ptr(), N, n1, n2, r, m2,
                                     M, threads, *p.check)
        else:
            # B-stage by BLAS, t[n, (j1, r), i2] = Σ_j2 x[n, j1, j2] B_r[i2, j2]: one flat matmul with
            # a transposed view of B
            t = torch.mm(x.view(N * n1, n2), B.detach().view(r * m2, n2).T)
            if p.layout == "small_a":  # then the A-stage and the bias in one streaming pass
                rc = lib.kn_small_a_stage(t.data_ptr(), p.a_ptr, b, y.data_ptr(), N, n1 * r, m1, m2, threads,
                                          *p.check)
            else:  # then the A-stage, the interleave and the bias
                rc = lib.kn_kron_forward(None, None, t.data_ptr(), p.a_ptr, b, y.data_ptr(), N, n1, n2, r, m2, M,
                                         threads, *p.check)
        if rc != _STALE:
            break
        p = _new_plan(A, B, lib)
    if rc:
        why = "A changed during the call (written by another thread?)" if rc == _STALE else "out of memory?"
        raise RuntimeError(f"the native Kronecker kernel failed for x {tuple(shape)}, A {tuple(A.shape)}, "
                           f"B {tuple(B.shape)} ({why})")
    return y


# The kernel, kept in this file (not a .c beside it) so that it travels with the modeling code
# that ``save_pretrained`` copies for ``trust_remote_code``.
KERNEL_SOURCE = r"""/*
 * The A-stage of a Kronecker product with a small B, with the output interleave fused.
 *
 *   y[n, o] = bias[o] + sum_k Ad[k, o] * t[n, k, o % m2]      o < M = m1*m2, k < K
 *
 * where t = the B-stage output (N, K, m2) and Ad[k, i1*m2 + i2] = A[i1, k] (A's columns
 * repeated m2 times, so each 16-lane vector covers 16/m2 rows of A and all m2 columns of B).
 *
 * Why: with a small B (m2 = 2..16) every BLAS formulation either runs N tiny matmuls or
 * computes (N, m2, m1) and transposes the whole output into (N, m1, m2) order. Here one
 * FMA per 16 output lanes multiplies a row of Ad by the m2 values of t broadcast to all
 * lanes, and the result lands in its final place: no transpose, no wasted products, the bias
 * added for free.
 *
 * Plain C with AVX-512F intrinsics (no torch headers), built on first use by this module and
 * called through ctypes; rows are split over OpenMP threads of the runtime torch loaded.
 */
#include <immintrin.h>
#include <omp.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#define KN_INLINE static inline __attribute__((always_inline))

/* Whether ``n`` bytes at ``a`` (the factor A now) differ from ``saved`` (the copy its packed form
 * was made from), compared by up to ``threads`` threads: each entry point below starts with this
 * and returns 1 (nothing computed) when they differ, as a write through ``A.data`` leaves no
 * other trace. */
static int stale(const void *a, const void *saved, long n, int threads) {
    int diff = 0;
    if (!a || !saved || n <= 0) return 0;
    if (threads < 2 || n < 65536) return memcmp(a, saved, (size_t)n) != 0;
#pragma omp parallel num_threads(threads) reduction(| : diff)
    {
        const int nth = omp_get_num_threads(), tid = omp_get_thread_num();
        const long lo = n * tid / nth, hi = n * (tid + 1) / nth;
        diff |= memcmp((const char *)a + lo, (const char *)saved + lo, (size_t)(hi - lo)) != 0;
    }
    return diff;
}

int kn_cpu_has_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
}

/* t[n, k, 0:m2] repeated over the 16 lanes (m2 divides 16). */
KN_INLINE __m512 pattern(const float *p, const int m2) {
    if (m2 == 1) return _mm512_set1_ps(p[0]);
    if (m2 == 2) {
        double d;
        memcpy(&d, p, sizeof d);
        return _mm512_castpd_ps(_mm512_set1_pd(d));
    }
    if (m2 == 4) return _mm512_broadcast_f32x4(_mm_loadu_ps(p));
    if (m2 == 8) return _mm512_broadcast_f32x8(_mm256_loadu_ps(p));
    return _mm512_loadu_ps(p);
}

/* R rows x C 16-lane chunks of the output; R, C, m2 are compile-time constants after inlining. */
KN_INLINE void tile(const float *t, const float *ad, const float *bias, float *y, const int K, const int lda,
                    const int M, const int m2, const int R, const int C) {
    __m512 acc[6][4];
    for (int c = 0; c < C; c++) {
        __m512 b = bias ? _mm512_loadu_ps(bias + 16 * c) : _mm512_setzero_ps();
        for (int r = 0; r < R; r++) acc[r][c] = b;
    }
    const size_t ts = (size_t)K * m2;
    for (int k = 0; k < K; k++) {
        __m512 a[4];
        for (int c = 0; c < C; c++) a[c] = _mm512_loadu_ps(ad + (size_t)k * lda + 16 * c);
        for (int r = 0; r < R; r++) {
            __m512 v = pattern(t + r * ts + (size_t)k * m2, m2);
            for (int c = 0; c < C; c++) acc[r][c] = _mm512_fmadd_ps(a[c], v, acc[r][c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) _mm512_storeu_ps(y + (size_t)r * M + 16 * c, acc[r][c]);
}

#define ROWS 6       /* rows per register tile */
#define CHUNKS 4     /* 16-lane chunks per register tile: 6 x 4 accumulators */
#define CW (16 * CHUNKS)
#define ROW_TILE 48  /* rows per cache tile: A is swept once per tile, the tile's t stays in L1 */

/* The A-stage for rows [0, rows) of a tile: t (rows, K, m2) -> y (rows, M). ``adp`` holds
 * ``a_dup`` packed by column blocks: block c0 (width w = min(64, M - c0)) at adp + c0*K,
 * row-major (K, w), so each register tile streams its A values contiguously. */
KN_INLINE void a_stage(const float *t, const float *adp, const float *bias, float *y, long rows, const int K,
                       const int M, const int m2, const char *pf, const long pf_lines) {
    const size_t ts = (size_t)K * m2;
    /* ``pf_lines`` cache lines from ``pf`` (the next tile's input) are prefetched into L2 a few
     * at a time between register tiles, so that reading the input overlaps this tile's FMAs */
    const long calls = (long)((M + CW - 1) / CW) * ((rows + ROWS - 1) / ROWS + ROWS);
    const long per = calls > 0 ? (pf_lines + calls - 1) / calls : 0;
    long done = 0;
#define KN_PREFETCH()                                                          \
    for (long l_ = 0; l_ < per && done < pf_lines; l_++, done++) _mm_prefetch(pf + done * 64, _MM_HINT_T1)
    for (int c0 = 0; c0 < M; c0 += CW) {
        const int w = M - c0 < CW ? M - c0 : CW;
        const float *ab = adp + (size_t)c0 * K;
        long n = 0;
        if (w == CW) {
            for (; n + ROWS <= rows; n += ROWS) {
                KN_PREFETCH();
                tile(t + n * ts, ab, bias ? bias + c0 : NULL, y + n * M + c0, K, CW, M, m2, ROWS, CHUNKS);
            }
            for (; n < rows; n++)
                tile(t + n * ts, ab, bias ? bias + c0 : NULL, y + n * M + c0, K, CW, M, m2, 1, CHUNKS);
        } else {
            for (int c = 0; c < w; c += 16) {
                for (n = 0; n + ROWS <= rows; n += ROWS) {
                    KN_PREFETCH();
                    tile(t + n * ts, ab + c, bias ? bias + c0 + c : NULL, y + n * M + c0 + c, K, w, M, m2, ROWS, 1);
                }
                for (; n < rows; n++)
                    tile(t + n * ts, ab + c, bias ? bias + c0 + c : NULL, y + n * M + c0 + c, K, w, M, m2, 1, 1);
            }
        }
    }
#undef KN_PREFETCH
}

/* The B-stage of one row, t[(j1, rr), i2] = sum_j2 x[j1, j2] B[rr, i2, j2] for n1 and n2
 * multiples of 16 and q = r*m2 outputs per j1, 16 rows j1 at a time.
 *
 * Half a 16x16 transpose (two shuffle stages) puts, in u[4i+c], lane (L, rho) =
 * x[4i+rho, 4L+c]; one FMA per (q, u) with ``bpat`` (lane (L, rho) = B[p, 4L+c], built once per
 * call) gives partial sums over each 128-bit lane's 4 columns, and three cross-lane
 * shuffle-adds finish them: 46 shuffles per 16x16 block and q = 2 instead of 64 for a full
 * transpose. The q results are interleaved into t's layout. */
KN_INLINE void b_stage_row(const float *x, const float *bpat, float *t, const int n1, const int n2, const int q) {
    for (int jb = 0; jb < n1; jb += 16) {
        __m512 acc[16][4];
        for (int p = 0; p < q; p++)
            for (int i = 0; i < 4; i++) acc[p][i] = _mm512_setzero_ps();
        for (int cb = 0; cb < n2; cb += 16) {
            __m512 r[16], v[16], u[16];
            for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(x + (size_t)(jb + i) * n2 + cb);
            for (int i = 0; i < 8; i++) {
                v[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
                v[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
            }
            for (int i = 0; i < 4; i++) {
                u[4 * i + 0] = _mm512_shuffle_ps(v[4 * i + 0], v[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
                u[4 * i + 1] = _mm512_shuffle_ps(v[4 * i + 0], v[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
                u[4 * i + 2] = _mm512_shuffle_ps(v[4 * i + 1], v[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
                u[4 * i + 3] = _mm512_shuffle_ps(v[4 * i + 1], v[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
            }
            const float *bp = bpat + (size_t)(cb / 16) * q * 64;
            for (int p = 0; p < q; p++)
                for (int c = 0; c < 4; c++) {
                    const __m512 b = _mm512_loadu_ps(bp + (p * 4 + c) * 16);
                    for (int i = 0; i < 4; i++) acc[p][i] = _mm512_fmadd_ps(u[4 * i + c], b, acc[p][i]);
                }
        }
        __m512 res[16];
        for (int p = 0; p < q; p++) {
            /* lane i of the result = sum over the 4 lanes of acc[p][i]: rows jb+4i .. jb+4i+3 */
            const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(acc[p][0], acc[p][1], 0x88),
                                             _mm512_shuffle_f32x4(acc[p][0], acc[p][1], 0xdd));
            const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(acc[p][2], acc[p][3], 0x88),
                                             _mm512_shuffle_f32x4(acc[p][2], acc[p][3], 0xdd));
            res[p] = _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xdd));
        }
        float *out = t + (size_t)jb * q;
        if (q == 1) {
            _mm512_storeu_ps(out, res[0]);
        } else if (q == 2) {
            const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
            const __m512i hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
            _mm512_storeu_ps(out, _mm512_permutex2var_ps(res[0], lo, res[1]));
            _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(res[0], hi, res[1]));
        } else {
            float tmp[16][16];
            for (int p = 0; p < q; p++) _mm512_storeu_ps(tmp[p], res[p]);
            for (int i = 0; i < 16; i++)
                for (int p = 0; p < q; p++) out[i * q + p] = tmp[p][i];
        }
    }
}

/* The B-stage of one row for B 2x2 (rank 1; n1 a multiple of 8): 16 floats of x are the pairs
 * (x[a, 0], x[a, 1]) of 8 consecutive j1; with the pairs swapped in place, two FMAs by
 * [B00, B11, ...] and [B01, B10, ...] give t[a, i2] = B[i2, 0] x[a, 0] + B[i2, 1] x[a, 1] in t's own
 * layout. */
KN_INLINE void b_stage_row_2x2(const float *x, const float *B, float *t, const int n1) {
    const __m512 diag = _mm512_set_ps(B[3], B[0], B[3], B[0], B[3], B[0], B[3], B[0],
                                      B[3], B[0], B[3], B[0], B[3], B[0], B[3], B[0]);
    const __m512 anti = _mm512_set_ps(B[2], B[1], B[2], B[1], B[2], B[1], B[2], B[1],
                                      B[2], B[1], B[2], B[1], B[2], B[1], B[2], B[1]);
    for (int j = 0; j < 2 * n1; j += 16) {
        const __m512 v = _mm512_loadu_ps(x + j);
        const __m512 sw = _mm512_permute_ps(v, 0xB1);
        _mm512_storeu_ps(t + j, _mm512_fmadd_ps(sw, anti, _mm512_mul_ps(v, diag)));
    }
}

/* bpat[(cb/16, p, c)] lane (L, rho) = B[p, cb + 4L + c]: the B values matching b_stage_row's u. */
static void b_patterns(const float *B, float *bpat, const int n2, const int q) {
    for (int cb = 0; cb < n2; cb += 16)
        for (int p = 0; p < q; p++)
            for (int c = 0; c < 4; c++)
                for (int L = 0; L < 4; L++)
                    for (int rho = 0; rho < 4; rho++)
                        bpat[(((size_t)(cb / 16) * q + p) * 4 + c) * 16 + L * 4 + rho] = B[(size_t)p * n2 + cb + 4 * L + c];
}

KN_INLINE int run(const float *x, const float *B, const float *t, const float *adp, const float *bias, float *y,
                  long N, const int n1, const int n2, const int r, const int m2, const int M, int threads) {
    const int K = n1 * r;
    const long tiles = (N + ROW_TILE - 1) / ROW_TILE;
    if (threads > tiles) threads = (int)tiles;
    if (threads < 1) threads = 1;
    int failed = 0;
    float *bpat = NULL;
    if (N == 0) return 0;
    if (x && n2 % 16 == 0) {
        bpat = (float *)malloc(sizeof(float) * (size_t)(n2 / 16) * r * m2 * 64);
        if (!bpat) return -1;
        b_patterns(B, bpat, n2, r * m2);
    }
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        /* equal row ranges per thread (multiples of ROWS), then tiles within each: an even split
         * of N rows, where tiles dealt round the threads leave one up to a tile ahead */
        const int nth = omp_get_num_threads(), tid = omp_get_thread_num();
        long lo = N * tid / nth, hi = N * (tid + 1) / nth;
        lo -= lo % ROWS;
        if (tid + 1 < nth) hi -= hi % ROWS;
        float *buf = x ? (float *)malloc(sizeof(float) * ROW_TILE * (size_t)K * m2) : NULL;
        if (x && !buf) failed = 1;
        for (long n0 = lo; n0 < hi && !(x && !buf); n0 += ROW_TILE) {
            const long rows = hi - n0 < ROW_TILE ? hi - n0 : ROW_TILE;
            const float *tt = t + n0 * (size_t)K * m2;
            if (x) {
                const size_t xs = (size_t)n1 * n2, ts = (size_t)K * m2;
                /* constant q: the accumulators stay in registers */
                if (n2 == 2 && m2 == 2 && r == 1) {
                    for (long n = 0; n < rows; n++) b_stage_row_2x2(x + (n0 + n) * xs, B, buf + n * ts, n1);
                } else switch (r * m2) {
                    case 1: for (long n = 0; n < rows; n++) b_stage_row(x + (n0 + n) * xs, bpat, buf + n * ts, n1, n2, 1); break;
                    case 2: for (long n = 0; n < rows; n++) b_stage_row(x + (n0 + n) * xs, bpat, buf + n * ts, n1, n2, 2); break;
                    case 4: for (long n = 0; n < rows; n++) b_stage_row(x + (n0 + n) * xs, bpat, buf + n * ts, n1, n2, 4); break;
                    case 8: for (long n = 0; n < rows; n++) b_stage_row(x + (n0 + n) * xs, bpat, buf + n * ts, n1, n2, 8); break;
                    default: for (long n = 0; n < rows; n++) b_stage_row(x + (n0 + n) * xs, bpat, buf + n * ts, n1, n2, 16); break;
                }
                tt = buf;
            }
            /* the next tile's input, to prefetch while this one computes */
            const long next = n0 + ROW_TILE < hi ? (hi - n0 - ROW_TILE < ROW_TILE ? hi - n0 - ROW_TILE : ROW_TILE) : 0;
            const char *pf = x ? (const char *)(x + (n0 + ROW_TILE) * (size_t)n1 * n2)
                               : (const char *)(t + (n0 + ROW_TILE) * (size_t)K * m2);
            const long pf_lines = next * (long)(x ? (size_t)n1 * n2 : (size_t)K * m2) * 4 / 64;
            a_stage(tt, adp, bias, y + n0 * (size_t)M, rows, K, M, m2, pf, pf_lines);
        }
        free(buf);
    }
    free(bpat);
    return failed ? -1 : 0;
}

/* v[k] = the sum of the 16 lanes of acc[k]: a transpose-and-add tree, 30 shuffles and 15 adds. */
KN_INLINE __m512 hsum16(const __m512 acc[16]) {
    __m512 s1[8], s2[4];
    for (int p = 0; p < 8; p++)  /* per 128-bit lane: halves of the sums of acc[2p] and acc[2p+1], interleaved */
        s1[p] = _mm512_add_ps(_mm512_unpacklo_ps(acc[2 * p], acc[2 * p + 1]),
                              _mm512_unpackhi_ps(acc[2 * p], acc[2 * p + 1]));
    for (int q = 0; q < 4; q++)  /* element e of 128-bit lane L: the sum of lane L of acc[4q + e] */
        s2[q] = _mm512_add_ps(_mm512_shuffle_ps(s1[2 * q], s1[2 * q + 1], 0x44),
                              _mm512_shuffle_ps(s1[2 * q], s1[2 * q + 1], 0xEE));
    const __m512 u0 = _mm512_add_ps(_mm512_shuffle_f32x4(s2[0], s2[1], 0x88), _mm512_shuffle_f32x4(s2[0], s2[1], 0xDD));
    const __m512 u1 = _mm512_add_ps(_mm512_shuffle_f32x4(s2[2], s2[3], 0x88), _mm512_shuffle_f32x4(s2[2], s2[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(u0, u1, 0x88), _mm512_shuffle_f32x4(u0, u1, 0xDD));
}

/* t[ci * ts + ri] = dot(x row ci, b row ri) over n2 (a multiple of 16) for C rows of x and R = 16 / C
 * rows of b: 16 accumulators, R + C loads per 16 FMAs, both operands read along their rows. */
KN_INLINE void dots(const float *x, const float *b, float *t, const int n2, const int ts, const int C) {
    const int R = 16 / C;
    __m512 acc[16];
    for (int k = 0; k < 16; k++) acc[k] = _mm512_setzero_ps();
    for (int j = 0; j < n2; j += 16) {
        __m512 xv[4];
        for (int ci = 0; ci < C; ci++) xv[ci] = _mm512_loadu_ps(x + (size_t)ci * n2 + j);
        for (int ri = 0; ri < R; ri++) {
            const __m512 bv = _mm512_loadu_ps(b + (size_t)ri * n2 + j);
            for (int ci = 0; ci < C; ci++) acc[ci * R + ri] = _mm512_fmadd_ps(xv[ci], bv, acc[ci * R + ri]);
        }
    }
    float v[16];
    _mm512_storeu_ps(v, hsum16(acc));
    for (int ci = 0; ci < C; ci++) memcpy(t + (size_t)ci * ts, v + ci * R, sizeof(float) * R);
}

/* Both stages for a small A, a wide B and few rows (e.g. A 2x2 (x) B 384x384 at 8 tokens):
 * y (N, m1*m2) = x (N, n1, n2) @ (sum_r A_r (x) B_r)^T + bias, with acat (m1, n1*r), column (j1, r).
 *
 * Why: at a few rows a BLAS B-stage is dominated by its call and threading overhead and by
 * reading B through a transposed view, and the dense matmul it competes with is as fast as it
 * gets. Here each thread takes blocks of 16 rows of B, computes their dot products with every
 * row of x (B and x both read along their rows, no copy or packing), and turns them straight
 * into 16 output columns of every token with the A-stage and the bias. Needs n2 and m2
 * multiples of 16; rank at most 16. Returns 0, 1 if A changed (see stale), or -1 for unsupported shapes or
 * out of memory. */
int kn_small_a_rows(const float *x, const float *B, const float *acat, const float *bias, float *y, long N, int n1,
                    int n2, int r, int m1, int m2, int threads, const void *a, const void *saved, long a_bytes) {
    if (N < 0 || n1 < 1 || n2 < 16 || n2 % 16 || m2 < 16 || m2 % 16 || r < 1 || r > 16 || m1 < 1) return -1;
    if (stale(a, saved, a_bytes, threads)) return 1;
    if (N == 0) return 0;
    const long cols = N * n1;  /* rows (n, j1) of x */
    const int K = n1 * r, M = m1 * m2, blocks = m2 / 16, ts = 16 * r;
    int failed = 0;
    if (threads < 1) threads = 1;
    if (threads > blocks) threads = blocks;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        /* t16[(n, j1), rr, 0:16] = B-stage output for the current 16 columns i2 */
        float *t16 = (float *)aligned_alloc(64, sizeof(float) * (size_t)cols * ts);
        if (!t16) failed = 1;
#pragma omp for schedule(static)
        for (int ib = 0; ib < blocks; ib++) {
            if (!t16) continue;
            for (int rr = 0; rr < r; rr++) {
                const float *b = B + ((size_t)rr * m2 + (size_t)ib * 16) * n2;
                float *t = t16 + rr * 16;
                long c = 0;
                for (; c + 4 <= cols; c += 4)
                    for (int i0 = 0; i0 < 16; i0 += 4) dots(x + c * n2, b + (size_t)i0 * n2, t + c * ts + i0, n2, ts, 4);
                for (; c + 2 <= cols; c += 2)
                    for (int i0 = 0; i0 < 16; i0 += 8) dots(x + c * n2, b + (size_t)i0 * n2, t + c * ts + i0, n2, ts, 2);
                for (; c < cols; c++) dots(x + c * n2, b, t + c * ts, n2, ts, 1);
            }
            for (long n = 0; n < N; n++) {
                const float *tn = t16 + (size_t)n * n1 * ts;
                float *yn = y + (size_t)n * M + (size_t)ib * 16;
                for (int i1 = 0; i1 < m1; i1++) {
                    __m512 s = bias ? _mm512_loadu_ps(bias + (size_t)i1 * m2 + (size_t)ib * 16) : _mm512_setzero_ps();
                    const float *a = acat + (size_t)i1 * K;
                    for (int k = 0; k < K; k++) s = _mm512_fmadd_ps(_mm512_set1_ps(a[k]), _mm512_load_ps(tn + (size_t)k * 16), s);
                    _mm512_storeu_ps(yn + (size_t)i1 * m2, s);
                }
            }
        }
        free(t16);
    }
    return failed ? -1 : 0;
}

/* The A-stage for a small A and a wide B (e.g. A 8x2 (x) B 384x384, KroneckerBERT8's FFN):
 * y[n, i1*m2 + c] = bias[i1*m2 + c] + sum_k acat[i1, k] t[n, k, c] with t (N, K, m2) the B-stage
 * output and acat (m1, K). One streaming pass writes y with the bias in it, instead of a batched
 * matmul of N tiny products and then a bias pass over the (large) output. Any m2 >= 1. Returns 0, 1 if A
 * changed (see stale), or -1 for bad arguments. */
int kn_small_a_stage(const float *t, const float *acat, const float *bias, float *y, long N, int K, int m1, int m2,
                     int threads, const void *a, const void *saved, long a_bytes) {
    if (N < 0 || K < 1 || m1 < 1 || m2 < 1) return -1;
    if (stale(a, saved, a_bytes, threads)) return 1;
    if (threads < 1) threads = 1;
    if (N < threads) threads = N > 0 ? (int)N : 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long n = 0; n < N; n++) {
        const float *tn = t + n * (size_t)K * m2;
        float *yn = y + n * (size_t)m1 * m2;
        for (int i1 = 0; i1 < m1; i1++) {
            const float *a = acat + (size_t)i1 * K;
            const float *b = bias ? bias + (size_t)i1 * m2 : NULL;
            float *out = yn + (size_t)i1 * m2;
            for (int c = 0; c < m2; c += 16) {
                const __mmask16 mask = m2 - c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (m2 - c)) - 1u);
                __m512 acc = b ? _mm512_maskz_loadu_ps(mask, b + c) : _mm512_setzero_ps();
                for (int k = 0; k < K; k++)
                    acc = _mm512_fmadd_ps(_mm512_set1_ps(a[k]), _mm512_maskz_loadu_ps(mask, tn + (size_t)k * m2 + c), acc);
                _mm512_mask_storeu_ps(out + c, mask, acc);
            }
        }
    }
    return 0;
}

/* Whether kn_kron_forward can compute the B-stage itself for these shapes. */
int kn_fuses_b_stage(int n1, int n2, int r, int m2) {
    const int q = r * m2;
    if (n2 == 2 && m2 == 2 && r == 1) return n1 % 8 == 0;
    return n1 % 16 == 0 && n2 % 16 == 0 && (q == 1 || q == 2 || q == 4 || q == 8 || q == 16);
}

/* y (N, M) = x (N, n1*n2) @ (sum_r A_r (x) B_r)^T + bias with A packed as ``adp`` (see a_stage).
 * With x given (shapes where kn_fuses_b_stage: n1, n2 multiples of 16 and r*m2 in {1, 2, 4, 8, 16}, or
 * B 2x2 of rank 1 with n1 a multiple of 8), the B-stage runs here from x and B
 * (r, m2, n2), tile by tile; with x NULL, t (N, n1*r, m2) is the B-stage output computed by the
 * caller. Needs M % 16 == 0 and m2 in {1, 2, 4, 8, 16}; returns 0 on success, 1 if A changed (see stale),
 * -1 otherwise. */
int kn_kron_forward(const float *x, const float *B, const float *t, const float *adp, const float *bias, float *y,
                    long N, int n1, int n2, int r, int m2, int M, int threads, const void *a, const void *saved,
                    long a_bytes) {
    if (M % 16 || N < 0) return -1;
    if (x && !kn_fuses_b_stage(n1, n2, r, m2)) return -1;
    if (!x && !t) return -1;
    if (stale(a, saved, a_bytes, threads)) return 1;
    switch (m2) {
        case 1: return run(x, B, t, adp, bias, y, N, n1, n2, r, 1, M, threads);
        case 2: return run(x, B, t, adp, bias, y, N, n1, n2, r, 2, M, threads);
        case 4: return run(x, B, t, adp, bias, y, N, n1, n2, r, 4, M, threads);
        case 8: return run(x, B, t, adp, bias, y, N, n1, n2, r, 8, M, threads);
        case 16: return run(x, B, t, adp, bias, y, N, n1, n2, r, 16, M, threads);
        default: return -1;
    }
}
"""
