"""Which start keeps most of the teacher: the papers' SVD init, activation-aware init, a global
budget, and low-rank factorisation at the same size.

    HF_HUB_OFFLINE=1 nice -n 15 .venv/bin/python benchmarks/study_init.py --threads 2

Two teachers, every linear of the base model targeted (``target_modules="all-linear"``; the
embedding and the heads stay dense), at each ``--fractions`` of those matrices' parameters:

* ``gpt2``: a GPT-2 (4 layers x 256, 128 positions, tied head) trained here on the WikiText-2
  validation text with the real GPT-2 BPE, its vocabulary cut to the ``--vocab`` most frequent
  training tokens (the rest map to one "other" id; the 50,257-row head would cost most of the
  time); metric: held-out perplexity on the last 5% of the token stream.
* ``minilm``: the bundled MiniLM-L6-H384 fine-tuned on SST-2 training rows; metric: dev accuracy.

Calibration text (``--calibration_samples`` sequences) comes from training text that the
metric never sees. Methods, each right after conversion and after ``--ilkd_steps`` steps of ILKD
(``distill_preset="kngpt2"``, the same budget for all):

  (a) ``svd``: ``kroneckerize(fraction=f)``, the papers' nearest Kronecker product, uniform splits;
  (b) ``activation``: the same splits, ``init="activation"`` (ALS on the output error);
  (c) ``activation+budget``: ``budget=f, rank=--max_rank, init="activation"``, splits and ranks chosen;
  (d) ``low-rank``: ``U·V`` by truncated SVD at the same per-matrix fraction (``benchmarks/low_rank.py``);
  (e) ``low-rank+activation``: whitened SVD (SVD-LLM) at that fraction.

Writes ``benchmarks/results/init_study.json`` (rewritten after each run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.utils import logging as hf_logging  # noqa: E402

import kn_transformers  # noqa: E402
from kn_transformers import DistillationArguments, ILKDTrainer, KroneckerConfig, kroneckerize  # noqa: E402
from kn_transformers.core.calibration import calibration_batches, collect_statistics  # noqa: E402
from kn_transformers.core.kroneckerize import _targets  # noqa: E402
from kn_transformers.core.report import count_parameters  # noqa: E402
from kn_transformers.recipes.perplexity import sliding_window_perplexity  # noqa: E402

from _study import (  # noqa: E402  (benchmarks/_study.py)
    DEFAULT_DATA,
    ROOT,
    add_threads_arg,
    command_line,
    finish,
    lm_blocks,
    log,
    save,
    wikitext_token_streams,
)
from low_rank import low_rank_model  # noqa: E402

METHODS = ("svd", "activation", "activation+budget", "low-rank", "low-rank+activation")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=DEFAULT_DATA)
    p.add_argument("--models", nargs="+", default=["gpt2", "minilm"], choices=["gpt2", "minilm"])
    p.add_argument("--fractions", nargs="+", type=float, default=[0.25, 0.1, 0.05])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--max_rank", type=int, default=64,
                   help="largest rank the budget may choose (high enough for its low-rank splits)")
    p.add_argument("--calibration_samples", type=int, default=128)
    p.add_argument("--ilkd_steps", type=int, default=60)
    p.add_argument("--ilkd_lr", type=float, default=2e-4)
    p.add_argument("--batch_size", type=int, default=16, help="teachers' training batch")
    p.add_argument("--ilkd_batch_size", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096, help="gpt2: most frequent training tokens kept")
    p.add_argument("--gpt2_steps", type=int, default=300)
    p.add_argument("--minilm_steps", type=int, default=250, help="SST-2 fine-tuning steps of the teacher")
    p.add_argument("--sst2_rows", type=int, default=4000)
    p.add_argument("--seed", type=int, default=42)
    add_threads_arg(p)
    p.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "init_study.json"))
    return p.parse_args(argv)


def targs(cls, args, name, steps, lr, batch=None, **extra):
    return cls(output_dir=os.path.join(args.tmp, name), max_steps=steps, learning_rate=lr,
               per_device_train_batch_size=batch or args.batch_size, warmup_steps=0.1, weight_decay=0.01,
               lr_scheduler_type="linear", logging_steps=max(steps // 4, 1), save_strategy="no", eval_strategy="no",
               report_to=[], seed=args.seed, data_seed=args.seed, use_cpu=True, disable_tqdm=True, **extra)


# -- the two teachers and their metrics ----------------------------------------------------------


def gpt2_setup(args):
    tok = AutoTokenizer.from_pretrained(os.path.join(args.data_dir, "gpt2-tokenizer"))
    train, held = wikitext_token_streams(args.data_dir, tok, heldout=0.05, vocab=args.vocab)
    size = 128
    blocks = lm_blocks(train, size)
    calib = torch.stack([b["input_ids"] for b in blocks[-args.calibration_samples:]])  # not the held-out text
    cfg = GPT2Config(vocab_size=args.vocab, n_positions=size, n_embd=256, n_layer=4, n_head=4,
                     bos_token_id=args.vocab - 1, eos_token_id=args.vocab - 1, tie_word_embeddings=True)
    set_seed(args.seed)
    teacher = GPT2LMHeadModel(cfg)
    t0 = time.perf_counter()
    Trainer(model=teacher, args=targs(TrainingArguments, args, "gpt2-teacher", args.gpt2_steps, 1e-3),
            train_dataset=blocks, data_collator=default_data_collator).train()
    teacher.eval()

    def metric(model):
        return sliding_window_perplexity(model, held, max_length=size, stride=size, batch_size=16,
                                         show_progress=False)["perplexity"]

    info = {"teacher": "GPT-2 4x256 trained here", "metric": "held-out perplexity (lower is better)",
            "teacher_steps": args.gpt2_steps, "teacher_seconds": time.perf_counter() - t0,
            "train_tokens": train.numel(), "heldout_tokens": held.numel(), "vocab": args.vocab}
    return teacher, calib, blocks, default_data_collator, None, metric, info


def minilm_setup(args):
    from kn_transformers.demo import bundled_teacher_path

    path = bundled_teacher_path()
    tok = AutoTokenizer.from_pretrained(path)

    def rows(split):
        with open(os.path.join(args.data_dir, "glue", "sst2", f"{split}.jsonl")) as f:
            return [json.loads(line) for line in f if line.strip()]

    train = random.Random(args.seed).sample(rows("train"), args.sst2_rows + args.calibration_samples)
    train, calib_rows = train[:args.sst2_rows], train[args.sst2_rows:]
    dev = rows("validation")

    def encode(part):
        enc = tok([r["sentence"] for r in part], truncation=True, max_length=64)
        return [dict({k: enc[k][i] for k in enc}, labels=int(r["label"])) for i, r in enumerate(part)]

    train_set, dev_set = encode(train), encode(dev)
    calib = tok([r["sentence"] for r in calib_rows], padding=True, truncation=True, max_length=64, return_tensors="pt")
    collate = DataCollatorWithPadding(tok)
    set_seed(args.seed)
    teacher = BertForSequenceClassification.from_pretrained(path, num_labels=2)
    t0 = time.perf_counter()
    Trainer(model=teacher, args=targs(TrainingArguments, args, "minilm-teacher", args.minilm_steps, 5e-5),
            train_dataset=train_set, data_collator=collate).train()
    teacher.eval()

    @torch.no_grad()
    def metric(model):
        model.eval()
        correct = 0
        for i in range(0, len(dev_set), 64):
            part = dev_set[i:i + 64]
            batch = collate([{k: v for k, v in e.items() if k != "labels"} for e in part])
            correct += sum(int(p == e["labels"]) for p, e in zip(model(**batch).logits.argmax(-1).tolist(), part))
        return correct / len(dev_set)

    info = {"teacher": "MiniLM-L6-H384 fine-tuned on SST-2", "metric": "SST-2 dev accuracy (higher is better)",
            "teacher_steps": args.minilm_steps, "teacher_seconds": time.perf_counter() - t0,
            "train_rows": len(train_set), "dev_rows": len(dev_set)}
    return teacher, calib, train_set, collate, tok, metric, info


# -- one method at one fraction -------------------------------------------------------------------


def build(method, teacher, fraction, calib, args, statistics):
    if method == "svd":
        return kroneckerize(teacher, KroneckerConfig(fraction=fraction), progress=False)
    if method == "activation":
        return kroneckerize(teacher, KroneckerConfig(fraction=fraction, init="activation"), calibration_data=calib,
                            calibration_samples=args.calibration_samples, progress=False)
    if method == "activation+budget":
        return kroneckerize(teacher, KroneckerConfig(budget=fraction, rank=args.max_rank, init="activation"),
                            calibration_data=calib, calibration_samples=args.calibration_samples, progress=False)
    targets = _targets(teacher, KroneckerConfig(fraction=fraction))
    student, _ = low_rank_model(teacher, targets, fraction, statistics if method == "low-rank+activation" else None)
    return student


def compressed_params(student, teacher, targets_dense):
    """Parameters of the targeted matrices after compression (total change + the dense count)."""
    return count_parameters(student) - (count_parameters(teacher) - targets_dense)


def main(argv=None):
    args = parse_args(argv)
    args.t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    results = {"study": "init_study", "command": command_line("study_init.py", argv),
               "budgets": {k: getattr(args, k) for k in ("fractions", "max_rank", "calibration_samples", "ilkd_steps",
                                                         "ilkd_lr", "batch_size", "ilkd_batch_size", "vocab", "gpt2_steps",
                                                         "minilm_steps", "sst2_rows", "seed")},
               "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                               "kn_transformers": kn_transformers.__version__, "threads": torch.get_num_threads(),
                               "cpu": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M")},
               "models": {}, "complete": False}
    try:
        with open("/proc/cpuinfo") as f:
            results["environment"]["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        for model_name in args.models:
            setup = gpt2_setup if model_name == "gpt2" else minilm_setup
            teacher, calib, train_set, collate, tok, metric, info = setup(args)
            info["teacher_score"] = metric(teacher)
            log(f"[{model_name}] teacher {info['metric']}: {info['teacher_score']:.4f} ({info['teacher_seconds']:.0f} s)")
            targets = _targets(teacher, KroneckerConfig(fraction=0.5))
            dense = sum(m.weight.numel() for m in targets.values())
            info.update(targeted_matrices=len(targets), targeted_params=dense, teacher_params=count_parameters(teacher))
            statistics = collect_statistics(teacher, targets, calibration_batches(calib, args.calibration_samples))
            entry = results["models"][model_name] = {**info, "runs": []}
            for fraction in args.fractions:
                for method in args.methods:
                    set_seed(args.seed)
                    t0 = time.perf_counter()
                    student = build(method, teacher, fraction, calib, args, statistics)
                    convert_s = time.perf_counter() - t0
                    kept = compressed_params(student, teacher, dense) / dense
                    at_conversion = metric(student)
                    dargs = targs(DistillationArguments, args, f"{model_name}-{method}-{fraction}", args.ilkd_steps,
                                  args.ilkd_lr, batch=args.ilkd_batch_size, distill_preset="kngpt2")
                    trainer = ILKDTrainer(model=student, teacher_model=teacher, args=dargs, train_dataset=train_set,
                                          data_collator=collate, processing_class=tok)
                    t1 = time.perf_counter()
                    trainer.train()
                    ilkd_s = time.perf_counter() - t1
                    after = metric(student)
                    run = {"fraction": fraction, "method": method, "kept_fraction": kept,
                           "params": count_parameters(student), "at_conversion": at_conversion, "after_ilkd": after,
                           "convert_seconds": convert_s, "ilkd_seconds": ilkd_s}
                    report = getattr(student, "compression_report", None)
                    if report is not None:
                        run["choices"] = [{"name": m.name, "shape": m.shape, "a_shape": m.a_shape, "b_shape": m.b_shape,
                                           "rank": m.rank, "params": m.params_after, "output_error": m.output_error}
                                          for m in report.modules]
                    entry["runs"].append(run)
                    log(f"[{model_name}] {fraction:.0%} {method}: kept {kept:.3f}, {at_conversion:.4f} -> "
                        f"{after:.4f} after {args.ilkd_steps} ILKD steps ({convert_s:.0f} s + {ilkd_s:.0f} s)")
                    save(args, results)
                    del trainer, student
            del teacher
    return finish(args, results)


if __name__ == "__main__":
    main()
