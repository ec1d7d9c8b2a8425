"""optimize_for_inference and the native kernel (kn_transformers.core.kernels) against float64 references."""

import copy
import logging
import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch

from kn_transformers import KroneckerLinear, kronecker_to_dense, optimize_for_inference
from kn_transformers.core import kernels
from kn_transformers.core.inference import OptimizedKroneckerLinear


def _machine_can_build() -> bool:
    """Linux x86-64 with AVX-512 and a C compiler: there the kernel must build and be used."""
    if not sys.platform.startswith("linux") or platform.machine() != "x86_64":
        return False
    if os.environ.get("KN_TRANSFORMERS_NATIVE", "1") in ("0", "false", "no", "off"):
        return False
    has_compiler = bool(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and has_compiler


NATIVE = _machine_can_build()
needs_kernel = pytest.mark.skipif(not NATIVE, reason="the native kernel needs x86-64 Linux, AVX-512 and a compiler")


def assert_matches(y, x, A, B, bias=None, rtol=1e-5):
    """``y`` equals ``x @ (Σ A_r⊗B_r)ᵀ + bias`` in float64, relative to the reference's scale."""
    ref = x.double() @ kronecker_to_dense(A.double(), B.double()).T
    if bias is not None:
        ref = ref + bias.double()
    assert y.shape == ref.shape
    scale = ref.abs().max().item() if ref.numel() else 1.0
    torch.testing.assert_close(y.double(), ref, rtol=rtol, atol=rtol * scale)


# (rank, A (m1, n1), B (m2, n2)): m2 in 1..16, m1*m2 a multiple of 16, with and without a
# partial 64-column block, and rank > 1. The first four take the kernel's own B-stage
# (n1, n2 multiples of 16 with rank*m2 = 2, 8, 1 values per j1; B 2x2), the others BLAS's.
NATIVE_SHAPES = [
    (1, (384, 48), (2, 16)),  # KroneckerBERT21's attention split
    (2, (16, 32), (4, 32)),
    (1, (32, 16), (1, 16)),
    (1, (24, 16), (2, 2)),  # B 2x2 (KroneckerBERT8's attention split): its own fused B-stage
    (1, (40, 8), (2, 3)),
    (3, (24, 4), (4, 5)),
    (2, (8, 6), (16, 4)),
    (1, (16, 12), (1, 8)),
    (1, (12, 7), (8, 2)),
    (1, (8, 2), (40, 24)),  # small A, wide B: the bias-fused A-stage (m2 = 40: a masked tail)
    (2, (4, 3), (32, 5)),
    # small A with m2, n2 multiples of 16: both stages in kn_small_a_rows up to 128 rows of
    # (N*n1, n2), BLAS's B-stage above
    (1, (2, 2), (48, 32)),
    (2, (3, 3), (32, 16)),
    (1, (2, 8), (16, 48)),
]


def _native(x, A, B, bias):
    layout = kernels.kernel_layout(A.shape, B.shape)
    assert layout is not None
    return kernels.kronecker_linear_native(x, kernels.pack_a(A, B.shape[1], layout), B, bias, A.shape[1],
                                           A.shape[2], layout)


def test_kernel_is_available_where_it_should_be():
    if NATIVE:
        kernels.load_kernels()
    else:
        with pytest.raises(kernels.KernelUnavailable):
            kernels.load_kernels()


@needs_kernel
@pytest.mark.parametrize("rank,a_shape,b_shape", NATIVE_SHAPES)
@pytest.mark.parametrize("rows", [1, 5, 31, 100])
@pytest.mark.parametrize("with_bias", [True, False])
def test_native_matches_dense(rank, a_shape, b_shape, rows, with_bias):
    torch.manual_seed(rows)
    A, B = torch.randn(rank, *a_shape), torch.randn(rank, *b_shape)
    bias = torch.randn(a_shape[0] * b_shape[0]) if with_bias else None
    x = torch.randn(rows, a_shape[1] * b_shape[1])
    y = _native(x, A, B, bias)
    assert y.dtype == torch.float32
    assert_matches(y, x, A, B, bias)


@needs_kernel
@pytest.mark.parametrize("rank,a_shape,b_shape", [NATIVE_SHAPES[0], NATIVE_SHAPES[4], NATIVE_SHAPES[-3]])
def test_native_reads_strided_and_negative_views(rank, a_shape, b_shape):
    """A column slice of a wider tensor, a strided bias, and tensors with the negative or conjugate
    bit set (contiguous, but their bytes are not their values): each computes what it means."""
    torch.manual_seed(0)
    n_in, n_out = a_shape[1] * b_shape[1], a_shape[0] * b_shape[0]
    A, B = torch.randn(rank, *a_shape), torch.randn(rank, *b_shape)
    bias = torch.randn(2 * n_out)[::2]
    for rows in (5, 300):
        x = torch.randn(rows, n_in + 24)[:, 8:8 + n_in]
        assert not x.is_contiguous()
        assert_matches(_native(x, A, B, bias), x, A, B, bias)
        xn = torch._neg_view(torch.randn(rows, n_in))
        assert xn.is_neg() and xn.is_contiguous()
        assert_matches(_native(xn, A, B, torch._neg_view(bias)), xn, A, B, -bias)
        assert_matches(_native(x, A, torch._neg_view(B), bias), x, A, -B, bias)


def _layers():
    # B 2x8 (large-A kernel, BLAS B-stage), B 2x16 (large-A, its own B-stage), B 32x24 (small-A),
    # B 32x32 (small-A rows kernel), A 384x48, and a split no kernel covers
    return [KroneckerLinear(n_in, n_out, a) for n_in, n_out, a in
            ((96, 64, (32, 12)), (256, 64, (32, 16)), (96, 64, (2, 4)), (128, 64, (2, 4)), (768, 768, (384, 48)),
             (30, 20, (4, 5)))]


@pytest.mark.parametrize("autotune", [True, False])
def test_optimized_layers_match_the_default_path(autotune):
    torch.manual_seed(0)
    for k in _layers():
        with torch.no_grad():
            k.bias.normal_()
        o = optimize_for_inference(copy.deepcopy(k), autotune=autotune)
        assert isinstance(o, OptimizedKroneckerLinear)
        assert (o._native_layout is not None) == (NATIVE and kernels.kernel_layout(k.A.shape, k.B.shape) is not None)
        for lead in ((1,), (7,), (2, 65)):
            x = torch.randn(*lead, k.in_features)
            with torch.no_grad():
                y = o(x)
            assert_matches(y, x, k.A, k.B, k.bias)
        assert o.state_dict().keys() == k.state_dict().keys()


def test_factor_changes_after_optimizing_are_seen():
    torch.manual_seed(0)
    for k in _layers():
        optimize_for_inference(k)
        x = torch.randn(4, k.in_features)

        def check():
            with torch.no_grad():
                y = k(x)
            assert_matches(y, x, k.A, k.B, k.bias)
            return y

        y0 = check()
        with torch.no_grad():
            k.A.mul_(2.0)  # in place: bumps the version
        y1 = check()
        k.A.data = k.A.data * -1.0  # a new tensor: a new data pointer
        y2 = check()
        with torch.no_grad():
            k.B.add_(0.5)  # B is read in place
        check()
        k.load_state_dict({n: p.clone() * 0.5 for n, p in k.state_dict().items()})
        check()
        opt = torch.optim.SGD(k.parameters(), lr=0.1)
        k(x).pow(2).sum().backward()  # training: the default path, with gradients
        opt.step()
        check()
        assert not torch.allclose(y0, y1) and not torch.allclose(y1, y2)


def test_training_after_optimizing_takes_the_default_path():
    torch.manual_seed(0)
    k = KroneckerLinear(768, 768, (384, 48))
    ref = copy.deepcopy(k)
    optimize_for_inference(k)
    x = torch.randn(3, 768, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = k(x), ref(x2)
    assert torch.equal(y, y2)
    y.sum().backward()
    y2.sum().backward()
    assert torch.equal(x.grad, x2.grad) and torch.equal(k.A.grad, ref.A.grad)
    # frozen factors, trainable bias (BitFit-style): the kernel, which has no autograd, must not run
    k.A.requires_grad_(False)
    k.B.requires_grad_(False)
    k.bias.grad = None
    k(x.detach()).sum().backward()
    torch.testing.assert_close(k.bias.grad, torch.full((768,), 3.0))


def test_layer_built_under_inference_mode_runs_plain_pytorch(caplog):
    """Inference tensors have no version counter: such layers are not given a packed copy."""
    torch.manual_seed(0)
    with torch.inference_mode():
        k = KroneckerLinear(256, 64, (32, 16))
    with caplog.at_level(logging.WARNING, logger="kn_transformers.core.inference"):
        optimize_for_inference(k)
    assert k._native_layout is None
    assert ("inference_mode" in caplog.text) == NATIVE
    with torch.inference_mode():
        x = torch.randn(5, 256)
        y0 = k(x)
        assert_matches(y0, x, k.A, k.B, k.bias)
        k.A.mul_(-2.0)
        assert_matches(k(x), x, k.A, k.B, k.bias)


@needs_kernel
def test_small_a_rows_kernel_runs_up_to_its_row_limit(monkeypatch):
    """kn_small_a_rows takes N*n1 <= 128 rows (here n1 = 2: up to 64 tokens), BLAS the rest."""
    lib = kernels.load_kernels()
    calls = []
    original = lib.kn_small_a_rows

    def counted(*args):
        calls.append(args[5])  # N
        return original(*args)

    monkeypatch.setattr(lib, "kn_small_a_rows", counted)
    torch.manual_seed(0)
    A, B = torch.randn(1, 2, 2), torch.randn(1, 48, 32)
    for rows in (1, 64, 65):
        x = torch.randn(rows, 64)
        assert_matches(_native(x, A, B, None), x, A, B)
    assert calls == [1, 64]


@needs_kernel
def test_output_is_float32_whatever_the_default_dtype():
    torch.manual_seed(0)
    k = optimize_for_inference(KroneckerLinear(256, 64, (32, 16)), autotune=False)
    x = torch.randn(7, 256)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.no_grad():
            y = k(x)
    finally:
        torch.set_default_dtype(old)
    assert y.dtype == torch.float32
    assert_matches(y, x, k.A, k.B, k.bias)


def test_empty_input():
    torch.manual_seed(0)
    for n_in, a_shape in ((768, (384, 48)), (64, (2, 2))):
        k = optimize_for_inference(KroneckerLinear(n_in, 768, a_shape))
        with torch.no_grad():
            k(torch.randn(1, n_in))
            assert k(torch.randn(0, n_in)).shape == (0, 768)
            assert k(torch.randn(2, 0, n_in)).shape == (2, 0, 768)


def test_compiled_optimized_layer_uses_the_custom_op():
    """torch.compile (fullgraph) traces the kernel as the custom op kn_transformers::kronecker_linear."""
    torch.manual_seed(0)
    k = optimize_for_inference(KroneckerLinear(768, 768, (384, 48)))
    x = torch.randn(5, 768)
    compiled = torch.compile(k, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert_matches(compiled(x), x, k.A, k.B, k.bias)
    if NATIVE:
        with torch.no_grad():
            exported = torch.export.export(k, (x,))
        ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
        assert "kn_transformers.kronecker_linear.default" in ops
        with torch.no_grad():
            assert_matches(exported.module()(x), x, k.A, k.B, k.bias)


def test_fake_implementation_matches_the_kernel():
    A, B = torch.randn(1, 32, 16), torch.randn(1, 2, 16)
    packed = kernels.pack_a(A, 2, "large_a")
    x = torch.randn(3, 4, 256)
    if NATIVE:
        torch.library.opcheck(kernels._kronecker_linear_op, (x, packed, B, None, 32, 16, "large_a"),
                              test_utils=("test_schema", "test_faketensor"))
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fx = torch.empty(3, 4, 256)
        out = kernels.kronecker_linear_op(fx, torch.empty(packed.shape), torch.empty(1, 2, 16), None, 32, 16,
                                          "large_a")
    assert out.shape == (3, 4, 64) and out.dtype == torch.float32


def test_no_kronecker_layers_is_an_error():
    with pytest.raises(ValueError, match="no Kronecker layers"):
        optimize_for_inference(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="nn.Module"):
        optimize_for_inference("model")


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300)


def test_disabled_by_environment_warns_once_and_runs_plain_pytorch():
    code = (
        "import torch\n"
        "from kn_transformers import KroneckerLinear, optimize_for_inference\n"
        "k = optimize_for_inference(torch.nn.Sequential(KroneckerLinear(32, 64, (32, 4)), KroneckerLinear(64, 64, (32, 4))))\n"
        "optimize_for_inference(k)\n"
        "assert all(m._native_layout is None for m in k)\n"
        "x = torch.randn(3, 32)\n"
        "with torch.no_grad():\n"
        "    assert (k(x) - k[1].to_dense()(k[0].to_dense()(x))).abs().max() < 1e-4\n"
        "print('ok')\n"
    )
    out = _run(code, KN_TRANSFORMERS_NATIVE="0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    warnings = [line for line in out.stderr.splitlines() if "native Kronecker kernel is not used" in line]
    assert len(warnings) == 2 and "KN_TRANSFORMERS_NATIVE=0" in warnings[0]  # one line per call


@needs_kernel
def test_kernel_cache_is_private_and_checked_by_hash(tmp_path, monkeypatch):
    """The binary lives in a 0700 folder named by the source/flags/compiler hash; a binary that
    does not match its recorded SHA-256 is rebuilt, never loaded."""
    monkeypatch.setenv("KN_TRANSFORMERS_CACHE", str(tmp_path / "cache"))
    so = kernels.build_kernels()
    folder = so.parent
    assert folder == tmp_path / "cache" / "kernels"
    assert (folder.stat().st_mode & 0o777) == 0o700
    assert kernels.build_kernels() == so  # cached
    mtime = so.stat().st_mtime_ns
    with open(so, "r+b") as f:  # tamper
        f.seek(100)
        f.write(b"\x00garbage")
    with pytest.raises(kernels.KernelUnavailable, match="SHA-256"):
        kernels._load(so)
    so2 = kernels.build_kernels()  # rebuilt
    assert so2 == so and so.stat().st_mtime_ns != mtime
    kernels._load(so2)


def test_build_kernels_command():
    out = subprocess.run([sys.executable, "-m", "kn_transformers.cli", "build-kernels"], capture_output=True,
                         text=True, timeout=300)
    if NATIVE:
        assert out.returncode == 0, out.stderr
        assert "kron_fused" in out.stdout
    else:
        assert out.returncode != 0 and "native kernel" in out.stderr
