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

# --- KnGPT2 (issue 3) ---------------------------------------------------------------------
from transformers import (  # noqa: E402
    AutoConfig as _AutoConfig,
    AutoModel as _AutoModel,
    AutoModelForCausalLM as _AutoModelForCausalLM,
    AutoModelForSequenceClassification as _AutoModelForSequenceClassification,
)

from .configuration_kngpt2 import KnGPT2Config  # noqa: E402
from .convert_gpt2 import kngpt2_config_from_gpt2, kngpt2_from_gpt2  # noqa: E402
from .modeling_kngpt2 import (  # noqa: E402
    KnGPT2ForSequenceClassification,
    KnGPT2LMHeadModel,
    KnGPT2Model,
    KnGPT2PreTrainedModel,
)

_AutoConfig.register("kngpt2", KnGPT2Config, exist_ok=True)
_AutoModel.register(KnGPT2Config, KnGPT2Model, exist_ok=True)
_AutoModelForCausalLM.register(KnGPT2Config, KnGPT2LMHeadModel, exist_ok=True)
_AutoModelForSequenceClassification.register(KnGPT2Config, KnGPT2ForSequenceClassification, exist_ok=True)

# --- KroneckerBERT (issue 4) --------------------------------------------------------------
from transformers import (  # noqa: E402
    AutoConfig as _AutoConfig,
    AutoModel as _AutoModel,
    AutoModelForMaskedLM as _AutoModelForMaskedLM,
    AutoModelForQuestionAnswering as _AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification as _AutoModelForSequenceClassification,
)

from .configuration_kronecker_bert import KroneckerBertConfig  # noqa: E402
from .convert_bert import PRESETS as KRONECKER_BERT_PRESETS  # noqa: E402
from .convert_bert import KroneckerBertPreset, kronecker_bert_config, kronecker_bert_from_bert  # noqa: E402
from .modeling_kronecker_bert import (  # noqa: E402
    KroneckerBertForMaskedLM,
    KroneckerBertForQuestionAnswering,
    KroneckerBertForSequenceClassification,
    KroneckerBertModel,
    KroneckerBertPreTrainedModel,
)

_AutoConfig.register("kronecker-bert", KroneckerBertConfig, exist_ok=True)
_AutoModel.register(KroneckerBertConfig, KroneckerBertModel, exist_ok=True)
_AutoModelForSequenceClassification.register(KroneckerBertConfig, KroneckerBertForSequenceClassification, exist_ok=True)
_AutoModelForMaskedLM.register(KroneckerBertConfig, KroneckerBertForMaskedLM, exist_ok=True)
_AutoModelForQuestionAnswering.register(KroneckerBertConfig, KroneckerBertForQuestionAnswering, exist_ok=True)
