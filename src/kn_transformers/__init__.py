"""kn-transformers: Kronecker-compressed Transformers models and their distillation."""

__version__ = "0.1.0"

from .kronecker import (
    FactorChoice,
    KroneckerEmbedding,
    KroneckerLinear,
    choose_kronecker_factors,
    kronecker_factor_choices,
    kronecker_flops,
    kronecker_matmul,
    kronecker_to_dense,
    nearest_kronecker,
    set_kronecker_autotune,
)
from .attention_scores import ATTENTION_SCORES_IMPLEMENTATION, eager_attention_with_scores
from .distillation import DISTILLATION_PRESETS, DistillationArguments, ILKDTrainer
