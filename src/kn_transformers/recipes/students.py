"""Loading teachers and building Kronecker students for the recipes, whatever the checkpoint."""

from __future__ import annotations

from typing import Optional

from transformers import AutoConfig, PreTrainedModel

from ..loading import check_model_name_or_path

GPT2_TYPES = ("gpt2", "kngpt2")
BERT_TYPES = ("bert", "kronecker-bert")
PRESETS = {"gpt2": ("paper",), "bert": ("kroneckerbert8", "kroneckerbert21")}


def model_family(name_or_path: str) -> str:
    """``"gpt2"`` or ``"bert"`` from a checkpoint's config (dense or Kronecker)."""
    name_or_path = check_model_name_or_path(name_or_path)
    model_type = AutoConfig.from_pretrained(name_or_path, trust_remote_code=True).model_type
    if model_type in GPT2_TYPES:
        return "gpt2"
    if model_type in BERT_TYPES:
        return "bert"
    raise ValueError(f"{name_or_path} is a {model_type!r} model; the recipes take GPT-2 or BERT checkpoints "
                     "(dense teachers or KnGPT2/KroneckerBERT students)")


def load_model(name_or_path: str, head: str, **config_overrides) -> PreTrainedModel:
    """A dense teacher or Kronecker student with ``head`` in (``"sequence-classification"``, ``"causal-lm"``,
    ``"masked-lm"``, ``"question-answering"``, ``"base"``); Kronecker classes come from ``import kn_transformers``."""
    import kn_transformers  # noqa: F401  (registers the Kronecker models with the Auto classes)
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoModelForQuestionAnswering,
        AutoModelForSequenceClassification,
    )

    auto = {"sequence-classification": AutoModelForSequenceClassification, "causal-lm": AutoModelForCausalLM,
            "masked-lm": AutoModelForMaskedLM, "question-answering": AutoModelForQuestionAnswering,
            "base": AutoModel}[head]
    return auto.from_pretrained(check_model_name_or_path(name_or_path), **config_overrides)


def convert_to_student(
    teacher: PreTrainedModel, preset: Optional[str], target_fraction: Optional[float], head: str, **config_overrides
) -> PreTrainedModel:
    """The Kronecker student of a loaded dense ``teacher`` (factors from its weights, the rest copied).

    GPT-2 teachers give a ``KnGPT2LMHeadModel`` (``head="causal-lm"``) or, from a
    ``GPT2ForSequenceClassification``, a ``KnGPT2ForSequenceClassification`` with its score head.
    """
    family = "gpt2" if teacher.config.model_type in GPT2_TYPES else "bert"
    if preset is not None and preset not in PRESETS[family]:
        raise ValueError(f"preset {preset!r} is not for {family} teachers; use one of {PRESETS[family]}")
    if preset is None and target_fraction is None:
        preset = PRESETS[family][0]
    if family == "bert":
        from ..convert_bert import kronecker_bert_from_bert

        bert_head = {"sequence-classification": "sequence-classification", "masked-lm": "masked-lm",
                     "base": "base"}.get(head)
        if bert_head is None:
            raise ValueError(f"BERT students have no {head!r} head")
        return kronecker_bert_from_bert(teacher, preset=preset, target_fraction=target_fraction, head=bert_head,
                                        **config_overrides)
    from ..convert_gpt2 import kngpt2_from_gpt2

    if head not in ("causal-lm", "sequence-classification"):
        raise ValueError(f"GPT-2 students have no {head!r} head")
    is_classifier = hasattr(teacher, "score")
    if (head == "sequence-classification") != is_classifier:
        raise ValueError(f"a {head} student needs a teacher with that head, got a {type(teacher).__name__}; "
                         f"load the teacher with load_model(..., {head!r})")
    return kngpt2_from_gpt2(teacher, preset=preset, target_fraction=target_fraction, **config_overrides)
