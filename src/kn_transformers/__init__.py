"""kn-transformers: Kronecker-compressed GPT-2 and BERT for Transformers, restored by ILKD.

Importing the package registers KnGPT2 and KroneckerBERT with the Auto classes.
"""

__version__ = "0.1.0"

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
)

from .models.attention_scores import ATTENTION_SCORES_IMPLEMENTATION, eager_attention_with_scores
from .models.kngpt2.configuration_kngpt2 import KnGPT2Config
from .models.kronecker_bert.configuration_kronecker_bert import KroneckerBertConfig
from .core.report import CompressionReport, ModuleReport
from .models.kronecker_bert.convert_bert import PRESETS as KRONECKER_BERT_PRESETS
from .models.kronecker_bert.convert_bert import KroneckerBertPreset, kronecker_bert_config, kronecker_bert_from_bert
from .models.kngpt2.convert_gpt2 import kngpt2_config_from_gpt2, kngpt2_from_gpt2
from .distillation import DISTILLATION_PRESETS, DistillationArguments, ILKDTrainer
from .core import KroneckerConfig, kroneckerize
from .core.contraction import KRONECKER_ORDERS, contraction_order, kronecker_matmul
from .export import export_onnx, merge_to_dense
from .core.factor_search import FactorChoice, choose_kronecker_factors, kronecker_factor_choices
from .core.inference import optimize_for_inference
from .core.layers import KroneckerEmbedding, KroneckerLinear
from .core.kronecker_math import kronecker_flops, kronecker_to_dense, nearest_kronecker
from .models.kngpt2.modeling_kngpt2 import KnGPT2ForSequenceClassification, KnGPT2LMHeadModel, KnGPT2Model, KnGPT2PreTrainedModel
from .models.kronecker_bert.modeling_kronecker_bert import (
    KroneckerBertForMaskedLM,
    KroneckerBertForQuestionAnswering,
    KroneckerBertForSequenceClassification,
    KroneckerBertModel,
    KroneckerBertPreTrainedModel,
)

AutoConfig.register("kngpt2", KnGPT2Config, exist_ok=True)
AutoModel.register(KnGPT2Config, KnGPT2Model, exist_ok=True)
AutoModelForCausalLM.register(KnGPT2Config, KnGPT2LMHeadModel, exist_ok=True)
AutoModelForSequenceClassification.register(KnGPT2Config, KnGPT2ForSequenceClassification, exist_ok=True)

AutoConfig.register("kronecker-bert", KroneckerBertConfig, exist_ok=True)
AutoModel.register(KroneckerBertConfig, KroneckerBertModel, exist_ok=True)
AutoModelForSequenceClassification.register(KroneckerBertConfig, KroneckerBertForSequenceClassification, exist_ok=True)
AutoModelForMaskedLM.register(KroneckerBertConfig, KroneckerBertForMaskedLM, exist_ok=True)
AutoModelForQuestionAnswering.register(KroneckerBertConfig, KroneckerBertForQuestionAnswering, exist_ok=True)

__all__ = [
    "ATTENTION_SCORES_IMPLEMENTATION",
    "CompressionReport",
    "DISTILLATION_PRESETS",
    "DistillationArguments",
    "FactorChoice",
    "ILKDTrainer",
    "KRONECKER_BERT_PRESETS",
    "KnGPT2Config",
    "KnGPT2ForSequenceClassification",
    "KnGPT2LMHeadModel",
    "KnGPT2Model",
    "KnGPT2PreTrainedModel",
    "KroneckerBertConfig",
    "KroneckerBertForMaskedLM",
    "KroneckerBertForQuestionAnswering",
    "KroneckerBertForSequenceClassification",
    "KroneckerBertModel",
    "KroneckerBertPreTrainedModel",
    "KroneckerBertPreset",
    "KroneckerConfig",
    "KroneckerEmbedding",
    "KroneckerLinear",
    "ModuleReport",
    "choose_kronecker_factors",
    "eager_attention_with_scores",
    "export_onnx",
    "kngpt2_config_from_gpt2",
    "merge_to_dense",
    "kngpt2_from_gpt2",
    "kronecker_bert_config",
    "kronecker_bert_from_bert",
    "kronecker_factor_choices",
    "kroneckerize",
    "kronecker_flops",
    "kronecker_matmul",
    "kronecker_to_dense",
    "nearest_kronecker",
    "optimize_for_inference",
    "contraction_order",
    "KRONECKER_ORDERS",
]
