"""``kroneckerize(model, config)``: any Transformers model with its targeted matrices made Kronecker.

The student is a copy of the teacher's module tree built on the meta device (no second dense
copy), in which each targeted module is replaced through the module table (:mod:`.dispatch`) by a
Kronecker layer initialised from the teacher's weight, and every other tensor is cloned from the
teacher. Peak memory is about teacher + student + one matrix's SVD workspace. The teacher is
not modified.
"""

from __future__ import annotations

import copy
import re
from dataclasses import replace
from typing import Optional, Union

import torch
from torch import nn
from transformers.utils import logging

from .report import CompressionReport, ModuleReport, count_parameters
from .factor_search import choose_embedding_factors, choose_kronecker_factors
from .factor_spec import factor_split
from .layers import KroneckerEmbedding, KroneckerLinear
from .config import KroneckerConfig
from .dispatch import TiedKroneckerHead, dispatch_for, kronecker_like, replace_module

logger = logging.get_logger(__name__)

__all__ = ["decompose_module", "kroneckerize", "layer_index", "resolve_modules"]

#: Containers of the repeated blocks, as PEFT's ``layers_pattern`` defaults.
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|block|blocks)\.(\d+)(?:\.|$)")


def layer_index(name: str) -> Optional[int]:
    """The block index in a module name (``model.layers.3.mlp.up_proj`` → 3), or ``None``."""
    match = _LAYER_INDEX.search(name)
    return None if match is None else int(match.group(1))


def _name_matches(name: str, spec: Union[str, list[str]]) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == key or name.endswith("." + key) for key in spec)


def _pattern_value(name: str, patterns: dict):
    """PEFT's ``rank_pattern`` rule: the first key that matches the end of the name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def _module_name(model: nn.Module, target: Optional[nn.Module]) -> Optional[str]:
    if target is None:
        return None
    for name, module in model.named_modules():
        if module is target:
            return name
    return None


def _base_prefix(model: nn.Module) -> Optional[str]:
    """Name of ``model.base_model`` inside ``model`` ("" for a base model itself)."""
    base = getattr(model, "base_model", model)
    return _module_name(model, base)


def _targets(model: nn.Module, config: KroneckerConfig) -> dict[str, nn.Module]:
    """The modules ``config`` selects, ``{name: module}`` in model order; one-line errors otherwise."""
    getter = getattr(model, "get_output_embeddings", None)
    head_name = _module_name(model, getter() if getter else None)
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if getter else None
    embedding_name = _module_name(model, embedding)
    base = _base_prefix(model) or ""
    spec = config.target_modules
    chosen: dict[str, nn.Module] = {}
    unmatched_keys = set(spec) if isinstance(spec, list) else set()
    for name, module in model.named_modules():
        if not name:
            continue
        entry = dispatch_for(module)
        if spec == "all-linear":
            hit = (entry is not None and entry.kind == "linear" and name != head_name
                   and (not base or name == base or name.startswith(base + ".")))
        elif spec is None:
            hit = False
        else:
            hit = _name_matches(name, spec)
            if hit and isinstance(spec, list):
                unmatched_keys -= {k for k in spec if name == k or name.endswith("." + k)}
            if hit and entry is None:
                if isinstance(module, (KroneckerLinear, KroneckerEmbedding, TiedKroneckerHead)):
                    raise ValueError(f"module {name!r} is already a Kronecker layer; kroneckerize a dense model")
                if isinstance(spec, list) or (not any(True for _ in module.children())
                                                 and any(True for _ in module.parameters(recurse=False))):
                    raise ValueError(
                        f"module {name!r} is a {type(module).__name__}, which the Kronecker module table does not know: "
                        "it replaces nn.Linear, transformers' Conv1D and nn.Embedding (and their subclasses); "
                        "target those modules instead"
                    )
                hit = False  # a container or a parameter-free leaf matched by a regex
        if not hit:
            continue
        if config.exclude_modules is not None and _name_matches(name, config.exclude_modules):
            continue
        if config.layers is not None:
            index = layer_index(name)
            if index is None or index not in config.layers:
                continue
        chosen[name] = module
    if unmatched_keys:
        raise ValueError(f"target_modules {sorted(unmatched_keys)} match no module of {type(model).__name__}; "
                         f"{_suffix_hint(model)}")
    if config.embedding:
        if embedding_name is None or dispatch_for(embedding) is None:
            raise ValueError(f"embedding=True, but {type(model).__name__} has no nn.Embedding input embedding")
        chosen = {embedding_name: embedding, **chosen}
    if config.layers is not None:
        present = {layer_index(n) for n, _ in model.named_modules()} - {None}
        missing = sorted(set(config.layers) - present)
        if missing:
            raise ValueError(f"layers {missing} do not exist in {type(model).__name__} (its blocks are "
                             f"{min(present) if present else '-'}..{max(present) if present else '-'})")
    if not chosen:
        raise ValueError(f"target_modules={spec!r} (with exclude_modules/layers) matches no module of "
                         f"{type(model).__name__}; {_suffix_hint(model)}")
    return chosen


def _suffix_hint(model: nn.Module) -> str:
    suffixes = []
    for name, module in model.named_modules():
        entry = dispatch_for(module)
        if entry is not None and entry.kind == "linear":
            suffix = name.rsplit(".", 1)[-1]
            if suffix not in suffixes:
                suffixes.append(suffix)
    return f"its linear modules end in: {', '.join(suffixes[:20]) or 'none'}"


def _resolve_entry(name: str, module: nn.Module, config: KroneckerConfig) -> dict:
    entry = dispatch_for(module)
    out_f, in_f = entry.shape(module)
    rank = _pattern_value(name, config.rank_pattern) or config.rank
    a_shape = _pattern_value(name, config.shape_pattern) or config.a_shape
    if a_shape is None and entry.kind == "embedding" and config.fraction is not None:
        a_shape = list(choose_embedding_factors(out_f, in_f, config.fraction, rank))
    elif a_shape is None and config.fraction is None:
        raise ValueError(f"module {name!r} matches no shape_pattern key and neither a_shape nor fraction is given; "
                         "add a pattern for it or give fraction=")
    elif a_shape is None:
        try:
            a_shape = list(choose_kronecker_factors(out_f, in_f, config.fraction, ranks=(rank,)).a_shape)
        except ValueError:
            raise ValueError(f"module {name!r} ({out_f}x{in_f}) has no Kronecker split smaller than itself at "
                             f"rank {rank}; add it to exclude_modules") from None
    try:
        m1, n1, _, _ = factor_split((out_f, in_f), a_shape, rank, entry.kind, f"module {name!r}")
    except ValueError as err:
        raise ValueError(f"{err}; set shape_pattern/rank_pattern for it or use fraction=") from None
    return {"kind": entry.kind, "shape": [out_f, in_f], "a_shape": [int(m1), int(n1)], "rank": int(rank)}


def resolve_modules(model: nn.Module, config: KroneckerConfig) -> dict[str, dict]:
    """``{name: {"kind", "shape", "a_shape", "rank"}}`` for every module ``config`` targets in ``model``
    (no weights touched: works on the meta device). Raises ``ValueError`` (one line) for a target
    that matches nothing, a module type the table does not know, or a split that does not divide."""
    return {name: _resolve_entry(name, module, config) for name, module in _targets(model, config).items()}


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are on the meta device (ties kept)."""
    memo = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in memo:
            continue
        meta = tensor.detach().to("meta")
        memo[id(tensor)] = nn.Parameter(meta, requires_grad=tensor.requires_grad) if isinstance(
            tensor, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _fill_from_teacher(student: nn.Module, teacher: nn.Module) -> None:
    """Replace every meta tensor of ``student`` by a clone of the teacher's (shared tensors stay shared)."""
    clones: dict[int, torch.Tensor] = {}
    teacher_modules = dict(teacher.named_modules(remove_duplicate=False))
    for name, module in student.named_modules(remove_duplicate=False):
        source_module = teacher_modules.get(name)
        for store in ("_parameters", "_buffers"):
            tensors = getattr(module, store)
            for key, tensor in list(tensors.items()):
                if tensor is None or not tensor.is_meta:
                    continue
                source = getattr(source_module, store)[key]
                if id(source) not in clones:
                    value = source.detach().clone()
                    clones[id(source)] = nn.Parameter(value, requires_grad=source.requires_grad) if isinstance(
                        source, nn.Parameter) else value
                tensors[key] = clones[id(source)]


@torch.no_grad()
def decompose_module(dense: nn.Module, name: str, a_shape, rank: int = 1, *, normalize: bool = False,
                     svd_dtype: torch.dtype = torch.float64, init: str = "svd") -> tuple[nn.Module, ModuleReport]:
    """The Kronecker layer of ``dense`` (any module the table knows) and its :class:`ModuleReport`.

    The one place a dense module becomes a Kronecker layer: built through the module table, its
    factors the nearest Kronecker product of the weight (``init="svd"``; ``"random"``: the product's
    entries get the weight's std), the bias copied, the relative Frobenius error measured.
    """
    entry = dispatch_for(dense)
    layer = kronecker_like(dense, a_shape, rank, name)
    W = entry.weight(dense).detach()
    if init == "random":
        layer.reset_parameters(std=float(W.float().std()))
    else:
        layer.init_from_weight_(W, normalize=normalize, svd_dtype=svd_dtype)
    bias = getattr(dense, "bias", None)
    if getattr(layer, "bias", None) is not None and bias is not None:
        layer.bias.copy_(bias)
    approx = layer.weight if not isinstance(layer, KroneckerEmbedding) else layer.weight[: W.shape[0]]
    err = ((W.double() - approx.double()).norm() / W.double().norm().clamp_min(1e-30)).item()
    report = ModuleReport(name, entry.kind, tuple(W.shape), tuple(layer.a_shape), tuple(layer.b_shape), rank,
                          W.numel(), layer.A.numel() + layer.B.numel(), err)
    return layer, report


def disable_tying(model: nn.Module) -> None:
    """Nothing left to tie: the factored head reads the embedding's factors (no ``lm_head.weight``)."""
    model._tied_weights_keys = None
    model.all_tied_weights_keys = {}


def attach_tied_head(model: nn.Module, head_name: str, embedding: KroneckerEmbedding,
                     bias: Optional[torch.Tensor] = None) -> None:
    """Replace the output head at ``head_name`` by a :class:`TiedKroneckerHead` reading ``embedding``."""
    replace_module(model, head_name, TiedKroneckerHead(embedding, bias))
    disable_tying(model)


def _tied_head_name(model: nn.Module) -> Optional[str]:
    """Name of the output head when it shares the input embedding's matrix, else ``None``."""
    get_out = getattr(model, "get_output_embeddings", None)
    get_in = getattr(model, "get_input_embeddings", None)
    out = get_out() if get_out else None
    inp = get_in() if get_in else None
    if out is None or inp is None or getattr(out, "weight", None) is None or out.weight is not getattr(inp, "weight", None):
        return None
    return _module_name(model, out)


@torch.no_grad()
def kroneckerize(
    model: nn.Module,
    config: KroneckerConfig,
    *,
    progress: bool = True,
    svd_dtype: torch.dtype = torch.float64,
    num_threads: Optional[int] = 1,
) -> nn.Module:
    """A copy of ``model`` whose modules targeted by ``config`` are Kronecker layers.

    Args:
        model: a Transformers model (any architecture) or any ``nn.Module``; not modified.
        config: a :class:`KroneckerConfig` (targets, shapes or fraction, rank, init).
        progress: show a progress bar over the converted modules.
        svd_dtype: precision of the decompositions.
        num_threads: torch threads during the decompositions (restored after); ``None`` keeps the
            current setting (tall, thin SVDs gain nothing from threads and stall when cores are shared).

    Returns:
        The student, in the teacher's dtype, device and train/eval mode, with
        ``student.config.quantization_config`` set to the resolved config (so that
        ``save_pretrained`` writes it and ``AutoModelFor<Task>.from_pretrained`` rebuilds the same
        layers) and ``student.compression_report`` (per matrix: shape, factors, parameters,
        relative Frobenius error). A head tied to a compressed embedding is computed factored
        (``tied_head="factored"``) or untied dense (``"dense"``).
    """
    if not isinstance(config, KroneckerConfig):
        raise TypeError(f"config must be a KroneckerConfig, got {type(config).__name__}")
    existing = getattr(getattr(model, "config", None), "quantization_config", None)
    if existing is not None:
        method = existing.get("quant_method") if isinstance(existing, dict) else getattr(existing, "quant_method", None)
        raise ValueError(f"the model is already compressed ({method}); kroneckerize a dense model")
    modules = resolve_modules(model, config)
    resolved = replace(config, modules=modules)
    tied_name = _tied_head_name(model)
    embedding_name = next((n for n, s in modules.items() if s["kind"] == "embedding"), None)
    embedding_is_input = embedding_name is not None and model.get_input_embeddings() is model.get_submodule(embedding_name)

    student = _meta_copy(model)
    report = CompressionReport()
    threads = torch.get_num_threads()
    try:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        for name in logging.tqdm(list(modules), desc="kroneckerize", disable=not progress):
            spec = modules[name]
            new, row = decompose_module(model.get_submodule(name), name, spec["a_shape"], spec["rank"],
                                        normalize=resolved.normalize, svd_dtype=svd_dtype, init=resolved.init)
            replace_module(student, name, new)
            report.modules.append(row)
    finally:
        torch.set_num_threads(threads)

    if tied_name is not None and embedding_is_input:
        head = model.get_submodule(tied_name)
        if config.tied_head == "factored":
            bias = None if getattr(head, "bias", None) is None else head.bias.detach().clone()
            attach_tied_head(student, tied_name, student.get_submodule(embedding_name), bias)
            resolved.modules[tied_name] = {"kind": "tied_head", "shape": list(modules[embedding_name]["shape"]),
                                  "a_shape": list(modules[embedding_name]["a_shape"]),
                                  "rank": modules[embedding_name]["rank"]}
        else:  # untied: the head keeps the teacher's dense matrix as its own parameter
            student_head = student.get_submodule(tied_name)
            student_head.weight = nn.Parameter(head.weight.detach().clone())
            text_config = student.config.get_text_config() if hasattr(student.config, "get_text_config") else student.config
            text_config.tie_word_embeddings = False
            disable_tying(student)
    _fill_from_teacher(student, model)

    if hasattr(student, "config"):
        student.config.quantization_config = resolved
    report.total_params_before = count_parameters(model)
    report.total_params_after = count_parameters(student)
    student.compression_report = report
    student.train(model.training)
    logger.info("kroneckerize report\n" + report.to_markdown())
    return student
