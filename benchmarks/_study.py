"""What the accuracy studies share: paths, timestamped logging, the progress callback, the
``--threads`` option and the atomic JSON save."""

import json
import os
import time

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
