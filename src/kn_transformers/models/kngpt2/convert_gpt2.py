"""Build a KnGPT2 from a dense GPT-2: nearest-Kronecker factors, every other weight copied.

Entry points:

* :func:`kngpt2_config_from_gpt2`: the :class:`KnGPT2Config` a conversion would produce
  (no weights touched; cheap, e.g. to count parameters on the meta device).
* :func:`kngpt2_from_gpt2`: the converted :class:`KnGPT2LMHeadModel`, with the per-module
  report attached as ``model.compression_report`` (and returned too with ``return_report=True``).

Preset ``"paper"`` (Edalati et al., KnGPT2): the token embedding and the four matrices of the
odd layers (1, 3, 5, …) at factor 2, dense untied LM head. The factor 2 sits on the input
(column) axis everywhere: embedding ``A (V, d/2) ⊗ B (1, 2)`` as in the paper, and each
``(out, in)`` layer matrix ``A (out, in/2) ⊗ B (1, 2)``. One tiny factor halves the parameters
(``out·in/2 + 2``), and putting it on the input axis for all four maps keeps one rule for every
matrix: pairs of adjacent input features share a fixed 2-vector, so the forward is a pairwise
mix of the input followed by a half-width dense map (half the FLOPs, no cross-head coupling of
the fused QKV outputs). For GPT-2 small this gives ~83.9M parameters without the head (the
paper's ~83M) plus the 38.6M dense head.
"""

from __future__ import annotations

import copy
from typing import Any, Optional, Union

import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    PretrainedConfig,
)
from transformers.utils import logging

from .configuration_kngpt2 import KNGPT2_LAYER_MODULES, KnGPT2Config
from ..architectures import PAPER_PRESETS
from ...core.report import CompressionReport, ModuleReport, check_layer_indices
from ...core.config import KroneckerConfig
from ...core.kroneckerize import calibrate, decompose_module, plan_model_budget, total_up
from ...core.factor_search import choose_kronecker_factors
from ..loading import load_teacher
from .modeling_kngpt2 import KnGPT2ForSequenceClassification, KnGPT2LMHeadModel

logger = logging.get_logger(__name__)

__all__ = ["PRESETS", "kngpt2_config_from_gpt2", "kngpt2_from_gpt2", "paper_kronecker_factors"]

#: Presets accepted by ``preset=``.
PRESETS = PAPER_PRESETS["gpt2"]

_OVERRIDES = ("kronecker_factors", "layers", "modules", "embedding", "rank", "tie_word_embeddings")


def paper_kronecker_factors(config: GPT2Config, factor: int = 2, rank: int = 1) -> dict[str, dict[str, Any]]:
    """The paper's map: ``wte`` and the four matrices of odd layers, ``B`` of shape ``(1, factor)``.

    ``A`` is ``(V, d/factor)`` for the embedding and ``(out, in/factor)`` for each layer matrix
    (see the module docstring for why the factor sits on the input axis).
    """
    cfg = KnGPT2Config(**_gpt2_config_dict(config))
    factors = {"wte": {"a_shape": [config.vocab_size, config.n_embd // factor], "rank": rank}}
    for i in range(1, config.n_layer, 2):
        for mod in KNGPT2_LAYER_MODULES:
            out_f, in_f = cfg.module_shape(f"h.{i}.{mod}")
            factors[f"h.{i}.{mod}"] = {"a_shape": [out_f, in_f // factor], "rank": rank}
    return factors


def _gpt2_config_dict(config: PretrainedConfig) -> dict:
    d = config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "kronecker_factors",
                "kronecker_normalize"):
        d.pop(key, None)
    return d


def _check_gpt2_config(config: PretrainedConfig, source: str) -> None:
    if getattr(config, "model_type", None) != "gpt2":
        raise ValueError(
            f"kngpt2_from_gpt2 needs a GPT-2 teacher (model_type 'gpt2'), but {source} is "
            f"{getattr(config, 'model_type', type(config).__name__)!r}: pass a GPT-2 checkpoint "
            "(e.g. 'openai-community/gpt2') or, for BERT, use kronecker_bert_from_bert"
        )


def kngpt2_config_from_gpt2(
    config: GPT2Config,
    preset: Optional[str] = "paper",
    target_fraction: Optional[float] = None,
    normalize: bool = False,
    **overrides,
) -> KnGPT2Config:
    """The :class:`KnGPT2Config` for compressing a GPT-2 with this ``config`` (no weights needed).

    Which matrices: ``preset="paper"`` → ``wte`` plus the four maps of the odd layers;
    ``preset=None`` → ``wte`` plus the four maps of every layer. Overrides ``layers`` (layer
    indices), ``modules`` (subset of ``attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj``) and
    ``embedding`` (bool: compress ``wte``) change that selection.

    Which shapes: the preset's factor-2 split, or with ``target_fraction`` the foundation's
    ``choose_kronecker_factors(out, in, target_fraction)`` per matrix. ``rank`` (default 1)
    applies to every matrix. ``kronecker_factors`` (an explicit map, see :class:`KnGPT2Config`)
    replaces the selection and the shapes altogether.

    Head: ``tie_word_embeddings`` (default ``False``, the paper's dense untied head; ``True`` with
    a Kronecker ``wte`` gives the factored tied head).
    """
    _check_gpt2_config(config, "the given config")
    unknown = set(overrides) - set(_OVERRIDES)
    if unknown:
        raise ValueError(f"unknown override(s) {sorted(unknown)}; accepted: {', '.join(_OVERRIDES)}")
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS} or None, got {preset!r}")
    if target_fraction is not None and not 0 < target_fraction < 1:
        raise ValueError(f"target_fraction must be in (0, 1), got {target_fraction}")

    base = _gpt2_config_dict(config)
    explicit = overrides.get("kronecker_factors")
    if explicit is not None:
        clash = [k for k in ("layers", "modules", "embedding", "rank") if k in overrides]
        if clash or target_fraction is not None:
            raise ValueError(
                "kronecker_factors is a complete map: drop "
                + ", ".join(clash + (["target_fraction"] if target_fraction is not None else []))
            )
        factors = explicit
    else:
        if preset is None and target_fraction is None:
            raise ValueError("nothing to compress: pass preset='paper', target_fraction=..., or kronecker_factors=...")
        rank = overrides.get("rank", 1)
        layers = overrides.get("layers")
        if layers is None:
            layers = range(1, config.n_layer, 2) if preset == "paper" else range(config.n_layer)
        layers = check_layer_indices(layers, config.n_layer, "n_layer")
        modules = tuple(overrides.get("modules") or KNGPT2_LAYER_MODULES)
        bad = [m for m in modules if m not in KNGPT2_LAYER_MODULES]
        if bad:
            raise ValueError(f"modules {bad} are unknown; choose from {', '.join(KNGPT2_LAYER_MODULES)}")
        names = (["wte"] if overrides.get("embedding", True) else []) + [
            f"h.{i}.{m}" for i in layers for m in modules
        ]
        shape_of = KnGPT2Config(**base).module_shape
        paper = paper_kronecker_factors(config) if preset == "paper" else {}
        factors = {}
        for name in names:
            if target_fraction is not None:
                out_f, in_f = shape_of(name)
                choice = choose_kronecker_factors(out_f, in_f, target_fraction, ranks=(rank,))
                factors[name] = {"a_shape": list(choice.a_shape), "rank": rank}
            elif name in paper:
                factors[name] = {"a_shape": paper[name]["a_shape"], "rank": rank}
            else:  # preset "paper" with layers/modules outside the paper's choice: same factor-2 rule
                out_f, in_f = shape_of(name)
                factors[name] = {"a_shape": [out_f, in_f // 2], "rank": rank}
    # default head: the paper's dense untied one next to a Kronecker wte, else the teacher's tying
    tie = overrides.get("tie_word_embeddings", False if "wte" in factors else config.tie_word_embeddings)
    return KnGPT2Config(**{**base, "kronecker_factors": factors, "kronecker_normalize": normalize,
                           "tie_word_embeddings": tie})


def _teacher_class(config) -> type:
    return GPT2ForSequenceClassification if "GPT2ForSequenceClassification" in (config.architectures or []) \
        else GPT2LMHeadModel


def _load_teacher(teacher: Union[str, nn.Module]) -> GPT2LMHeadModel:
    teacher = load_teacher(teacher, _check_gpt2_config, _teacher_class)
    if isinstance(teacher, (GPT2LMHeadModel, GPT2ForSequenceClassification)):
        return teacher
    if isinstance(teacher, GPT2Model):
        with torch.device("meta"):
            wrapped = GPT2LMHeadModel(teacher.config)
        wrapped.transformer = teacher
        wrapped.lm_head.weight = teacher.wte.weight  # a bare GPT2Model's only head is its embedding
        return wrapped.train(teacher.training)
    raise ValueError(
        f"kngpt2_from_gpt2 takes a GPT2LMHeadModel, GPT2ForSequenceClassification or GPT2Model, got "
        f"{type(teacher).__name__}: pass its .transformer or the GPT2LMHeadModel checkpoint"
    )


@torch.no_grad()
def kngpt2_from_gpt2(
    teacher: Union[str, nn.Module],
    preset: Optional[str] = "paper",
    target_fraction: Optional[float] = None,
    normalize: bool = False,
    *,
    tokenizer=None,
    init: str = "svd",
    calibration_data=None,
    calibration_samples: Optional[int] = 128,
    budget: Union[int, float, None] = None,
    damping: float = 0.01,
    svd_dtype: torch.dtype = torch.float64,
    progress: bool = True,
    return_report: bool = False,
    **overrides,
):
    """Convert a GPT-2 into a :class:`KnGPT2LMHeadModel` (or, from a ``GPT2ForSequenceClassification``,
    a :class:`KnGPT2ForSequenceClassification` with the teacher's score head) initialised from the teacher.

    Args:
        teacher: a model name or local path (loaded with the class its ``config.architectures``
            names, ``GPT2LMHeadModel`` by default), or a loaded ``GPT2LMHeadModel`` /
            ``GPT2ForSequenceClassification`` / ``GPT2Model`` (not modified).
        preset: ``"paper"`` (``wte`` + odd layers at factor 2, dense untied head) or ``None``.
        target_fraction: choose every selected matrix's shape with
            ``choose_kronecker_factors(out, in, target_fraction)`` instead of the preset's.
        normalize: rescale each factor pair so that ``‖Σ A_r⊗B_r‖_F = ‖W‖_F`` (Krony-PT).
        tokenizer: optional; ``len(tokenizer)`` larger than the teacher's vocabulary is an error
            (ids would index past the embedding).
        init: ``"svd"`` (the paper's nearest Kronecker product) or ``"activation"`` (minimise each
            matrix's output error on ``calibration_data``; see :class:`~kn_transformers.KroneckerConfig`).
        calibration_data, calibration_samples, damping: as :func:`~kn_transformers.kroneckerize`.
        budget: choose every selected matrix's ``(a_shape, rank ≤ rank override)`` under a global
            parameter budget (an int: the student's total; a float: a fraction of the selected
            matrices' parameters) instead of the preset's or ``target_fraction``'s shapes.
        svd_dtype: precision of the decompositions.
        progress: show a progress bar over the layers.
        return_report: return ``(model, report)`` instead of ``model``.
        **overrides: ``kronecker_factors``, ``layers``, ``modules``, ``embedding``, ``rank``,
            ``tie_word_embeddings`` (see :func:`kngpt2_config_from_gpt2`).

    Returns:
        The student in the teacher's dtype, in eval mode if the teacher was, with the
        :class:`~kn_transformers.core.report.CompressionReport` as ``model.compression_report``
        (per module: shape, factors, parameters, relative Frobenius error; also logged at INFO).
        Kronecker matrices are the nearest-Kronecker (truncated SVD) factors of the teacher's;
        every other weight (positions, layer norms, biases, dense layers, head) is copied.

    Raises:
        ValueError: a non-GPT-2 teacher, shapes that do not divide, a tokenizer larger than the
            vocabulary, an unknown preset or override.
    """
    teacher_lm = _load_teacher(teacher)
    tconf = teacher_lm.config
    if tokenizer is not None:
        n_tok, vocab = len(tokenizer), tconf.vocab_size
        if n_tok > vocab:
            raise ValueError(
                f"the tokenizer has {n_tok} tokens but the teacher's vocabulary has {vocab} rows: "
                f"call teacher.resize_token_embeddings({n_tok}) before converting, or pass the teacher's own tokenizer"
            )
        if n_tok < vocab:
            logger.warning(f"tokenizer has {n_tok} tokens, the teacher's vocabulary {vocab} rows (padded vocabulary?)")
    if init not in ("svd", "activation"):
        raise ValueError(f"init must be 'svd' or 'activation', got {init!r}")
    # with a budget, ``rank`` is the planner's ceiling, not every split's rank (a factor-2 split holds at most 2)
    selection = {k: v for k, v in overrides.items() if budget is None or k != "rank"}
    config = kngpt2_config_from_gpt2(tconf, preset, target_fraction, normalize, **selection)
    t_model = teacher_lm.transformer
    targets = {name: t_model.get_submodule(name) for name in config.kronecker_factors or {}}
    statistics = calibrate(teacher_lm, targets, init, calibration_data, calibration_samples, progress)
    allowed = None
    if budget is not None:
        KroneckerConfig(budget=budget)  # the one validator of budget values
        untied = tconf.tie_word_embeddings and not config.tie_word_embeddings and "wte" in targets
        planned, allowed = plan_model_budget(teacher_lm, targets, budget,
                                             extra_fixed=tconf.vocab_size * tconf.n_embd if untied else 0,
                                             max_rank=overrides.get("rank", 1), damping=damping,
                                             statistics=statistics, progress=progress)
        config = kngpt2_config_from_gpt2(
            tconf, None, None, normalize, tie_word_embeddings=config.tie_word_embeddings,
            kronecker_factors={n: {"a_shape": e["a_shape"], "rank": e["rank"]} for n, e in planned.items()})
    student_cls = (KnGPT2ForSequenceClassification if isinstance(teacher_lm, GPT2ForSequenceClassification)
                   else KnGPT2LMHeadModel)
    config.architectures = [student_cls.__name__]

    with torch.device("meta"):
        student = student_cls(config)

    teacher_state = teacher_lm.state_dict()
    state: dict[str, torch.Tensor] = {}
    report = CompressionReport(budget=allowed)
    factors = config.kronecker_factors or {}

    def add_kronecker(name: str, module: nn.Module) -> None:
        spec = factors[name]
        new, rep = decompose_module(
            module, name, tuple(spec["a_shape"]), spec["rank"], normalize=normalize, svd_dtype=svd_dtype,
            init=init, statistics=statistics.get(name), damping=damping,
        )
        for key, value in new.state_dict().items():
            state[f"transformer.{name}.{key}"] = value
        report.modules.append(rep)
        logger.info(
            f"{name}: {rep.shape[0]}x{rep.shape[1]} -> A {rep.a_shape[0]}x{rep.a_shape[1]} ⊗ "
            f"B {rep.b_shape[0]}x{rep.b_shape[1]} (rank {rep.rank}), params {rep.params_before:,} -> "
            f"{rep.params_after:,}, rel. error {rep.rel_error:.4f}"
        )

    def add_dense(name: str, weight: torch.Tensor) -> None:
        report.modules.append(
            ModuleReport(name, "dense", tuple(weight.shape), None, None, 0, weight.numel(), weight.numel(), 0.0)
        )

    if "wte" in factors:
        add_kronecker("wte", t_model.wte)
    for i in logging.tqdm(range(tconf.n_layer), desc="KnGPT2 conversion (layers)", disable=not progress):
        for mod in KNGPT2_LAYER_MODULES:
            name = f"h.{i}.{mod}"
            if name in factors:
                add_kronecker(name, t_model.get_submodule(name))
            else:
                conv = t_model.get_submodule(name)
                add_dense(name, conv.weight.T)

    # every parameter not produced by a decomposition comes from the teacher, cloned
    for key in student.state_dict():
        if key in state:
            continue
        source = teacher_state[key]  # the head too: lm_head (tied or not) or the classifier's score
        if key in ("lm_head.weight", "score.weight"):
            add_dense(key.rsplit(".", 1)[0], source)
        state[key] = source.detach().clone()
    student.load_state_dict(state, strict=True, assign=True)
    student.tie_weights()
    if not teacher_lm.training:
        student.eval()
    if student.can_generate():
        student.generation_config = copy.deepcopy(teacher_lm.generation_config)

    total_up(report, teacher_lm, student, budget)
    logger.info("KnGPT2 conversion report\n" + report.to_markdown())
    student.compression_report = report
    return (student, report) if return_report else student
