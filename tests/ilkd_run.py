"""One small, deterministic ILKD run; used by the tests in-process and under torchrun.

    python -m torch.distributed.run --nproc_per_node 2 tests/ilkd_run.py OUT_DIR PER_DEVICE_BATCH GA STEPS

Writes the student's final weights to OUT_DIR/student-rank{RANK}.pt and the log history to
OUT_DIR/log-rank{RANK}.json.
"""

import json
import os
import sys

import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel

from kn_transformers import DistillationArguments, ILKDTrainer

VOCAB, LENGTH, ROWS = 64, 12, 96


def tiny_pair(student_width=int(os.environ.get("SW", 16)), seed=0):
    """A teacher (width 32) and a narrower student (width 16: projections get trained), no dropout."""
    torch.manual_seed(seed)
    common = dict(n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    teacher = GPT2LMHeadModel(GPT2Config(n_embd=32, **common))
    student = GPT2LMHeadModel(GPT2Config(n_embd=student_width, **common))
    return teacher, student


def lm_dataset(rows=ROWS, seed=1):
    g = torch.Generator().manual_seed(seed)
    # a learnable structure: token t+1 = (token t + 1) mod VOCAB, random starts
    start = torch.randint(0, VOCAB, (rows, 1), generator=g)
    ids = (start + torch.arange(LENGTH)) % VOCAB
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                              "labels": ids.tolist()})


def run(out_dir, batch, accumulation, steps, resume_from=None, save_steps=None, callbacks=None, **overrides):
    teacher, student = tiny_pair()
    args = DistillationArguments(
        output_dir=out_dir, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        max_steps=steps, learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True, seed=0,
        data_seed=0, distill_preset="kngpt2", save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500, disable_tqdm=True, **overrides,
    )
    trainer = ILKDTrainer(model=student, args=args, teacher_model=teacher, train_dataset=lm_dataset(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer


if __name__ == "__main__":
    out, batch, accumulation, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    trainer = run(out, batch, accumulation, steps)
    rank = int(os.environ.get("RANK", 0))
    state = {k: v.detach().cpu() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}
    torch.save(state, os.path.join(out, f"student-rank{rank}.pt"))
    with open(os.path.join(out, f"log-rank{rank}.json"), "w") as f:
        json.dump(trainer.state.log_history, f)
    # how the two models were placed: the student wrapped for data parallelism, the teacher not
    ddp = torch.nn.parallel.DistributedDataParallel
    placement = {
        "student_wrapped_in_ddp": isinstance(trainer.model_wrapped, ddp),
        "teacher_wrapped_in_ddp": isinstance(trainer.teacher_model, ddp),
        "teacher_trainable_params": sum(p.requires_grad for p in trainer.teacher_model.parameters()),
        "teacher_training_mode": trainer.teacher_model.training,
    }
    with open(os.path.join(out, f"placement-rank{rank}.json"), "w") as f:
        json.dump(placement, f)
