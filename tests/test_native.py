"""The fused native CPU kernel (kn_transformers.native) against a float64 dense reference."""

import copy
import io
import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch

from kn_transformers import KroneckerLinear, kronecker_to_dense, native
from kn_transformers.kronecker import _kron_apply


def _machine_can_build() -> bool:
    """Linux x86-64 with AVX-512F/DQ and a C compiler: there the kernel must build and be used."""
    if not sys.platform.startswith("linux") or platform.machine() != "x86_64":
        return False
    if os.environ.get("KN_TRANSFORMERS_NATIVE", "1") in ("0", "false", "no", "off"):
        return False
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    has_compiler = bool(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))
    return "avx512f" in flags and "avx512dq" in flags and has_compiler


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
    # (N*n1, n2), BLAS's B-stage above (rows 100 with n1 = 2, 3; rows 31 and 100 with n1 = 8)
    (1, (2, 2), (48, 32)),
    (2, (3, 3), (32, 16)),
    (1, (2, 8), (16, 48)),
]


def test_kernel_is_available_where_it_should_be():
    assert (native._library() is not None) == _machine_can_build()


@pytest.mark.parametrize("rank,a_shape,b_shape", NATIVE_SHAPES)
@pytest.mark.parametrize("rows", [1, 5, 31, 100])
@pytest.mark.parametrize("with_bias", [True, False])
def test_native_matches_dense(rank, a_shape, b_shape, rows, with_bias):
    torch.manual_seed(rows)
    A = torch.randn(rank, *a_shape)
    B = torch.randn(rank, *b_shape)
    bias = torch.randn(a_shape[0] * b_shape[0]) if with_bias else None
    x = torch.randn(rows, a_shape[1] * b_shape[1])
    with torch.no_grad():
        assert native.native_supported(A, B, x) == _machine_can_build()
        y = _kron_apply(x, A, B, "native", bias)
    ref = x.double() @ kronecker_to_dense(A.double(), B.double()).T
    if bias is not None:
        ref = ref + bias.double()
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("rank,a_shape,b_shape", [NATIVE_SHAPES[0], NATIVE_SHAPES[4], NATIVE_SHAPES[-3]])
def test_native_reads_strided_inputs(rank, a_shape, b_shape):
    """A column slice of a wider tensor (rows not contiguous) and a strided bias: the kernel gets
    contiguous copies that live until it returns."""
    torch.manual_seed(0)
    n_in, n_out = a_shape[1] * b_shape[1], a_shape[0] * b_shape[0]
    A, B = torch.randn(rank, *a_shape), torch.randn(rank, *b_shape)
    bias = torch.randn(2 * n_out)[::2]
    for rows in (5, 300):
        x = torch.randn(rows, n_in + 24)[:, 8:8 + n_in]
        assert not x.is_contiguous()
        with torch.no_grad():
            y = _kron_apply(x, A, B, "native", bias)
        ref = x.double() @ kronecker_to_dense(A.double(), B.double()).T + bias.double()
        assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_native_layer_in_inference_and_training():
    torch.manual_seed(0)
    k = KroneckerLinear(768, 768, (384, 48), order="native")
    dense = k.to_dense()
    x = torch.randn(2, 9, 768)
    with torch.no_grad():
        y = k(x)
        assert (y - dense(x)).abs().max() < 1e-4
    # under autograd the layer computes b_first_t, with correct gradients
    xg = x.clone().requires_grad_(True)
    k(xg).sum().backward()
    dense(x).sum().backward()
    assert (k.bias.grad - dense.bias.grad).abs().max() < 1e-3


def test_factor_updates_are_always_seen():
    torch.manual_seed(0)
    # B 2x8 (large-A kernel, BLAS B-stage), B 2x16 (large-A kernel, its own B-stage), B 32x24
    # (small-A kernel), B 32x32 (small-A rows kernel)
    for n_in, a_shape in ((96, (32, 12)), (256, (32, 16)), (96, (2, 4)), (128, (2, 4))):
        _check_cache_updates(KroneckerLinear(n_in, 64, a_shape, order="native"))
    # A 384x48 (72 KB): the kernel compares its bytes on two threads, each one half
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _check_cache_updates(KroneckerLinear(768, 768, (384, 48), order="native"))
    finally:
        torch.set_num_threads(threads)


def _check_cache_updates(k):
    x = torch.randn(4, k.in_features)

    def check():
        y = k(x)
        assert (y - k.to_dense()(x)).abs().max() < 1e-5
        return y

    with torch.no_grad():
        y0 = check()
        k.A.mul_(2.0)  # in place: bumps the version
        y1 = check()
        k.A.data.mul_(-1.0)  # through .data: the version does not change, the values do
        y2 = check()
        k.A.data[-1, -1, -1] += 1.0  # the last bytes only
        assert not torch.equal(check(), y2)
        k.B.data.mul_(3.0)  # B is cached too (as the B-stage operand)
        check()
        k.B.add_(0.5)
        check()
        k.load_state_dict({n: p.clone() * 0.5 for n, p in k.state_dict().items()})
        check()
    assert not torch.allclose(y0, y1) and not torch.allclose(y1, y2)


def test_non_contiguous_factor():
    """A factor sliced out of a larger tensor, expanded or permuted: the kernel packs it anyway,
    and its plan (whose bytes cannot be compared in place) is rebuilt on every call."""
    torch.manual_seed(0)
    B = torch.randn(2, 2, 16)
    x = torch.randn(4, 256)
    bases = (torch.randn(2, 64, 16), torch.randn(1, 32, 16), torch.randn(2, 16, 32))
    views = (lambda t: t[:, :32],  # gaps between rows
             lambda t: t.expand(2, 32, 16),  # stride 0: fewer bytes than elements
             lambda t: t.transpose(1, 2))  # dense, permuted
    for base, view in zip(bases, views):
        A = view(base)
        assert not A.is_contiguous()
        for step in range(2):
            if step:
                base.data.add_(1.0)  # a new value of A, seen by the next call
            ref = x.double() @ kronecker_to_dense(A.double(), B.double()).T
            for order in ("native", "auto"):
                with torch.no_grad():
                    for _ in range(2):
                        y = _kron_apply(x, A, B, order, None)
                        assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_layer_built_under_inference_mode():
    """Parameters created under torch.inference_mode are inference tensors (no version counter);
    the kernel still sees in-place updates of them."""
    torch.manual_seed(0)
    with torch.inference_mode():
        # large-A kernel with its own B-stage, small-A with BLAS's B-stage (n2 = 24), small-A rows kernel
        for n_in, a_shape in ((256, (32, 16)), (96, (2, 4)), (128, (2, 4))):
            k = KroneckerLinear(n_in, 64, a_shape, order="native")
            assert k.A.is_inference()
            x = torch.randn(5, n_in)
            y0 = k(x)
            assert (y0 - k.to_dense()(x)).abs().max() < 1e-5
            k.A.mul_(-2.0)
            y1 = k(x)
            assert (y1 - k.to_dense()(x)).abs().max() < 1e-5 and not torch.allclose(y0, y1)


def test_small_a_rows_kernel_runs_up_to_its_row_limit(monkeypatch):
    """kn_small_a_rows takes N*n1 <= 128 rows (here n1 = 2: up to 64 tokens), BLAS the rest
    (where the kernel cannot be built, PyTorch computes every case)."""
    lib = native._library()
    calls = []
    if lib is not None:
        original = lib.kn_small_a_rows

        def counted(*args):
            calls.append(args[5])  # N
            return original(*args)

        monkeypatch.setattr(lib, "kn_small_a_rows", counted)
    torch.manual_seed(0)
    A, B = torch.randn(1, 2, 2), torch.randn(1, 48, 32)
    for rows in (1, 64, 65):
        x = torch.randn(rows, 64)
        with torch.no_grad():
            y = _kron_apply(x, A, B, "native", None)
        ref = x.double() @ kronecker_to_dense(A.double(), B.double()).T
        assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert calls == ([1, 64] if _machine_can_build() else [])


def test_output_is_float32_whatever_the_default_dtype():
    torch.manual_seed(0)
    k = KroneckerLinear(256, 64, (32, 16), order="native")
    x = torch.randn(7, 256)
    with torch.no_grad():
        ref = k.to_dense()(x)
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            y = k(x)
        finally:
            torch.set_default_dtype(old)
    assert y.dtype == torch.float32 and (y - ref).abs().max() < 1e-5


@pytest.mark.parametrize("order", ["native", "auto"])
def test_trainable_bias_alone_gets_its_gradient(order):
    """Frozen factors, trainable bias (BitFit-style): the kernel, which has no autograd, must not run."""
    torch.manual_seed(0)
    k = KroneckerLinear(256, 64, (32, 16), order=order)
    k.A.requires_grad_(False)
    k.B.requires_grad_(False)
    dense = k.to_dense()
    x = torch.randn(5, 256)
    y = k(x)
    assert y.requires_grad
    y.sum().backward()
    dense(x).sum().backward()
    torch.testing.assert_close(k.bias.grad, dense.bias.grad)


def test_empty_input_after_a_cached_choice():
    """0 rows share the autotuner's bucket with 1 row; the native kernel returns an empty result."""
    torch.manual_seed(0)
    for n_in, a_shape in ((768, (384, 48)), (64, (2, 2))):
        k = KroneckerLinear(n_in, 768, a_shape)
        with torch.no_grad():
            k(torch.randn(1, n_in))
            y = k(torch.randn(0, n_in))
            assert _kron_apply(torch.randn(0, n_in), k.A, k.B, "native", k.bias).shape == (0, 768)
        assert y.shape == (0, 768)


def test_compiled_layer_after_eager_calls():
    """An eager call may cache the native kernel for a shape; torch.compile then traces the
    default order instead of the opaque kernel (fullgraph: no graph break)."""
    torch.manual_seed(0)
    k = KroneckerLinear(768, 768, (384, 48))
    x = torch.randn(4, 768)
    with torch.no_grad():
        eager = k(x)
        compiled = torch.compile(k, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_auto_layer_goes_straight_to_a_chosen_kernel_and_back(monkeypatch):
    """Once "auto" has chosen the native kernel for a row count, the layer calls it without
    asking the autotuner again; every change that could make that wrong sends it back: factor
    updates (also through ``.data``), autograd, another dtype, a removed bias, another row
    count, a reset autotuner. The choice is forced here (timing could pick another order)."""
    from kn_transformers import kronecker, set_kronecker_autotune

    monkeypatch.setattr(kronecker, "_ORDER_CACHE", {})  # nothing leaks into other tests
    monkeypatch.setattr(kronecker, "_time_orders", lambda A, B, rows, dtype, device, has_bias, train, a_grad:
                        "native" if native.native_supported(A, B, torch.ones(1, dtype=dtype, device=device))
                        and not train else kronecker._default_order(A, B))
    picks = []
    pick = kronecker._pick_order
    monkeypatch.setattr(kronecker, "_pick_order", lambda *a: picks.append(a[3]) or pick(*a))
    torch.manual_seed(0)
    k = KroneckerLinear(256, 64, (32, 16))  # the large-A kernel with its own B-stage
    x = torch.randn(2, 3, 256)

    def expect(*rows):  # the row counts the autotuner was asked about (without the kernel: every call)
        if _machine_can_build():
            assert picks == list(rows)

    def check(inp):
        y = k(inp)
        ref = inp.double() @ k.to_dense().double().weight.T
        if k.bias is not None:
            ref = ref + k.bias.double()
        assert y.shape == (*inp.shape[:-1], 64) and (y.double() - ref).abs().max() < 1e-5 * ref.abs().max()
        return y

    with torch.no_grad():
        check(x)
        check(x)
        check(x.view(6, 256)[:5])  # 5 rows: the same bucket (8)
        expect(6)
        _check_cache_updates(k)  # 4 rows: chosen once, then .data updates are still seen
        expect(6, 4)
        check(x[:, :1])  # 2 rows: another bucket
        check(x[:, :1])
        expect(6, 4, 2)
        k.double()  # the same parameter objects, now float64: the kernel declines, the autotuner decides
        check(x[:, :1].double())
        k.float()
        expect(6, 4, 2, 2)
        # 200 features: 2 rows of 256, the memo's count; (N, n1, n2): what the kernel reads, not a layer input
        for bad in (torch.randn(2, 255), torch.randn(3, 200), torch.randn(2, 16, 16)):
            with pytest.raises(ValueError, match="256"):
                k(bad)
        with pytest.raises(ValueError, match="256"):
            KroneckerLinear(256, 64, (32, 16), order="native")(torch.randn(2, 16, 16))
    xg = x.clone().requires_grad_(True)  # autograd: never the kernel
    check(xg).sum().backward()
    dense = k.to_dense().requires_grad_(True)
    dense(x).sum().backward()
    torch.testing.assert_close(k.bias.grad, dense.bias.grad)
    with torch.no_grad():
        k.bias = None
        check(x)
        check(x)
        expect(6, 4, 2, 2, 6, 6)
        set_kronecker_autotune(True)  # clears the autotuner's choices: memos from before are void
        check(x)
        expect(6, 4, 2, 2, 6, 6, 6)
        # a copied layer (another process, say, whose autotuner may choose otherwise) asks again
        buf = io.BytesIO()
        torch.save(k, buf)
        buf.seek(0)
        k = torch.load(buf, weights_only=False)
        check(x)
        k = copy.deepcopy(k)
        check(x)
        expect(6, 4, 2, 2, 6, 6, 6, 6, 6)


def test_disabled_by_environment_falls_back_to_pytorch():
    code = (
        "import torch\n"
        "from kn_transformers import native, kronecker_matmul, kronecker_to_dense\n"
        "A, B, x = torch.randn(1, 32, 4), torch.randn(1, 2, 8), torch.randn(3, 32)\n"
        "assert not native.native_supported(A, B, x)\n"
        "y = kronecker_matmul(x, A, B, 'native')\n"
        "assert (y - x @ kronecker_to_dense(A, B).T).abs().max() < 1e-5\n"
        "print('ok')\n"
    )
    env = dict(os.environ, KN_TRANSFORMERS_NATIVE="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
