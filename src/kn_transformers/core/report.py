"""The compression report and the checks shared by every conversion.

``kroneckerize`` and the paper models' converters (``kngpt2_from_gpt2``, ``kronecker_bert_from_bert``)
decompose through :func:`kn_transformers.core.kroneckerize.decompose_module` and report with
:class:`CompressionReport`.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Optional, Union

import torch
from torch import nn


@dataclass
class ModuleReport:
    """One decomposed matrix: ``shape`` is (out, in) for linears, (vocab, dim) for embeddings."""

    name: str
    kind: str  # "linear" | "embedding" | "dense" (kept as it was)
    shape: tuple[int, int]
    a_shape: Optional[tuple[int, int]]
    b_shape: Optional[tuple[int, int]]
    rank: int
    params_before: int  # weight parameters only (biases are kept as they are)
    params_after: int
    rel_error: float  # ‖W − Σ A_r⊗B_r‖_F / ‖W‖_F
    #: with calibration data: ‖(W − Σ A_r⊗B_r) X‖_F / ‖W X‖_F over the calibration inputs
    #: (embedding: rows weighted by token frequency)
    output_error: Optional[float] = None
    init: str = "svd"

    @property
    def ratio(self) -> float:
        return self.params_before / max(self.params_after, 1)


@dataclass
class CompressionReport:
    """Per-module results of a conversion, plus the model totals (all parameters counted)."""

    modules: list[ModuleReport] = field(default_factory=list)
    total_params_before: int = 0
    total_params_after: int = 0
    #: with ``KroneckerConfig(budget=...)``: the parameters allowed for the targeted matrices' factors
    budget: Optional[int] = None

    @property
    def compression(self) -> float:
        return self.total_params_before / max(self.total_params_after, 1)

    def to_dict(self) -> dict:
        return {
            "modules": [asdict(m) for m in self.modules],
            "total_params_before": self.total_params_before,
            "total_params_after": self.total_params_after,
            "compression": self.compression,
            "budget": self.budget,
        }

    def to_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    def to_markdown(self) -> str:
        calibrated = any(m.output_error is not None for m in self.modules)
        extra = " init | output error |" if calibrated else ""
        lines = [
            "| module | shape | A | B | rank | params before | params after | ratio | rel. error |" + extra,
            "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if calibrated else ""),
        ]
        for m in self.modules:
            fmt = lambda s: "-" if s is None else f"{s[0]}×{s[1]}"  # noqa: E731
            row = (f"| {m.name} | {fmt(m.shape)} | {fmt(m.a_shape)} | {fmt(m.b_shape)} | {m.rank} | "
                   f"{m.params_before:,} | {m.params_after:,} | {m.ratio:.1f}x | {m.rel_error:.3f} |")
            if calibrated:
                row += f" {m.init} | {'-' if m.output_error is None else f'{m.output_error:.3f}'} |"
            lines.append(row)
        lines.append(
            f"\nTotal parameters: {self.total_params_before:,} → {self.total_params_after:,} "
            f"({self.compression:.2f}x smaller)"
        )
        if self.budget is not None:
            used = sum(m.params_after for m in self.modules if m.kind != "dense")
            lines.append(f"Budget for the targeted matrices: {self.budget:,} parameters, {used:,} used")
        return "\n".join(lines)


def count_parameters(model: nn.Module) -> int:
    """Parameters counted once each (tied weights are shared tensors)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def check_layer_indices(
    layers: Union[int, Iterable[int]], num_layers: int, count_name: str = "num_hidden_layers"
) -> list[int]:
    """``layers`` (an int or an iterable of ints, 0-based) as a sorted list without repeats.

    ``ValueError`` (one line) for anything but integers in ``0..num_layers-1``: strings, floats
    and bools (``True`` would silently mean layer 1) are refused rather than cast.
    """
    if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
        layers = [layers]
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise ValueError(f"layers must be a list of layer indices (ints in 0..{num_layers - 1}), got {layers!r}")
    layers = list(layers)
    for i in layers:
        if not isinstance(i, numbers.Integral) or isinstance(i, bool):
            raise ValueError(
                f"layers: {i!r} ({type(i).__name__}) is not a layer index; pass ints in 0..{num_layers - 1}"
            )
    bad = sorted({int(i) for i in layers if not 0 <= i < num_layers})
    if bad:
        raise ValueError(
            f"layers {bad} are out of range for a teacher with {count_name}={num_layers} (valid: 0..{num_layers - 1})"
        )
    return sorted({int(i) for i in layers})
