"""KnGPT2 vs a DistilGPT2-style student of equal total size, at this machine's scale.

    HF_HUB_OFFLINE=1 nice -n 15 .venv/bin/python benchmarks/study_kngpt2.py

What it measures:

1. a GPT-2 teacher (default 6 layers x 384, 6 heads, 128 positions, tied head) trained from
   scratch here on the WikiText-2 validation text tokenised with the real GPT-2 BPE, its
   vocabulary cut to the ``--vocab`` most frequent training tokens (the rest share one "other"
   id: with all 50,257 rows the tied embedding/head is ~2/3 of the model and of the compute,
   and the teacher barely gets past unigram statistics in the time a study has). The last
   ``--heldout`` of the token stream is kept out of all training and used for evaluation; the
   ``--validation`` fraction before it decides when the teacher has stopped improving (its best
   state is kept). At each check the study also scores the teacher's own half-depth copy: how
   much depth is worth, i.e. the room a half-size student has to win;
2. students of (almost exactly) equal *total* parameter count, LM head counted, each trained on
   the same token budget (same steps, batch, blocks, learning rate, seed):
   - ``distilgpt2_style``: half the layers, initialised from the teacher's layers 0, 2, 4 plus
     its embeddings, positions, final LayerNorm and (tied) head; distilled with logits KD + LM
     loss only (all intermediate weights 0, as DistilGPT2's soft-target + LM objective);
   - ``kngpt2``: the teacher's depth, every layer's four matrices (``c_attn``, ``c_proj``,
     ``c_fc``, ``mlp.c_proj``) replaced by Kronecker factors at factor 2 (``A (out, in/2) ⊗
     B (1, 2)``, the paper's rule and nearest-Kronecker init, via ``kngpt2_from_gpt2(teacher,
     preset="paper", layers=all, embedding=False)``); the token embedding stays dense and tied
     to the head, so 6 layers at half size match embedding + 3 dense layers to within the
     per-layer biases and LayerNorms. Distilled with ILKD (``distill_preset="kngpt2"``:
     embedding and per-layer hidden MSE, attention KL, logits KL, LM cross-entropy), layers
     mapped one to one;
   - ``kngpt2_activation``: the same splits, ``init="activation"`` on ``--calibration_samples``
     training blocks; the same ILKD;
   - ``kngpt2_budget``: ``init="activation"`` and ``budget=`` the DistilGPT2-style student's
     size (splits and ranks up to ``--max_rank`` chosen per matrix); the same ILKD.
3. held-out perplexity (``sliding_window_perplexity``, windows of ``n_positions``) of the
   teacher and of every student, and each student's perplexity at ``--curve_points`` points
   of tokens seen (a ``TrainerCallback``).

Writes ``benchmarks/results/kngpt2_vs_distilgpt2.json`` (rewritten after each stage).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.utils import logging as hf_logging  # noqa: E402

import kn_transformers  # noqa: E402
from kn_transformers import DistillationArguments, ILKDTrainer, kngpt2_from_gpt2  # noqa: E402
from kn_transformers.core.report import count_parameters  # noqa: E402
from kn_transformers.recipes.perplexity import sliding_window_perplexity  # noqa: E402

from _study import (  # noqa: E402  (benchmarks/_study.py)
    DEFAULT_DATA,
    ROOT,
    Plateau,
    Progress,
    add_threads_arg,
    command_line,
    finish,
    lm_blocks,
    log,
    save,
    wikitext_token_streams,
)


STUDENTS = ("distilgpt2_style", "kngpt2", "kngpt2_activation", "kngpt2_budget")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=DEFAULT_DATA, help="folder with wikitext-2/ and gpt2-tokenizer/")
    p.add_argument("--heldout", type=float, default=0.05, help="last fraction of the token stream held out")
    p.add_argument("--vocab", type=int, default=8192,
                   help="keep the VOCAB-1 most frequent training tokens, the rest become one 'other' id; 0 = the "
                        "full 50,257 (then the tied embedding/head is most of the model and of the compute)")
    p.add_argument("--n_layer", type=int, default=6)
    p.add_argument("--n_embd", type=int, default=384)
    p.add_argument("--n_head", type=int, default=6)
    p.add_argument("--block_size", type=int, default=128, help="= n_positions; training blocks and eval windows")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--teacher_steps", type=int, default=1200,
                   help="at most this many (the learning rate decays linearly over them); early stopping decides")
    p.add_argument("--teacher_lr", type=float, default=1e-3)
    p.add_argument("--validation", type=float, default=0.05,
                   help="fraction of the stream just before the held-out text: the teacher trains until its "
                        "perplexity there stops improving (its best state is kept)")
    p.add_argument("--teacher_eval_every", type=int, default=100)
    p.add_argument("--teacher_patience", type=int, default=2)
    p.add_argument("--student_steps", type=int, default=150, help="the same for every student (same tokens)")
    p.add_argument("--student_lr", type=float, default=5e-4)
    p.add_argument("--temperature", type=float, default=1.0, help="logits KD temperature, both students")
    p.add_argument("--curve_points", type=int, default=5, help="perplexity evaluations during student training")
    p.add_argument("--ppl_stride", type=int, default=None, help="sliding-window stride; default block_size")
    p.add_argument("--students", nargs="+", choices=STUDENTS, default=list(STUDENTS))
    p.add_argument("--calibration_samples", type=int, default=128,
                   help="training blocks (never held-out text) for the activation-aware students")
    p.add_argument("--max_rank", type=int, default=64, help="largest rank the budgeted student may choose")
    p.add_argument("--seed", type=int, default=42)
    add_threads_arg(p)
    p.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "kngpt2_vs_distilgpt2.json"))
    args = p.parse_args(argv)
    if not 0 < args.validation < 1 - args.heldout:
        p.error("--validation must be a fraction in (0, 1 - heldout): the teacher's early stopping needs it")
    return args


def training_args(cls, args, name: str, steps: int, lr: float, **extra):
    return cls(
        output_dir=os.path.join(args.tmp, name), max_steps=steps, learning_rate=lr,
        per_device_train_batch_size=args.batch_size, warmup_steps=0.1, weight_decay=0.01,
        lr_scheduler_type="linear", logging_steps=max(steps // 10, 1), save_strategy="no", eval_strategy="no",
        report_to=[], seed=args.seed, data_seed=args.seed, use_cpu=True, disable_tqdm=True, **extra,
    )


class PerplexityCurve(TrainerCallback):
    """Held-out perplexity every ``every`` steps, against tokens seen."""

    def __init__(self, ppl, every: int, tokens_per_step: int, points: list):
        self.ppl, self.every, self.tokens_per_step, self.points = ppl, every, tokens_per_step, points

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step % self.every == 0 and state.global_step < state.max_steps:
            self.record(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kw):
        self.record(model, state.global_step)

    def record(self, model, step: int) -> None:
        p = self.ppl(model)
        self.points.append({"step": step, "tokens": step * self.tokens_per_step, "perplexity": p})
        log(f"    step {step}: held-out perplexity {p:.2f}")


def distilgpt2_style(teacher: GPT2LMHeadModel) -> GPT2LMHeadModel:
    """Half the layers, from the teacher's alternate layers (0, 2, 4, ...), everything else copied."""
    cfg = GPT2Config(**{**teacher.config.to_dict(), "n_layer": teacher.config.n_layer // 2})
    student = GPT2LMHeadModel(cfg)
    t_state = teacher.state_dict()
    state = {}
    for key in student.state_dict():
        src = key
        if key.startswith("transformer.h."):
            i = int(key.split(".")[2])
            src = key.replace(f"transformer.h.{i}.", f"transformer.h.{2 * i}.", 1)
        state[key] = t_state[src].clone()
    student.load_state_dict(state)
    student.tie_weights()
    return student


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(args.data_dir, "gpt2-tokenizer"))
    train_ids, held_ids = wikitext_token_streams(args.data_dir, tokenizer, args.heldout, args.vocab or None)
    n_tokens = train_ids.numel() + held_ids.numel()
    n_val = int(n_tokens * args.validation)  # the teacher's early stopping looks here, never at held_ids
    train_ids, val_ids = train_ids[:-n_val], train_ids[-n_val:]
    train_blocks = lm_blocks(train_ids, args.block_size)
    # activation-aware students calibrate on the last training blocks (never the held-out text)
    calibration = torch.stack([b["input_ids"] for b in train_blocks[-args.calibration_samples:]])
    tokens_per_step = args.batch_size * args.block_size
    stride = args.ppl_stride or args.block_size

    def ppl(model, ids=held_ids) -> float:
        return sliding_window_perplexity(model, ids, max_length=args.block_size, stride=stride,
                                         batch_size=16, show_progress=False)["perplexity"]

    results = {
        "study": "kngpt2_vs_distilgpt2",
        "command": command_line("study_kngpt2.py", argv),
        "data": {"source": "wikitext-2/valid.txt, GPT-2 BPE " + (
                     f"cut to its {args.vocab - 1:,} most frequent training tokens + one 'other' id" if args.vocab
                     else "(50,257 tokens)"), "tokens": n_tokens, "vocab": args.vocab or len(tokenizer),
                 "train_tokens": train_ids.numel(), "validation_tokens": n_val, "heldout_tokens": held_ids.numel(),
                 "train_blocks": len(train_blocks), "heldout": "last fraction of the token stream"},
        "budgets": {k: getattr(args, k) for k in (
            "heldout", "validation", "vocab", "n_layer", "n_embd", "n_head", "block_size", "batch_size",
            "teacher_steps", "teacher_eval_every", "teacher_patience", "teacher_lr", "student_steps", "student_lr",
            "temperature", "curve_points", "calibration_samples", "max_rank", "seed")},
        "perplexity": {"max_length": args.block_size, "stride": stride},
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "kn_transformers": kn_transformers.__version__, "threads": torch.get_num_threads(),
                        "cpus": os.cpu_count(), "python": platform.python_version(),
                        "date": time.strftime("%Y-%m-%d %H:%M:%S")},
        "students": {}, "complete": False,
    }
    log(f"{n_tokens:,} tokens: {train_ids.numel():,} train ({len(train_blocks)} blocks of {args.block_size}), "
        f"{held_ids.numel():,} held out")

    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        # -- teacher ----------------------------------------------------------------------
        eos = args.vocab - 1 if args.vocab else tokenizer.eos_token_id  # ("other" when the vocabulary is cut)
        cfg = GPT2Config(vocab_size=args.vocab or len(tokenizer), n_positions=args.block_size, n_embd=args.n_embd,
                         n_layer=args.n_layer, n_head=args.n_head, bos_token_id=eos, eos_token_id=eos,
                         tie_word_embeddings=True)
        set_seed(args.seed)
        teacher = GPT2LMHeadModel(cfg)
        log(f"teacher: GPT-2 {args.n_layer}x{args.n_embd}, {count_parameters(teacher):,} parameters; at most "
            f"{args.teacher_steps} steps x {tokens_per_step} tokens")
        half_depth_curve = []

        def validation_score() -> float:
            """-(validation perplexity); also records how much the teacher's own half-depth copy
            (the DistilGPT2-style start) loses at this point: the room a student of this size has."""
            teacher.eval()
            t_val = ppl(teacher, val_ids)
            half_depth_curve.append(ppl(distilgpt2_style(teacher), val_ids))
            log(f"    validation perplexity {t_val:.2f}, its half-depth copy {half_depth_curve[-1]:.2f}")
            return -t_val

        plateau = Plateau(validation_score, teacher, args.teacher_eval_every, args.teacher_patience)
        trainer = Trainer(model=teacher, args=training_args(TrainingArguments, args, "teacher", args.teacher_steps,
                                                            args.teacher_lr),
                          train_dataset=train_blocks, data_collator=default_data_collator,
                          callbacks=[Progress(), plateau])
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        plateau.restore()
        teacher.eval()
        t_ppl = ppl(teacher)
        steps = plateau.best_step
        results["teacher"] = {"parameters": count_parameters(teacher), "perplexity": t_ppl, "seconds": seconds,
                              "steps": steps, "tokens_seen": steps * tokens_per_step,
                              "epochs": steps * args.batch_size / len(train_blocks),
                              "validation_curve": [{"step": st, "perplexity": -v, "half_depth_perplexity": h}
                                                   for (st, v), h in zip(plateau.curve, half_depth_curve)]}
        log(f"teacher: best validation at step {steps}; held-out perplexity {t_ppl:.2f} ({seconds:.0f} s)")
        save(args, results)
        del trainer

        # -- students ---------------------------------------------------------------------
        every = max(args.student_steps // args.curve_points, 1)
        equal_size = count_parameters(distilgpt2_style(teacher))  # the size every student matches
        for name in args.students:
            set_seed(args.seed)
            try:
                teacher.set_attn_implementation("sdpa")
            except Exception:  # noqa: BLE001 - eager works too
                pass
            if name.startswith("kngpt2"):
                init = {"kngpt2": {}, "kngpt2_activation": {"init": "activation"},
                        "kngpt2_budget": {"init": "activation", "budget": equal_size, "rank": args.max_rank}}[name]
                student = kngpt2_from_gpt2(teacher, preset="paper", layers=range(args.n_layer), embedding=False,
                                           calibration_data=calibration if init else None, progress=False, **init)
                dargs = training_args(DistillationArguments, args, name, args.student_steps, args.student_lr,
                                      distill_preset="kngpt2", temperature=args.temperature)
                recipe = ("kngpt2_from_gpt2(teacher, preset='paper', layers=all, embedding=False"
                          + "".join(f", {k}={v!r}" for k, v in init.items()) + "): "
                          + ("every layer's 4 matrices at factor 2" if "budget" not in init else
                             "every layer's 4 matrices, splits and ranks chosen under the DistilGPT2-style size")
                          + ", dense wte tied to the head; ILKD distill_preset='kngpt2'")
            elif name == "distilgpt2_style":
                student = distilgpt2_style(teacher)
                # the intermediate terms are off, so the layer map is never used; "uniform" because the
                # default "one_to_one" is rejected for unequal depths even when its terms have weight 0
                dargs = training_args(DistillationArguments, args, name, args.student_steps, args.student_lr,
                                      embedding_weight=0.0, hidden_weight=0.0, attention_weight=0.0,
                                      ffn_weight=0.0, logits_weight=1.0, labels_weight=1.0,
                                      temperature=args.temperature, layer_map="uniform")
                recipe = ("GPT2LMHeadModel with n_layer/2 layers from teacher layers 0, 2, 4, ...; embeddings, "
                          "positions, ln_f, tied head copied; logits KD + LM loss")
            else:
                raise SystemExit(f"unknown student {name!r}")
            points = []
            entry = {"recipe": recipe, "parameters": count_parameters(student),
                     "layers": student.config.n_layer, "curve": points}
            results["students"][name] = entry
            log(f"{name}: {entry['parameters']:,} parameters ({entry['parameters'] / results['teacher']['parameters']:.3f}"
                f" of the teacher); {args.student_steps} steps x {tokens_per_step} tokens")
            curve = PerplexityCurve(ppl, every, tokens_per_step, points)
            curve.record(student, 0)
            trainer = ILKDTrainer(model=student, teacher_model=teacher, args=dargs, train_dataset=train_blocks,
                                  data_collator=default_data_collator, callbacks=[Progress(), curve])
            t0 = time.perf_counter()
            trainer.train()
            entry["seconds"] = time.perf_counter() - t0  # includes the curve evaluations
            entry["perplexity"] = points[-1]["perplexity"]
            entry["tokens_seen"] = args.student_steps * tokens_per_step
            log(f"{name}: held-out perplexity {entry['perplexity']:.2f} (teacher {t_ppl:.2f}; {entry['seconds']:.0f} s)")
            save(args, results)
            del trainer, student
    return finish(args, results)


if __name__ == "__main__":
    main()
