"""Model cards for Kronecker students: compression, recipe and ``model-index`` eval results."""

from __future__ import annotations

import os
from importlib import resources
from typing import Optional

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .core.report import CompressionReport, count_parameters
from .core.config import is_kroneckerized

_TEMPLATES = {"kngpt2": "kngpt2.md", "kronecker-bert": "kronecker_bert.md"}
# metric name -> (Hub metric type, pretty name)
_METRICS = {
    "accuracy": ("accuracy", "Accuracy"),
    "f1": ("f1", "F1"),
    "matthews_correlation": ("matthews_correlation", "Matthews correlation"),
    "pearson": ("pearsonr", "Pearson correlation"),
    "spearmanr": ("spearmanr", "Spearman correlation"),
    "perplexity": ("perplexity", "Perplexity"),
}


def _template(model_type: str, kroneckerized: bool = False) -> str:
    """The Kronecker model's template; any architecture compressed by ``kroneckerize`` gets the
    ``kroneckerized`` one (it says what to install); dense models (a fine-tuned teacher) a generic one."""
    name = "kroneckerized.md" if kroneckerized else _TEMPLATES.get(model_type, "generic.md")
    return resources.files("kn_transformers.model_cards").joinpath(name).read_text()


def _pipeline_tag(model) -> str:
    name = type(model).__name__
    for key, tag in (("CausalLM", "text-generation"), ("LMHead", "text-generation"), ("MaskedLM", "fill-mask"),
                     ("QuestionAnswering", "question-answering"), ("TokenClassification", "token-classification"),
                     ("SequenceClassification", "text-classification")):
        if key in name:
            return tag
    return "feature-extraction"


def eval_results_from_metrics(
    metrics: dict[str, float], task: Optional[str], dataset_name: str, dataset_type: str,
    dataset_config: Optional[str] = None, dataset_split: str = "validation",
) -> list[EvalResult]:
    """``EvalResult`` entries for the recognised metrics in ``metrics`` (``eval_`` prefixes are dropped)."""
    results = []
    task_type = "text-generation" if task in (None, "lm", "perplexity") else "text-classification"
    for key, value in metrics.items():
        name = key[len("eval_"):] if key.startswith("eval_") else key
        if name not in _METRICS:
            continue
        mtype, pretty = _METRICS[name]
        results.append(EvalResult(
            task_type=task_type, dataset_type=dataset_type, dataset_name=dataset_name, dataset_config=dataset_config,
            dataset_split=dataset_split, metric_type=mtype, metric_name=pretty, metric_value=float(value),
        ))
    return results


def create_model_card(
    model,
    base_model: Optional[str] = None,
    eval_metrics: Optional[dict[str, float]] = None,
    task: Optional[str] = None,
    dataset_name: Optional[str] = None,
    dataset_type: Optional[str] = None,
    dataset_config: Optional[str] = None,
    training: Optional[str] = None,
    report: Optional[CompressionReport] = None,
    teacher_parameters: Optional[int] = None,
    model_name: Optional[str] = None,
    repo_id: Optional[str] = None,
) -> ModelCard:
    """A card for a KnGPT2 or KroneckerBERT student (or, with a generic template, a dense model).

    Args:
        model: the student (its config says which modules are Kronecker).
        base_model: the teacher's Hub id or path (``base_model`` metadata).
        eval_metrics: e.g. ``{"eval_accuracy": 0.91}``; recognised metrics become ``model-index`` results.
        task, dataset_name, dataset_type, dataset_config: where the metrics come from
            (e.g. ``"sst2"``, ``"GLUE SST2"``, ``"glue"``, ``"sst2"``).
        training: a sentence or two on the recipe (stages, losses, data, steps).
        report: the conversion's :class:`CompressionReport` (per-module table).
        teacher_parameters: for the compression ratio when ``report`` is absent.
    """
    model_type = model.config.model_type
    n_params = count_parameters(model)
    teacher_n = teacher_parameters or (report.total_params_before if report else None)
    name = model_name or repo_id or f"{model_type}-student"
    results = []
    if eval_metrics:
        results = eval_results_from_metrics(eval_metrics, task, dataset_name or (task or "unknown"),
                                            dataset_type or (task or "unknown"), dataset_config)
    base = base_model if base_model and not os.path.isdir(str(base_model)) else None
    card_data = ModelCardData(
        library_name="transformers",
        base_model=base,
        tags=["kn-transformers", "kronecker", "knowledge-distillation", "model-compression", model_type],
        model_name=name,
        eval_results=results or None,
        pipeline_tag=_pipeline_tag(model),
    )
    ratio = f", {teacher_n / n_params:.2f}x fewer than the teacher's {teacher_n:,}" if teacher_n else ""
    quantization = getattr(model.config, "quantization_config", None)
    kroneckerized = is_kroneckerized(model)
    kron_modules = sorted(getattr(model.config, "kronecker_factors", {}) or {}) or sorted(
        getattr(quantization, "modules", {}) if kroneckerized else {})
    compression_text = (
        f"{n_params:,} parameters{ratio}. Kronecker modules: {len(kron_modules)}"
        + (f" ({', '.join(kron_modules[:6])}{', …' if len(kron_modules) > 6 else ''})." if kron_modules else ".")
    )
    if eval_metrics:
        rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in eval_metrics.items() if isinstance(v, (int, float)))
        eval_text = f"On {dataset_name or task} ({dataset_config or ''} validation):\n\n| metric | value |\n|---|---|\n{rows}"
    else:
        eval_text = "Not evaluated yet."
    return ModelCard.from_template(
        card_data,
        template_str=_template(model_type, kroneckerized),
        model_name=name,
        repo_id=repo_id or "path/to/this/model",
        base_model_text=f"`{base_model}`" if base_model else "a pretrained model",
        compression_text=compression_text,
        compression_table=report.to_markdown() if report else "",
        training_text=training or "See the kn-transformers recipes.",
        eval_text=eval_text,
    )
