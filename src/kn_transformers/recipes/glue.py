"""GLUE: the task table and the official metrics, computed without network access.

``evaluate.load("glue", task)`` needs the Hub; its metrics are sklearn/scipy underneath, so
they are computed here directly with the same functions (same numbers, online or not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class GlueTask:
    name: str
    keys: tuple[str, Optional[str]]  # sentence fields in the Hub's `glue` data set
    num_labels: int  # 1 = regression
    metrics: tuple[str, ...]
    eval_splits: tuple[str, ...] = ("validation",)

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def main_metric(self) -> str:
        return self.metrics[0]


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("cola", ("sentence", None), 2, ("matthews_correlation",)),
    "sst2": GlueTask("sst2", ("sentence", None), 2, ("accuracy",)),
    "mrpc": GlueTask("mrpc", ("sentence1", "sentence2"), 2, ("f1", "accuracy")),
    "qqp": GlueTask("qqp", ("question1", "question2"), 2, ("f1", "accuracy")),
    "stsb": GlueTask("stsb", ("sentence1", "sentence2"), 1, ("pearson", "spearmanr")),
    "mnli": GlueTask("mnli", ("premise", "hypothesis"), 3, ("accuracy",),
                     ("validation_matched", "validation_mismatched")),
    "qnli": GlueTask("qnli", ("question", "sentence"), 2, ("accuracy",)),
    "rte": GlueTask("rte", ("sentence1", "sentence2"), 2, ("accuracy",)),
    "wnli": GlueTask("wnli", ("sentence1", "sentence2"), 2, ("accuracy",)),
}


def get_task(name: str) -> GlueTask:
    key = name.lower().replace("-", "")
    if key not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; choose one of {sorted(GLUE_TASKS)}")
    return GLUE_TASKS[key]


def glue_metrics(task: str, predictions: Sequence, labels: Sequence) -> dict[str, float]:
    """The task's official metrics. ``predictions``: logits ``(N, C)``, class ids ``(N,)``,
    or regression scores ``(N,)``/``(N, 1)``; ``labels``: ``(N,)``."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    t = get_task(task)
    preds = np.asarray(predictions)
    labels = np.asarray(labels)
    if t.is_regression:
        preds = preds.reshape(-1).astype(np.float64)
        return {"pearson": float(pearsonr(preds, labels)[0]), "spearmanr": float(spearmanr(preds, labels)[0])}
    if preds.ndim == 2:
        preds = preds.argmax(-1)
    out = {}
    for name in t.metrics:
        if name == "accuracy":
            out[name] = float(accuracy_score(labels, preds))
        elif name == "f1":
            out[name] = float(f1_score(labels, preds))
        elif name == "matthews_correlation":
            out[name] = float(matthews_corrcoef(labels, preds))
    return out


def compute_metrics_for(task: str):
    """A ``Trainer(compute_metrics=...)`` function for ``task``."""

    def compute_metrics(eval_pred):
        preds = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        return glue_metrics(task, preds, eval_pred.label_ids)

    return compute_metrics


def load_glue(task: str, train_file: Optional[str] = None, validation_file: Optional[str] = None,
              cache_dir: Optional[str] = None):
    """The task's ``DatasetDict``: local JSON-lines/CSV files with the Hub's field names, or the Hub's ``nyu-mll/glue``."""
    from datasets import load_dataset

    t = get_task(task)
    if train_file or validation_file:
        files = {k: v for k, v in (("train", train_file), ("validation", validation_file)) if v}
        ext = next(iter(files.values())).rsplit(".", 1)[-1]
        builder = "csv" if ext == "csv" else "json"
        ds = load_dataset(builder, data_files=files, cache_dir=cache_dir)
        missing = [k for k in t.keys if k and k not in ds[next(iter(ds))].column_names]
        if missing:
            raise ValueError(f"{task} files lack the field(s) {missing}; the Hub's names are {list(filter(None, t.keys))}")
        return ds
    return load_dataset("nyu-mll/glue", t.name, cache_dir=cache_dir)
