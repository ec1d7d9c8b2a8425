"""Intermediate-layer knowledge distillation (ILKD): loss terms, arguments and the Trainer."""

from .arguments import DISTILLATION_PRESETS, DEFAULT_PRESET, DistillationArguments, parse_layer_map
from .losses import attention_kl, attention_score_mse, attention_valid_mask, hidden_mse, logits_kl, logits_mse
from .trainer import ILKDTrainer, load_projections

__all__ = [
    "DISTILLATION_PRESETS",
    "DEFAULT_PRESET",
    "DistillationArguments",
    "ILKDTrainer",
    "attention_kl",
    "attention_score_mse",
    "attention_valid_mask",
    "hidden_mse",
    "load_projections",
    "logits_kl",
    "logits_mse",
    "parse_layer_map",
]
