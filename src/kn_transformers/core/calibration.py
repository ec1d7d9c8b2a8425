"""Calibration statistics for activation-aware initialisation, streamed through forward hooks.

For every targeted linear module: ``Σ x xᵀ`` over its calibration inputs (``n × n``, float64) and
the token count; for the input embedding: how often each token id occurs. Padding positions
(``attention_mask == 0``) are left out. Memory is O(n²) per matrix whatever the number of
samples: activations are never stored. ``sequential=True`` in :func:`collect_statistics` feeds
each module the outputs of the already compressed modules before it (GPTQ's and SVD-LLM's
scheme), one block at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn
from transformers.utils import logging

from .dispatch import dispatch_for

__all__ = ["InputStatistics", "calibration_batches", "collect_statistics"]

#: Batch keys passed to the model's forward; anything else (labels, idx...) is dropped.
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


@dataclass
class InputStatistics:
    """Streamed statistics of one module's inputs: ``sum_xx`` is ``Σ x xᵀ`` (``(n, n)``, float64)
    for a linear, token counts (``(vocab,)``) for an embedding; ``count`` is the tokens seen.

    Sequential calibration (the module's inputs ``x̂`` come from the compressed blocks before it,
    its teacher's inputs are ``x``): ``sum_xx`` is ``Σ x̂ x̂ᵀ``, ``sum_cross`` is ``Σ x x̂ᵀ`` and
    ``sum_teacher`` is ``Σ x xᵀ``, so that the fit can aim at the teacher's output ``W x``.
    """

    kind: str
    sum_xx: torch.Tensor
    count: int = 0
    sum_cross: Optional[torch.Tensor] = None
    sum_teacher: Optional[torch.Tensor] = None

    @property
    def covariance(self) -> torch.Tensor:
        """``Σ x xᵀ / N`` (linear) or token frequencies (embedding)."""
        return self.sum_xx / max(self.count, 1)


def calibration_batches(calibration_data, max_samples: Optional[int] = None, batch_size: int = 8) -> list[dict]:
    """``calibration_data`` as a list of model-input dicts holding at most ``max_samples`` sequences.

    Accepts a tensor of token ids (``(N, L)`` or ``(L,)``), one dict / ``BatchEncoding`` of
    ``(N, L)`` tensors, or an iterable of either (a ``DataLoader`` of tokenised batches).
    """
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise ValueError(f"calibration_samples must be a positive integer, got {max_samples!r}")

    def as_batch(item) -> dict:
        if isinstance(item, torch.Tensor):
            item = {"input_ids": item}
        if not isinstance(item, Mapping) or "input_ids" not in item:
            raise ValueError("calibration_data must hold token ids: a tensor of ids, or dicts/BatchEncodings "
                             f"with 'input_ids' (got {type(item).__name__})")
        batch = {}
        for key in _MODEL_INPUTS:
            if key in item and item[key] is not None:
                value = torch.as_tensor(item[key])
                batch[key] = value.unsqueeze(0) if value.dim() == 1 else value
        if batch["input_ids"].dtype.is_floating_point or batch["input_ids"].dim() != 2:
            raise ValueError(f"calibration input_ids must be integer ids of shape (batch, length), "
                             f"got {tuple(batch['input_ids'].shape)} {batch['input_ids'].dtype}")
        return batch

    if isinstance(calibration_data, (torch.Tensor, Mapping)):
        whole = as_batch(calibration_data)
        n = whole["input_ids"].shape[0]
        items = [{k: v[i:i + batch_size] for k, v in whole.items()} for i in range(0, n, batch_size)]
    elif isinstance(calibration_data, Iterable) and not isinstance(calibration_data, (str, bytes)):
        items = calibration_data
    else:
        raise ValueError(f"calibration_data must be a tensor of token ids or an iterable of tokenised batches, "
                         f"got {type(calibration_data).__name__}")
    batches, seen = [], 0
    for item in items:
        batch = as_batch(item)
        if max_samples is not None:
            keep = max_samples - seen
            if keep <= 0:
                break
            batch = {k: v[:keep] for k, v in batch.items()}
        batches.append(batch)
        seen += batch["input_ids"].shape[0]
    if not batches:
        raise ValueError("calibration_data is empty")
    return batches


@torch.no_grad()
def collect_statistics(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    batches: list[dict],
    *,
    replacements: Optional[Mapping[nn.Module, nn.Module]] = None,
    progress: bool = False,
    desc: str = "calibration",
) -> dict[str, InputStatistics]:
    """Run ``model`` on ``batches`` and return the :class:`InputStatistics` of each of ``modules``
    (``{name: module}``, modules of ``model``).

    ``replacements`` (``{module of model: layer}``) make those modules output the given layers'
    results instead of their own (the compressed layers, for sequential calibration); each batch
    then also runs without them, for the teacher's inputs of each module (``sum_cross``,
    ``sum_teacher``: one batch of inputs held at a time). The model itself is not changed. Eval
    mode and no gradients during the passes.
    """
    stats: dict[str, InputStatistics] = {}
    state = {"mask": None, "teacher_pass": False}
    teacher_rows: dict[str, torch.Tensor] = {}
    handles = []
    paired = bool(replacements)

    def rows(x: torch.Tensor) -> torch.Tensor:
        mask = state["mask"]
        if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
            return x[mask.bool()]
        return x.reshape(-1, x.shape[-1])

    def linear_hook(name):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            x = rows(x.detach()).to(torch.float64)
            if state["teacher_pass"]:
                teacher_rows[name] = x
                return
            s = stats[name]
            s.sum_xx.addmm_(x.T, x)
            s.count += x.shape[0]
            if paired:
                t = teacher_rows.pop(name)
                s.sum_cross.addmm_(t.T, x)
                s.sum_teacher.addmm_(t.T, t)
        return hook

    def embedding_hook(name):
        def hook(module, args, kwargs):
            if state["teacher_pass"]:
                return
            ids = args[0] if args else kwargs["input"]
            mask = state["mask"]
            ids = ids[mask.bool()] if mask is not None and ids.shape == mask.shape else ids.reshape(-1)
            s = stats[name]
            s.sum_xx.index_add_(0, ids.reshape(-1).to(s.sum_xx.device),
                                torch.ones(ids.numel(), dtype=torch.float64, device=s.sum_xx.device))
            s.count += ids.numel()
        return hook

    ref = next(model.parameters())
    for name, module in modules.items():
        entry = dispatch_for(module)
        if entry is None:
            raise ValueError(f"module {name!r} ({type(module).__name__}) cannot be calibrated: not in the module table")
        out_f, in_f = entry.shape(module)
        if entry.kind == "embedding":
            stats[name] = InputStatistics("embedding", torch.zeros(out_f, dtype=torch.float64, device=ref.device))
            handles.append(module.register_forward_pre_hook(embedding_hook(name), with_kwargs=True))
        else:
            zeros = lambda: torch.zeros(in_f, in_f, dtype=torch.float64, device=ref.device)  # noqa: E731
            stats[name] = InputStatistics("linear", zeros(), sum_cross=zeros() if paired else None,
                                          sum_teacher=zeros() if paired else None)
            handles.append(module.register_forward_pre_hook(linear_hook(name), with_kwargs=True))
    def replace(module, args, out, layer):
        return None if state["teacher_pass"] else layer(args[0])

    for module, layer in (replacements or {}).items():
        handles.append(module.register_forward_hook(lambda m, a, o, layer=layer: replace(m, a, o, layer)))
    was_training = model.training
    model.eval()
    try:
        for batch in logging.tqdm(batches, desc=desc, disable=not progress, leave=False):
            batch = {k: v.to(ref.device) for k, v in batch.items()}
            state["mask"] = batch.get("attention_mask")
            if paired:
                state["teacher_pass"] = True
                try:
                    model(**batch)
                finally:
                    state["teacher_pass"] = False
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for name, s in stats.items():
        if s.count == 0:
            raise ValueError(f"module {name!r} saw no calibration tokens: is it used in {type(model).__name__}'s forward?")
    return stats


def calibration_groups(names: Iterable[str], layer_index) -> list[list[str]]:
    """``names`` (in model order) split into runs that share a block index: the units of sequential calibration."""
    groups: list[list[str]] = []
    last: Union[int, None, object] = object()
    for name in names:
        index = layer_index(name)
        if groups and index is not None and index == last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = index
    return groups
