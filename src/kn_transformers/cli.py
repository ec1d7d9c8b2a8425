"""The ``kn-transformers`` command.

    kn-transformers demo                       # offline: fine-tune, compress, distil and compare MiniLM on SST-2
    kn-transformers compress TEACHER --preset kroneckerbert8 --output_dir student/
    kn-transformers distill ...                # = training/distill_lm.py (stage-1 ILKD on text)
    kn-transformers glue ...                   # = training/run_glue.py (GLUE fine-tuning, ILKD optional)
    kn-transformers evaluate perplexity ...    # = training/evaluate_perplexity.py
    kn-transformers evaluate glue ...          # = run_glue.py with --do_eval only
    kn-transformers report [MODEL]             # nearest-Kronecker report of every matrix (default: bundled MiniLM)
    kn-transformers build-kernels              # compile the optional native CPU kernel (optimize_for_inference)
    kn-transformers export MODEL OUT --format dense          # vanilla GPT-2 / BERT folder (merge_to_dense)
    kn-transformers export MODEL OUT --format onnx [--quantize int8]   # factored ONNX graph (export_onnx)

User errors (bad paths, arguments, non-finite losses) print one ``kn-transformers: error: ...``
line and exit with status 2; ``kn-transformers --debug ...`` or ``KN_TRANSFORMERS_DEBUG=1``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .core.report import CompressionReport, ModuleReport, count_parameters
from .core.kroneckerize import decompose_module
from .core.factor_search import choose_kronecker_factors
from .models.loading import check_model_name_or_path

#: what ``main`` reports as one line instead of a traceback (FileNotFoundError is an OSError)
USER_ERRORS = (ValueError, OSError, FloatingPointError)


def _fraction(text: str) -> float:
    """argparse type: a finite number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value < 1):
        raise argparse.ArgumentTypeError(f"must be a number strictly between 0 and 1, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def decomposition_report(model: nn.Module, fraction: float, rank: int = 1) -> CompressionReport:
    """Decompose every linear (incl. GPT-2's Conv1D) and embedding matrix of ``model``.

    Each weight gets the split that :func:`choose_kronecker_factors` picks for ``fraction`` of
    its parameters; matrices too small for any split are reported as kept dense. The model
    itself is not modified. ``ValueError`` for a ``fraction`` outside (0, 1) or a ``rank`` below 1.
    """
    if not (isinstance(fraction, (int, float)) and math.isfinite(fraction) and 0 < fraction < 1):
        raise ValueError(f"fraction must be a finite number strictly between 0 and 1, got {fraction!r}")
    if not (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    targets = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, (nn.Linear, nn.Embedding)) or type(mod).__name__ == "Conv1D"
    ]
    report = CompressionReport()
    for name, mod in tqdm(targets, desc="decomposing", unit="matrix"):
        W = mod.weight if not type(mod).__name__ == "Conv1D" else mod.weight.T
        shape = tuple(W.shape)
        try:
            choice = choose_kronecker_factors(*shape, target_fraction=fraction, ranks=(rank,))
        except ValueError:
            report.modules.append(ModuleReport(name, "dense", shape, None, None, 0, W.numel(), W.numel(), 0.0))
            continue
        _, row = decompose_module(mod, name, choice.a_shape, rank=rank)
        report.modules.append(row)
    total = count_parameters(model)
    report.total_params_before = total
    report.total_params_after = total - sum(m.params_before - m.params_after for m in report.modules)
    return report


def _cmd_demo(args) -> int:
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(output_dir=args.output_dir, preset=args.preset, train_rows=args.train_rows,
                     labels_only_baseline=not args.no_baseline)
    if args.student_epochs is not None:
        cfg.student_epochs = args.student_epochs
    run_demo(cfg)
    return 0


def _run_recipe(module: str, argv: list) -> int:
    import importlib

    importlib.import_module(f"kn_transformers.recipes.{module}").main(argv)
    return 0


def _target_modules(text):
    """``all-linear``, a comma-separated list of names/suffixes, or a regex (any of ``*+?()[]|^$\\``)."""
    if text is None or text == "all-linear":
        return text
    if any(c in text for c in "*+?()[]|^$\\"):
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


def _budget(text: str):
    """argparse type: a parameter count (an int) or a fraction in (0, 1)."""
    try:
        value = int(text)
        if value >= 1:
            return value
    except ValueError:
        try:
            value = float(text)
            if math.isfinite(value) and 0 < value < 1:
                return value
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"--budget takes a parameter count (e.g. 20000000) or a fraction in (0, 1) "
                                     f"(e.g. 0.25), got {text!r}")


def read_calibration_file(path: str, tokenizer, samples: Optional[int], max_length: int = 128):
    """Token ids of the first ``samples`` texts of ``path``: a text file (one text per non-empty line)
    or JSON lines with ``text`` / ``sentence`` / ``sentence1`` (+ ``sentence2``) fields."""
    import json
    import os

    if not os.path.isfile(path):
        raise ValueError(f"--calibration_file {path!r} does not exist")
    first, second = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            if path.endswith((".jsonl", ".json")):
                row = json.loads(line)
                key = next((k for k in ("text", "sentence", "sentence1", "question") if isinstance(row.get(k), str)), None)
                if key is None:
                    raise ValueError(f"{path}: a JSON line needs a 'text', 'sentence' or 'sentence1' field; got {sorted(row)}")
                first.append(row[key])
                pair = {"sentence1": "sentence2", "question": "sentence"}.get(key)
                if pair and isinstance(row.get(pair), str):
                    second.append(row[pair])
            else:
                first.append(line)
            if samples is not None and len(first) >= samples:
                break
    if not first:
        raise ValueError(f"--calibration_file {path!r} holds no text")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    pairs = second if len(second) == len(first) else None
    return tokenizer(first, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def _a_shape(text: str) -> list:
    try:
        m1, n1 = (int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--a_shape takes M1,N1 (e.g. 4,2), got {text!r}") from None
    return [m1, n1]


def _head_of(teacher_path: str) -> str:
    from transformers import AutoConfig

    archs = " ".join(AutoConfig.from_pretrained(teacher_path, trust_remote_code=True).architectures or [])
    for key, head in (("SequenceClassification", "sequence-classification"), ("MaskedLM", "masked-lm"),
                      ("QuestionAnswering", "question-answering"), ("CausalLM", "causal-lm"),
                      ("LMHeadModel", "causal-lm")):
        if key in archs:
            return head
    return "base"


def _is_paper_family(teacher: str) -> bool:
    from .recipes.students import model_family

    try:
        model_family(teacher)
        return True
    except ValueError:
        return False


def _cmd_compress(args) -> int:
    import os

    from transformers import AutoTokenizer

    from .core import KroneckerConfig, kroneckerize
    from .model_card import create_model_card
    from .recipes.students import convert_to_student, load_model, model_family

    args.teacher = check_model_name_or_path(args.teacher, "teacher")
    generic = any(v is not None for v in (args.target_modules, args.fraction, args.a_shape)) or args.embedding
    head = args.head or _head_of(args.teacher)
    init = args.init or ("activation" if args.calibration_file else "svd")
    if init == "activation" and not args.calibration_file:
        raise ValueError("--init activation needs --calibration_file (text like the task's, one per line, or JSON lines)")
    if args.calibration_file and init != "activation":
        raise ValueError("--calibration_file is used by --init activation only")
    calibration = None
    if args.calibration_file:
        from transformers import AutoConfig

        # never longer than the teacher's position table (a GPT-2 with n_positions=64 cannot read 128 tokens)
        positions = getattr(AutoConfig.from_pretrained(args.teacher), "max_position_embeddings", None)
        max_length = min(args.max_length, positions) if positions else args.max_length
        calibration = read_calibration_file(args.calibration_file, AutoTokenizer.from_pretrained(args.teacher),
                                            args.calibration_samples, max_length)
    init_options = {"init": init, "calibration_data": calibration, "calibration_samples": args.calibration_samples,
                    "budget": args.budget}
    if generic or (args.budget is not None and args.preset is None and args.target_fraction is None
                   and not _is_paper_family(args.teacher)):
        if args.preset is not None or args.target_fraction is not None:
            raise ValueError("--preset/--target_fraction are the paper presets; with --target_modules, "
                             "--fraction or --a_shape leave them out")
        config = KroneckerConfig(target_modules=_target_modules(args.target_modules or "all-linear"),
                                 exclude_modules=_target_modules(args.exclude_modules), embedding=args.embedding,
                                 a_shape=args.a_shape, fraction=args.fraction, budget=args.budget, rank=args.rank,
                                 init=init, sequential=args.sequential)
        teacher = load_model(args.teacher, head)
        student = kroneckerize(teacher, config, calibration_data=calibration,
                               calibration_samples=args.calibration_samples)
    else:
        try:
            family = model_family(args.teacher)
        except ValueError as err:
            raise ValueError(f"{err}; any other architecture compresses with --fraction 0.25 "
                             "(or --a_shape M1,N1), optionally --target_modules") from None
        if args.head is None and family == "gpt2" and head == "base":
            head = "causal-lm"  # a bare GPT2Model: KnGPT2 is a language model
        if args.sequential:
            raise ValueError("--sequential applies to kroneckerize targets (--fraction/--target_modules); "
                             "the paper presets calibrate on the teacher")
        teacher = load_model(args.teacher, head)
        if args.rank != 1:
            init_options["rank"] = args.rank
        student = convert_to_student(teacher, args.preset, args.target_fraction, head, **init_options)
    student.save_pretrained(args.output_dir)
    try:
        AutoTokenizer.from_pretrained(args.teacher).save_pretrained(args.output_dir)
    except (OSError, ValueError):
        print(f"(no tokenizer found with {args.teacher}; save one beside the student)")
    report = getattr(student, "compression_report", None)
    if report is not None:
        report.to_json(os.path.join(args.output_dir, "compression_report.json"))
        print(report.to_markdown())
    how = ("Activation-aware initialisation (calibrated on " + os.path.basename(args.calibration_file) + ")"
           if init == "activation" else "Nearest-Kronecker initialisation")
    create_model_card(student, base_model=args.teacher, report=report,
                      training=how + " only: not distilled yet.").save(
        os.path.join(args.output_dir, "README.md"))
    print(f"Student written to {args.output_dir}")
    return 0


@torch.no_grad()
def _cmd_report(args) -> int:
    from transformers import AutoModel

    t0 = time.perf_counter()
    if args.model is None:
        from .demo import bundled_teacher_path

        args.model = bundled_teacher_path()
    model = AutoModel.from_pretrained(check_model_name_or_path(args.model))
    report = decomposition_report(model, args.fraction, args.rank)
    print(f"\n{type(model).__name__} from {args.model}: every matrix at ≤{args.fraction:.0%} of its parameters, "
          f"rank {args.rank} (nearest Kronecker product, no training)\n")
    print(report.to_markdown())
    errs = [m.rel_error for m in report.modules if m.kind != "dense"]
    if errs:
        print(f"Relative reconstruction error: mean {sum(errs) / len(errs):.3f}, "
              f"min {min(errs):.3f}, max {max(errs):.3f} (0 = exact; distillation restores accuracy)")
    print(f"Done in {time.perf_counter() - t0:.1f} s.")
    if args.json:
        report.to_json(args.json)
        print(f"Report written to {args.json}")
    return 0


_RECIPES = {"distill": "distill_lm", "glue": "run_glue", "perplexity": "evaluate_perplexity"}


def _cmd_build_kernels(args) -> int:
    from .core.kernels import KernelUnavailable, build_kernels, load_kernels

    try:
        path = build_kernels(force=args.force)
        load_kernels()
    except KernelUnavailable as e:
        print(f"kn-transformers: error: the native kernel cannot be built here: {e}; "
              "optimize_for_inference will use plain PyTorch", file=sys.stderr)
        return 1
    print(path)
    return 0


def _cmd_export(args) -> int:
    from transformers import AutoConfig, AutoTokenizer

    from .recipes.students import load_model

    args.model = check_model_name_or_path(args.model, "model")
    head = args.head
    if head is None:
        archs = " ".join(AutoConfig.from_pretrained(args.model).architectures or [])
        head = ("sequence-classification" if "SequenceClassification" in archs else "masked-lm" if "MaskedLM" in archs
                else "question-answering" if "QuestionAnswering" in archs
                else "causal-lm" if "LMHead" in archs or "CausalLM" in archs else "base")
    if args.quantize and args.format != "onnx":
        raise ValueError("--quantize int8 applies to --format onnx")
    model = load_model(args.model, head).eval()
    if args.format == "dense":
        from .export import merge_to_dense

        dense = merge_to_dense(model)
        dense.save_pretrained(args.output)
        where = args.output
    else:
        from .export import export_onnx, quantize_onnx

        opset = {} if args.opset is None else {"opset": args.opset}
        where = export_onnx(model, args.output, with_past=not args.no_past, **opset)
        model.config.save_pretrained(where.parent)
        if args.quantize:
            quantized = quantize_onnx(where)
            print(f"int8: {quantized} ({quantized.stat().st_size / 2**20:.1f} MiB; fp32 {where.stat().st_size / 2**20:.1f} MiB)")
        where = where.parent
    try:
        AutoTokenizer.from_pretrained(args.model).save_pretrained(where)
    except (OSError, ValueError):
        pass  # no tokenizer beside the model: nothing to copy
    print(f"Exported to {where}")
    return 0


def main(argv=None) -> int:
    """Run the command; a user error prints ``kn-transformers: error: <message>`` and returns 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = os.environ.get("KN_TRANSFORMERS_DEBUG", "").lower() in ("1", "true", "yes")
    if argv[:1] == ["--debug"]:
        debug, argv = True, argv[1:]
    try:
        return _main(argv)
    except USER_ERRORS as e:
        if debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"kn-transformers: error: {message}", file=sys.stderr)
        return 2


def _main(argv: list) -> int:
    # recipes parse their own arguments (HfArgumentParser): hand them everything that follows
    if argv and argv[0] in ("distill", "glue"):
        return _run_recipe(_RECIPES[argv[0]], argv[1:])
    if len(argv) > 1 and argv[0] == "evaluate" and argv[1] in ("perplexity", "glue"):
        if argv[1] == "perplexity":
            return _run_recipe("evaluate_perplexity", argv[2:])
        return _run_recipe("run_glue", ["--do_eval", *argv[2:]])
    parser = argparse.ArgumentParser(prog="kn-transformers", description="Kronecker compression for Transformers.")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks instead of one-line errors (also: KN_TRANSFORMERS_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="offline: fine-tune the bundled MiniLM on SST-2, compress, distil, compare")
    p.add_argument("--output_dir", default="kn_demo_output")
    p.add_argument("--preset", default="kroneckerbert8")
    p.add_argument("--train_rows", type=int, default=None, help="use only this many of the 2,000 training rows")
    p.add_argument("--student_epochs", type=float, default=None)
    p.add_argument("--no_baseline", action="store_true", help="skip the labels-only student")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("compress", help="teacher -> Kronecker student folder plus compression report")
    p.add_argument("teacher", help="model name or folder (any architecture; GPT-2/BERT also take the paper presets)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--preset", default=None,
                   help="paper (GPT-2) | kroneckerbert8 | kroneckerbert21 (BERT, RoBERTa, XLM-R, ELECTRA)")
    p.add_argument("--target_fraction", type=_fraction, default=None, help="paper models: per-matrix fraction")
    p.add_argument("--target_modules", default=None,
                   help="any model: all-linear (default), a comma-separated list of module names/suffixes, or a regex")
    p.add_argument("--exclude_modules", default=None, help="names/suffixes or a regex left dense")
    p.add_argument("--fraction", type=_fraction, default=None, help="any model: per-matrix parameter fraction")
    p.add_argument("--a_shape", type=_a_shape, default=None, help="any model: M1,N1 of every A factor")
    p.add_argument("--rank", type=int, default=1, help="Kronecker terms per matrix (with --fraction/--a_shape)")
    p.add_argument("--embedding", action="store_true", help="also compress the input token embedding")
    p.add_argument("--budget", type=_budget, default=None,
                   help="global parameter budget: the student's total (an int) or a fraction of the targeted "
                        "matrices (e.g. 0.25); each matrix's shape and rank (up to --rank) are then chosen")
    p.add_argument("--init", choices=["svd", "activation"], default=None,
                   help="svd (the papers' nearest Kronecker product) or activation (minimise each layer's output "
                        "error on --calibration_file); default: activation when a calibration file is given")
    p.add_argument("--calibration_file", default=None,
                   help="text for --init activation: one text per line, or JSON lines with text/sentence fields")
    p.add_argument("--calibration_samples", type=int, default=128, help="texts of --calibration_file to use")
    p.add_argument("--max_length", type=int, default=128, help="tokens per calibration text (at most the teacher's positions)")
    p.add_argument("--sequential", action="store_true",
                   help="with --init activation: calibrate each block on the compressed blocks' outputs")
    p.add_argument("--head", default=None,
                   help="causal-lm | sequence-classification | masked-lm | question-answering | base; "
                        "default: the teacher's")
    p.set_defaults(func=_cmd_compress)

    sub.add_parser("distill", help="stage-1 ILKD on text: the arguments of training/distill_lm.py")
    sub.add_parser("glue", help="GLUE fine-tuning, ILKD optional: the arguments of training/run_glue.py")
    p = sub.add_parser("evaluate", help="'evaluate perplexity ARGS' (evaluate_perplexity.py) or "
                                        "'evaluate glue ARGS' (run_glue.py --do_eval)")
    p.add_argument("what", choices=["perplexity", "glue"])

    p = sub.add_parser("report", help="nearest-Kronecker report of every matrix of a checkpoint (default: MiniLM)")
    p.add_argument("model", nargs="?", default=None, help="name or path; default: the bundled MiniLM teacher")
    p.add_argument("--fraction", type=_fraction, default=0.25, help="target parameter fraction per matrix, in (0, 1)")
    p.add_argument("--rank", type=_positive_int, default=1, help="Kronecker terms per matrix")
    p.add_argument("--json", help="also write the report to this JSON file")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("build-kernels", help="compile the optional native CPU kernel used by optimize_for_inference")
    p.add_argument("--force", action="store_true", help="rebuild even if a matching binary is cached")
    p.set_defaults(func=_cmd_build_kernels)

    p = sub.add_parser("export", help="a Kronecker model as its vanilla dense architecture, or as a factored ONNX graph")
    p.add_argument("model", help="Kronecker model folder or name")
    p.add_argument("output", help="output folder (or .onnx file with --format onnx)")
    p.add_argument("--format", choices=["dense", "onnx"], required=True)
    p.add_argument("--quantize", choices=["int8"], default=None, help="ONNX Runtime dynamic int8 quantisation")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: export_onnx's, 20)")
    p.add_argument("--no_past", action="store_true", help="causal LMs: export without the KV-cache inputs/outputs")
    p.add_argument("--head", default=None, help="causal-lm | sequence-classification | masked-lm | "
                                                "question-answering | base; default: the folder's")
    p.set_defaults(func=_cmd_export)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
