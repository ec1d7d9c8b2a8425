"""One Kronecker layer in ONNX Runtime, per contraction form: which form a graph runtime runs fastest.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_onnx_layers.py [--threads 2] [--layers kb8_attn ...] \\
        [--markdown benchmarks/results/onnx_layers.md]

Each form is exported alone with ``torch.onnx.export(dynamo=True)`` (the exporter ``export_onnx``
uses) and run by an ``onnxruntime`` CPU session at 1 x 128 and 32 x 128 tokens; the dense
``nn.Linear`` of the same shape is the baseline in the same run (ratio = dense time / form time).
The forms are the library's contraction orders (``kn_transformers.core.contraction``) that can
win in a graph runtime (``worth_timing``). The layers are KroneckerBERT's on BERT-base (``kroneckerbert8`` / ``21``).
This is the evidence for choosing the export's order per shape (issue: ONNX Runtime speed).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import warnings

import numpy as np
import torch
from torch import nn

from _tee import cpu_name  # benchmarks/_tee.py
from bench_onnx import session, time_call  # the same ORT session options and timing as the model benchmark
from kn_transformers.core.contraction import kronecker_matmul

#: name -> (m1, n1, m2, n2) of A (m1 x n1) and B (m2 x n2)
LAYERS = {
    "kb8_attn": (384, 384, 2, 2), "kb8_ffn_in": (8, 2, 384, 384), "kb8_ffn_out": (2, 8, 384, 384),
    "kb21_attn": (384, 48, 2, 16), "kb21_ffn_in": (16, 2, 192, 384), "kb21_ffn_out": (2, 16, 384, 192),
}
LIBRARY_ORDERS = ("b_first_flat", "a_first_t", "b_first_ew", "a_first_ew", "b_first", "a_first", "b_first_bmm",
                  "a_first_bmm", "b_first_expand", "a_first_expand", "a_first_cols")


def worth_timing(order: str, m1: int, n1: int, m2: int, n2: int) -> bool:
    """Skips forms that cannot win: the elementwise ones unless ``A`` is tiny (one graph node per
    entry of ``A``), the expanded ones when their multiply-adds reach half the dense layer's."""
    if order.endswith(("_ew", "_bmm")) or order in ("b_first", "a_first"):  # A applied per row: only a tiny A
        return m1 * n1 <= 32
    if order == "b_first_expand":
        return n1 * m2 * (n2 + m1 * m2) <= m1 * m2 * n1 * n2 / 2
    if order == "a_first_expand":
        return m1 * n2 * (n1 * n2 + m2) <= m1 * m2 * n1 * n2 / 2
    if order == "a_first_cols":
        return n2 <= 4
    return True
SHAPES = ((1, 128), (32, 128))


class Form(nn.Module):
    def __init__(self, order, m1, n1, m2, n2):
        super().__init__()
        self.order, self.n1, self.n2 = order, n1, n2
        self.A = nn.Parameter(torch.randn(1, m1, n1) / n1 ** 0.5)
        self.B = nn.Parameter(torch.randn(1, m2, n2) / n2 ** 0.5)

    def forward(self, x):
        return kronecker_matmul(x, self.A, self.B, order=self.order)


def time_in_ort(module, features, folder, threads, repeats):
    """``{shape: seconds}``: ``module`` exported alone, checked against PyTorch, timed by ORT."""
    path = os.path.join(folder, "layer.onnx")
    b, s = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(2, 8, features),), path, dynamo=True, input_names=["x"],
                          dynamic_shapes=({0: b, 1: s},), verbose=False)
    sess = session(path, threads)
    out = {}
    for shape in SHAPES:
        x = torch.randn(*shape, features)
        with torch.no_grad():
            ref = module(x).numpy()
        feeds = {"x": x.numpy()}
        got = sess.run(None, feeds)[0]
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), "the form computes a different product"
        out[shape] = time_call(lambda: sess.run(None, feeds), repeats)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    p.add_argument("--markdown", default=None, help="also write the table here")
    args = p.parse_args(argv)
    logging.disable(logging.WARNING)
    torch.manual_seed(0)
    import onnxruntime

    lines = [f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; "
             f"median of {args.repeats} calls; ratio = dense nn.Linear time / form time, same run.", "",
             "| layer | A | B | form | 1x128 ms | 32x128 ms | vs dense 1x128 | vs dense 32x128 |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as folder:
        for name in args.layers:
            m1, n1, m2, n2 = LAYERS[name]
            dense = time_in_ort(nn.Linear(n1 * n2, m1 * m2), n1 * n2, folder, args.threads, args.repeats)
            forms = LIBRARY_ORDERS
            for order in forms:
                if not worth_timing(order, m1, n1, m2, n2):
                    continue
                t = time_in_ort(Form(order, m1, n1, m2, n2), n1 * n2, folder, args.threads, args.repeats)
                lines.append(f"| {name} | {m1}x{n1} | {m2}x{n2} | {order} | {t[SHAPES[0]] * 1e3:.3f} | "
                             f"{t[SHAPES[1]] * 1e3:.2f} | {dense[SHAPES[0]] / t[SHAPES[0]]:.2f}x | "
                             f"{dense[SHAPES[1]] / t[SHAPES[1]]:.2f}x |")
                print(lines[-1], flush=True)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
