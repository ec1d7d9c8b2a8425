"""Loading teachers and building Kronecker students for the recipes, whatever the checkpoint."""

from __future__ import annotations

from typing import Optional

from transformers import AutoConfig, PreTrainedModel

from ..models.architectures import PAPER_FAMILY, PAPER_PRESETS
from ..models.loading import check_model_name_or_path

def model_family(name_or_path: str) -> str:
    """``"gpt2"`` or ``"bert"``: the paper family whose presets a checkpoint takes (dense or
    Kronecker; RoBERTa, XLM-R and ELECTRA take BERT's), from ``architectures.PAPER_FAMILY``."""
    name_or_path = check_model_name_or_path(name_or_path)
    model_type = AutoConfig.from_pretrained(name_or_path, trust_remote_code=True).model_type
    if model_type in PAPER_FAMILY:
        return PAPER_FAMILY[model_type]
    raise ValueError(f"{name_or_path} is a {model_type!r} model; the paper presets take "
                     f"{', '.join(sorted(PAPER_FAMILY))} checkpoints")


def load_model(name_or_path: str, head: str, **config_overrides) -> PreTrainedModel:
    """A dense teacher or Kronecker student with ``head`` in (``"sequence-classification"``, ``"causal-lm"``,
    ``"masked-lm"``, ``"question-answering"``, ``"base"``); Kronecker classes come from ``import kn_transformers``."""
    import kn_transformers  # noqa: F401 (registers the Kronecker models with the Auto classes)
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
    model_type = teacher.config.model_type
    if model_type not in PAPER_FAMILY:
        raise ValueError(f"a {model_type!r} teacher takes no paper preset; compress it with kroneckerize "
                         "(or `kn-transformers compress --fraction ...`)")
    family = PAPER_FAMILY[model_type]
    if preset is not None and preset not in PAPER_PRESETS[family]:
        raise ValueError(f"preset {preset!r} is not for {family} teachers; use one of {PAPER_PRESETS[family]}")
    if preset is None and target_fraction is None:
        preset = PAPER_PRESETS[family][0]
    if family == "bert":
        from ..models.kronecker_bert.convert_bert import kronecker_bert_from_bert

        if head not in ("sequence-classification", "masked-lm", "base"):
            raise ValueError(f"BERT students have no {head!r} head")
        # a BERT-shaped encoder (RoBERTa...) keeps its own class, so its head is the teacher's
        return kronecker_bert_from_bert(teacher, preset=preset, target_fraction=target_fraction,
                                        head=head if model_type == "bert" else None, **config_overrides)
    from ..models.kngpt2.convert_gpt2 import kngpt2_from_gpt2

    if head not in ("causal-lm", "sequence-classification"):
        raise ValueError(f"GPT-2 students have no {head!r} head")
    is_classifier = hasattr(teacher, "score")
    if (head == "sequence-classification") != is_classifier:
        raise ValueError(f"a {head} student needs a teacher with that head, got a {type(teacher).__name__}; "
                         f"load the teacher with load_model(..., {head!r})")
    return kngpt2_from_gpt2(teacher, preset=preset, target_fraction=target_fraction, **config_overrides)


INITS = ("svd", "activation")


def check_init(init: str, allowed=INITS) -> None:
    if init not in allowed:
        raise ValueError(f"--init must be one of {', '.join(map(repr, allowed))}, got {init!r}")


def calibration_kwargs(init: str, rows, samples: int, collate) -> dict:
    """The converter's keyword arguments for ``init``: none for ``"svd"``; for ``"activation"``
    the model inputs of the first ``samples`` of ``rows`` (a tokenised ``datasets.Dataset`` or a
    list of feature dicts; training data only, never the evaluation text) as one batch made by
    ``collate``."""
    check_init(init)
    if init == "svd":
        return {}
    if rows is None or len(rows) == 0:
        raise ValueError("--init activation calibrates on training rows, but there are none")
    picked = rows.select(range(min(samples, len(rows)))) if hasattr(rows, "select") else rows[:samples]
    keys = ("input_ids", "attention_mask", "token_type_ids")
    return dict(init="activation", calibration_samples=None,
                calibration_data=collate([{k: r[k] for k in keys if k in r} for r in picked]))
