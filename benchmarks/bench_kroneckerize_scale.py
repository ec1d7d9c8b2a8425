"""Scale: ``kroneckerize`` on a ~0.5B-parameter Llama-shaped model, time and peak memory.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_kroneckerize_scale.py \\
        --json benchmarks/results/scale_kroneckerize.json

The path a user with a large checkpoint takes, sized to this machine: a ``LlamaForCausalLM`` with
random weights (hidden 1280, MLP 3456, 24 layers, 20 query / 4 key-value heads, vocabulary 32,000,
untied head: 495M parameters, float32) is written to a folder once; then, each step in a fresh
process so that its peak resident memory (``VmHWM``) is its own:

1. ``load``: ``AutoModelForCausalLM.from_pretrained(folder)`` (transformers builds the model on the
   meta device and fills it from the memory-mapped safetensors file; every weight is then read
   once, so that it is resident) — the dense model alone;
2. ``kroneckerize``: the same load, then ``kroneckerize(model, KroneckerConfig(fraction=...,
   embedding=True))`` (every linear of the blocks and the token embedding, module by module: the
   student's tree is a meta copy, each factor pair is made from one SVD) and ``save_pretrained``;
3. ``reload``: ``AutoModelForCausalLM.from_pretrained(compressed_folder)`` — the Kronecker layers
   built on the meta device and filled from the factors.

Reported against the sizes of what each step holds: peak minus the process's resident memory
after imports, compared with dense + compressed + the largest matrix's SVD workspace (the float64
rearranged matrix and its factors, as ``nearest_kronecker`` computes them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPE = dict(hidden_size=1280, intermediate_size=3456, num_hidden_layers=24, num_attention_heads=20,
             num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)
GIB = 2 ** 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fraction", type=float, default=0.25, help="per-matrix parameter fraction")
    p.add_argument("--workdir", default=None, help="where the two checkpoints go (default: a temporary folder)")
    p.add_argument("--json", default=None)
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)  # internal: one measured step
    return p.parse_args(argv)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    """This process's resident high-water mark (``VmHWM``: unlike ``ru_maxrss``, not inherited
    from the parent across ``exec``)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _tensor_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def make_checkpoint(folder: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE))
    model.save_pretrained(folder)
    return {"params": sum(p.numel() for p in model.parameters()), "bytes": _tensor_bytes(model)}


def step(name: str, dense: str, compressed: str, fraction: float) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import kn_transformers
    from kn_transformers import KroneckerConfig, kroneckerize

    torch.set_num_threads(2)
    base = _rss()
    out = {"step": name, "rss_after_imports": base}
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(compressed if name == "reload" else dense)
    out["load_s"] = time.perf_counter() - t0
    # safetensors are memory-mapped: read every weight once so that the model is resident, as
    # after a forward pass (kroneckerize reads them all anyway)
    out["max_weight"] = max(float(t.max()) for t in model.state_dict().values() if t.numel())
    out["model_bytes"] = _tensor_bytes(model)
    out["params"] = sum(p.numel() for p in model.parameters())
    if name == "reload":
        out["kronecker_layers"] = sum(isinstance(m, (kn_transformers.KroneckerLinear, kn_transformers.KroneckerEmbedding))
                                      for m in model.modules())
    if name == "kroneckerize":
        t0 = time.perf_counter()
        student = kroneckerize(model, KroneckerConfig(target_modules="all-linear", fraction=fraction, embedding=True),
                               progress=False)
        out["kroneckerize_s"] = time.perf_counter() - t0
        out["student_bytes"] = _tensor_bytes(student)
        out["student_params"] = sum(p.numel() for p in student.parameters())
        # the largest SVD: nearest_kronecker's float64 copy, its rearrangement, U, S and Vh
        work = 0
        for spec in student.config.quantization_config.modules.values():
            (m, n), (m1, n1) = spec["shape"], spec["a_shape"]
            rows, cols = m1 * n1, -(-m // m1) * (n // n1)
            k = min(rows, cols)
            work = max(work, 8 * (2 * rows * cols + k * (rows + cols + 1)))
        out["svd_workspace_bytes"] = work
        out["modules"] = len(student.config.quantization_config.modules)
        out["mean_relative_error"] = sum(r.rel_error for r in student.compression_report.modules) / out["modules"]
        t0 = time.perf_counter()
        student.save_pretrained(compressed)
        out["save_s"] = time.perf_counter() - t0
    out["peak_rss"] = _peak()
    return out


def _run_step(name: str, dense: str, compressed: str, fraction: float) -> dict:
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--step", name, "--fraction", str(fraction),
                           "--workdir", os.path.dirname(dense)], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.step is not None:
        dense, compressed = os.path.join(args.workdir, "dense"), os.path.join(args.workdir, "kron")
        print(json.dumps(step(args.step, dense, compressed, args.fraction)))
        return {}
    from _tee import cpu_name

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        dense, compressed = os.path.join(work, "dense"), os.path.join(work, "kron")
        t0 = time.perf_counter()
        made = make_checkpoint(dense)
        made["make_s"] = time.perf_counter() - t0
        steps = {name: _run_step(name, dense, compressed, args.fraction) for name in ("load", "kroneckerize", "reload")}
    k = steps["kroneckerize"]
    result = {"cpu": cpu_name(), "cpus": os.cpu_count(), "shape": SHAPE, "fraction": args.fraction,
              "dense": made, "steps": steps,
              "expected_peak_bytes": k["model_bytes"] + k["student_bytes"] + k["svd_workspace_bytes"],
              "measured_peak_bytes": k["peak_rss"] - k["rss_after_imports"]}
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def markdown(r: dict) -> str:
    s = r["steps"]
    k = s["kroneckerize"]
    rows = [
        "| step | time | peak RSS above imports | holds |",
        "|---|---|---|---|",
        f"| load the dense folder | {s['load']['load_s']:.1f} s | {(s['load']['peak_rss'] - s['load']['rss_after_imports']) / GIB:.2f} GiB "
        f"| dense {s['load']['model_bytes'] / GIB:.2f} GiB |",
        f"| load + `kroneckerize` ({k['modules']} modules) + save | {k['load_s']:.1f} + {k['kroneckerize_s']:.1f} + "
        f"{k['save_s']:.1f} s | {r['measured_peak_bytes'] / GIB:.2f} GiB | dense {k['model_bytes'] / GIB:.2f} + compressed "
        f"{k['student_bytes'] / GIB:.2f} + largest SVD {k['svd_workspace_bytes'] / GIB:.2f} = "
        f"{r['expected_peak_bytes'] / GIB:.2f} GiB |",
        f"| reload the compressed folder ({s['reload']['kronecker_layers']} Kronecker layers) | {s['reload']['load_s']:.1f} s "
        f"| {(s['reload']['peak_rss'] - s['reload']['rss_after_imports']) / GIB:.2f} GiB "
        f"| compressed {s['reload']['model_bytes'] / GIB:.2f} GiB |",
    ]
    head = (f"`LlamaForCausalLM` {r['dense']['params'] / 1e6:.0f}M parameters (float32, random weights) → "
            f"{k['student_params'] / 1e6:.0f}M with `fraction={r['fraction']}`, `embedding=True`; "
            f"{r['cpu']}, {r['cpus']} cores. Peak / (dense + compressed + one SVD): "
            f"{r['measured_peak_bytes'] / r['expected_peak_bytes']:.2f}.")
    return head + "\n\n" + "\n".join(rows)


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
