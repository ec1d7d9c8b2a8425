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

from .budget import embedding_candidates, matrix_candidates, solve_budget
from .calibration import InputStatistics, calibration_batches, calibration_groups, collect_statistics
from .report import CompressionReport, ModuleReport, count_parameters
from .weighted_kronecker import damped, row_weighted_nearest_kronecker, weighted_nearest_kronecker
from .factor_search import choose_embedding_factors, choose_kronecker_factors
from .factor_spec import factor_split
from .layers import KroneckerEmbedding, KroneckerLinear
from .config import KroneckerConfig
from .dispatch import TiedKroneckerHead, dispatch_for, kronecker_like, replace_module

logger = logging.get_logger(__name__)

__all__ = ["calibrate", "decompose_module", "kroneckerize", "layer_index", "plan_budget", "resolve_modules"]

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


def _output_error(kind: str, W: torch.Tensor, approx: torch.Tensor, statistics: InputStatistics) -> float:
    """``‖(W − Ŵ) X‖ / ‖W X‖`` over the calibration inputs (embedding: rows weighted by token counts)."""
    W, E = W.double(), W.double() - approx.double()
    if kind == "embedding":
        w = statistics.sum_xx[: W.shape[0], None]
        return float(((w * E * E).sum() / (w * W * W).sum().clamp_min(1e-300)).sqrt())
    if statistics.sum_cross is not None:  # ‖W x − Ŵ x̂‖ against the teacher's own inputs x
        What = approx.double()
        err = (((W @ statistics.sum_teacher) * W).sum() - 2 * ((What @ statistics.sum_cross.T) * W).sum()
               + ((What @ statistics.sum_xx) * What).sum())
        return float((err.clamp_min(0) / ((W @ statistics.sum_teacher) * W).sum().clamp_min(1e-300)).sqrt())
    C = statistics.covariance
    return float((((E @ C) * E).sum().clamp_min(0) / ((W @ C) * W).sum().clamp_min(1e-300)).sqrt())


def _activation_init_(layer: nn.Module, W: torch.Tensor, statistics: InputStatistics, damping: float, name: str) -> str:
    """Set ``layer``'s factors to minimise the calibration output error; returns the init used."""
    if isinstance(layer, KroneckerEmbedding):
        counts = statistics.sum_xx
        if layer.b_shape[0] != 1:
            logger.warning(f"{name}: init='activation' weights embedding rows by token frequency, which has a closed "
                           f"form only for B with one row (a_shape [{layer.num_rows}, n1]); using the plain SVD")
            layer.init_from_weight_(W)
            return "svd"
        padded, weights = W.detach(), counts[: W.shape[0]]
        if layer.num_rows > W.shape[0]:
            padded = torch.cat([padded, padded.new_zeros(layer.num_rows - W.shape[0], W.shape[1])])
            weights = torch.cat([weights, weights.new_zeros(layer.num_rows - W.shape[0])])
        A, B = row_weighted_nearest_kronecker(padded, layer.a_shape, layer.rank, weights, damping)
    else:
        target = W
        if statistics.sum_cross is not None:
            # ‖W x − Ŵ x̂‖² = ‖(W* − Ŵ) x̂‖² + const with W* = W K Ĉ⁻¹ (K = Σ x x̂ᵀ, Ĉ = Σ x̂ x̂ᵀ): the
            # weighted fit of the dense map that best undoes the upstream error (damped as the fit is)
            target = torch.linalg.solve(damped(statistics.sum_xx, damping), (W.double() @ statistics.sum_cross).T).T
        A, B, fit = weighted_nearest_kronecker(target, layer.a_shape, layer.rank, statistics.covariance,
                                               damping=damping)
        logger.info(f"{name}: activation-aware init from {fit.start}, {fit.iterations} ALS iterations, "
                    f"relative output error² {fit.start_error:.4f} -> {fit.error:.4f}")
    layer.A.copy_(A)
    layer.B.copy_(B)
    return "activation"


@torch.no_grad()
def decompose_module(dense: nn.Module, name: str, a_shape, rank: int = 1, *, normalize: bool = False,
                     svd_dtype: torch.dtype = torch.float64, init: str = "svd",
                     statistics: Optional[InputStatistics] = None, damping: float = 0.01) -> tuple[nn.Module, ModuleReport]:
    """The Kronecker layer of ``dense`` (any module the table knows) and its :class:`ModuleReport`.

    The one place a dense module becomes a Kronecker layer: built through the module table, its
    factors the nearest Kronecker product of the weight (``init="svd"``), the minimiser of the
    output error over the calibration ``statistics`` (``"activation"``), or random with the
    weight's std (``"random"``); the bias copied; the relative Frobenius error (and, with
    ``statistics``, the relative output error) measured.
    """
    entry = dispatch_for(dense)
    layer = kronecker_like(dense, a_shape, rank, name)
    W = entry.weight(dense).detach()
    used = init
    if init == "random":
        layer.reset_parameters(std=float(W.float().std()))
    elif init == "activation":
        if statistics is None:
            raise ValueError(f"module {name!r}: init='activation' needs calibration statistics (calibration_data=...)")
        used = _activation_init_(layer, W, statistics, damping, name)
    else:
        layer.init_from_weight_(W, normalize=normalize, svd_dtype=svd_dtype)
    bias = getattr(dense, "bias", None)
    if getattr(layer, "bias", None) is not None and bias is not None:
        layer.bias.copy_(bias)
    approx = layer.weight if not isinstance(layer, KroneckerEmbedding) else layer.weight[: W.shape[0]]
    err = ((W.double() - approx.double()).norm() / W.double().norm().clamp_min(1e-30)).item()
    output_error = None if statistics is None else _output_error(entry.kind, W, approx, statistics)
    report = ModuleReport(name, entry.kind, tuple(W.shape), tuple(layer.a_shape), tuple(layer.b_shape), rank,
                          W.numel(), layer.A.numel() + layer.B.numel(), err, output_error, used)
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


def plan_budget(targets: dict[str, nn.Module], budget: Union[int, float], *, fixed_params: int = 0,
                max_rank: int = 1, damping: float = 0.01, statistics: Optional[dict[str, InputStatistics]] = None,
                progress: bool = True) -> tuple[dict[str, dict], int]:
    """``({name: {"kind", "shape", "a_shape", "rank"}}, parameters allowed for the targets)`` under ``budget``.

    Each target's candidates (every split, ranks up to ``max_rank``) are scored by their relative
    error, activation-weighted where ``statistics`` has the module, and :func:`.budget.solve_budget`
    picks one per matrix. A float budget is a fraction of the targets' parameters; an int is the
    whole model's parameter count, of which ``fixed_params`` (what is not a target's factors) come off first.
    """
    candidates, dense_params = {}, 0
    for name in logging.tqdm(list(targets), desc="budget: scoring splits", disable=not progress):
        module = targets[name]
        entry = dispatch_for(module)
        W = entry.weight(module).detach()
        dense_params += W.numel()
        stats = (statistics or {}).get(name)
        if entry.kind == "embedding":
            candidates[name] = embedding_candidates(W, max_rank, None if stats is None else stats.sum_xx, damping)
        else:
            candidates[name] = matrix_candidates(W, max_rank, None if stats is None else stats.covariance, damping)
    if isinstance(budget, float):
        allowed = int(budget * dense_params)
    else:
        allowed = budget - fixed_params
        if allowed <= 0:
            raise ValueError(f"budget={budget:,} parameters is below what stays dense ({fixed_params:,}): "
                             "raise it, target more modules, or give a fraction such as budget=0.25")
    chosen = solve_budget(candidates, allowed)
    modules = {}
    for name, c in chosen.items():
        entry = dispatch_for(targets[name])
        modules[name] = {"kind": entry.kind, "shape": list(entry.shape(targets[name])), "a_shape": list(c.a_shape),
                         "rank": c.rank}
    return modules, allowed


def dense_params_of(targets: dict[str, nn.Module]) -> int:
    """The weight parameters of ``targets`` (biases stay as they are)."""
    return sum(dispatch_for(m).weight(m).numel() for m in targets.values())


def plan_model_budget(model: nn.Module, targets: dict[str, nn.Module], budget: Union[int, float], *,
                      extra_fixed: int = 0, **plan_kwargs) -> tuple[dict[str, dict], int]:
    """:func:`plan_budget` for the whole ``model``: an int budget first pays for every parameter
    that is not a target's weight, plus ``extra_fixed`` (parameters the conversion adds, e.g. an
    untied copy of a tied head). ``plan_kwargs``: ``max_rank``, ``damping``, ``statistics``, ``progress``."""
    fixed = count_parameters(model) - dense_params_of(targets) + extra_fixed
    return plan_budget(targets, budget, fixed_params=fixed, **plan_kwargs)


def total_up(report: CompressionReport, teacher: nn.Module, student: nn.Module,
             budget: Union[int, float, None] = None) -> None:
    """Fill ``report``'s teacher and student totals; a student over an int ``budget`` is an error."""
    report.total_params_before = count_parameters(teacher)
    report.total_params_after = count_parameters(student)
    if isinstance(budget, int) and report.total_params_after > budget:
        raise RuntimeError(f"the student has {report.total_params_after:,} parameters, over the budget of {budget:,}")


def calibrate(model: nn.Module, targets: dict[str, nn.Module], init: str, calibration_data,
              calibration_samples: Optional[int], progress: bool = True) -> dict[str, InputStatistics]:
    """The targets' :class:`InputStatistics` for ``init="activation"`` (``{}`` for the other inits);
    one-line errors when data and init disagree. For the paper converters and ``kroneckerize``."""
    _check_calibration(init, calibration_data)
    if calibration_data is None:
        return {}
    return collect_statistics(model, targets, calibration_batches(calibration_data, calibration_samples),
                              progress=progress)


def _check_calibration(init: str, calibration_data) -> None:
    if init == "activation" and calibration_data is None:
        raise ValueError("init='activation' needs calibration_data=: a tensor of token ids or tokenised batches "
                         "(text like the task's, not the evaluation text)")
    if calibration_data is not None and init != "activation":
        raise ValueError(f"calibration_data is used by init='activation' only (init is {init!r})")


@torch.no_grad()
def kroneckerize(
    model: nn.Module,
    config: KroneckerConfig,
    *,
    calibration_data=None,
    calibration_samples: Optional[int] = 128,
    progress: bool = True,
    svd_dtype: torch.dtype = torch.float64,
    num_threads: Optional[int] = 1,
) -> nn.Module:
    """A copy of ``model`` whose modules targeted by ``config`` are Kronecker layers.

    Args:
        model: a Transformers model (any architecture) or any ``nn.Module``; not modified.
        config: a :class:`KroneckerConfig` (targets, shapes, fraction or budget, rank, init).
        calibration_data: with ``config.init == "activation"``: token ids (a tensor ``(N, L)``) or
            tokenised batches (dicts / ``BatchEncoding`` with ``input_ids`` and optionally
            ``attention_mask``, whose padding positions are left out) run through ``model`` to
            collect each target's input statistics (:mod:`.calibration`).
        calibration_samples: use at most this many sequences of ``calibration_data`` (``None``: all).
        progress: show progress bars over the converted modules.
        svd_dtype: precision of the decompositions.
        num_threads: torch threads during the SVD decompositions (restored after); ``None`` keeps the
            current setting (tall, thin SVDs gain nothing from threads and stall when cores are shared;
            ``init="activation"`` keeps the current setting, its solves do gain).

    Returns:
        The student, in the teacher's dtype, device and train/eval mode, with
        ``student.config.quantization_config`` set to the resolved config (so that
        ``save_pretrained`` writes it and ``AutoModelFor<Task>.from_pretrained`` rebuilds the same
        layers) and ``student.compression_report`` (per matrix: shape, factors, parameters,
        relative Frobenius error and, with calibration data, relative output error). A head tied
        to a compressed embedding is computed factored (``tied_head="factored"``) or untied dense (``"dense"``).
    """
    if not isinstance(config, KroneckerConfig):
        raise TypeError(f"config must be a KroneckerConfig, got {type(config).__name__}")
    existing = getattr(getattr(model, "config", None), "quantization_config", None)
    if existing is not None:
        method = existing.get("quant_method") if isinstance(existing, dict) else getattr(existing, "quant_method", None)
        raise ValueError(f"the model is already compressed ({method}); kroneckerize a dense model")
    targets = _targets(model, config)
    tied_name = _tied_head_name(model)
    statistics = {}
    if config.sequential:  # block by block below; the budget is planned on the teacher's statistics
        _check_calibration(config.init, calibration_data)
        batches = calibration_batches(calibration_data, calibration_samples)
        if config.budget is not None:
            statistics = collect_statistics(model, targets, batches, progress=progress)
    else:
        statistics = calibrate(model, targets, config.init, calibration_data, calibration_samples, progress)
    report = CompressionReport()
    if config.budget is not None:
        embedding_targeted = any(dispatch_for(m).kind == "embedding" for m in targets.values())
        untied = tied_name is not None and embedding_targeted and config.tied_head == "dense"
        modules, report.budget = plan_model_budget(
            model, targets, config.budget, extra_fixed=model.get_input_embeddings().weight.numel() if untied else 0,
            max_rank=config.rank, damping=config.damping, statistics=statistics, progress=progress)
    else:
        modules = {name: _resolve_entry(name, module, config) for name, module in targets.items()}
    resolved = replace(config, modules=modules)
    embedding_name = next((n for n, s in modules.items() if s["kind"] == "embedding"), None)
    embedding_is_input = embedding_name is not None and model.get_input_embeddings() is model.get_submodule(embedding_name)

    student = _meta_copy(model)
    threads = torch.get_num_threads()
    layers: dict[str, nn.Module] = {}
    groups = calibration_groups(list(modules), layer_index) if config.sequential else [list(modules)]
    bar = logging.tqdm(total=len(modules), desc="kroneckerize", disable=not progress)
    try:
        if num_threads is not None and resolved.init != "activation":  # ALS's solves do gain from threads
            torch.set_num_threads(num_threads)
        for group in groups:
            if config.sequential:  # this block sees what the compressed blocks before it output
                statistics = collect_statistics(model, {n: targets[n] for n in group}, batches,
                                                replacements={targets[n]: layers[n] for n in layers})
            for name in group:
                spec = modules[name]
                new, row = decompose_module(model.get_submodule(name), name, spec["a_shape"], spec["rank"],
                                            normalize=resolved.normalize, svd_dtype=svd_dtype, init=resolved.init,
                                            statistics=statistics.get(name), damping=resolved.damping)
                layers[name] = new
                replace_module(student, name, new)
                report.modules.append(row)
                bar.update(1)
    finally:
        bar.close()
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
    total_up(report, model, student, config.budget)
    student.compression_report = report
    student.train(model.training)
    logger.info("kroneckerize report\n" + report.to_markdown())
    return student
