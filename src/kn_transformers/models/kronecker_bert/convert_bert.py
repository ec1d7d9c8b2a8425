"""BERT → KroneckerBERT: presets (the paper's Table 1, scaled to any width) and the conversion.

``kronecker_bert_from_bert(teacher, preset="kroneckerbert8")`` takes a BERT checkpoint (name,
path or loaded model, base model or head), builds the KroneckerBERT of the matching head,
initialises each compressed matrix with its nearest Kronecker product (truncated SVD of the
rearranged weight, Van Loan–Pitsianis) and copies everything else — position and token-type
embeddings, LayerNorms, biases, pooler, head — unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass
from typing import Optional, Union

import torch
import transformers
from tqdm.auto import tqdm
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertModel,
    PreTrainedConfig,
    PreTrainedModel,
)

from ..architectures import BERT_LAYOUT, PAPER_PRESETS
from .configuration_kronecker_bert import LAYER_MODULES, WORD_EMBEDDINGS, KroneckerBertConfig
from ...core.config import KroneckerConfig
from ...core.kroneckerize import _base_prefix, calibrate, decompose_module, kroneckerize, plan_model_budget, total_up
from ...core.report import CompressionReport, check_layer_indices
from ...core.dispatch import replace_module
from ...core.factor_search import choose_embedding_factors, choose_kronecker_factors
from ..loading import load_teacher
from .modeling_kronecker_bert import (
    KroneckerBertForMaskedLM,
    KroneckerBertForQuestionAnswering,
    KroneckerBertForSequenceClassification,
    KroneckerBertModel,
)

logger = logging.getLogger(__name__)

__all__ = ["KroneckerBertPreset", "PRESETS", "HEADS", "kronecker_bert_config", "kronecker_bert_from_bert"]

ATTENTION_MODULES = LAYER_MODULES[:4]  # Q, K, V (heads concatenated) and the attention output


@dataclass(frozen=True)
class KroneckerBertPreset:
    """A KroneckerBERT configuration in closed form, valid at any width.

    For hidden size ``d``, FFN size ``F`` and vocabulary ``V`` (weights ``out × in``):

    - Q, K, V and attention output (``d × d``): ``B`` is ``attention_b_shape`` ``(b1, b2)``,
      so ``A`` is ``(d/b1) × (d/b2)`` — the paper's 384×384 on BERT-base for ``B`` 2×2;
    - FFN in ``W1`` (``F × d``): ``A`` is ``ffn_in_a_shape``, ``B`` is ``(F/a1) × (d/a2)``;
    - FFN out ``W2`` (``d × F``): ``A`` is ``ffn_out_a_shape``, ``B`` is ``(d/a1) × (F/a2)``;
    - word embedding (``V × d``): ``A`` is ``V × (d/n)``, ``B`` is ``1 × n`` with ``n = embedding_n``;
    - every sum has ``rank`` terms; position/token-type embeddings, LayerNorms, biases, pooler
      and heads stay dense.

    Keeping ``B`` of the attention, ``A`` of the FFN and ``n`` fixed keeps every matrix's
    compression ratio the same at every width, which is how the presets "scale to the teacher".
    """

    name: str
    attention_b_shape: tuple[int, int]
    ffn_in_a_shape: tuple[int, int]
    ffn_out_a_shape: tuple[int, int]
    embedding_n: int
    rank: int = 1
    paper: str = ""

    def factors(self, config: PreTrainedConfig, layers=None) -> dict:
        """The ``kronecker_factors`` map for a BERT config; ``ValueError`` (one line, naming the
        preset field and what to change) when a shape does not divide the teacher's sizes."""
        d, f, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
        b1, b2 = self.attention_b_shape
        self._check(d % b1 == 0 and d % b2 == 0, "attention_b_shape", self.attention_b_shape,
                    f"both divide hidden_size={d}")
        a1, a2 = self.ffn_in_a_shape
        self._check(f % a1 == 0 and d % a2 == 0, "ffn_in_a_shape", self.ffn_in_a_shape,
                    f"m1 divide intermediate_size={f} and n1 divide hidden_size={d}")
        c1, c2 = self.ffn_out_a_shape
        self._check(d % c1 == 0 and f % c2 == 0, "ffn_out_a_shape", self.ffn_out_a_shape,
                    f"m1 divide hidden_size={d} and n1 divide intermediate_size={f}")
        self._check(d % self.embedding_n == 0, "embedding_n", self.embedding_n, f"it divide hidden_size={d}")
        r = self.rank
        factors = {WORD_EMBEDDINGS: {"a_shape": [config.vocab_size, d // self.embedding_n], "rank": r}}
        for i in range(L) if layers is None else layers:
            for m in ATTENTION_MODULES:
                factors[f"encoder.layer.{i}.{m}"] = {"a_shape": [d // b1, d // b2], "rank": r}
            factors[f"encoder.layer.{i}.intermediate.dense"] = {"a_shape": [a1, a2], "rank": r}
            factors[f"encoder.layer.{i}.output.dense"] = {"a_shape": [c1, c2], "rank": r}
        return factors

    def _check(self, ok: bool, field: str, value, need: str) -> None:
        if not ok:
            raise ValueError(
                f"preset {self.name!r}: {field}={value!r} does not fit this teacher (need {need}); "
                f"pass another {field}=..., another preset ({', '.join(map(repr, PRESETS))}) or target_fraction=..."
            )

    def num_parameters(self, config: PreTrainedConfig, pooler: bool = True) -> int:
        """Closed-form parameter count of the ``KroneckerBertModel`` this preset gives (all layers)."""
        d, f, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
        r, n = self.rank, self.embedding_n
        (b1, b2), (a1, a2), (c1, c2) = self.attention_b_shape, self.ffn_in_a_shape, self.ffn_out_a_shape
        embeddings = r * (V * d // n + n) + (config.max_position_embeddings + config.type_vocab_size) * d + 2 * d
        attention = 4 * r * (d * d // (b1 * b2) + b1 * b2) + 4 * d
        ffn = r * (a1 * a2 + f * d // (a1 * a2)) + f + r * (c1 * c2 + d * f // (c1 * c2)) + d
        layer = attention + ffn + 2 * 2 * d  # + two LayerNorms
        return embeddings + L * layer + (d * d + d if pooler else 0)

    def describe(self) -> str:
        """One line in closed form, for reports and model cards."""
        (b1, b2), (a1, a2), (c1, c2) = self.attention_b_shape, self.ffn_in_a_shape, self.ffn_out_a_shape
        return (
            f"{self.name}: Q/K/V/attention-output A (d/{b1})x(d/{b2}), B {b1}x{b2}; FFN W1 A {a1}x{a2}, "
            f"B (F/{a1})x(d/{a2}); FFN W2 A {c1}x{c2}, B (d/{c1})x(F/{c2}); word embedding A Vx(d/{self.embedding_n}), "
            f"B 1x{self.embedding_n}; rank {self.rank}. {self.paper}"
        ).strip()


#: The paper's Table 1 configurations (Tahaei et al., 2022), in closed form. The table gives the
#: FFN's W1 split only; W2 (``d × F``, the transpose shape) uses the transposed ``A`` so that its
#: ``B`` is ``W1``'s transposed (384×384 on BERT-base), which gives the paper's sizes.
PRESETS: dict[str, KroneckerBertPreset] = {
    "kroneckerbert8": KroneckerBertPreset(
        "kroneckerbert8", attention_b_shape=(2, 2), ffn_in_a_shape=(8, 2), ffn_out_a_shape=(2, 8), embedding_n=8,
        paper="Paper (BERT-base): MHA A 384x384, FFN W1 A 8x2, embedding n=8; 14.3M parameters, 7.7x.",
    ),
    "kroneckerbert21": KroneckerBertPreset(
        "kroneckerbert21", attention_b_shape=(2, 16), ffn_in_a_shape=(16, 2), ffn_out_a_shape=(2, 16), embedding_n=16,
        paper="Paper (BERT-base): MHA A 384x48, FFN W1 A 16x2, embedding n=16; 5.2M parameters, 21x.",
    ),
}

#: ``head`` names → (BERT teacher class, KroneckerBERT class).
assert tuple(PRESETS) == PAPER_PRESETS["bert"], "architectures.PAPER_PRESETS names the presets defined here"

HEADS = {
    "base": (BertModel, KroneckerBertModel),
    "sequence-classification": (BertForSequenceClassification, KroneckerBertForSequenceClassification),
    "masked-lm": (BertForMaskedLM, KroneckerBertForMaskedLM),
    "question-answering": (BertForQuestionAnswering, KroneckerBertForQuestionAnswering),
}

_PRESET_FIELDS = ("attention_b_shape", "ffn_in_a_shape", "ffn_out_a_shape", "embedding_n", "rank")
# Shapes are the teacher's: these config fields cannot be overridden.
_ARCHITECTURE_FIELDS = {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "max_position_embeddings", "type_vocab_size", "hidden_act", "layer_norm_eps", "is_decoder",
    "add_cross_attention", "kronecker_factors", "kronecker_preset",
}


def _embedding_factors(config, target_fraction: float, rank: int) -> dict:
    """The paper's embedding split ``A: V × d/n, B: 1 × n`` (see :func:`choose_embedding_factors`)."""
    a_shape = choose_embedding_factors(config.vocab_size, config.hidden_size, target_fraction, rank)
    return {"a_shape": list(a_shape), "rank": rank}


def _target_fraction_factors(config, target_fraction: float, rank: int, layers) -> dict:
    """Per matrix, :func:`choose_kronecker_factors` (most parameters within the budget)."""
    d, f = config.hidden_size, config.intermediate_size
    shapes = {m: (d, d) for m in ATTENTION_MODULES}
    shapes.update({"intermediate.dense": (f, d), "output.dense": (d, f)})
    picks = {m: choose_kronecker_factors(o, i, target_fraction, ranks=(rank,)) for m, (o, i) in shapes.items()}
    factors = {WORD_EMBEDDINGS: _embedding_factors(config, target_fraction, rank)}
    for i in layers:
        for m, c in picks.items():
            factors[f"encoder.layer.{i}.{m}"] = {"a_shape": list(c.a_shape), "rank": c.rank}
    return factors


def kronecker_bert_config(
    bert_config: PreTrainedConfig,
    preset: Optional[str] = "kroneckerbert8",
    target_fraction: Optional[float] = None,
    **overrides,
) -> KroneckerBertConfig:
    """The :class:`KroneckerBertConfig` that :func:`kronecker_bert_from_bert` would build (no weights).

    Args:
        bert_config: the teacher's ``BertConfig`` (e.g. ``BertConfig()`` for BERT-base shapes).
        preset: a key of :data:`PRESETS`; ignored when ``target_fraction`` is given.
        target_fraction: instead of a preset, every compressed matrix gets the Kronecker split with
            the most parameters not above this fraction of its dense parameters.
        **overrides:
            ``attention_b_shape``, ``ffn_in_a_shape``, ``ffn_out_a_shape``, ``embedding_n`` — replace
            the preset's value; ``rank`` — terms per sum (presets and target fraction);
            ``layers`` — iterable of the encoder layers to compress (default all);
            ``kronecker_factors`` — per-module entries merged last (``None`` keeps a module dense);
            any other ``BertConfig`` field that does not change shapes (``num_labels``,
            ``hidden_dropout_prob``, ``id2label``, …).
    """
    if getattr(bert_config, "model_type", None) != "bert":
        raise ValueError(_not_bert_message(getattr(bert_config, "model_type", type(bert_config).__name__), "config"))
    overrides = dict(overrides)
    preset_overrides = {k: overrides.pop(k) for k in _PRESET_FIELDS if k in overrides}
    layers = overrides.pop("layers", None)
    n_layers = bert_config.num_hidden_layers
    layers = list(range(n_layers)) if layers is None else check_layer_indices(layers, n_layers, "num_hidden_layers")
    extra = overrides.pop("kronecker_factors", None) or {}
    bad = sorted(k for k in overrides if k in _ARCHITECTURE_FIELDS or not _is_config_field(k))
    if bad:
        raise ValueError(
            f"unknown or shape-changing override(s) {bad}; valid: {', '.join(_PRESET_FIELDS)}, layers, "
            f"kronecker_factors, or a BertConfig field that keeps the teacher's shapes (e.g. num_labels)"
        )
    rank = preset_overrides.get("rank", 1)
    if target_fraction is not None:
        shape_fields = sorted(set(preset_overrides) - {"rank"})
        if shape_fields:
            raise ValueError(
                f"{shape_fields} apply to presets; with target_fraction pass only rank or kronecker_factors"
            )
        if not 0 < target_fraction < 1:
            raise ValueError(f"target_fraction must be in (0, 1), got {target_fraction}")
        factors, preset_name = _target_fraction_factors(bert_config, target_fraction, rank, layers), None
    elif preset is not None:
        if preset not in PRESETS:
            raise ValueError(
                f"unknown preset {preset!r}; valid presets: {', '.join(map(repr, PRESETS))} "
                f"(or pass target_fraction=... or kronecker_factors=...)"
            )
        spec = dataclasses.replace(PRESETS[preset], **{k: _as_shape(v) for k, v in preset_overrides.items()})
        factors, preset_name = spec.factors(bert_config, layers), preset
    else:
        factors, preset_name = {}, None
    for name, spec in extra.items():
        if spec is None:
            factors.pop(name, None)
        else:
            factors[name] = spec
    if not factors:
        raise ValueError("nothing to compress: pass a preset, target_fraction or kronecker_factors")
    values = bert_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "_name_or_path", "auto_map"):
        values.pop(key, None)
    if "num_labels" in overrides and "id2label" not in overrides:  # a new head size: default label names
        values.pop("id2label", None), values.pop("label2id", None)
    values.update(overrides)
    return KroneckerBertConfig(**values, kronecker_factors=factors, kronecker_preset=preset_name)


def _is_config_field(key: str) -> bool:
    """A dataclass field of the config, or a settable property of it (``num_labels``)."""
    fields = KroneckerBertConfig.__dataclass_fields__
    return key in fields or isinstance(getattr(KroneckerBertConfig, key, None), property)


def _as_shape(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _not_bert_message(model_type, what) -> str:
    return (
        f"kronecker_bert_from_bert needs a BERT teacher (model_type 'bert', or a BERT-shaped encoder: "
        f"{', '.join(BERT_LAYOUT)}), got {what} of model_type {model_type!r}; pass such a checkpoint "
        f"(for GPT-2 use kngpt2_from_gpt2, for any other architecture kroneckerize)"
    )


_TEACHER_ARCHITECTURES = {cls.__name__: cls for cls, _ in HEADS.values()}


def _check_bert_config(config, what: str) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type != "bert" and model_type not in BERT_LAYOUT:
        raise ValueError(_not_bert_message(model_type, what))


def _teacher_class(config) -> type:
    """BERT: the head class ``config.architectures`` names where KroneckerBERT has it (else
    ``BertModel``); a BERT-shaped encoder: its own class (``AutoModel`` when none is named)."""
    arch = (getattr(config, "architectures", None) or [None])[0]
    if config.model_type == "bert":
        return _TEACHER_ARCHITECTURES.get(arch, BertModel)
    return getattr(transformers, arch or "", transformers.AutoModel)


def _load_teacher(teacher) -> PreTrainedModel:
    return load_teacher(teacher, _check_bert_config, _teacher_class)


def _from_bert_layout(teacher: PreTrainedModel, preset, target_fraction, normalize, head, progress, svd_dtype,
                      num_threads, overrides, calibration) -> PreTrainedModel:
    """A RoBERTa/ELECTRA-shaped teacher: the preset's factor map, translated to the teacher's module
    names, applied by ``kroneckerize`` (the student keeps the teacher's class and loads with
    ``AutoModel*.from_pretrained``)."""
    model_type = teacher.config.model_type
    if head is not None:
        raise ValueError(f"head= applies to BERT teachers; a {model_type} student keeps the teacher's class "
                         f"({type(teacher).__name__}): load the teacher with the head you want")
    unsupported = sorted(set(overrides) - {*_PRESET_FIELDS, "layers", "kronecker_factors"})
    if unsupported:
        raise ValueError(f"{unsupported} do not apply to a {model_type} teacher; valid: "
                         f"{', '.join(_PRESET_FIELDS)}, layers, kronecker_factors")
    c = teacher.config
    width = getattr(c, "embedding_size", None) or c.hidden_size
    shapes = BertConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                        num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size)
    factors = kronecker_bert_config(shapes, preset, target_fraction, **overrides).kronecker_factors
    if WORD_EMBEDDINGS in factors and width != c.hidden_size:  # ELECTRA: embeddings narrower than the encoder
        rank = factors[WORD_EMBEDDINGS]["rank"]
        if target_fraction is not None:
            a_shape = list(choose_embedding_factors(c.vocab_size, width, target_fraction, rank))
        else:
            n = overrides.get("embedding_n", PRESETS[preset].embedding_n)
            if width % n:
                raise ValueError(f"preset {preset!r}: embedding_n={n} does not divide embedding_size={width}; "
                                 "pass another embedding_n=... or target_fraction=...")
            a_shape = [c.vocab_size, width // n]
        factors[WORD_EMBEDDINGS] = {"a_shape": a_shape, "rank": rank}
    prefix = _base_prefix(teacher)
    full = {name: f"{prefix}.{name}" if prefix else name for name in factors}
    budget = calibration["budget"]
    shapes = {} if budget is not None else {
        "shape_pattern": {re.escape(full[n]): spec["a_shape"] for n, spec in factors.items()},
        "rank_pattern": {re.escape(full[n]): spec["rank"] for n, spec in factors.items()}}
    config = KroneckerConfig(
        target_modules=[full[n] for n in factors if n != WORD_EMBEDDINGS] or None,
        embedding=WORD_EMBEDDINGS in factors, normalize=normalize, init=calibration["init"],
        damping=calibration["damping"], budget=budget, rank=overrides.get("rank", 1), **shapes)
    return kroneckerize(teacher, config, calibration_data=calibration["calibration_data"],
                        calibration_samples=calibration["calibration_samples"], progress=progress,
                        svd_dtype=svd_dtype, num_threads=num_threads)


def _resolve_head(teacher: PreTrainedModel, head) -> str:
    if head is None:
        for name, (bert_cls, _) in HEADS.items():
            if isinstance(teacher, bert_cls):
                return name
        raise ValueError(
            f"{type(teacher).__name__} has no KroneckerBERT counterpart; "
            f"pass head= one of {', '.join(map(repr, HEADS))} "
            f"(its weights are then copied where they match, the rest initialised)"
        )
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; valid heads: {', '.join(map(repr, HEADS))}")
    return head


@torch.no_grad()
def kronecker_bert_from_bert(
    teacher: Union[str, os.PathLike, PreTrainedModel],
    preset: Optional[str] = "kroneckerbert8",
    target_fraction: Optional[float] = None,
    normalize: bool = False,
    head: Optional[str] = None,
    *,
    return_report: bool = False,
    init: str = "svd",
    calibration_data=None,
    calibration_samples: Optional[int] = 128,
    budget: Union[int, float, None] = None,
    damping: float = 0.01,
    progress: bool = True,
    svd_dtype: torch.dtype = torch.float64,
    num_threads: Optional[int] = 1,
    **overrides,
):
    """Build a KroneckerBERT from a BERT teacher, initialised with nearest Kronecker products.

    Args:
        teacher: a Hub name or local path of a BERT checkpoint, or a loaded ``BertModel`` /
            ``BertForSequenceClassification`` / ``BertForMaskedLM`` / ``BertForQuestionAnswering``.
            Names and paths load with the class in ``config.architectures`` (else ``BertModel``);
            set ``HF_HUB_OFFLINE=1`` to stay offline. A BERT-shaped encoder (``architectures.BERT_LAYOUT``:
            RoBERTa, XLM-R, ELECTRA) gets the same preset factors through :func:`kroneckerize` and keeps
            its own class (``head``, pooler and config overrides do not apply; it loads with
            ``AutoModel*.from_pretrained`` where ``kn_transformers`` is imported).
        preset: ``"kroneckerbert8"`` or ``"kroneckerbert21"`` (:data:`PRESETS`), scaled to the teacher's width.
        target_fraction: instead of the preset, every matrix keeps at most this fraction of its
            parameters (:func:`choose_kronecker_factors`; embedding ``V × d/n`` with the smallest fitting ``n``).
        normalize: rescale each product to the dense weight's Frobenius norm (Krony-PT's
            adaptive normalisation) instead of the plain SVD truncation.
        head: ``None`` follows the teacher (``BertModel`` → :class:`KroneckerBertModel`,
            ``BertForSequenceClassification`` → :class:`KroneckerBertForSequenceClassification`, …);
            or one of :data:`HEADS` (weights the teacher lacks are initialised, with a warning).
        return_report: also return the :class:`CompressionReport`.
        init: ``"svd"`` (the paper's nearest Kronecker product) or ``"activation"`` (minimise each
            matrix's output error on ``calibration_data``; see :class:`~kn_transformers.KroneckerConfig`).
        calibration_data, calibration_samples, damping: as :func:`~kn_transformers.kroneckerize`.
        budget: choose every selected matrix's ``(a_shape, rank ≤ rank override)`` under a global
            parameter budget (an int: the student's total; a float: a fraction of the selected
            matrices' parameters) instead of the preset's or ``target_fraction``'s shapes.
        progress: show a tqdm bar over the encoder layers.
        svd_dtype: precision of the decompositions.
        num_threads: torch threads during the decompositions (restored afterwards); ``None`` keeps
            the current setting. One thread is as fast on these tall, thin SVDs when the machine is
            idle and up to 10x faster when other processes share its cores (threaded LAPACK stalls).
        **overrides: as :func:`kronecker_bert_config` (``rank``, ``layers``, ``kronecker_factors``,
            preset shape fields, non-shape config fields such as ``num_labels``).

    Returns:
        The student (in the teacher's dtype and device, in eval mode if the teacher was, with the
        teacher's attention implementation when that is ``"eager"`` or ``"sdpa"``), or
        ``(student, report)`` with ``return_report=True``. The report — one :class:`ModuleReport`
        per decomposed matrix (shapes, parameters, relative Frobenius error) and the totals of
        teacher and student, all parameters counted — is also logged (INFO, markdown) and kept
        as ``student.compression_report``.

    Raises:
        ValueError: a non-BERT teacher (e.g. GPT-2), an unknown preset or head, shapes that do not
            divide the teacher's sizes, or unknown overrides — each one line saying what to change.
    """
    if preset is not None and target_fraction is None and preset not in PRESETS:
        raise ValueError(
            f"unknown preset {preset!r}; valid presets: {', '.join(map(repr, PRESETS))} "
            f"(or pass target_fraction=... or kronecker_factors=...)"
        )
    if init not in ("svd", "activation"):
        raise ValueError(f"init must be 'svd' or 'activation', got {init!r}")
    if budget is not None:
        KroneckerConfig(budget=budget)  # the one validator of budget values
    calibration = {"init": init, "calibration_data": calibration_data, "calibration_samples": calibration_samples,
                   "budget": budget, "damping": damping}
    teacher = _load_teacher(teacher)
    if teacher.config.model_type != "bert":
        student = _from_bert_layout(teacher, preset, target_fraction, normalize, head, progress, svd_dtype,
                                    num_threads, overrides, calibration)
        return (student, student.compression_report) if return_report else student
    head = _resolve_head(teacher, head)
    # with a budget, ``rank`` is the planner's ceiling, not every split's rank (a 2x2 B holds at most 4)
    selection = {k: v for k, v in overrides.items() if budget is None or k != "rank"}
    config = kronecker_bert_config(teacher.config, preset, target_fraction, **selection)
    t_base = teacher.base_model
    targets = {name: t_base.get_submodule(name) for name in config.kronecker_factors}
    statistics = calibrate(teacher, targets, init, calibration_data, calibration_samples, progress)
    allowed = None
    if budget is not None:
        planned, allowed = plan_model_budget(teacher, targets, budget, max_rank=overrides.get("rank", 1),
                                             damping=damping, statistics=statistics, progress=progress)
        config = kronecker_bert_config(teacher.config, preset, target_fraction, **{
            **selection, "kronecker_factors": {n: {"a_shape": e["a_shape"], "rank": e["rank"]}
                                               for n, e in planned.items()}})
    student_cls = HEADS[head][1]
    ref = next(teacher.parameters())
    student = student_cls(config).to(device=ref.device, dtype=ref.dtype)
    if teacher.config._attn_implementation in ("eager", "sdpa"):
        student.set_attn_implementation(teacher.config._attn_implementation)

    s_base = student.base_model
    report = CompressionReport(budget=allowed)
    done = set()  # student state-dict keys written by a decomposition

    def convert(name):
        a_shape, rank = config.kronecker_spec(name)
        dense = t_base.get_submodule(name)
        new, module_report = decompose_module(dense, name, a_shape, rank=rank, normalize=normalize, svd_dtype=svd_dtype,
                                              init=init, statistics=statistics.get(name), damping=damping)
        replace_module(s_base, name, new)
        report.modules.append(module_report)
        done.update(f"{name}.{k}" for k in new.state_dict())

    threads = torch.get_num_threads()
    try:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        if WORD_EMBEDDINGS in config.kronecker_factors:
            convert(WORD_EMBEDDINGS)
        for i in tqdm(range(config.num_hidden_layers), desc="KroneckerBERT layers", disable=not progress):
            for m in LAYER_MODULES:
                name = f"encoder.layer.{i}.{m}"
                if name in config.kronecker_factors:
                    convert(name)
    finally:
        torch.set_num_threads(threads)

    student.tie_weights()  # a factored MLM decoder reads the new word embedding
    # Everything else is copied: the base model by name, the head where the teacher has the same one.
    initialised = []
    t_state = t_base.state_dict()
    for key, value in s_base.state_dict().items():
        if key in done:
            continue
        if key in t_state and t_state[key].shape == value.shape:
            value.copy_(t_state[key])
        else:
            initialised.append(key)
    if student is not s_base:
        prefix = student.base_model_prefix + "."
        t_full = teacher.state_dict() if not isinstance(teacher, BertModel) else {}
        for key, value in student.state_dict().items():
            if key.startswith(prefix):
                continue
            if key in t_full and t_full[key].shape == value.shape:
                value.copy_(t_full[key])
            else:
                initialised.append(key)
    if initialised:
        if isinstance(teacher, HEADS[head][0]):  # same head: every weight must have come from the teacher
            raise RuntimeError(f"teacher weights not found for {initialised}; the conversion does not cover this model")
        logger.warning(
            "kronecker_bert_from_bert: the teacher has no weights for %s; they keep their random init", initialised
        )

    student.train(teacher.training)
    total_up(report, teacher, student, budget)
    logger.info("KroneckerBERT conversion (%s):\n%s", config.kronecker_preset or "custom", report.to_markdown())
    student.compression_report = report
    return (student, report) if return_report else student
