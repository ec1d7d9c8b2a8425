"""Speed of KroneckerLinear / KroneckerEmbedding against dense nn.Linear / nn.Embedding.

Every figure is a ratio measured in the same run: dense time / Kronecker time (>1 = faster).
Shapes are GPT-2/BERT's (in → out) with the papers' factor splits and balanced ones.

    python benchmarks/bench_kronecker.py [--threads 2] [--min-run-time 0.2] [--repeats 3] [--json out.json]

Each time is the median over ``--repeats`` rounds that alternate dense and Kronecker (each
round a ``blocked_autorange`` median), so that load from other processes hits both alike.
Two Kronecker paths in the same run: the default forward (plain PyTorch, the fixed rule of
``contraction_order``) and the layer after ``optimize_for_inference`` (timed strategies and the native
kernel). Training always runs the default path. "strategy" is the default rule's order / what the
optimised layer chose at that size.
"""

import argparse
import json
import statistics
import sys

import torch
from torch import nn
from torch.utils import benchmark

import copy

from kn_transformers import KroneckerEmbedding, KroneckerLinear, contraction_order, kronecker_flops, optimize_for_inference

from _tee import Tee, cpu_name  # benchmarks/_tee.py (the script folder is on sys.path)

# (in_features, out_features, A shape (m1, n1), where the split comes from)
LINEAR_CASES = [
    (768, 768, (2, 2), "paper: KnGPT2 factor 2 / KroneckerBERT5-like"),
    (768, 768, (384, 48), "paper: KroneckerBERT21 MHA"),
    (768, 768, (32, 16), "balanced"),
    (768, 768, (64, 64), "balanced, small B"),
    (768, 2304, (6, 2), "paper-style: fused QKV, B 384x384"),
    (768, 2304, (48, 16), "balanced"),
    (768, 3072, (8, 2), "paper: KroneckerBERT8 FFN W1"),
    (768, 3072, (64, 16), "balanced"),
    (3072, 768, (2, 8), "paper: KroneckerBERT8 FFN W2"),
    (3072, 768, (16, 64), "balanced"),
]
EMBEDDING_CASES = [
    (30522, 768, (30522, 96), "KroneckerBERT8 (B 1x8)"),
    (50257, 768, (50257, 384), "KnGPT2 (B 1x2)"),
]
TOKENS = [1, 8, 128, 1024]


def _time(stmt, glob, min_run_time):
    # Timer runs on 1 thread unless told otherwise: measure with the threads torch is set to
    timer = benchmark.Timer(stmt=stmt, globals=glob, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def _rounds(jobs, min_run_time, repeats):
    """Median over ``repeats`` rounds of each ``(name, stmt, globals)``, run alternately."""
    runs = {name: [] for name, _, _ in jobs}
    for _ in range(repeats):
        for name, stmt, glob in jobs:
            if name.startswith("fwd"):
                with torch.no_grad():
                    runs[name].append(_time(stmt, glob, min_run_time))
            else:
                runs[name].append(_time(stmt, glob, min_run_time))
    return {name: statistics.median(v) for name, v in runs.items()}


def bench_linear(n_in, n_out, a_shape, tokens, min_run_time, repeats=3):
    torch.manual_seed(0)
    dense = nn.Linear(n_in, n_out)
    kron = KroneckerLinear(n_in, n_out, a_shape)
    m1, n1 = kron.a_shape
    m2, n2 = kron.b_shape
    flop_ratio = n_in * n_out / min(kronecker_flops(m1, n1, m2, n2))
    x = torch.randn(tokens, n_in)
    xg = x.clone().requires_grad_(True)
    g = torch.randn(tokens, n_out)
    opt = optimize_for_inference(copy.deepcopy(kron))
    # the optimised layer times its strategies once, outside the measurement
    with torch.no_grad():
        opt(x)
    strategy = contraction_order(kron.A, kron.B) + "/" + opt._last[1]
    stmt = "m(x).backward(g)"
    out = _rounds([
        ("fwd_dense", "m(x)", {"m": dense, "x": x}),
        ("fwd_kron", "m(x)", {"m": kron, "x": x}),
        ("fwd_opt", "m(x)", {"m": opt, "x": x}),
        ("fb_dense", stmt, {"m": dense, "x": xg, "g": g}),
        ("fb_kron", stmt, {"m": kron, "x": xg, "g": g}),
    ], min_run_time, repeats)
    out["strategy"] = strategy
    return flop_ratio, out


def bench_embedding(vocab, dim, a_shape, tokens, min_run_time, repeats=3):
    torch.manual_seed(0)
    dense = nn.Embedding(vocab, dim)
    kron = KroneckerEmbedding(vocab, dim, a_shape)
    ids = torch.randint(0, vocab, (tokens,))
    g = torch.randn(tokens, dim)
    stmt = "m(i).backward(g)"
    return _rounds([
        ("fwd_dense", "m(i)", {"m": dense, "i": ids}),
        ("fwd_kron", "m(i)", {"m": kron, "i": ids}),
        ("fb_dense", stmt, {"m": dense, "i": ids, "g": g}),
        ("fb_kron", stmt, {"m": kron, "i": ids, "g": g}),
    ], min_run_time, repeats)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--min-run-time", type=float, default=0.2, help="seconds per measurement")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds; the median is reported")
    p.add_argument("--markdown", help="also write the printed tables to this file (RESULTS.md includes it)")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    if args.markdown:
        sys.stdout = Tee(sys.stdout, open(args.markdown, "w"))
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, float32, {cpu_name()}. "
          "Speed-up = dense time / Kronecker time.\n")
    rows = []
    print("| in→out | A (m1×n1) | B (m2×n2) | FLOP ratio | tokens | fwd speed-up, optimised | fwd speed-up, default "
          "| fwd+bwd speed-up | fwd dense ms | strategy (default/optimised) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n_in, n_out, a_shape, why in LINEAR_CASES:
        m2, n2 = n_out // a_shape[0], n_in // a_shape[1]
        for t in TOKENS:
            ratio, r = bench_linear(n_in, n_out, a_shape, t, args.min_run_time, args.repeats)
            row = dict(kind="linear", n_in=n_in, n_out=n_out, a_shape=a_shape, b_shape=(m2, n2), why=why,
                       flop_ratio=ratio, tokens=t, fwd_speedup=r["fwd_dense"] / r["fwd_opt"],
                       fwd_speedup_default=r["fwd_dense"] / r["fwd_kron"],
                       fb_speedup=r["fb_dense"] / r["fb_kron"], **r)
            rows.append(row)
            print(f"| {n_in}→{n_out} | {a_shape[0]}×{a_shape[1]} | {m2}×{n2} | {ratio:.1f} | {t} | "
                  f"{row['fwd_speedup']:.2f}x | {row['fwd_speedup_default']:.2f}x | {row['fb_speedup']:.2f}x "
                  f"| {r['fwd_dense'] * 1e3:.3f} "
                  f"| {r['strategy']} |", flush=True)
    print("\n| embedding | A | B | tokens | fwd speed-up | fwd+bwd speed-up | fwd dense µs |")
    print("|---|---|---|---|---|---|---|")
    for vocab, dim, a_shape, why in EMBEDDING_CASES:
        for t in TOKENS:
            r = bench_embedding(vocab, dim, a_shape, t, args.min_run_time, args.repeats)
            row = dict(kind="embedding", vocab=vocab, dim=dim, a_shape=a_shape, why=why, tokens=t,
                       fwd_speedup=r["fwd_dense"] / r["fwd_kron"], fb_speedup=r["fb_dense"] / r["fb_kron"], **r)
            rows.append(row)
            print(f"| {vocab}×{dim} | {a_shape[0]}×{a_shape[1]} | 1×{dim // a_shape[1]} | {t} | "
                  f"{row['fwd_speedup']:.2f}x | {row['fb_speedup']:.2f}x | {r['fwd_dense'] * 1e6:.1f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
