"""Fine-tune a KnGPT2 or KroneckerBERT student on a GLUE task, optionally with ILKD from a teacher.

Conventions of transformers' ``run_glue.py``: sentence keys per task, STS-B as regression,
MNLI matched and mismatched, the official metrics (computed offline), ``eval_results.json``.

    python training/run_glue.py \\
        --model_name_or_path my-finetuned-bert --preset kroneckerbert8 \\
        --teacher_model_name_or_path my-finetuned-bert \\
        --task_name rte --output_dir out/rte --learning_rate 5e-4 --num_train_epochs 3

With a teacher and no other flag the student is converted with the activation-aware init (``--init
auto``) and distilled with the ``recommended`` preset; ``--distill_preset kroneckerbert`` / ``kngpt2``
give the papers' losses.

``--model_name_or_path`` is an existing Kronecker student, or, with ``--preset`` or
``--target_fraction``, a dense GPT-2/BERT that is converted on the fly. Data come from the
Hub (``nyu-mll/glue``) or from ``--train_file``/``--validation_file`` (JSON lines or CSV with the
Hub's field names). Arguments may also be given as one JSON file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

from datasets import Value
from transformers import (
    DataCollatorWithPadding,
    Trainer,
    set_seed,
)
from transformers.utils import logging

from ..distillation import DISTILLATION_PRESETS, DistillationArguments, ILKDTrainer
from ..distillation.arguments import RECOMMENDED_PRESET
from .glue import compute_metrics_for, get_task, load_glue
from ..model_card import create_model_card
from . import common
from .students import INITS, calibration_kwargs, check_init, convert_to_student, load_model

logger = logging.get_logger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Kronecker student, or dense model to convert with --preset"})
    teacher_model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "fine-tuned teacher for ILKD; without it the student trains on labels"})
    preset: Optional[str] = field(default=None, metadata={"help": "convert: paper | kroneckerbert8 | kroneckerbert21"})
    target_fraction: Optional[float] = field(default=None, metadata={"help": "convert: parameter fraction per matrix"})
    init: str = field(
        default="auto",
        metadata={"help": "convert: 'svd' (the papers' nearest Kronecker product of each weight), 'activation' (each "
                          "matrix fitted to its outputs on the first --calibration_samples training rows), or 'auto': "
                          "'activation' when distilling from a teacher (the recommended recipe), else 'svd'"})
    calibration_samples: int = field(default=128, metadata={"help": "convert with --init activation: training rows"})
    tokenizer_name: Optional[str] = field(default=None)
    cache_dir: Optional[str] = field(default=None)


@dataclass
class DataArguments:
    task_name: str = field(metadata={"help": "cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte or wnli"})
    train_file: Optional[str] = field(default=None, metadata={"help": "JSON lines or CSV, the Hub's field names"})
    validation_file: Optional[str] = field(default=None)
    max_seq_length: int = field(default=128)
    max_train_samples: Optional[int] = field(default=None)
    max_eval_samples: Optional[int] = field(default=None)


@dataclass
class GlueDistillationArguments(DistillationArguments):
    """``DistillationArguments`` whose loss, when a teacher is given, defaults to the recommended recipe."""

    distill_preset: Optional[str] = field(
        default=RECOMMENDED_PRESET,
        metadata={"help": f"ILKD loss with --teacher_model_name_or_path: one of {sorted(DISTILLATION_PRESETS)} "
                          f"(default {RECOMMENDED_PRESET!r}: see DISTILLATION_PRESETS)"})


def parse_args(argv=None):
    return common.parse_args((ModelArguments, DataArguments, GlueDistillationArguments), argv)


def main(argv=None) -> dict:
    model_args, data_args, training_args = parse_args(argv)
    logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)
    task = get_task(data_args.task_name)
    push, training_args.push_to_hub = training_args.push_to_hub, False  # pushed below, with our card

    raw = load_glue(task.name, data_args.train_file, data_args.validation_file, model_args.cache_dir)
    tokenizer = common.load_tokenizer(model_args.tokenizer_name, model_args.model_name_or_path)
    if tokenizer.pad_token is None:  # GPT-2
        tokenizer.pad_token = tokenizer.eos_token
    labels_cfg = dict(num_labels=task.num_labels, problem_type="regression" if task.is_regression else None,
                      pad_token_id=tokenizer.pad_token_id)

    converting = model_args.preset is not None or model_args.target_fraction is not None
    check_init(model_args.init, ("auto",) + INITS)
    if model_args.init == "auto":
        model_args.init = "activation" if model_args.teacher_model_name_or_path and training_args.do_train else "svd"
    if converting and model_args.init == "activation" and not training_args.do_train:
        raise ValueError("--init activation calibrates on training rows: add --do_train (or use --init svd)")
    model = load_model(model_args.model_name_or_path, "sequence-classification", **labels_cfg)
    teacher = None
    if model_args.teacher_model_name_or_path:
        teacher = load_model(model_args.teacher_model_name_or_path, "sequence-classification", **labels_cfg)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size}; "
                         "use the model's own tokenizer (--tokenizer_name)")

    k1, k2 = task.keys

    def preprocess(batch):
        texts = (batch[k1],) if k2 is None else (batch[k1], batch[k2])
        return tokenizer(*texts, truncation=True, max_length=data_args.max_seq_length)

    with training_args.main_process_first(desc="tokenising"):
        ds = raw.map(preprocess, batched=True, desc="Tokenising")
    if task.is_regression:
        ds = ds.cast_column("label", Value("float32"))
    train_ds = ds["train"] if "train" in ds else None
    if train_ds is not None and data_args.max_train_samples:
        train_ds = train_ds.select(range(min(data_args.max_train_samples, len(train_ds))))
    eval_splits = [s for s in task.eval_splits if s in ds] or (["validation"] if "validation" in ds else [])
    evals = {s: ds[s] for s in eval_splits}
    if converting:
        calibration = calibration_kwargs(model_args.init, train_ds, model_args.calibration_samples,
                                         DataCollatorWithPadding(tokenizer))
        model = convert_to_student(model, model_args.preset, model_args.target_fraction, "sequence-classification",
                                   **calibration)
    if data_args.max_eval_samples:
        evals = {s: d.select(range(min(data_args.max_eval_samples, len(d)))) for s, d in evals.items()}

    trainer_kwargs = dict(
        model=model, args=training_args, train_dataset=train_ds, processing_class=tokenizer,
        eval_dataset=evals.get(eval_splits[0]) if eval_splits else None,
        data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=compute_metrics_for(task.name),
    )
    if teacher is not None:
        trainer = ILKDTrainer(teacher_model=teacher, **trainer_kwargs)
    else:
        trainer = Trainer(**trainer_kwargs)

    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()

    metrics = {}
    if training_args.do_eval:
        for split, data in evals.items():
            suffix = "" if split == "validation" else "_" + split.replace("validation_", "")
            m = trainer.evaluate(eval_dataset=data, metric_key_prefix=f"eval{suffix}")
            m[f"eval{suffix}_samples"] = len(data)
            metrics.update(m)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)  # eval_results.json

    if training_args.should_save and training_args.do_train:
        recipe = (f"Fine-tuned on GLUE {task.name.upper()} with "
                  + (f"ILKD from `{model_args.teacher_model_name_or_path}` (weights "
                     f"{json.dumps(training_args.loss_weights)}, attention loss {training_args.attention_loss}, preset "
                     f"`{training_args.distill_preset}`, mask augmentation {training_args.mask_augmentation})"
                     if teacher is not None else "the task labels alone")
                  + (f"; converted from `{model_args.model_name_or_path}` with the "
                     + ("papers' nearest-Kronecker init" if model_args.init == "svd" else
                        f"activation-aware init on {model_args.calibration_samples} training rows")
                     if converting else "")
                  + f"; {training_args.num_train_epochs} epochs, learning rate {training_args.learning_rate}, "
                    f"batch {training_args.per_device_train_batch_size}, max length {data_args.max_seq_length}.")
        card = create_model_card(
            model, base_model=model_args.teacher_model_name_or_path or model_args.model_name_or_path,
            eval_metrics={k: v for k, v in metrics.items() if k.startswith("eval")}, task=task.name,
            dataset_name=f"GLUE {task.name.upper()}", dataset_type="nyu-mll/glue", dataset_config=task.name,
            training=recipe, report=getattr(model, "compression_report", None),
            repo_id=training_args.hub_model_id,
        )
        common.save_card_and_push(card, training_args, push)
    return metrics


if __name__ == "__main__":
    main()
