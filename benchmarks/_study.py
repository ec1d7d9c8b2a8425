"""What the accuracy studies share: paths, timestamped logging, the progress and plateau
callbacks, the WikiText-2 token stream, the ``--threads`` option and the atomic JSON save."""

import json
import os
import shlex
import sys
import time
from collections import Counter
from typing import Optional

import torch
from transformers import TrainerCallback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.normpath(os.path.join(ROOT, "..", "shared", "data"))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Progress(TrainerCallback):
    """Logs the step, the loss and every ``loss_*`` term the trainer reports."""

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            extra = " ".join(f"{k}={v:.4g}" for k, v in logs.items() if k.startswith("loss_"))
            log(f"    step {state.global_step}/{state.max_steps} loss={logs['loss']:.4g} {extra}")


def wikitext_token_streams(data_dir: str, tokenizer, heldout: float = 0.05,
                           vocab: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The WikiText-2 validation text as one GPT-2 BPE token stream, split into (training ids,
    the last ``heldout`` fraction). With ``vocab``, ids are renumbered to the ``vocab - 1`` most
    frequent *training* tokens (0 = most frequent) and every other token becomes id ``vocab - 1``:
    a small model then spends its parameters and time on layers, not on a 50,257-row head."""
    with open(os.path.join(data_dir, "wikitext-2", "valid.txt")) as f:
        lines = f.readlines()
    ids = [i for seq in tokenizer(lines)["input_ids"] for i in seq]
    cut = int(len(ids) * (1 - heldout))
    if vocab:
        remap = {t: i for i, (t, _) in enumerate(Counter(ids[:cut]).most_common(vocab - 1))}
        ids = [remap.get(t, vocab - 1) for t in ids]
    ids = torch.tensor(ids, dtype=torch.long)
    return ids[:cut], ids[cut:]


def lm_blocks(ids: torch.Tensor, size: int) -> list[dict]:
    """Consecutive ``size``-token training rows of a token stream (the tail shorter than ``size``
    is dropped), labels = inputs, as a causal LM's ``Trainer`` takes them."""
    return [{"input_ids": ids[i:i + size], "attention_mask": torch.ones(size, dtype=torch.long),
             "labels": ids[i:i + size]} for i in range(0, ids.numel() - size + 1, size)]


class Plateau(TrainerCallback):
    """Scores the model every ``every`` steps, keeps the best state, stops after ``patience``
    scores without improvement; ``curve`` is [(step, score), ...]."""

    def __init__(self, score, model, every: int, patience: int):
        self.score, self.model, self.every, self.patience = score, model, every, patience
        self.curve, self.best, self.best_step, self.best_state, self.bad = [], -float("inf"), 0, None, 0

    def on_step_end(self, args, state, control, **kw):
        if state.global_step % self.every and state.global_step != state.max_steps:
            return
        value = self.score()
        self.model.train()
        self.curve.append((state.global_step, value))
        if value > self.best:
            self.best, self.best_step, self.bad = value, state.global_step, 0
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:
            self.bad += 1
            if self.bad >= self.patience:
                control.should_training_stop = True

    def restore(self):
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)


def command_line(script: str, argv=None) -> str:
    """The command that reproduces this run, quoted for a shell (an empty argument stays ``''``)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return f"HF_HUB_OFFLINE=1 nice -n 15 .venv/bin/python benchmarks/{script} {shlex.join(args)}".rstrip()


def add_threads_arg(parser) -> None:
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 by default because the machine is shared: two threads on a core that "
                             "another job also uses ran 5-10x slower per step (OpenMP threads waiting on each other)")


def save(args, results) -> None:
    """Writes ``results`` (with the wall time so far) to ``args.output`` atomically, so that an
    interrupted study keeps what it measured."""
    results["wall_seconds"] = time.perf_counter() - args.t_start
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp = args.output + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, args.output)


def finish(args, results) -> dict:
    """Marks ``results`` complete, writes them a last time and logs the study's wall time."""
    results["complete"] = True
    save(args, results)
    log(f"done in {results['wall_seconds'] / 60:.1f} min: {args.output}")
    return results
