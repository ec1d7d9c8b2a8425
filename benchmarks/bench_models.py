"""Whole-model CPU inference: dense GPT-2/BERT against their Kronecker versions, in one run.

Random weights (speed does not depend on their values). For each model, in a fresh process
(so that peak resident memory is its own): parameters, checkpoint bytes (safetensors) and
their ratio to parameters x 4 bytes, prefill / encoder time, generation time, peak RSS.
``--rounds`` runs every model of a family that many times, in alternation, and reports the
median over rounds: the machine's speed drifts by 5-10% over minutes, which would otherwise
land on whichever model ran at a bad moment.

    python benchmarks/bench_models.py [--threads 2] [--repeats 5] [--rounds 3] [--json results.json]
        [--only gpt2|bert] [--malloc_large_blocks]

Kronecker models run after ``optimize_for_inference``; the ``-default`` rows are the same models on
the default plain-PyTorch path. GPT-2 family: prefill = one forward of batch 8 x 128 tokens; generation = greedy, batch 1,
a 16-token prompt, 64 new tokens with the KV cache. BERT family: one forward of 32 x 128;
``bert-base-kn-layers`` is the dense BERT-base computed by this library's layer code
(``KroneckerBertModel`` without factors: FFN in token blocks, in-place GELU), which separates what
the layer code gives from what the Kronecker factors give.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from _tee import Tee, cpu_name  # benchmarks/_tee.py (the script folder is on sys.path)


# A Kronecker model runs after ``optimize_for_inference`` (timed strategies, native kernel); its
# ``-default`` twin runs the default plain-PyTorch path, so each table shows what the kernel buys.
DEFAULT = "-default"
MODELS = {
    "gpt2": ["gpt2-small", "kngpt2-paper", "kngpt2-paper" + DEFAULT, "kngpt2-distil-size-dense-head",
             "kngpt2-distil-size-dense-head" + DEFAULT, "kngpt2-distil-size-tied-head",
             "kngpt2-distil-size-tied-head" + DEFAULT, "gpt2-6-layer"],
    "bert": ["bert-base", "bert-base-kn-layers", "kroneckerbert8", "kroneckerbert8" + DEFAULT, "kroneckerbert21",
             "kroneckerbert21" + DEFAULT],
}
# With glibc's defaults a block over 32 MB is always a fresh mmap, so every 50 MB FFN activation
# of BERT-base at 32 x 128 tokens is page-faulted in again (~10 ms each here). These settings keep
# freed blocks for reuse, as a caching allocator (jemalloc, tcmalloc: PyTorch's CPU tuning guide)
# would. Every model of a run gets the same environment.
MALLOC_LARGE_BLOCKS = {"MALLOC_MMAP_THRESHOLD_": "268435456", "MALLOC_TRIM_THRESHOLD_": "1073741824",
                       "MALLOC_TOP_PAD_": "268435456"}
DISTILGPT2_PARAMS = 81_912_576  # GPT2Config(n_layer=6): the size of DistilGPT2 (tied head)


def _gpt2_at_size(target: int, tie: bool):
    """A KnGPT2 with every layer compressed, total parameters (head counted) closest to ``target`` from below.

    The embedding is fixed first and the 12 layers get the rest of the budget (their per-matrix
    fraction is bisected for ranks 1-3; the factor splits are discrete, so the total lands just
    below):

    - ``tie=False`` (dense head): ``wte`` dense and the paper's untied dense head, which puts the
      budget where it costs no FLOPs (a lookup and the head every model pays) and leaves ~4M
      for the layers;
    - ``tie=True``: ``wte`` Kronecker with the paper's ``A 1x2`` split, the head tied to it and
      computed factored (``KroneckerEmbedding.logits``); the layers get ~62M.
    """
    from transformers import GPT2Config

    from kn_transformers import KnGPT2LMHeadModel, kngpt2_config_from_gpt2
    from kn_transformers.core.report import count_parameters

    import torch

    def build(fraction, rank):
        layers = kngpt2_config_from_gpt2(GPT2Config(), preset=None, target_fraction=fraction, embedding=False,
                                         rank=rank)
        factors = dict(layers.kronecker_factors)
        if tie:
            factors["wte"] = {"a_shape": [1, 2], "rank": 1}
        cfg = kngpt2_config_from_gpt2(GPT2Config(), preset=None, kronecker_factors=factors, tie_word_embeddings=tie)
        with torch.device("meta"):
            return cfg, count_parameters(KnGPT2LMHeadModel(cfg))

    best, best_n = None, 0
    for rank in (1, 2, 3):  # rank 1 alone jumps from half size (A 1x2) to dense
        lo, hi = 0.001, 0.999
        for _ in range(16):  # bisection on the layers' per-matrix fraction
            mid = (lo + hi) / 2
            cfg, n = build(mid, rank)
            if n <= target:
                lo = mid
                if n > best_n:
                    best, best_n = cfg, n
            else:
                hi = mid
    if best is None:
        raise RuntimeError(f"no KnGPT2 fits in {target} parameters")
    return KnGPT2LMHeadModel(best)


def build(name: str):
    import torch
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    from kn_transformers import (KnGPT2LMHeadModel, KroneckerBertConfig, KroneckerBertModel, kngpt2_config_from_gpt2,
                                 kronecker_bert_config)

    torch.manual_seed(0)
    if name == "gpt2-small":
        return GPT2LMHeadModel(GPT2Config())
    if name == "gpt2-6-layer":
        return GPT2LMHeadModel(GPT2Config(n_layer=6))
    if name == "kngpt2-paper":
        return KnGPT2LMHeadModel(kngpt2_config_from_gpt2(GPT2Config(), preset="paper"))
    if name == "kngpt2-distil-size-dense-head":
        return _gpt2_at_size(DISTILGPT2_PARAMS, tie=False)
    if name == "kngpt2-distil-size-tied-head":
        return _gpt2_at_size(DISTILGPT2_PARAMS, tie=True)
    if name == "bert-base":
        return BertModel(BertConfig(), add_pooling_layer=True)
    if name == "bert-base-kn-layers":
        dense = {k: v for k, v in BertConfig().to_dict().items() if k != "model_type"}
        return KroneckerBertModel(KroneckerBertConfig(**dense, kronecker_factors={}))
    if name in ("kroneckerbert8", "kroneckerbert21"):
        return KroneckerBertModel(kronecker_bert_config(BertConfig(), preset=name))
    raise ValueError(name)


def _median_time(fn, repeats):
    fn()  # warm-up (also lets optimised layers time their contraction strategies)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure(name: str, threads: int, repeats: int) -> dict:
    """Runs in a fresh process (see main)."""
    import torch

    from kn_transformers.core.report import count_parameters

    from kn_transformers import KroneckerLinear, optimize_for_inference

    torch.set_num_threads(threads)
    model = build(name.removesuffix(DEFAULT)).eval()
    if not name.endswith(DEFAULT) and any(isinstance(m, KroneckerLinear) for m in model.modules()):
        optimize_for_inference(model)
    n_params = count_parameters(model)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        ckpt = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))
    out = {"model": name, "parameters": n_params, "checkpoint_bytes": ckpt, "checkpoint_vs_params_x4": ckpt / (4 * n_params)}
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        if name.startswith(("gpt2", "kngpt2")):
            ids = torch.randint(0, 50257, (8, 128), generator=g)
            out["prefill_s"] = _median_time(lambda: model(input_ids=ids, use_cache=False), repeats)
            prompt = torch.randint(0, 50257, (1, 16), generator=g)
            gen = lambda: model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=64,  # noqa: E731
                                         min_new_tokens=64, do_sample=False, pad_token_id=0)
            out["generate_s"] = _median_time(gen, max(2, repeats // 2))
        else:
            ids = torch.randint(0, 30522, (32, 128), generator=g)
            out["forward_s"] = _median_time(lambda: model(input_ids=ids), repeats)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per process; their median is a round's figure")
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per model, in alternation; median reported")
    p.add_argument("--only", choices=sorted(MODELS))
    p.add_argument("--malloc_large_blocks", action="store_true",
                   help="run every model with glibc malloc keeping large blocks (see MALLOC_LARGE_BLOCKS)")
    p.add_argument("--markdown", help="also write the printed tables to this file (RESULTS.md includes it)")
    p.add_argument("--json")
    p.add_argument("--_one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rounds < 1 or args.repeats < 1:
        p.error("--rounds and --repeats must be at least 1")
    if args._one:
        print(json.dumps(measure(args._one, args.threads, args.repeats)))
        return
    if args.markdown:
        sys.stdout = Tee(sys.stdout, open(args.markdown, "w"))
    rows = []
    timed = ("prefill_s", "generate_s", "forward_s")
    env = dict(os.environ, **(MALLOC_LARGE_BLOCKS if args.malloc_large_blocks else {}))
    for family in [args.only] if args.only else list(MODELS):
        runs = {name: [] for name in MODELS[family]}
        for rnd in range(args.rounds):
            for name in MODELS[family]:
                proc = subprocess.run([sys.executable, __file__, "--_one", name, "--threads", str(args.threads),
                                       "--repeats", str(args.repeats)], capture_output=True, text=True, env=env)
                if proc.returncode:
                    sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
                runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"measured {name} (round {rnd + 1}/{args.rounds})", file=sys.stderr, flush=True)
        for name, rs in runs.items():
            row = dict(rs[0])
            for col in timed:
                if col in row:
                    row[col] = statistics.median(r[col] for r in rs)
                    row[col + "_rounds"] = [r[col] for r in rs]
            row["peak_rss_mib"] = max(r["peak_rss_mib"] for r in rs)
            rows.append(row)
    malloc = ("glibc malloc keeping large blocks (" + " ".join(f"{k}={v}" for k, v in MALLOC_LARGE_BLOCKS.items())
              + ")" if args.malloc_large_blocks else "glibc malloc defaults")
    print(f"{cpu_name()}, {args.threads} threads, fp32, random weights, {malloc}; each time is the median over {args.rounds} "
          f"rounds (fresh processes, models in alternation) of the median of {args.repeats} runs; "
          "speed-up = baseline time / model time.\n")
    for family, base, cols in (("gpt2", "gpt2-small", ("prefill_s", "generate_s")), ("bert", "bert-base", ("forward_s",))):
        fam = [r for r in rows if r["model"] in MODELS[family]]
        if not fam:
            continue
        b = next(r for r in fam if r["model"] == base)
        head = " | ".join(f"{c[:-2]} ms | {c[:-2]} speed-up" for c in cols)
        print(f"| model | parameters | checkpoint MiB | ckpt / (params x 4) | {head} | peak RSS MiB |")
        print("|---|---|---|---|" + "---|---|" * len(cols) + "---|")
        for r in fam:
            cells = " | ".join(f"{r[c] * 1e3:.1f} | {b[c] / r[c]:.2f}x" for c in cols)
            print(f"| {r['model']} | {r['parameters'] / 1e6:.2f}M | {r['checkpoint_bytes'] / 2**20:.1f} | "
                  f"{r['checkpoint_vs_params_x4']:.4f} | {cells} | {r['peak_rss_mib']:.0f} |")
        print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "repeats": args.repeats, "rounds": args.rounds,
                       "malloc_large_blocks": args.malloc_large_blocks, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
