"""KnGPT2: GPT-2 whose token embedding and chosen layer matrices are Kronecker products.

The models are GPT-2's own classes with some modules swapped at construction time through the
core's module table (``apply_kronecker_factors``), as ``config.kronecker_factors`` says: ``wte`` becomes a :class:`KroneckerEmbedding`, and a
block's ``attn.c_attn`` / ``attn.c_proj`` / ``mlp.c_fc`` / ``mlp.c_proj`` (``Conv1D``) become
:class:`KroneckerLinear`. Everything else (attention through ``ALL_ATTENTION_FUNCTIONS``,
masks, KV cache, output recording, the classification pooling rule) is GPT-2's code, so
``output_hidden_states`` / ``output_attentions`` return exactly what GPT-2 returns and the
``"kn_eager_scores"`` implementation (pre-softmax scores, registered on import) works.

Construction only allocates factor shapes with a random init (``from_pretrained`` builds on
the meta device); factors from a dense teacher come from ``kn_transformers.kngpt2_from_gpt2``.

Imports: torch, transformers and package modules only (relative): ``save_pretrained`` writes
this file and what it imports next to the weights, for ``trust_remote_code`` users who do not
have ``kn_transformers``.
"""

import math

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.models.gpt2.modeling_gpt2 import (
    GPT2Attention,
    GPT2Block,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2MLP,
    GPT2Model,
    GPT2PreTrainedModel,
)

from ..activations import activate, inplace_activation
from ..attention_scores import ATTENTION_SCORES_IMPLEMENTATION  # noqa: F401  (registers "kn_eager_scores")
from .configuration_kngpt2 import KnGPT2Config
from ...core.dispatch import TiedKroneckerHead, apply_kronecker_factors
from ...core.layers import KroneckerEmbedding, KroneckerLinear, init_kronecker_
from ..kronecker_pretrained import KroneckerPreTrainedMixin

__all__ = [
    "KnGPT2PreTrainedModel",
    "KnGPT2Model",
    "KnGPT2LMHeadModel",
    "KnGPT2ForSequenceClassification",
]

class KnGPT2PreTrainedModel(KroneckerPreTrainedMixin, GPT2PreTrainedModel):
    """Base class: config class, weight init of the Kronecker modules, strict loading, code and
    ``auto_map`` on save (:class:`KroneckerPreTrainedMixin`)."""

    config: KnGPT2Config
    config_class = KnGPT2Config
    _auto_classes = {
        "AutoModel": "KnGPT2Model",
        "AutoModelForCausalLM": "KnGPT2LMHeadModel",
        "AutoModelForSequenceClassification": "KnGPT2ForSequenceClassification",
    }

    @torch.no_grad()
    def _init_weights(self, module):
        """GPT-2's init; Kronecker modules get the same entry std (``initializer_range``).

        As in GPT-2, a block's residual projection ``c_proj`` gets ``initializer_range / √(2·n_layer)``.
        """
        std = self.config.initializer_range
        if isinstance(module, (KroneckerLinear, KroneckerEmbedding)):
            init_kronecker_(module, std)
            return
        if isinstance(module, (GPT2Attention, GPT2MLP)) and isinstance(module.c_proj, KroneckerLinear):
            # children are initialised before parents: this overrides c_proj's plain init above
            init_kronecker_(module.c_proj, std / math.sqrt(2 * self.config.n_layer))
            return
        super()._init_weights(module)


class KnGPT2MLP(GPT2MLP):
    """GPT-2's MLP (same parameters and values); without autograd the activation overwrites
    ``c_fc``'s fresh output (see ``activations``; ``gelu_new`` allocates seven temporaries)."""

    @classmethod
    def from_mlp(cls, module: GPT2MLP, config) -> "KnGPT2MLP":
        """Takes over ``module``'s submodules (no new parameters, no RNG draws)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.c_fc, new.c_proj, new.act, new.dropout = module.c_fc, module.c_proj, module.act, module.dropout
        new._inplace_act = inplace_activation(config.activation_function)
        return new

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        h = activate(self.c_fc(hidden_states), self.act, self._inplace_act, self.c_fc, hidden_states)
        return self.dropout(self.c_proj(h))


class KnGPT2Model(KnGPT2PreTrainedModel, GPT2Model):
    """GPT-2's transformer with the modules in ``config.kronecker_factors`` made Kronecker.

    Inputs and outputs are GPT-2's (``input_ids (B, T)`` → ``last_hidden_state (B, T, n_embd)``,
    KV cache, hidden states, attentions).
    """

    def __init__(self, config: KnGPT2Config):
        super(GPT2Model, self).__init__(config)  # PreTrainedModel.__init__, not GPT2Model's (no post_init yet)
        config._normalized_kronecker_factors()  # re-validate: the config may have been edited since init
        self.embed_dim = config.hidden_size

        # a dense wte to be replaced is only a shape: built on the meta device, never allocated
        kronecker_wte = config.kronecker_spec("wte") is not None
        self.wte = nn.Embedding(config.vocab_size, self.embed_dim, device="meta" if kronecker_wte else None)
        self.wpe = nn.Embedding(config.max_position_embeddings, self.embed_dim)

        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([GPT2Block(config, layer_idx=i) for i in range(config.num_hidden_layers)])
        for block in self.h:
            block.mlp = KnGPT2MLP.from_mlp(block.mlp, config)
        self.ln_f = nn.LayerNorm(self.embed_dim, eps=config.layer_norm_epsilon)

        apply_kronecker_factors(self, config.kronecker_factors, device=self.wpe.weight.device)

        self.gradient_checkpointing = False
        self._attn_implementation = config._attn_implementation
        self.post_init()


class KnGPT2LMHeadModel(KnGPT2PreTrainedModel, GPT2LMHeadModel, GenerationMixin):
    """KnGPT2 with a language-modelling head; generation with the KV cache, causal-LM loss.

    ``forward`` is GPT-2's. Head: with a Kronecker ``wte`` and ``config.tie_word_embeddings=True``
    ``lm_head`` is a :class:`TiedKroneckerHead` (logits ``KroneckerEmbedding.logits(h)``, factored;
    no ``lm_head`` weight exists);
    otherwise ``lm_head`` is a dense ``nn.Linear(n_embd, vocab_size, bias=False)``, tied to a
    dense ``wte`` when ``tie_word_embeddings`` and untied (the KnGPT2 paper) with a Kronecker one.
    """

    def __init__(self, config: KnGPT2Config):
        super(GPT2LMHeadModel, self).__init__(config)
        self.transformer = KnGPT2Model(config)
        kronecker_wte = isinstance(self.transformer.wte, KroneckerEmbedding)
        if kronecker_wte and config.tie_word_embeddings:
            self.lm_head = TiedKroneckerHead(self.transformer.wte)
        else:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if kronecker_wte:
            # nothing to tie: the factored head has no weight, the paper's dense head is untied
            self._tied_weights_keys = None
        self.loss_type = "ForCausalLM"
        self.post_init()

    @property
    def has_factored_head(self) -> bool:
        """True when logits come from the Kronecker embedding's factors (no ``V×d`` matrix)."""
        return isinstance(self.lm_head, TiedKroneckerHead)


class KnGPT2ForSequenceClassification(KnGPT2PreTrainedModel, GPT2ForSequenceClassification):
    """KnGPT2 with GPT-2's classification head: ``score`` (``n_embd → num_labels``, no bias).

    Pooling is GPT-2's: the logits of the rightmost token that is not ``config.pad_token_id``
    (left or right padding), or of the last token when no pad token is set (batch 1 only).
    """

    def __init__(self, config: KnGPT2Config):
        super(GPT2ForSequenceClassification, self).__init__(config)
        self.num_labels = config.num_labels
        self.transformer = KnGPT2Model(config)
        self.score = nn.Linear(config.n_embd, self.num_labels, bias=False)
        self.post_init()
