"""KroneckerBERT (Tahaei et al., 2022): BERT whose embedding and encoder matrices are Kronecker products.

The models are BERT's own classes with the matrices listed in ``config.kronecker_factors``
swapped for :class:`KroneckerLinear` / :class:`KroneckerEmbedding` through the core's module
table (``apply_kronecker_factors``) before ``post_init()``.
Everything else (embeddings sum, LayerNorms, attention through ``ALL_ATTENTION_FUNCTIONS``,
masks, output recording, heads and losses) is BERT's code, so what BERT returns is what
these models return:

- ``hidden_states[0]`` is the embedding output, ``hidden_states[i + 1]`` the output of layer
  ``i``, i.e. of its FFN block (``LayerNorm(FFN(x) + x)``), each ``(batch, seq, hidden)``;
- ``attentions[i]`` is ``(batch, heads, seq, seq)``: probabilities under ``"eager"``, the masked
  pre-softmax scores ``QKᵀ/√d + mask`` under ``"kn_eager_scores"`` (registered by the sibling
  ``attention_scores`` module, imported here so that it travels with saved code).

The constructors only build shapes (random init through ``_init_weights``); the nearest
Kronecker factors of a teacher are computed by ``kn_transformers.kronecker_bert_from_bert``.

This file imports torch, transformers and package modules only (relative imports):
``save_pretrained`` writes it and what it imports next to the weights, so that
``trust_remote_code=True`` loads a saved model without kn_transformers.
"""


import torch
from torch import nn
from transformers.models.bert.modeling_bert import (
    BertEmbeddings,
    BertEncoder,
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertIntermediate,
    BertLayer,
    BertLMPredictionHead,
    BertModel,
    BertOnlyMLMHead,
    BertPooler,
    BertPredictionHeadTransform,
    BertPreTrainedModel,
)
from transformers.utils import logging

from ..activations import activate, global_hooks_registered, inplace_activation
from ..attention_scores import ATTENTION_SCORES_IMPLEMENTATION  # noqa: F401  (registers "kn_eager_scores")
from .configuration_kronecker_bert import KroneckerBertConfig
from ...core.dispatch import TiedKroneckerHead, apply_kronecker_factors
from ...core.layers import KroneckerEmbedding, KroneckerLinear, init_kronecker_
from ..kronecker_pretrained import KroneckerPreTrainedMixin

logger = logging.get_logger(__name__)


class KroneckerBertLMPredictionHead(BertLMPredictionHead):
    """BERT's MLM prediction head whose decoder is tied to a Kronecker word embedding:
    ``logits = E · transform(h) + bias``.

    ``E`` (``vocab × hidden``) is never built: ``decoder`` is a :class:`TiedKroneckerHead`, which
    contracts ``(..., hidden)`` with the embedding's factors into ``(..., vocab)``. Parameter names
    (``transform.*``, ``bias``) are BERT's, so a teacher's MLM head loads as is.
    """

    def __init__(self, config, word_embeddings: KroneckerEmbedding):
        nn.Module.__init__(self)
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = TiedKroneckerHead(word_embeddings)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden_states)) + self.bias


class KroneckerBertPreTrainedModel(KroneckerPreTrainedMixin, BertPreTrainedModel):
    """Base class: BERT's, plus the init of the Kronecker modules, strict loading, code and the
    full ``auto_map`` on save (:class:`KroneckerPreTrainedMixin`).

    ``accepts_loss_kwargs = False``: the heads average their loss over the batch and ignore
    ``num_items_in_batch``, so Trainer must divide by the gradient-accumulation steps itself;
    with BERT's default (``True``, inferred from ``**kwargs``) the loss grows with the number of
    accumulation steps.
    """

    config_class = KroneckerBertConfig
    config: KroneckerBertConfig
    base_model_prefix = "bert"
    accepts_loss_kwargs = False
    _no_split_modules = ["BertEmbeddings", "BertLayer", "KroneckerBertLayer"]
    _auto_classes = {
        "AutoModel": "KroneckerBertModel",
        "AutoModelForSequenceClassification": "KroneckerBertForSequenceClassification",
        "AutoModelForMaskedLM": "KroneckerBertForMaskedLM",
        "AutoModelForQuestionAnswering": "KroneckerBertForQuestionAnswering",
    }

    @torch.no_grad()
    def _init_weights(self, module):
        """BERT's init; Kronecker factors get equal stds so that the product's entries have std
        ``initializer_range`` (entries of ``Σ_r A_r⊗B_r`` have variance ``r·σ_A²·σ_B²``)."""
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, (KroneckerLinear, KroneckerEmbedding)):
            init_kronecker_(module, std)


class KroneckerBertIntermediate(BertIntermediate):
    """BERT's intermediate block (``act(dense(x))``, same parameters and values).

    Without autograd the activation overwrites the projection's fresh output (see
    ``activations``): at BERT-base shapes and 32 x 128 tokens that saves allocating 50 MB per
    layer, ~11 of the ~14 ms of each GELU call here.
    """

    @classmethod
    def from_intermediate(cls, module: BertIntermediate, config) -> "KroneckerBertIntermediate":
        """Takes over ``module``'s submodules (no new parameters, no RNG draws)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.dense = module.dense
        new.intermediate_act_fn = module.intermediate_act_fn
        new._inplace_act = inplace_activation(config.hidden_act)
        return new

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return activate(self.dense(hidden_states), self.intermediate_act_fn, self._inplace_act, self.dense,
                        hidden_states)


class KroneckerBertLayer(BertLayer):
    """BERT's layer: the same submodules, parameters, init (RNG draws) and outputs, with
    :class:`KroneckerBertIntermediate`.

    Without autograd and on CPU, an input of more than ``ffn_block_tokens`` tokens (batch × seq)
    goes through the feed-forward block as 2-D blocks of at most that many ``(tokens, hidden)``
    rows, so its ``(tokens, intermediate)`` activation stays ~12 MB at BERT-base widths instead of
    50 MB at 32 × 128 tokens. Each token's result is the same; peak memory drops, and with glibc's malloc (which
    maps every block over 32 MB afresh) ~10 ms of page faults per layer go away: measured here,
    the kroneckerbert8 forward at 32 × 128 is 6-12% faster. Not when a forward hook or pre-hook
    sits in the block, or a global one is registered (e.g. distillation capturing FFN outputs): a
    hook must see whole tensors. ``ffn_block_tokens = 0`` (per instance or class) turns it off.
    """

    ffn_block_tokens = 1024

    def __init__(self, config, layer_idx=None):
        super().__init__(config, layer_idx=layer_idx)
        self.intermediate = KroneckerBertIntermediate.from_intermediate(self.intermediate, config)

    def _ffn_hooked(self) -> bool:
        return global_hooks_registered(pre=True) or any(
            m._forward_hooks or m._forward_pre_hooks for part in (self.intermediate, self.output) for m in part.modules())

    def feed_forward_chunk(self, attention_output: torch.Tensor) -> torch.Tensor:
        hidden = attention_output.shape[-1]
        x = attention_output.reshape(-1, hidden)
        block = self.ffn_block_tokens
        if (torch.is_grad_enabled() or not block or x.shape[0] <= block or not x.is_cpu
                or self._ffn_hooked()):
            return super().feed_forward_chunk(attention_output)
        out = torch.empty_like(x)
        for start in range(0, x.shape[0], block):
            rows = x[start:start + block]
            out[start:start + block] = super().feed_forward_chunk(rows)
        return out.view_as(attention_output)


class KroneckerBertEncoder(BertEncoder):
    """BERT's encoder with :class:`KroneckerBertLayer` layers (same names and parameters)."""

    def __init__(self, config):
        nn.Module.__init__(self)
        self.config = config
        self.layer = nn.ModuleList([KroneckerBertLayer(config, layer_idx=i) for i in range(config.num_hidden_layers)])


class KroneckerBertModel(KroneckerBertPreTrainedModel, BertModel):
    """The bare KroneckerBERT encoder; ``forward`` is ``BertModel.forward``.

    Outputs ``last_hidden_state`` ``(batch, seq, hidden)``, ``pooler_output`` ``(batch, hidden)``
    and, on request, ``hidden_states`` / ``attentions`` exactly as BERT (see the module docstring).
    """

    config_class = KroneckerBertConfig

    def __init__(self, config: KroneckerBertConfig, add_pooling_layer: bool = True):
        KroneckerBertPreTrainedModel.__init__(self, config)  # PreTrainedModel.__init__, not BertModel's
        self.config = config
        self.gradient_checkpointing = False
        self.embeddings = BertEmbeddings(config)
        self.encoder = KroneckerBertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        apply_kronecker_factors(self, config.kronecker_factors)
        self.post_init()


class KroneckerBertForSequenceClassification(KroneckerBertPreTrainedModel, BertForSequenceClassification):
    """KroneckerBERT with BERT's pooled-output classifier; ``forward`` is BERT's.

    ``num_labels == 1`` is regression (MSE), integer labels single-label classification (CE),
    float multi-hot labels multi-label (BCE), as ``BertForSequenceClassification``.
    Logits: ``(batch, num_labels)``.
    """

    config_class = KroneckerBertConfig

    def __init__(self, config: KroneckerBertConfig):
        KroneckerBertPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.config = config
        self.bert = KroneckerBertModel(config)
        classifier_dropout = (
            config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        )
        self.dropout = nn.Dropout(classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()


class KroneckerBertForQuestionAnswering(KroneckerBertPreTrainedModel, BertForQuestionAnswering):
    """KroneckerBERT with BERT's span head (``start_logits``, ``end_logits``: ``(batch, seq)``)."""

    config_class = KroneckerBertConfig

    def __init__(self, config: KroneckerBertConfig):
        KroneckerBertPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.bert = KroneckerBertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()


class KroneckerBertForMaskedLM(KroneckerBertPreTrainedModel, BertForMaskedLM):
    """KroneckerBERT with BERT's MLM head; logits ``(batch, seq, vocab)``.

    The decoder follows the word embedding:

    - Kronecker word embedding and ``config.tie_word_embeddings`` (BERT's default): the decoder is
      the embedding itself, applied factored (:class:`TiedKroneckerHead`) — no ``vocab × hidden``
      matrix is stored or built, and the tie holds by construction (there is no
      ``cls.predictions.decoder`` parameter).
    - Kronecker word embedding and ``tie_word_embeddings=False``: an untied dense decoder
      (``vocab × hidden`` parameters, as BERT with that setting).
    - Dense word embedding: exactly BERT's head, tied as BERT ties it.
    """

    config_class = KroneckerBertConfig
    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }

    def __init__(self, config: KroneckerBertConfig):
        KroneckerBertPreTrainedModel.__init__(self, config)
        if config.is_decoder:
            logger.warning(
                "If you want to use `KroneckerBertForMaskedLM` make sure `config.is_decoder=False` for "
                "bi-directional self-attention."
            )
        self.bert = KroneckerBertModel(config, add_pooling_layer=False)
        self.factored_decoder = bool(
            isinstance(self.bert.embeddings.word_embeddings, KroneckerEmbedding) and config.tie_word_embeddings
        )
        self.cls = BertOnlyMLMHead(config)
        if self.factored_decoder:
            self.cls.predictions = KroneckerBertLMPredictionHead(config, self.bert.embeddings.word_embeddings)
            self._tied_weights_keys = {}  # tied by construction: the head reads the embedding's factors
        self.post_init()

    def set_output_embeddings(self, new_embeddings):
        if self.factored_decoder:
            raise ValueError("the MLM decoder is the Kronecker word embedding itself; set the input embeddings instead")
        super().set_output_embeddings(new_embeddings)


__all__ = [
    "KroneckerBertPreTrainedModel",
    "KroneckerBertModel",
    "KroneckerBertForSequenceClassification",
    "KroneckerBertForMaskedLM",
    "KroneckerBertForQuestionAnswering",
]
