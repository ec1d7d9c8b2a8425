"""Stage-1 ILKD: distil a Kronecker student from its teacher on unlabelled text.

GPT-2 teachers give causal-LM batches (KnGPT2 pre-training); BERT teachers masked-LM
batches when they have an MLM head, else hidden-state/attention distillation of the encoder
alone (KroneckerBERT's general distillation). Text is grouped into blocks of
``--block_size`` tokens; ``--max_train_tokens`` caps the budget. Reports validation
perplexity (causal LM) at the end.

    python training/distill_lm.py --teacher_model_name_or_path gpt2 --preset paper \\
        --train_file corpus.txt --validation_file heldout.txt --max_train_tokens 2000000 \\
        --output_dir out/kngpt2 --distill_preset kngpt2 --num_train_epochs 1
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from itertools import chain
from typing import Optional

import torch
from transformers import DataCollatorForLanguageModeling, default_data_collator, set_seed
from transformers.utils import logging

from ..distillation import DistillationArguments, ILKDTrainer
from ..model_card import create_model_card
from .perplexity import sliding_window_perplexity
from . import common
from .students import calibration_kwargs, check_init, convert_to_student, load_model, model_family

logger = logging.get_logger(__name__)


@dataclass
class ModelArguments:
    teacher_model_name_or_path: str = field(metadata={"help": "the dense teacher (GPT-2 or BERT)"})
    student_model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "an existing Kronecker student; default: convert the teacher"})
    preset: Optional[str] = field(default=None, metadata={"help": "paper | kroneckerbert8 | kroneckerbert21"})
    target_fraction: Optional[float] = field(default=None)
    init: str = field(
        default="svd",
        metadata={"help": "convert: 'svd' (the papers' nearest Kronecker product of each weight) or 'activation' (each "
                          "matrix fitted to its outputs on the first --calibration_samples training blocks)"})
    calibration_samples: int = field(default=128, metadata={"help": "convert with --init activation: training blocks"})
    tokenizer_name: Optional[str] = field(default=None)


@dataclass
class DataArguments:
    dataset_name: Optional[str] = field(default=None, metadata={"help": "Hub data set, e.g. wikitext"})
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "e.g. wikitext-103-raw-v1"})
    train_file: Optional[str] = field(default=None, metadata={"help": "a text file (one document or line per line)"})
    validation_file: Optional[str] = field(default=None)
    validation_split_percentage: int = field(default=5, metadata={"help": "held out when no validation set is given"})
    block_size: int = field(default=128)
    max_train_tokens: Optional[int] = field(default=None, metadata={"help": "token budget of the training set"})
    mlm_probability: float = field(default=0.15)
    perplexity_stride: Optional[int] = field(default=None, metadata={"help": "default: block_size // 2"})


def parse_args(argv=None):
    return common.parse_args((ModelArguments, DataArguments, DistillationArguments), argv)


def load_text(data_args: DataArguments):
    from datasets import load_dataset

    if data_args.dataset_name:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    else:
        if not data_args.train_file:
            raise ValueError("give --dataset_name or --train_file")
        files = {"train": data_args.train_file}
        if data_args.validation_file:
            files["validation"] = data_args.validation_file
        raw = load_dataset("text", data_files=files)
    if "validation" not in raw:
        split = raw["train"].train_test_split(test_size=data_args.validation_split_percentage / 100, shuffle=False)
        raw["train"], raw["validation"] = split["train"], split["test"]
    return raw


def group_texts(tokenized, block_size: int, max_tokens: Optional[int] = None):
    """Concatenate token ids and cut them into blocks of ``block_size`` (the remainder is dropped)."""

    def group(batch):
        ids = list(chain.from_iterable(batch["input_ids"]))
        n = (len(ids) // block_size) * block_size
        blocks = [ids[i : i + block_size] for i in range(0, n, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks]}

    grouped = tokenized.map(group, batched=True, batch_size=1000, remove_columns=tokenized.column_names,
                            desc=f"Grouping into blocks of {block_size}")
    if max_tokens is not None:
        grouped = grouped.select(range(min(len(grouped), max_tokens // block_size)))
    return grouped


def main(argv=None) -> dict:
    model_args, data_args, training_args = parse_args(argv)
    logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)
    push, training_args.push_to_hub = training_args.push_to_hub, False

    family = model_family(model_args.teacher_model_name_or_path)
    tokenizer = common.load_tokenizer(model_args.tokenizer_name, model_args.teacher_model_name_or_path, "teacher")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if family == "gpt2":
        head, causal = "causal-lm", True
    else:
        try:
            load_model(model_args.teacher_model_name_or_path, "masked-lm")
            head = "masked-lm"
        except Exception:  # noqa: BLE001 - a BERT without an MLM head: encoder-only distillation
            head = "base"
        causal = False
    check_init(model_args.init)
    teacher = load_model(model_args.teacher_model_name_or_path, head)
    if head == "base":  # no logits and no labels: the intermediate terms only
        training_args.logits_weight = training_args.labels_weight = 0.0

    raw = load_text(data_args)
    with training_args.main_process_first(desc="tokenising"):
        tokenized = raw.map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=raw["train"].column_names,
                            desc="Tokenising")
        train = group_texts(tokenized["train"], data_args.block_size, data_args.max_train_tokens)
        valid = group_texts(tokenized["validation"], data_args.block_size)
    if causal:
        train = train.map(lambda b: {"labels": b["input_ids"]}, batched=True)
        valid = valid.map(lambda b: {"labels": b["input_ids"]}, batched=True)
        collator = default_data_collator
    elif head == "masked-lm":
        collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=data_args.mlm_probability)
    else:
        collator = default_data_collator
    logger.warning(f"training on {len(train)} blocks = {len(train) * data_args.block_size:,} tokens")
    if model_args.student_model_name_or_path:
        student = load_model(model_args.student_model_name_or_path, head)
    else:
        calibration = calibration_kwargs(model_args.init, train, model_args.calibration_samples, default_data_collator)
        student = convert_to_student(teacher, model_args.preset, model_args.target_fraction, head, **calibration)

    trainer = ILKDTrainer(model=student, teacher_model=teacher, args=training_args, train_dataset=train,
                          eval_dataset=valid, data_collator=collator, processing_class=tokenizer)
    metrics = {}
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    if training_args.do_eval:
        metrics = trainer.evaluate()
        if causal:
            ids = torch.tensor(list(chain.from_iterable(valid["input_ids"])))
            stride = data_args.perplexity_stride or data_args.block_size // 2
            ppl = sliding_window_perplexity(trainer.model, ids, max_length=data_args.block_size, stride=stride,
                                            batch_size=training_args.per_device_eval_batch_size)
            metrics["eval_perplexity"] = ppl["perplexity"]
            metrics["eval_perplexity_tokens"] = ppl["tokens"]
        elif "eval_loss_labels" in metrics:
            metrics["eval_mlm_perplexity"] = math.exp(metrics["eval_loss_labels"])
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if training_args.should_save and training_args.do_train:
        card = create_model_card(
            trainer.model, base_model=model_args.teacher_model_name_or_path,
            eval_metrics={"perplexity": metrics["eval_perplexity"]} if "eval_perplexity" in metrics else None,
            task="lm", dataset_name=data_args.dataset_name or os.path.basename(data_args.train_file or "text"),
            dataset_type=data_args.dataset_name or "text", dataset_config=data_args.dataset_config_name,
            training=(f"Stage-1 ILKD ({'causal' if causal else 'masked' if head == 'masked-lm' else 'encoder'} LM "
                      f"batches of {data_args.block_size} tokens, {len(train) * data_args.block_size:,} tokens, "
                      f"{training_args.num_train_epochs} epochs, weights {training_args.loss_weights})."),
            report=getattr(student, "compression_report", None), repo_id=training_args.hub_model_id,
        )
        common.save_card_and_push(card, training_args, push)
    return metrics


if __name__ == "__main__":
    main()
